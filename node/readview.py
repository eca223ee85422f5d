"""The node's read view: the tick thread makes a StateView (consensus/view.py) after it applied
commands and hands it to the event loop with call_soon_threadsafe; the loop's readers (scheduler,
sender, /status, /metrics, housekeeping) take `ReadView.current` without any lock.

Handed over in loop order: a proposal's result reaches the loop before the view of the tick that
applied it, and the task awaiting that result resumes after both, so a coroutine that committed a
command reads a view that holds it.

The queue's heads (the recipients the leader's scheduler may assign next, thousands of them) are
made only when the scheduler asks, once a round, not after every tick: a busy leader applies
hundreds of ticks a second, and making the heads for each was half its CPU.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from raftmail.consensus.state import MailState
from raftmail.consensus.view import StateView, view_of

log = logging.getLogger("raftmail.node")


class ReadView:
    """The current view; `publish` runs on the tick thread under the apply lock."""

    def __init__(self, node_id: str, leads: Callable[[], bool]) -> None:
        self.node_id = node_id
        self.leads = leads
        self.current = StateView()
        self.published = 0  # views handed to the loop
        self._loop: asyncio.AbstractEventLoop | None = None
        # Recipients wanted in each of the queue's heads (0: none): set on the loop, cleared on the
        # tick thread once it made a view with them.
        self._heads_wanted = 0
        self._heads_waiters: list[asyncio.Future[StateView]] = []

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """From now on views reach the loop through its queue."""
        self._loop = loop

    def heads_wanted(self) -> bool:
        """Whether the next tick must make a view even if it applied nothing (tick thread)."""
        return self._heads_wanted > 0

    def publish(self, st: MailState) -> None:
        # Only the leader's scheduler reads the queue's heads, and only when it asked for them.
        heads = self._heads_wanted if self.leads() else 0
        self._heads_wanted = 0  # a request made from here on is served by the next tick
        view = view_of(st, self.node_id, heads)
        self.published += 1
        loop = self._loop
        if loop is None:
            self.current = view  # before the loop runs: nobody reads it concurrently
            return
        try:
            loop.call_soon_threadsafe(self._set, view)
        except RuntimeError:
            pass  # the loop closed: the node is stopping

    def _set(self, view: StateView) -> None:
        self.current = view
        if view.heads:
            waiters, self._heads_waiters = self._heads_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(view)

    async def with_heads(self, recipients: int, timeout: float) -> StateView:
        """A view that holds the queue's heads (up to `recipients` in each), handed over after
        this call, so it holds every command whose result the caller saw. The current view,
        without heads, if none comes in `timeout` (the apply lock held long, or this node no longer
        leads): a scheduler assigns nothing from it."""
        waiter = asyncio.get_running_loop().create_future()
        self._heads_waiters.append(waiter)
        self._heads_wanted = max(self._heads_wanted, recipients, 1)
        try:
            return await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            return self.current
        finally:
            if waiter in self._heads_waiters:
                self._heads_waiters.remove(waiter)

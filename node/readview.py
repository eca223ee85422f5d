"""The node's read view: the tick thread makes a StateView (consensus/view.py) after it applied
commands and hands it to the event loop with call_soon_threadsafe; the loop's readers (scheduler,
sender, /status, /metrics, housekeeping) take `ReadView.current` without any lock.

Handed over in loop order: a proposal's result reaches the loop before the view of the tick that
applied it, and the task awaiting that result resumes after both, so a coroutine that committed a
command reads a view that holds it.
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

    def __init__(self, node_id: str, queue_head: Callable[[MailState], int], leads: Callable[[], bool]) -> None:
        self.node_id = node_id
        self.queue_head = queue_head  # recipients per queue head, for the leader's scheduler
        self.leads = leads
        self.current = StateView()
        self.published = 0  # views handed to the loop
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """From now on views reach the loop through its queue."""
        self._loop = loop

    def publish(self, st: MailState) -> None:
        # Only the leader's scheduler reads the queue's heads: the others skip making them.
        view = view_of(st, self.node_id, self.queue_head(st) if self.leads() else 0)
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

"""The bridge between asyncio and pysyncobj's tick thread: `await propose(command, timeout)`."""
from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from pysyncobj import FAIL_REASON

from raftmail.consensus.pysyncobj_compat import FAIL_NAMES
from raftmail.consensus.raft import RaftNode
from raftmail.consensus.commands import Command, encode_command, encode_group

# Failures after which the command is certainly not in the log.
# What a component gets to put a command in the log: (command, timeout) -> the applied result;
# raises ProposalFailed when it is not known to be committed in time.
Propose = Callable[[Command, float], Awaitable[Any]]

_NOT_COMMITTED = {FAIL_REASON.QUEUE_FULL, FAIL_REASON.MISSING_LEADER, FAIL_REASON.NOT_LEADER,
                  FAIL_REASON.DISCARDED, FAIL_REASON.REQUEST_DENIED}


class ProposalFailed(Exception):
    """The command did not commit, or we cannot know: `unknown` says which.

    An unknown outcome (timeout, leader change) may still commit later, so every command that
    can be retried carries an idempotency key the state machine deduplicates on.
    """

    def __init__(self, reason: str, unknown: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unknown = unknown


@dataclass
class _Waiting:
    blob: bytes
    future: asyncio.Future
    deadline: float
    sent: bool = False


@dataclass
class _Entry:
    group: list[_Waiting]
    open: bool = True  # until answered, or given up once every waiter's deadline passed
    give_up: asyncio.TimerHandle | None = None


class Proposer:
    """Proposes commands from the event loop, with group commit across every kind of command:
    whatever is proposed while earlier entries are in flight rides in one Raft entry (a `group`
    command), so reports, renewals, assignments and submissions share entries and frames.
    Bounds: `max_waiting` commands queued or in flight, `max_entries_in_flight` entries, and
    `max_entry_bytes` per entry (a larger single command still goes alone)."""

    def __init__(self, raft: RaftNode, loop: asyncio.AbstractEventLoop, max_waiting: int,
                 max_entries_in_flight: int = 2, max_entry_bytes: int = 60000) -> None:
        self.raft = raft
        self.loop = loop
        self.max_waiting = max_waiting
        self.max_entries_in_flight = max_entries_in_flight
        self.max_entry_bytes = max_entry_bytes
        self._queue: deque[_Waiting] = deque()
        self.in_flight = 0  # commands proposed and not yet answered (queued or in an entry)
        self.entries_in_flight = 0
        self._send_soon = False
        self.entries = 0
        self.commands = 0

    async def propose(self, command: Command, timeout: float) -> Any:
        """Commit `command` on a majority and return its result as applied on this node."""
        if self.in_flight >= self.max_waiting:
            raise ProposalFailed("too many commands in flight", unknown=False)
        waiting = _Waiting(encode_command(command), self.loop.create_future(), self.loop.time() + timeout)
        self.in_flight += 1
        self._queue.append(waiting)
        if not self._send_soon:
            # Send at the end of this loop turn: commands proposed in the same turn (every batch's
            # report on the report clock, say) share one entry at no added latency.
            self._send_soon = True
            self.loop.call_soon(self._send_entries)
        try:
            done, _ = await asyncio.wait({waiting.future}, timeout=max(0.0, timeout))
        except asyncio.CancelledError:
            if not waiting.sent:
                self._queue.remove(waiting)  # never proposed: it must not commit behind our back
            raise
        finally:
            self.in_flight -= 1
        if not done:
            if not waiting.sent:
                self._queue.remove(waiting)
                raise ProposalFailed(f"not proposed within {timeout:g}s: earlier entries still in flight",
                                     unknown=False)
            raise ProposalFailed(f"no commit within {timeout:g}s", unknown=True)
        result, err = waiting.future.result()
        if err != FAIL_REASON.SUCCESS:
            name = FAIL_NAMES.get(err, str(err)).lower()
            raise ProposalFailed(name, unknown=err not in _NOT_COMMITTED)
        return result

    def _send_entries(self) -> None:
        self._send_soon = False
        while self._queue and self.entries_in_flight < self.max_entries_in_flight:
            group = [self._queue.popleft()]
            size = len(group[0].blob)
            while self._queue and size + len(self._queue[0].blob) <= self.max_entry_bytes:
                group.append(self._queue.popleft())
                size += len(group[-1].blob)
            for w in group:
                w.sent = True
            self.entries_in_flight += 1
            self.entries += 1
            self.commands += len(group)
            blob = group[0].blob if len(group) == 1 else encode_group([w.blob for w in group])
            entry = _Entry(group)
            # pysyncobj may never answer (a request lost with its leader): the slot is freed once
            # every waiter has given up.
            entry.give_up = self.loop.call_at(max(w.deadline for w in group), self._give_up, entry)

            def on_commit(result: Any, err: int, entry: _Entry = entry) -> None:
                # Tick thread, or inline for QUEUE_FULL.
                try:
                    self.loop.call_soon_threadsafe(self._answer, entry, result, err)
                except RuntimeError:
                    pass  # loop closed during shutdown
            self.raft.submit(blob, on_commit)

    def _give_up(self, entry: _Entry) -> None:
        if entry.open:
            entry.open = False
            self.entries_in_flight -= 1
            self._send_entries()

    def _answer(self, entry: _Entry, result: Any, err: int) -> None:
        if not entry.open:
            return
        entry.open = False
        if entry.give_up is not None:
            entry.give_up.cancel()  # no timer left behind per answered entry
        self.entries_in_flight -= 1
        group = entry.group
        if len(group) > 1 and err == FAIL_REASON.SUCCESS:
            results = result if isinstance(result, list) and len(result) == len(group) else \
                [{"error": f"unexpected group result {result!r}"}] * len(group)
        else:
            results = [result] * len(group)
        for w, r in zip(group, results):
            if not w.future.done():
                w.future.set_result((r, err))
        self._send_entries()

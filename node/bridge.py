"""The bridge between asyncio and pysyncobj's tick thread: `await propose(command, timeout)`."""
from __future__ import annotations

import asyncio
from typing import Any

from pysyncobj import FAIL_REASON

from raftmail.consensus.raft import FAIL_NAMES, RaftNode
from raftmail.consensus.state import encode_command

# Failures after which the command is certainly not in the log.
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


class Proposer:
    """Proposes commands from the event loop, at most `max_in_flight` at a time."""

    def __init__(self, raft: RaftNode, loop: asyncio.AbstractEventLoop, max_in_flight: int) -> None:
        self.raft = raft
        self.loop = loop
        self._slots = asyncio.Semaphore(max_in_flight)
        self.in_flight = 0

    async def propose(self, command: dict, timeout: float) -> Any:
        """Commit `command` on a majority and return its result as applied on this node."""
        blob = encode_command(command)
        deadline = self.loop.time() + timeout
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout)
        except asyncio.TimeoutError:
            raise ProposalFailed("too many commands in flight", unknown=False) from None
        self.in_flight += 1
        try:
            fut: asyncio.Future = self.loop.create_future()

            def resolve(result: Any, err: int) -> None:
                if not fut.done():
                    fut.set_result((result, err))

            def on_commit(result: Any, err: int) -> None:  # tick thread, or inline for QUEUE_FULL
                try:
                    self.loop.call_soon_threadsafe(resolve, result, err)
                except RuntimeError:
                    pass  # loop closed during shutdown

            self.raft.submit(blob, on_commit)
            remaining = max(0.0, deadline - self.loop.time())
            try:
                result, err = await asyncio.wait_for(fut, remaining)
            except asyncio.TimeoutError:
                raise ProposalFailed(f"no commit within {timeout:g}s", unknown=True) from None
        finally:
            self.in_flight -= 1
            self._slots.release()
        if err != FAIL_REASON.SUCCESS:
            name = FAIL_NAMES.get(err, str(err)).lower()
            raise ProposalFailed(name, unknown=err not in _NOT_COMMITTED)
        return result

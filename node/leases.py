"""Batch leases measured on this node's own monotonic clock.

The replicated state holds a lease as a duration and a renewal counter, never as a wall-clock time,
so no two machines' clocks are ever compared. Each node notes, on its own monotonic clock, when it
applied each batch's assignment and each renewal (`observe`, called with every applied result).

- The leader expires a batch only once its own clock says the lease plus `expiry_margin` passed
  since it applied the last assignment or renewal; the `expire` command names the renewal count it
  saw, so a renewal committed in between wins. A new leader applied the same entries no earlier
  than the old one did, so its measurement is later, never earlier.
- The holder counts from the moment it SENT the last renewal that committed (the leader can only
  apply it later), or before that from when it applied the assignment; it stops `send_margin`
  before that lease ends.
"""
from __future__ import annotations

import threading
import time
from typing import Any

# Never more than this many batches are remembered; older entries of finished batches go first.
MAX_TRACKED = 4096


class LeaseClock:
    def __init__(self, max_tracked: int = MAX_TRACKED) -> None:
        self._lock = threading.Lock()
        self.max_tracked = max_tracked
        # batch id -> (renewals, monotonic time this node applied that assignment or renewal)
        self._applied: dict[str, tuple[int, float]] = {}

    # -- fed by the Raft tick thread with every applied command's result

    def observe(self, result: Any) -> None:
        if isinstance(result, list):  # a group: one result per command
            for r in result:
                self.observe(r)
            return
        if isinstance(result, dict):
            leased = result.get("leased")
            if isinstance(leased, list) and len(leased) == 2:
                self.applied(leased[0], leased[1], time.monotonic())

    def applied(self, bid: str, renewals: int, at: float) -> None:
        with self._lock:
            old = self._applied.get(bid)
            if old is None or renewals >= old[0]:
                self._applied.pop(bid, None)  # re-inserted last: the dict stays in apply order
                self._applied[bid] = (renewals, at)
            while len(self._applied) > self.max_tracked:
                del self._applied[next(iter(self._applied))]

    # -- read by the leader's scheduler and the sender

    def since(self, bid: str, renewals: int, now: float) -> float:
        """Seconds since this node applied the batch's assignment or renewal number `renewals`. A
        batch this node never saw applied (it came in a snapshot, or the table dropped it) is
        noted as applied now: later than the truth, so an expiry can only come late."""
        with self._lock:
            old = self._applied.get(bid)
            if old is None or old[0] < renewals:
                self._applied[bid] = old = (renewals, now)
            return now - old[1]

    def applied_at(self, bid: str) -> tuple[int, float] | None:
        with self._lock:
            return self._applied.get(bid)

    def forget_except(self, live: set[str]) -> None:
        """Drop batches the state no longer holds."""
        with self._lock:
            for bid in [b for b in self._applied if b not in live]:
                del self._applied[bid]

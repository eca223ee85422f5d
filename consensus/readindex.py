"""Read indexes of the replicated state, kept in step as commands apply, so that what the leader's
scheduler and the node's readers ask ("which recipients may be assigned now", "how many batches
does each node hold", "since when has the oldest waiting submission waited") is answered by a
bounded read instead of a scan of every submission.

Derived, never snapshotted: `rebuild` makes them from a loaded snapshot, and the state machine
updates them in its one transition (MailState.set_state) and in the few handlers that change what
they cover (submit, assign, end of a batch, pause, resume). No transition reads them. Pure: no
clock, no I/O; the time a read is about arrives as an argument.
"""
from __future__ import annotations

import heapq
from itertools import islice
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, NamedTuple

from .outcomes import DEFERRED, PENDING
from .domains import domain_of

if TYPE_CHECKING:
    from .records import Submission
    from .state import MailState

# A lazily cleaned heap is rebuilt once it holds more than this many entries beyond twice its
# live ones: the stale entries cost memory and read time, a rebuild costs one pass.
HEAP_SLACK = 64


class Ready(NamedTuple):
    """A pending recipient of an active campaign: `pos` orders submissions as the queue does."""

    pos: int
    submission: str
    index: int
    domain: str


class Due(NamedTuple):
    """A deferred recipient of an active campaign and the time its retry falls due, or a pending
    recipient of a scheduled submission and its send time."""

    next_at: float
    pos: int
    submission: str
    index: int
    domain: str


class ReadIndex:
    def __init__(self) -> None:
        # submission id -> its pending recipients of an unpaused, uncancelled campaign; submissions
        # in the order they first had one.
        self.ready: dict[str, dict[int, None]] = {}
        # The same for submissions with a send time (not_before): they stay here, apart, since no
        # command marks the moment the time comes; the reads give them as due at that time.
        self.scheduled: dict[str, dict[int, None]] = {}
        # Heap of (next_at, submission, index) of deferred recipients of active campaigns; an entry
        # whose recipient moved on stays until it reaches the top or the heap is rebuilt.
        self.deferred: list[tuple[float, str, int]] = []
        self.deferred_stale = 0
        # submission id -> when it entered the open list (MailState.open): the queue's order.
        self.open_pos: dict[str, int] = {}
        self.pos_seq = 0
        # Positions count again from 0 when the index is made anew (a snapshot load): a reader that
        # remembers a position (bodies_opened_since) remembers this token with it.
        self.positions: object = object()
        # Heap of (accepted_at, submission) of open submissions, cleaned the same way.
        self.waiting_age: list[tuple[float, str]] = []
        self.node_batches: dict[str, int] = {}  # batches held per node
        # submission id -> its recipients' domains, made when a read first needs them and dropped
        # when the submission leaves the open list.
        self._domains: dict[str, list[str]] = {}

    # ---------------------------------------------------------------- kept in step by the state

    def opened(self, st: MailState, sub: Submission) -> None:
        """`sub` was added to st.open (it was not there)."""
        self.pos_seq += 1
        self.open_pos[sub.id] = self.pos_seq
        heapq.heappush(self.waiting_age, (sub.accepted_at, sub.id))

    def closed(self, st: MailState, sid: str) -> None:
        """`sid` left st.open."""
        self.open_pos.pop(sid, None)
        self._domains.pop(sid, None)
        age = self.waiting_age
        while age and age[0][1] not in st.open:
            heapq.heappop(age)
        if len(age) > 2 * len(st.open) + HEAP_SLACK:
            self.waiting_age = [(st.submissions[s].accepted_at, s) for s in st.open]
            heapq.heapify(self.waiting_age)

    def submitted(self, st: MailState, sub: Submission) -> None:
        """A new submission, every recipient pending (before suppressed ones are marked)."""
        if _active(st, sub) and sub.rcpts:
            self._pending_of(sub)[sub.id] = dict.fromkeys(range(len(sub.rcpts)))

    def state_changed(self, st: MailState, sub: Submission, idx: int, old: int, new: int) -> None:
        if old == PENDING:
            waiting = self._pending_of(sub)
            pending = waiting.get(sub.id)
            if pending is not None:
                pending.pop(idx, None)
                if not pending:
                    del waiting[sub.id]
        elif old == DEFERRED:
            self.deferred_stale += 1
            self._clean_deferred(st)
        if new == PENDING and _active(st, sub):
            self._pending_of(sub).setdefault(sub.id, {})[idx] = None
        elif new == DEFERRED and _active(st, sub):
            heapq.heappush(self.deferred, (sub.detail[idx].next_at, sub.id, idx))

    def batch_started(self, node: str) -> None:
        self.node_batches[node] = self.node_batches.get(node, 0) + 1

    def batch_ended(self, node: str) -> None:
        n = self.node_batches.get(node, 0) - 1
        if n > 0:
            self.node_batches[node] = n
        else:
            self.node_batches.pop(node, None)

    def campaign_changed(self, st: MailState, campaign: str) -> None:
        """A campaign was paused or resumed: its waiting recipients leave or join the indexes."""
        camp = st.campaigns[campaign]
        for sid in camp.submissions:
            sub = st.submissions.get(sid)
            if sub is None or sid not in st.open:
                continue
            self._pending_of(sub).pop(sid, None)
            self._add_pending(st, sub)
        self._rebuild_deferred(st)

    def _pending_of(self, sub: Submission) -> dict[str, dict[int, None]]:
        return self.ready if sub.not_before is None else self.scheduled

    def _add_pending(self, st: MailState, sub: Submission) -> None:
        if _active(st, sub):
            pending = [i for i, s in enumerate(sub.states) if s == PENDING]
            if pending:
                self._pending_of(sub)[sub.id] = dict.fromkeys(pending)

    # ---------------------------------------------------------------- reads

    def ready_head(self, st: MailState, limit: int) -> list[Ready]:
        """Up to `limit` pending recipients of active campaigns, in the queue's order. The leader
        makes thousands of these a second: tuples are made without Ready's Python-level __new__."""
        out: list[Ready] = []
        if limit <= 0:
            return out
        make = tuple.__new__
        for sid, pending in self.ready.items():
            domains = self._domains_of(st, sid)
            pos = self.open_pos[sid]
            out += [make(Ready, (pos, sid, idx, domains[idx])) for idx in islice(pending, limit - len(out))]
            if len(out) >= limit:
                break
        out.sort()
        return out

    def _domains_of(self, st: MailState, sid: str) -> list[str]:
        """The domain of each of the submission's recipients, kept while it has some waiting."""
        domains = self._domains.get(sid)
        if domains is None:
            domains = self._domains[sid] = [domain_of(r) for r in st.submissions[sid].rcpts]
        return domains

    def deferred_head(self, st: MailState, limit: int, until: float | None = None) -> list[Due]:
        """Up to `limit` deferred recipients of active campaigns, earliest retry first (only
        those due by `until`, when given). Walks the heap best-first: no entry is moved."""
        out: list[Due] = []
        for next_at, sid, idx in _smallest(self.deferred, lambda e: until is not None and e[0] > until):
            if len(out) >= limit:
                break
            if self._valid_deferred(st, next_at, sid, idx):
                out.append(Due(next_at, self.open_pos[sid], sid, idx, self._domains_of(st, sid)[idx]))
        return out

    def scheduled_head(self, st: MailState, limit: int, until: float | None = None) -> list[Due]:
        """Up to `limit` pending recipients of scheduled submissions, earliest send time first
        (only those due by `until`, when given)."""
        out: list[Due] = []
        if limit <= 0 or not self.scheduled:
            return out
        # Each submission gives at least one recipient: `limit` submissions are enough.
        times = heapq.nsmallest(limit, ((st.submissions[sid].not_before, self.open_pos[sid], sid)
                                        for sid in self.scheduled))
        for send_at, pos, sid in times:
            if until is not None and send_at > until:
                break
            domains = self._domains_of(st, sid)
            for idx in self.scheduled[sid]:
                out.append(Due(send_at, pos, sid, idx, domains[idx]))
                if len(out) >= limit:
                    return out
        return out

    def due_head(self, st: MailState, limit: int, until: float | None = None) -> list[Due]:
        """Up to `limit` recipients that wait for a time (a retry or a send time), earliest first."""
        due = self.deferred_head(st, limit, until) + self.scheduled_head(st, limit, until)
        return sorted(due)[:max(0, limit)] if self.scheduled else due

    def bodies_opened_since(self, st: MailState,
                            since: tuple[object, int] | None) -> tuple[tuple[object, int], list[str]]:
        """Bodies of the submissions that entered the open list after `since` (a mark this returned
        before), newest first, and the mark to ask from next time. Without a mark, or with one from
        before the index was made anew: every open submission's body and every body held by a batch.
        Costs the number of submissions opened since, however long the queue."""
        mark = (self.positions, self.pos_seq)
        if since is None or since[0] is not self.positions:
            return mark, ([st.submissions[sid].body for sid in st.open]
                          + [st.submissions[sid].body for b in st.batches.values() for sid, _ in b.items])
        bodies = []
        for sid in reversed(st.open):  # the open list is in position order: newest last
            if self.open_pos[sid] <= since[1]:
                break
            bodies.append(st.submissions[sid].body)
        return mark, bodies

    def oldest_waiting(self) -> float | None:
        """accepted_at of the oldest submission with recipients waiting (None: none waits)."""
        return self.waiting_age[0][0] if self.waiting_age else None

    # ---------------------------------------------------------------- upkeep

    def rebuild(self, st: MailState) -> None:
        """From the state alone (after a snapshot load): the same reads as kept in step."""
        self.__init__()  # type: ignore[misc]
        for sid in st.open:
            sub = st.submissions[sid]
            self.opened(st, sub)
            self._add_pending(st, sub)
        self._rebuild_deferred(st)
        for b in st.batches.values():
            self.batch_started(b.node)

    def _rebuild_deferred(self, st: MailState) -> None:
        heap = []
        for sid in st.open:
            sub = st.submissions[sid]
            if sub.counts[DEFERRED] and _active(st, sub):
                heap.extend((sub.detail[i].next_at, sid, i) for i, s in enumerate(sub.states) if s == DEFERRED)
        heapq.heapify(heap)
        self.deferred, self.deferred_stale = heap, 0

    def _valid_deferred(self, st: MailState, next_at: float, sid: str, idx: int) -> bool:
        sub = st.submissions.get(sid)
        return (sub is not None and sub.states[idx] == DEFERRED and sub.detail[idx].next_at == next_at
                and _active(st, sub))

    def _clean_deferred(self, st: MailState) -> None:
        heap = self.deferred
        while heap and not self._valid_deferred(st, *heap[0]):
            heapq.heappop(heap)
            self.deferred_stale = max(0, self.deferred_stale - 1)
        if self.deferred_stale > len(heap) // 2 + HEAP_SLACK:
            self._rebuild_deferred(st)


def eligible(ready: Iterable[Ready], deferred: Iterable[Due], now: float, limit: int) -> dict[str, list[list]]:
    """Recipients that may be assigned at `now`, grouped by domain, in the queue's order (oldest
    submission first, then by index), at most `limit`: the pending ones and the deferred ones due
    by `now`. The one rule, for the state's own read and for a published view's heads."""
    # `ready` comes sorted (ready_head), and a submission's position is its own: (pos, submission,
    # index) is the queue's order. Due recipients (few) are merged in only when there are some.
    due = [(d.pos, d.submission, d.index, d.domain) for d in deferred if d.next_at <= now]
    items: Iterable[tuple] = sorted([*ready, *due]) if due else ready
    out: dict[str, list[list]] = {}
    for _pos, sid, idx, domain in islice(items, max(0, limit)):
        out.setdefault(domain, []).append([sid, idx])
    return out


def _active(st: MailState, sub: Submission) -> bool:
    camp = st.campaigns[sub.campaign]
    return not (camp.paused or camp.cancelled)


def _smallest(heap: list, stop: Callable[[tuple], bool]) -> Iterator[tuple]:
    """The heap's entries in ascending order, without changing it, until `stop(entry)`: a
    best-first walk that opens a node's children only when the node is taken."""
    if not heap:
        return
    frontier = [(heap[0], 0)]
    while frontier:
        entry, i = heapq.heappop(frontier)
        if stop(entry):
            return
        yield entry
        for child in (2 * i + 1, 2 * i + 2):
            if child < len(heap):
                heapq.heappush(frontier, (heap[child], child))

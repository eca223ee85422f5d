"""The records the replicated state holds, each with named fields and its compact wire form.

A snapshot stores every record as a msgpack array in the field order below (compact: no keys per
record), the layout snapshots have always had; `from_wire` also reads the shorter arrays of older
snapshots. Pure: no clock, no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .outcomes import DEFERRED, PENDING, STATE_NAMES

N_STATES = len(STATE_NAMES)
MAX_TEXT = 200  # reply text kept per recipient (and suppression reasons)


@dataclass(slots=True)
class Detail:
    """What is known of one recipient that had an attempt (sparse: most recipients have none)."""

    attempts: int = 0
    next_at: float | None = None  # retry time of a deferred recipient (the proposer's clock)
    code: int | None = None  # last reply code
    text: str | None = None  # last reply text, or why it ended
    maybe_delivered: int = 0  # final dots that got no reply

    def to_wire(self) -> list:
        # The count of unanswered final dots is stored only once there is one (older layout).
        w = [self.attempts, self.next_at, self.code, self.text]
        if self.maybe_delivered:
            w.append(self.maybe_delivered)
        return w

    @classmethod
    def from_wire(cls, w: list) -> "Detail":
        return cls(*w)


NO_DETAIL = Detail()  # read-only stand-in for a recipient without an attempt


class Suppression(NamedTuple):
    """Why an address gets no more mail (for every sender, or for one From: domain: the entry's
    key says which, consensus/suppression.py): the reply that suppressed it (code 0: none) and
    where it came from (one of suppression.SOURCES)."""

    code: int
    text: str
    at: float
    source: str = ""  # "" in entries from before sources were kept: see `origin`

    @classmethod
    def from_wire(cls, w: list) -> "Suppression":
        return cls(*w)

    def origin(self) -> str:
        """The source; for an entry from before sources were kept, a code says a bounce, none says
        the operator."""
        return self.source or ("bounce" if self.code else "operator")


class DedupeEntry(NamedTuple):
    """The recipients queued under one idempotency key (sender and Message-ID)."""

    submission: str  # the newest submission under the key
    accepted_at: float  # when the key was last renewed: its window counts from here
    # 8-byte hashes of the recipients queued, concatenated; None in an entry from a snapshot made
    # before recipients were kept, which stands for the whole message.
    hashes: bytes | None = None

    def recipients(self) -> int:
        return len(self.hashes) // 8 if self.hashes is not None else 0


class Archive(NamedTuple):
    """A finished submission past its retention: only each recipient's final state is kept."""

    campaign: str
    finished_at: float
    blob: bytes  # zlib(msgpack([rcpts, states]))
    body: str  # body digest
    recipients: int
    scope: str = ""  # the submission's From: domain (Submission.scope)


class Event(NamedTuple):
    """One recipient outcome, as `raftmail events` and webhooks show it. seq increases by one per
    event, cluster-wide."""

    seq: int
    t: float
    outcome: str
    campaign: str
    submission: str
    index: int
    recipient: str
    node: str
    remote: str
    code: int | None
    text: str
    attempt: int


EVENT_FIELDS = Event._fields
# Events kept in the replicated state, for `raftmail events` and webhooks. A protocol constant, not
# a setting: every replica must drop the same oldest event.
EVENT_RING = 20000


class Assigned(NamedTuple):
    """Recipients assigned to a domain at one time (the per-minute throttle's record)."""

    at: float
    n: int


class Submission:
    """One accepted SMTP transaction: envelope, body hash, and a compact state per recipient."""

    __slots__ = ("id", "campaign", "sender", "body", "size", "accepted_at", "rcpts", "states",
                 "detail", "counts", "finished_at", "scope", "not_before", "template")

    def __init__(self, sid: str, campaign: str, sender: str, body: str, size: int,
                 accepted_at: float, rcpts: list[str]) -> None:
        self.id = sid
        self.campaign = campaign
        self.sender = sender
        self.body = body
        self.size = size
        self.accepted_at = accepted_at
        self.rcpts = rcpts
        self.states = bytearray(len(rcpts))  # all PENDING (0)
        self.detail: dict[int, Detail] = {}  # only recipients with an attempt
        self.counts = [0] * N_STATES
        self.counts[PENDING] = len(rcpts)
        self.finished_at: float | None = None
        # The From: domain of the message (lower case; "" when unknown): the scope of an
        # unsubscribe or complaint that names one of its copies.
        self.scope = ""
        # Not assigned before this time (the proposer's clock, as every `now`); None: at once.
        self.not_before: float | None = None
        # None: `body` is a message; else a template object and this submission's first position
        # in its recipient data (see NewSubmission).
        self.template: int | None = None

    def waiting(self) -> int:
        return self.counts[PENDING] + self.counts[DEFERRED]

    def detail_of(self, idx: int) -> Detail:
        """The recipient's detail, made on its first attempt."""
        d = self.detail.get(idx)
        if d is None:
            d = self.detail[idx] = Detail()
        return d

    def to_wire(self) -> list:
        return [self.id, self.campaign, self.sender, self.body, self.size, self.accepted_at,
                self.rcpts, bytes(self.states), {k: v.to_wire() for k, v in self.detail.items()},
                self.counts, self.finished_at] + self._wire_tail()

    def _wire_tail(self) -> list:
        # Optional trailing fields; older snapshots end earlier and still load.
        extra = {k: v for k, v in (("not_before", self.not_before), ("template", self.template)) if v is not None}
        if extra:
            return [self.scope, extra]
        return [self.scope] if self.scope else []

    @classmethod
    def from_wire(cls, w: list) -> "Submission":
        sid, campaign, sender, body, size, accepted_at, rcpts, states, detail, counts, finished_at, *rest = w
        s = cls(sid, campaign, sender, body, size, accepted_at, list(rcpts))
        s.states = bytearray(states)
        s.detail = {int(k): Detail.from_wire(v) for k, v in detail.items()}
        s.counts = list(counts)
        s.finished_at = finished_at
        s.scope = rest[0] if rest else ""  # older snapshots: unknown
        extra = rest[1] if len(rest) > 1 else {}
        s.not_before, s.template = extra.get("not_before"), extra.get("template")
        return s


class Batch:
    """Recipients of one domain leased to one node process. The batch id is the fencing token.

    The lease is a duration and a renewal counter, never a wall-clock deadline: each node measures
    the lease on its own monotonic clock from when it applied the assignment or the last renewal
    (node/leases.py). `incarnation` names the holder's process, so a restarted node can tell the
    batches of its previous process from its own without comparing clocks."""

    __slots__ = ("id", "node", "domain", "items", "lease", "renewals", "term", "assigned_at", "incarnation",
                 "site", "source")

    def __init__(self, bid: str, node: str, domain: str, items: dict[tuple[str, int], None],
                 lease: float, term: int, assigned_at: float, incarnation: str = "",
                 renewals: int = 0, site: str = "", source: str = "") -> None:
        self.id = bid
        self.node = node
        self.domain = domain
        self.items = items  # ordered: (submission id, recipient index)
        self.lease = lease  # seconds
        self.renewals = renewals  # committed renewals so far: expiry names the count it saw
        self.term = term
        self.assigned_at = assigned_at  # the proposer's wall clock: informational only
        self.incarnation = incarnation
        self.site = site or domain  # the throttle key: the domain, or its MX rollup site
        self.source = source  # the source address the holder binds ("": the system's choice)

    def to_wire(self) -> list:
        w = [self.id, self.node, self.domain, [list(k) for k in self.items], self.lease,
             self.term, self.assigned_at, self.incarnation, self.renewals]
        if self.site != self.domain or self.source:  # batches without either keep their older shape
            w += [self.site, self.source]
        return w

    @classmethod
    def from_wire(cls, w: list) -> "Batch":
        bid, node, domain, items, lease, term, assigned_at, incarnation, renewals, *shaping = w
        site, source = shaping if shaping else (domain, "")
        return cls(bid, node, domain, {(sid, idx): None for sid, idx in items}, lease, term, assigned_at,
                   incarnation, renewals, site, source)


class Campaign:
    __slots__ = ("id", "created_at", "paused", "cancelled", "submissions", "counts", "total")

    def __init__(self, cid: str, created_at: float) -> None:
        self.id = cid
        self.created_at = created_at
        self.paused = False
        self.cancelled = False
        # Ids of its submissions still held, live or archived, in acceptance order. A dropped
        # archive leaves it (O(1)), so a campaign id reused for years does not grow without end.
        self.submissions: dict[str, None] = {}
        self.counts = [0] * N_STATES
        self.total = 0  # submissions ever accepted under this id

    def to_wire(self) -> list:
        return [self.id, self.created_at, self.paused, self.cancelled, list(self.submissions), self.counts,
                self.total]

    @classmethod
    def from_wire(cls, w: list) -> "Campaign":
        cid, created_at, paused, cancelled, submissions, counts, *rest = w
        c = cls(cid, created_at)
        c.paused, c.cancelled, c.submissions, c.counts = paused, cancelled, dict.fromkeys(submissions), list(counts)
        c.total = rest[0] if rest else len(c.submissions)  # older snapshots did not count them
        return c

"""The replicated state machine: every state transition of raftmail happens here.

Pure and deterministic. No clock, no randomness, no I/O: time, ids and jitter arrive inside the
command, made by the proposing node. `apply()` never raises; a bad command is refused with the same
result on every replica. The state holds metadata only (bodies live in each node's body store,
referenced by sha256), kept compact so a million queued recipients snapshot to a few MB.
"""
from __future__ import annotations

import hashlib
import logging
import math
import zlib
from collections import deque
from typing import Any, Iterator

import msgpack

from .outcomes import (
    CANCELLED,
    DEFERRED,
    DELIVERED,
    EXPIRED,
    FINAL_STATES,
    IN_FLIGHT,
    PENDING,
    STATE_NAMES,
    SUPPRESSED,
    classify,
)

log = logging.getLogger("raftmail.state")

SCHEMA_VERSION = 2  # 2: clock-free leases (Batch carries a duration and a renewal counter)
N_STATES = len(STATE_NAMES)
# Outcomes of a recipient whose batch went away before it reported (lease expiry, release).
_WAITING = (PENDING, DEFERRED)

# Bounds on what one command may carry: entries stay small, so Raft stays fast.
MAX_SUBMISSIONS_PER_COMMAND = 1000
MAX_ITEMS_PER_COMMAND = 5000
MAX_TEXT = 200  # reply text kept per recipient
APPLY_ERROR_LOG_CHARS = 2000  # of a command whose apply raised (a bug), in the error log line
# Records one prune (or one submit's de-duplication upkeep) may archive, drop or forget: the tick
# thread applies it, so its work is bounded whatever the backlog; the leader prunes again soon
# while a prune answers "more". A protocol constant: every replica does the same work.
MAX_PRUNE_PER_COMMAND = 1000
# Recipient outcome events kept in the replicated state, for `raftmail events` and webhooks. A
# protocol constant, not a setting: every replica must drop the same oldest event.
EVENT_RING = 20000
EVENT_FIELDS = ("seq", "t", "outcome", "campaign", "submission", "index", "recipient", "node", "remote",
                "code", "text", "attempt")


class CommandRefused(Exception):
    """A command that is invalid: refused identically on every replica, state unchanged."""


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


class Submission:
    """One accepted SMTP transaction: envelope, body hash, and a compact state per recipient."""

    __slots__ = ("id", "campaign", "sender", "body", "size", "accepted_at", "rcpts", "states",
                 "detail", "counts", "finished_at", "next_due")

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
        # Sparse per-recipient detail, only for recipients with an attempt: [attempts, next_at, code, text]
        self.detail: dict[int, list] = {}
        self.counts = [0] * N_STATES
        self.counts[PENDING] = len(rcpts)
        self.finished_at: float | None = None
        # Earliest retry time among DEFERRED recipients, or earlier. A derived cache for the
        # scheduler's scan: never snapshotted, never read by a transition.
        self.next_due: float | None = None

    def waiting(self) -> int:
        return self.counts[PENDING] + self.counts[DEFERRED]

    def to_wire(self) -> list:
        return [self.id, self.campaign, self.sender, self.body, self.size, self.accepted_at,
                self.rcpts, bytes(self.states), {k: v for k, v in self.detail.items()},
                self.counts, self.finished_at]

    @classmethod
    def from_wire(cls, w: list) -> "Submission":
        s = cls(w[0], w[1], w[2], w[3], w[4], w[5], list(w[6]))
        s.states = bytearray(w[7])
        s.detail = {int(k): list(v) for k, v in w[8].items()}
        s.counts = list(w[9])
        s.finished_at = w[10]
        due = [d[1] for i, d in s.detail.items() if s.states[i] == DEFERRED]
        s.next_due = min(due) if due else None
        return s


class Batch:
    """Recipients of one domain leased to one node process. The batch id is the fencing token.

    The lease is a duration and a renewal counter, never a wall-clock deadline: each node measures
    the lease on its own monotonic clock from when it applied the assignment or the last renewal
    (node/leases.py). `incarnation` names the holder's process, so a restarted node can tell the
    batches of its previous process from its own without comparing clocks."""

    __slots__ = ("id", "node", "domain", "items", "lease", "renewals", "term", "assigned_at", "incarnation")

    def __init__(self, bid: str, node: str, domain: str, items: dict[tuple[str, int], None],
                 lease: float, term: int, assigned_at: float, incarnation: str = "",
                 renewals: int = 0) -> None:
        self.id = bid
        self.node = node
        self.domain = domain
        self.items = items  # ordered: (submission id, recipient index)
        self.lease = lease  # seconds
        self.renewals = renewals  # committed renewals so far: expiry names the count it saw
        self.term = term
        self.assigned_at = assigned_at  # the proposer's wall clock: informational only
        self.incarnation = incarnation

    def to_wire(self) -> list:
        return [self.id, self.node, self.domain, [list(k) for k in self.items], self.lease,
                self.term, self.assigned_at, self.incarnation, self.renewals]

    @classmethod
    def from_wire(cls, w: list) -> "Batch":
        return cls(w[0], w[1], w[2], {(k[0], k[1]): None for k in w[3]}, w[4], w[5], w[6], w[7], w[8])


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
        c = cls(w[0], w[1])
        c.paused, c.cancelled, c.submissions, c.counts = w[2], w[3], dict.fromkeys(w[4]), list(w[5])
        c.total = w[6] if len(w) > 6 else len(c.submissions)
        return c


class MailState:
    """The campaign queue and per-recipient send state, replicated by Raft."""

    def __init__(self) -> None:
        self.schema = SCHEMA_VERSION
        self.submissions: dict[str, Submission] = {}
        self.campaigns: dict[str, Campaign] = {}
        # Submissions with recipients PENDING or DEFERRED, in acceptance order (scheduler's scan list).
        self.open: dict[str, None] = {}
        self.batches: dict[str, Batch] = {}
        self.batch_seq = 0
        self.domain_batches: dict[str, int] = {}  # in-flight batches per domain (max_connections)
        self.domain_recent: dict[str, deque] = {}  # domain -> [(assigned_at, n)] (max_per_minute)
        self.suppressed: dict[str, list] = {}  # address (lowercase) -> [code, text, at]
        # Idempotency: key of (sender, Message-ID) -> [newest submission id, accepted_at, recipient
        # hashes], oldest first. The hashes (8 bytes each, concatenated) are the recipients
        # already queued under that key; dedupe_size counts them all (derived, not snapshotted).
        self.dedupe: dict[str, list] = {}
        self.dedupe_size = 0
        self.counts = [0] * N_STATES  # recipients per state, whole cluster
        self.stats = {"lease_expiries": 0, "reassigned_in_flight": 0, "fenced_reports": 0,
                      "duplicates_refused": 0, "commands_refused": 0, "maybe_delivered": 0,
                      "batches_abandoned": 0, "expired_unsent": 0}
        # node id -> the incarnation (random id of its current process) it announced last.
        self.incarnations: dict[str, str] = {}
        self.delivered_minutes: dict[int, int] = {}  # minute -> recipients delivered (last hour)
        # Outcome events, oldest first, laid out as EVENT_FIELDS. seq increases by one per event,
        # cluster-wide.
        self.events: deque = deque(maxlen=EVENT_RING)
        self.event_seq = 0
        # Members added or removed at run time (the cluster file lists the founding members):
        # id -> {"raft", "smtp", "admin", "status": "active" | "leaving" | "removed"}
        self.members: dict[str, dict] = {}
        # Finished submissions past their retention, in the order they were archived:
        # id -> [campaign, finished_at, zlib(msgpack([rcpts, states])), body digest, recipients]
        self.archived: dict[str, list] = {}
        # Finished, not yet archived submissions in the order they finished (prune's scan list),
        # and the recipients they hold (derived).
        self.finished: dict[str, None] = {}
        self.finished_rcpts = 0
        self.archived_rcpts = 0  # recipients in the archives (derived)
        # Body digest -> live (not archived) submissions referencing it. Derived from submissions,
        # so the same on every replica: a body is collected only when this has no entry for it.
        self.body_refs: dict[str, int] = {}
        self.applied = 0  # commands applied (a cheap progress counter for status and tests)

    # ---------------------------------------------------------------- entry point

    def apply(self, command: dict) -> Any:
        """Apply one decoded command. Never raises; refusals are results."""
        self.applied += 1
        op = command.get("op") if isinstance(command, dict) else None
        handler = _HANDLERS.get(op) if isinstance(op, str) else None
        if handler is None:
            self.stats["commands_refused"] += 1
            return {"error": f"unknown command {op!r}"}
        try:
            return handler(self, command)
        except CommandRefused as e:
            self.stats["commands_refused"] += 1
            return {"error": str(e)}
        except Exception as e:
            # A bug, not a refusal: the handler may have changed part of the state before it
            # raised. Every replica fails the same way, so they stay identical and the log goes on;
            # counted apart (added on first use, so older snapshots keep their digest) and logged
            # with the entry.
            self.stats["apply_errors"] = self.stats.get("apply_errors", 0) + 1
            log.error("bug: applying a replicated command raised %s: %s; command: %.*r", type(e).__name__, e,
                      APPLY_ERROR_LOG_CHARS, command, exc_info=True)
            return {"error": f"internal error: {type(e).__name__}: {e}"}

    def apply_blob(self, blob: bytes) -> Any:
        try:
            command = msgpack.unpackb(blob, raw=False, strict_map_key=False)
        except Exception as e:
            self.applied += 1
            self.stats["commands_refused"] += 1
            return {"error": f"undecodable command: {type(e).__name__}"}
        return self.apply(command)

    # ---------------------------------------------------------------- transitions

    def _set(self, sub: Submission, idx: int, new: int, now: float) -> None:
        """The one place a recipient changes state; keeps every counter and index in step."""
        old = sub.states[idx]
        if old == new:
            return
        sub.states[idx] = new
        camp = self.campaigns[sub.campaign]
        for counts in (sub.counts, camp.counts, self.counts):
            counts[old] -= 1
            counts[new] += 1
        if sub.waiting():
            self.open[sub.id] = None
        else:
            self.open.pop(sub.id, None)
        if new in FINAL_STATES and sub.counts[IN_FLIGHT] == 0 and not sub.waiting():
            sub.finished_at = now
            if sub.id not in self.finished:
                self.finished[sub.id] = None
                self.finished_rcpts += len(sub.rcpts)
        if new == DELIVERED:
            minute = int(now // 60)
            self.delivered_minutes[minute] = self.delivered_minutes.get(minute, 0) + 1

    def _event(self, now: float, state: int, sub: Submission, idx: int, node: str = "",
               remote: str = "", code: int | None = None, text: str = "") -> None:
        self.event_seq += 1
        d = sub.detail.get(idx)
        self.events.append([self.event_seq, now, STATE_NAMES[state], sub.campaign, sub.id, idx,
                            sub.rcpts[idx], node, remote, code, text, d[0] if d else 0])

    def _return_to_queue(self, sub: Submission, idx: int, now: float) -> None:
        """A leased recipient that was not reported: back to the queue, or cancelled."""
        if self.campaigns[sub.campaign].cancelled:
            self._set(sub, idx, CANCELLED, now)
            self._event(now, CANCELLED, sub, idx)
        else:
            self._set(sub, idx, PENDING, now)

    def _end_batch(self, batch: Batch) -> None:
        del self.batches[batch.id]
        n = self.domain_batches.get(batch.domain, 0) - 1
        if n > 0:
            self.domain_batches[batch.domain] = n
        else:
            self.domain_batches.pop(batch.domain, None)

    def _op_submit(self, c: dict) -> list:
        now = _num(c, "now")
        window = _num(c, "window")
        max_queued = int(_num(c, "max_queued"))
        # Recipients remembered for idempotency, all keys together (absent: no count bound).
        max_dedupe = int(_num(c, "max_dedupe")) if "max_dedupe" in c else None
        subs = c.get("subs")
        if not isinstance(subs, list) or not 0 < len(subs) <= MAX_SUBMISSIONS_PER_COMMAND:
            raise CommandRefused("submit: subs must be a non-empty list")
        self._prune_dedupe(now - window, max_dedupe)
        results = []
        for s in subs:
            results.append(self._submit_one(s, now, max_queued, max_dedupe))
        return results

    def _submit_one(self, s: dict, now: float, max_queued: int, max_dedupe: int | None = None) -> list:
        """["ok", id] (every recipient queued), ["ok", id, new, already] (only the recipients not
        yet queued under the same key were), ["duplicate", id], ["cancelled", campaign],
        ["full", None] or ["refused", why]."""
        try:
            if not isinstance(s, dict):
                raise CommandRefused("a submission must be a map")
            sid, campaign, sender, body = (_str(s, k) for k in ("id", "campaign", "sender", "body"))
            size = int(_num(s, "size"))
            rcpts = s["rcpts"]
            key = s.get("key")
            if not isinstance(rcpts, list) or not rcpts or not all(isinstance(r, str) and "@" in r for r in rcpts):
                raise CommandRefused("rcpts must be a non-empty list of addresses")
            if key is not None and not isinstance(key, str):
                raise CommandRefused("key must be a string")
        except (KeyError, TypeError, ValueError, CommandRefused) as e:
            self.stats["commands_refused"] += 1
            return ["refused", str(e)]
        camp = self.campaigns.get(campaign)
        if camp is not None and camp.cancelled:
            # Refused, not queued-then-cancelled: the client hears it at DATA.
            self.stats["cancelled_refused"] = self.stats.get("cancelled_refused", 0) + 1
            return ["cancelled", campaign]
        hashes = [_rcpt_hash(r) for r in rcpts]
        entry = self.dedupe.get(key) if key is not None else None
        if entry is not None:
            if len(entry) < 3:  # a key from a snapshot without recipients: the whole message
                self.stats["duplicates_refused"] += 1
                return ["duplicate", entry[0]]
            known = {entry[2][i:i + 8] for i in range(0, len(entry[2]), 8)}
            fresh = [i for i, h in enumerate(hashes) if h not in known]
            if not fresh:
                self.stats["duplicates_refused"] += 1
                return ["duplicate", entry[0]]
        else:
            fresh = list(range(len(rcpts)))
        if sid in self.submissions or sid in self.archived:
            return ["duplicate", sid]
        queued = self.counts[PENDING] + self.counts[DEFERRED] + self.counts[IN_FLIGHT]
        if queued + len(fresh) > max_queued:
            return ["full", None]
        sub = Submission(sid, campaign, sender, body, size, now, [rcpts[i] for i in fresh])
        if camp is None:
            camp = self.campaigns[campaign] = Campaign(campaign, now)
        sub.campaign = camp.id  # one string object per campaign, not one per submission
        camp.submissions[sid] = None
        camp.total += 1
        self.submissions[sid] = sub
        self.body_refs[body] = self.body_refs.get(body, 0) + 1
        camp.counts[PENDING] += len(sub.rcpts)
        self.counts[PENDING] += len(sub.rcpts)
        self.open[sid] = None
        for idx, rcpt in enumerate(sub.rcpts):
            if rcpt.lower() in self.suppressed:
                self._set(sub, idx, SUPPRESSED, now)
                self._event(now, SUPPRESSED, sub, idx)
        if key is not None:
            added = b"".join(hashes[i] for i in fresh)
            if entry is not None:
                del self.dedupe[key]  # renewed: it moves to the newest end, with a new window
                self.dedupe_size -= len(entry[2]) // 8
                added = entry[2] + added
            self.dedupe[key] = [sid, now, added]
            self.dedupe_size += len(added) // 8
            if max_dedupe is not None:
                self._prune_dedupe(None, max_dedupe)
        if len(fresh) < len(rcpts):
            self.stats["duplicates_refused"] += 1
            return ["ok", sid, len(fresh), len(rcpts) - len(fresh)]
        return ["ok", sid]

    def _prune_dedupe(self, cutoff: float | None, max_size: int | None = None) -> int:
        """Forget keys older than `cutoff`, and the oldest keys while more than `max_size`
        recipients are remembered; at most MAX_PRUNE_PER_COMMAND keys per call."""
        # Keys are kept in commit order; proposers' clocks differ a little, which only delays pruning.
        forgotten = 0
        while self.dedupe and forgotten < MAX_PRUNE_PER_COMMAND:
            key = next(iter(self.dedupe))
            entry = self.dedupe[key]
            if (cutoff is None or entry[1] >= cutoff) and (max_size is None or self.dedupe_size <= max_size):
                break
            del self.dedupe[key]
            self.dedupe_size -= len(entry[2]) // 8 if len(entry) > 2 else 0
            forgotten += 1
        return forgotten

    def _op_assign(self, c: dict) -> dict:
        node, domain = _str(c, "node"), _str(c, "domain")
        now = _num(c, "now")
        # Entries of the previous release carried a wall-clock lease end: its duration is the same.
        lease = _num(c, "lease") if "lease" in c or "lease_until" not in c else _num(c, "lease_until") - now
        if lease <= 0:
            raise CommandRefused("assign: lease must be a positive number of seconds")
        term = int(_num(c, "term"))
        max_connections = int(_num(c, "max_connections"))
        max_per_minute = int(_num(c, "max_per_minute"))
        items = c.get("items")
        if not isinstance(items, list) or not 0 < len(items) <= MAX_ITEMS_PER_COMMAND \
                or not all(_is_item(i) for i in items):
            raise CommandRefused("assign: items must be a non-empty list of [submission, index]")
        if self.members.get(node, {}).get("status", "active") != "active":
            return {"batch": None, "reason": f"node {node} is {self.members[node]['status']}"}
        if self.domain_batches.get(domain, 0) >= max_connections:
            return {"batch": None, "reason": "max_connections"}
        quota = len(items)
        if max_per_minute > 0:
            quota = min(quota, max_per_minute - self._sent_last_minute(domain, now))
            if quota <= 0:
                return {"batch": None, "reason": "max_per_minute"}
        chosen: dict[tuple[str, int], None] = {}
        for item in items:
            if len(chosen) >= quota:
                break
            sid, idx = item[0], item[1]
            sub = self.submissions.get(sid)
            if sub is None or not 0 <= idx < len(sub.rcpts):
                continue
            if domain_of(sub.rcpts[idx]) != domain:
                continue
            camp = self.campaigns[sub.campaign]
            if camp.paused or camp.cancelled:
                continue
            st = sub.states[idx]
            if st == DEFERRED and sub.detail[idx][1] > now:
                continue
            if st not in _WAITING:
                continue
            if sub.rcpts[idx].lower() in self.suppressed:
                self._set(sub, idx, SUPPRESSED, now)
                self._event(now, SUPPRESSED, sub, idx)
                continue
            self._set(sub, idx, IN_FLIGHT, now)
            chosen[(sid, idx)] = None
        if not chosen:
            return {"batch": None, "reason": "nothing eligible"}
        self.batch_seq += 1
        bid = f"b{self.batch_seq}"
        self.batches[bid] = Batch(bid, node, domain, chosen, lease, term, now, self.incarnations.get(node, ""))
        self.domain_batches[domain] = self.domain_batches.get(domain, 0) + 1
        if max_per_minute > 0:
            self.domain_recent.setdefault(domain, deque()).append([now, len(chosen)])
        return {"batch": bid, "n": len(chosen), "leased": [bid, 0]}

    def _sent_last_minute(self, domain: str, now: float) -> int:
        """Recipients assigned to `domain` in the 60 s before `now` (prunes older records)."""
        recent = self.domain_recent.get(domain)
        if not recent:
            return 0
        while recent and recent[0][0] <= now - 60:
            recent.popleft()
        if not recent:
            del self.domain_recent[domain]
            return 0
        return sum(n for _, n in recent)

    def _op_renew(self, c: dict) -> dict:
        """The holder keeps its lease: every node restarts the lease on its own clock when it
        applies this (node/leases.py). Refused (ok False) for anyone but the holder's process."""
        batch = self.batches.get(_str(c, "batch"))
        node = _str(c, "node")
        incarnation = c.get("incarnation")
        if batch is None or batch.node != node or (isinstance(incarnation, str) and incarnation != batch.incarnation):
            return {"ok": False}
        batch.renewals += 1
        return {"ok": True, "leased": [batch.id, batch.renewals]}

    def _op_report(self, c: dict) -> dict:
        """Outcomes of sends. Only the batch's holder may report, only for items it still holds."""
        now, max_age = _num(c, "now"), _num(c, "max_age")
        bid, node = _str(c, "batch"), _str(c, "node")
        results = c.get("results", [])
        release = c.get("release", [])
        if not isinstance(results, list) or not isinstance(release, list) \
                or len(results) + len(release) > MAX_ITEMS_PER_COMMAND:
            raise CommandRefused("report: results and release must be lists")
        for r in results:
            if not (isinstance(r, list) and len(r) >= 6 and _is_item(r) and type(r[2]) is int
                    and (r[3] is None or isinstance(r[3], str))
                    and (r[5] is None or type(r[5]) in (int, float) and math.isfinite(r[5]))):
                raise CommandRefused("report: each result is [submission, index, code, enhanced, text, next_at, remote]")
            if r[5] is None and 400 <= r[2] < 500 or r[5] is None and not 200 <= r[2] < 600:
                raise CommandRefused("report: a deferral needs next_at")
            if len(r) > 7 and not isinstance(r[7], bool):
                raise CommandRefused("report: maybe_delivered must be true or false")
        max_maybe = c.get("max_maybe")
        if max_maybe is not None and (type(max_maybe) is not int or max_maybe < 1):
            raise CommandRefused("report: max_maybe must be a positive integer")
        for r in release:
            if not (isinstance(r, list) and len(r) == 2 and _is_item(r)):
                raise CommandRefused("report: each release is [submission, index]")
        batch = self.batches.get(bid)
        if batch is None or batch.node != node:
            # A fenced-out holder (lease expired, batch reassigned): its sends may be duplicates.
            self.stats["fenced_reports"] += len(results)
            return {"accepted": 0, "fenced": len(results)}
        accepted = fenced = 0
        suppressed_now = []
        for r in results:
            sid, idx, code, enhanced, text, next_at = r[0], r[1], r[2], r[3], r[4], r[5]
            remote = str(r[6])[:100] if len(r) > 6 else ""
            key = (sid, idx)
            if key not in batch.items:
                fenced += 1
                continue
            del batch.items[key]
            sub = self.submissions[sid]
            accepted += 1
            text = str(text)[:MAX_TEXT]
            d = sub.detail.get(idx)
            if d is None:
                d = sub.detail[idx] = [0, None, None, None]
            d[0] += 1
            d[2], d[3] = int(code), text
            verdict = classify(int(code), enhanced)
            new = verdict.state
            maybe = len(r) > 7 and r[7] is True and new == DEFERRED
            if maybe:
                # The final dot went out and no reply came: the receiver may have the copy.
                self.stats["maybe_delivered"] = self.stats.get("maybe_delivered", 0) + 1
                if len(d) < 5:
                    d.append(0)
                d[4] += 1
            if new == DEFERRED:
                next_at = float(next_at)
                if self.campaigns[sub.campaign].cancelled:
                    new = CANCELLED
                elif maybe and max_maybe is not None and d[4] >= max_maybe:
                    # Bounded: after max_maybe unanswered final dots we stop sending copies.
                    new = EXPIRED
                    d[3] = text = f"maybe delivered {d[4]} times, never confirmed; not retried: {text}"[:MAX_TEXT]
                elif next_at > sub.accepted_at + max_age:
                    new = EXPIRED
                else:
                    d[1] = next_at
                    sub.next_due = next_at if sub.next_due is None else min(sub.next_due, next_at)
            self._set(sub, idx, new, now)
            self._event(now, new, sub, idx, node, remote, int(code), text)
            if new != DEFERRED:
                if verdict.suppress:
                    addr = sub.rcpts[idx].lower()
                    if addr not in self.suppressed:
                        self.suppressed[addr] = [int(code), text, now]
                        suppressed_now.append(addr)
        for r in release:
            key = (r[0], r[1])
            if key in batch.items:
                del batch.items[key]
                self._return_to_queue(self.submissions[r[0]], r[1], now)
        if fenced:
            self.stats["fenced_reports"] += fenced
        if not batch.items:
            self._end_batch(batch)
        return {"accepted": accepted, "fenced": fenced, "suppressed": suppressed_now}

    def _op_expire(self, c: dict) -> dict:
        """Leases the leader measured as run out, on its own clock: [[batch, renewals], ...]. A batch
        renewed after the leader looked (its counter moved on) keeps its lease."""
        now = _num(c, "now")
        # An entry of the previous release (no batches: it compared wall clocks) expires nothing;
        # the leader measures those leases again on its own clock.
        pairs = c.get("batches", [])
        if not isinstance(pairs, list) or len(pairs) > MAX_ITEMS_PER_COMMAND or not all(
                isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and type(p[1]) is int for p in pairs):
            raise CommandRefused("expire: batches must be a list of [batch id, renewals]")
        expired = []
        returned = 0
        for bid, renewals in pairs:
            batch = self.batches.get(bid)
            if batch is None or batch.renewals != renewals:
                continue
            for sid, idx in batch.items:
                self._return_to_queue(self.submissions[sid], idx, now)
                returned += 1
            self._end_batch(batch)
            expired.append(bid)
        self.stats["lease_expiries"] += len(expired)
        self.stats["reassigned_in_flight"] += returned
        return {"expired": expired, "returned": returned}

    def _give_back(self, batch: Batch, now: float) -> int:
        """A batch of a holder's previous process goes back to the queue: nobody can know what
        that process sent, so every recipient still held is counted as possibly in flight."""
        n = len(batch.items)
        for sid, idx in batch.items:
            self._return_to_queue(self.submissions[sid], idx, now)
        self._end_batch(batch)
        self.stats["reassigned_in_flight"] += n
        self.stats["batches_abandoned"] = self.stats.get("batches_abandoned", 0) + 1
        return n

    def _op_abandon(self, c: dict) -> dict:
        """A restarted node gives back a batch leased to its previous process (another incarnation)."""
        bid, node, now = _str(c, "batch"), _str(c, "node"), _num(c, "now")
        incarnation = _str(c, "incarnation")
        batch = self.batches.get(bid)
        if batch is None or batch.node != node or batch.incarnation == incarnation:
            return {"abandoned": 0}
        return {"abandoned": self._give_back(batch, now)}

    def _op_incarnate(self, c: dict) -> dict:
        """A node process announces its random incarnation id when it starts. Batches held by the
        node's earlier processes go back to the queue at once (counted); new batches are leased
        to this incarnation."""
        node, incarnation, now = _str(c, "node"), _str(c, "incarnation"), _num(c, "now")
        if len(incarnation) > 64:
            raise CommandRefused("incarnate: incarnation id too long")
        self.incarnations[node] = incarnation
        given_back, returned = [], 0
        for batch in [b for b in self.batches.values() if b.node == node and b.incarnation != incarnation]:
            returned += self._give_back(batch, now)
            given_back.append(batch.id)
        return {"ok": True, "abandoned": given_back, "returned": returned}

    def expire_unsent(self, now: float, max_age: float, limit: int) -> list[list]:
        """Waiting recipients (pending, or deferred) of submissions accepted more than `max_age`
        before `now`: [[submission, index], ...], at most `limit`. A read."""
        out: list[list] = []
        for sid in self.open:
            sub = self.submissions[sid]
            if sub.accepted_at + max_age >= now:
                continue
            for idx, st in enumerate(sub.states):
                if st in _WAITING:
                    out.append([sid, idx])
                    if len(out) >= limit:
                        return out
        return out

    def _op_expire_unsent(self, c: dict) -> dict:
        """`max_age` for recipients that never got an attempt (or whose retry is not due): the
        proposer's `now` decides; the state re-checks each one."""
        now, max_age = _num(c, "now"), _num(c, "max_age")
        items = self.expire_unsent(now, max_age, MAX_ITEMS_PER_COMMAND)
        for sid, idx in items:
            sub = self.submissions[sid]
            d = sub.detail.get(idx)
            if d is None:
                d = sub.detail[idx] = [0, None, None, None]
            d[2], d[3] = None, "max_age reached before delivery"
            self._set(sub, idx, EXPIRED, now)
            self._event(now, EXPIRED, sub, idx, text=d[3])
        self.stats["expired_unsent"] = self.stats.get("expired_unsent", 0) + len(items)
        return {"expired": len(items)}

    def _campaign(self, c: dict) -> Campaign:
        camp = self.campaigns.get(_str(c, "campaign"))
        if camp is None:
            raise CommandRefused(f"no campaign {c.get('campaign')!r}")
        return camp

    def _op_pause(self, c: dict) -> dict:
        camp = self._campaign(c)
        camp.paused = True
        return {"ok": True}

    def _op_resume(self, c: dict) -> dict:
        camp = self._campaign(c)
        camp.paused = False
        return {"ok": True}

    def _op_cancel(self, c: dict) -> dict:
        camp = self._campaign(c)
        now = _num(c, "now")
        camp.cancelled = True
        n = 0
        for sid in camp.submissions:
            sub = self.submissions.get(sid)  # archived ones have nothing waiting
            if sub is None or not sub.waiting():
                continue
            for idx, st in enumerate(sub.states):
                if st in _WAITING:
                    self._set(sub, idx, CANCELLED, now)
                    self._event(now, CANCELLED, sub, idx)
                    n += 1
        return {"ok": True, "cancelled": n}

    def _op_suppress(self, c: dict) -> dict:
        addr = _str(c, "address").lower()
        if "@" not in addr:
            raise CommandRefused("suppress: not an address")
        self.suppressed.setdefault(addr, [0, str(c.get("reason", "operator"))[:MAX_TEXT], _num(c, "now")])
        return {"ok": True}

    def _op_unsuppress(self, c: dict) -> dict:
        return {"ok": self.suppressed.pop(_str(c, "address").lower(), None) is not None}

    def _op_member_add(self, c: dict) -> dict:
        """A node joins (again; a leaving one stays). Retried with the same addresses it changes
        nothing."""
        nid, addrs = _str(c, "id"), {k: _str(c, k) for k in ("raft", "smtp", "admin")}
        m = self.members.get(nid)
        status = m["status"] if m else None
        if status in ("active", "leaving") and any(m[k] != v for k, v in addrs.items()):
            raise CommandRefused(f"{nid} is a member with other addresses")
        other = next((k for k, v in self.members.items()
                      if k != nid and v["raft"] == addrs["raft"] and v["status"] != "removed"), None)
        if other is not None:
            raise CommandRefused(f"raft address {addrs['raft']} belongs to member {other}")
        if status == "active":
            return {"ok": True, "already": True}
        self.members[nid] = {**addrs, "status": "active"}
        return {"ok": True}

    def _op_member_leave(self, c: dict) -> dict:
        """The node gets no new batches; it is removed once it holds none. Retried, or once it is
        removed, it changes nothing."""
        nid = _str(c, "id")
        addrs = {k: _str(c, k) for k in ("raft", "smtp", "admin")}
        m = self.members.get(nid)
        if m is None or m["status"] == "active":
            self.members[nid] = {**(m or addrs), "status": "leaving"}
        batches = sum(1 for b in self.batches.values() if b.node == nid)
        return {"ok": True, "batches": batches}

    def _op_member_remove(self, c: dict) -> dict:
        nid = _str(c, "id")
        status = self.members.get(nid, {}).get("status")
        if status not in ("leaving", "removed"):
            raise CommandRefused(f"{nid} is not leaving")
        self.members[nid]["status"] = "removed"
        return {"ok": True}

    def _op_prune(self, c: dict) -> dict:
        """Bounded state: finished submissions past `retention`, or while they hold more than
        `max_finished` recipients, keep only a compressed record of each recipient's final
        state; archives past `archive_retention`, or while they hold more than `max_archived`
        recipients, are dropped; the oldest suppressions beyond `max_suppressed` and
        de-duplication keys past `dedupe_window` or beyond `max_dedupe` recipients are
        forgotten. Campaign counts stay while the campaign holds a submission. Oldest first, and
        at most MAX_PRUNE_PER_COMMAND records per kind per command; "more" says work was left.
        Bounds are counted in recipients because memory follows them (a submission has one or
        more), and absent bounds are not applied."""
        now, retention, keep = _num(c, "now"), _num(c, "retention"), _num(c, "archive_retention")
        max_finished, max_archived, max_suppressed, max_dedupe = (
            int(_num(c, k)) if k in c else None
            for k in ("max_finished", "max_archived", "max_suppressed", "max_dedupe"))
        window = _num(c, "dedupe_window") if "dedupe_window" in c else None
        more = False
        archived = 0
        while self.finished:
            sid = next(iter(self.finished))
            sub = self.submissions[sid]
            if not (sub.finished_at < now - retention
                    or max_finished is not None and self.finished_rcpts > max_finished):
                break
            if archived >= MAX_PRUNE_PER_COMMAND:
                more = True
                break
            del self.finished[sid]
            del self.submissions[sid]
            self.finished_rcpts -= len(sub.rcpts)
            self.archived_rcpts += len(sub.rcpts)
            n = self.body_refs.get(sub.body, 0) - 1
            if n > 0:
                self.body_refs[sub.body] = n
            else:
                self.body_refs.pop(sub.body, None)
            blob = zlib.compress(msgpack.packb([sub.rcpts, bytes(sub.states)], use_bin_type=True), 1)
            self.archived[sid] = [sub.campaign, sub.finished_at, blob, sub.body, len(sub.rcpts)]
            archived += 1
        dropped = 0
        while self.archived:
            sid = next(iter(self.archived))
            a = self.archived[sid]
            if not (a[1] < now - keep or max_archived is not None and self.archived_rcpts > max_archived):
                break
            if dropped >= MAX_PRUNE_PER_COMMAND:
                more = True
                break
            campaign, blob = a[0], a[2]
            del self.archived[sid]
            dropped += 1
            _rcpts, states = msgpack.unpackb(zlib.decompress(blob), raw=False)
            self.archived_rcpts -= len(states)
            camp = self.campaigns.get(campaign)
            for st in states:  # counts cover what the state still holds
                self.counts[st] -= 1
                if camp is not None:
                    camp.counts[st] -= 1
            if camp is not None:
                camp.submissions.pop(sid, None)
                if not camp.submissions:
                    del self.campaigns[campaign]
        if max_suppressed is not None:
            forgotten = 0
            while len(self.suppressed) > max_suppressed:
                if forgotten >= MAX_PRUNE_PER_COMMAND:
                    more = True
                    break
                del self.suppressed[next(iter(self.suppressed))]  # the oldest
                forgotten += 1
        if window is not None or max_dedupe is not None:
            self._prune_dedupe(None if window is None else now - window, max_dedupe)
            if self.dedupe and ((window is not None and next(iter(self.dedupe.values()))[1] < now - window)
                                or (max_dedupe is not None and self.dedupe_size > max_dedupe)):
                more = True
        hour_ago = int(now // 60) - 60
        for minute in [m for m in self.delivered_minutes if m < hour_ago]:
            del self.delivered_minutes[minute]
        result: dict[str, Any] = {"archived": archived, "dropped": dropped}
        if more:
            result["more"] = True
        return result

    def _op_group(self, c: dict) -> list:
        """Commands one node proposed together in one Raft entry (the bridge's group commit):
        each applied in order exactly as it would be alone, with a result each."""
        cmds = c.get("cmds")
        if not isinstance(cmds, list) or not cmds:
            raise CommandRefused("cmds must be a non-empty list")
        return [{"error": "a group may not hold a group"} if isinstance(x, dict) and x.get("op") == "group"
                else self.apply(x) for x in cmds]

    def _op_noop(self, c: dict) -> dict:
        """A write whose only purpose is to learn that this node can commit (the drill, readiness)."""
        return {"ok": True}

    # ---------------------------------------------------------------- reads (no transitions)

    def eligible(self, now: float, limit: int) -> dict[str, list[list]]:
        """Recipients that may be assigned now, grouped by domain, oldest submission first."""
        out: dict[str, list[list]] = {}
        found = 0
        if limit <= 0:
            return out
        for sid in self.open:
            sub = self.submissions[sid]
            camp = self.campaigns[sub.campaign]
            if camp.paused or camp.cancelled:
                continue
            if sub.counts[PENDING] == 0 and (sub.next_due is None or sub.next_due > now):
                continue
            due_deferred = sub.counts[DEFERRED] and sub.next_due is not None and sub.next_due <= now
            for idx, st in enumerate(sub.states):
                if st == PENDING or (due_deferred and st == DEFERRED and sub.detail[idx][1] <= now):
                    out.setdefault(domain_of(sub.rcpts[idx]), []).append([sid, idx])
                    found += 1
                    if found >= limit:
                        return out
            if due_deferred:
                pending_next = [sub.detail[i][1] for i, st in enumerate(sub.states) if st == DEFERRED]
                sub.next_due = min(pending_next) if pending_next else None  # derived cache only
        return out

    def events_after(self, seq: int, limit: int, campaign: str | None = None) -> tuple[list[list], int]:
        """Events with seq > `seq` (oldest first), and the oldest seq still kept (to detect gaps)."""
        oldest = self.events[0][0] if self.events else self.event_seq + 1
        out = []
        if self.events and seq < self.event_seq:
            start = max(0, seq + 1 - oldest)
            for i in range(start, len(self.events)):
                e = self.events[i]
                if campaign is None or e[3] == campaign:
                    out.append(list(e))
                    if len(out) >= limit:
                        break
        return out, oldest

    def batches_for(self, node: str) -> list[Batch]:
        return [b for b in self.batches.values() if b.node == node]

    def queue_counts(self) -> dict[str, int]:
        return {name: self.counts[i] for i, name in enumerate(STATE_NAMES)}

    def recipient(self, sid: str, idx: int) -> dict:
        sub = self.submissions[sid]
        d = sub.detail.get(idx) or [0, None, None, None]
        return {"submission": sid, "index": idx, "address": sub.rcpts[idx],
                "state": STATE_NAMES[sub.states[idx]], "attempts": d[0], "next_at": d[1],
                "code": d[2], "text": d[3], "maybe_delivered": d[4] if len(d) > 4 else 0}

    def campaign_summary(self, camp: Campaign) -> dict:
        total = sum(camp.counts)
        final = sum(camp.counts[s] for s in FINAL_STATES)
        return {"id": camp.id, "created_at": camp.created_at, "paused": camp.paused,
                "cancelled": camp.cancelled, "submissions": camp.total, "recipients": total,
                "counts": {STATE_NAMES[i]: n for i, n in enumerate(camp.counts)},
                "percent_done": round(100.0 * final / total, 1) if total else 100.0}

    def iter_recipients(self) -> Iterator[tuple[str, int, str, int]]:
        for sid, sub in self.submissions.items():
            for idx, rcpt in enumerate(sub.rcpts):
                yield sid, idx, rcpt, sub.states[idx]

    # ---------------------------------------------------------------- snapshots

    def to_snapshot(self) -> bytes:
        """The whole state, msgpack, zlib level 1 (fast; addresses compress about 3:1)."""
        return zlib.compress(self._packed(), 1)

    def _packed(self) -> bytes:
        return msgpack.packb({
            "schema": self.schema,
            "submissions": [s.to_wire() for s in self.submissions.values()],
            "campaigns": [c.to_wire() for c in self.campaigns.values()],
            "open": list(self.open),
            "batches": [b.to_wire() for b in self.batches.values()],
            "batch_seq": self.batch_seq,
            "domain_batches": self.domain_batches,
            "domain_recent": {d: list(v) for d, v in self.domain_recent.items()},
            "suppressed": self.suppressed,
            "dedupe": self.dedupe,
            "counts": self.counts,
            "stats": self.stats,
            "delivered_minutes": self.delivered_minutes,
            "events": list(self.events),
            "event_seq": self.event_seq,
            "members": self.members,
            "incarnations": self.incarnations,
            "archived": self.archived,
            "finished": list(self.finished),
            "applied": self.applied,
        }, use_bin_type=True)

    @classmethod
    def from_snapshot(cls, blob: bytes) -> "MailState":
        w = msgpack.unpackb(zlib.decompress(blob), raw=False, strict_map_key=False)
        if w.get("schema") == 1:
            w = _from_schema_1(w)
        if w.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"snapshot schema {w.get('schema')} is not {SCHEMA_VERSION}")
        st = cls()
        st.submissions = {s[0]: Submission.from_wire(s) for s in w["submissions"]}
        st.campaigns = {c[0]: Campaign.from_wire(c) for c in w["campaigns"]}
        st.open = dict.fromkeys(w["open"])
        st.batches = {b[0]: Batch.from_wire(b) for b in w["batches"]}
        st.batch_seq = w["batch_seq"]
        st.domain_batches = dict(w["domain_batches"])
        st.domain_recent = {d: deque(v) for d, v in w["domain_recent"].items()}
        st.suppressed = dict(w["suppressed"])
        st.dedupe = dict(w["dedupe"])
        st.counts = list(w["counts"])
        st.stats = dict(w["stats"])
        st.delivered_minutes = {int(k): v for k, v in w["delivered_minutes"].items()}
        st.events = deque(w["events"], maxlen=EVENT_RING)
        st.event_seq = w["event_seq"]
        st.members = dict(w["members"])
        st.incarnations = dict(w.get("incarnations", {}))
        st.archived = dict(w["archived"])
        st.applied = w["applied"]
        if "finished" in w:
            st.finished = dict.fromkeys(w["finished"])
        else:  # a snapshot from before the finish order was kept: rebuild it the same way everywhere
            done = [s for s in st.submissions.values() if s.finished_at is not None]
            st.finished = dict.fromkeys(s.id for s in sorted(done, key=lambda s: s.finished_at))
        st.finished_rcpts = sum(len(st.submissions[sid].rcpts) for sid in st.finished)
        for sid, a in st.archived.items():
            if len(a) < 5:  # an archive from before the count was kept
                a.append(len(msgpack.unpackb(zlib.decompress(a[2]), raw=False)[1]))
            st.archived_rcpts += a[4]
        for sub in st.submissions.values():
            st.body_refs[sub.body] = st.body_refs.get(sub.body, 0) + 1
            camp = st.campaigns.get(sub.campaign)
            if camp is not None:
                sub.campaign = camp.id
        st.dedupe_size = sum(len(e[2]) // 8 for e in st.dedupe.values() if len(e) > 2)
        return st

    def digest(self) -> str:
        """Replicas with the same applied history have the same digest."""
        return hashlib.sha256(self._packed()).hexdigest()


def _from_schema_1(w: dict) -> dict:
    """Schema 1 held a wall-clock lease end per batch: it becomes the lease duration it was
    granted, with no incarnation (the holder's next process gives it back, counted)."""
    batches = []
    for b in w["batches"]:
        lease_until, assigned_at = b[4], b[6]
        batches.append([b[0], b[1], b[2], b[3], max(1.0, lease_until - assigned_at), b[5], assigned_at, "", 0])
    return {**w, "schema": 2, "batches": batches, "incarnations": {}}


def _num(c: dict, key: str) -> float:
    v = c[key] if key in c else None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise CommandRefused(f"{key} must be a finite number")
    return v


def _rcpt_hash(address: str) -> bytes:
    """8 bytes per recipient for the idempotency record (case-insensitive, as suppression is)."""
    return hashlib.blake2b(address.lower().encode("utf-8", "surrogateescape"), digest_size=8).digest()


def _is_item(x: Any) -> bool:
    """[submission id, recipient index]; bool is not an index (it would not survive a snapshot)."""
    return isinstance(x, (list, tuple)) and len(x) >= 2 and isinstance(x[0], str) and type(x[1]) is int


def _str(c: dict, key: str) -> str:
    v = c.get(key)
    if not isinstance(v, str) or not v:
        raise CommandRefused(f"{key} must be a non-empty string")
    return v


_HANDLERS = {
    "submit": MailState._op_submit,
    "assign": MailState._op_assign,
    "renew": MailState._op_renew,
    "report": MailState._op_report,
    "expire": MailState._op_expire,
    "abandon": MailState._op_abandon,
    "incarnate": MailState._op_incarnate,
    "expire_unsent": MailState._op_expire_unsent,
    "pause": MailState._op_pause,
    "resume": MailState._op_resume,
    "cancel": MailState._op_cancel,
    "suppress": MailState._op_suppress,
    "unsuppress": MailState._op_unsuppress,
    "noop": MailState._op_noop,
    "member_add": MailState._op_member_add,
    "member_leave": MailState._op_member_leave,
    "member_remove": MailState._op_member_remove,
    "prune": MailState._op_prune,
    "group": MailState._op_group,
}


def encode_command(command: dict) -> bytes:
    return msgpack.packb(command, use_bin_type=True)


_GROUP_HEAD = msgpack.packb("op") + msgpack.packb("group") + msgpack.packb("cmds")


def encode_group(blobs: list[bytes]) -> bytes:
    """{"op": "group", "cmds": [...]} around commands already encoded: no second encoding."""
    n = len(blobs)
    array = bytes([0x90 | n]) if n < 16 else (b"\xdc" + n.to_bytes(2, "big") if n < 2**16
                                              else b"\xdd" + n.to_bytes(4, "big"))
    return b"\x82" + _GROUP_HEAD + array + b"".join(blobs)

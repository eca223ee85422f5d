"""The replicated state machine: every state transition of raftmail happens here.

Pure and deterministic. No clock, no randomness, no I/O: time, ids and jitter arrive inside the
command, made by the proposing node. `apply()` never raises; a bad command is refused with the same
result on every replica, before anything changed. The state holds metadata only (bodies live in
each node's body store, referenced by sha256), kept compact so a million queued recipients
snapshot to a few MB.

MailState holds the data, the entry point, the transitions every handler shares and the reads;
the handlers live by subject: submissions.py, batches.py (leases), campaigns.py (and
suppression), members.py, retention.py; the commands in commands.py, the records in records.py,
the snapshot codec in snapshot.py. A handler checks everything it refuses for before it changes
anything, so a refused command changes nothing.
"""
from __future__ import annotations

import hashlib
import logging
import zlib
from collections import deque
from typing import Any, Callable, Iterator

import msgpack

from . import batches, campaigns, members, readindex, retention, shaping, snapshot, submissions, suppression
from .commands import (
    MAX_ITEMS_PER_COMMAND,
    MAX_PRUNE_PER_COMMAND,
    MAX_SUBMISSIONS_PER_COMMAND,
    CommandRefused,
    Group,
    Noop,
    Result,
    decode_command,
    encode_command,
    encode_group,
)
from .outcomes import CANCELLED, DELIVERED, FINAL_STATES, IN_FLIGHT, PENDING, STATE_NAMES, WAITING_STATES
from .records import (
    EVENT_FIELDS,
    EVENT_RING,
    NO_DETAIL,
    Archive,
    Assigned,
    Batch,
    Campaign,
    DedupeEntry,
    Event,
    Submission,
    Suppression,
)
from .domains import domain_of
from .shaping import DomainBackoff

# What callers import from here; the names live in the modules above.
__all__ = ["MailState", "CommandRefused", "encode_command", "encode_group", "EVENT_FIELDS", "EVENT_RING",
           "MAX_SUBMISSIONS_PER_COMMAND", "MAX_ITEMS_PER_COMMAND", "MAX_PRUNE_PER_COMMAND", "SCHEMA_VERSION",
           "domain_of"]

log = logging.getLogger("raftmail.state")

SCHEMA_VERSION = snapshot.SCHEMA_VERSION
APPLY_ERROR_LOG_CHARS = 2000  # of a command whose apply raised (a bug), in the error log line


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
        # Per destination site (a domain, or the MX rollup group it belongs to): batches in flight
        # (max_connections) and recent assignments, oldest first (max_per_minute).
        self.site_batches: dict[str, int] = {}
        self.site_recent: dict[str, deque[Assigned]] = {}
        self.backoff: dict[str, DomainBackoff] = {}  # destination sites in adaptive backoff (shaping.py)
        # "source site" -> [UTC day, recipients assigned that day]: warm-up caps (batches.py).
        self.warmup: dict[str, list[int]] = {}
        self.suppressed: dict[str, Suppression] = {}  # address (lowercase), oldest first
        # Idempotency: key of (sender, Message-ID) -> the recipients queued under it, oldest key
        # first; dedupe_size counts them all (derived, not snapshotted).
        self.dedupe: dict[str, DedupeEntry] = {}
        self.dedupe_size = 0
        self.counts = [0] * len(STATE_NAMES)  # recipients per state, whole cluster
        self.stats = {"lease_expiries": 0, "reassigned_in_flight": 0, "fenced_reports": 0,
                      "duplicates_refused": 0, "commands_refused": 0, "maybe_delivered": 0,
                      "batches_abandoned": 0, "expired_unsent": 0}
        # node id -> the incarnation (random id of its current process) it announced last.
        self.incarnations: dict[str, str] = {}
        self.delivered_minutes: dict[int, int] = {}  # minute -> recipients delivered (last hour)
        self.events: deque[Event] = deque(maxlen=EVENT_RING)  # oldest first
        self.event_seq = 0
        # Members added or removed at run time (the cluster file lists the founding members):
        # id -> {"raft", "smtp", "admin", "status": "active" | "leaving" | "removed"}
        self.members: dict[str, dict] = {}
        # Finished submissions past their retention, in the order they were archived.
        self.archived: dict[str, Archive] = {}
        # Finished, not yet archived submissions in the order they finished (prune's scan list),
        # and the recipients they hold (derived).
        self.finished: dict[str, None] = {}
        self.finished_rcpts = 0
        self.archived_rcpts = 0  # recipients in the archives (derived)
        # Body digest -> live (not archived) submissions referencing it. Derived from submissions,
        # so the same on every replica: a body is collected only when this has no entry for it.
        self.body_refs: dict[str, int] = {}
        self.applied = 0  # commands applied (a cheap progress counter for status and tests)
        # What the node's readers ask, answered without a scan (derived, not snapshotted).
        self.index = readindex.ReadIndex()

    # ---------------------------------------------------------------- entry point

    def apply(self, command: Any) -> Any:
        """Apply one command: a typed command, or a map decoded from msgpack. Never raises; a
        refusal is a result, and a refused command changes nothing but the refusal counter."""
        self.applied += 1
        try:
            cmd = decode_command(command)  # every field checked before any handler runs
            return _HANDLERS[cmd.op](self, cmd)
        except CommandRefused as e:
            self.stats["commands_refused"] += 1
            return Result.refusal(str(e))
        except Exception as e:
            # A bug, not a refusal: the handler may have changed part of the state before it
            # raised. Every replica fails the same way, so they stay identical and the log goes on;
            # counted apart (added on first use, so older snapshots keep their digest) and logged
            # with the entry.
            self.stats["apply_errors"] = self.stats.get("apply_errors", 0) + 1
            log.error("bug: applying a replicated command raised %s: %s; command: %.*r", type(e).__name__, e,
                      APPLY_ERROR_LOG_CHARS, command, exc_info=True)
            return Result.refusal(f"internal error: {type(e).__name__}: {e}")

    def apply_blob(self, blob: bytes) -> Any:
        try:
            command = msgpack.unpackb(blob, raw=False, strict_map_key=False)
        except Exception as e:
            self.applied += 1
            self.stats["commands_refused"] += 1
            return Result.refusal(f"undecodable command: {type(e).__name__}")
        return self.apply(command)

    # ---------------------------------------------------------------- transitions

    def set_state(self, sub: Submission, idx: int, new: int, now: float) -> None:
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
            if sub.id not in self.open:
                self.open[sub.id] = None
                self.index.opened(self, sub)
        elif sub.id in self.open:
            del self.open[sub.id]
            self.index.closed(self, sub.id)
        self.index.state_changed(self, sub, idx, old, new)
        if new in FINAL_STATES and sub.counts[IN_FLIGHT] == 0 and not sub.waiting():
            sub.finished_at = now
            if sub.id not in self.finished:
                self.finished[sub.id] = None
                self.finished_rcpts += len(sub.rcpts)
        if new == DELIVERED:
            minute = int(now // 60)
            self.delivered_minutes[minute] = self.delivered_minutes.get(minute, 0) + 1

    def add_event(self, now: float, state: int, sub: Submission, idx: int, node: str = "",
                  remote: str = "", code: int | None = None, text: str = "") -> None:
        self.event_seq += 1
        self.events.append(Event._make((self.event_seq, now, STATE_NAMES[state], sub.campaign, sub.id, idx,
                                        sub.rcpts[idx], node, remote, code, text,
                                        sub.detail.get(idx, NO_DETAIL).attempts)))

    def return_to_queue(self, sub: Submission, idx: int, now: float) -> None:
        """A leased recipient that was not reported: back to the queue, or cancelled."""
        if self.campaigns[sub.campaign].cancelled:
            self.set_state(sub, idx, CANCELLED, now)
            self.add_event(now, CANCELLED, sub, idx)
        else:
            self.set_state(sub, idx, PENDING, now)

    def end_batch(self, batch: Batch) -> None:
        del self.batches[batch.id]
        self.index.batch_ended(batch.node)
        n = self.site_batches.get(batch.site, 0) - 1
        if n > 0:
            self.site_batches[batch.site] = n
        else:
            self.site_batches.pop(batch.site, None)

    # ---------------------------------------------------------------- reads (no transitions)

    def eligible(self, now: float, limit: int) -> dict[str, list[list]]:
        """Recipients that may be assigned now, grouped by domain, oldest submission first."""
        ix = self.index
        return readindex.eligible(ix.ready_head(self, limit), ix.due_head(self, limit, until=now), now, limit)

    def events_after(self, seq: int, limit: int, campaign: str | None = None) -> tuple[list[list], int]:
        """Events with seq > `seq` (oldest first), and the oldest seq still kept (to detect gaps)."""
        oldest = self.events[0].seq if self.events else self.event_seq + 1
        out = []
        if self.events and seq < self.event_seq:
            start = max(0, seq + 1 - oldest)
            for i in range(start, len(self.events)):
                e = self.events[i]
                if campaign is None or e.campaign == campaign:
                    out.append(list(e))
                    if len(out) >= limit:
                        break
        return out, oldest

    def batches_for(self, node: str) -> list[Batch]:
        return [b for b in self.batches.values() if b.node == node]

    def queue_counts(self) -> dict[str, int]:
        return {name: self.counts[i] for i, name in enumerate(STATE_NAMES)}

    def submission_answer(self, sid: str, key: str | None, rcpts: list[str]) -> list | None:
        """A submission's answer read back from the applied state, for a proposer that lost
        track of its commit (a timeout, a leader change): ["ok", sid] or ["ok", sid, new, already]
        when it was queued, ["duplicate", id] when every recipient is queued under its key (by it or
        an earlier try); None when neither shows here (not applied yet, or refused)."""
        sub = self.submissions.get(sid)
        if sub is not None:
            new = len(sub.rcpts)
            return ["ok", sid] if new == len(rcpts) else ["ok", sid, new, len(rcpts) - new]
        archived = self.archived.get(sid)
        if archived is not None:
            new = archived.recipients
            return ["ok", sid] if new == len(rcpts) else ["ok", sid, new, len(rcpts) - new]
        entry = self.dedupe.get(key) if key is not None else None
        if entry is not None and entry.hashes is not None:
            known = {entry.hashes[i:i + 8] for i in range(0, len(entry.hashes), 8)}
            if all(submissions.rcpt_hash(r) in known for r in rcpts):
                return ["duplicate", entry.submission]
        return None

    def recipient(self, sid: str, idx: int) -> dict:
        sub = self.submissions[sid]
        d = sub.detail.get(idx, NO_DETAIL)
        return {"submission": sid, "index": idx, "address": sub.rcpts[idx],
                "state": STATE_NAMES[sub.states[idx]], "attempts": d.attempts, "next_at": d.next_at,
                "code": d.code, "text": d.text, "maybe_delivered": d.maybe_delivered}

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

    def expire_unsent(self, now: float, max_age: float, limit: int) -> list[list]:
        """Waiting recipients (pending, or deferred) of submissions accepted more than `max_age`
        before `now`: [[submission, index], ...], at most `limit`. A read."""
        out: list[list] = []
        for sid in self.open:
            sub = self.submissions[sid]
            # A scheduled submission ages from its send time, not from its acceptance.
            if max(sub.accepted_at, sub.not_before or 0.0) + max_age >= now:
                continue
            for idx, rstate in enumerate(sub.states):
                if rstate in WAITING_STATES:
                    out.append([sid, idx])
                    if len(out) >= limit:
                        return out
        return out

    def _sent_last_minute(self, domain: str, now: float) -> int:
        return batches.sent_last_minute(self, domain, now)

    def _give_back(self, batch: Batch, now: float) -> int:
        return batches.give_back(self, batch, now)

    # ---------------------------------------------------------------- snapshots

    def to_snapshot(self) -> bytes:
        """The whole state, msgpack, zlib level 1 (fast; addresses compress about 3:1)."""
        return zlib.compress(self._packed(), 1)

    def _packed(self) -> bytes:
        return snapshot.pack(self)

    @classmethod
    def from_snapshot(cls, blob: bytes) -> "MailState":
        return snapshot.load(cls(), blob)

    def digest(self) -> str:
        """Replicas with the same applied history have the same digest."""
        return hashlib.sha256(self._packed()).hexdigest()


def _group(st: MailState, c: Group) -> list:
    """Commands one node proposed together in one Raft entry (the bridge's group commit): each
    applied in order exactly as it would be alone, with a result each."""
    return [_nested_group(st) if isinstance(x, dict) and x.get("op") == "group" else st.apply(x) for x in c.cmds]


def _nested_group(st: MailState) -> Result:
    st.stats["commands_refused"] += 1
    return Result.refusal("a group may not hold a group")


def _noop(st: MailState, c: Noop) -> Result:
    """A write whose only purpose is to learn that this node can commit (the drill, readiness)."""
    return Result(ok=True)


# op -> handler(state, typed command): every command of commands.COMMANDS has one.
_HANDLERS: dict[str, Callable[[MailState, Any], Any]] = {
    "submit": submissions.submit,
    "expire_unsent": submissions.expire_unsent,
    "assign": batches.assign,
    "renew": batches.renew,
    "report": batches.report,
    "backoff": shaping.apply_backoff,
    "expire": batches.expire,
    "abandon": batches.abandon,
    "incarnate": batches.incarnate,
    "pause": campaigns.pause,
    "resume": campaigns.resume,
    "cancel": campaigns.cancel,
    "suppress": suppression.suppress,
    "suppress_many": suppression.suppress_many,
    "unsuppress": suppression.unsuppress,
    "feedback": suppression.feedback,
    "member_add": members.member_add,
    "member_leave": members.member_leave,
    "member_remove": members.member_remove,
    "prune": retention.prune,
    "noop": _noop,
    "group": _group,
}

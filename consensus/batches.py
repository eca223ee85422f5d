"""Batches and their leases: assignment with the per-domain throttles, renewal, the holder's
reports, expiry, and giving back a restarted holder's batches. Handlers of the state machine
(consensus/state.py): pure; the batch id is the fencing token.
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Sequence

from .commands import Abandon, Assign, Expire, Incarnate, Renew, Report, Result
from .outcomes import CANCELLED, DEFERRED, DELIVERED, EXPIRED, IN_FLIGHT, SUPPRESSED, WAITING_STATES
from . import shaping, suppression
from .domains import domain_of
from .records import MAX_TEXT, Assigned, Batch

if TYPE_CHECKING:
    from .state import MailState


def assign(st: MailState, c: Assign) -> Result:
    node, domain, now = c.node, c.domain, c.now
    site = c.site or domain
    if st.members.get(node, {}).get("status", "active") != "active":
        return Result(batch=None, reason=f"node {node} is {st.members[node]['status']}")
    if shaping.suspended(st, site, now):
        return Result(batch=None, reason="suspended")
    if st.site_batches.get(site, 0) >= c.max_connections:
        return Result(batch=None, reason="max_connections")
    quota = len(c.items)
    if c.max_per_minute > 0:
        quota = min(quota, c.max_per_minute - sent_last_minute(st, site, now))
        if quota <= 0:
            return Result(batch=None, reason="max_per_minute")
    warmup = warmup_key(c.source or "", site)
    if c.source and c.daily_cap is not None:
        quota = min(quota, c.daily_cap - count_today(st.warmup.get(warmup), now))
        if quota <= 0:
            return Result(batch=None, reason="daily_cap")
    chosen: dict[tuple[str, int], None] = {}
    for sid, idx in c.items:
        if len(chosen) >= quota:
            break
        sub = st.submissions.get(sid)
        if sub is None or not 0 <= idx < len(sub.rcpts):
            continue
        if domain_of(sub.rcpts[idx]) != domain:
            continue
        camp = st.campaigns[sub.campaign]
        if camp.paused or camp.cancelled or (sub.not_before is not None and sub.not_before > now):
            continue
        rstate = sub.states[idx]
        if rstate == DEFERRED and sub.detail[idx].next_at > now:
            continue
        if rstate not in WAITING_STATES:
            continue
        if suppression.is_suppressed(st, sub.rcpts[idx], sub.scope):
            st.set_state(sub, idx, SUPPRESSED, now)
            st.add_event(now, SUPPRESSED, sub, idx)
            continue
        st.set_state(sub, idx, IN_FLIGHT, now)
        chosen[(sid, idx)] = None
    if not chosen:
        return Result(batch=None, reason="nothing eligible")
    st.batch_seq += 1
    bid = f"b{st.batch_seq}"
    st.batches[bid] = Batch(bid, node, domain, chosen, c.lease, c.term, now, st.incarnations.get(node, ""),
                            site=site, source=c.source or "")
    st.site_batches[site] = st.site_batches.get(site, 0) + 1
    st.index.batch_started(node)
    if c.max_per_minute > 0:
        st.site_recent.setdefault(site, deque()).append(Assigned(now, len(chosen)))
    if c.source and c.daily_cap is not None:
        st.warmup[warmup] = [utc_day(now), count_today(st.warmup.get(warmup), now) + len(chosen)]
    return Result(batch=bid, n=len(chosen), leased=[bid, 0])


def sent_last_minute(st: MailState, site: str, now: float) -> int:
    """Recipients assigned to `site` in the 60 s before `now` (prunes older records)."""
    recent = st.site_recent.get(site)
    if not recent:
        return 0
    while recent and recent[0].at <= now - 60:
        recent.popleft()
    if not recent:
        del st.site_recent[site]
        return 0
    return sum(n for _, n in recent)


def utc_day(now: float) -> int:
    """The day number (since the epoch, UTC) of the proposer's time `now`: warm-up caps are daily."""
    return int(now // 86400)


def warmup_key(source: str, site: str) -> str:
    """The key of st.warmup for a source address and a destination site."""
    return f"{source} {site}"


def count_today(entry: Sequence[int] | None, now: float) -> int:
    """Recipients a st.warmup entry ([UTC day, count]) says were handed over on `now`'s UTC day. A
    recipient assigned again after a deferral counts again: a warm-up cap errs towards sending less."""
    return entry[1] if entry is not None and entry[0] == utc_day(now) else 0


def prune_warmup(st: MailState, now: float) -> None:
    """Forget the counts of earlier days (the table stays one entry per source and site)."""
    today = utc_day(now)
    for key in [k for k, (day, _) in st.warmup.items() if day != today]:
        del st.warmup[key]


def renew(st: MailState, c: Renew) -> Result:
    """The holder keeps its lease: every node restarts the lease on its own clock when it
    applies this (node/leases.py). Refused (ok False) for anyone but the holder's process."""
    batch = st.batches.get(c.batch)
    if batch is None or batch.node != c.node or (c.incarnation is not None and c.incarnation != batch.incarnation):
        return Result(ok=False)
    batch.renewals += 1
    return Result(ok=True, leased=[batch.id, batch.renewals])


def report(st: MailState, c: Report) -> Result:
    """Outcomes of sends. Only the batch's holder may report, only for items it still holds."""
    now, node = c.now, c.node
    batch = st.batches.get(c.batch)
    if batch is None or batch.node != node:
        # A fenced-out holder (lease expired, batch reassigned): its sends may be duplicates.
        st.stats["fenced_reports"] += len(c.results)
        return Result(accepted=0, fenced=len(c.results))
    accepted = fenced = 0
    suppressed_now = []
    for r in c.results:
        sid, idx, code = r.submission, r.index, r.code
        key = (sid, idx)
        if key not in batch.items:
            fenced += 1
            continue
        del batch.items[key]
        sub = st.submissions[sid]
        accepted += 1
        text = r.text[:MAX_TEXT]
        remote = r.remote[:100]
        d = sub.detail_of(idx)
        d.attempts += 1
        d.code, d.text = code, text
        verdict = r.verdict()  # the sender's rule, checked again here
        new = verdict.state
        shaping.note(st, batch.site, code, verdict.enhanced, text, new == DELIVERED, now)
        maybe = r.maybe_delivered and new == DEFERRED
        if maybe:
            # The final dot went out and no reply came: the receiver may have the copy.
            st.stats["maybe_delivered"] = st.stats.get("maybe_delivered", 0) + 1
            d.maybe_delivered += 1
        if new == DEFERRED:
            next_at = float(r.next_at)
            if st.campaigns[sub.campaign].cancelled:
                new = CANCELLED
            elif maybe and c.max_maybe is not None and d.maybe_delivered >= c.max_maybe:
                # Bounded: after max_maybe unanswered final dots we stop sending copies.
                new = EXPIRED
                d.text = text = (f"maybe delivered {d.maybe_delivered} times, never confirmed; not retried: "
                                 f"{text}")[:MAX_TEXT]
            elif next_at > sub.accepted_at + c.max_age:
                new = EXPIRED
            else:
                d.next_at = next_at
        st.set_state(sub, idx, new, now)
        st.add_event(now, new, sub, idx, node, remote, code, text)
        if new != DEFERRED:
            if verdict.suppress:
                addr = sub.rcpts[idx].lower()
                if suppression.add(st, addr, "", code, text, "bounce", now):
                    suppressed_now.append(addr)
    for sid, idx in c.release:
        if (sid, idx) in batch.items:
            del batch.items[(sid, idx)]
            st.return_to_queue(st.submissions[sid], idx, now)
    if fenced:
        st.stats["fenced_reports"] += fenced
    if not batch.items:
        st.end_batch(batch)
    return Result(accepted=accepted, fenced=fenced, suppressed=suppressed_now)


def expire(st: MailState, c: Expire) -> Result:
    """Leases the leader measured as run out, on its own clock: [[batch, renewals], ...]. A batch
    renewed after the leader looked (its counter moved on) keeps its lease."""
    expired = []
    returned = 0
    for bid, renewals in c.batches:
        batch = st.batches.get(bid)
        if batch is None or batch.renewals != renewals:
            continue
        for sid, idx in batch.items:
            st.return_to_queue(st.submissions[sid], idx, c.now)
            returned += 1
        st.end_batch(batch)
        expired.append(bid)
    st.stats["lease_expiries"] += len(expired)
    st.stats["reassigned_in_flight"] += returned
    return Result(expired=expired, returned=returned)


def give_back(st: MailState, batch: Batch, now: float) -> int:
    """A batch of a holder's previous process goes back to the queue: nobody can know what
    that process sent, so every recipient still held is counted as possibly in flight."""
    n = len(batch.items)
    for sid, idx in batch.items:
        st.return_to_queue(st.submissions[sid], idx, now)
    st.end_batch(batch)
    st.stats["reassigned_in_flight"] += n
    st.stats["batches_abandoned"] = st.stats.get("batches_abandoned", 0) + 1
    return n


def abandon(st: MailState, c: Abandon) -> Result:
    """A restarted node gives back a batch leased to its previous process (another incarnation)."""
    batch = st.batches.get(c.batch)
    if batch is None or batch.node != c.node or batch.incarnation == c.incarnation:
        return Result(abandoned=0)
    return Result(abandoned=give_back(st, batch, c.now))


def incarnate(st: MailState, c: Incarnate) -> Result:
    """A node process announces its random incarnation id when it starts. Batches held by the
    node's earlier processes go back to the queue at once (counted); new batches are leased
    to this incarnation."""
    st.incarnations[c.node] = c.incarnation
    given_back, returned = [], 0
    for batch in [b for b in st.batches.values() if b.node == c.node and b.incarnation != c.incarnation]:
        returned += give_back(st, batch, c.now)
        given_back.append(batch.id)
    return Result(ok=True, abandoned=given_back, returned=returned)

"""Submissions: queueing them (with idempotency per sender and Message-ID) and expiring the ones
that waited past max_age. Handlers of the state machine (consensus/state.py): pure.
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from .commands import (MAX_ITEMS_PER_COMMAND, MAX_PRUNE_PER_COMMAND, ExpireUnsent, NewSubmission, Result, Submit,
                       SubmissionRefused)
from .outcomes import DEFERRED, EXPIRED, IN_FLIGHT, PENDING, SUPPRESSED
from . import suppression
from .records import Campaign, DedupeEntry, Submission

if TYPE_CHECKING:
    from .state import MailState


def rcpt_hash(address: str) -> bytes:
    """8 bytes per recipient for the idempotency record (case-insensitive, as suppression is)."""
    return hashlib.blake2b(address.lower().encode("utf-8", "surrogateescape"), digest_size=8).digest()


def submit(st: MailState, c: Submit) -> list:
    prune_dedupe(st, c.now - c.window, c.max_dedupe)
    return [_submit_one(st, s, c.now, c.max_queued, c.max_dedupe) for s in c.subs]


def _submit_one(st: MailState, s: NewSubmission | SubmissionRefused, now: float, max_queued: int,
                max_dedupe: int | None = None) -> list:
    """["ok", id] (every recipient queued), ["ok", id, new, already] (only the recipients not
    yet queued under the same key were), ["duplicate", id], ["cancelled", campaign],
    ["full", None] or ["refused", why]."""
    if isinstance(s, SubmissionRefused):
        st.stats["commands_refused"] += 1
        return ["refused", s.why]
    sid, campaign, rcpts, key = s.id, s.campaign, s.rcpts, s.key
    camp = st.campaigns.get(campaign)
    if camp is not None and camp.cancelled:
        # Refused, not queued-then-cancelled: the client hears it at DATA.
        st.stats["cancelled_refused"] = st.stats.get("cancelled_refused", 0) + 1
        return ["cancelled", campaign]
    hashes = [rcpt_hash(r) for r in rcpts]
    entry = st.dedupe.get(key) if key is not None else None
    if entry is not None:
        # A key from a snapshot without recipients: the whole message. A template submission's
        # positions index its recipient data, so its key stands for the whole request.
        if entry.hashes is None or s.template is not None:
            st.stats["duplicates_refused"] += 1
            return ["duplicate", entry.submission]
        known = {entry.hashes[i:i + 8] for i in range(0, len(entry.hashes), 8)}
        fresh = [i for i, h in enumerate(hashes) if h not in known]
        if not fresh:
            st.stats["duplicates_refused"] += 1
            return ["duplicate", entry.submission]
    else:
        fresh = list(range(len(rcpts)))
    if sid in st.submissions or sid in st.archived:
        return ["duplicate", sid]
    queued = st.counts[PENDING] + st.counts[DEFERRED] + st.counts[IN_FLIGHT]
    if queued + len(fresh) > max_queued:
        return ["full", None]
    sub = Submission(sid, campaign, s.sender, s.body, s.size, now, [rcpts[i] for i in fresh])
    sub.scope = s.scope
    sub.not_before, sub.template = s.not_before, s.template
    if camp is None:
        camp = st.campaigns[campaign] = Campaign(campaign, now)
    sub.campaign = camp.id  # one string object per campaign, not one per submission
    camp.submissions[sid] = None
    camp.total += 1
    st.submissions[sid] = sub
    st.body_refs[sub.body] = st.body_refs.get(sub.body, 0) + 1
    camp.counts[PENDING] += len(sub.rcpts)
    st.counts[PENDING] += len(sub.rcpts)
    st.open[sid] = None
    st.index.opened(st, sub)
    st.index.submitted(st, sub)
    for idx, rcpt in enumerate(sub.rcpts):
        if suppression.is_suppressed(st, rcpt, sub.scope):
            st.set_state(sub, idx, SUPPRESSED, now)
            st.add_event(now, SUPPRESSED, sub, idx)
    if key is not None:
        added = b"".join(hashes[i] for i in fresh)
        if entry is not None:
            del st.dedupe[key]  # renewed: it moves to the newest end, with a new window
            st.dedupe_size -= entry.recipients()
            added = entry.hashes + added
        st.dedupe[key] = DedupeEntry(sid, now, added)
        st.dedupe_size += len(added) // 8
        if max_dedupe is not None:
            prune_dedupe(st, None, max_dedupe)
    if len(fresh) < len(rcpts):
        st.stats["duplicates_refused"] += 1
        return ["ok", sid, len(fresh), len(rcpts) - len(fresh)]
    return ["ok", sid]


def prune_dedupe(st: MailState, cutoff: float | None, max_size: int | None = None) -> int:
    """Forget keys older than `cutoff`, and the oldest keys while more than `max_size`
    recipients are remembered; at most MAX_PRUNE_PER_COMMAND keys per call."""
    # Keys are kept in commit order; proposers' clocks differ a little, which only delays pruning.
    forgotten = 0
    while st.dedupe and forgotten < MAX_PRUNE_PER_COMMAND:
        key = next(iter(st.dedupe))
        entry = st.dedupe[key]
        if (cutoff is None or entry.accepted_at >= cutoff) and (max_size is None or st.dedupe_size <= max_size):
            break
        del st.dedupe[key]
        st.dedupe_size -= entry.recipients()
        forgotten += 1
    return forgotten


def expire_unsent(st: MailState, c: ExpireUnsent) -> Result:
    """`max_age` for recipients that never got an attempt (or whose retry is not due): the
    proposer's `now` decides; the state re-checks each one."""
    items = st.expire_unsent(c.now, c.max_age, MAX_ITEMS_PER_COMMAND)
    for sid, idx in items:
        sub = st.submissions[sid]
        d = sub.detail_of(idx)
        d.code, d.text = None, "max_age reached before delivery"
        st.set_state(sub, idx, EXPIRED, c.now)
        st.add_event(c.now, EXPIRED, sub, idx, text=d.text)
    st.stats["expired_unsent"] = st.stats.get("expired_unsent", 0) + len(items)
    return Result(expired=len(items))

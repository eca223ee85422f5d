"""Bounded state: archiving finished submissions, dropping old archives, forgetting the oldest
suppressions and de-duplication keys. The handler of `prune` (consensus/state.py): pure.
"""
from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import msgpack

from .batches import prune_warmup
from .commands import MAX_PRUNE_PER_COMMAND, Prune, Result
from .records import Archive
from .submissions import prune_dedupe

if TYPE_CHECKING:
    from .state import MailState


def prune(st: MailState, c: Prune) -> Result:
    """Bounded state: finished submissions past `retention`, or while they hold more than
    `max_finished` recipients, keep only a compressed record of each recipient's final
    state; archives past `archive_retention`, or while they hold more than `max_archived`
    recipients, are dropped; the oldest suppressions beyond `max_suppressed` and
    de-duplication keys past `dedupe_window` or beyond `max_dedupe` recipients are
    forgotten. Campaign counts stay while the campaign holds a submission. Oldest first, and
    at most MAX_PRUNE_PER_COMMAND records per kind per command; "more" says work was left.
    Bounds are counted in recipients because memory follows them (a submission has one or
    more), and absent bounds are not applied."""
    now, retention, keep = c.now, c.retention, c.archive_retention
    max_finished, max_archived, max_suppressed, max_dedupe = c.max_finished, c.max_archived, c.max_suppressed, \
        c.max_dedupe
    window = c.dedupe_window
    more = False
    prune_warmup(st, now)
    archived = 0
    while st.finished:
        sid = next(iter(st.finished))
        sub = st.submissions[sid]
        if not (sub.finished_at < now - retention
                or max_finished is not None and st.finished_rcpts > max_finished):
            break
        if archived >= MAX_PRUNE_PER_COMMAND:
            more = True
            break
        del st.finished[sid]
        del st.submissions[sid]
        st.finished_rcpts -= len(sub.rcpts)
        st.archived_rcpts += len(sub.rcpts)
        n = st.body_refs.get(sub.body, 0) - 1
        if n > 0:
            st.body_refs[sub.body] = n
        else:
            st.body_refs.pop(sub.body, None)
        blob = zlib.compress(msgpack.packb([sub.rcpts, bytes(sub.states)], use_bin_type=True), 1)
        st.archived[sid] = Archive(sub.campaign, sub.finished_at, blob, sub.body, len(sub.rcpts), sub.scope)
        archived += 1
    dropped = 0
    while st.archived:
        sid = next(iter(st.archived))
        a = st.archived[sid]
        if not (a.finished_at < now - keep or max_archived is not None and st.archived_rcpts > max_archived):
            break
        if dropped >= MAX_PRUNE_PER_COMMAND:
            more = True
            break
        campaign = a.campaign
        del st.archived[sid]
        dropped += 1
        _rcpts, states = msgpack.unpackb(zlib.decompress(a.blob), raw=False)
        st.archived_rcpts -= len(states)
        camp = st.campaigns.get(campaign)
        for rstate in states:  # counts cover what the state still holds
            st.counts[rstate] -= 1
            if camp is not None:
                camp.counts[rstate] -= 1
        if camp is not None:
            camp.submissions.pop(sid, None)
            if not camp.submissions:
                del st.campaigns[campaign]
    if max_suppressed is not None:
        forgotten = 0
        while len(st.suppressed) > max_suppressed:
            if forgotten >= MAX_PRUNE_PER_COMMAND:
                more = True
                break
            del st.suppressed[next(iter(st.suppressed))]  # the oldest
            forgotten += 1
    if window is not None or max_dedupe is not None:
        prune_dedupe(st, None if window is None else now - window, max_dedupe)
        if st.dedupe and ((window is not None and next(iter(st.dedupe.values())).accepted_at < now - window)
                            or (max_dedupe is not None and st.dedupe_size > max_dedupe)):
            more = True
    hour_ago = int(now // 60) - 60
    for minute in [m for m in st.delivered_minutes if m < hour_ago]:
        del st.delivered_minutes[minute]
    result = Result(archived=archived, dropped=dropped)
    if more:
        result["more"] = True
    return result

"""The replicated suppression list and the sender's feedback loop: unsubscribes, complaints and late
bounces. Handlers of the state machine (consensus/state.py), pure like every other: time, node and
reply arrive in the command.

An entry suppresses an address for the whole cluster (scope "") or for mail whose From: domain is
its scope. Entries are kept oldest first (the prune forgets the oldest beyond its bound), as
`entry_key(address, scope)` -> Suppression.
"""
from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import msgpack

from .commands import MAX_REASON, SCOPE_SEPARATOR, Feedback, Result, Suppress, SuppressMany, Unsuppress
from .outcomes import BOUNCED, DEFERRED, judge_reply
from .records import Event, Suppression

if TYPE_CHECKING:
    from .state import MailState

# Events of the feedback loop, beside the recipient outcomes (same fields, attempt 0).
UNSUBSCRIBED, COMPLAINED = "unsubscribed", "complained"
LATE_DELAY = "delayed"  # a DSN that reports a temporary failure: an event only


def entry_key(address: str, scope: str = "") -> str:
    return address if not scope else f"{address}{SCOPE_SEPARATOR}{scope}"


def split_key(key: str) -> tuple[str, str]:
    address, _, scope = key.partition(SCOPE_SEPARATOR)
    return address, scope


def is_suppressed(st: MailState, address: str, scope: str) -> bool:
    """Whether mail from `scope` (a From: domain, "" when unknown) to `address` is suppressed."""
    a = address.lower()
    return a in st.suppressed or (bool(scope) and entry_key(a, scope) in st.suppressed)


def add(st: MailState, address: str, scope: str, code: int, reason: str, source: str, now: float) -> bool:
    """True when the entry is new; an existing one keeps its first reason, time and source."""
    key = entry_key(address.lower(), scope.lower())
    if key in st.suppressed:
        return False
    st.suppressed[key] = Suppression(code, reason[:MAX_REASON], now, source)
    return True


def _late_event(st: MailState, now: float, outcome: str, campaign: str, sid: str, idx: int, recipient: str,
                node: str = "", remote: str = "", code: int | None = None, text: str = "") -> None:
    st.event_seq += 1
    st.events.append(Event(st.event_seq, now, outcome, campaign, sid, idx, recipient, node, remote[:100], code,
                           text[:MAX_REASON], 0))


def _count(st: MailState, stat: str) -> None:
    st.stats[stat] = st.stats.get(stat, 0) + 1  # added on first use: older snapshots keep their digest


def _scope_text(scope: str) -> str:
    return f" (scope {scope})" if scope else " (scope cluster)"


def resolve(st: MailState, sid: str, idx: int) -> tuple[str, str, str] | None:
    """(recipient, campaign, scope) of a copy a feedback address names, live or archived; None
    when the state no longer holds it."""
    sub = st.submissions.get(sid)
    if sub is not None:
        return (sub.rcpts[idx], sub.campaign, sub.scope) if 0 <= idx < len(sub.rcpts) else None
    a = st.archived.get(sid)
    if a is None:
        return None
    rcpts, _states = msgpack.unpackb(zlib.decompress(a.blob), raw=False)
    return (rcpts[idx], a.campaign, a.scope) if 0 <= idx < len(rcpts) else None


# ------------------------------------------------------------------ handlers


def suppress(st: MailState, c: Suppress) -> Result:
    new = add(st, c.address, c.scope, 0, c.reason, c.source, c.now)
    if c.event == UNSUBSCRIBED:
        _late_event(st, c.now, UNSUBSCRIBED, c.campaign or "", c.submission or "", c.index, c.address.lower(),
                    c.node or "", text=c.reason + _scope_text(c.scope))
        _count(st, "unsubscribes")
    return Result(ok=True, new=new)


def suppress_many(st: MailState, c: SuppressMany) -> Result:
    added = 0
    for address, scope, reason in c.entries:
        added += add(st, address, scope, 0, reason or c.source, c.source, c.now)
    return Result(added=added, already=len(c.entries) - added)


def unsuppress(st: MailState, c: Unsuppress) -> Result:
    return Result(ok=st.suppressed.pop(entry_key(c.address.lower(), c.scope.lower()), None) is not None)


def feedback(st: MailState, c: Feedback) -> Result:
    """A late bounce suppresses where an in-session reply with its code would (for every sender:
    the address itself is bad); a 4xx is only an event. A complaint or an unsubscribe suppresses in
    the copy's From: domain, or for the whole cluster."""
    found = resolve(st, c.submission, c.index)
    if found is None:
        _count(st, "feedback_unmatched")
        return Result(matched=False)
    rcpt, campaign, from_domain = found
    if c.kind == "bounce":
        verdict = judge_reply(c.code, c.enhanced, c.text)
        suppressed = False
        if verdict.state == BOUNCED:
            suppressed = verdict.suppress and add(st, rcpt, "", c.code, c.text, "late-bounce", c.now)
            _late_event(st, c.now, "bounced", campaign, c.submission, c.index, rcpt, c.node, c.remote, c.code, c.text)
            _count(st, "late_bounces")
        elif verdict.state == DEFERRED:
            _late_event(st, c.now, LATE_DELAY, campaign, c.submission, c.index, rcpt, c.node, c.remote, c.code,
                        c.text)
        return Result(matched=True, suppressed=suppressed)
    scope = "" if c.scope == "cluster" else from_domain
    outcome, source = (COMPLAINED, "complaint") if c.kind == "complaint" else (UNSUBSCRIBED, "unsubscribe")
    suppressed = add(st, rcpt, scope, 0, c.text or source, source, c.now)
    _late_event(st, c.now, outcome, campaign, c.submission, c.index, rcpt, c.node, c.remote,
                text=(c.text or source) + _scope_text(scope))
    _count(st, "complaints" if c.kind == "complaint" else "unsubscribes")
    return Result(matched=True, suppressed=suppressed)


# ------------------------------------------------------------------ reads


def entry_dict(key: str, entry: Suppression) -> dict:
    address, scope = split_key(key)
    return {"address": address, "scope": scope, "code": entry.code or None, "reason": entry.text, "at": entry.at,
            "source": entry.origin()}


def lookup(st: MailState, address: str) -> list[dict]:
    """Every entry of one address (its cluster-wide one and those for single From: domains)."""
    a = address.lower()
    out = [entry_dict(a, st.suppressed[a])] if a in st.suppressed else []
    prefix = a + SCOPE_SEPARATOR
    # Scoped entries of one address are few; the scan is bounded by the list's size.
    out += [entry_dict(k, e) for k, e in st.suppressed.items() if k.startswith(prefix)]
    return out

"""Adaptive backoff per destination domain: a receiver that throttles gets less, then nothing for
a while, then more again step by step while its replies are clean.

Reports note each throttling reply (`is_throttle`) and each delivery of a domain already in
backoff; the leader's scheduler reads those notes, decides the next step with `next_step` (pure,
its policy from config as an argument) and proposes a `Backoff` command; only committed steps
change the limits, so a new leader continues where the old one stopped, a suspension included.
Level L divides the domain's configured connections and per-minute rate by 2**L (never below 1).
Pure: time arrives in the commands.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from .commands import Backoff, Result
from .records import MAX_TEXT

if TYPE_CHECKING:
    from .state import MailState

# Replies that mean "you are sending too much" rather than "try this recipient again later":
# any 421 (the receiver closes the session, RFC 5321 3.8), 4.7.0 and 4.7.28 (Gmail's rate limit),
# and the texts the big receivers use (Yahoo's TSS04, Microsoft's throttling, Gmail's "unusual rate").
THROTTLE_ENHANCED = frozenset({"4.7.0", "4.7.28"})
THROTTLE_TEXT = re.compile(r"rate.?limit|too many (connections|messages|recipients)|unusual rate|throttl|"
                           r"\bTSS0[0-9]\b|temporarily deferred|try again later|server busy|exceeded",
                           re.IGNORECASE)


# With too little mail to count clean replies, no throttle for this many recover_seconds is a step up.
QUIET_RECOVERY = 3


def is_throttle(code: int, enhanced: str | None, text: str) -> bool:
    """Whether one reply asks the sender to slow down (see THROTTLE_ENHANCED, THROTTLE_TEXT)."""
    if not 400 <= code <= 499:
        return False
    return code == 421 or enhanced in THROTTLE_ENHANCED or THROTTLE_TEXT.search(text) is not None


class DomainBackoff(NamedTuple):
    """One destination domain in backoff, and what reports noted since its last step."""

    level: int  # limits divided by 2**level
    suspended_until: float  # nothing is assigned before this time (0: not suspended)
    reason: str  # the throttling reply that caused the last step down
    changed_at: float  # when the last step was committed
    throttles: int = 0  # throttling replies noted since that step
    clean: int = 0  # deliveries noted since that step
    last_reply: str = ""  # the latest throttling reply noted

    def to_wire(self) -> list:
        return list(self)

    @classmethod
    def from_wire(cls, w: list) -> "DomainBackoff":
        return cls(*w)


@dataclass(frozen=True)
class BackoffPolicy:
    step_seconds: float  # at most one step down per this long (a batch's many 421s are one signal)
    suspend_level: int  # reaching this level suspends the domain ...
    suspend_seconds: float  # ... for this long
    recover_after: int  # clean deliveries before one step back up (or QUIET_RECOVERY quiet periods) ...
    recover_seconds: float  # ... and at least this long after the last step


def limits_at(max_connections: int, max_per_minute: int, level: int) -> tuple[int, int]:
    """The domain's connections and per-minute rate (0: unlimited) at `level`."""
    if level <= 0:
        return max_connections, max_per_minute
    return max(1, max_connections >> level), (max(1, max_per_minute >> level) if max_per_minute > 0 else 0)


def next_step(b: DomainBackoff, now: float, policy: BackoffPolicy) -> tuple[int, float, str] | None:
    """The step the leader should propose for one domain: (level, suspended_until, reason), or
    None when nothing changes now."""
    if b.throttles > 0:
        if b.level > 0 and now - b.changed_at < policy.step_seconds:
            return None
        if now < b.suspended_until:
            return None  # what was in flight when the suspension began
        level = min(b.level + 1, policy.suspend_level)
        suspended = now + policy.suspend_seconds if level >= policy.suspend_level else 0.0
        return level, suspended, b.last_reply
    quiet = now - b.changed_at
    if b.level > 0 and now >= b.suspended_until and quiet >= policy.recover_seconds \
            and (b.clean >= policy.recover_after or quiet >= QUIET_RECOVERY * policy.recover_seconds):
        return b.level - 1, 0.0, b.reason
    return None


def note(st: MailState, domain: str, code: int, enhanced: str | None, text: str, delivered: bool,
         now: float) -> None:
    """A report's reply for `domain`: a throttle starts or feeds its backoff; a delivery counts
    toward recovery of a domain already in backoff. Throttles of sends that were in flight when a
    suspension began are not counted against the time after it."""
    b = st.backoff.get(domain)
    if b is not None and now < b.suspended_until:
        return
    if is_throttle(code, enhanced, text):
        if b is None:
            b = DomainBackoff(0, 0.0, "", 0.0)
        st.backoff[domain] = b._replace(throttles=b.throttles + 1, last_reply=f"{code} {text}"[:MAX_TEXT])
    elif delivered and b is not None:
        st.backoff[domain] = b._replace(clean=b.clean + 1)


def apply_backoff(st: MailState, c: Backoff) -> Result:
    """A step the leader decided: the domain's new level and suspension; its notes start over."""
    if c.level == 0 and c.suspended_until <= c.now:
        st.backoff.pop(c.domain, None)
        return Result(level=0)
    st.backoff[c.domain] = DomainBackoff(c.level, c.suspended_until, c.reason[:MAX_TEXT], c.now)
    return Result(level=c.level, suspended_until=c.suspended_until)


def suspended(st: MailState, domain: str, now: float) -> bool:
    b = st.backoff.get(domain)
    return b is not None and now < b.suspended_until

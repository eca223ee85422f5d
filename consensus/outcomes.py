"""Recipient states and the pure mapping from SMTP replies to them.

Everything here is deterministic: no I/O, no clock, no randomness. The replicated state machine
applies these functions on every node, so they must give the same answer everywhere. When a
deferred recipient is retried comes from consensus/backoff.py.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

# Recipient states, stored as small ints in the replicated state.
PENDING, IN_FLIGHT, DELIVERED, DEFERRED, BOUNCED, SUPPRESSED, CANCELLED, EXPIRED = range(8)

STATE_NAMES: tuple[str, ...] = (
    "pending",
    "in_flight",
    "delivered",
    "deferred",
    "bounced",
    "suppressed",
    "cancelled",
    "expired",
)

FINAL_STATES: frozenset[int] = frozenset({DELIVERED, BOUNCED, SUPPRESSED, CANCELLED, EXPIRED})
# Waiting for an attempt: where a leased recipient goes back when its batch ends unreported.
WAITING_STATES: tuple[int, ...] = (PENDING, DEFERRED)

# Enhanced codes (RFC 3463) that say the *recipient address* is bad for good, so the address is
# suppressed: bad mailbox, bad domain, bad address syntax, mailbox moved without forwarding,
# null MX (RFC 7505), mailbox disabled. 5.1.7 / 5.1.8 (and 5.1.0, which Postfix uses for
# "Sender address rejected") describe the *sender*: suppressing the recipient there would wipe
# out a whole list because of our own misconfiguration, so they bounce without suppression.
SUPPRESSING_ENHANCED: frozenset[str] = frozenset(
    {"5.1.1", "5.1.2", "5.1.3", "5.1.6", "5.1.10", "5.2.1"}
)

# class.subject.detail: class 2/4/5, subject up to 3 digits, detail up to 3 digits (RFC 3463).
_ENHANCED_RE = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")


@dataclass(frozen=True)
class Verdict:
    """What one SMTP reply means for one recipient."""

    state: int
    suppress: bool
    enhanced: str | None = field(default=None, compare=False)  # the enhanced code it was judged by

    @property
    def deferred(self) -> bool:
        """A transient outcome: the recipient is retried, so its report must carry a retry time."""
        return self.state == DEFERRED


def parse_enhanced(text: str) -> str | None:
    """Return the enhanced status code that opens a reply text, e.g. "5.1.1 No such user" -> "5.1.1".

    Leading zeros are dropped ("5.01.001" -> "5.1.1") so callers can compare codes as strings.
    """
    match = _ENHANCED_RE.match(text)
    if match is None:
        return None
    klass, subject, detail = match.groups()
    return f"{klass}.{int(subject)}.{int(detail)}"


def classify(code: int, enhanced: str | None) -> Verdict:
    """Map a reply code (0 = no reply at all) and optional enhanced code to a recipient verdict."""
    if 200 <= code <= 299:
        return Verdict(DELIVERED, False)
    if 500 <= code <= 599:
        return Verdict(BOUNCED, _suppresses(enhanced))
    # 4xx, code 0 (connect error, timeout, dropped connection) and any code outside the SMTP range
    # are transient: a protocol hiccup must never turn into a permanent failure.
    return Verdict(DEFERRED, False)


def judge_reply(code: int, enhanced: str | None, text: str) -> Verdict:
    """The one rule for what a recipient's SMTP outcome means: the sender applies it to decide
    whether a report row needs a retry time and what it reports, and the state machine applies it
    again, with the same row, when it checks and applies the report. The enhanced code is the one
    given, else the one that opens the reply text."""
    return _judged(code, enhanced or parse_enhanced(text))


@functools.lru_cache(maxsize=4096)  # a report holds few distinct replies; the state applies each row
def _judged(code: int, enhanced: str | None) -> Verdict:
    verdict = classify(code, enhanced)
    return Verdict(verdict.state, verdict.suppress, enhanced)


def _suppresses(enhanced: str | None) -> bool:
    # An enhanced code whose class is not 5 contradicts a 5xx reply; trust neither for suppression.
    return enhanced is not None and enhanced in SUPPRESSING_ENHANCED


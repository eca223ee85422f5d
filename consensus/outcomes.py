"""Recipient states and the pure mapping from SMTP replies to them.

Everything here is deterministic: no I/O, no clock, no randomness. The replicated state machine
applies these functions on every node, so they must give the same answer everywhere; randomness
(retry jitter) is drawn by the proposer and passed in as a number.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

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


def _suppresses(enhanced: str | None) -> bool:
    # An enhanced code whose class is not 5 contradicts a 5xx reply; trust neither for suppression.
    return enhanced is not None and enhanced in SUPPRESSING_ENHANCED


def next_retry_delay(
    attempt: int,
    *,
    first: float,
    factor: float,
    max_interval: float,
    jitter_fraction: float,
    jitter: float,
) -> float:
    """Seconds to wait before retry number `attempt` (1-based) of a deferred recipient.

    Exponential backoff: `first` for attempt 1, multiplied by `factor` per further attempt, capped
    at `max_interval`; then spread by +/- `jitter_fraction` using the caller-supplied `jitter`
    in [0, 1), so a deferred queue does not flood back all at once after an outage.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    if first < 0 or max_interval < 0 or factor <= 0:
        raise ValueError("first and max_interval must be >= 0 and factor > 0")
    if not 0.0 <= jitter_fraction <= 1.0:
        raise ValueError(f"jitter_fraction must be in [0, 1], got {jitter_fraction}")
    if not 0.0 <= jitter < 1.0:
        raise ValueError(f"jitter must be in [0, 1), got {jitter}")
    delay = min(_backoff(attempt, first, factor, max_interval), max_interval)
    return delay * (1.0 + jitter_fraction * (2.0 * jitter - 1.0))


def _backoff(attempt: int, first: float, factor: float, max_interval: float) -> float:
    steps = attempt - 1
    if factor > 1.0 and first > 0.0:
        # Decide the cap in log space: factor ** steps overflows a float for large attempts.
        if first >= max_interval or steps >= math.log(max_interval / first, factor):
            return max_interval
    return first * factor**steps

"""Exponential backoff: the one schedule for every retry and slow-down (deferred recipients,
webhook posts, failed SMTP AUTH).

Pure: the attempt number and the random draw for the jitter arrive as arguments, so the state
machine and tests get the same answer everywhere.
"""

from __future__ import annotations

import math


def next_retry_delay(
    attempt: int,
    *,
    first: float,
    max_interval: float,
    factor: float = 2.0,
    jitter_fraction: float = 0.0,
    jitter: float = 0.0,
) -> float:
    """Seconds to wait before retry number `attempt` (1-based).

    `first` for attempt 1, multiplied by `factor` per further attempt, capped at `max_interval`;
    then spread by +/- `jitter_fraction` using the caller's random draw `jitter` in [0, 1), so
    retries that failed together do not all come back at once.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    if first < 0 or max_interval < 0 or factor <= 0:
        raise ValueError("first and max_interval must be >= 0 and factor > 0")
    if not 0.0 <= jitter_fraction <= 1.0:
        raise ValueError(f"jitter_fraction must be in [0, 1], got {jitter_fraction}")
    if not 0.0 <= jitter < 1.0:
        raise ValueError(f"jitter must be in [0, 1), got {jitter}")
    delay = min(_grown(attempt - 1, first, factor, max_interval), max_interval)
    return delay * (1.0 + jitter_fraction * (2.0 * jitter - 1.0))


def _grown(steps: int, first: float, factor: float, cap: float) -> float:
    """first * factor ** steps, or `cap` once that reaches it."""
    if first == 0.0:
        return 0.0
    if factor > 1.0 and (first >= cap or steps >= math.log(cap / first, factor)):
        # Decided in log space: factor ** steps overflows a float for large attempts.
        return cap
    return first * factor**steps

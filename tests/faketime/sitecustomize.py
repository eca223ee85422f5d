"""Imported at start by every node process the tests run under libfaketime: skewed_launch() in
tests/cluster.py puts this directory first on PYTHONPATH.

Such a node fakes only its wall clock (FAKETIME_DONT_FAKE_MONOTONIC=1), as a machine whose clock
is off would. libfaketime 0.9.10 (Debian 12) still converts the absolute CLOCK_MONOTONIC deadline
that time.sleep hands to clock_nanosleep as if that clock were faked, so every time.sleep fails
with EINVAL (a pysyncobj tick thread waiting for its port then dies). A lock wait times out on the
same true monotonic clock (sem_clockwait, which libfaketime leaves alone): where the real
time.sleep fails, time.sleep becomes one. Nothing changes where it works."""
from __future__ import annotations

import threading
import time


def _lock_sleep(seconds: float) -> None:
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    deadline = time.monotonic() + seconds
    lock = threading.Lock()
    lock.acquire()
    while True:  # the lock is never released: each acquire waits out its timeout
        left = deadline - time.monotonic()
        if left <= 0:
            return
        lock.acquire(timeout=min(left, threading.TIMEOUT_MAX))


try:
    time.sleep(0.0001)
except OSError:
    time.sleep = _lock_sleep

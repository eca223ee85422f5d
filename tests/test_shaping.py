"""Adaptive backoff in the state machine: throttling replies noted by reports, the leader's steps
(lowered limits, suspension, recovery) committed as commands, and kept by snapshots."""
from __future__ import annotations

import pytest

from raftmail.consensus.shaping import BackoffPolicy, is_throttle, limits_at, next_step
from test_state import T0, assign_cmd, outcome, queued_state, report_cmd, restored, run

pytestmark = pytest.mark.timeout(60)

POLICY = BackoffPolicy(step_seconds=10, suspend_level=2, suspend_seconds=60, recover_after=2, recover_seconds=5)


@pytest.mark.parametrize("code, enhanced, text, throttle", [
    (421, None, "4.7.0 Try again later, closing connection", True),
    (451, "4.7.28", "Our system has detected an unusual rate of unsolicited mail", True),
    (421, None, "4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred", True),
    (451, "4.7.500", "Server busy. Please try again later", True),
    # One mailbox receiving too fast (Gmail's 4.2.1): that recipient waits, the domain does not.
    (450, "4.2.1", "The user you are trying to contact is receiving mail at a rate that prevents", False),
    (451, "4.3.0", "Temporary local problem", False),
    (450, "4.2.0", "Greylisted, see https://example.test", False),
    (550, "5.7.1", "rate limit exceeded, message refused", False),  # permanent: a bounce, not a throttle
    (0, None, "connection refused", False),
])
def test_throttling_replies_are_told_from_other_deferrals(code, enhanced, text, throttle) -> None:
    assert is_throttle(code, enhanced, text) is throttle


def test_limits_halve_per_level_and_never_reach_zero() -> None:
    assert limits_at(10, 600, 0) == (10, 600)
    assert limits_at(10, 600, 1) == (5, 300)
    assert limits_at(10, 600, 5) == (1, 18)
    assert limits_at(3, 0, 4) == (1, 0)  # an unlimited rate stays unlimited


def step(state, now: float) -> dict | None:
    """What a leader would propose now, applied."""
    decided = next_step(state.backoff["x.test"], now, POLICY)
    if decided is None:
        return None
    level, until, reason = decided
    return run(state, {"op": "backoff", "domain": "x.test", "now": now, "level": level,
                       "suspended_until": until, "reason": reason})


def test_throttles_slow_then_suspend_then_clean_replies_recover() -> None:
    state = queued_state([f"r{i}@x.test" for i in range(12)])
    bid = run(state, assign_cmd("mx-a", "x.test", [("s1", i) for i in range(3)], T0))["batch"]
    run(state, report_cmd("mx-a", bid, T0 + 1, [outcome("s1", i, 421, None, "4.7.0 Try again later", T0 + 100)
                                                 for i in range(3)]))
    assert state.backoff["x.test"].throttles == 3 and state.backoff["x.test"].level == 0
    assert step(state, T0 + 1) == {"level": 1, "suspended_until": 0.0}
    assert "421 4.7.0 Try again later" in state.backoff["x.test"].reason
    assert step(state, T0 + 2) is None  # no new throttle
    # Another throttle within step_seconds waits; after it, the domain is suspended (level 2).
    bid = run(state, assign_cmd("mx-a", "x.test", [("s1", 3)], T0 + 3))["batch"]
    run(state, report_cmd("mx-a", bid, T0 + 4, [outcome("s1", 3, 421, None, "4.7.0 Try again later", T0 + 100)]))
    assert step(state, T0 + 5) is None
    assert step(state, T0 + 12) == {"level": 2, "suspended_until": T0 + 72}
    # Suspended: the state refuses to assign, whatever limits the proposer sends.
    assert run(state, assign_cmd("mx-a", "x.test", [("s1", 4)], T0 + 20))["reason"] == "suspended"
    assert restored(state).backoff == state.backoff and restored(state).digest() == state.digest()
    # Clean deliveries after the suspension step the level back down, one step per recover_seconds.
    for n, at in enumerate((T0 + 80, T0 + 81)):
        bid = run(state, assign_cmd("mx-a", "x.test", [("s1", 5 + 2 * n), ("s1", 6 + 2 * n)], at))["batch"]
        run(state, report_cmd("mx-a", bid, at, [outcome("s1", 5 + 2 * n, 250), outcome("s1", 6 + 2 * n, 250)]))
        if n == 0:
            assert step(state, at) == {"level": 1, "suspended_until": 0.0}
    assert step(state, T0 + 82) is None  # recover_seconds not yet passed since the last step
    assert step(state, T0 + 86) == {"level": 0}
    assert "x.test" not in state.backoff


def test_with_no_mail_to_count_a_quiet_domain_steps_up_after_a_few_quiet_periods() -> None:
    state = queued_state(["a@x.test"])
    run(state, {"op": "backoff", "domain": "x.test", "now": T0, "level": 2, "suspended_until": 0, "reason": "421"})
    assert step(state, T0 + 6) is None  # one recover_seconds, no clean replies: not yet
    assert step(state, T0 + 15) == {"level": 1, "suspended_until": 0.0}


def test_throttles_of_sends_in_flight_when_a_suspension_began_are_not_held_against_the_time_after() -> None:
    state = queued_state(["a@x.test", "b@x.test"])
    bid = run(state, assign_cmd("mx-a", "x.test", [("s1", 0), ("s1", 1)], T0))["batch"]
    run(state, {"op": "backoff", "domain": "x.test", "now": T0, "level": 2, "suspended_until": T0 + 60,
                "reason": "421 busy"})
    run(state, report_cmd("mx-a", bid, T0 + 1, [outcome("s1", 0, 421, None, "busy", T0 + 100)]))
    assert state.backoff["x.test"].throttles == 0
    # Not suspended again for it: quiet since the step, the domain steps back up.
    assert step(state, T0 + 61) == {"level": 1, "suspended_until": 0.0}


def test_a_backoff_command_is_checked() -> None:
    state = queued_state(["a@x.test"])
    res = run(state, {"op": "backoff", "domain": "x.test", "now": T0, "level": 99, "suspended_until": 0,
                      "reason": ""})
    assert res.get("refused") or "error" in res

"""The state machine's side of clock-free leases: incarnations, renewal counters, expiry that
loses to a renewal, maybe-delivered bounded, and max_age for recipients that are still waiting."""
from __future__ import annotations

import time

import pytest

from raftmail.consensus.state import MailState
from raftmail.node.leases import LeaseClock
from test_state import (DAY, T0, assert_counts_match, assert_leases_consistent, assign_cmd, outcome,
                        queued_state, report_cmd, restored, run, state_of)

pytestmark = pytest.mark.timeout(60)


def incarnate(node: str, incarnation: str, now: float = T0) -> dict:
    return {"op": "incarnate", "node": node, "incarnation": incarnation, "now": now}


def test_batches_are_leased_to_the_announced_incarnation() -> None:
    state = queued_state(["a@x.test", "b@x.test"])
    run(state, incarnate("mx-a", "i1"))
    run(state, assign_cmd("mx-a", "x.test", [("s1", 0), ("s1", 1)], T0 + 1))
    assert state.batches["b1"].incarnation == "i1"
    # Another incarnation of the holder may not renew it.
    assert run(state, {"op": "renew", "batch": "b1", "node": "mx-a", "incarnation": "i0"}) == {"ok": False}
    assert run(state, {"op": "renew", "batch": "b1", "node": "mx-a", "incarnation": "i1"}) == \
        {"ok": True, "leased": ["b1", 1]}


def test_a_new_incarnation_gives_back_its_previous_processs_batches_counted() -> None:
    state = queued_state(["a@x.test", "b@x.test", "c@y.test"])
    run(state, incarnate("mx-a", "i1"))
    run(state, incarnate("mx-b", "j1"))
    run(state, assign_cmd("mx-a", "x.test", [("s1", 0), ("s1", 1)], T0 + 1))
    run(state, assign_cmd("mx-b", "y.test", [("s1", 2)], T0 + 1))
    run(state, report_cmd("mx-a", "b1", T0 + 2, [outcome("s1", 0, 250)]))
    res = run(state, incarnate("mx-a", "i2", T0 + 3))
    assert res == {"ok": True, "abandoned": ["b1"], "returned": 1}
    assert [state_of(state, "s1", i) for i in range(3)] == ["delivered", "pending", "in_flight"]
    assert state.stats["reassigned_in_flight"] == 1 and state.stats["batches_abandoned"] == 1
    assert "b2" in state.batches  # another node's batch is untouched
    # The same incarnation announced again (a retried proposal) gives back nothing more.
    run(state, assign_cmd("mx-a", "x.test", [("s1", 1)], T0 + 4))
    assert run(state, incarnate("mx-a", "i2", T0 + 5))["abandoned"] == []
    # abandon names the caller's incarnation: its own current batch is never given back.
    assert run(state, {"op": "abandon", "batch": "b3", "node": "mx-a", "incarnation": "i2", "now": T0 + 6}) == \
        {"abandoned": 0}
    assert restored(state).digest() == state.digest()
    assert_leases_consistent(state)


def test_expire_loses_to_a_renewal_committed_after_the_leader_looked() -> None:
    state = queued_state(["a@x.test"])
    run(state, assign_cmd("mx-a", "x.test", [("s1", 0)], T0 + 1, lease=30))
    run(state, {"op": "renew", "batch": "b1", "node": "mx-a"})
    assert run(state, {"op": "expire", "now": T0 + 99, "batches": [["b1", 0], ["nope", 0]]}) == \
        {"expired": [], "returned": 0}
    assert state.stats["lease_expiries"] == 0
    assert run(state, {"op": "expire", "now": T0 + 99, "batches": [["b1", 1]]}) == {"expired": ["b1"], "returned": 1}
    assert state_of(state, "s1", 0) == "pending"


def test_maybe_delivered_is_counted_and_bounded() -> None:
    state = queued_state(["a@x.test", "b@x.test"])
    for attempt in range(1, 4):
        bid = run(state, assign_cmd("mx-a", "x.test", [("s1", 0), ("s1", 1)], T0 + attempt * 100))["batch"]
        rows = [outcome("s1", 0, 0, None, "ambiguous: no reply to the final dot", T0 + attempt * 100 + 50) + ["", True],
                outcome("s1", 1, 0, None, "connection refused", T0 + attempt * 100 + 50) + ["", False]]
        run(state, {**report_cmd("mx-a", bid, T0 + attempt * 100 + 1, rows), "max_maybe": 3})
    a, b = state.recipient("s1", 0), state.recipient("s1", 1)
    assert a["state"] == "expired" and a["maybe_delivered"] == 3 and a["text"].startswith("maybe delivered 3 times")
    assert b["state"] == "deferred" and b["maybe_delivered"] == 0
    assert state.stats["maybe_delivered"] == 3
    # A malformed flag is refused whole.
    bid = run(state, assign_cmd("mx-a", "x.test", [("s1", 1)], T0 + 1000))["batch"]
    bad = run(state, {**report_cmd("mx-a", bid, T0 + 1001, [outcome("s1", 1, 250) + ["", "yes"]]), "max_maybe": 3})
    assert "error" in bad and state_of(state, "s1", 1) == "in_flight"
    assert_counts_match(state)


def test_waiting_recipients_past_max_age_expire_with_a_reason() -> None:
    state = queued_state(["a@x.test", "b@x.test", "c@x.test"])
    run(state, assign_cmd("mx-a", "x.test", [("s1", 0)], T0 + 1))
    run(state, report_cmd("mx-a", "b1", T0 + 2, [outcome("s1", 0, 451, None, "later", T0 + 60)]))
    run(state, assign_cmd("mx-a", "x.test", [("s1", 1)], T0 + 3))  # in flight: left to its batch
    assert state.expire_unsent(T0 + DAY, 2 * DAY, 10) == []
    assert run(state, {"op": "expire_unsent", "now": T0 + DAY, "max_age": 2 * DAY}) == {"expired": 0}
    assert run(state, {"op": "expire_unsent", "now": T0 + 3 * DAY, "max_age": 2 * DAY}) == {"expired": 2}
    assert [state_of(state, "s1", i) for i in range(3)] == ["expired", "in_flight", "expired"]
    assert "max_age" in state.recipient("s1", 2)["text"]
    assert [e[2] for e in state.events][-2:] == ["expired", "expired"]
    assert_leases_consistent(state)


def test_lease_clock_counts_from_the_last_applied_renewal_and_stays_bounded() -> None:
    clock = LeaseClock(max_tracked=3)
    clock.observe([{"batch": "b1", "n": 1, "leased": ["b1", 0]}, {"ok": True, "leased": ["b1", 1]}, {"ok": False}])
    n, at = clock.applied_at("b1")
    assert n == 1 and at <= time.monotonic()
    clock.applied("b1", 0, at + 50)  # an older count never moves the clock
    assert clock.applied_at("b1") == (1, at)
    # A batch never seen applied (it came in a snapshot) counts from now: late, never early.
    assert clock.since("b9", 4, 1000.0) == 0.0 and clock.since("b9", 4, 1010.0) == 10.0
    for i in range(10):
        clock.applied(f"x{i}", 0, float(i))
    assert len(clock._applied) == 3
    clock.forget_except({"x9"})
    assert list(clock._applied) == ["x9"]


def test_the_snapshot_carries_leases_and_incarnations() -> None:
    state = MailState()
    state = queued_state(["a@x.test"])
    run(state, incarnate("mx-a", "i1"))
    run(state, assign_cmd("mx-a", "x.test", [("s1", 0)], T0 + 1, lease=45))
    run(state, {"op": "renew", "batch": "b1", "node": "mx-a"})
    copy = restored(state)
    b = copy.batches["b1"]
    assert (b.lease, b.renewals, b.incarnation) == (45, 1, "i1") and copy.incarnations == {"mx-a": "i1"}


def test_a_snapshot_and_commands_of_the_previous_schema_still_load() -> None:
    import zlib

    import msgpack
    state = queued_state(["a@x.test"])
    run(state, {"op": "assign", "node": "mx-a", "domain": "x.test", "now": T0 + 1, "lease_until": T0 + 31,
                "term": 1, "max_connections": 4, "max_per_minute": 0, "items": [["s1", 0]]})
    assert state.batches["b1"].lease == 30
    assert run(state, {"op": "expire", "now": T0 + 999}) == {"expired": [], "returned": 0}
    w = msgpack.unpackb(zlib.decompress(state.to_snapshot()), raw=False, strict_map_key=False)
    w["schema"] = 1
    w.pop("incarnations")
    w["batches"] = [[b[0], b[1], b[2], b[3], T0 + 31, b[5], T0 + 1] for b in w["batches"]]
    old = MailState.from_snapshot(zlib.compress(msgpack.packb(w, use_bin_type=True)))
    b = old.batches["b1"]
    assert (b.lease, b.renewals, b.incarnation) == (30, 0, "") and old.schema == 2

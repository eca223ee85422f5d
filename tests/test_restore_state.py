"""The pure transformation a restore applies to a backed-up state."""
from __future__ import annotations

import pytest

from raftmail.consensus.restore import restored_state
from test_state import T0, assert_counts_match, assert_leases_consistent, assign_cmd, outcome, queued_state, \
    report_cmd, run, state_of

pytestmark = pytest.mark.timeout(60)


def test_in_flight_goes_back_to_the_queue_counted_and_the_rest_is_kept() -> None:
    state = queued_state(["a@x.test", "b@x.test", "c@y.test", "d@z.test"])
    run(state, {"op": "incarnate", "node": "mx-a", "incarnation": "i1", "now": T0})
    run(state, assign_cmd("mx-a", "x.test", [("s1", 0), ("s1", 1)], T0 + 1))
    run(state, assign_cmd("mx-a", "y.test", [("s1", 2)], T0 + 1))
    run(state, report_cmd("mx-a", "b1", T0 + 2, [outcome("s1", 0, 250)]))
    run(state, report_cmd("mx-a", "b2", T0 + 2, [outcome("s1", 2, 550, "5.1.1", "no such user")]))
    run(state, {"op": "member_add", "id": "n4", "raft": "127.0.0.1:1", "smtp": "127.0.0.1:2",
                "admin": "127.0.0.1:3", "now": T0})
    before = state.digest()

    new, returned = restored_state(state, T0 + 10)
    assert state.digest() == before  # the backup's state is not changed
    assert returned == 1
    assert [state_of(new, "s1", i) for i in range(4)] == ["delivered", "pending", "bounced", "pending"]
    assert new.batches == {} and new.site_batches == {} and new.members == {} and new.incarnations == {}
    assert new.stats["reassigned_in_flight"] == state.stats["reassigned_in_flight"] + 1
    assert new.suppressed == state.suppressed and "c@y.test" in new.suppressed
    assert new.campaigns.keys() == state.campaigns.keys()
    assert_counts_match(new)
    assert_leases_consistent(new)


def test_forced_recovery_keeps_the_survivor_removes_the_lost_members_and_counts_in_flight() -> None:
    from raftmail.consensus.restore import forced_state
    state = queued_state(["a@x.test", "b@x.test"])
    run(state, {"op": "incarnate", "node": "n2", "incarnation": "i1", "now": T0})
    run(state, assign_cmd("n2", "x.test", [("s1", 0), ("s1", 1)], T0 + 1))
    run(state, {"op": "member_add", "id": "n4", "raft": "127.0.0.1:1", "smtp": "127.0.0.1:2",
                "admin": "127.0.0.1:3", "now": T0})
    before = state.digest()
    me = {"raft": "127.0.0.1:10", "smtp": "127.0.0.1:11", "admin": "127.0.0.1:12"}
    lost = {"n2": {"raft": "127.0.0.1:20", "smtp": "127.0.0.1:21", "admin": "127.0.0.1:22"},
            "n4": {"raft": "127.0.0.1:1", "smtp": "127.0.0.1:2", "admin": "127.0.0.1:3"}}

    new, returned = forced_state(state, T0 + 10, "n1", me, lost)
    assert state.digest() == before
    assert returned == 2 and new.batches == {} and new.incarnations == {}
    assert [state_of(new, "s1", i) for i in range(2)] == ["pending", "pending"]
    assert new.stats["reassigned_in_flight"] == state.stats["reassigned_in_flight"] + 2
    assert new.members["n1"] == {**me, "status": "active"}
    assert {k: v["status"] for k, v in new.members.items()} == {"n1": "active", "n2": "removed", "n4": "removed"}
    assert_counts_match(new)
    assert_leases_consistent(new)

"""The state machine's submission rules and bounds: idempotency per (sender, Message-ID,
recipient), refusal of submissions to a cancelled campaign, body references, and count bounds on
finished submissions, archives, suppressions and idempotency keys with bounded work per command."""
from __future__ import annotations

import pytest

from raftmail.consensus import state as state_machine
from raftmail.consensus.state import MailState
from test_state import (BODY, DAY, HOUR, T0, assign_cmd, campaign_cmd, outcome, prune_cmd, report_cmd, restored,
                        run, state_of, submission, submit_cmd)

pytestmark = pytest.mark.timeout(120)


def deliver(state: MailState, sid: str, n: int, now: float, node: str = "mx-a") -> None:
    res = run(state, assign_cmd(node, "x.test", [(sid, i) for i in range(n)], now))
    run(state, report_cmd(node, res["batch"], now, [outcome(sid, i, 250) for i in range(n)]))


# ----------------------------------------------------------------------------- idempotency


def test_a_new_transaction_with_the_same_key_queues_only_new_recipients() -> None:
    state = MailState()
    assert run(state, submit_cmd(T0, submission("s1", ["a@x.test"], key="k"))) == [["ok", "s1"]]
    # The client's next transaction after a 452 for too many recipients: same message, c@ added.
    assert run(state, submit_cmd(T0 + 1, submission("s2", ["a@x.test", "c@x.test"], key="k"))) \
        == [["ok", "s2", 1, 1]]
    assert state.submissions["s2"].rcpts == ["c@x.test"]
    assert state.queue_counts()["pending"] == 2
    # A true retry (same recipients, any case) queues nothing.
    assert run(state, submit_cmd(T0 + 2, submission("s3", ["C@X.test"], key="k"))) == [["duplicate", "s2"]]
    assert run(state, submit_cmd(T0 + 3, submission("s4", ["a@x.test", "c@x.test"], key="k"))) \
        == [["duplicate", "s2"]]
    assert "s3" not in state.submissions and "s4" not in state.submissions
    assert state.queue_counts()["pending"] == 2
    # Another key (another sender, or another Message-ID) is another message.
    assert run(state, submit_cmd(T0 + 4, submission("s5", ["a@x.test"], key="k2"))) == [["ok", "s5"]]
    assert state.dedupe_size == 3
    assert restored(state).digest() == state.digest()
    assert restored(state).dedupe_size == 3


def test_two_transactions_with_one_key_in_one_group_commit() -> None:
    state = MailState()
    res = run(state, submit_cmd(T0, submission("s1", ["a@x.test", "b@x.test"], key="k"),
                                submission("s2", ["b@x.test", "c@x.test"], key="k"),
                                submission("s3", ["c@x.test"], key="k")))
    assert res == [["ok", "s1"], ["ok", "s2", 1, 1], ["duplicate", "s2"]]
    assert state.queue_counts()["pending"] == 3


def test_the_key_table_is_bounded_by_count_oldest_forgotten_first() -> None:
    state = MailState()
    for i in range(10):
        cmd = submit_cmd(T0 + i, submission(f"s{i}", [f"r{i}@x.test", f"q{i}@x.test"], key=f"k{i}"))
        cmd["max_dedupe"] = 7
        run(state, cmd)
        assert state.dedupe_size <= 7
    assert list(state.dedupe) == ["k7", "k8", "k9"]
    # A forgotten key is a new message again; a remembered one still a duplicate.
    assert run(state, submit_cmd(T0 + 20, submission("t0", ["r0@x.test"], key="k0")))[0][0] == "ok"
    assert run(state, submit_cmd(T0 + 20, submission("t9", ["r9@x.test"], key="k9")))[0][0] == "duplicate"


def test_prune_forgets_expired_keys_a_bounded_number_per_command() -> None:
    state = MailState()
    n = state_machine.MAX_PRUNE_PER_COMMAND + 10
    for i in range(0, n, 1000):
        run(state, submit_cmd(T0, *[submission(f"s{j}", ["a@x.test"], key=f"k{j}") for j in range(i, min(n, i + 1000))]))
    cmd = prune_cmd(T0 + 2 * HOUR)
    cmd["dedupe_window"] = HOUR
    assert run(state, cmd).get("more") is True
    assert len(state.dedupe) == 10
    assert "more" not in run(state, cmd)
    assert state.dedupe == {} and state.dedupe_size == 0


# ----------------------------------------------------------------------------- cancelled campaigns


def test_a_submission_to_a_cancelled_campaign_is_refused_and_changes_nothing() -> None:
    state = MailState()
    run(state, submit_cmd(T0, submission("s1", ["a@x.test"], campaign="promo")))
    run(state, campaign_cmd("cancel", "promo", T0 + 1))
    counts = state.queue_counts()
    res = state.apply({"op": "submit", "now": T0 + 2, "window": HOUR, "max_queued": 100,
                       "subs": [submission("s2", ["b@x.test"], campaign="promo", key="k")]})
    assert res == [["cancelled", "promo"]]
    assert "s2" not in state.submissions and "k" not in state.dedupe
    assert state.stats["cancelled_refused"] == 1
    assert state.queue_counts() == counts and list(state.campaigns["promo"].submissions) == ["s1"]
    # Another campaign is not affected.
    assert run(state, submit_cmd(T0 + 3, submission("s3", ["b@x.test"], campaign="receipts"))) == [["ok", "s3"]]


# ----------------------------------------------------------------------------- bounds


def test_body_references_count_live_submissions_only() -> None:
    state = MailState()
    run(state, submit_cmd(T0, submission("s1", ["a@x.test"]), submission("s2", ["b@x.test"])))
    assert state.body_refs == {BODY: 2}
    deliver(state, "s1", 1, T0 + 1)
    run(state, prune_cmd(T0 + HOUR + 2))
    assert "s1" in state.archived and state.body_refs == {BODY: 1}
    deliver(state, "s2", 1, T0 + HOUR + 3, node="mx-b")
    run(state, prune_cmd(T0 + 3 * HOUR))
    assert state.body_refs == {}
    # The same bytes submitted again are referenced again, though archives hold the digest too.
    run(state, submit_cmd(T0 + 3 * HOUR, submission("s3", ["c@x.test"])))
    assert state.body_refs == {BODY: 1}
    assert restored(state).body_refs == state.body_refs


def test_a_reused_campaign_id_does_not_grow_with_history() -> None:
    state = MailState()
    for i in range(50):
        now = T0 + i * DAY
        run(state, submit_cmd(now, submission(f"s{i}", ["a@x.test"], campaign="weekly")))
        deliver(state, f"s{i}", 1, now + 1)
        run(state, prune_cmd(now + 2, retention=0, archive_retention=DAY + 10))
    camp = state.campaigns["weekly"]
    assert len(camp.submissions) <= 3 and len(state.archived) <= 3
    assert state.campaign_summary(camp)["submissions"] == 50
    assert restored(state).digest() == state.digest()


def test_finished_and_archived_bounds_count_recipients() -> None:
    state = MailState()
    for i in range(4):
        rcpts = [f"r{i}-{k}@x.test" for k in range(5)]
        run(state, submit_cmd(T0 + i, submission(f"s{i}", rcpts)))
        deliver(state, f"s{i}", 5, T0 + i)
    assert state.finished_rcpts == 20
    run(state, {**prune_cmd(T0 + 5, retention=DAY), "max_finished": 12, "max_archived": 6})
    assert list(state.finished) == ["s2", "s3"] and state.finished_rcpts == 10
    assert list(state.archived) == ["s1"] and state.archived_rcpts == 5
    assert restored(state).digest() == state.digest()


def test_count_bounds_on_finished_archived_and_suppressed() -> None:
    state = MailState()
    bounds = {"max_finished": 3, "max_archived": 4, "max_suppressed": 2}
    for i in range(10):
        run(state, submit_cmd(T0 + i, submission(f"s{i}", [f"r{i}@x.test"])))
        res = run(state, assign_cmd("mx-a", "x.test", [(f"s{i}", 0)], T0 + i))
        run(state, report_cmd("mx-a", res["batch"], T0 + i, [outcome(f"s{i}", 0, 550, "5.1.1")]))
        run(state, {**prune_cmd(T0 + i, retention=DAY, archive_retention=30 * DAY), **bounds})
    assert list(state.finished) == ["s7", "s8", "s9"]
    assert list(state.archived) == ["s3", "s4", "s5", "s6"]
    assert list(state.suppressed) == ["r8@x.test", "r9@x.test"]
    assert state.queue_counts()["bounced"] == 7
    assert restored(state).digest() == state.digest()


def test_prune_work_is_bounded_per_command_and_finishes_over_several() -> None:
    state = MailState()
    n = state_machine.MAX_PRUNE_PER_COMMAND + 500
    for i in range(0, n, 1000):
        run(state, submit_cmd(T0, *[submission(f"s{j}", ["a@x.test"]) for j in range(i, min(n, i + 1000))]))
    sids = list(state.submissions)
    for i in range(0, n, 1000):
        chunk = [(sid, 0) for sid in sids[i:i + 1000]]
        bid = state.apply(assign_cmd("mx-a", "x.test", chunk, T0 + 1, max_connections=100))["batch"]
        state.apply(report_cmd("mx-a", bid, T0 + 2, [outcome(sid, 0, 250) for sid, _ in chunk]))
    first = state.apply(prune_cmd(T0 + 2 * HOUR))
    assert first == {"archived": state_machine.MAX_PRUNE_PER_COMMAND, "dropped": 0, "more": True}
    assert state.apply(prune_cmd(T0 + 2 * HOUR)) == {"archived": 500, "dropped": 0}
    assert state.submissions == {} and len(state.archived) == n


def test_old_snapshots_without_the_new_records_load_the_same_on_every_replica() -> None:
    import msgpack
    import zlib
    state = MailState()
    run(state, submit_cmd(T0, submission("s1", ["a@x.test"], key="k"), submission("s0", ["b@x.test", "c@x.test"])))
    run(state, assign_cmd("mx-a", "x.test", [("s0", 0), ("s0", 1)], T0 + 1))
    run(state, report_cmd("mx-a", "b1", T0 + 1, [outcome("s0", 0, 250), outcome("s0", 1, 250)]))
    run(state, prune_cmd(T0 + 2, retention=0))
    deliver(state, "s1", 1, T0 + 3)
    assert state.archived_rcpts == 2
    w = msgpack.unpackb(zlib.decompress(state.to_snapshot()), raw=False, strict_map_key=False)
    del w["finished"]
    w["dedupe"] = {k: v[:2] for k, v in w["dedupe"].items()}  # [submission id, accepted_at]
    w["campaigns"] = [c[:6] for c in w["campaigns"]]
    w["archived"] = {k: v[:4] for k, v in w["archived"].items()}
    old = MailState.from_snapshot(zlib.compress(msgpack.packb(w, use_bin_type=True)))
    assert list(old.finished) == ["s1"] and old.body_refs == {BODY: 1}
    assert old.archived_rcpts == 2 and old.finished_rcpts == 1
    assert old.apply(submit_cmd(T0 + 2, submission("s2", ["b@x.test"], key="k"))) == [["duplicate", "s1"]]
    assert state_of(old, "s1", 0) == "delivered"

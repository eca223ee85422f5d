"""The state machine's invariants after every command, and what happens when applying one is a bug
(an unexpected exception, not a refusal)."""
from __future__ import annotations

import logging
import urllib.request
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster import run_cli
from raftmail.cli.render import print_status
from raftmail.consensus import state as state_module
from raftmail.consensus.commands import Report, ReportRow, is_refusal
from raftmail.consensus.outcomes import STATE_NAMES, judge_reply
from raftmail.consensus.domains import domain_of
from raftmail.consensus.state import MailState, encode_command
from test_state import (DAY, PROPERTY_SETTINGS, T0, TIME_STEPS, any_step, assert_counts_match,
                        assert_leases_consistent, assign_cmd, core_digest, hints, member_cmd, queued_state,
                        run)

pytestmark = pytest.mark.timeout(120)


def assert_invariants(state: MailState) -> None:
    """Counts per state equal the recount from each recipient's state (cluster, campaign and
    submission); every in-flight recipient is held by exactly one batch and site_batches matches
    the batches; the open index lists exactly the submissions with recipients waiting; and no
    command so far hit a bug."""
    assert_counts_match(state)
    assert_leases_consistent(state)
    for sid, sub in state.submissions.items():
        per_state = Counter(sub.states)
        assert sub.counts == [per_state.get(i, 0) for i in range(len(STATE_NAMES))], sid
    assert set(state.open) == {sid for sid, sub in state.submissions.items() if sub.waiting()}
    assert state.stats.get("apply_errors", 0) == 0
    # The derived indexes and counters equal a recount.
    assert set(state.finished) == {sid for sid, sub in state.submissions.items() if sub.finished_at is not None}
    for sid in state.finished:
        sub = state.submissions[sid]
        assert not sub.waiting() and not sub.counts[STATE_NAMES.index("in_flight")], sid
    assert state.finished_rcpts == sum(len(state.submissions[sid].rcpts) for sid in state.finished)
    assert state.archived_rcpts == sum(a.recipients for a in state.archived.values())
    assert state.body_refs == dict(Counter(sub.body for sub in state.submissions.values()))
    assert state.dedupe_size == sum(e.recipients() for e in state.dedupe.values())
    assert [e.seq for e in state.events] == list(range(state.event_seq - len(state.events) + 1, state.event_seq + 1))
    for sid, sub in state.submissions.items():
        for idx, detail in sub.detail.items():
            assert 0 <= idx < len(sub.rcpts), sid
            if sub.states[idx] == STATE_NAMES.index("deferred"):
                assert detail.next_at is not None
    assert_read_index_matches_recount(state)


def assert_read_index_matches_recount(state: MailState) -> None:
    """The read indexes kept in step as commands apply answer what a scan of every submission
    answers, and what indexes rebuilt from scratch (as after a snapshot load) answer."""
    ix = state.index
    active = {cid for cid, c in state.campaigns.items() if not (c.paused or c.cancelled)}
    pending = {(sid, i) for sid in state.open for i, s in enumerate(state.submissions[sid].states)
               if s == STATE_NAMES.index("pending") and state.submissions[sid].campaign in active}
    scheduled = {(sid, i) for sid, i in pending if state.submissions[sid].not_before is not None}
    assert {(sid, i) for sid, idxs in ix.ready.items() for i in idxs} == pending - scheduled
    assert {(sid, i) for sid, idxs in ix.scheduled.items() for i in idxs} == scheduled
    assert all(ix.ready.values()) and all(ix.scheduled.values())
    deferred = sorted((d.next_at, sid, i) for sid in state.open for i, d in state.submissions[sid].detail.items()
                      if state.submissions[sid].states[i] == STATE_NAMES.index("deferred")
                      and state.submissions[sid].campaign in active)
    assert [(d.next_at, d.submission, d.index) for d in ix.deferred_head(state, 10 ** 9)] == deferred
    assert set(ix.open_pos) == set(state.open)
    assert sorted(state.open, key=ix.open_pos.__getitem__) == list(state.open)  # the queue's order
    ages = [state.submissions[sid].accepted_at for sid in state.open]
    assert ix.oldest_waiting() == (min(ages) if ages else None)
    assert ix.node_batches == dict(Counter(b.node for b in state.batches.values()))
    rebuilt = MailState.from_snapshot(state.to_snapshot())
    for now in (T0, T0 + DAY, T0 + 60 * DAY):
        assert state.eligible(now, 10 ** 9) == rebuilt.eligible(now, 10 ** 9) == eligible_by_scan(state, now)
        for limit in (1, 3):
            got = state.eligible(now, limit)
            assert sum(map(len, got.values())) == min(limit, sum(map(len, eligible_by_scan(state, now).values())))
    assert rebuilt.index.oldest_waiting() == ix.oldest_waiting()
    assert rebuilt.index.node_batches == ix.node_batches


def eligible_by_scan(state: MailState, now: float) -> dict[str, list[list]]:
    """What the scheduler may assign at `now`, by a scan of every open submission."""
    out: dict[str, list[list]] = {}
    for sid in state.open:
        sub = state.submissions[sid]
        camp = state.campaigns[sub.campaign]
        if camp.paused or camp.cancelled or (sub.not_before is not None and sub.not_before > now):
            continue
        for idx, s in enumerate(sub.states):
            if s == STATE_NAMES.index("pending") or (s == STATE_NAMES.index("deferred")
                                                     and sub.detail[idx].next_at <= now):
                out.setdefault(domain_of(sub.rcpts[idx]), []).append([sid, idx])
    return out


@st.composite
def wild_report(draw, now: float, hint: dict) -> Report:
    """A report for a batch the state holds (when there is one) with any reply code, with or
    without a retry time: the rows the sender's rule allows, and the ones it does not."""
    bid, node, held = draw(st.sampled_from(hint["batches"] or [("b1", "n0", [["s0", 0]])]))
    rows = [ReportRow(sid, idx, draw(st.integers(-1, 999)), draw(st.sampled_from([None, "5.1.1", "4.2.0"])),
                      draw(st.sampled_from(["", "354 go ahead", "5.1.1 gone"])),
                      draw(st.sampled_from([None, now + 60, now + 10 * DAY])), "mx",
                      draw(st.booleans()))
            for sid, idx in draw(st.lists(st.sampled_from(held), min_size=1, max_size=3))]
    return Report(bid, node, now, DAY, rows, max_maybe=draw(st.sampled_from([None, 1, 3])))


@PROPERTY_SETTINGS
@given(data=st.data())
def test_invariants_hold_after_every_command_of_random_histories(data: st.DataObject) -> None:
    """Valid and invalid commands mixed: invariants hold after every one, nothing raises, and a
    refused command changes nothing but the refusal counter (and the applied counter)."""
    state = MailState()
    now = T0
    for _ in range(data.draw(st.integers(1, 40), label="commands")):
        now += data.draw(TIME_STEPS)
        hint = hints(state, now)
        if data.draw(st.integers(0, 7), label="wild report") == 0:
            blob = encode_command(data.draw(wild_report(now, hint)))
        else:
            kind, payload = data.draw(any_step(now, hint, invalid=True))
            blob = payload if kind == "blob" else encode_command(payload)
        before, refused, applied = core_digest(state, "commands_refused"), state.stats["commands_refused"], \
            state.applied
        result = state.apply_blob(blob)
        assert_invariants(state)
        assert state.applied >= applied + 1
        if is_refusal(result):
            assert core_digest(state, "commands_refused") == before, result
            assert state.stats["commands_refused"] == refused + 1 and state.applied == applied + 1


@settings(PROPERTY_SETTINGS, max_examples=150)
@given(code=st.integers(-1, 999), enhanced=st.sampled_from([None, "5.1.1", "5.7.1", "4.2.0", "2.0.0"]),
       text=st.sampled_from(["", "5.1.1 no such user", "4.7.1 try later", "2.0.0 ok", "354 go ahead"]))
def test_the_sender_and_the_state_machine_judge_a_reply_alike(code: int, enhanced: str | None, text: str) -> None:
    """The sender decides with judge_reply whether a row needs a retry time; the state machine
    re-checks the same row with the same rule: every reply code is accepted when the sender's rule
    was followed and ends in the verdict's state, and a deferral without a retry time is refused
    (never a bug), changing nothing."""
    state = queued_state(["a@x.test"])
    run(state, assign_cmd("mx-a", "x.test", [("s1", 0)], T0 + 1))
    verdict = judge_reply(code, enhanced, text)
    if verdict.deferred:
        before = core_digest(state, "commands_refused")
        bare = ReportRow("s1", 0, code, verdict.enhanced, text, None, "mx")
        assert "needs next_at" in run(state, Report("b1", "mx-a", T0 + 2, 5 * DAY, [bare]))["error"]
        assert core_digest(state, "commands_refused") == before
    row = ReportRow("s1", 0, code, verdict.enhanced, text, T0 + 60 if verdict.deferred else None, "mx")
    result = run(state, Report("b1", "mx-a", T0 + 2, 5 * DAY, [row]))
    assert result["accepted"] == 1, result
    assert state.recipient("s1", 0)["state"] == STATE_NAMES[verdict.state]
    assert ("a@x.test" in state.suppressed) == verdict.suppress
    assert_invariants(state)


def test_a_bug_in_apply_is_counted_apart_from_refusals_and_logged_with_the_command(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    state = queued_state(["a@x.test"])

    def broken(st: MailState, c: dict) -> dict:
        st.stats["half_done"] = 1  # changed before it raised, the same way on every replica
        raise KeyError("missing-index")
    monkeypatch.setitem(state_module._HANDLERS, "noop", broken)
    refused_before = state.stats["commands_refused"]
    with caplog.at_level(logging.ERROR, logger="raftmail.state"):
        result = run(state, {"op": "noop", "marker": "entry-7f3a"})
    assert result["error"].startswith("internal error: KeyError")
    assert state.stats["apply_errors"] == 1
    assert state.stats["commands_refused"] == refused_before
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "entry-7f3a" in record.getMessage() and record.exc_info is not None

    # A refusal stays a refusal: counted as one, not as a bug, and not logged at error level.
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="raftmail.state"):
        assert "error" in run(state, member_cmd("member_remove", "mx-unknown"))
    assert state.stats["commands_refused"] == refused_before + 1
    assert state.stats["apply_errors"] == 1
    assert not caplog.records


def test_a_bug_inside_a_group_is_counted_once_and_the_rest_of_the_group_applies(
        monkeypatch: pytest.MonkeyPatch) -> None:
    state = MailState()

    def broken(st: MailState, c: dict) -> dict:
        raise ZeroDivisionError("x")
    monkeypatch.setitem(state_module._HANDLERS, "noop", broken)
    results = run(state, {"op": "group", "cmds": [{"op": "noop"}, member_cmd("member_add", "n9")]})
    assert "internal error" in results[0]["error"] and results[1] == {"ok": True}
    assert state.stats["apply_errors"] == 1 and state.members["n9"]["status"] == "active"


def test_status_shows_apply_errors(capsys: pytest.CaptureFixture) -> None:
    view = {"cluster": "t", "leader": "n1", "in_quorum": 3, "majority": 2, "can_lose": 1, "nodes": [],
            "queue": {}, "stats": {"commands_refused": 4, "apply_errors": 2}}
    print_status(view)
    out = capsys.readouterr().out
    assert "commands refused: 4" in out and "apply errors: 2 (a bug: see the nodes' logs)" in out


@pytest.mark.cluster
@pytest.mark.timeout(90)
def test_apply_errors_are_a_metric_and_in_raftmail_status(make_cluster) -> None:
    c = make_cluster(3)
    leader = c.wait_leader()
    with urllib.request.urlopen(f"http://127.0.0.1:{c.admin[leader]}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert "# TYPE raftmail_apply_errors_total counter" in text
    assert "raftmail_apply_errors_total 0.0" in text
    r = run_cli(c.config_path, "status")
    assert "apply errors: 0" in r.stdout, r.stdout

"""The state machine's invariants after every command, and what happens when applying one is a bug
(an unexpected exception, not a refusal)."""
from __future__ import annotations

import logging
import urllib.request
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster import run_cli
from raftmail.cli.render import print_status
from raftmail.consensus import state as state_module
from raftmail.consensus.outcomes import STATE_NAMES
from raftmail.consensus.state import MailState, encode_command
from test_state import (PROPERTY_SETTINGS, T0, TIME_STEPS, any_step, assert_counts_match,
                        assert_leases_consistent, hints, member_cmd, queued_state, run)

pytestmark = pytest.mark.timeout(120)


def assert_invariants(state: MailState) -> None:
    """Counts per state equal the recount from each recipient's state (cluster, campaign and
    submission); every in-flight recipient is held by exactly one batch and domain_batches matches
    the batches; the open index lists exactly the submissions with recipients waiting; and no
    command so far hit a bug."""
    assert_counts_match(state)
    assert_leases_consistent(state)
    for sid, sub in state.submissions.items():
        per_state = Counter(sub.states)
        assert sub.counts == [per_state.get(i, 0) for i in range(len(STATE_NAMES))], sid
    assert set(state.open) == {sid for sid, sub in state.submissions.items() if sub.waiting()}
    assert state.stats.get("apply_errors", 0) == 0


@PROPERTY_SETTINGS
@given(data=st.data())
def test_invariants_hold_after_every_command_of_random_histories(data: st.DataObject) -> None:
    """Valid and invalid commands mixed: a refusal changes nothing, and nothing raises."""
    state = MailState()
    now = T0
    for _ in range(data.draw(st.integers(1, 40), label="commands")):
        now += data.draw(TIME_STEPS)
        kind, payload = data.draw(any_step(now, hints(state, now), invalid=True))
        state.apply_blob(payload if kind == "blob" else encode_command(payload))
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

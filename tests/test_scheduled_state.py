"""The replicated fields of API submissions, on the state machine alone: a send time that holds
recipients (judged by the proposer's `now`), a template submission's key standing for the whole
request, and snapshots with and without the new fields."""
from __future__ import annotations

import pytest

from raftmail.consensus.records import Submission
from raftmail.consensus.state import MailState
from test_state import BODY, HOUR, T0, assign_cmd, run, submit_cmd

pytestmark = pytest.mark.timeout(60)


def api_sub(sid: str, rcpts: list[str], *, not_before: float | None = None, template: int | None = 0,
            key: str | None = "k1") -> dict:
    sub = {"id": sid, "campaign": "spring", "sender": "news@shop.test", "body": BODY, "size": 100,
           "rcpts": rcpts}
    if key is not None:
        sub["key"] = key
    if not_before is not None:
        sub["not_before"] = not_before
    if template is not None:
        sub["template"] = template
    return sub


def test_recipients_wait_for_the_send_time_by_the_proposers_clock() -> None:
    st = MailState()
    assert run(st, submit_cmd(T0, api_sub("s1", ["a@x.test", "b@x.test"], not_before=T0 + HOUR))) == [["ok", "s1"]]
    assert st.eligible(T0 + HOUR - 1, 100) == {}
    # An assign proposed before the send time is refused item by item by the state itself.
    res = run(st, assign_cmd("n1", "x.test", [["s1", 0], ["s1", 1]], T0 + 10))
    assert res["batch"] is None
    assert st.eligible(T0 + HOUR, 100) == {"x.test": [["s1", 0], ["s1", 1]]}
    assert run(st, assign_cmd("n1", "x.test", [["s1", 0], ["s1", 1]], T0 + HOUR))["n"] == 2


def test_a_scheduled_submission_ages_from_its_send_time() -> None:
    st = MailState()
    run(st, submit_cmd(T0, api_sub("s1", ["a@x.test"], not_before=T0 + 5 * HOUR)))
    assert st.expire_unsent(T0 + 5 * HOUR, 2 * HOUR, 10) == []
    assert st.expire_unsent(T0 + 7 * HOUR + 1, 2 * HOUR, 10) == [["s1", 0]]


def test_a_template_key_stands_for_the_whole_request() -> None:
    st = MailState()
    run(st, submit_cmd(T0, api_sub("s1", ["a@x.test"])))
    # Same key, more recipients: a plain submission would queue b@; a template one queues nothing
    # (positions index the template's recipient data, so a subset would misalign them).
    assert run(st, submit_cmd(T0 + 1, api_sub("s2", ["a@x.test", "b@x.test"]))) == [["duplicate", "s1"]]
    assert set(st.submissions) == {"s1"}


def test_snapshots_keep_the_new_fields_and_older_ones_still_load() -> None:
    st = MailState()
    run(st, submit_cmd(T0, api_sub("s1", ["a@x.test"], not_before=T0 + 60, template=1000),
                       {"id": "s2", "campaign": "c", "sender": "n@shop.test", "body": BODY, "size": 1,
                        "rcpts": ["b@x.test"]}))
    back = MailState.from_snapshot(st.to_snapshot())
    assert (back.submissions["s1"].not_before, back.submissions["s1"].template) == (T0 + 60, 1000)
    assert (back.submissions["s2"].not_before, back.submissions["s2"].template) == (None, None)
    assert back.digest() == st.digest()
    # A record as an older release wrote it (no scope, no extras) loads with neither.
    old = st.submissions["s2"].to_wire()[:11]
    sub = Submission.from_wire(old)
    assert (sub.scope, sub.not_before, sub.template) == ("", None, None)
    assert len(st.submissions["s2"].to_wire()) == 11  # plain submissions are written as before


def test_a_bad_template_position_refuses_only_that_submission() -> None:
    st = MailState()
    res = run(st, submit_cmd(T0, api_sub("s1", ["a@x.test"], template=-1, key=None),
                             api_sub("s2", ["b@x.test"], key=None)))
    assert res[0][0] == "refused" and "template" in res[0][1]
    assert res[1] == ["ok", "s2"]

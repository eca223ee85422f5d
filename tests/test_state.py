"""The replicated state machine (consensus/state.py): determinism, refusals, the recipient life cycle.

Every command goes through `apply_blob(encode_command(...))`, the path Raft uses, and every step
checks that the cached counters still equal a recount over all recipients.
"""
from __future__ import annotations

import hashlib
import time
import zlib
from collections import Counter
from typing import Any, Iterator

import msgpack
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from raftmail.consensus.outcomes import DEFERRED, IN_FLIGHT, PENDING, STATE_NAMES
from raftmail.consensus.state import MailState, encode_command

pytestmark = pytest.mark.timeout(120)

HOUR = 3600.0
DAY = 86400.0
T0 = 1_700_000_000.0  # command time of the first submission in most tests
BODY = "ab" * 32  # a sha256-shaped body reference; bodies themselves never enter the state


# ----------------------------------------------------------------------------- command builders


def submission(sid: str, rcpts: list[str], campaign: str = "spring-sale", key: str | None = None,
               sender: str = "news@shop.test") -> dict:
    sub = {"id": sid, "campaign": campaign, "sender": sender, "body": BODY, "size": 2048,
           "rcpts": list(rcpts)}
    if key is not None:
        sub["key"] = key
    return sub


def submit_cmd(now: float, *subs: dict, window: float = HOUR, max_queued: int = 1_000_000) -> dict:
    return {"op": "submit", "now": now, "window": window, "max_queued": max_queued, "subs": list(subs)}


def assign_cmd(node: str, domain: str, items: list, now: float, *, lease: float = 300.0,
               max_connections: int = 4, max_per_minute: int = 0, term: int = 1) -> dict:
    return {"op": "assign", "node": node, "domain": domain, "now": now, "lease": lease,
            "term": term, "max_connections": max_connections, "max_per_minute": max_per_minute,
            "items": [list(i) for i in items]}


def outcome(sid: str, idx: int, code: int, enhanced: str | None = None, text: str = "",
            next_at: float | None = None) -> list:
    return [sid, idx, code, enhanced, text, next_at]


def report_cmd(node: str, batch: str, now: float, results: list, release: list | None = None,
               max_age: float = 5 * DAY) -> dict:
    return {"op": "report", "node": node, "batch": batch, "now": now, "max_age": max_age,
            "results": results, "release": release or []}


def campaign_cmd(op: str, campaign: str, now: float = T0) -> dict:
    return {"op": op, "campaign": campaign, "now": now}


def member_cmd(op: str, nid: str) -> dict:
    return {"op": op, "id": nid, "raft": f"{nid}:7000", "smtp": f"{nid}:2525", "admin": f"{nid}:8080"}


def prune_cmd(now: float, retention: float = HOUR, archive_retention: float = 30 * DAY) -> dict:
    return {"op": "prune", "now": now, "retention": retention, "archive_retention": archive_retention}


# ----------------------------------------------------------------------------- checks


def all_recipients(state: MailState) -> Iterator[tuple[str, int]]:
    """(campaign, state) of every recipient: live ones, and the final states of archived ones."""
    for sid, _, _, rstate in state.iter_recipients():
        yield state.submissions[sid].campaign, rstate
    for campaign, _, blob, *_ in state.archived.values():
        _, states = msgpack.unpackb(zlib.decompress(blob), raw=False)
        for rstate in states:
            yield campaign, rstate


def recount(state: MailState, campaign: str | None = None) -> dict[str, int]:
    """Recipients per state name, counted from scratch (for one campaign, or all)."""
    seen = Counter(STATE_NAMES[s] for c, s in all_recipients(state) if campaign in (None, c))
    return {name: seen.get(name, 0) for name in STATE_NAMES}


def assert_counts_match(state: MailState) -> None:
    assert state.queue_counts() == recount(state)
    for cid, camp in state.campaigns.items():
        assert state.campaign_summary(camp)["counts"] == recount(state, cid)


def assert_leases_consistent(state: MailState) -> None:
    """Every in-flight recipient is held by exactly one batch, and every held item is in flight."""
    held = Counter(item for b in state.batches.values() for item in b.items)
    assert all(n == 1 for n in held.values()), "an item is held by two batches"
    in_flight = {(sid, idx) for sid, idx, _, s in state.iter_recipients() if s == IN_FLIGHT}
    assert set(held) == in_flight
    per_domain = Counter(b.domain for b in state.batches.values())
    assert state.site_batches == dict(per_domain)


def assert_cancelled_campaigns_are_not_waiting(state: MailState) -> None:
    for camp in state.campaigns.values():
        if camp.cancelled:
            assert camp.counts[PENDING] == camp.counts[DEFERRED] == 0, camp.id


def run(state: MailState, command: Any) -> Any:
    """Apply a command the way Raft does (msgpack bytes) and check the counters afterwards."""
    result = state.apply_blob(encode_command(command))
    assert_counts_match(state)
    return result


def _is_compressed(blob: bytes) -> bool:
    try:
        zlib.decompress(blob)
    except zlib.error:
        return False
    return True


def snapshot_fields(state: MailState) -> dict:
    """The decoded snapshot (msgpack, zlib-compressed or not)."""
    blob = state.to_snapshot()
    if _is_compressed(blob):
        blob = zlib.decompress(blob)
    return msgpack.unpackb(blob, raw=False, strict_map_key=False)


def core_digest(state: MailState, *ignored_stats: str) -> str:
    """Digest of the state without the progress counter and the named statistics counters.

    A refused or fenced command may bump `applied` and its own counter, and nothing else.
    """
    snap = snapshot_fields(state)
    snap.pop("applied")
    for name in ignored_stats:
        snap["stats"][name] = 0
    return hashlib.sha256(msgpack.packb(snap, use_bin_type=True)).hexdigest()


def state_of(state: MailState, sid: str, idx: int) -> str:
    return state.recipient(sid, idx)["state"]


def restored(state: MailState) -> MailState:
    return MailState.from_snapshot(state.to_snapshot())


def queries(state: MailState, now: float) -> dict:
    """Everything a node reads from the state, in comparable form."""
    return {
        "eligible": state.eligible(now, 10_000),
        "eligible_later": state.eligible(now + 30 * DAY, 10_000),
        "counts": state.queue_counts(),
        "campaigns": [state.campaign_summary(c) for c in state.campaigns.values()],
        "recipients": [state.recipient(sid, idx) for sid, idx, _, _ in state.iter_recipients()],
        "batches": {n: [b.to_wire() for b in state.batches_for(n)]
                    for n in sorted({b.node for b in state.batches.values()} | {"mx-a", "mx-b"})},
        "members": state.members,
        "archived": sorted(state.archived),
        "suppressed": sorted(state.suppressed),
        "stats": dict(state.stats),
    }


# ----------------------------------------------------------------------------- a realistic history


def mixed_history() -> list[dict]:
    """Commands touching every handler: two campaigns, three domains, every outcome."""
    t = T0
    return [
        submit_cmd(t, submission("m1", ["ann@gmail.test", "bob@gmail.test", "cy@yahoo.test",
                                        "dee@corp.test"], key="k-m1")),
        submit_cmd(t + 1, submission("m2", ["eve@gmail.test", "fay@yahoo.test"], campaign="autumn")),
        {"op": "suppress", "address": "Fay@Yahoo.test", "reason": "complaint", "now": t + 2},
        assign_cmd("mx-a", "gmail.test", [("m1", 0), ("m1", 1), ("m2", 0)], t + 3),
        assign_cmd("mx-b", "yahoo.test", [("m1", 2), ("m2", 1)], t + 3),
        {"op": "renew", "node": "mx-a", "batch": "b1"},
        report_cmd("mx-a", "b1", t + 10, [outcome("m1", 0, 250, None, "2.0.0 ok"),
                                          outcome("m1", 1, 451, "4.7.1", "greylisted", t + 600),
                                          outcome("m2", 0, 550, "5.1.1", "no such user")]),
        {"op": "expire", "now": t + 400, "batches": [["b2", 0]]},  # the leader measured mx-b's lease out
        campaign_cmd("pause", "autumn", t + 401),
        assign_cmd("mx-a", "gmail.test", [("m1", 1)], t + 700),
        assign_cmd("mx-b", "yahoo.test", [("m1", 2)], t + 701),
        report_cmd("mx-b", "b4", t + 710, [outcome("m1", 2, 554, "5.7.1", "policy")]),
        campaign_cmd("resume", "autumn", t + 720),
        campaign_cmd("cancel", "spring-sale", t + 730),
        report_cmd("mx-a", "b3", t + 740, [outcome("m1", 1, 250)]),
        {"op": "unsuppress", "address": "fay@yahoo.test"},
        submit_cmd(t + 750, submission("m3", ["eve@gmail.test", "gus@corp.test"], campaign="autumn")),
        member_cmd("member_add", "mx-c"),
        member_cmd("member_leave", "mx-c"),
        assign_cmd("mx-c", "corp.test", [("m3", 1)], t + 760),  # refused: mx-c is leaving
        prune_cmd(t + 770, retention=30),  # archives m2, finished at t+10
        {"op": "noop"},
        {"op": "bogus"},
    ]


def test_replicas_fed_the_same_commands_agree() -> None:
    first, second = MailState(), MailState()
    for command in mixed_history():
        r1, r2 = run(first, command), run(second, command)
        assert r1 == r2
    assert first.digest() == second.digest()
    assert first.applied == len(mixed_history())
    # The history really exercised the machine: a digest of an idle state would prove nothing.
    counts = first.queue_counts()
    assert counts["delivered"] == 2 and counts["bounced"] == 2 and counts["suppressed"] == 2
    assert counts["cancelled"] == 1 and counts["pending"] == 1
    assert set(first.archived) == {"m2"}
    assert first.digest() != MailState().digest()


def test_different_histories_give_different_digests() -> None:
    a, b = MailState(), MailState()
    history = mixed_history()
    for command in history:
        run(a, command)
    for command in history[:-2]:
        run(b, command)
    assert a.digest() != b.digest()


@pytest.mark.parametrize("split", [0, 3, 7, 12, 20, len(mixed_history())])
def test_snapshot_round_trip_keeps_digest_queries_and_future(split: int) -> None:
    history = mixed_history()
    original = MailState()
    for command in history[:split]:
        run(original, command)
    copy = restored(original)
    assert copy.digest() == original.digest()
    now = T0 + 800
    assert queries(copy, now) == queries(original, now)
    # The copy must evolve exactly like the original from here on.
    tail = history[split:] + [
        {"op": "expire", "now": T0 + 5000},
        assign_cmd("mx-b", "corp.test", [("m1", 3), ("m3", 1)], T0 + 5001),
        report_cmd("mx-b", "b5", T0 + 5002, [outcome("m3", 1, 421, None, "busy", T0 + 6000)]),
    ]
    for command in tail:
        assert run(copy, command) == run(original, command)
        assert copy.digest() == original.digest()
    assert state_of(copy, "m3", 1) == "deferred"  # the tail did real work on both
    assert queries(copy, T0 + 7000) == queries(original, T0 + 7000)


def test_reads_do_not_change_the_replicated_state() -> None:
    state = MailState()
    for command in mixed_history():
        run(state, command)
    before = state.digest()
    for now in (T0, T0 + 800, T0 + 30 * DAY):
        queries(state, now)
        state.events_after(0, 1000)
    assert state.digest() == before


def test_snapshot_of_another_schema_is_rejected() -> None:
    good = MailState().to_snapshot()
    snap = snapshot_fields(MailState())
    snap["schema"] = 999
    bad = msgpack.packb(snap, use_bin_type=True)
    if _is_compressed(good):
        bad = zlib.compress(bad, 1)  # same framing as a real snapshot, so only the schema is wrong
    assert MailState.from_snapshot(good).digest() == MailState().digest()
    with pytest.raises(ValueError):
        MailState.from_snapshot(bad)


# ----------------------------------------------------------------------------- refusals


def busy_state() -> MailState:
    """A state with queued, in-flight and deferred recipients and a dedupe key."""
    state = MailState()
    run(state, submit_cmd(T0, submission("s1", ["a@x.test", "b@x.test", "c@y.test"], key="k1")))
    run(state, assign_cmd("mx-a", "x.test", [("s1", 0), ("s1", 1)], T0 + 1))
    run(state, report_cmd("mx-a", "b1", T0 + 2, [outcome("s1", 1, 451, None, "later", T0 + 60)]))
    return state


GARBAGE_BLOBS = [b"", b"\xc1", b"\x92\x01", b"\xde\xad\xbe\xef", b"\x81\xa2op", bytes(range(40))]

BAD_COMMANDS: list[tuple[str, Any]] = [
    ("unknown op", {"op": "launch"}),
    ("no op", {"now": T0}),
    ("op not a string", {"op": 7}),
    ("empty dict", {}),
    ("int", 42),
    ("none", None),
    ("list", ["submit"]),
    ("string", "submit"),
    ("submit without now", {"op": "submit", "window": HOUR, "max_queued": 10,
                            "subs": [submission("s9", ["z@x.test"])]}),
    ("submit with string window", {**submit_cmd(T0, submission("s9", ["z@x.test"])), "window": "1h"}),
    ("submit with bool now", {**submit_cmd(T0, submission("s9", ["z@x.test"])), "now": True}),
    ("submit with no subs", submit_cmd(T0)),
    ("submit with subs a dict", {**submit_cmd(T0), "subs": {"id": "s9"}}),
    ("submit with too many subs", submit_cmd(T0, *[submission(f"s{i}", ["z@x.test"]) for i in range(1001)])),
    ("assign without node", {k: v for k, v in assign_cmd("mx-a", "y.test", [("s1", 2)], T0 + 5).items()
                             if k != "node"}),
    ("assign with int domain", {**assign_cmd("mx-a", "y.test", [("s1", 2)], T0 + 5), "domain": 5}),
    ("assign with empty items", assign_cmd("mx-a", "y.test", [], T0 + 5)),
    ("assign with items a string", {**assign_cmd("mx-a", "y.test", [], T0 + 5), "items": "s1:2"}),
    ("assign with string now", {**assign_cmd("mx-a", "y.test", [("s1", 2)], T0 + 5), "now": "soon"}),
    ("renew without batch", {"op": "renew", "node": "mx-a"}),
    ("report without now", {k: v for k, v in report_cmd("mx-a", "b1", T0, []).items() if k != "now"}),
    ("report with results a dict", {**report_cmd("mx-a", "b1", T0 + 3, []), "results": {"s1": 250}}),
    ("report with release an int", {**report_cmd("mx-a", "b1", T0 + 3, []), "release": 1}),
    ("report with too many rows", report_cmd("mx-a", "b1", T0 + 3, [outcome("s1", 0, 250)] * 5001)),
    ("report with a non-numeric reply code", report_cmd("mx-a", "b1", T0 + 5, [outcome("s1", 0, "250")])),
    ("report of a 451 without next_at", report_cmd("mx-a", "b1", T0 + 5, [outcome("s1", 0, 451, None, "x")])),
    ("report with a float index", report_cmd("mx-a", "b1", T0 + 5, [outcome("s1", 0.0, 250)])),
    ("report with a short row", report_cmd("mx-a", "b1", T0 + 5, [["s1", 0, 250]])),
    ("report with a good row then a bad one",
     report_cmd("mx-a", "b1", T0 + 5, [outcome("s1", 0, 250), outcome("s1", 0, "x")])),
    ("report with a malformed release", report_cmd("mx-a", "b1", T0 + 5, [outcome("s1", 0, 250)], [["s1"]])),
    ("expire without now", {"op": "expire", "batches": []}),
    ("expire with string now", {"op": "expire", "now": "later", "batches": []}),
    ("expire with a bad pair", {"op": "expire", "now": T0, "batches": [["b1", "0"]]}),
    ("pause unknown campaign", campaign_cmd("pause", "nope")),
    ("resume without campaign", {"op": "resume"}),
    ("cancel without now", {"op": "cancel", "campaign": "spring-sale"}),
    ("suppress a non-address", {"op": "suppress", "address": "nobody", "now": T0}),
    ("suppress without now", {"op": "suppress", "address": "q@x.test"}),
    ("unsuppress a number", {"op": "unsuppress", "address": 12}),
]


def check_refused_everywhere(apply_one) -> None:
    """Refused on two replicas (one restored from a snapshot) with the same result, state untouched."""
    replicas = [busy_state()]
    replicas.append(restored(replicas[0]))
    before = core_digest(replicas[0], "commands_refused")
    refused_before = replicas[0].stats["commands_refused"]
    results = [apply_one(r) for r in replicas]
    assert "error" in results[0], results[0]
    assert results[0] == results[1]
    for replica in replicas:
        assert core_digest(replica, "commands_refused") == before
        assert replica.stats["commands_refused"] == refused_before + 1
        assert_counts_match(replica)
        assert_leases_consistent(replica)
    assert replicas[0].digest() == replicas[1].digest()


@pytest.mark.parametrize("command", [c for _, c in BAD_COMMANDS], ids=[n for n, _ in BAD_COMMANDS])
def test_bad_command_is_refused_without_changing_state(command: Any) -> None:
    check_refused_everywhere(lambda replica: run(replica, command))
    # The same object handed to apply() directly (no msgpack) is refused the same way.
    check_refused_everywhere(lambda replica: replica.apply(command))


@pytest.mark.parametrize("blob", GARBAGE_BLOBS, ids=[b.hex() or "empty" for b in GARBAGE_BLOBS])
def test_garbage_bytes_are_refused(blob: bytes) -> None:
    check_refused_everywhere(lambda replica: replica.apply_blob(blob))


# A bad row anywhere refuses the whole command before anything changes.
PARTIAL_REFUSALS: list[tuple[str, Any]] = [
    ("assign: a malformed item after a good one",
     {**assign_cmd("mx-b", "y.test", [("s1", 2)], T0 + 5), "items": [["s1", 2], 7]}),
    ("report: an enhanced code that is a list",
     report_cmd("mx-a", "b1", T0 + 5, [outcome("s1", 0, 550, ["5.1.1"], "no such user")])),
]


@pytest.mark.parametrize("command", [c for _, c in PARTIAL_REFUSALS], ids=[n for n, _ in PARTIAL_REFUSALS])
def test_refused_command_with_a_bad_row_changes_nothing(command: Any) -> None:
    check_refused_everywhere(lambda replica: run(replica, command))


@pytest.mark.parametrize("bad", [5, submission("s10", ["w@x.test"], key=["k"])], ids=["non-dict", "unhashable-key"])
def test_a_bad_submission_in_a_group_commit_is_refused_alone(bad: Any) -> None:
    """A submit command carries many SMTP transactions (group commit): a bad one is refused by
    itself, identically everywhere, and its neighbours are queued."""
    replicas = [busy_state()]
    replicas.append(restored(replicas[0]))
    results = [run(r, submit_cmd(T0 + 5, submission("s9", ["z@x.test"]), bad)) for r in replicas]
    assert results[0] == results[1]
    assert results[0][0] == ["ok", "s9"] and results[0][1][0] == "refused"
    for replica in replicas:
        assert_counts_match(replica)
    assert replicas[0].digest() == replicas[1].digest()


@pytest.mark.parametrize("idx", [True])
def test_report_with_a_non_int_index_keeps_replicas_identical(idx: Any) -> None:
    state = MailState()
    run(state, submit_cmd(T0, submission("s1", ["a@x.test", "b@x.test"])))
    run(state, assign_cmd("mx-a", "x.test", [("s1", 0), ("s1", 1)], T0 + 1))
    copy = restored(state)
    command = report_cmd("mx-a", "b1", T0 + 2, [["s1", idx, 451, None, "later", T0 + 60]])
    assert run(state, command) == run(copy, command)
    assert state.digest() == copy.digest()
    assert restored(state).digest() == state.digest()


def test_refused_submission_inside_a_batch_of_submissions() -> None:
    state = MailState()
    result = run(state, submit_cmd(T0, submission("s1", ["a@x.test"]),
                                   {"id": "s2", "campaign": "c", "sender": "s@x", "body": BODY, "size": 1},
                                   submission("s3", ["not-an-address"]),
                                   submission("s4", ["d@x.test"])))
    assert [r[0] for r in result] == ["ok", "refused", "refused", "ok"]
    assert set(state.submissions) == {"s1", "s4"}
    assert state.stats["commands_refused"] == 2
    assert state.queue_counts()["pending"] == 2


# ----------------------------------------------------------------------------- submit


def test_submit_accepts_and_queues_every_recipient() -> None:
    state = MailState()
    result = run(state, submit_cmd(T0, submission("s1", ["a@x.test", "b@y.test", "c@x.test"], key="k1")))
    assert result == [["ok", "s1"]]
    assert state.queue_counts()["pending"] == 3
    assert [state_of(state, "s1", i) for i in range(3)] == ["pending"] * 3
    summary = state.campaign_summary(state.campaigns["spring-sale"])
    assert summary["recipients"] == 3 and summary["submissions"] == 1 and summary["percent_done"] == 0.0


def test_duplicate_idempotency_key_within_the_window_is_refused() -> None:
    state = MailState()
    run(state, submit_cmd(T0, submission("s1", ["a@x.test"], key="msgid-1"), window=HOUR))
    # A retried SMTP transaction gets a new submission id but carries the same key.
    again = run(state, submit_cmd(T0 + HOUR, submission("s2", ["a@x.test"], key="msgid-1"), window=HOUR))
    assert again == [["duplicate", "s1"]]
    assert "s2" not in state.submissions
    assert state.stats["duplicates_refused"] == 1
    assert state.queue_counts()["pending"] == 1


def test_idempotency_key_is_forgotten_after_the_window() -> None:
    state = MailState()
    run(state, submit_cmd(T0, submission("s1", ["a@x.test"], key="msgid-1"), window=HOUR))
    later = run(state, submit_cmd(T0 + HOUR + 1, submission("s2", ["a@x.test"], key="msgid-1"), window=HOUR))
    assert later == [["ok", "s2"]]
    assert state.queue_counts()["pending"] == 2
    # The key now points at the newer submission, for another full window.
    third = run(state, submit_cmd(T0 + HOUR + 2, submission("s3", ["a@x.test"], key="msgid-1")))
    assert third == [["duplicate", "s2"]]


def test_resubmitting_the_same_submission_id_is_a_duplicate() -> None:
    state = MailState()
    run(state, submit_cmd(T0, submission("s1", ["a@x.test"])))
    assert run(state, submit_cmd(T0 + 1, submission("s1", ["b@x.test"]))) == [["duplicate", "s1"]]
    assert state.submissions["s1"].rcpts == ["a@x.test"]


def test_submit_refuses_when_the_queue_would_overflow() -> None:
    state = MailState()
    assert run(state, submit_cmd(T0, submission("s1", ["a@x.test", "b@x.test", "c@x.test"]),
                                 max_queued=5)) == [["ok", "s1"]]
    full = run(state, submit_cmd(T0 + 1, submission("s2", ["d@x.test", "e@x.test", "f@x.test"]), max_queued=5))
    assert full == [["full", None]]
    assert "s2" not in state.submissions
    assert run(state, submit_cmd(T0 + 2, submission("s3", ["d@x.test", "e@x.test"]),
                                 max_queued=5)) == [["ok", "s3"]]
    # In-flight recipients still count as queued; delivered ones free their place.
    run(state, assign_cmd("mx-a", "x.test", [("s1", 0), ("s1", 1)], T0 + 3))
    assert run(state, submit_cmd(T0 + 4, submission("s4", ["g@x.test"]), max_queued=5)) == [["full", None]]
    run(state, report_cmd("mx-a", "b1", T0 + 5, [outcome("s1", 0, 250), outcome("s1", 1, 250)]))
    assert run(state, submit_cmd(T0 + 6, submission("s4", ["g@x.test", "h@x.test"]),
                                 max_queued=5)) == [["ok", "s4"]]


def test_suppressed_address_is_suppressed_at_submit() -> None:
    state = MailState()
    assert run(state, {"op": "suppress", "address": "Gone@X.test", "reason": "complaint", "now": T0}) == {"ok": True, "new": True}
    run(state, submit_cmd(T0 + 1, submission("s1", ["gone@x.test", "here@x.test", "GONE@x.TEST"])))
    assert [state_of(state, "s1", i) for i in range(3)] == ["suppressed", "pending", "suppressed"]
    assert state.queue_counts()["suppressed"] == 2
    assert state.eligible(T0 + 2, 100) == {"x.test": [["s1", 1]]}
    assert run(state, {"op": "unsuppress", "address": "gone@X.test"}) == {"ok": True}
    assert run(state, {"op": "unsuppress", "address": "gone@X.test"}) == {"ok": False}
    run(state, submit_cmd(T0 + 3, submission("s2", ["gone@x.test"])))
    assert state_of(state, "s2", 0) == "pending"


# ----------------------------------------------------------------------------- assign and report


def queued_state(rcpts: list[str], now: float = T0, campaign: str = "spring-sale") -> MailState:
    state = MailState()
    run(state, submit_cmd(now, submission("s1", rcpts, campaign=campaign)))
    return state


def test_eligible_groups_by_domain_oldest_first() -> None:
    state = MailState()
    run(state, submit_cmd(T0, submission("s1", ["a@Gmail.test", "b@yahoo.test", "c@gmail.test"])))
    run(state, submit_cmd(T0 + 1, submission("s2", ["d@gmail.test"], campaign="other")))
    assert state.eligible(T0 + 2, 100) == {
        "gmail.test": [["s1", 0], ["s1", 2], ["s2", 0]],
        "yahoo.test": [["s1", 1]],
    }
    limited = state.eligible(T0 + 2, 2)
    assert sum(len(v) for v in limited.values()) == 2


def test_assign_leases_recipients_of_one_domain() -> None:
    state = queued_state(["a@x.test", "b@x.test", "c@y.test"])
    result = run(state, assign_cmd("mx-a", "x.test", [("s1", 0), ("s1", 1), ("s1", 2), ("nope", 0),
                                                      ("s1", 9)], T0 + 1, lease=120))
    assert result == {"batch": "b1", "n": 2, "leased": ["b1", 0]}
    assert [state_of(state, "s1", i) for i in range(3)] == ["in_flight", "in_flight", "pending"]
    batch = state.batches["b1"]
    assert (batch.node, batch.domain, batch.lease, batch.renewals, batch.term) == ("mx-a", "x.test", 120, 0, 1)
    assert list(batch.items) == [("s1", 0), ("s1", 1)]
    assert [b.id for b in state.batches_for("mx-a")] == ["b1"] and state.batches_for("mx-b") == []
    assert state.eligible(T0 + 2, 100) == {"y.test": [["s1", 2]]}
    # Already leased recipients cannot be leased twice.
    again = run(state, assign_cmd("mx-b", "x.test", [("s1", 0), ("s1", 1)], T0 + 2))
    assert again == {"batch": None, "reason": "nothing eligible"}
    assert_leases_consistent(state)


def test_report_delivered_ends_the_batch() -> None:
    state = queued_state(["a@x.test", "b@x.test"])
    run(state, assign_cmd("mx-a", "x.test", [("s1", 0), ("s1", 1)], T0 + 1))
    first = run(state, report_cmd("mx-a", "b1", T0 + 2, [outcome("s1", 0, 250, "2.0.0", "queued as 1")]))
    assert first == {"accepted": 1, "fenced": 0, "suppressed": []}
    rec = state.recipient("s1", 0)
    assert (rec["state"], rec["code"], rec["attempts"], rec["text"]) == ("delivered", 250, 1, "queued as 1")
    assert "b1" in state.batches  # one recipient still held
    run(state, report_cmd("mx-a", "b1", T0 + 3, [outcome("s1", 1, 250)]))
    assert state.batches == {} and state.site_batches == {}
    assert state.queue_counts()["delivered"] == 2
    assert state.submissions["s1"].finished_at == T0 + 3
    assert state.campaign_summary(state.campaigns["spring-sale"])["percent_done"] == 100.0
    assert_leases_consistent(state)


def test_deferred_recipient_waits_until_next_at() -> None:
    state = queued_state(["a@x.test"])
    run(state, assign_cmd("mx-a", "x.test", [("s1", 0)], T0 + 1))
    run(state, report_cmd("mx-a", "b1", T0 + 2, [outcome("s1", 0, 451, "4.7.1", "greylisted", T0 + 600)]))
    rec = state.recipient("s1", 0)
    assert (rec["state"], rec["next_at"], rec["attempts"]) == ("deferred", T0 + 600, 1)
    assert state.eligible(T0 + 599, 100) == {}
    early = run(state, assign_cmd("mx-a", "x.test", [("s1", 0)], T0 + 599))
    assert early["batch"] is None
    assert state_of(state, "s1", 0) == "deferred"
    assert state.eligible(T0 + 600, 100) == {"x.test": [["s1", 0]]}
    assert run(state, assign_cmd("mx-a", "x.test", [("s1", 0)], T0 + 600)) == {"batch": "b2", "n": 1, "leased": ["b2", 0]}
    run(state, report_cmd("mx-a", "b2", T0 + 601, [outcome("s1", 0, 250)]))
    assert state.recipient("s1", 0)["attempts"] == 2
    assert state_of(state, "s1", 0) == "delivered"


def test_no_reply_at_all_is_a_deferral() -> None:
    state = queued_state(["a@x.test"])
    run(state, assign_cmd("mx-a", "x.test", [("s1", 0)], T0 + 1))
    run(state, report_cmd("mx-a", "b1", T0 + 2, [outcome("s1", 0, 0, None, "connection refused", T0 + 60)]))
    assert state_of(state, "s1", 0) == "deferred"


def test_hard_bounce_for_a_bad_mailbox_suppresses_the_address() -> None:
    state = MailState()
    run(state, submit_cmd(T0, submission("s1", ["ghost@x.test", "real@x.test"])))
    run(state, submit_cmd(T0 + 1, submission("s2", ["GHOST@x.test"], campaign="other")))
    run(state, assign_cmd("mx-a", "x.test", [("s1", 0)], T0 + 2))
    result = run(state, report_cmd("mx-a", "b1", T0 + 3, [outcome("s1", 0, 550, "5.1.1", "no such user")]))
    assert result["suppressed"] == ["ghost@x.test"]
    assert state_of(state, "s1", 0) == "bounced"
    assert state.suppressed["ghost@x.test"][0] == 550
    # A later submission to the address is suppressed at submit...
    run(state, submit_cmd(T0 + 4, submission("s3", ["Ghost@X.test"])))
    assert state_of(state, "s3", 0) == "suppressed"
    # ...and one queued before the bounce is suppressed when a node tries to lease it.
    assert run(state, assign_cmd("mx-a", "x.test", [("s2", 0)], T0 + 5))["batch"] is None
    assert state_of(state, "s2", 0) == "suppressed"


def test_policy_bounce_does_not_suppress() -> None:
    state = queued_state(["a@x.test"])
    run(state, assign_cmd("mx-a", "x.test", [("s1", 0)], T0 + 1))
    result = run(state, report_cmd("mx-a", "b1", T0 + 2, [outcome("s1", 0, 550, "5.7.1", "spam")]))
    assert result["suppressed"] == []
    assert state_of(state, "s1", 0) == "bounced"
    assert state.suppressed == {}
    run(state, submit_cmd(T0 + 3, submission("s2", ["a@x.test"])))
    assert state_of(state, "s2", 0) == "pending"


def test_deferral_past_the_maximum_age_expires() -> None:
    state = queued_state(["a@x.test", "b@x.test"])
    run(state, assign_cmd("mx-a", "x.test", [("s1", 0), ("s1", 1)], T0 + 1))
    run(state, report_cmd("mx-a", "b1", T0 + 2, [
        outcome("s1", 0, 451, None, "try later", T0 + DAY + 1),
        outcome("s1", 1, 451, None, "try later", T0 + DAY),
    ], max_age=DAY))
    assert state_of(state, "s1", 0) == "expired"
    assert state_of(state, "s1", 1) == "deferred"  # exactly at the limit is still allowed
    assert state.eligible(T0 + 2 * DAY, 100) == {"x.test": [["s1", 1]]}


def test_report_from_the_wrong_node_is_fenced() -> None:
    state = queued_state(["a@x.test", "b@x.test"])
    run(state, assign_cmd("mx-a", "x.test", [("s1", 0), ("s1", 1)], T0 + 1))
    before = core_digest(state, "fenced_reports")
    result = run(state, report_cmd("mx-b", "b1", T0 + 2, [outcome("s1", 0, 250), outcome("s1", 1, 250)]))
    assert result == {"accepted": 0, "fenced": 2}
    assert state.stats["fenced_reports"] == 2
    assert core_digest(state, "fenced_reports") == before
    unknown = run(state, report_cmd("mx-a", "b77", T0 + 3, [outcome("s1", 0, 250)]))
    assert unknown == {"accepted": 0, "fenced": 1}
    assert state.stats["fenced_reports"] == 3
    assert core_digest(state, "fenced_reports") == before
    assert [state_of(state, "s1", i) for i in range(2)] == ["in_flight", "in_flight"]


def test_report_for_an_item_the_batch_no_longer_holds_is_fenced() -> None:
    state = queued_state(["a@x.test", "b@x.test"])
    run(state, assign_cmd("mx-a", "x.test", [("s1", 0), ("s1", 1)], T0 + 1))
    run(state, report_cmd("mx-a", "b1", T0 + 2, [outcome("s1", 0, 250)]))
    # A second, contradicting report for the same recipient must not change its outcome.
    result = run(state, report_cmd("mx-a", "b1", T0 + 3, [outcome("s1", 0, 550, "5.1.1", "late")]))
    assert result == {"accepted": 0, "fenced": 1, "suppressed": []}
    assert state_of(state, "s1", 0) == "delivered"
    assert state.suppressed == {}
    assert state.stats["fenced_reports"] == 1


def test_expired_lease_returns_unreported_recipients() -> None:
    state = queued_state(["a@x.test", "b@x.test", "c@x.test"])
    run(state, assign_cmd("mx-a", "x.test", [("s1", 0), ("s1", 1), ("s1", 2)], T0 + 1, lease=100))
    run(state, report_cmd("mx-a", "b1", T0 + 2, [outcome("s1", 0, 250)]))
    # The leader names the renewal count it measured from: an older count expires nothing.
    run(state, {"op": "renew", "node": "mx-a", "batch": "b1"})
    assert run(state, {"op": "expire", "now": T0 + 101, "batches": [["b1", 0]]}) == {"expired": [], "returned": 0}
    assert run(state, {"op": "expire", "now": T0 + 102, "batches": [["b1", 1]]}) == {"expired": ["b1"], "returned": 2}
    assert [state_of(state, "s1", i) for i in range(3)] == ["delivered", "pending", "pending"]
    assert state.stats["reassigned_in_flight"] == 2 and state.stats["lease_expiries"] == 1
    assert state.batches == {} and state.site_batches == {}
    assert state.eligible(T0 + 103, 100) == {"x.test": [["s1", 1], ["s1", 2]]}
    # The old holder finishing late is fenced: its result cannot override the new lease.
    run(state, assign_cmd("mx-b", "x.test", [("s1", 1)], T0 + 103))
    late = run(state, report_cmd("mx-a", "b1", T0 + 104, [outcome("s1", 1, 250), outcome("s1", 2, 250)]))
    assert late == {"accepted": 0, "fenced": 2}
    assert [state_of(state, "s1", i) for i in range(3)] == ["delivered", "in_flight", "pending"]
    assert_leases_consistent(state)


def test_reported_recipients_are_never_returned_by_expire() -> None:
    state = queued_state(["a@x.test", "b@x.test", "c@x.test"])
    run(state, assign_cmd("mx-a", "x.test", [("s1", 0), ("s1", 1), ("s1", 2)], T0 + 1, lease=100))
    run(state, report_cmd("mx-a", "b1", T0 + 2, [outcome("s1", 0, 250),
                                                 outcome("s1", 1, 451, None, "later", T0 + 50),
                                                 outcome("s1", 2, 550, "5.1.1", "gone")]))
    assert "b1" not in state.batches
    assert run(state, {"op": "expire", "now": T0 + 10 * DAY, "batches": [["b1", 0]]}) == {"expired": [], "returned": 0}
    assert [state_of(state, "s1", i) for i in range(3)] == ["delivered", "deferred", "bounced"]
    assert state.stats["reassigned_in_flight"] == 0


def test_renew_extends_the_lease_for_its_holder_only() -> None:
    state = queued_state(["a@x.test"])
    run(state, assign_cmd("mx-a", "x.test", [("s1", 0)], T0 + 1, lease=100))
    assert run(state, {"op": "renew", "node": "mx-b", "batch": "b1"}) == {"ok": False}
    assert run(state, {"op": "renew", "node": "mx-a", "batch": "b1"}) == {"ok": True, "leased": ["b1", 1]}
    assert run(state, {"op": "renew", "node": "mx-a", "batch": "b1"}) == {"ok": True, "leased": ["b1", 2]}
    # An expiry measured before the last renewal committed loses to it.
    assert run(state, {"op": "expire", "now": T0 + 400, "batches": [["b1", 1]]}) == {"expired": [], "returned": 0}
    assert run(state, {"op": "expire", "now": T0 + 501, "batches": [["b1", 2]]})["returned"] == 1


def test_release_returns_recipients_to_the_queue() -> None:
    state = queued_state(["a@x.test", "b@x.test", "c@x.test"])
    run(state, assign_cmd("mx-a", "x.test", [("s1", 0), ("s1", 1), ("s1", 2)], T0 + 1))
    result = run(state, report_cmd("mx-a", "b1", T0 + 2, [outcome("s1", 0, 250)],
                                   release=[["s1", 1], ["s1", 2], ["s1", 0]]))
    assert result["accepted"] == 1
    assert [state_of(state, "s1", i) for i in range(3)] == ["delivered", "pending", "pending"]
    assert state.batches == {} and state.site_batches == {}
    assert state.stats["reassigned_in_flight"] == 0
    assert state.recipient("s1", 1)["attempts"] == 0  # released, never tried


# ----------------------------------------------------------------------------- throttles


def test_max_connections_allows_one_batch_per_domain() -> None:
    state = queued_state(["a@x.test", "b@x.test", "c@y.test"])
    assert run(state, assign_cmd("mx-a", "x.test", [("s1", 0)], T0 + 1, max_connections=1))["batch"] == "b1"
    blocked = run(state, assign_cmd("mx-b", "x.test", [("s1", 1)], T0 + 2, max_connections=1))
    assert blocked == {"batch": None, "reason": "max_connections"}
    assert state_of(state, "s1", 1) == "pending"
    # Another domain is unaffected.
    assert run(state, assign_cmd("mx-b", "y.test", [("s1", 2)], T0 + 2, max_connections=1))["batch"] == "b2"
    run(state, report_cmd("mx-a", "b1", T0 + 3, [outcome("s1", 0, 250)]))
    assert run(state, assign_cmd("mx-b", "x.test", [("s1", 1)], T0 + 4, max_connections=1))["batch"] == "b3"


def test_max_per_minute_trims_the_batch_until_a_minute_has_passed() -> None:
    rcpts = [f"r{i}@x.test" for i in range(8)]
    state = queued_state(rcpts)
    items = [("s1", i) for i in range(8)]
    first = run(state, assign_cmd("mx-a", "x.test", items, T0 + 1, max_per_minute=3))
    assert first == {"batch": "b1", "n": 3, "leased": ["b1", 0]}
    assert state._sent_last_minute("x.test", T0 + 1) == 3
    blocked = run(state, assign_cmd("mx-b", "x.test", items, T0 + 30, max_per_minute=3))
    assert blocked == {"batch": None, "reason": "max_per_minute"}
    assert state.queue_counts()["in_flight"] == 3
    assert run(state, assign_cmd("mx-b", "x.test", items, T0 + 60.5, max_per_minute=3))["batch"] is None
    second = run(state, assign_cmd("mx-b", "x.test", items, T0 + 61, max_per_minute=3))
    assert second == {"batch": "b2", "n": 3, "leased": ["b2", 0]}
    assert list(state.batches["b2"].items) == [("s1", 3), ("s1", 4), ("s1", 5)]


# ----------------------------------------------------------------------------- campaigns


def test_pause_and_resume() -> None:
    state = MailState()
    run(state, submit_cmd(T0, submission("s1", ["a@x.test", "b@x.test"], campaign="promo")))
    run(state, submit_cmd(T0, submission("s2", ["c@x.test"], campaign="receipts")))
    assert run(state, campaign_cmd("pause", "promo")) == {"ok": True}
    assert state.campaign_summary(state.campaigns["promo"])["paused"] is True
    assert state.eligible(T0 + 1, 100) == {"x.test": [["s2", 0]]}
    result = run(state, assign_cmd("mx-a", "x.test", [("s1", 0), ("s1", 1), ("s2", 0)], T0 + 1))
    assert result["n"] == 1 and list(state.batches[result["batch"]].items) == [("s2", 0)]
    assert [state_of(state, "s1", i) for i in range(2)] == ["pending", "pending"]
    assert run(state, campaign_cmd("resume", "promo")) == {"ok": True}
    assert state.eligible(T0 + 2, 100) == {"x.test": [["s1", 0], ["s1", 1]]}
    assert run(state, assign_cmd("mx-a", "x.test", [("s1", 0)], T0 + 2))["n"] == 1


def test_cancel_stops_waiting_recipients_and_lets_in_flight_ones_finish() -> None:
    state = queued_state([f"r{i}@x.test" for i in range(6)], campaign="promo")
    run(state, assign_cmd("mx-a", "x.test", [("s1", 0), ("s1", 1), ("s1", 2)], T0 + 1, lease=100))
    run(state, report_cmd("mx-a", "b1", T0 + 2, [outcome("s1", 0, 451, None, "later", T0 + 500)]))
    run(state, assign_cmd("mx-b", "x.test", [("s1", 3)], T0 + 3, lease=100))
    # Now: 0 deferred, 1-2 in flight (b1), 3 in flight (b2), 4-5 pending.
    result = run(state, campaign_cmd("cancel", "promo", T0 + 4))
    assert result == {"ok": True, "cancelled": 3}
    assert [state_of(state, "s1", i) for i in range(6)] == \
        ["cancelled", "in_flight", "in_flight", "in_flight", "cancelled", "cancelled"]
    assert state.eligible(T0 + DAY, 100) == {}
    assert run(state, assign_cmd("mx-a", "x.test", [("s1", 4)], T0 + 5))["batch"] is None
    # In-flight sends finish: a delivery counts, a deferral becomes a cancellation.
    run(state, report_cmd("mx-a", "b1", T0 + 6, [outcome("s1", 1, 250),
                                                 outcome("s1", 2, 451, None, "later", T0 + 900)]))
    assert state_of(state, "s1", 1) == "delivered" and state_of(state, "s1", 2) == "cancelled"
    # A lease of the cancelled campaign that runs out does not put anything back in the queue.
    assert run(state, {"op": "expire", "now": T0 + 200, "batches": [["b2", 0]]})["returned"] == 1
    assert state_of(state, "s1", 3) == "cancelled"
    counts = state.queue_counts()
    assert counts["pending"] == counts["in_flight"] == counts["deferred"] == 0
    assert state.campaign_summary(state.campaigns["promo"])["percent_done"] == 100.0
    # Later submissions to a cancelled campaign are refused, not queued and then cancelled.
    assert run(state, submit_cmd(T0 + 300, submission("s2", ["late@x.test"], campaign="promo"))) \
        == [["cancelled", "promo"]]
    assert "s2" not in state.submissions
    assert_leases_consistent(state)


def test_release_in_a_cancelled_campaign_cancels() -> None:
    state = queued_state(["a@x.test"], campaign="promo")
    run(state, assign_cmd("mx-a", "x.test", [("s1", 0)], T0 + 1))
    run(state, campaign_cmd("cancel", "promo", T0 + 2))
    run(state, report_cmd("mx-a", "b1", T0 + 3, [], release=[["s1", 0]]))
    assert state_of(state, "s1", 0) == "cancelled"


# ----------------------------------------------------------------------------- members and pruning


def test_a_leaving_node_gets_no_new_batches_but_may_finish() -> None:
    state = queued_state(["a@x.test", "b@x.test"])
    run(state, assign_cmd("mx-a", "x.test", [("s1", 0)], T0 + 1))
    assert run(state, member_cmd("member_leave", "mx-a")) == {"ok": True, "batches": 1}
    refused = run(state, assign_cmd("mx-a", "x.test", [("s1", 1)], T0 + 2))
    assert refused["batch"] is None and "leaving" in refused["reason"]
    assert state_of(state, "s1", 1) == "pending"
    assert run(state, report_cmd("mx-a", "b1", T0 + 3, [outcome("s1", 0, 250)]))["accepted"] == 1
    assert run(state, member_cmd("member_remove", "mx-a")) == {"ok": True}
    assert run(state, assign_cmd("mx-b", "x.test", [("s1", 1)], T0 + 4))["n"] == 1
    assert "error" in run(state, member_cmd("member_remove", "mx-unknown"))


def test_prune_archives_finished_submissions_and_keeps_the_counts() -> None:
    state = MailState()
    run(state, submit_cmd(T0, submission("old", ["a@x.test", "b@x.test"])))
    run(state, assign_cmd("mx-a", "x.test", [("old", 0), ("old", 1)], T0 + 1))
    run(state, report_cmd("mx-a", "b1", T0 + 2, [outcome("old", 0, 250), outcome("old", 1, 550, "5.7.1")]))
    run(state, submit_cmd(T0 + 3, submission("live", ["c@x.test"])))
    counts = state.queue_counts()
    assert run(state, prune_cmd(T0 + 2 + HOUR)) == {"archived": 0, "dropped": 0}  # not old enough yet
    assert run(state, prune_cmd(T0 + 3 + HOUR)) == {"archived": 1, "dropped": 0}
    assert set(state.submissions) == {"live"} and set(state.archived) == {"old"}
    assert state.queue_counts() == counts
    assert min(state.delivered_minutes) >= int((T0 + 3 + HOUR) // 60) - 60
    assert restored(state).digest() == state.digest()
    assert state.eligible(T0 + 4 + HOUR, 100) == {"x.test": [["live", 0]]}


def test_cancel_after_prune_cancels_the_live_submissions() -> None:
    state = MailState()
    run(state, submit_cmd(T0, submission("old", ["a@x.test"], campaign="promo")))
    run(state, assign_cmd("mx-a", "x.test", [("old", 0)], T0 + 1))
    run(state, report_cmd("mx-a", "b1", T0 + 2, [outcome("old", 0, 250)]))
    run(state, submit_cmd(T0 + DAY, submission("new", ["b@x.test", "c@x.test"], campaign="promo")))
    run(state, prune_cmd(T0 + DAY + 1))
    assert "old" in state.archived
    assert run(state, campaign_cmd("cancel", "promo", T0 + DAY + 2)) == {"ok": True, "cancelled": 2}
    assert [state_of(state, "new", i) for i in range(2)] == ["cancelled", "cancelled"]


def test_cancelling_one_campaign_never_touches_another() -> None:
    state = MailState()
    run(state, submit_cmd(T0, submission("s1", ["a@x.test"], campaign="promo")))
    run(state, assign_cmd("mx-a", "x.test", [("s1", 0)], T0 + 1))
    run(state, report_cmd("mx-a", "b1", T0 + 2, [outcome("s1", 0, 250)]))
    run(state, prune_cmd(T0 + DAY))
    # An archived id stays taken: reusing it is a duplicate, not a new submission.
    assert run(state, submit_cmd(T0 + DAY + 1, submission("s1", ["b@x.test"], campaign="receipts"))) \
        == [["duplicate", "s1"]]
    run(state, submit_cmd(T0 + DAY + 1, submission("s3", ["b@x.test"], campaign="receipts")))
    run(state, submit_cmd(T0 + DAY + 2, submission("s2", ["c@x.test"], campaign="promo")))
    run(state, campaign_cmd("cancel", "promo", T0 + DAY + 3))
    assert state_of(state, "s2", 0) == "cancelled"
    assert state_of(state, "s3", 0) == "pending"
    assert state.campaigns["receipts"].counts[PENDING] == 1


def test_counts_still_match_after_archives_are_dropped() -> None:
    state = queued_state(["a@x.test"])
    run(state, assign_cmd("mx-a", "x.test", [("s1", 0)], T0 + 1))
    run(state, report_cmd("mx-a", "b1", T0 + 2, [outcome("s1", 0, 250)]))
    assert run(state, prune_cmd(T0 + 60 * DAY, archive_retention=30 * DAY)) == {"archived": 1, "dropped": 1}
    assert state.archived == {} and state.campaigns == {}
    assert state.queue_counts() == recount(state)


# ----------------------------------------------------------------------------- size


def test_a_million_queued_recipients_snapshot_compactly() -> None:
    state = MailState()
    started = time.perf_counter()
    for n in range(1000):
        rcpts = [f"user{n * 1000 + i:06d}@example-domain{i % 100}.com" for i in range(1000)]
        result = state.apply_blob(encode_command(submit_cmd(T0 + n, submission(f"sub-{n:04d}", rcpts),
                                                            max_queued=2_000_000)))
        assert result == [["ok", f"sub-{n:04d}"]]
    built = time.perf_counter()
    assert state.queue_counts()["pending"] == 1_000_000
    blob = state.to_snapshot()
    snapped = time.perf_counter()
    copy = MailState.from_snapshot(blob)
    loaded = time.perf_counter()
    print(f"\n1,000,000 queued recipients: snapshot {len(blob) / 1e6:.1f} MB; "
          f"build {built - started:.2f} s, to_snapshot {snapped - built:.2f} s, "
          f"from_snapshot {loaded - snapped:.2f} s")
    assert copy.queue_counts() == state.queue_counts()
    assert copy.recipient("sub-0999", 999)["address"] == "user999999@example-domain99.com"
    assert len(blob) < 25_000_000, f"snapshot is {len(blob) / 1e6:.1f} MB"


# ----------------------------------------------------------------------------- property-based

SIDS = ["s0", "s1", "s2", "s3", "s4"]
CAMPAIGNS = ["c0", "c1", "c-unknown"]
DOMAINS = ["a.test", "b.test"]
ADDRESSES = [f"u{i}@{d}" for i in range(3) for d in DOMAINS] + ["U0@A.test"]
NODES = ["n0", "n1", "n2"]
SCOPES = st.sampled_from(["", "", "shop.test", "Other.TEST"])  # From: domains of suppressions and submissions
BATCH_IDS = [f"b{i}" for i in range(1, 6)]
CODES = [250, 250, 250, 451, 421, 0, 550, 554, 999]
ENHANCED = [None, "5.1.1", "5.7.1", "4.2.0", "2.0.0"]
TEXTS = ["", "ok", "x" * 300]
MAX_RCPTS = 4

small_int = st.integers(-(2**40), 2**40)  # msgpack cannot carry ints beyond 64 bits
# msgpack-encodable junk for a field of the wrong type.
garbage = st.one_of(
    st.none(), st.booleans(), small_int, st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4), st.binary(max_size=4), st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=2), small_int, max_size=2),
)
# A recipient index in a report row. Bool and float indexes are left out here because they hit a
# known bug (test_report_with_a_non_int_index_keeps_replicas_identical).
report_index = st.one_of(st.integers(-1, MAX_RCPTS), st.text(max_size=2), st.none())
any_item = st.tuples(st.sampled_from(SIDS), st.integers(0, MAX_RCPTS - 1)).map(list)


def hints(state: MailState, now: float) -> dict:
    """What a leader would look at before proposing: live batches and eligible recipients."""
    return {"batches": [(b.id, b.node, [list(k) for k in b.items]) for b in state.batches.values()],
            "eligible": state.eligible(now, 50)}


def report_row(item: list, now: float) -> st.SearchStrategy:
    return st.builds(outcome, st.just(item[0]), st.just(item[1]), st.sampled_from(CODES),
                     st.sampled_from(ENHANCED), st.sampled_from(TEXTS),
                     st.sampled_from([now, now + 10, now + 100, now + 5000]))


@st.composite
def submit_command(draw, now: float) -> dict:
    subs = draw(st.lists(st.builds(
        lambda sid, camp, rcpts, key, scope, send_at: {**submission(sid, rcpts, camp, key),
                                                       **({"scope": scope} if scope else {}),
                                                       **({"not_before": now + send_at} if send_at else {})},
        st.sampled_from(SIDS + ["s5", "s6"]), st.sampled_from(CAMPAIGNS[:2]),
        st.lists(st.sampled_from(ADDRESSES), min_size=1, max_size=MAX_RCPTS),
        st.sampled_from([None, "k0", "k1"]), SCOPES, st.sampled_from([0, 0, 0, 30, HOUR, -10])),
        min_size=1, max_size=2))
    return submit_cmd(now, *subs, window=draw(st.sampled_from([0, 30, HOUR])),
                      max_queued=draw(st.sampled_from([3, 12, 1000, 1000])))


@st.composite
def assign_command(draw, now: float, eligible: dict) -> dict:
    if eligible and draw(st.integers(0, 3)):
        domain = draw(st.sampled_from(sorted(eligible)))
        items = draw(st.lists(st.sampled_from(eligible[domain]), min_size=1, max_size=6))
    else:
        domain = draw(st.sampled_from(DOMAINS))
        items = draw(st.lists(any_item, min_size=1, max_size=6))
    return assign_cmd(draw(st.sampled_from(NODES)), domain, items, now,
                      lease=draw(st.sampled_from([1, 300, 3000])),
                      max_connections=draw(st.sampled_from([1, 2])),
                      max_per_minute=draw(st.sampled_from([0, 2, 5])))


@st.composite
def report_command(draw, now: float, batches: list) -> dict:
    if batches and draw(st.integers(0, 3)):
        bid, node, held = draw(st.sampled_from(batches))
        if not draw(st.integers(0, 5)):
            node = draw(st.sampled_from(NODES))  # now and then the wrong holder
        items = draw(st.lists(st.sampled_from(held), min_size=1, max_size=len(held)))
        release = draw(st.lists(st.sampled_from(held), max_size=2))
    else:
        bid, node = draw(st.sampled_from(BATCH_IDS)), draw(st.sampled_from(NODES))
        items = draw(st.lists(any_item, max_size=3))
        release = draw(st.lists(any_item, max_size=2))
    rows = [draw(report_row(item, now)) for item in items]
    return report_cmd(node, bid, now, rows, release, max_age=draw(st.sampled_from([60, HOUR, DAY, DAY])))


@st.composite
def valid_command(draw, now: float, hint: dict) -> dict:
    # Lean towards what the state invites: leases when recipients wait, reports when batches exist.
    ops = ["submit"] * 3 + ["assign"] * (6 if hint["eligible"] else 1) + \
        ["report"] * (6 if hint["batches"] else 1) + [
        "expire", "renew", "pause", "resume", "cancel", "suppress", "unsuppress", "noop", "prune", "member", "suppress_many", "feedback"]
    op = draw(st.sampled_from(ops))
    if op == "submit":
        return draw(submit_command(now))
    if op == "assign":
        return draw(assign_command(now, hint["eligible"]))
    if op == "report":
        return draw(report_command(now, hint["batches"]))
    if op == "expire":
        return {"op": "expire", "now": now, "batches": [[b[0], draw(st.sampled_from([0, 1, 2]))] for b in hint["batches"]]}
    if op == "renew":
        bid, node = draw(st.sampled_from([(b[0], b[1]) for b in hint["batches"]] + [("b1", "n0")]))
        return {"op": "renew", "node": node, "batch": bid}
    if op in ("pause", "resume", "cancel"):
        return campaign_cmd(op, draw(st.sampled_from(CAMPAIGNS)), now)
    if op == "suppress":
        return {"op": "suppress", "address": draw(st.sampled_from(ADDRESSES)), "reason": "test", "now": now,
                "scope": draw(SCOPES)}
    if op == "unsuppress":
        return {"op": "unsuppress", "address": draw(st.sampled_from(ADDRESSES)), "scope": draw(SCOPES)}
    if op == "suppress_many":
        return {"op": "suppress_many", "now": now, "entries": draw(st.lists(
            st.tuples(st.sampled_from(ADDRESSES), SCOPES, st.just("import")).map(list), min_size=1, max_size=3))}
    if op == "feedback":
        kind = draw(st.sampled_from(["bounce", "complaint", "unsubscribe"]))
        code, enhanced = draw(st.sampled_from([(550, "5.1.1"), (550, "5.7.1"), (450, "4.2.2")]))
        return {"op": "feedback", "kind": kind, "submission": draw(st.sampled_from(SIDS)),
                "index": draw(st.integers(0, 3)), "now": now, "node": "n1", "code": code, "enhanced": enhanced,
                "scope": draw(st.sampled_from(["domain", "cluster"]))}
    if op == "prune":
        # Archives are kept longer than any history runs: dropping them breaks the recount
        # (test_counts_still_match_after_archives_are_dropped).
        return prune_cmd(now, retention=draw(st.sampled_from([0, 60, HOUR])), archive_retention=365 * DAY)
    if op == "member":
        # n1 and n2 stay active, so batches keep being assigned after a member leaves.
        return member_cmd(draw(st.sampled_from(["member_add", "member_leave", "member_remove"])),
                          draw(st.sampled_from(["n0", "n9"])))
    return {"op": "noop"}


@st.composite
def invalid_command(draw, now: float, hint: dict) -> Any:
    kind = draw(st.sampled_from(["drop", "retype", "not a dict", "unknown op", "bad rows", "bad rows"]))
    if kind == "not a dict":
        return draw(garbage)
    if kind == "unknown op":
        return {"op": draw(st.one_of(st.text(max_size=6), garbage)), "now": now}
    base = draw(valid_command(now, hint))
    key = draw(st.sampled_from(sorted(base)))
    if kind == "drop":
        return {k: v for k, v in base.items() if k != key}
    if kind == "retype":
        return {**base, key: draw(garbage)}
    # Malformed rows inside an otherwise well-formed command.
    if base["op"] == "submit":
        base["subs"].append(draw(st.one_of(garbage, st.fixed_dictionaries(
            {"id": st.sampled_from(SIDS), "campaign": garbage, "rcpts": garbage}))))
    elif base["op"] == "assign":
        base["items"].append(draw(st.one_of(garbage, st.lists(garbage, max_size=3))))
    elif base["op"] == "report" and base["results"] and draw(st.integers(0, 3)):
        # Spoil one field of a row for an item the batch really holds, so the handler gets deep.
        row = draw(st.sampled_from(base["results"]))
        field = draw(st.integers(0, 5))
        row[field] = draw(report_index if field == 1 else garbage)
    elif base["op"] == "report":
        base["results"].append(draw(st.tuples(st.one_of(st.sampled_from(SIDS), garbage), report_index,
                                              garbage, garbage, garbage, garbage).map(list)))
        base["release"].append(draw(st.lists(garbage, max_size=3)))
    return base


@st.composite
def any_step(draw, now: float, hint: dict, invalid: bool) -> tuple[str, Any]:
    """("blob", raw bytes) or ("cmd", a command); mostly valid commands."""
    choice = draw(st.integers(0, 9)) if invalid else 0
    if choice <= 6:
        return "cmd", draw(valid_command(now, hint))
    if choice <= 8:
        return "cmd", draw(invalid_command(now, hint))
    return "blob", draw(st.binary(max_size=24))


def step(state: MailState, kind: str, payload: Any) -> str:
    """Apply one step; the result as a string (NaN-safe comparison between replicas)."""
    blob = payload if kind == "blob" else encode_command(payload)
    result = state.apply_blob(blob)
    assert_counts_match(state)
    return repr(result)


TIME_STEPS = st.sampled_from([0, 1, 5, 29, 61, 400])
# No shrink phase: draws depend on the state, so shrinking these histories takes minutes (past the
# timeout) and gains little; a failure prints its full list of draws instead.
PROPERTY_SETTINGS = settings(derandomize=True, max_examples=200, deadline=None,
                             phases=[Phase.explicit, Phase.generate],
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@PROPERTY_SETTINGS
@given(data=st.data())
def test_random_histories_keep_replicas_identical(data: st.DataObject) -> None:
    length = data.draw(st.integers(1, 40), label="commands")
    split = data.draw(st.integers(0, length), label="snapshot before command")
    steady, rejoined = MailState(), MailState()
    now = T0
    for i in range(length):
        if i == split:  # this replica fell behind and was brought back from a snapshot
            rejoined = restored(rejoined)
            assert rejoined.digest() == steady.digest()
        now += data.draw(TIME_STEPS)
        kind, payload = data.draw(any_step(now, hints(steady, now), invalid=True))
        assert step(rejoined, kind, payload) == step(steady, kind, payload)
        # Reads must agree too: a leader restored from a snapshot schedules the same recipients.
        assert rejoined.eligible(now + DAY, 1000) == steady.eligible(now + DAY, 1000)
    if split == length:
        rejoined = restored(rejoined)
    assert rejoined.digest() == steady.digest()
    assert restored(steady).digest() == steady.digest()
    assert steady.applied == length
    assert queries(rejoined, now) == queries(steady, now)


@settings(PROPERTY_SETTINGS, max_examples=100)  # a second angle on the same generator: fewer runs
@given(data=st.data())
def test_valid_histories_never_strand_a_recipient(data: st.DataObject) -> None:
    state = MailState()
    now = T0
    for _ in range(data.draw(st.integers(1, 40), label="commands")):
        now += data.draw(TIME_STEPS)
        _, command = data.draw(any_step(now, hints(state, now), invalid=False))
        result = state.apply_blob(encode_command(command))
        if isinstance(result, dict) and "error" in result:
            # The only refusals a valid history can meet: a campaign that does not exist, or
            # removing a member that is not leaving.
            if command["op"] == "member_remove":
                assert state.members.get(command["id"], {}).get("status") != "leaving"
            else:
                assert command["op"] in ("pause", "resume", "cancel")
                assert command["campaign"] not in state.campaigns
        assert_counts_match(state)
        assert_leases_consistent(state)
        assert_cancelled_campaigns_are_not_waiting(state)
        for at in (now, now + DAY):  # the read indexes answer what a scan of every recipient does
            assert state.eligible(at, 10**6) == eligible_by_scan(state, at)
    # Once every lease has run out, nothing is left in flight.
    state.apply_blob(encode_command({"op": "expire", "now": now + 365 * DAY,
                                     "batches": [[b.id, b.renewals] for b in state.batches.values()]}))
    assert state.queue_counts()["in_flight"] == 0
    assert_leases_consistent(state)


def eligible_by_scan(state: MailState, now: float) -> dict[str, list[list]]:
    """What MailState.eligible answers, from every recipient of every open submission in the
    queue's order: pending ones (once their send time came) and deferred ones due by `now`, of
    campaigns neither paused nor cancelled."""
    out: dict[str, list[list]] = {}
    for sid in sorted(state.open, key=lambda s: state.index.open_pos[s]):
        sub = state.submissions[sid]
        camp = state.campaigns[sub.campaign]
        if camp.paused or camp.cancelled:
            continue
        for idx, s in enumerate(sub.states):
            due = (s == PENDING and (sub.not_before is None or sub.not_before <= now)) or \
                (s == DEFERRED and sub.detail[idx].next_at <= now)
            if due:
                out.setdefault(sub.rcpts[idx].rpartition("@")[2].lower(), []).append([sid, idx])
    return out


def test_abandon_returns_a_restarted_holders_batch_and_counts_it() -> None:
    state = queued_state(["a@x.test", "b@x.test", "c@x.test"])
    run(state, assign_cmd("mx-a", "x.test", [("s1", 0), ("s1", 1), ("s1", 2)], T0 + 1))
    run(state, report_cmd("mx-a", "b1", T0 + 2, [outcome("s1", 0, 250)]))
    # Only the holder may give it back.
    assert run(state, {"op": "abandon", "batch": "b1", "node": "mx-b", "incarnation": "i2", "now": T0 + 3}) == \
        {"abandoned": 0}
    assert run(state, {"op": "abandon", "batch": "b1", "node": "mx-a", "incarnation": "i2", "now": T0 + 3}) == \
        {"abandoned": 2}
    assert [state_of(state, "s1", i) for i in range(3)] == ["delivered", "pending", "pending"]
    assert state.batches == {} and state.stats["reassigned_in_flight"] == 2
    assert_counts_match(state)


def test_a_group_applies_its_commands_in_order_exactly_as_alone() -> None:
    """The bridge's group commit: one entry holding several commands ends in the same state,
    with the same results, as one entry per command."""
    def commands() -> list[dict]:
        return [{"op": "submit", "now": T0, "window": DAY, "max_queued": 10**6,
                 "subs": [submission(f"s{i}", [f"r{i}@example.com"])]} for i in range(3)] + [{"op": "nope"}]
    alone, grouped = MailState(), MailState()
    one_by_one = [alone.apply_blob(encode_command(c)) for c in commands()]
    together = grouped.apply_blob(encode_command({"op": "group", "cmds": commands()}))
    assert together == one_by_one and together[-1] == {"error": "unknown command 'nope'"}
    assert sorted(grouped.submissions) == sorted(alone.submissions) == ["s0", "s1", "s2"]
    nested = grouped.apply_blob(encode_command({"op": "group", "cmds": [{"op": "group", "cmds": []}]}))
    assert nested == [{"error": "a group may not hold a group"}]
    assert grouped.apply_blob(encode_command({"op": "group", "cmds": []})) == {"error": "cmds must be a non-empty list"}


def test_a_submissions_answer_reads_back_from_the_applied_state() -> None:
    """What a proposer that lost track of its commit answers from: the same answer the submit
    command gave, or None while the state does not show the submission."""
    state = MailState()
    rcpts = ["ann@example.com", "bob@example.net"]
    assert state.submission_answer("s1", "k1", rcpts) is None
    assert run(state, submit_cmd(T0, submission("s1", rcpts, key="k1"))) == [["ok", "s1"]]
    assert state.submission_answer("s1", "k1", rcpts) == ["ok", "s1"]
    # A retry under a new id, every recipient already queued under the key: a duplicate of s1.
    assert run(state, submit_cmd(T0 + 1, submission("s2", rcpts, key="k1"))) == [["duplicate", "s1"]]
    assert state.submission_answer("s2", "k1", rcpts) == ["duplicate", "s1"]
    # One more recipient under the same key: only it is queued.
    more = rcpts + ["cy@example.org"]
    assert run(state, submit_cmd(T0 + 2, submission("s3", more, key="k1"))) == [["ok", "s3", 1, 2]]
    assert state.submission_answer("s3", "k1", more) == ["ok", "s3", 1, 2]
    # Not applied (another id, a recipient the key has not seen, or no key): nothing to say.
    assert state.submission_answer("s4", "k1", ["dee@example.com"]) is None
    assert state.submission_answer("s4", None, rcpts) is None
    assert state.submission_answer("s4", "k2", rcpts) is None

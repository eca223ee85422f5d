"""Classification of SMTP replies and retry backoff (pure functions)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from raftmail.consensus.outcomes import (
    BOUNCED,
    CANCELLED,
    DEFERRED,
    DELIVERED,
    EXPIRED,
    FINAL_STATES,
    IN_FLIGHT,
    PENDING,
    STATE_NAMES,
    SUPPRESSED,
    Verdict,
    classify,
    judge_reply,
    parse_enhanced,
)
from raftmail.consensus.backoff import next_retry_delay

pytestmark = pytest.mark.timeout(60)

BACKOFF = dict(first=60.0, factor=2.0, max_interval=3600.0, jitter_fraction=0.2)


def test_state_names_and_final_states() -> None:
    assert STATE_NAMES[PENDING] == "pending"
    assert STATE_NAMES[IN_FLIGHT] == "in_flight"
    assert STATE_NAMES[EXPIRED] == "expired"
    assert len(STATE_NAMES) == 8
    assert FINAL_STATES == {DELIVERED, BOUNCED, SUPPRESSED, CANCELLED, EXPIRED}
    assert PENDING not in FINAL_STATES and DEFERRED not in FINAL_STATES


@pytest.mark.parametrize(
    ("code", "text", "expected"),
    [
        (250, "2.0.0 Ok: queued as 1234", Verdict(DELIVERED, False)),
        (251, "User not local; will forward", Verdict(DELIVERED, False)),
        (550, "5.1.1 <x@example.org>: Recipient address rejected: User unknown", Verdict(BOUNCED, True)),
        (550, "5.1.2 Host unknown", Verdict(BOUNCED, True)),
        (556, "5.1.10 Recipient address has null MX", Verdict(BOUNCED, True)),
        (550, "5.2.1 Mailbox disabled", Verdict(BOUNCED, True)),
        (550, "5.7.1 Message rejected as spam", Verdict(BOUNCED, False)),
        (554, "5.7.26 Unauthenticated email is not accepted", Verdict(BOUNCED, False)),
        (552, "5.2.2 Mailbox full", Verdict(BOUNCED, False)),
        # The sender's address is at fault: never suppress the recipient for it.
        (553, "5.1.8 Sender address rejected: Domain not found", Verdict(BOUNCED, False)),
        (550, "5.1.0 Sender address rejected: undeliverable address", Verdict(BOUNCED, False)),
        (550, "Requested action not taken", Verdict(BOUNCED, False)),
        # An enhanced code of the wrong class does not make a 4xx permanent.
        (450, "5.1.1 odd server", Verdict(DEFERRED, False)),
        (452, "4.2.2 Mailbox full", Verdict(DEFERRED, False)),
        (421, "4.7.0 Too many connections, slow down", Verdict(DEFERRED, False)),
        (451, "4.4.1 No answer from host", Verdict(DEFERRED, False)),
        (0, "connection refused", Verdict(DEFERRED, False)),
        (199, "weird", Verdict(DEFERRED, False)),
        (354, "go ahead", Verdict(DEFERRED, False)),
        (600, "out of range", Verdict(DEFERRED, False)),
        (-1, "negative", Verdict(DEFERRED, False)),
    ],
)
def test_classify_table(code: int, text: str, expected: Verdict) -> None:
    assert classify(code, parse_enhanced(text)) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5.1.1 No such user", "5.1.1"),
        ("  4.7.10 TLS required", "4.7.10"),
        ("5.01.001 padded", "5.1.1"),
        ("2.0.0", "2.0.0"),
        ("No such user", None),
        ("", None),
        ("3.1.1 wrong class", None),
        ("5.1 too short", None),
        ("5.1.1.1 too long", None),
        ("5.1.1234 detail too long", None),
        ("Mailbox 5.1.1 later in the text", None),
    ],
)
def test_parse_enhanced(text: str, expected: str | None) -> None:
    assert parse_enhanced(text) == expected


@given(code=st.integers(-1000, 1000), enhanced=st.sampled_from([None, "", "5.1.1", "4.2.0", "2.0.0"]),
       text=st.sampled_from(["", "5.1.1 no such user", "4.7.1 later", "2.0.0 ok", "no code here"]))
def test_judge_reply_is_classify_with_the_enhanced_code_of_the_text(code: int, enhanced: str | None,
                                                                    text: str) -> None:
    verdict = judge_reply(code, enhanced, text)
    expected_enhanced = enhanced or parse_enhanced(text)
    assert verdict == classify(code, expected_enhanced) and verdict.enhanced == expected_enhanced
    assert verdict.deferred == (verdict.state == DEFERRED)


def test_retry_delays_grow_then_cap() -> None:
    delays = [next_retry_delay(n, jitter=0.5, **BACKOFF) for n in range(1, 10)]
    assert delays[:4] == [60.0, 120.0, 240.0, 480.0]
    assert all(a <= b for a, b in zip(delays, delays[1:]))
    assert delays[-1] == 3600.0
    assert max(delays) == 3600.0


def test_retry_delay_huge_attempt_does_not_overflow() -> None:
    assert next_retry_delay(100_000, jitter=0.5, **BACKOFF) == 3600.0


def test_retry_delay_jitter_extremes() -> None:
    low = next_retry_delay(1, jitter=0.0, **BACKOFF)
    high = next_retry_delay(1, jitter=0.999999, **BACKOFF)
    assert low == pytest.approx(60.0 * 0.8)
    assert high == pytest.approx(60.0 * 1.2, rel=1e-5)
    assert high < 60.0 * 1.2


@given(attempt=st.integers(1, 10_000), jitter=st.floats(0.0, 1.0, exclude_max=True))
def test_retry_delay_within_jitter_bounds(attempt: int, jitter: float) -> None:
    delay = next_retry_delay(attempt, jitter=jitter, **BACKOFF)
    plain = min(60.0 * 2.0 ** min(attempt - 1, 64), 3600.0)
    assert plain * 0.8 - 1e-9 <= delay < plain * 1.2 + 1e-9


def test_retry_delay_is_deterministic() -> None:
    assert next_retry_delay(3, jitter=0.37, **BACKOFF) == next_retry_delay(3, jitter=0.37, **BACKOFF)


@pytest.mark.parametrize(
    "bad",
    [
        dict(attempt=0, jitter=0.5),
        dict(attempt=1, jitter=1.0),
        dict(attempt=1, jitter=-0.1),
    ],
)
def test_retry_delay_rejects_bad_input(bad: dict) -> None:
    with pytest.raises(ValueError):
        next_retry_delay(bad["attempt"], jitter=bad["jitter"], **BACKOFF)

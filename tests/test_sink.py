"""Capture sink: real SMTP over 127.0.0.1 with stdlib smtplib, real files in a tmp maildir."""

from __future__ import annotations

import asyncio
import smtplib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Coroutine, Sequence

import pytest

from raftmail.node.sink import (
    CaptureSink,
    ReplyRule,
    parse_reply_rule,
    read_log,
    run_sink,
)

pytestmark = pytest.mark.timeout(30)

HOST = "127.0.0.1"
DEADLINE_SECONDS = 10.0


def wait_for(condition: Callable[[], bool], what: str, deadline: float = DEADLINE_SECONDS) -> None:
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class LoopThread:
    """An asyncio loop in a background thread, so blocking smtplib can run in the test body."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = DEADLINE_SECONDS) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(DEADLINE_SECONDS)
        self.loop.close()


@pytest.fixture
def loop_thread():
    runner = LoopThread()
    yield runner
    runner.close()


@pytest.fixture
def start_sink(loop_thread: LoopThread, tmp_path: Path):
    """Factory: start a CaptureSink on a free port; every sink started is stopped at teardown."""
    started: list[CaptureSink] = []

    def start(rules: Sequence[ReplyRule] = (), maildir: Path | None = None,
              **limits: Any) -> tuple[CaptureSink, int]:
        sink = CaptureSink(maildir or tmp_path / "maildir", rules, **limits)
        port = loop_thread.run(sink.start(HOST, 0))
        started.append(sink)
        return sink, port

    yield start
    for sink in started:
        loop_thread.run(sink.stop())


def message(subject: str, message_id: str | None = None, body: str = "Hello.\r\n") -> bytes:
    headers = f"From: news@sender.test\r\nTo: list@x.test\r\nSubject: {subject}\r\n"
    if message_id:
        headers += f"Message-ID: {message_id}\r\n"
    return (headers + "\r\n" + body).encode()


def eml_files(maildir: Path) -> list[Path]:
    return sorted(maildir.glob("*.eml"))


def events(maildir: Path, kind: str) -> list[dict]:
    return [e for e in read_log(maildir) if e["event"] == kind]


# -- delivery ----------------------------------------------------------------------------


def test_message_to_two_recipients_gives_two_files_and_two_log_lines(start_sink, tmp_path):
    sink, port = start_sink()
    raw = message("two", "<m1@sender.test>")
    with smtplib.SMTP(HOST, port, timeout=DEADLINE_SECONDS) as client:
        refused = client.sendmail("news@sender.test", ["a@x.test", "B@x.test"], raw)
    assert refused == {}

    maildir = tmp_path / "maildir"
    wait_for(lambda: len(events(maildir, "message")) == 2, "two message events")
    files = eml_files(maildir)
    assert [f.name.split(".", 1)[1] for f in files] == ["a@x.test.eml", "b@x.test.eml"]
    first = files[0].read_bytes()
    assert first.startswith(b"X-Sink-Envelope-From: news@sender.test\r\n"
                            b"X-Sink-Envelope-To: a@x.test\r\n")
    assert first.endswith(raw)

    logged = events(maildir, "message")
    assert {e["rcpt"] for e in logged} == {"a@x.test", "B@x.test"}
    assert all(e["message_id"] == "<m1@sender.test>" for e in logged)
    assert all(e["mail_from"] == "news@sender.test" for e in logged)
    assert all(e["size"] == len(raw) for e in logged)
    assert sorted(e["file"] for e in logged) == [f.name for f in files]
    assert sink.stats["messages"] == 1 and sink.stats["recipients"] == 2
    assert not list(maildir.glob(".tmp-*")), "temp files must be renamed away"


def test_eight_bit_body_and_utf8_recipient_are_stored_byte_exact(start_sink, tmp_path):
    _, port = start_sink()
    raw = ("From: a@sender.test\r\nSubject: caf\u00e9\r\n\r\nGr\u00fc\u00dfe \u2713\r\n"
           ".leading dot survives\r\n").encode("utf-8")
    with smtplib.SMTP(HOST, port, timeout=DEADLINE_SECONDS) as client:
        client.sendmail("a@sender.test", ["j\u00fcrgen@x.test"], raw,
                        mail_options=["SMTPUTF8", "BODY=8BITMIME"])
    maildir = tmp_path / "maildir"
    wait_for(lambda: len(eml_files(maildir)) == 1, "one stored file")
    stored = eml_files(maildir)[0].read_bytes()
    assert stored.endswith(raw)
    assert "X-Sink-Envelope-To: j\u00fcrgen@x.test\r\n".encode() in stored
    assert events(maildir, "message")[0]["message_id"] is None


def test_message_over_size_limit_is_refused_and_not_stored(start_sink, tmp_path):
    _, port = start_sink(max_message_bytes=1000)
    big = message("big", body="x" * 80 + "\r\n") * 20
    with smtplib.SMTP(HOST, port, timeout=DEADLINE_SECONDS) as client:
        # A sender that declares SIZE is refused at MAIL ...
        with pytest.raises(smtplib.SMTPSenderRefused) as refused_at_mail:
            client.sendmail("a@sender.test", ["r@x.test"], big)
        # ... and one that does not is refused after DATA.
        client.mail("a@sender.test")
        client.rcpt("r@x.test")
        refused_at_data = client.data(big)
    assert refused_at_mail.value.smtp_code == 552
    assert refused_at_data[0] == 552
    assert eml_files(tmp_path / "maildir") == []


# -- reply rules -------------------------------------------------------------------------


def test_rejecting_rule_answers_550_and_other_recipients_still_deliver(start_sink, tmp_path):
    sink, port = start_sink([parse_reply_rule("bad@x.test=550 5.1.1 No such user")])
    with smtplib.SMTP(HOST, port, timeout=DEADLINE_SECONDS) as client:
        refused = client.sendmail("news@sender.test", ["good@x.test", "BAD@x.test"],
                                  message("mixed"))
    assert refused == {"BAD@x.test": (550, b"5.1.1 No such user")}

    maildir = tmp_path / "maildir"
    wait_for(lambda: len(events(maildir, "message")) == 1, "one message event")
    assert [f.name.split(".", 1)[1] for f in eml_files(maildir)] == ["good@x.test.eml"]
    assert {(e["rcpt"], e["code"]) for e in events(maildir, "rcpt")} == {
        ("good@x.test", 250), ("BAD@x.test", 550)}
    assert sink.stats["rcpt_rejected"] == 1


def test_limited_rule_applies_first_n_times_per_recipient_then_250(start_sink, tmp_path):
    _, port = start_sink([parse_reply_rule("soft@x.test=451 4.3.0 Try later*2")])
    codes = []
    with smtplib.SMTP(HOST, port, timeout=DEADLINE_SECONDS) as client:
        client.ehlo()
        for _ in range(3):
            client.mail("news@sender.test")
            codes.append(client.rcpt("soft@x.test"))
            assert client.rcpt("other@x.test")[0] == 250
            client.rset()
    assert codes == [(451, b"4.3.0 Try later"), (451, b"4.3.0 Try later"), (250, b"OK")]


def test_wildcard_limited_rule_counts_each_recipient_separately(start_sink):
    _, port = start_sink([parse_reply_rule("*=451 4.7.1 Greylisted*1")])
    with smtplib.SMTP(HOST, port, timeout=DEADLINE_SECONDS) as client:
        client.ehlo()
        client.mail("news@sender.test")
        first = [client.rcpt(r)[0] for r in ("a@x.test", "b@x.test", "a@x.test", "b@x.test")]
    assert first == [451, 451, 250, 250]


def test_exact_rule_takes_precedence_over_wildcard(start_sink):
    _, port = start_sink([parse_reply_rule("*=550 5.7.1 Blocked"),
                          parse_reply_rule("vip@x.test=250 2.1.5 Welcome")])
    with smtplib.SMTP(HOST, port, timeout=DEADLINE_SECONDS) as client:
        client.ehlo()
        client.mail("news@sender.test")
        assert client.rcpt("vip@x.test") == (250, b"2.1.5 Welcome")
        assert client.rcpt("anyone@x.test") == (550, b"5.7.1 Blocked")


# -- connections -------------------------------------------------------------------------


def test_connections_max_reflects_three_concurrent_connections(start_sink, tmp_path):
    sink, port = start_sink()
    with ThreadPoolExecutor(3) as pool:
        clients = list(pool.map(lambda _: smtplib.SMTP(HOST, port, timeout=DEADLINE_SECONDS),
                                range(3)))
    wait_for(lambda: sink.stats["connections_open"] == 3, "three open connections")
    for client in clients:
        client.quit()
    wait_for(lambda: sink.stats["connections_open"] == 0, "all connections closed")

    assert sink.stats["connections_max"] == 3
    maildir = tmp_path / "maildir"
    wait_for(lambda: len(events(maildir, "disconnect")) == 3, "three disconnect events")
    connects = events(maildir, "connect")
    assert max(e["open"] for e in connects) == 3
    assert sorted(e["conn"] for e in connects) == [1, 2, 3]
    assert all(e["peer"].startswith("127.0.0.1:") for e in connects)


def test_connection_over_cap_is_answered_421(start_sink, tmp_path):
    sink, port = start_sink(max_connections=1)
    with smtplib.SMTP(HOST, port, timeout=DEADLINE_SECONDS):
        wait_for(lambda: sink.stats["connections_open"] == 1, "first connection open")
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            smtplib.SMTP(HOST, port, timeout=DEADLINE_SECONDS)
    assert refused.value.smtp_code == 421
    assert sink.stats["connections_refused"] == 1
    assert sink.stats["connections_max"] == 1


def test_stop_closes_open_connections_and_logs_their_disconnect(loop_thread, tmp_path):
    sink = CaptureSink(tmp_path / "maildir")
    port = loop_thread.run(sink.start(HOST, 0))
    client = smtplib.SMTP(HOST, port, timeout=DEADLINE_SECONDS)
    wait_for(lambda: sink.stats["connections_open"] == 1, "connection open")
    loop_thread.run(sink.stop())
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.noop()
    assert [e["event"] for e in read_log(tmp_path / "maildir")] == ["connect", "disconnect"]


# -- restart / log -----------------------------------------------------------------------


def test_restart_on_same_maildir_continues_seq_numbering(loop_thread, tmp_path):
    maildir = tmp_path / "maildir"
    maildir.mkdir()
    # A high seq left by an earlier sink process; the process-wide counter is far below it.
    (maildir / "00090000.old@x.test.eml").write_bytes(b"earlier run\r\n")

    def deliver_once(recipient: str) -> None:
        sink = CaptureSink(maildir)
        port = loop_thread.run(sink.start(HOST, 0))
        try:
            with smtplib.SMTP(HOST, port, timeout=DEADLINE_SECONDS) as client:
                client.sendmail("news@sender.test", [recipient], message("restart"))
        finally:
            loop_thread.run(sink.stop())

    deliver_once("first@x.test")
    deliver_once("second@x.test")
    assert [f.name for f in eml_files(maildir)] == [
        "00090000.old@x.test.eml", "00090001.first@x.test.eml", "00090002.second@x.test.eml"]
    assert [e["file"] for e in events(maildir, "message")] == [
        "00090001.first@x.test.eml", "00090002.second@x.test.eml"]


def test_read_log_skips_unfinished_last_line(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"event":"connect","conn":1}\n{"event":"mess')
    assert read_log(tmp_path) == [{"event": "connect", "conn": 1}]
    assert read_log(tmp_path / "missing") == []


def test_run_sink_prints_listening_line_and_stops_when_cancelled(loop_thread, tmp_path, capsys):
    maildir = tmp_path / "maildir"

    async def run_briefly() -> list[dict]:
        task = asyncio.create_task(run_sink(HOST, 0, maildir, ()))
        while not (maildir / "log.jsonl").exists():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return read_log(maildir)

    assert loop_thread.run(run_briefly()) == []
    printed = capsys.readouterr().out
    assert printed.startswith(f"sink listening on {HOST}:")
    assert printed.rstrip().endswith(f", maildir {maildir}")
    port = int(printed.split(f"{HOST}:", 1)[1].split(",", 1)[0])
    assert port > 0


# -- rule parsing ------------------------------------------------------------------------


@pytest.mark.parametrize("spec, expected", [
    ("bad@x.test=550 5.1.1 No such user", ReplyRule("bad@x.test", 550, "5.1.1 No such user", None)),
    ("Soft@X.test=451 4.3.0 Try later*2", ReplyRule("soft@x.test", 451, "4.3.0 Try later", 2)),
    ("*=421 4.7.0 Busy *10", ReplyRule("*", 421, "4.7.0 Busy", 10)),
    ("<a@x.test>=552", ReplyRule("a@x.test", 552, "5.0.0 Rejected", None)),
])
def test_parse_reply_rule_accepts_documented_forms(spec, expected):
    assert parse_reply_rule(spec) == expected


@pytest.mark.parametrize("spec, complaint", [
    ("bad@x.test 550 No such user", "expected ADDRESS=CODE"),
    ("=550 5.1.1 No such user", "recipient"),
    ("not-an-address=550 x", "recipient"),
    ("bad@x.test=abc No such user", "3-digit"),
    ("bad@x.test=5500 No such user", "3-digit"),
    ("bad@x.test=199 too low", "code must be 200..599"),
    ("bad@x.test=600 too high", "code must be 200..599"),
    ("bad@x.test=451 4.3.0 Later*0", "at least 1"),
    ("bad@x.test=550 line\r\n250 injected", "single line"),
])
def test_parse_reply_rule_rejects_bad_specs(spec, complaint):
    with pytest.raises(ValueError, match=complaint.replace(".", r"\.")):
        parse_reply_rule(spec)

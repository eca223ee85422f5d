"""Bad input never costs a node: each kind of bad SMTP input gets its RFC 5321 reply,
nothing partial is committed, and the node keeps serving. Ends with a property-based run
(hypothesis, fixed seed) of random and mutated sessions against a real node."""
from __future__ import annotations

import base64
import re
import socket
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster import read_until_closed, Cluster, Sink, make_message, queued_as, set_config, submission_count, wait_for
from raftmail.node.auth import hash_password
from raftmail.node.intake import Intake

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]

IDLE_TIMEOUT = 2.0
MAX_CONNECTIONS = 50
MAX_MESSAGE_BYTES = 20_000
USER, PASSWORD = "alice", "fuzzy password"
FUZZ_EXAMPLES = 200
REPLY_LINE = re.compile(r"^\d{3}(?:[ -].*)?$")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root: Path = tmp_path_factory.mktemp("fuzz")
    c = Cluster(root, 3, sink=Sink(root))
    # 127.0.0.2 must authenticate; plaintext AUTH is allowed on loopback here (no TLS configured).
    set_config(c, "intake", allow_networks=["127.0.0.1/32"], allow_plaintext_auth_on_loopback=True,
               idle_timeout=IDLE_TIMEOUT, max_connections=MAX_CONNECTIONS, max_message_bytes=MAX_MESSAGE_BYTES,
               max_recipients=5, auth_fail_delay=0.001, auth_fail_delay_max=0.01)
    c.config_path.write_text(c.config_path.read_text() + f'\n[intake.users]\n{USER} = "{hash_password(PASSWORD)}"\n')
    try:
        c.start_all_and_wait()
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def node(cluster: Cluster) -> str:
    return cluster.followers()[0]


def converse(c: Cluster, nid: str, payload: bytes, source: str = "127.0.0.1", timeout: float = 15.0) -> str:
    """Send `payload` in one go and return every reply until the node closes the connection."""
    with socket.create_connection(("127.0.0.1", c.smtp[nid]), source_address=(source, 0), timeout=timeout) as s:
        s.sendall(payload)
        return read_until_closed(s)


def crlf(*lines: bytes) -> bytes:
    return b"".join(line + b"\r\n" for line in lines)


def replies(text: str) -> list[str]:
    """Final reply lines (not the continuation lines of EHLO), greeting first."""
    return [line for line in text.split("\r\n") if line and line[3:4] != "-"]


ENVELOPE = (b"EHLO client.test", b"MAIL FROM:<news@example.com>", b"RCPT TO:<ann@example.com>", b"DATA")


def data_reply(c: Cluster, nid: str, body: bytes) -> str:
    """The reply to the final dot of one transaction whose message text is `body` (sent raw)."""
    text = converse(c, nid, crlf(*ENVELOPE) + body + crlf(b".", b"QUIT"))
    lines = replies(text)
    assert lines[-1].startswith("221"), text
    return lines[-2]


def assert_serves_next_client(c: Cluster, nid: str, before: int) -> None:
    """Nothing was committed for the bad input (the count is still `before`) and a well-formed
    submission right after is queued as usual."""
    code, text = c.submit(nid, ["next@example.com"], make_message(message_id=f"<next-{uuid.uuid4().hex}@example.com>"))
    assert code == 250, text
    wait_for(lambda: c.submission(nid, queued_as(text)), 10, "the next submission applied")
    assert submission_count(c, nid) == before + 1


# --------------------------------------------------------------------------------------------
# Each kind of bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "reply"), [
    (b"XYZZY", "500 5.5.1"),
    (b"\xff\xfe\x00", "500 5.5.2"),
    (b"EHLO", "501 5.5.4"),
    (b"MAIL FROM:news@example.com>", "501 5.5.4"),
    (b"MAIL FROM:<news@@example.com>", "553 5.1.3"),
    (b"MAIL FROM:<news@[192.0.2.1]>", "553 5.1.7"),
    (b"MAIL FROM:<news@example.com> FOO=BAR", "555 5.5.4"),
    (b"MAIL FROM:<news@example.com> SIZE=lots", "501 5.5.4"),
    (b"MAIL FROM:<news@example.com> BODY=BINARYMIME", "501 5.5.4"),
    (b"MAIL FROM:<news@example.com> SIZE=999999999", "552 5.3.4"),
    (b"RCPT TO:<ann@example.com>", "503 5.5.1"),
    (b"DATA", "503 5.5.1"),
    (b"MAIL FROM:<news\x00@example.com>", "500 5.5.2 NUL"),
    (b"MAIL FROM:<news@example.com>\rRCPT TO:<ann@example.com>", "500 5.5.2 Command lines must end with CRLF"),
    (b"AUTH PLAIN !!!", "501 5.5.2"),
    (b"AUTH CRAM-MD5", "504 5.5.4"),
])
def test_malformed_command_gets_its_reply_and_the_session_goes_on(cluster: Cluster, node: str, line: bytes,
                                                                   reply: str) -> None:
    text = converse(cluster, node, crlf(b"EHLO client.test", line, b"NOOP", b"QUIT"))
    lines = replies(text)
    assert lines[0].startswith("220") and lines[1].startswith("250"), text
    assert lines[2].startswith(reply), text
    assert lines[3:] == ["250 OK", "221 Bye"], text


def test_bare_lf_ending_a_command_is_refused(cluster: Cluster, node: str) -> None:
    text = converse(cluster, node, b"EHLO client.test\r\nNOOP\nMAIL FROM:<news@example.com>\nNOOP\r\nQUIT\r\n")
    lines = replies(text)
    assert [ln[:9] for ln in lines[2:]] == ["500 5.5.2", "500 5.5.2", "250 OK", "221 Bye"], text


def test_command_line_limit_is_512_bytes_with_crlf(cluster: Cluster, node: str) -> None:
    longest = b"NOOP " + b"x" * (512 - 2 - 5)
    text = converse(cluster, node, crlf(b"EHLO client.test", longest, longest + b"x", b"NOOP " + b"y" * 5000,
                                        b"NOOP", b"QUIT"))
    lines = replies(text)
    assert lines[2] == "250 OK", text
    assert lines[3].startswith("500 5.5.2 Command line too long"), text
    assert lines[4].startswith("500 5.5.2 Command line too long"), text
    assert lines[5:] == ["250 OK", "221 Bye"], text


def test_text_line_limit_is_998_bytes(cluster: Cluster, node: str) -> None:
    before = submission_count(cluster, node)
    for length in (999, 1001, 5000):
        reply = data_reply(cluster, node, crlf(b"Subject: long", b"", b"y" * length))
        assert reply.startswith("500 5.5.2 Line too long"), (length, reply)
        # Dot-stuffing does not count: 998 text bytes are 999 on the wire.
    assert_serves_next_client(cluster, node, before)
    reply = data_reply(cluster, node, crlf(b"Subject: longest", b"Message-ID: <l998@x.test>", b"", b"y" * 998,
                                           b"." + b"z" * 998))
    assert reply.startswith("250 2.0.0"), reply


def test_bare_cr_in_a_message_is_refused(cluster: Cluster, node: str) -> None:
    before = submission_count(cluster, node)
    reply = data_reply(cluster, node, b"Subject: bare CR\r\n\r\nhello\rworld\r\n")
    assert reply.startswith("554 5.6.0") and "bare CR or LF" in reply, reply
    assert_serves_next_client(cluster, node, before)


@pytest.mark.parametrize(("body", "stored"), [
    (b"Subject: bare LF\r\n\r\nhello\nworld\r\n", b"Subject: bare LF\r\n\r\nhello\r\nworld\r\n"),
    # What EmailMessage.as_bytes() and smtplib send: LF line ends, every line dot-stuffed.
    (b"Subject: stuffed\n\nsmtplib stuffs\n..every line\r\n",
     b"Subject: stuffed\r\n\r\nsmtplib stuffs\r\n.every line\r\n"),
    # SMTP smuggling: an end of data that a lenient receiver would honour is content here, and
    # goes on as a line of its own (delivery dot-stuffs it again).
    (b"Subject: smuggle\r\n\r\nhello\n.\nMAIL FROM:<evil@example.com>\nRCPT TO:<victim@example.com>\nDATA\nspam\r\n",
     b"Subject: smuggle\r\n\r\nhello\r\n\r\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\r\n"
     b"DATA\r\nspam\r\n"),
    (b"Subject: smuggle\r\n\r\nhello\r\n.\nMAIL FROM:<evil@example.com>\r\n",
     b"Subject: smuggle\r\n\r\nhello\r\n\r\nMAIL FROM:<evil@example.com>\r\n"),
    (b"Subject: smuggle\r\n\r\nhello\n.\r\nMAIL FROM:<evil@example.com>\r\n",
     b"Subject: smuggle\r\n\r\nhello\r\n\r\nMAIL FROM:<evil@example.com>\r\n"),
])
def test_bare_lf_is_normalized_and_never_ends_data(cluster: Cluster, node: str, body: bytes, stored: bytes) -> None:
    text = converse(cluster, node, crlf(*ENVELOPE) + body + crlf(b".", b"QUIT"))
    lines = replies(text)
    # One message and nothing smuggled: the only replies are the envelope's, one 250 and QUIT's.
    assert [line[:3] for line in lines] == ["220", "250", "250", "250", "354", "250", "221"], text
    sub = wait_for(lambda: cluster.submission(node, queued_as(lines[-2])), 10, "the submission applied")
    data = (cluster.data_dir(node) / "bodies" / sub["body"][:2] / sub["body"]).read_bytes()
    date, rest = data.split(b"\r\n", 1)
    assert re.fullmatch(rb"Date: \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d \+0000", date), date  # added: none sent
    assert rest == stored


def test_nul_in_a_message_is_refused(cluster: Cluster, node: str) -> None:
    before = submission_count(cluster, node)
    reply = data_reply(cluster, node, crlf(b"Subject: nul", b"", b"hello\x00world"))
    assert reply.startswith("554 5.6.0") and "NUL" in reply, reply
    assert_serves_next_client(cluster, node, before)


def test_content_check_of_a_large_message_is_linear() -> None:
    """10 MB of 900-byte lines: a backtracking check would take a minute and stall the node."""
    message = (b"y" * 900 + b"\r\n") * 11_000
    started = time.monotonic()
    assert Intake.content_refusal(message) is None
    assert Intake.content_refusal(message + b"z" * 999 + b"\r\n").startswith("500 5.5.2")
    assert time.monotonic() - started < 5


def test_8bit_message_without_8bitmime_is_accepted_byte_for_byte(cluster: Cluster, node: str) -> None:
    body = crlf(b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=", b"Date: Sat, 28 Nov 2026 10:00:00 +0000",
                f"Message-ID: <8bit-{uuid.uuid4().hex}@x.test>".encode(),
                b"Content-Type: text/plain; charset=utf-8", b"", "Grüße aus Köln, ½ €".encode())
    reply = data_reply(cluster, node, body)  # MAIL FROM without BODY=8BITMIME
    assert reply.startswith("250 2.0.0"), reply
    sub = wait_for(lambda: cluster.submission(node, queued_as(reply)), 10, "the 8-bit submission applied")
    digest = sub["body"]
    assert (cluster.data_dir(node) / "bodies" / digest[:2] / digest).read_bytes() == body


def test_smtputf8_addresses_need_the_smtputf8_parameter(cluster: Cluster, node: str) -> None:
    before = submission_count(cluster, node)
    text = converse(cluster, node, crlf(
        b"EHLO client.test",
        "MAIL FROM:<nëws@example.com>".encode(),          # no SMTPUTF8
        b"MAIL FROM:<news@example.com>",
        "RCPT TO:<ännä@example.com>".encode(),            # no SMTPUTF8 on this transaction
        b"RSET",
        b"MAIL FROM:<n\xffws@example.com> SMTPUTF8",       # not UTF-8
        b"QUIT"))
    lines = replies(text)
    assert lines[2].startswith("553 5.6.7"), text
    assert lines[3].startswith("250"), text
    assert lines[4].startswith("553 5.6.7"), text
    assert lines[6].startswith("553 5.6.7"), text
    assert submission_count(cluster, node) == before

    message = make_message(message_id=f"<utf8-{uuid.uuid4().hex}@example.com>")
    text = converse(cluster, node, crlf(b"EHLO client.test", "MAIL FROM:<nëws@exämple.com> SMTPUTF8".encode(),
                                        b"QUIT"))
    # Every copy's Message-ID and Return-Path carry the sender domain: its xn-- form is needed.
    assert replies(text)[2].startswith("553 5.1.7"), text
    text = converse(cluster, node, crlf(b"EHLO client.test", "MAIL FROM:<nëws@xn--exmple-cua.com> SMTPUTF8".encode(),
                                        "RCPT TO:<ännä@example.com>".encode(), b"DATA") + message + crlf(b".", b"QUIT"))
    lines = replies(text)
    assert lines[-2].startswith("250 2.0.0"), text
    sub = wait_for(lambda: cluster.submission(node, queued_as(lines[-2])), 10, "the SMTPUTF8 submission applied")
    assert sub["sender"] == "nëws@xn--exmple-cua.com"
    assert [r["address"] for r in sub["recipients"]] == ["ännä@example.com"]


def test_disconnect_in_the_middle_of_data_commits_nothing(cluster: Cluster, node: str) -> None:
    before = submission_count(cluster, node)
    with socket.create_connection(("127.0.0.1", cluster.smtp[node]), timeout=10) as s:
        s.sendall(crlf(*ENVELOPE) + b"Subject: cut\r\n\r\nthe first half of the message\r\nand")
        buffered = b""
        while b"354" not in buffered:
            buffered += s.recv(4096)
    assert_serves_next_client(cluster, node, before)


def test_idle_client_gets_421_and_is_disconnected(cluster: Cluster, node: str) -> None:
    before = submission_count(cluster, node)
    with socket.create_connection(("127.0.0.1", cluster.smtp[node]), timeout=IDLE_TIMEOUT + 10) as idle, \
            socket.create_connection(("127.0.0.1", cluster.smtp[node]), timeout=IDLE_TIMEOUT + 10) as stalled:
        started = time.monotonic()
        idle.sendall(b"EHLO client.test\r\n")
        stalled.sendall(crlf(*ENVELOPE) + b"Subject: stalled\r\n\r\nhalf a line")  # then nothing more
        for s in (idle, stalled):
            assert replies(read_until_closed(s))[-1].startswith("421 4.4.2")
        took = time.monotonic() - started
    assert IDLE_TIMEOUT - 0.5 <= took <= IDLE_TIMEOUT + 5, took
    assert_serves_next_client(cluster, node, before)


def test_connection_limit_answers_421_and_the_node_keeps_serving(cluster: Cluster, node: str) -> None:
    before = submission_count(cluster, node)
    wait_for(lambda: cluster.status(node)["intake_connections"]["open"] == 0, 10, "no connection open")
    sockets = [socket.create_connection(("127.0.0.1", cluster.smtp[node]), timeout=10) for _ in range(300)]
    try:
        greetings = [s.recv(200).decode() for s in sockets]
        served = [g for g in greetings if g.startswith("220 ")]
        refused = [g for g in greetings if g.startswith("421 4.7.0")]
        assert len(served) == MAX_CONNECTIONS and len(refused) == 300 - MAX_CONNECTIONS, set(greetings)
    finally:
        for s in sockets:
            s.close()
    wait_for(lambda: cluster.status(node)["intake_connections"]["open"] == 0, 10, "the connections to close")
    assert_serves_next_client(cluster, node, before)


def test_plaintext_auth_on_loopback_when_the_config_allows_it(cluster: Cluster, node: str) -> None:
    token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
    text = converse(cluster, node, crlf(b"EHLO client.test", b"MAIL FROM:<news@example.com>", b"AUTH PLAIN " + token,
                                        b"MAIL FROM:<news@example.com>", b"QUIT"), source="127.0.0.2")
    assert "\r\n250-AUTH LOGIN PLAIN\r\n" in text, text
    assert [ln[:9] for ln in replies(text)[2:]] == ["530 5.7.0", "235 2.7.0", "250 2.1.0", "221 Bye"], text


# --------------------------------------------------------------------------------------------
# Property: random and mutated sessions
# --------------------------------------------------------------------------------------------

_AUTH_OK = b"AUTH PLAIN " + base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
_AUTH_BAD = b"AUTH PLAIN " + base64.b64encode(f"\0{USER}\0guess".encode())
SESSION_LINES = [
    b"EHLO fuzz.test", b"HELO fuzz.test", b"MAIL FROM:<news@example.com>",
    b"MAIL FROM:<news@example.com> BODY=8BITMIME SIZE=300", "MAIL FROM:<nëws@example.com> SMTPUTF8".encode(),
    b"MAIL FROM:<>", b"RCPT TO:<ann@example.com>", "RCPT TO:<bøb@example.net>".encode(), b"RCPT TO:<@x:y@z.test>",
    b"DATA", b"Subject: fuzz", b"Message-ID: <fuzz@example.com>", b"", b"hello", b"..dot", b".", b"RSET", b"NOOP",
    b"VRFY ann@example.com", b"HELP MAIL", _AUTH_OK, _AUTH_BAD, b"AUTH LOGIN", b"YWxpY2U=", b"*", b"STARTTLS",
    b"EXPN list", b"QUIT",
]
_NASTY = [b"\x00", b"\r", b"\n", b"\r\n", b"\x80", b"\xff", b"\xc3", b" ", b":", b"<", b">", b"=", b".", b"\t"]


@st.composite
def mutated_line(draw: st.DrawFn) -> bytes:
    line = bytearray(draw(st.sampled_from(SESSION_LINES)))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["insert", "replace", "delete", "truncate", "repeat"]))
        at = draw(st.integers(0, len(line)))
        if op == "insert":
            line[at:at] = draw(st.sampled_from(_NASTY) | st.binary(min_size=1, max_size=8))
        elif op == "replace" and at < len(line):
            line[at] = draw(st.integers(0, 255))
        elif op == "delete":
            del line[at:at + draw(st.integers(1, 4))]
        elif op == "truncate":
            del line[at:]
        elif op == "repeat":
            line[at:at] = line[:at] * draw(st.integers(1, 30))
    return bytes(line)


LINE = st.one_of(
    st.sampled_from(SESSION_LINES), mutated_line(), st.binary(max_size=64),
    st.integers(490, 2200).map(lambda n: b"X" * n),
)
END = st.sampled_from([b"\r\n"] * 40 + [b"\n", b"\r", b"", b"\r\r\n"])


@st.composite
def transaction(draw: st.DrawFn) -> list[bytes]:
    """A well-formed transaction, the base that mutations start from."""
    rcpts = draw(st.lists(st.sampled_from([b"ann@example.com", b"bob@example.net", "çé@example.org".encode()]),
                          min_size=1, max_size=6))
    body = draw(st.lists(st.sampled_from([b"hello", b"..a stuffed dot", b"", b"x" * 998, "ünï".encode(), b"-- "]),
                         max_size=5))
    utf8 = b" SMTPUTF8" if any(not r.isascii() for r in rcpts) else b""
    return ([b"MAIL FROM:<news@example.com>" + utf8] + [b"RCPT TO:<" + r + b">" for r in rcpts] + [b"DATA"]
            + [b"Subject: fuzz", b"Message-ID: <fuzz@example.com>", b""]
            + body + [b"."])


@st.composite
def structured_session(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    """EHLO, maybe AUTH, some transactions; then each line kept, mutated, dropped, repeated or
    joined by junk, and ended mostly with CRLF."""
    base = [draw(st.sampled_from([b"EHLO fuzz.test", b"HELO fuzz.test"]))]
    if draw(st.booleans()):
        base.append(draw(st.sampled_from([_AUTH_OK, _AUTH_BAD])))
    for _ in range(draw(st.integers(1, 3))):
        base += draw(transaction())
    out = []
    for line in base:
        action = draw(st.sampled_from(["keep"] * 20 + ["mutate", "drop", "repeat", "junk"]))
        if action == "mutate":
            line = draw(mutated_line()) if draw(st.booleans()) else line + draw(st.sampled_from(_NASTY))
        if action == "junk":
            out.append((draw(LINE), draw(END)))
        if action != "drop":
            out += [(line, draw(END))] * (2 if action == "repeat" else 1)
    return out


SESSION = st.tuples(
    st.one_of(structured_session(), structured_session(), st.lists(st.tuples(LINE, END), min_size=1, max_size=16)),
    st.sampled_from(["127.0.0.1", "127.0.0.1", "127.0.0.2"]),
)


def test_random_and_mutated_sessions_never_cost_the_node(cluster: Cluster, node: str) -> None:
    before = submission_count(cluster, node)
    queued: list[str] = []
    sessions_run: list[str] = []

    @settings(derandomize=True, database=None, max_examples=FUZZ_EXAMPLES, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(SESSION)
    def one_session(session: tuple[list[tuple[bytes, bytes]], str]) -> None:
        lines, source = session
        # Whatever state the session left behind, this ends any DATA or AUTH exchange, then QUIT.
        payload = b"".join(line + end for line, end in lines) + b"\r\n.\r\nQUIT\r\n"
        # Distinct Message-IDs, so repeated examples are queued rather than answered as duplicates.
        payload = payload.replace(b"<fuzz@", b"<fuzz-%d@" % len(sessions_run))
        sessions_run.append(source)
        text = converse(cluster, node, payload, source=source)
        assert text.startswith("220 "), text
        for reply in text.split("\r\n")[:-1]:
            assert REPLY_LINE.match(reply), (reply, text)
        assert "Local error in processing" not in text, text  # an exception escaped a handler
        queued.extend(re.findall(r"^250 2\.0\.0 Queued as (\S+):", text, re.MULTILINE))

    one_session()
    # Nothing partial: exactly the submissions answered "Queued as" were committed.
    wait_for(lambda: submission_count(cluster, node) == before + len(queued), 15,
             f"{len(queued)} queued submissions applied")
    log = cluster.log_text(node)
    assert "Traceback" not in log and "SMTP session error" not in log
    assert cluster.alive(node)
    assert_serves_next_client(cluster, node, before + len(queued))

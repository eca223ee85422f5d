"""The delivery SMTP client (node/smtp_client.py): PIPELINING against a scripted receiver that
shows what arrived in which order, the DATA payload, and receivers that break the protocol (every
reply is bounded, and a receiver that misbehaves costs its recipients a deferral, never a hang or
unbounded memory). Real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftmail.node.delivery import Outcome
from raftmail.node.routes import Route
from raftmail.node.smtp_client import MAX_QUEUED_REPLIES, MAX_REPLY_LINE_BYTES, data_payload
from test_delivery import make_messages, run_batch

pytestmark = pytest.mark.timeout(30)


# ---------------------------------------------------------------------------------------------
# PIPELINING (RFC 2920) and the DATA payload


class Scripted(asyncio.Protocol):
    """A receiver that offers PIPELINING and answers MAIL, RCPT and DATA only once all three have
    arrived: a client that waits for each reply before its next command gets no answer at all.
    `rcpt_reply` and `data_reply` are its answers; every line it reads is kept in `seen`."""

    def __init__(self, seen: list[bytes], rcpt_reply: bytes = b"250 ok", data_reply: bytes = b"354 go",
                 close_after_rcpt: bool = False) -> None:
        self.seen, self.rcpt_reply, self.data_reply = seen, rcpt_reply, data_reply
        self.close_after_rcpt = close_after_rcpt
        self.buffer = b""
        self.held: list[bytes] = []
        self.in_content = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(b"220 scripted ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            self.seen.append(line)
            self.answer(line)

    def answer(self, line: bytes) -> None:
        if self.in_content:
            if line == b".":
                self.in_content = False
                self.transport.write(b"250 2.0.0 queued\r\n")
            return
        verb = line[:4].upper()
        if verb == b"EHLO":
            self.transport.write(b"250-scripted\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
        elif verb in (b"MAIL", b"RCPT", b"DATA"):
            self.held.append(verb)
            if verb == b"DATA" and self.close_after_rcpt:
                self.transport.write(b"250 ok\r\n" + self.rcpt_reply + b"\r\n")
                self.transport.close()
            elif verb == b"DATA":  # the whole group is here: answer it in order
                self.transport.write(b"250 ok\r\n" + self.rcpt_reply + b"\r\n" + self.data_reply + b"\r\n")
                self.in_content = self.data_reply.startswith(b"354")
        elif verb == b"RSET":
            self.transport.write(b"250 reset\r\n")
        elif verb == b"QUIT":
            self.transport.write(b"221 bye\r\n")
            self.transport.close()


async def scripted_batch(count: int, **script: Any) -> tuple[list[Outcome], list[bytes]]:
    seen: list[bytes] = []
    listener = await asyncio.get_running_loop().create_server(lambda: Scripted(seen, **script), "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        return await run_batch([Route("127.0.0.1", port)], make_messages(count), command_timeout=1.0), seen
    finally:
        listener.close()


def test_pipelining_receiver_gets_mail_rcpt_and_data_in_one_write() -> None:
    outcomes, seen = asyncio.run(scripted_batch(3))
    # A client that waited for the reply to MAIL before sending RCPT would have timed out here.
    assert [(o.index, o.code, o.enhanced) for o in outcomes] == [(i, 250, "2.0.0") for i in range(3)]
    verbs = [line.split(b":")[0] if line[:4] in (b"MAIL", b"RCPT") else line for line in seen]
    assert verbs[:4] == [b"EHLO sender.raftmail.test", b"MAIL FROM", b"RCPT TO", b"DATA"]
    assert seen.count(b".") == 3 and seen.count(b"..dot") == 3  # content dot-stuffed, then the final dot


def test_pipelined_refusal_ends_a_stray_354_with_an_empty_message() -> None:
    # A receiver that refuses the recipient but still says 354 to DATA gets the final dot alone
    # (nothing of the message), then RSET; the refusal is the recipient's outcome.
    outcomes, seen = asyncio.run(scripted_batch(2, rcpt_reply=b"550 5.1.1 no such user"))
    assert [(o.code, o.enhanced) for o in outcomes] == [(550, "5.1.1")] * 2
    data = seen.index(b"DATA")
    assert seen[data + 1:data + 3] == [b".", b"RSET"]
    assert not any(line.startswith(b"Subject") for line in seen)


def test_a_refusal_before_the_connection_closes_is_the_outcome() -> None:
    # 421 to RCPT, then the receiver hangs up before answering DATA: its 421 is what the
    # recipient gets (a deferral with the receiver's reason), not a lost connection.
    outcomes, seen = asyncio.run(scripted_batch(2, rcpt_reply=b"421 4.3.2 closing, too busy",
                                                close_after_rcpt=True))
    assert [(o.code, o.enhanced) for o in outcomes] == [(421, "4.3.2")] * 2
    assert all("too busy" in o.text and not o.maybe_delivered for o in outcomes)
    assert seen.count(b"EHLO sender.raftmail.test") == 2  # reconnected once for the second


def test_pipelined_refusal_at_data_resets_and_goes_on() -> None:
    outcomes, seen = asyncio.run(scripted_batch(2, rcpt_reply=b"450 4.2.1 try later",
                                                data_reply=b"554 5.5.1 no valid recipients"))
    assert [(o.code, o.enhanced) for o in outcomes] == [(450, "4.2.1")] * 2  # the first refusal counts
    assert seen.count(b"RSET") == 2 and seen.count(b".") == 0


@pytest.mark.parametrize("message, wire", [
    (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
    (b"a\r\nb", b"a\r\nb\r\n.\r\n"),
    (b".a\r\n.\r\nb.\r\n", b"..a\r\n..\r\nb.\r\n.\r\n"),
    (b"a\nb\r.c\r\n", b"a\r\nb\r\n..c\r\n.\r\n"),
    (b"a\r\r\n.", b"a\r\n\r\n..\r\n.\r\n"),  # a lone CR is a line end too
])
def test_data_payload_line_ends_and_dot_stuffing(message: bytes, wire: bytes) -> None:
    assert data_payload(message) == wire


@given(st.binary(max_size=40).map(lambda b: bytes(b"ab.\r\n"[x % 5] for x in b)))
@settings(max_examples=500, deadline=None)
def test_data_payload_equals_the_plain_substitutions(message: bytes) -> None:
    # The counting fast path gives what the two substitutions always give.
    plain = re.sub(rb"\r\n|\n|\r(?!\n)", b"\r\n", message)
    plain = plain if plain.endswith(b"\r\n") else plain + b"\r\n"
    assert data_payload(message) == re.sub(rb"(?m)^\.", b"..", plain) + b".\r\n"


# ---------------------------------------------------------------------------------------------
# Receivers that break the protocol


class Hostile(asyncio.Protocol):
    """Greets with `greeting`, then answers every line it reads with `answer(line)`."""

    def __init__(self, greeting: bytes, answer: Callable[[bytes], bytes]) -> None:
        self.greeting, self.answer, self.buffer = greeting, answer, b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(self.greeting)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            if not self.transport.is_closing():
                self.transport.write(self.answer(line))


async def batch_against(greeting: bytes, answer: Callable[[bytes], bytes]) -> list[Outcome]:
    listener = await asyncio.get_running_loop().create_server(lambda: Hostile(greeting, answer), "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        return await asyncio.wait_for(
            run_batch([Route("127.0.0.1", port)], make_messages(3), command_timeout=2.0), 20)
    finally:
        listener.close()


def test_a_reply_line_without_end_is_cut_off() -> None:
    endless = b"250-" + b"x" * (4 * MAX_REPLY_LINE_BYTES)  # and never a line end
    outcomes = asyncio.run(batch_against(b"220 hostile\r\n", lambda line: endless))
    assert [o.code for o in outcomes] == [0, 0, 0]
    assert "reply line too long" in outcomes[0].text, outcomes[0].text


def test_replies_nobody_asked_for_break_the_session() -> None:
    flood = b"250 ok\r\n" * (4 * MAX_QUEUED_REPLIES)
    outcomes = asyncio.run(batch_against(b"220 hostile\r\n", lambda line: flood))
    assert [o.code for o in outcomes] == [0, 0, 0]
    assert all(not o.maybe_delivered for o in outcomes)  # no content was ever sent


def test_a_malformed_greeting_is_a_failed_connection() -> None:
    outcomes = asyncio.run(batch_against(b"hello there\r\n", lambda line: b""))
    assert [o.code for o in outcomes] == [0, 0, 0]
    assert outcomes[0].text.startswith("connection failed: ") and "malformed reply" in outcomes[0].text


def test_a_refused_greeting_is_a_failed_connection() -> None:
    outcomes = asyncio.run(batch_against(b"554 5.7.1 go away\r\n", lambda line: b""))
    assert [o.code for o in outcomes] == [0, 0, 0]
    assert "554 5.7.1 go away" in outcomes[0].text


@pytest.mark.parametrize("extra", [b"250 2.0.0 queued\r\n", b"354 go ahead\r\n"])
def test_two_replies_to_a_command_never_count_as_delivered(extra: bytes) -> None:
    # Paired one late, the extra reply would answer DATA (a 250 taken for "delivered", or a
    # 354 that lets the content go out before DATA was answered): the session breaks instead.
    def answer(line: bytes) -> bytes:
        verb = line[:4].upper()
        if verb == b"EHLO":
            return b"250 hostile\r\n"
        if verb == b"RCPT":
            return b"250 ok\r\n" + extra
        return b"354 go\r\n" if verb == b"DATA" else b"250 ok\r\n"
    outcomes = asyncio.run(batch_against(b"220 hostile\r\n", answer))
    assert [o.code for o in outcomes] == [0, 0, 0], [o.text for o in outcomes]
    assert all(not o.maybe_delivered for o in outcomes)


def test_a_250_to_data_is_not_a_delivery() -> None:
    # DATA answered 250 instead of 354: nothing was sent, so it cannot count as delivered, and
    # as no refusal either: the receiver is not following the protocol.
    outcomes, seen = asyncio.run(scripted_batch(2, data_reply=b"250 2.0.0 sure"))
    assert [o.code for o in outcomes] == [0, 0] and "unexpected reply to DATA" in outcomes[0].text
    assert not any(line.startswith(b"Subject") for line in seen)

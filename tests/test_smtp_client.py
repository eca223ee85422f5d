"""The delivery SMTP client (node/smtp_client.py) against receivers that break the protocol: every
reply is bounded, and a receiver that misbehaves costs its recipients a deferral, never a hang or
unbounded memory. Real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from raftmail.node.delivery import Outcome
from raftmail.node.routes import Route
from raftmail.node.smtp_client import MAX_QUEUED_REPLIES, MAX_REPLY_LINE_BYTES
from test_delivery import make_messages, run_batch

pytestmark = pytest.mark.timeout(30)


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
    from test_delivery import scripted_batch
    outcomes, seen = asyncio.run(scripted_batch(2, data_reply=b"250 2.0.0 sure"))
    assert [o.code for o in outcomes] == [0, 0] and "unexpected reply to DATA" in outcomes[0].text
    assert not any(line.startswith(b"Subject") for line in seen)

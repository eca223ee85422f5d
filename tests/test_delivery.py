"""Batch delivery against real aiosmtpd servers on 127.0.0.1, and route resolution."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.asyncresolver
import pytest
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from raftmail.node.delivery import (
    AMBIGUOUS_PREFIX,
    NO_ROUTE_TEXT,
    TLS_NOT_OFFERED_TEXT,
    TLS_UNTRUSTED_TEXT,
    Outcome,
    deliver_batch,
)
from dns_server import DnsServer
from raftmail.node.routes import Route, resolve_routes

try:
    from raftmail.node.config import Address
except ImportError:  # config.py is written by someone else and may not exist yet

    @dataclass(frozen=True)
    class Address:  # type: ignore[no-redef]
        host: str
        port: int


pytestmark = pytest.mark.timeout(60)

MAIL_FROM = "bounce@news.example.com"
HELO = "sender.raftmail.test"
CONNECT_TIMEOUT = 2.0
COMMAND_TIMEOUT = 5.0


# ---------------------------------------------------------------------------------------------
# A destination server that records what it receives


@dataclass
class Transaction:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    tls: bool
    login: bytes | None


# Whether the test servers offer PIPELINING (RFC 2920); every test here runs both ways.
OFFER_PIPELINING = [False]


@pytest.fixture(autouse=True, params=[False, True], ids=["one-by-one", "pipelined"])
def offer_pipelining(request: pytest.FixtureRequest):
    OFFER_PIPELINING[0] = request.param
    yield request.param
    OFFER_PIPELINING[0] = False


@dataclass
class Recorder:
    """aiosmtpd handler: records envelopes, refuses chosen RCPTs, can drop the connection."""

    reject: dict[str, str] = field(default_factory=dict)
    pipelining: bool = field(default_factory=lambda: OFFER_PIPELINING[0])
    ehlo_names: list[str] = field(default_factory=list)
    drop_on_data: set[str] = field(default_factory=set)
    stop_listening_on_drop: bool = False
    transactions: list[Transaction] = field(default_factory=list)
    rsets: int = 0
    quits: int = 0
    connections: int = 0
    logins: list[tuple[bytes, bytes]] = field(default_factory=list)
    listener: asyncio.AbstractServer | None = None

    async def handle_EHLO(self, server, session, envelope, hostname, responses) -> list[str]:
        session.host_name = hostname
        self.ehlo_names.append(hostname)
        return responses[:-1] + ["250-PIPELINING"] + responses[-1:] if self.pipelining else responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options) -> str:
        if address in self.reject:
            return self.reject[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope) -> str:
        if set(envelope.rcpt_tos) & self.drop_on_data:
            if self.stop_listening_on_drop and self.listener is not None:
                self.listener.close()
            server.transport.abort()  # the final reply to DATA is lost
            return "250 never seen"
        login = session.auth_data.login if isinstance(session.auth_data, LoginPassword) else None
        self.transactions.append(
            Transaction(envelope.mail_from, list(envelope.rcpt_tos), envelope.content, session.ssl is not None, login)
        )
        return "250 2.0.0 Ok: queued"

    async def handle_RSET(self, server, session, envelope) -> str:
        self.rsets += 1
        return "250 OK"

    async def handle_QUIT(self, server, session, envelope) -> str:
        self.quits += 1
        return "221 Bye"

    def authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        self.logins.append((auth_data.login, auth_data.password))
        ok = auth_data == LoginPassword(b"relay-user", b"relay-pass")
        # handled=False: let aiosmtpd send the 535 itself
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)


async def start_server(recorder: Recorder, **smtp_options: Any) -> tuple[asyncio.AbstractServer, int]:
    def factory() -> SMTP:
        recorder.connections += 1
        # hostname given so aiosmtpd does not look up our FQDN
        return SMTP(recorder, hostname="mx.raftmail.test", **smtp_options)

    listener = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    recorder.listener = listener
    return listener, listener.sockets[0].getsockname()[1]


def refusing_port() -> socket.socket:
    """A bound but not listening socket: connecting to its port is refused, and no one else gets it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def make_messages(count: int, domain: str = "example.org") -> list[tuple[int, str, bytes]]:
    return [
        (i, f"user{i}@{domain}", f"From: {MAIL_FROM}\r\nTo: user{i}@{domain}\r\nSubject: {i}\r\n\r\nHello {i}\r\n.dot\r\n".encode())
        for i in range(count)
    ]


async def run_batch(
    routes: list[Route],
    messages: Any,
    *,
    may_send: Callable[[], bool] = lambda: True,
    **options: Any,
) -> list[Outcome]:
    outcomes: list[Outcome] = []
    await deliver_batch(
        routes,
        MAIL_FROM,
        messages,
        helo_name=HELO,
        connect_timeout=options.pop("connect_timeout", CONNECT_TIMEOUT),
        command_timeout=options.pop("command_timeout", COMMAND_TIMEOUT),
        may_send=may_send,
        on_outcome=outcomes.append,
        **options,
    )
    return outcomes


async def wait_until(predicate: Callable[[], bool], deadline: float = 5.0) -> None:
    end = asyncio.get_running_loop().time() + deadline
    while not predicate():
        if asyncio.get_running_loop().time() > end:
            raise AssertionError("condition not met before deadline")
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------------------------------------
# deliver_batch


def test_five_messages_over_one_connection() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        listener, port = await start_server(recorder)
        messages = make_messages(5)
        outcomes = await run_batch([Route("127.0.0.1", port)], messages)
        await wait_until(lambda: recorder.quits == 1)
        listener.close()

        assert recorder.connections == 1
        assert [o.index for o in outcomes] == [0, 1, 2, 3, 4]
        assert all(o.code == 250 and o.enhanced == "2.0.0" for o in outcomes)
        assert {o.remote for o in outcomes} == {f"127.0.0.1:{port}"}
        assert len(recorder.transactions) == 5
        for (index, recipient, body), seen in zip(messages, recorder.transactions):
            assert seen.mail_from == MAIL_FROM
            assert seen.rcpt_tos == [recipient]  # one recipient per transaction
            assert seen.content == body  # dot-stuffing undone by the server: bytes intact

    asyncio.run(scenario())


def test_refused_recipient_reported_and_batch_continues() -> None:
    async def scenario() -> None:
        recorder = Recorder(reject={"user1@example.org": "550 5.1.1 <user1@example.org>: User unknown"})
        listener, port = await start_server(recorder)
        outcomes = await run_batch([Route("127.0.0.1", port)], make_messages(3))
        listener.close()

        assert [(o.index, o.code, o.enhanced) for o in outcomes] == [
            (0, 250, "2.0.0"),
            (1, 550, "5.1.1"),
            (2, 250, "2.0.0"),
        ]
        assert "User unknown" in outcomes[1].text
        assert [t.rcpt_tos for t in recorder.transactions] == [["user0@example.org"], ["user2@example.org"]]
        assert recorder.rsets == 1
        assert recorder.connections == 1

    asyncio.run(scenario())


def test_may_send_false_stops_without_outcomes() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        listener, port = await start_server(recorder)
        outcomes: list[Outcome] = []
        asked = 0

        def may_send() -> bool:
            nonlocal asked
            asked += 1
            return len(outcomes) < 2

        async def async_messages():  # the async-iterator form of `messages`
            for item in make_messages(5):
                yield item

        await deliver_batch(
            [Route("127.0.0.1", port)], MAIL_FROM, async_messages(), helo_name=HELO,
            connect_timeout=CONNECT_TIMEOUT, command_timeout=COMMAND_TIMEOUT,
            may_send=may_send, on_outcome=outcomes.append,
        )
        await wait_until(lambda: recorder.quits == 1)
        listener.close()

        assert [o.index for o in outcomes] == [0, 1]
        assert len(recorder.transactions) == 2
        assert asked == 3

    asyncio.run(scenario())


def test_may_send_false_from_the_start_opens_no_connection() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        listener, port = await start_server(recorder)
        outcomes = await run_batch([Route("127.0.0.1", port)], make_messages(3), may_send=lambda: False)
        listener.close()
        assert outcomes == []
        assert recorder.connections == 0

    asyncio.run(scenario())


def test_dead_first_route_falls_back_to_second() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        listener, port = await start_server(recorder)
        dead = refusing_port()
        try:
            routes = [Route("127.0.0.1", dead.getsockname()[1]), Route("127.0.0.1", port)]
            outcomes = await run_batch(routes, make_messages(3))
        finally:
            dead.close()
            listener.close()
        assert [o.code for o in outcomes] == [250, 250, 250]
        assert {o.remote for o in outcomes} == {f"127.0.0.1:{port}"}
        assert recorder.connections == 1

    asyncio.run(scenario())


def test_no_server_listening_gives_code_zero_for_every_message() -> None:
    async def scenario() -> None:
        dead1, dead2 = refusing_port(), refusing_port()
        ports = [dead1.getsockname()[1], dead2.getsockname()[1]]
        try:
            outcomes = await run_batch([Route("127.0.0.1", p) for p in ports], make_messages(4))
        finally:
            dead1.close()
            dead2.close()
        assert [o.index for o in outcomes] == [0, 1, 2, 3]
        assert all(o.code == 0 and o.enhanced is None for o in outcomes)
        assert all(o.text.startswith("connection failed: ") for o in outcomes)
        assert all(f"127.0.0.1:{p}" in outcomes[0].text for p in ports)

    asyncio.run(scenario())


def test_silent_server_times_out_into_code_zero() -> None:
    async def scenario() -> None:
        held: list[asyncio.Transport] = []

        class Silent(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                held.append(transport)  # accept, then never send a greeting

        listener = await asyncio.get_running_loop().create_server(Silent, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        started = asyncio.get_running_loop().time()
        outcomes = await run_batch([Route("127.0.0.1", port)], make_messages(2), connect_timeout=0.3)
        elapsed = asyncio.get_running_loop().time() - started
        listener.close()
        for transport in held:
            transport.close()
        assert [o.code for o in outcomes] == [0, 0]
        assert "connection failed" in outcomes[0].text
        assert len(held) == 1  # one attempt for the batch, not one per message
        assert elapsed < 3.0

    asyncio.run(scenario())


def test_no_route_gives_code_zero_without_inventing_a_bounce() -> None:
    async def scenario() -> None:
        outcomes = await run_batch([], make_messages(3))
        assert [(o.index, o.code, o.enhanced, o.text, o.remote) for o in outcomes] == [
            (i, 0, None, NO_ROUTE_TEXT, "") for i in range(3)
        ]

    asyncio.run(scenario())


def test_dropped_connection_reconnects_once_and_continues() -> None:
    async def scenario() -> None:
        recorder = Recorder(drop_on_data={"user1@example.org"})
        listener, port = await start_server(recorder)
        outcomes = await run_batch([Route("127.0.0.1", port)], make_messages(4))
        listener.close()

        assert [(o.index, o.code) for o in outcomes] == [(0, 250), (1, 0), (2, 250), (3, 250)]
        assert outcomes[1].text.startswith(AMBIGUOUS_PREFIX + "connection lost during DATA")
        assert [t.rcpt_tos for t in recorder.transactions] == [
            ["user0@example.org"], ["user2@example.org"], ["user3@example.org"],
        ]
        assert recorder.connections == 2

    asyncio.run(scenario())


def test_failed_reconnect_defers_the_rest() -> None:
    async def scenario() -> None:
        recorder = Recorder(drop_on_data={"user1@example.org"}, stop_listening_on_drop=True)
        _, port = await start_server(recorder)
        outcomes = await run_batch([Route("127.0.0.1", port)], make_messages(4))

        assert [(o.index, o.code) for o in outcomes] == [(0, 250), (1, 0), (2, 0), (3, 0)]
        assert outcomes[2].text.startswith("connection failed: ")
        assert outcomes[3].text == outcomes[2].text
        assert len(recorder.transactions) == 1

    asyncio.run(scenario())


def test_reconnect_budget_is_respected() -> None:
    async def scenario() -> None:
        recorder = Recorder(drop_on_data={"user0@example.org", "user1@example.org"})
        listener, port = await start_server(recorder)
        outcomes = await run_batch([Route("127.0.0.1", port)], make_messages(4), max_reconnects=1)
        listener.close()
        assert [o.code for o in outcomes] == [0, 0, 0, 0]
        assert "no reconnect left" in outcomes[2].text
        assert recorder.connections == 2
        assert recorder.transactions == []

    asyncio.run(scenario())


def test_require_tls_without_starttls_defers_everything() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        listener, port = await start_server(recorder)
        outcomes = await run_batch([Route("127.0.0.1", port)], make_messages(3), require_tls=True)
        listener.close()
        assert [(o.code, o.enhanced, o.text) for o in outcomes] == [(0, "4.7.10", TLS_NOT_OFFERED_TEXT)] * 3
        assert recorder.transactions == []

    asyncio.run(scenario())


def self_signed_relay(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    """A server context with the project's self-signed certificate for 127.0.0.1 (what
    `raftmail certs --host 127.0.0.1` writes), and the certificate's path to trust it by."""
    from raftmail.node.tls import server_context, write_self_signed
    cert_path, key_path = write_self_signed(tmp_path / "relay-tls", "127.0.0.1", overwrite=True)
    return server_context(cert_path, key_path), cert_path


async def relay_batch(tmp_path: Path, route_login: tuple[str, str] | None, **options: Any
                      ) -> tuple[list[Outcome], Recorder]:
    recorder = Recorder()
    context, _ = self_signed_relay(tmp_path)
    # AUTH is only offered after STARTTLS (aiosmtpd's default auth_require_tls=True)
    listener, port = await start_server(recorder, tls_context=context, authenticator=recorder.authenticate)
    route = Route("127.0.0.1", port, *(route_login or (None, None)))
    try:
        return await run_batch([route], make_messages(2), **options), recorder
    finally:
        listener.close()


def test_relay_with_an_untrusted_certificate_gets_no_password(tmp_path: Path) -> None:
    outcomes, recorder = asyncio.run(relay_batch(tmp_path, ("relay-user", "relay-pass")))
    assert [(o.code, o.enhanced) for o in outcomes] == [(0, "4.7.5")] * 2
    assert outcomes[0].text.startswith(TLS_UNTRUSTED_TEXT) and "self-signed" in outcomes[0].text, outcomes[0].text
    assert "tls_ca_file" in outcomes[0].text
    assert recorder.logins == [] and recorder.transactions == []  # no plaintext retry either


def test_relay_certificate_trusted_through_the_ca_file_gets_the_password(tmp_path: Path) -> None:
    _, cert_path = self_signed_relay(tmp_path)
    outcomes, recorder = asyncio.run(relay_batch(tmp_path, ("relay-user", "relay-pass"), tls_ca_file=cert_path))
    assert [o.code for o in outcomes] == [250, 250]
    assert [(t.tls, t.login) for t in recorder.transactions] == [(True, b"relay-user")] * 2
    assert recorder.logins == [(b"relay-user", b"relay-pass")]


def test_require_tls_verifies_the_certificate(tmp_path: Path) -> None:
    outcomes, recorder = asyncio.run(relay_batch(tmp_path, None, require_tls=True))
    assert [(o.code, o.enhanced) for o in outcomes] == [(0, "4.7.5")] * 2
    assert recorder.transactions == []
    _, cert_path = self_signed_relay(tmp_path)
    outcomes, recorder = asyncio.run(relay_batch(tmp_path, None, require_tls=True, tls_ca_file=cert_path))
    assert [o.code for o in outcomes] == [250, 250]
    assert [t.tls for t in recorder.transactions] == [True, True]


def test_opportunistic_tls_and_tls_verify_false_do_not_verify(tmp_path: Path) -> None:
    # No password, no require_tls: encrypt with whatever certificate the receiver has.
    outcomes, recorder = asyncio.run(relay_batch(tmp_path, None))
    assert [o.code for o in outcomes] == [250, 250] and [t.tls for t in recorder.transactions] == [True, True]
    # [delivery] tls_verify = false: the operator's explicit choice.
    outcomes, recorder = asyncio.run(relay_batch(tmp_path, ("relay-user", "relay-pass"), tls_verify=False))
    assert [o.code for o in outcomes] == [250, 250]
    assert recorder.logins == [(b"relay-user", b"relay-pass")]


def test_rejected_auth_defers_instead_of_bouncing(tmp_path: Path) -> None:
    async def scenario() -> None:
        recorder = Recorder()
        context, cert_path = self_signed_relay(tmp_path)
        listener, port = await start_server(recorder, tls_context=context, authenticator=recorder.authenticate)
        route = Route("127.0.0.1", port, "relay-user", "wrong")
        outcomes = await run_batch([route], make_messages(2), tls_ca_file=cert_path)
        listener.close()
        assert [o.code for o in outcomes] == [0, 0]
        assert "AUTH failed" in outcomes[0].text
        assert recorder.transactions == []

    asyncio.run(scenario())


def test_bad_helo_name_is_a_configuration_error() -> None:
    with pytest.raises(ValueError):
        asyncio.run(
            deliver_batch(
                [Route("127.0.0.1", 9)], MAIL_FROM, make_messages(1), helo_name="bad name",
                connect_timeout=1, command_timeout=1, may_send=lambda: True, on_outcome=lambda o: None,
            )
        )


# ---------------------------------------------------------------------------------------------
# resolve_routes, with a tiny authoritative DNS server on 127.0.0.1 (never the real DNS)


ZONE = {
    ("mx.test.", "MX"): ["20 backup.mx.test.", "10 primary.mx.test.", "30 last.mx.test."],
    ("nomx.test.", "A"): ["192.0.2.10"],
    ("nomx.test.", "AAAA"): ["2001:db8::10"],
    ("nullmx.test.", "MX"): ["0 ."],
    ("empty.test.", "TXT"): ['"nothing for mail"'],
}


def resolve(domain: str, resolver: dns.asyncresolver.Resolver | None, **overrides: Any):
    options: dict[str, Any] = dict(routes={}, relay=None, relay_username=None, relay_password=None)
    options.update(overrides)
    return resolve_routes(domain, resolver=resolver, **options)


def test_resolve_per_domain_route_then_relay_without_dns() -> None:
    async def scenario() -> None:
        server = DnsServer(ZONE)
        resolver = server.resolver()
        try:
            routes = {"Example.ORG": Address("127.0.0.1", 2525)}
            relay = Address("127.0.0.1", 587)
            per_domain = await resolve("example.org.", resolver, routes=routes, relay=relay, relay_username="u", relay_password="p")
            assert per_domain == [Route("127.0.0.1", 2525)]
            relayed = await resolve("other.test", resolver, routes=routes, relay=relay, relay_username="u", relay_password="p")
            assert relayed == [Route("127.0.0.1", 587, "u", "p")]
            assert server.queries == []
        finally:
            server.close()

    asyncio.run(scenario())


def test_resolve_mx_in_preference_order() -> None:
    async def scenario() -> None:
        server = DnsServer(ZONE)
        resolver = server.resolver()
        try:
            routes = await resolve("MX.test", resolver, port=2526)
            # The hosts have no addresses in our DNS: the connection resolves their names itself.
            assert routes == [Route("primary.mx.test", 2526), Route("backup.mx.test", 2526), Route("last.mx.test", 2526)]
            assert server.queries[0] == ("mx.test.", "MX")
        finally:
            server.close()

    asyncio.run(scenario())


def test_mx_hosts_are_reached_at_the_addresses_our_resolver_gives() -> None:
    async def scenario() -> None:
        zone = {**ZONE, ("primary.mx.test.", "A"): ["127.0.0.5"], ("primary.mx.test.", "AAAA"): ["::1"]}
        with DnsServer(zone) as server:
            routes = await resolve("mx.test", server.resolver(), port=2526)
        # TLS still checks the certificate against the host name (route.host).
        assert routes[:2] == [Route("primary.mx.test", 2526, address="127.0.0.5"),
                              Route("primary.mx.test", 2526, address="::1")]
        assert routes[2:] == [Route("backup.mx.test", 2526), Route("last.mx.test", 2526)]

    asyncio.run(scenario())


def test_resolve_implicit_mx_null_mx_and_missing_domain() -> None:
    async def scenario() -> None:
        server = DnsServer(ZONE)
        resolver = server.resolver()
        try:
            assert await resolve("nomx.test", resolver) == [Route("192.0.2.10", 25), Route("2001:db8::10", 25)]
            assert await resolve("nullmx.test", resolver) == []
            assert await resolve("empty.test", resolver) == []
            assert await resolve("missing.test", resolver) == []
            assert ("nullmx.test.", "A") not in server.queries  # null MX: no fallback to addresses
        finally:
            server.close()

    asyncio.run(scenario())


def test_resolve_address_literal() -> None:
    async def scenario() -> None:
        assert await resolve("[127.0.0.1]", None, port=2527) == [Route("127.0.0.1", 2527)]
        assert await resolve("[IPv6:::1]", None) == [Route("::1", 25)]
        assert Route("::1", 25).remote == "[::1]:25"

    asyncio.run(scenario())

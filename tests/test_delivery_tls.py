"""Certificate checks on delivery, end to end on a real 3-node cluster: the cluster file's
[delivery] tls_ca_file and the default tls_verify reach the sender. Two real SMTP receivers with
STARTTLS and the project's self-signed certificates (`raftmail certs`): the relay, whose
certificate the cluster trusts through tls_ca_file, gets the password and the mail; a require_tls
domain's server, whose certificate nobody vouches for, gets nothing and its recipient is deferred
with 4.7.5."""
from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from cluster import Cluster, free_ports, make_message, queued_as, wait_for
from raftmail.node.tls import server_context, write_self_signed

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]


class Receiver:
    """Records what arrives and who logged in."""

    def __init__(self) -> None:
        self.logins: list[bytes] = []
        self.recipients: list[str] = []
        self.tls: list[bool] = []

    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        self.logins.append(auth_data.login)
        ok = auth_data == LoginPassword(b"relay-user", b"relay-pass")
        return AuthResult(success=ok, handled=False)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.recipients += envelope.rcpt_tos
        self.tls.append(session.ssl is not None)
        return "250 2.0.0 OK"


def tls_receiver(folder: Path, port: int, receiver: Receiver) -> Controller:
    cert, key = write_self_signed(folder, "127.0.0.1")
    controller = Controller(receiver, hostname="127.0.0.1", port=port, server_hostname="receiver.test",
                            tls_context=server_context(cert, key), authenticator=receiver.authenticate, auth_require_tls=True)
    controller.start()
    return controller


@pytest.fixture
def receivers(tmp_path: Path) -> Iterator[tuple[Receiver, Receiver, list[int]]]:
    relay, strict = Receiver(), Receiver()
    ports = free_ports(2)
    controllers = [tls_receiver(tmp_path / "relay-tls", ports[0], relay),
                   tls_receiver(tmp_path / "strict-tls", ports[1], strict)]
    try:
        yield relay, strict, ports
    finally:
        for controller in controllers:
            controller.stop()


def test_relay_password_only_to_a_verified_certificate(tmp_path: Path, receivers: tuple) -> None:
    relay, strict, (relay_port, strict_port) = receivers
    (tmp_path / "cluster").mkdir()
    c = Cluster(tmp_path / "cluster", 3, extra_toml=f'[delivery.routes]\n"strict.test" = "127.0.0.1:{strict_port}"\n'
                                                    '[delivery.domains."strict.test"]\nrequire_tls = true\n')
    # The relay: the TLS receiver above, with a password, trusted through tls_ca_file.
    text = re.sub(r'(?m)^relay = .*$', f'relay = "127.0.0.1:{relay_port}"\nrelay_username = "relay-user"\n'
                  f'relay_password = "relay-pass"\ntls_ca_file = "{tmp_path / "relay-tls" / "cert.pem"}"',
                  c.config_path.read_text())
    c.config_path.write_text(text)
    try:
        leader = c.start_all_and_wait()
        code, reply = c.submit(leader, ["ann@example.com", "bob@strict.test"],
                               make_message(message_id=f"<tls-{uuid.uuid4().hex}@x.test>"))
        assert code == 250, reply
        sid = queued_as(reply)
        wait_for(lambda: relay.recipients == ["ann@example.com"], 30, "the relay to get ann's copy")
        assert relay.logins == [b"relay-user"] and relay.tls == [True]

        def deferred() -> list[dict]:
            events = c.get(leader, "/events?after=0&limit=1000")["events"]
            return [e for e in events if e["recipient"] == "bob@strict.test" and e["outcome"] == "deferred"]
        bob = wait_for(deferred, 30, "bob@strict.test deferred")
        assert bob[0]["code"] == 0 and "4.7.5 TLS certificate not trusted" in bob[0]["text"], bob
        assert strict.recipients == [] and strict.logins == []
        assert c.submission(leader, sid) is not None
    finally:
        c.close()

"""Intake against strangers, on a real 3-node cluster: per-client connection limits, a time limit
for sessions outside allow_networks that do not authenticate, a total deadline for DATA, control
characters escaped in the log, failed logins not logged. Clients outside allow_networks bind to
other loopback addresses (127.0.0.2 and up); the IPv6 /64 test runs in a network namespace."""
from __future__ import annotations

import base64
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from cluster import Cluster, Sink, make_message, run_cli, set_config, submission_count, wait_for
from test_monitoring import scrape

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]

PER_CLIENT = 5
MAX_CONNECTIONS = 20
MAX_STRANGERS = 10
UNAUTHENTICATED_TIMEOUT = 3.0
DATA_TIMEOUT = 2.0
USER, PASSWORD = "alice", "correct horse battery staple"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root: Path = tmp_path_factory.mktemp("limits")
    line = subprocess.run([sys.executable, "-m", "raftmail.cli", "passwd", USER, "--password-stdin"],
                          input=PASSWORD + "\n", capture_output=True, text=True, timeout=30)
    assert line.returncode == 0, line.stderr
    c = Cluster(root, 3, sink=Sink(root))
    set_config(c, "intake", allow_networks=["127.0.0.1/32"], max_connections=MAX_CONNECTIONS,
               max_connections_per_client=PER_CLIENT, max_stranger_connections=MAX_STRANGERS,
               unauthenticated_timeout=UNAUTHENTICATED_TIMEOUT,
               data_timeout=DATA_TIMEOUT, idle_timeout=30, allow_plaintext_auth_on_loopback=True,
               auth_fail_delay=0.1, auth_fail_delay_max=1.0)
    c.config_path.write_text(c.config_path.read_text() + "\n[intake.users]\n" + line.stdout)
    try:
        c.start_all_and_wait()
        yield c
    finally:
        c.close()


class Client:
    """A raw SMTP client on its own socket, bound to `source`."""

    def __init__(self, c: Cluster, nid: str, source: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", c.smtp[nid]), source_address=(source, 0), timeout=10)
        self.file = self.sock.makefile("rb")

    def reply(self) -> bytes:
        line = self.file.readline()
        while line[3:4] == b"-":
            line = self.file.readline()
        return line

    def command(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def closed_by_server(self) -> bool:
        """True once the server has closed (EOF readable); never blocks."""
        readable, _, _ = select.select([self.sock], [], [], 0)
        return bool(readable) and self.sock.recv(1, socket.MSG_PEEK) == b""

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def test_a_stranger_cannot_take_every_slot(cluster: Cluster) -> None:
    nid = cluster.ids[0]
    before = cluster.status(nid)["intake_connections"]
    strangers = [Client(cluster, nid, "127.0.0.2") for _ in range(MAX_CONNECTIONS + 5)]
    try:
        greetings = [s.reply() for s in strangers]
        admitted = [g for g in greetings if g.startswith(b"220")]
        refused = [g for g in greetings if g.startswith(b"421 4.7.0")]
        assert len(admitted) == PER_CLIENT and len(refused) == MAX_CONNECTIONS, greetings
        assert all(b"from your address" in g for g in refused), refused
        # The stranger's connections are open and idle; 127.0.0.1 still submits.
        code, text = cluster.submit(nid, ["ann@example.com"], make_message(message_id=f"<slot-{uuid.uuid4().hex}@x.test>"))
        assert code == 250, text
        assert sum(not s.closed_by_server() for s in strangers) == PER_CLIENT
        # Another stranger address has its own allowance.
        other = Client(cluster, nid, "127.0.0.3")
        assert other.reply().startswith(b"220")
        other.close()
    finally:
        for s in strangers:
            s.close()
    after = cluster.status(nid)["intake_connections"]
    assert after["refused_per_client"] - before.get("refused_per_client", 0) == MAX_CONNECTIONS


def strangers_open(c: Cluster, nid: str) -> int:
    return c.status(nid)["intake_connections"].get("strangers", 0)


def test_strangers_from_many_addresses_leave_the_reserve_to_allow_networks(cluster: Cluster) -> None:
    nid = cluster.ids[2]
    wait_for(lambda: strangers_open(cluster, nid) == 0, 10, "earlier tests' strangers to be gone")
    # One connection per address, more addresses than there are slots in all.
    strangers = [Client(cluster, nid, f"127.0.0.{10 + i}") for i in range(MAX_CONNECTIONS + 5)]
    member = None
    try:
        greetings = [s.reply() for s in strangers]
        admitted = [s for s, g in zip(strangers, greetings) if g.startswith(b"220")]
        refused = [g for g in greetings if not g.startswith(b"220")]
        assert len(admitted) == MAX_STRANGERS, greetings
        assert all(g.startswith(b"421 4.7.0") and b"outside the allowed networks" in g for g in refused), refused
        # The strangers hold their whole share; 127.0.0.1 (allow_networks) still gets in and submits.
        local = Client(cluster, nid, "127.0.0.1")
        assert local.reply().startswith(b"220")
        local.close()
        code, text = cluster.submit(nid, ["ann@example.com"], make_message(message_id=f"<reserve-{uuid.uuid4().hex}@x.test>"))
        assert code == 250, text
        # A stranger that authenticates is a user: it leaves the strangers' share.
        admitted[0].close()
        wait_for(lambda: strangers_open(cluster, nid) == MAX_STRANGERS - 1, 10, "a stranger's slot to be free")
        member = Client(cluster, nid, "127.0.0.60")
        assert member.reply().startswith(b"220")
        assert member.command(b"EHLO client.test").startswith(b"250")
        token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
        assert member.command(b"AUTH PLAIN " + token).startswith(b"235")
        another = Client(cluster, nid, "127.0.0.61")
        assert another.reply().startswith(b"220")
        another.close()
    finally:
        for s in strangers:
            s.close()
        if member is not None:
            member.close()
    after = cluster.status(nid)["intake_connections"]
    assert after["refused_strangers"] >= len(refused)


def test_intake_counters_are_exported_to_prometheus(cluster: Cluster) -> None:
    nid = cluster.ids[1]
    names = ("raftmail_intake_refused_per_client_total", "raftmail_intake_unauthenticated_timeouts_total",
             "raftmail_intake_data_timeouts_total")
    before = scrape(cluster, nid)
    assert all((name, frozenset()) in before for name in names), sorted(k[0] for k in before)
    strangers = [Client(cluster, nid, "127.0.0.7") for _ in range(PER_CLIENT + 2)]
    try:
        greetings = [s.reply() for s in strangers]
        assert sum(g.startswith(b"421 4.7.0") for g in greetings) == 2, greetings
    finally:
        for s in strangers:
            s.close()
    after = scrape(cluster, nid)
    assert after[(names[0], frozenset())] - before[(names[0], frozenset())] == 2


def test_unauthenticated_stranger_is_closed_after_the_time_limit(cluster: Cluster) -> None:
    nid = cluster.ids[1]
    stranger, member = Client(cluster, nid, "127.0.0.4"), Client(cluster, nid, "127.0.0.5")
    try:
        started = time.monotonic()
        for s in (stranger, member):
            assert s.reply().startswith(b"220")
            assert s.command(b"EHLO client.test").startswith(b"250")
        token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
        assert member.command(b"AUTH PLAIN " + token).startswith(b"235")
        # NOOPs keep both sessions from being idle; only the one that authenticated may stay.
        cut = None
        while time.monotonic() - started < UNAUTHENTICATED_TIMEOUT + 3:
            answer = stranger.command(b"NOOP")
            if not answer.startswith(b"250"):
                cut = answer
                break
            assert member.command(b"NOOP").startswith(b"250")
            time.sleep(0.2)
        took = time.monotonic() - started
        assert cut is not None and cut.startswith(b"421 4.7.0") and b"Not authenticated" in cut, cut
        assert UNAUTHENTICATED_TIMEOUT - 0.1 <= took <= UNAUTHENTICATED_TIMEOUT + 1.5, took
        assert stranger.file.readline() == b""  # and closed
        assert member.command(b"NOOP").startswith(b"250")
        assert member.command(b"MAIL FROM:<news@example.com>").startswith(b"250")
    finally:
        stranger.close()
        member.close()


def test_slow_drip_data_is_cut_at_the_deadline_and_nothing_is_committed(cluster: Cluster) -> None:
    nid = cluster.ids[2]
    cluster.wait_converged()
    before = {n: submission_count(cluster, n) for n in cluster.ids}
    mid = f"<drip-{uuid.uuid4().hex}@x.test>"
    s = Client(cluster, nid, "127.0.0.1")
    try:
        assert s.reply().startswith(b"220")
        for command, code in ((b"EHLO client.test", b"250"), (b"MAIL FROM:<news@example.com>", b"250"),
                              (b"RCPT TO:<drip@example.com>", b"250"), (b"DATA", b"354")):
            assert s.command(command).startswith(code)
        started = time.monotonic()
        s.sock.sendall(f"Message-ID: {mid}\r\nSubject: drip\r\n\r\n".encode())
        cut = b""
        while time.monotonic() - started < DATA_TIMEOUT + 4:  # a line every 0.3 s: never idle
            readable, _, _ = select.select([s.sock], [], [], 0.3)
            if readable:
                cut = s.reply()
                break
            try:
                s.sock.sendall(b"drip\r\n")
            except OSError:
                break
        took = time.monotonic() - started
    finally:
        s.close()
    assert cut.startswith(b"421 4.4.2") and b"nothing was queued" in cut, cut
    assert DATA_TIMEOUT - 0.1 <= took <= DATA_TIMEOUT + 1.5, took
    code, text = cluster.submit(nid, ["next@example.com"], make_message(message_id=f"<after-{uuid.uuid4().hex}@x.test>"))
    assert code == 250, text
    cluster.wait_converged()
    assert {n: submission_count(cluster, n) for n in cluster.ids} == {n: before[n] + 1 for n in cluster.ids}
    assert cluster.status(nid)["intake_connections"]["data_timeouts"] >= 1
    assert scrape(cluster, nid)[("raftmail_intake_data_timeouts_total", frozenset())] >= 1


def test_control_characters_are_escaped_in_the_log(cluster: Cluster) -> None:
    nid = cluster.ids[0]
    sender = '"\x1b[31mred\x1b[0m"@example.com'
    s = Client(cluster, nid, "127.0.0.1")
    try:
        assert s.reply().startswith(b"220")
        for command, code in ((b"EHLO client.test", b"250"), (f"MAIL FROM:<{sender}>".encode(), b"250"),
                              (b"RCPT TO:<ann@example.com>", b"250"), (b"DATA", b"354")):
            assert s.command(command).startswith(code), command
        s.sock.sendall(make_message(message_id=f"<esc-{uuid.uuid4().hex}@x.test>") + b".\r\n")
        assert s.reply().startswith(b"250")
    finally:
        s.close()
    wait_for(lambda: "\\x1b[31mred\\x1b[0m" in cluster.log_text(nid), 10, "the escaped sender in the log")
    assert "\x1b" not in cluster.log_text(nid)


def test_a_failed_login_is_not_logged(cluster: Cluster) -> None:
    nid = cluster.ids[1]
    typed = "MyPassw0rd-typed-as-login"
    s = Client(cluster, nid, "127.0.0.6")
    try:
        assert s.reply().startswith(b"220")
        assert s.command(b"EHLO client.test").startswith(b"250")
        for login in (typed, USER):
            token = base64.b64encode(f"\0{login}\0wrong".encode())
            assert s.command(b"AUTH PLAIN " + token).startswith(b"535")
    finally:
        s.close()
    def failures() -> list[str]:
        return [ln for ln in cluster.log_text(nid).splitlines() if "AUTH failed" in ln and "127.0.0.6" in ln]
    lines = wait_for(lambda: len(failures()) >= 2 and failures(), 10, "two failed AUTHs in the log")
    assert typed not in cluster.log_text(nid) and "Passw0rd" not in cluster.log_text(nid)
    assert "an unknown login (tag " in lines[0] and f"user {USER} " in lines[1], lines


# --------------------------------------------------------------------------------------------
# IPv6: a client is its /64 (in a network namespace of its own, with addresses on its loopback)
# --------------------------------------------------------------------------------------------

IPV6_SCRIPT = r'''
import asyncio, json, socket, ssl, subprocess, sys, time, base64
from pathlib import Path
from raftmail.node.auth import hash_password
from raftmail.node.config import load_config
from raftmail.node.intake import Intake
from raftmail.node.smtp_server import start_smtp_server
from raftmail.node.tls import write_self_signed

root = Path(sys.argv[1])
ADDRS = ["2001:db8:9::1", "2001:db8:1::10", "2001:db8:1::20", "2001:db8:2::10"]
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
for a in ADDRS:
    subprocess.run(["ip", "-6", "addr", "add", f"{a}/64", "dev", "lo", "nodad"], check=True)
write_self_signed(root / "tls", "2001:db8:9::1", overwrite=True)
(root / "cluster.toml").write_text(
    '[cluster]\nname = "t"\nsecret = "' + "s" * 32 + '"\ndata_dir = "data"\n'
    '[[node]]\nid = "n1"\nraft = "127.0.0.1:7101"\nsmtp = "127.0.0.1:2501"\nadmin = "127.0.0.1:8101"\n'
    '[intake]\nallow_networks = ["127.0.0.1/32"]\nauth_fail_delay = 0.4\nauth_fail_delay_max = 5\n'
    'max_connections_per_client = 3\ntls_cert = "tls/cert.pem"\ntls_key = "tls/key.pem"\n'
    '[intake.users]\nalice = "' + hash_password("right") + '"\n')
intake = Intake(load_config(root / "cluster.toml"), "n1", None, None, None, lambda: 1)
context = ssl.create_default_context(cafile=str(root / "tls" / "cert.pem"))

async def open_from(source, port):
    return await asyncio.open_connection("2001:db8:9::1", port, local_addr=(source, 0))

async def reply(reader):
    line = await reader.readline()
    while line[3:4] == b"-":
        line = await reader.readline()
    return line

async def failed_auth(source, port):
    reader, writer = await open_from(source, port)
    await reply(reader)
    for command in (b"EHLO c.test", b"STARTTLS"):
        writer.write(command + b"\r\n"); await reply(reader)
    await writer.start_tls(context, server_hostname="2001:db8:9::1")
    writer.write(b"EHLO c.test\r\n"); await reply(reader)
    started = time.monotonic()
    writer.write(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0wrong") + b"\r\n")
    answer = await reply(reader)
    took = time.monotonic() - started
    writer.close()
    return answer.decode().strip(), took

async def main():
    server = await start_smtp_server(intake, "2001:db8:9::1", 0, hostname="intake.test")
    port = server.sockets[0].getsockname()[1]
    out = {}
    out["first"] = await failed_auth("2001:db8:1::10", port)
    out["same_64"] = await failed_auth("2001:db8:1::20", port)
    out["other_64"] = await failed_auth("2001:db8:2::10", port)
    while intake.connections["open"]:  # the server has seen those three leave
        await asyncio.sleep(0.01)
    held, greetings = [], []
    for source in ["2001:db8:1::10", "2001:db8:1::20"] * 3:
        reader, writer = await open_from(source, port)
        greetings.append((await reply(reader)).decode().strip())
        held.append(writer)
    out["greetings"] = greetings
    for writer in held:
        writer.close()
    server.close()
    print(json.dumps(out))

asyncio.run(main())
'''


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None,
                    reason="needs root, unshare (util-linux) and ip (iproute2) for a network namespace")
def test_ipv6_clients_are_counted_per_64(tmp_path: Path) -> None:
    done = subprocess.run(["unshare", "--net", sys.executable, "-c", IPV6_SCRIPT, str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    (first, t1), (same, t2), (other, t3) = out["first"], out["same_64"], out["other_64"]
    assert first.startswith("535") and same.startswith("535") and other.startswith("535"), out
    # Another address of the same /64 waits for the /64's earlier failure (0.4 s) and then for its
    # second (0.8 s); a client of another /64 only for its own first failure (0.4 s).
    assert t2 >= 1.15, out
    assert t3 < 1.15, out
    # Three connections per client: the /64's two addresses share them.
    assert [g[:3] for g in out["greetings"]] == ["220"] * 3 + ["421"] * 3, out
    assert all("from your address" in g for g in out["greetings"][3:]), out

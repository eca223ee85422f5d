"""Intake security: who may submit (allow_networks, SMTP AUTH after STARTTLS), not an
open relay, the slow-down for failed AUTH, `raftmail passwd` / `raftmail certs`, and config
mistakes refused at start. Cluster tests run real node processes; clients outside the allowed
network bind to other loopback addresses (127.0.0.2 and up)."""
from __future__ import annotations

import base64
import re
import smtplib
import socket
import ssl
import subprocess
import time
import tomllib
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from aiosmtpd.smtp import Session
from cryptography import x509

from cluster import (read_until_closed, PY, Cluster, Sink, make_message, queued_as, run_cli, set_config, submission_count,
                     wait_for)
from raftmail.node.auth import (AUTH_FAIL_TIMES_PER_CLIENT, FailureThrottle, hash_password, parse_hash,
                                verify_password)
from raftmail.node.config import load_config
from raftmail.node.intake import Intake
from raftmail.node.tls import TLSConfigError, server_context, write_self_signed

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(90)]

USER, PASSWORD = "alice", "correct horse battery staple"
OUTSIDE = "127.0.0.2"  # loopback, but not in allow_networks below
FAIL_DELAY = 0.2


# --------------------------------------------------------------------------------------------
# Password hashes, the failure throttle, certificates (no cluster)
# --------------------------------------------------------------------------------------------


def test_password_hashes_are_salted_and_verify_only_the_right_password() -> None:
    first, second = hash_password("s3cret"), hash_password("s3cret")
    assert first != second  # a random salt each time
    assert first.startswith("scrypt$")
    assert verify_password("s3cret", first) and verify_password(b"s3cret", second)
    assert not verify_password("s3cret ", first)
    assert not verify_password("", first)
    assert not verify_password("x" * 5000, first)


@pytest.mark.parametrize("text", ["", "plain-password", "scrypt$16384$8$1$bm9$", "scrypt$3$8$1$AAAAAAAAAAA=$"
                                  + "A" * 44, "bcrypt$16384$8$1$AAAAAAAAAAA=$" + "A" * 44,
                                  "scrypt$16384$8$1$!!!$" + "A" * 44])
def test_damaged_hash_is_refused_without_echoing_it(text: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_hash(text)
    assert "raftmail passwd" in str(caught.value)
    assert not text or text not in str(caught.value)


def test_failure_throttle_doubles_caps_and_forgets() -> None:
    throttle = FailureThrottle(1.0, cap=5.0, window=60.0)
    assert throttle.delay("192.0.2.1", now=0) == 0
    delays = []
    for i in range(6):
        throttle.record_failure("192.0.2.1", now=i)
        delays.append(throttle.delay("192.0.2.1", now=i))
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert throttle.delay("192.0.2.2", now=5) == 0  # per address
    assert throttle.delay("192.0.2.1", now=100) == 0  # all older than the window


def test_failure_throttle_memory_is_bounded() -> None:
    throttle = FailureThrottle(1.0, max_addresses=10)
    for i in range(100):
        throttle.record_failure(f"10.0.0.{i}")
    assert throttle.recent("10.0.0.99") == 1
    assert throttle.recent("10.0.0.0") == 0


def test_failure_throttle_counts_ipv6_per_64_and_bounds_each_client() -> None:
    throttle = FailureThrottle(1.0, cap=30.0, window=60.0, max_addresses=10)
    throttle.record_failure("2001:db8:1:2::1", now=0)
    assert throttle.delay("2001:db8:1:2:ffff::9", now=0) == 1.0  # same /64
    assert throttle.delay("2001:db8:1:3::1", now=0) == 0  # the next /64
    assert throttle.delay("::ffff:192.0.2.1", now=0) == 0
    throttle.record_failure("::ffff:192.0.2.1", now=0)
    assert throttle.recent("192.0.2.1", now=0) == 1  # IPv4-mapped is the IPv4 client
    for i in range(10000):
        throttle.record_failure("192.0.2.7", now=i * 0.001)
    assert throttle.recent("192.0.2.7", now=10) == AUTH_FAIL_TIMES_PER_CLIENT
    assert throttle.delay("192.0.2.7", now=10) == 30.0
    assert len(throttle) <= 10


def test_self_signed_pair_serves_tls_and_a_mismatched_pair_is_refused(tmp_path: Path) -> None:
    cert, key = write_self_signed(tmp_path / "a", "127.0.0.1")
    other_cert, other_key = write_self_signed(tmp_path / "b", "mail.example.test")
    assert isinstance(server_context(cert, key), ssl.SSLContext)
    assert key.stat().st_mode & 0o077 == 0
    names = x509.load_pem_x509_certificate(other_cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["mail.example.test"]
    with pytest.raises(TLSConfigError, match="does not belong"):
        server_context(cert, other_key)
    with pytest.raises(TLSConfigError, match="PEM"):
        server_context(cert, cert)


def intake_for(tmp_path: Path, intake_toml: str) -> Intake:
    """An Intake for its decisions only (who may submit, may AUTH): nothing here stores or commits."""
    path = tmp_path / "cluster.toml"
    path.write_text(f'[cluster]\nname = "t"\nsecret = "{"s" * 32}"\ndata_dir = "data"\n'
                    '[[node]]\nid = "n1"\nraft = "127.0.0.1:7101"\nsmtp = "127.0.0.1:2501"\nadmin = "127.0.0.1:8101"\n'
                    f"[intake]\n{intake_toml}\n")
    return Intake(load_config(path), "n1", None, None, None, lambda: 1)  # type: ignore[arg-type]


def session_from(peer: str, *, tls: bool = False, authenticated: bool = False) -> Session:
    session = Session(None)  # type: ignore[arg-type]
    session.peer = (peer, 40000)
    session.ssl = {"cipher": "test"} if tls else None
    session.authenticated = authenticated or None
    return session


def test_who_may_submit_is_decided_by_allow_networks_or_auth(tmp_path: Path) -> None:
    intake = intake_for(tmp_path, 'allow_networks = ["10.1.0.0/16", "2001:db8::/32"]\n'
                                  f'allow_plaintext_auth_on_loopback = true\n[intake.users]\nu = "{hash_password("pw")}"')
    for peer in ("10.1.2.3", "2001:db8::7", "::ffff:10.1.0.9"):
        assert intake.submission_refusal(session_from(peer)) is None, peer
    for peer in ("10.2.0.1", "127.0.0.1", "::1", "2001:db9::1", ""):
        assert intake.submission_refusal(session_from(peer)).startswith("530 5.7.0"), peer
    assert intake.submission_refusal(session_from("192.0.2.1", authenticated=True)) is None
    # AUTH: over TLS from anywhere; in plaintext only from loopback, as this config allows.
    assert intake.auth_refusal(session_from("192.0.2.1", tls=True)) is None
    assert intake.auth_refusal(session_from("127.0.0.5")) is None
    assert intake.auth_refusal(session_from("192.0.2.1")).startswith("538 5.7.11")


def test_without_users_auth_is_not_available(tmp_path: Path) -> None:
    intake = intake_for(tmp_path, "")
    assert intake.auth is None
    assert intake.auth_refusal(session_from("127.0.0.1", tls=True)).startswith("502 5.5.1")
    assert intake.submission_refusal(session_from("127.0.0.1")) is None  # the default networks
    assert intake.submission_refusal(session_from("::1")) is None
    assert intake.submission_refusal(session_from("192.0.2.1")).startswith("530")


# --------------------------------------------------------------------------------------------
# The commands
# --------------------------------------------------------------------------------------------


def raftmail(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "raftmail.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=30)


def test_passwd_prints_a_line_for_intake_users() -> None:
    done = raftmail("passwd", "news@example.com", "--password-stdin", stdin="hunter2 but longer\n")
    assert done.returncode == 0, done.stderr
    users = tomllib.loads(done.stdout)
    assert list(users) == ["news@example.com"]
    assert verify_password("hunter2 but longer", users["news@example.com"])
    assert "hunter2" not in done.stdout and "hunter2" not in done.stderr

    refused = raftmail("passwd", "two words", "--password-stdin", stdin="x\n")
    assert refused.returncode == 2 and "login" in refused.stderr
    empty = raftmail("passwd", "bob", "--password-stdin", stdin="\n")
    assert empty.returncode == 2 and "empty" in empty.stderr


def test_certs_writes_a_pair_and_refuses_to_overwrite_it(tmp_path: Path) -> None:
    out = tmp_path / "tls"
    done = raftmail("certs", "--out", str(out), "--host", "mail.example.test", "--days", "30")
    assert done.returncode == 0, done.stderr
    paths = tomllib.loads(done.stdout)["intake"]
    assert isinstance(server_context(Path(paths["tls_cert"]), Path(paths["tls_key"])), ssl.SSLContext)
    cert = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes())
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 29 < lifetime.days <= 31
    before = (out / "key.pem").read_bytes()
    again = raftmail("certs", "--out", str(out), "--host", "mail.example.test")
    assert again.returncode == 2 and "already exists" in again.stderr
    assert (out / "key.pem").read_bytes() == before
    forced = raftmail("certs", "--out", str(out), "--host", "mail.example.test", "--force")
    assert forced.returncode == 0 and (out / "key.pem").read_bytes() != before


# --------------------------------------------------------------------------------------------
# A cluster that allows only 127.0.0.1 without AUTH
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root: Path = tmp_path_factory.mktemp("secure")
    made = raftmail("certs", "--out", str(root / "tls"), "--host", "127.0.0.1")
    assert made.returncode == 0, made.stderr
    line = raftmail("passwd", USER, "--password-stdin", stdin=PASSWORD + "\n")
    assert line.returncode == 0, line.stderr
    c = Cluster(root, 3, sink=Sink(root))
    set_config(c, "intake", allow_networks=["127.0.0.1/32"], tls_cert="tls/cert.pem", tls_key="tls/key.pem",
               auth_fail_delay=FAIL_DELAY, auth_fail_delay_max=2.0)
    c.config_path.write_text(c.config_path.read_text() + "\n[intake.users]\n" + line.stdout)
    try:
        c.start_all_and_wait()
        yield c
    finally:
        c.close()


def client(c: Cluster, nid: str, source: str = OUTSIDE) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", c.smtp[nid], source_address=(source, 0), timeout=15)
    s.ehlo("client.test")
    return s


def start_tls(c: Cluster, s: smtplib.SMTP) -> None:
    """STARTTLS, verifying the node's certificate (made by `raftmail certs` for 127.0.0.1)."""
    context = ssl.create_default_context(cafile=str(c.root / "tls" / "cert.pem"))
    code, _ = s.starttls(context=context)
    assert code == 220
    s.ehlo("client.test")


def auth_plain(s: smtplib.SMTP, user: str, password: str) -> tuple[int, bytes]:
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return s.docmd("AUTH", f"PLAIN {token}")


def all_counts(c: Cluster) -> dict[str, int]:
    return {nid: submission_count(c, nid) for nid in c.ids}


def test_allowed_network_submits_without_auth(secure: Cluster) -> None:
    code, text = secure.submit(secure.ids[0], ["ann@example.com"],
                               make_message(message_id=f"<inside-{uuid.uuid4().hex}@example.com>"))
    assert code == 250, text


def test_unauthenticated_rcpt_from_outside_allow_networks_is_refused(secure: Cluster) -> None:
    with client(secure, secure.ids[0]) as s:
        code, text = s.mail("news@example.com")
        assert (code, text[:5]) == (530, b"5.7.0"), text
        for domain in ("example.com", "gmail.com", "localhost", "[127.0.0.1]", "example.net"):
            code, text = s.rcpt(f"someone@{domain}")
            assert (code, text[:5]) == (530, b"5.7.0"), (domain, text)
        code, text = s.docmd("DATA")
        assert code == 530, text


def test_auth_is_offered_only_after_starttls(secure: Cluster) -> None:
    with client(secure, secure.ids[1]) as s:
        assert s.has_extn("starttls")
        assert not s.has_extn("auth")
        code, text = auth_plain(s, USER, PASSWORD)
        assert (code, text[:6]) == (538, b"5.7.11"), text
        start_tls(secure, s)
        assert set(s.esmtp_features["auth"].split()) == {"PLAIN", "LOGIN"}
        assert not s.has_extn("starttls")
        code, text = s.docmd("STARTTLS")  # RFC 3207: no second TLS layer
        assert (code, text[:5]) == (503, b"5.5.1"), text
        assert s.noop()[0] == 250


def test_after_auth_over_starttls_rcpt_is_accepted(secure: Cluster) -> None:
    nid = secure.ids[1]
    with client(secure, nid) as s:
        start_tls(secure, s)
        code, text = auth_plain(s, USER, PASSWORD)
        assert (code, text[:5]) == (235, b"2.7.0"), text
        assert s.mail("news@example.com")[0] == 250
        for rcpt in ("ann@example.com", "bob@gmail.com"):
            code, text = s.rcpt(rcpt)
            assert code == 250, text
        code, text = s.data(make_message(message_id=f"<auth-{uuid.uuid4().hex}@example.com>"))
        assert code == 250, text
    sid = queued_as(text.decode())
    for other in secure.ids:
        sub = wait_for(lambda other=other: secure.submission(other, sid), 10, f"{sid} on {other}")
        assert [r["address"] for r in sub["recipients"]] == ["ann@example.com", "bob@gmail.com"]


def test_auth_login_mechanism_over_starttls(secure: Cluster) -> None:
    with client(secure, secure.ids[2]) as s:
        start_tls(secure, s)
        s.user, s.password = USER, PASSWORD
        code, text = s.auth("LOGIN", s.auth_login, initial_response_ok=False)
        assert code == 235, text
        code, text = s.rcpt("x@example.com")  # RCPT before MAIL is now a sequence error, not 530
        assert code == 503, text
        assert s.mail("news@example.com")[0] == 250
        assert s.rcpt("ann@example.com")[0] == 250


def test_not_an_open_relay(secure: Cluster) -> None:
    """Without AUTH, a client outside allow_networks cannot get one recipient accepted by any
    route: plain or pipelined, HELO or EHLO, after STARTTLS, after a failed or aborted AUTH."""
    secure.wait_converged()  # earlier tests' submissions applied everywhere: the counts hold still
    before = all_counts(secure)
    external = ["victim@gmail.com", "victim@example.org", "postmaster@[127.0.0.1]", "root@localhost",
                "victim%gmail.com@example.com", "@relay.example:victim@gmail.com"]
    for nid in secure.ids:
        with client(secure, nid) as s:  # EHLO, one command at a time
            for rcpt in external:
                assert s.mail("news@example.com")[0] == 530
                assert s.rcpt(rcpt)[0] == 530
                assert s.docmd("DATA")[0] == 530
            assert s.mail("")[0] == 530  # null sender too
        with smtplib.SMTP("127.0.0.1", secure.smtp[nid], source_address=(OUTSIDE, 0), timeout=15) as s:
            s.helo("client.test")  # plain SMTP, no extensions
            assert s.mail("news@example.com")[0] == 530
            assert s.rcpt(external[0])[0] == 530
        with client(secure, nid) as s:  # after STARTTLS, then a wrong password, then an aborted AUTH
            start_tls(secure, s)
            assert s.mail("news@example.com")[0] == 530
            assert auth_plain(s, USER, "wrong password")[0] == 535
            assert s.docmd("AUTH", "LOGIN")[0] == 334
            assert s.docmd("*")[0] == 501
            assert s.mail("news@example.com")[0] == 530
            assert s.rcpt(external[0])[0] == 530
        replies = pipelined(secure, nid, [b"EHLO client.test", b"MAIL FROM:<news@example.com>",
                                          b"RCPT TO:<victim@gmail.com>", b"DATA", b"Subject: relay me",
                                          b"", b"spam", b".", b"QUIT"])
        assert "250 2.0.0" not in replies and "354" not in replies, replies
        assert re.findall(r"^530 5\.7\.0", replies, re.MULTILINE), replies
    assert all_counts(secure) == before
    victims = {rcpt.lower() for rcpt in external}
    assert not [e for e in secure.sink.delivered() if e["rcpt"].lower() in victims]


def pipelined(c: Cluster, nid: str, lines: list[bytes], source: str = OUTSIDE) -> str:
    """Send every line in one write (as a pipelining client would); all replies until EOF."""
    with socket.create_connection(("127.0.0.1", c.smtp[nid]), source_address=(source, 0), timeout=10) as s:
        s.sendall(b"".join(line + b"\r\n" for line in lines))
        return read_until_closed(s)


def timed_failed_auth(c: Cluster, nid: str, source: str) -> float:
    with client(c, nid, source) as s:
        start_tls(c, s)
        started = time.monotonic()
        code, text = auth_plain(s, USER, "not the password")
        took = time.monotonic() - started
        assert (code, text[:5]) == (535, b"5.7.8"), text
    return took


def test_repeated_failed_auth_is_slowed_down_and_logged(secure: Cluster) -> None:
    nid, source = secure.ids[0], "127.0.0.3"  # its own address: the slow-down is per address
    first = timed_failed_auth(secure, nid, source)
    second = timed_failed_auth(secure, nid, source)
    third = timed_failed_auth(secure, nid, source)
    # 1st: answered after FAIL_DELAY; 2nd waits FAIL_DELAY, fails, waits 2*FAIL_DELAY; 3rd 2x + 4x.
    assert first >= FAIL_DELAY
    assert second >= 3 * FAIL_DELAY
    assert third >= 6 * FAIL_DELAY
    log = wait_for(lambda: [ln for ln in secure.log_text(nid).splitlines()
                            if "AUTH failed" in ln and source in ln], 5, "failed AUTH in the log")
    assert any("3 recent failures" in ln for ln in log), log
    assert PASSWORD not in secure.log_text(nid) and "not the password" not in secure.log_text(nid)
    with client(secure, nid, source) as s:  # the right password still works, after the wait
        start_tls(secure, s)
        assert auth_plain(s, USER, PASSWORD)[0] == 235


def test_too_many_failed_auth_on_one_connection_closes_it(secure: Cluster) -> None:
    nid = secure.ids[2]
    with client(secure, nid, "127.0.0.4") as s:
        start_tls(secure, s)
        assert auth_plain(s, USER, "wrong 1")[0] == 535
        assert auth_plain(s, "nobody", "wrong 2")[0] == 535
        code, text = auth_plain(s, USER, "wrong 3")
        assert (code, text[:5]) == (421, b"4.7.0"), text
        with pytest.raises((smtplib.SMTPServerDisconnected, OSError)):
            s.noop()
    code, text = secure.submit(nid, ["ann@example.com"], make_message(message_id=f"<after-{uuid.uuid4().hex}@x.test>"))
    assert code == 250, text


def test_failed_tls_handshake_does_not_cost_the_node(secure: Cluster) -> None:
    nid = secure.ids[0]
    # A TLS record that is no ClientHello, plaintext instead of a handshake, and a client that leaves.
    for garbage in (b"\x16\x03\x01\x00\x05hello", b"EHLO still-plaintext\r\n", b""):
        with socket.create_connection(("127.0.0.1", secure.smtp[nid]), source_address=(OUTSIDE, 0), timeout=10) as s:
            s.recv(1024)
            s.sendall(b"EHLO client.test\r\nSTARTTLS\r\n")
            time.sleep(0.2)  # let the 220 arrive before the garbage: not synchronisation of the node
            s.sendall(garbage)
            if not garbage:
                s.shutdown(socket.SHUT_WR)
            s.settimeout(10)
            assert "220 Ready to start TLS" in read_until_closed(s)
    wait_for(lambda: secure.status(nid)["intake_connections"]["open"] == 0, 10, "connections to close")
    code, text = secure.submit(nid, ["ann@example.com"], make_message(message_id=f"<tls-{uuid.uuid4().hex}@x.test>"))
    assert code == 250, text


# --------------------------------------------------------------------------------------------
# Config mistakes: one line, exit 2, before anything listens
# --------------------------------------------------------------------------------------------


def broken_copy(c: Cluster, tmp_path: Path, old: str, new: str) -> Path:
    text = c.config_path.read_text()
    assert old in text
    path = tmp_path / "cluster.toml"
    path.write_text(text.replace(old, new))
    (tmp_path / "tls").mkdir(exist_ok=True)
    for name in ("cert.pem", "key.pem"):
        (tmp_path / "tls" / name).write_bytes((c.root / "tls" / name).read_bytes())
    return path


@pytest.mark.parametrize(("old", "new", "fragments"), [
    ('tls_key = "tls/key.pem"', 'tls_key = "tls/missing.pem"', ["[intake] tls_key", "cannot read", "missing.pem"]),
    ('tls_key = "tls/key.pem"', 'tls_key = "tls"', ["[intake] tls_key", "cannot read"]),
    ('tls_key = "tls/key.pem"', 'tls_key = "tls/cert.pem"', ["[intake] tls_key", "cannot serve STARTTLS"]),
    ('data_dir = "data"', 'data_dir = "blocker/data"', ["[cluster] data_dir", "not writable"]),
])
def test_config_mistakes_are_refused_at_start_with_one_line(secure: Cluster, tmp_path: Path, old: str, new: str,
                                                            fragments: list[str]) -> None:
    path = broken_copy(secure, tmp_path, old, new)
    (tmp_path / "blocker").write_text("a file where the data folder should be\n")
    done = run_cli(path, "start", "--node", "n1")
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and all(f in lines[0] for f in fragments), lines[0]


@pytest.mark.cluster
@pytest.mark.timeout(120)
def test_state_changing_admin_calls_need_the_token(make_cluster) -> None:
    import json
    import urllib.error
    import urllib.request
    token = "admin-token-0123456789abcdef"
    c = make_cluster(start=False)
    set_config(c, "cluster", admin_token=token)
    leader = c.start_all_and_wait()
    code, text = c.submit(leader, ["a@example.com"], make_message(message_id="<tok@x>", campaign="tok"))
    assert code == 250, text

    def post(path: str, auth: str | None) -> int:
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {auth}"
        req = urllib.request.Request(f"http://127.0.0.1:{c.admin[leader]}{path}", data=b"{}",
                                     headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    for path in ("/campaigns/tok/pause", "/campaigns/tok/cancel", "/cluster/transfer", "/cluster/leave",
                 "/cluster/join"):
        assert post(path, None) == 401, path
        assert post(path, "wrong-token-0123456789") == 401, path
    assert not c.get(leader, "/campaigns")["campaigns"][0]["paused"]
    # The CLI reads the token from the cluster file.
    r = run_cli(c.config_path, "pause", "tok")
    assert r.returncode == 0, r.stderr
    assert c.get(leader, "/campaigns")["campaigns"][0]["paused"]
    assert json.loads(run_cli(c.config_path, "status", "--json").stdout)["leader"] == leader

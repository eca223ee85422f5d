"""Delivery on a real 3-node cluster delivering into a real capture sink: exactly-once campaign
delivery, deferral and retry, bounces and suppression, per-domain throttles, a sender killed
mid-batch, pause/resume/cancel from the CLI, and DKIM-signed per-recipient headers."""
from __future__ import annotations

import base64
import json
import re
import signal
import subprocess
import sys
import time
from email import message_from_bytes, policy
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from cluster import (SECRET, Cluster, deliveries_per_recipient, make_message, peak_connections,
                     queued_as, run_cli, wait_for)
from raftmail.node.feedback import FeedbackKeys
from raftmail.node.message import recipient_message_id

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]

TOKEN_KEY = "unsubscribe-token-key-0123456789abcdef"
REPORT_EVERY = 50  # [delivery] report_every default: outcomes buffered before a report is forced
DONE_TIMEOUT = 60.0  # seconds a test waits for a campaign to finish
_OUTCOME = re.compile(r"outcome campaign=(\S+) submission=(\S+) recipient=(\S+) node=(\S+) batch=(\S+) "
                      r"code=(\d+) state=(\S+)")


# ---------------------------------------------------------------- fixtures and helpers

def addresses(prefix: str, n: int, domain: str = "example.com") -> list[str]:
    return [f"{prefix}{i:04d}@{domain}" for i in range(n)]


def submit_ok(c: Cluster, nid: str, rcpts: list[str], message: bytes | None = None) -> str:
    code, text = c.submit(nid, rcpts, message)
    assert code == 250, text
    return queued_as(text)


def live(c: Cluster) -> list[str]:
    return [n for n in c.ids if c.alive(n)]


def campaign(c: Cluster, cid: str) -> dict | None:
    """The campaign summary from the first live node that answers."""
    for nid in live(c):
        try:
            for camp in c.get(nid, "/campaigns")["campaigns"]:
                if camp["id"] == cid:
                    return camp
        except OSError:
            continue
    return None


def wait_campaign_done(c: Cluster, cid: str, timeout: float = DONE_TIMEOUT) -> dict:
    def done():
        camp = campaign(c, cid)
        return camp if camp and camp["percent_done"] == 100.0 and camp["counts"]["in_flight"] == 0 else None
    return wait_for(done, timeout, f"campaign {cid} to finish", interval=0.2)


def recipients(c: Cluster, nid: str, sid: str) -> dict[str, dict]:
    """address -> recipient record (state, attempts, code, ...) of one submission on one node."""
    sub = c.submission(nid, sid)
    return {r["address"]: r for r in sub["recipients"]} if sub else {}


def outcome_lines(c: Cluster, nid: str) -> list[dict]:
    """The `outcome ...` lines a node logged: one per recipient it attempted."""
    keys = ("campaign", "submission", "recipient", "node", "batch", "code", "state")
    return [dict(zip(keys, m.groups())) for m in _OUTCOME.finditer(c.log_text(nid))]


def rcpt_codes(c: Cluster, address: str) -> list[int]:
    """The sink's RCPT answers to `address`, in order."""
    return [e["code"] for e in c.sink.events("rcpt") if e["rcpt"].lower() == address]


def sink_count(c: Cluster, prefix: str = "") -> int:
    return sum(1 for e in c.sink.delivered() if e["rcpt"].lower().startswith(prefix))


def hold_steady(observe, expected, seconds: float, what: str, interval: float = 0.1) -> None:
    """Observe for `seconds` that `observe()` keeps returning `expected` (an invariant over time)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got = observe()
        assert got == expected, f"{what}: expected {expected}, got {got}"
        time.sleep(interval)


def quiet_batches(c: Cluster, nid: str) -> bool:
    st = c.status(nid)
    return bool(st) and not st["batches_in_flight"]


# ---------------------------------------------------------------- 1. exactly once, many nodes

def test_thousand_recipient_campaign_delivered_exactly_once_by_several_nodes(make_cluster) -> None:
    c = make_cluster()
    follower = c.followers()[0]
    domains = ["example.com", "example.net", "example.org", "example.edu"]
    everyone: list[str] = []
    for s in range(10):
        rcpts = [f"s{s}r{i:03d}@{domains[i % len(domains)]}" for i in range(100)]
        everyone += rcpts
        submit_ok(c, follower, rcpts, make_message(subject=f"Spring {s}", campaign="spring"))

    summary = wait_campaign_done(c, "spring")
    assert summary["counts"]["delivered"] == 1000, summary

    counts = deliveries_per_recipient(c.sink)
    assert set(counts) == set(everyone)
    twice = {a: n for a, n in counts.items() if n != 1}
    assert not twice, f"delivered more than once: {twice}"

    per_node = {nid: sum(1 for o in outcome_lines(c, nid) if o["campaign"] == "spring") for nid in c.ids}
    print(f"outcomes per node: {per_node}")
    assert sum(per_node.values()) == 1000, per_node  # one outcome per recipient, cluster-wide
    assert sum(1 for n in per_node.values() if n > 0) >= 2, f"one node sent everything: {per_node}"

    cli = run_cli(c.config_path, "campaigns", "--json")
    assert cli.returncode == 0, cli.stderr
    shown = {x["id"]: x for x in json.loads(cli.stdout)["campaigns"]}["spring"]
    assert shown["percent_done"] == 100.0 and shown["recipients"] == 1000
    assert shown["counts"]["delivered"] == 1000


# ---------------------------------------------------------------- 2. deferral and retry

def test_soft_failure_is_deferred_then_retried_until_delivered(make_cluster) -> None:
    soft = "soft@example.com"
    c = make_cluster(replies=[f"{soft}=451 4.3.0 Try later*2"])
    nid = c.leader()
    sid = submit_ok(c, nid, [soft, "steady@example.com"])

    deferred = wait_for(lambda: (r := recipients(c, nid, sid).get(soft)) and r["state"] == "deferred" and r,
                        15, "the soft recipient to be deferred", interval=0.02)
    assert deferred["attempts"] >= 1 and deferred["code"] == 451
    assert deferred["next_at"] is not None and deferred["text"].startswith("4.3.0")

    final = wait_for(lambda: (r := recipients(c, nid, sid).get(soft)) and r["state"] == "delivered" and r,
                     30, "the soft recipient to be delivered after retries")
    assert final["attempts"] == 3, final
    assert recipients(c, nid, sid)["steady@example.com"]["attempts"] == 1

    assert rcpt_codes(c, soft) == [451, 451, 250]
    tries = [e["t"] for e in c.sink.events("rcpt") if e["rcpt"].lower() == soft]
    gaps = [b - a for a, b in zip(tries, tries[1:])]
    # retry_first = 1 s, doubling, +/-20 % jitter: no retry comes before its backoff.
    assert gaps[0] >= 0.8 and gaps[1] >= 1.6, gaps
    assert deliveries_per_recipient(c.sink)[soft] == 1


# ---------------------------------------------------------------- 3. bounces and suppression

def test_bad_mailbox_is_suppressed_but_policy_bounce_is_not(make_cluster) -> None:
    gone, blocked = "gone@example.com", "blocked@example.com"
    c = make_cluster(replies=[f"{gone}=550 5.1.1 No such user", f"{blocked}=550 5.7.1 Rejected by policy"])
    nid = c.leader()
    first = submit_ok(c, nid, [gone, blocked, "ok1@example.com"])
    wait_for(lambda: all(r["state"] in ("bounced", "delivered") for r in recipients(c, nid, first).values()),
             20, "first submission to finish")
    rs = recipients(c, nid, first)
    assert (rs[gone]["state"], rs[gone]["code"]) == ("bounced", 550)
    assert (rs[blocked]["state"], rs[blocked]["code"]) == ("bounced", 550)
    assert rs["ok1@example.com"]["state"] == "delivered"
    assert c.status(nid)["suppressed"] == 1

    follower = c.followers()[0]
    second = submit_ok(c, follower, [gone, blocked, "ok2@example.com"])
    rs = wait_for(lambda: recipients(c, follower, second), 5, "second submission on the intake node")
    assert rs[gone]["state"] == "suppressed" and rs[gone]["attempts"] == 0  # at acceptance, no send
    wait_for(lambda: all(r["state"] in ("bounced", "delivered", "suppressed")
                         for r in recipients(c, nid, second).values()), 20, "second submission to finish")
    rs = recipients(c, nid, second)
    assert rs[blocked]["state"] == "bounced" and rs[blocked]["attempts"] == 1  # attempted again
    assert rs["ok2@example.com"]["state"] == "delivered"

    assert rcpt_codes(c, gone) == [550]  # the sink never heard of it again
    assert rcpt_codes(c, blocked) == [550, 550]
    assert gone not in deliveries_per_recipient(c.sink) and blocked not in deliveries_per_recipient(c.sink)


# ---------------------------------------------------------------- 4. throttles

def test_per_minute_and_connection_limits_hold(make_cluster) -> None:
    limit = 30
    c = make_cluster(extra_toml=f"[delivery.domains.default]\nmax_connections = 1\nmax_per_minute = {limit}\n")
    nid = c.leader()
    started = time.monotonic()
    rcpts = addresses("t", 2 * limit, "throttled.example")
    sid = submit_ok(c, nid, rcpts)

    wait_for(lambda: sink_count(c) >= limit and quiet_batches(c, nid), 20, f"the first {limit} messages")
    applied = c.status(nid)["commands_applied"]
    # Within the first minute nothing beyond the quota may go out (no need to wait for the next one).
    hold_steady(lambda: sink_count(c), limit, max(1.0, started + 5.0 - time.monotonic()),
                "messages delivered in the first minute")
    # A domain out of quota costs no Raft entries (no refused assign committed every round).
    assert c.status(nid)["commands_applied"] - applied <= 2
    states = [r["state"] for r in recipients(c, nid, sid).values()]
    assert states.count("delivered") == limit and states.count("pending") == limit, states
    assert peak_connections(c.sink) == 1


def test_connection_limit_caps_concurrency_across_nodes(make_cluster) -> None:
    c = make_cluster(delay=0.02, batch_size=10,
                          extra_toml="[delivery.domains.default]\nmax_connections = 2\n")
    rcpts = addresses("k", 80, "capped.example")
    submit_ok(c, c.leader(), rcpts, make_message(campaign="capped"))
    wait_campaign_done(c, "capped")
    assert deliveries_per_recipient(c.sink) == {a: 1 for a in rcpts}
    peak = peak_connections(c.sink)
    print(f"peak concurrent connections: {peak}")
    assert peak == 2  # the cap is used (batches run side by side) and never exceeded


# ---------------------------------------------------------------- 5. sender killed mid-batch

def test_killed_sender_batch_is_finished_by_another_node(make_cluster) -> None:
    n = 300
    c = make_cluster(delay=0.02, batch_size=n)
    rcpts = addresses("m", n, "bulk.example")
    sid = submit_ok(c, c.leader(), rcpts, make_message(campaign="bulk"))

    wait_for(lambda: sink_count(c) >= 60, 30, "the batch to be partly delivered")
    holders = wait_for(lambda: c.status(c.leader() or c.ids[0])["batches_in_flight"], 5, "the batch holder")
    assert len(holders) == 1, holders
    victim = next(iter(holders))
    was_leader = victim == c.leader()
    c.kill(victim)
    at_kill = sink_count(c)
    assert at_kill < n, "the batch finished before the kill; slow the sink down"
    survivor = next(nid for nid in c.ids if nid != victim)

    # What the log had committed from the victim before its lease ran out (read before any reassignment).
    committed = {a for a, r in recipients(c, survivor, sid).items() if r["state"] == "delivered"}
    assert c.status(survivor)["stats"]["lease_expiries"] == 0, "lease expired before the committed set was read"

    wait_campaign_done(c, "bulk")
    counts = deliveries_per_recipient(c.sink)
    assert set(counts) == set(rcpts), "recipients lost"
    resent_committed = [a for a in committed if counts[a] != 1]
    assert not resent_committed, f"recipients with a committed outcome were sent again: {resent_committed}"
    twice = sorted(a for a, k in counts.items() if k > 1)
    assert all(counts[a] == 2 for a in twice)
    print(f"killed {victim} ({'leader' if was_leader else 'follower'}) after {at_kill} sent, {len(committed)} committed; sent twice: {len(twice)}")
    # Only outcomes not yet committed at the kill can repeat: at most one forced report's worth
    # (report_every) buffered plus the message on the wire.
    assert len(twice) <= REPORT_EVERY + 1

    status = c.status(survivor)
    assert status["stats"]["lease_expiries"] >= 1
    finishers = {nid for nid in c.ids if nid != victim and outcome_lines(c, nid)}
    assert finishers, "no surviving node delivered the rest of the batch"
    assert all(r["state"] == "delivered" for r in recipients(c, survivor, sid).values())


# ---------------------------------------------------------------- 6. pause, resume, cancel

def test_pause_holds_the_campaign_and_resume_finishes_it_once(make_cluster) -> None:
    c = make_cluster(delay=0.05, batch_size=10, extra_toml="[delivery.domains.default]\nmax_connections = 2\n")
    nid = c.leader()
    rcpts = addresses("p", 100) + addresses("q", 100)
    submit_ok(c, nid, rcpts[:100], make_message(campaign="spring"))
    submit_ok(c, nid, rcpts[100:], make_message(campaign="spring"))

    paused = run_cli(c.config_path, "pause", "spring")
    assert paused.returncode == 0, paused.stderr
    # Batches already in flight finish; after that nothing more goes out.
    wait_for(lambda: (camp := campaign(c, "spring")) and camp["paused"] and camp["counts"]["in_flight"] == 0,
             15, "in-flight batches of the paused campaign to finish")
    held = sink_count(c)
    hold_steady(lambda: sink_count(c), held, 2.0, "messages sent while paused")
    camp = campaign(c, "spring")
    assert camp["counts"]["delivered"] == held and camp["counts"]["pending"] == len(rcpts) - held > 0, camp
    print(f"delivered before the pause took hold: {held} of {len(rcpts)}")

    resumed = run_cli(c.config_path, "resume", "spring")
    assert resumed.returncode == 0, resumed.stderr
    camp = wait_campaign_done(c, "spring")
    assert camp["counts"]["delivered"] == len(rcpts) and not camp["paused"]
    assert deliveries_per_recipient(c.sink) == {a: 1 for a in rcpts}  # none twice, none skipped


def test_cancel_stops_the_rest_of_the_campaign(make_cluster) -> None:
    c = make_cluster(delay=0.05, batch_size=10, extra_toml="[delivery.domains.default]\nmax_connections = 2\n")
    nid = c.leader()
    rcpts = addresses("a", 200)
    submit_ok(c, nid, rcpts, make_message(campaign="autumn"))
    wait_for(lambda: sink_count(c) >= 10, 20, "some of the campaign to be delivered")

    cancelled = run_cli(c.config_path, "cancel", "autumn")
    assert cancelled.returncode == 0, cancelled.stderr
    at_cancel = sink_count(c)
    assert "recipients cancelled" in cancelled.stdout + cancelled.stderr
    camp = wait_campaign_done(c, "autumn", 15)
    counts = camp["counts"]
    assert camp["cancelled"] and counts["cancelled"] > 0 and counts["pending"] == 0
    assert counts["delivered"] + counts["cancelled"] == len(rcpts), counts
    wait_for(lambda: quiet_batches(c, nid), 10, "no batch in flight")
    sent = sink_count(c)
    hold_steady(lambda: sink_count(c), sent, 1.5, "messages sent after the cancel settled")
    print(f"sent {at_cancel} before the cancel returned, {sent - at_cancel} more from batches in flight")

    # A late submission to the cancelled campaign is refused at DATA, not queued and cancelled.
    code, text = c.submit(nid, ["late@example.com"], make_message(campaign="autumn"))
    assert code == 554 and "autumn is cancelled" in text, text

    delivered = {a for a, k in deliveries_per_recipient(c.sink).items()}
    assert len(delivered) == sent == counts["delivered"]  # each delivered exactly once
    assert "late@example.com" not in delivered
    assert delivered < set(rcpts)


# ---------------------------------------------------------------- 7. DKIM and per-recipient headers

def _dkim_key(path: Path) -> bytes:
    """Write a fresh RSA key to `path`; return the DNS TXT record that publishes its public half."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


def _stored_message(c: Cluster, event: dict) -> bytes:
    raw = (c.sink.maildir / event["file"]).read_bytes()
    head = raw.split(b"\r\n", 2)
    assert head[0].startswith(b"X-Sink-Envelope-From:") and head[1].startswith(b"X-Sink-Envelope-To:")
    return head[2]


def test_messages_are_dkim_signed_with_per_recipient_headers(make_cluster, tmp_path: Path) -> None:
    key_file = tmp_path / "dkim.pem"
    txt = _dkim_key(key_file)
    c = make_cluster(start=False, extra_toml=(
        'unsubscribe_url = "https://unsub.example.com/u/{token}"\n\n'
        f'[delivery.dkim]\ndomain = "example.com"\nselector = "s1"\nkey_file = "{key_file}"\n\n'
        f'[feedback]\nunsubscribe_secret = ["{TOKEN_KEY}"]\n'))  # unsubscribe links need their own key
    c.start_all_and_wait()
    rcpts = ["alice@example.org", "bob@example.net"]
    sid = submit_ok(c, c.followers()[0], rcpts, make_message(campaign="signed", message_id="<orig@example.com>"))
    wait_campaign_done(c, "signed")

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        return txt if name.rstrip(b".") == b"s1._domainkey.example.com" else None

    events = {e["rcpt"]: e for e in c.sink.delivered()}
    assert set(events) == set(rcpts)
    ids = set()
    for idx, rcpt in enumerate(rcpts):
        data = _stored_message(c, events[rcpt])
        assert dkim.verify(data, dnsfunc=dnsfunc), f"DKIM signature of {rcpt}'s copy does not verify"
        assert not dkim.verify(data.replace(b"Hello from raftmail", b"Hello from mallory"), dnsfunc=dnsfunc)
        msg = message_from_bytes(data, policy=policy.SMTP)
        assert msg["DKIM-Signature"] is not None and "d=example.com" in msg["DKIM-Signature"]
        assert msg["Message-ID"] == recipient_message_id(sid, idx, "example.com")  # same on any retry
        ids.add(msg["Message-ID"])
        assert msg["Return-Path"] is None  # only the final delivery adds one
        link = re.fullmatch(r"<(https://unsub\.example\.com/u/([A-Za-z0-9_-]+))>", msg["List-Unsubscribe"])
        assert link, msg["List-Unsubscribe"]
        token = FeedbackKeys([TOKEN_KEY]).read_link_token(link.group(2))
        assert token is not None and (token.recipient, token.campaign, token.index) == (rcpt, "signed", idx)
        assert FeedbackKeys([SECRET]).read_link_token(link.group(2)) is None  # not the cluster secret
        assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert len(msg.get_all("Message-ID")) == 1
        signed = re.search(r"\bh=([^;]+)", " ".join(msg["DKIM-Signature"].split())).group(1).lower()
        assert "list-unsubscribe" in signed and "list-unsubscribe-post" in signed
    assert len(ids) == len(rcpts)


def _keygen(domain: str, selector: str, algorithm: str, out: Path) -> tuple[str, dict[bytes, bytes]]:
    """`raftmail dkim keygen`, as an operator runs it: (the entry to paste, {TXT name: value})."""
    r = subprocess.run([sys.executable, "-m", "raftmail.cli", "dkim", "keygen", domain, selector,
                        "--algorithm", algorithm, "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    txt = re.search(r'^(\S+) IN TXT "([^"]+)"$', r.stdout, re.M)
    entry = r.stdout[r.stdout.index("[[delivery.dkim]]"):]
    return entry, {txt.group(1).encode(): txt.group(2).encode()}


def _signers(data: bytes, dns: dict[bytes, bytes]) -> list[tuple[str, str, str]]:
    """(d=, s=, a=) of each DKIM-Signature that verifies; AssertionError for one that does not."""
    d, found = dkim.DKIM(data), []
    for idx in range(data.count(b"DKIM-Signature:")):
        assert d.verify(idx=idx, dnsfunc=lambda name, timeout=5: dns.get(name)), f"signature {idx} fails"
        f = d.signature_fields
        found.append((f[b"d"].decode(), f[b"s"].decode(), f[b"a"].decode()))
    return found


def test_two_brands_are_signed_each_by_its_own_domain_and_a_new_selector_needs_no_restart(make_cluster, tmp_path: Path) -> None:
    keys = tmp_path / "dkim"
    one_rsa, dns = _keygen("brand-one.example", "r1", "rsa", keys)
    one_ed, more = _keygen("brand-one.example", "e1", "ed25519", keys)
    two, more2 = _keygen("brand-two.example", "s1", "ed25519", keys)
    dns |= more | more2
    c = make_cluster(start=False, extra_toml="\n" + "\n".join((one_rsa, one_ed, two)) + "\n")
    c.start_all_and_wait()
    submit_ok(c, c.followers()[0], ["a@example.org"], make_message(sender="news@brand-one.example", campaign="one"))
    submit_ok(c, c.followers()[0], ["b@example.org"], make_message(sender="hello@brand-two.example", campaign="two"))
    wait_campaign_done(c, "one")
    wait_campaign_done(c, "two")
    events = {e["rcpt"]: e for e in c.sink.delivered()}
    assert _signers(_stored_message(c, events["a@example.org"]), dns) == [
        ("brand-one.example", "r1", "rsa-sha256"), ("brand-one.example", "e1", "ed25519-sha256")]
    assert _signers(_stored_message(c, events["b@example.org"]), dns) == [("brand-two.example", "s1", "ed25519-sha256")]

    # Rotation: brand two's new selector is published, its entry replaces the old one, SIGHUP.
    two_new, more3 = _keygen("brand-two.example", "s2", "rsa", keys)
    dns |= more3
    c.config_path.write_text(c.config_path.read_text().replace(two, two_new))
    for nid in c.ids:
        c.procs[nid].send_signal(signal.SIGHUP)
    wait_for(lambda: all("DKIM keys reloaded" in c.log_text(nid) for nid in c.ids), 10, "every node to reload")
    submit_ok(c, c.followers()[0], ["c@example.org"], make_message(sender="hello@brand-two.example", campaign="two-b"))
    wait_campaign_done(c, "two-b")
    events = {e["rcpt"]: e for e in c.sink.delivered()}
    assert _signers(_stored_message(c, events["c@example.org"]), dns) == [("brand-two.example", "s2", "rsa-sha256")]
    # A cluster file that does not load changes nothing: the nodes keep signing as before.
    c.config_path.write_text(c.config_path.read_text().replace('selector = "s2"', 'selector = "bad selector"'))
    c.procs[c.ids[0]].send_signal(signal.SIGHUP)
    wait_for(lambda: "DKIM keys not reloaded" in c.log_text(c.ids[0]), 10, "the refusal to be logged")
    assert all(c.alive(nid) for nid in c.ids)


def test_eight_bit_mail_to_a_receiver_without_8bitmime_goes_quoted_printable_and_signed_again(make_cluster, tmp_path: Path) -> None:
    entry, dns = _keygen("brand-one.example", "e1", "ed25519", tmp_path / "dkim")
    c = make_cluster(start=False, extra_toml="\n" + entry + "\n")
    c.sink.options.append("--no-8bitmime")
    c.start_all_and_wait()
    text = "Grüße aus Köln — très bien.\n"
    msg = make_message(sender="news@brand-one.example", campaign="utf8", body=text)
    assert not msg.isascii() and b"Content-Transfer-Encoding: 8bit" in msg
    submit_ok(c, c.followers()[0], ["a@example.org"], msg)
    # A raw 8-bit header has no 7-bit form: deferred, never sent raw.
    raw_header = msg.replace(b"Subject: Hello", "Subject: Grüße".encode())
    sid = submit_ok(c, c.followers()[0], ["b@example.org"], raw_header.replace(b"X-Campaign-ID: utf8", b"X-Campaign-ID: raw"))
    wait_campaign_done(c, "utf8")
    (event,) = c.sink.delivered()
    assert event["rcpt"] == "a@example.org" and event["eight_bit"] is False
    data = _stored_message(c, event)
    assert data.isascii() and b"Content-Transfer-Encoding: quoted-printable" in data
    assert message_from_bytes(data, policy=policy.default).get_content().replace("\r\n", "\n") == text
    assert _signers(data, dns) == [("brand-one.example", "e1", "ed25519-sha256")]
    leader = c.wait_leader()
    deferred = wait_for(lambda: (r := recipients(c, leader, sid).get("b@example.org", {})).get("state") == "deferred"
                        and r, 30, "the raw-header copy to be deferred")
    assert "4.6.3" in json.dumps(deferred), deferred
    assert not any(e["rcpt"] == "b@example.org" for e in c.sink.delivered())


def test_require_tls_defers_instead_of_sending_in_clear_text(make_cluster) -> None:
    c = make_cluster(extra_toml='[delivery.domains."secure.example"]\nrequire_tls = true\n')
    leader = c.leader()
    code, text = c.submit(leader, ["a@secure.example", "b@example.com"], make_message(message_id="<tls@x>"))
    assert code == 250, text
    sid = queued_as(text)
    wait_for(lambda: [r["state"] for r in c.submission(leader, sid)["recipients"]] == ["deferred", "delivered"],
             30, "the clear-text-only domain to be deferred and the other delivered")
    rec = c.submission(leader, sid)["recipients"][0]
    assert "TLS" in (rec["text"] or "")
    assert [e["rcpt"] for e in c.sink.delivered()] == ["b@example.com"]

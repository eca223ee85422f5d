"""The sender's feedback loop on a real 3-node cluster delivering into a real capture sink:
one-click unsubscribe over the public HTTP listener (urllib), late bounces (RFC 3464 DSN) and
complaints (RFC 5965 ARF) sent with smtplib to the VERP address at another node, mailto
unsubscribes, forged tokens, the relay rules for strangers, later submissions skipping the
suppressed recipients, and the suppression import/export round trip."""
from __future__ import annotations

import csv
import json
import re
import urllib.error
import urllib.request
from email import message_from_bytes, policy
from pathlib import Path

import pytest

from cluster import ADMIN_OPENER, Cluster, free_ports, make_message, queued_as, run_cli, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

KEY = "feedback-key-for-the-tests-0123456789abcdef"
BOUNCES = "bounces.example.com"
MAILTO = "unsub.example.com"
STRANGER = "127.0.0.2"  # outside allow_networks below: a stranger on the internet


def with_http(c: Cluster) -> dict[str, int]:
    """Give every [[node]] a public http address (the harness writes raft, smtp and admin)."""
    text = c.config_path.read_text()
    ports = dict(zip(c.ids, free_ports(len(c.ids))))
    for nid, port in ports.items():
        admin = f'admin = "127.0.0.1:{c.admin[nid]}"'
        text = text.replace(admin, f'{admin}\nhttp = "127.0.0.1:{port}"')
    c.config_path.write_text(text)
    return ports


@pytest.fixture(scope="module")
def feedback_cluster(tmp_path_factory: pytest.TempPathFactory):
    from cluster import Sink
    root = tmp_path_factory.mktemp("feedback")
    sink = Sink(root)
    c = Cluster(root, 3, sink=sink, extra_toml=(
        'unsubscribe_url = "https://unsub.example.com/u/{token}"\n\n'
        f'[feedback]\nunsubscribe_secret = ["{KEY}"]\nbounce_domain = "{BOUNCES}"\n'
        f'unsubscribe_mailto = "{MAILTO}"\nfeedback_id = "acme"\n'))
    text = c.config_path.read_text().replace("[intake]\n", '[intake]\nallow_networks = ["127.0.0.1/32"]\n', 1)
    c.config_path.write_text(text)
    c.http = with_http(c)
    c.start_all_and_wait()
    yield c
    c.close()


def copies(c: Cluster, campaign: str) -> dict[str, bytes]:
    """recipient -> the stored copy (with the sink's envelope lines) of one campaign."""
    out = {}
    for e in c.sink.delivered():
        raw = (c.sink.maildir / e["file"]).read_bytes()
        if f"X-Campaign-ID: {campaign}".encode() in raw:
            out[e["rcpt"]] = raw
    return out


def header(raw: bytes, name: str) -> str | None:
    body = raw.split(b"\r\n", 2)[2]
    value = message_from_bytes(body, policy=policy.SMTP)[name]
    return None if value is None else str(value)


def envelope_from(raw: bytes) -> str:
    return raw.split(b"\r\n", 1)[0].decode().split(": ", 1)[1]


def suppressions(c: Cluster, nid: str, address: str) -> list[dict]:
    return c.get(nid, f"/suppressions?address={address}")["entries"]


def events(c: Cluster, nid: str, outcome: str) -> list[dict]:
    return [e for e in c.get(nid, "/events?limit=10000")["events"] if e["outcome"] == outcome]


def http(c: Cluster, nid: str, url: str, data: bytes | None = None) -> tuple[int, str]:
    path = url.split("://", 1)[1].split("/", 1)[1]
    req = urllib.request.Request(f"http://127.0.0.1:{c.http[nid]}/{path}", data=data,
                                 headers={"Content-Type": "application/x-www-form-urlencoded"} if data else {})
    try:
        with ADMIN_OPENER.open(req, timeout=15) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def mail(c: Cluster, nid: str, sender: str, rcpts: list[str], message: bytes,
         source: str | None = None) -> tuple[int, str]:
    """One transaction; the reply to DATA, or the first refusal."""
    return c.submit(nid, rcpts, message, sender=sender, source=source)


def dsn(recipient: str, status: str, action: str = "failed") -> bytes:
    return (f"From: MAILER-DAEMON@mx.example.org\r\nTo: x@{BOUNCES}\r\nSubject: Undelivered Mail\r\n"
            "MIME-Version: 1.0\r\n"
            'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
            "--B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
            "--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.org\r\n\r\n"
            f"Final-Recipient: rfc822; {recipient}\r\nAction: {action}\r\nStatus: {status}\r\n"
            f"Diagnostic-Code: smtp; 550 {status} <{recipient}>: user unknown\r\n\r\n--B--\r\n").encode()


def arf(recipient: str) -> bytes:
    return ("From: abuse@isp.example\r\nTo: fbl@example.com\r\nSubject: complaint\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/report; report-type=feedback-report; boundary="F"\r\n\r\n'
            "--F\r\nContent-Type: text/plain\r\n\r\nThis is an email abuse report.\r\n"
            "--F\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\n"
            "User-Agent: ISP-FBL/1.0\r\nVersion: 1\r\n\r\n"
            f"--F\r\nContent-Type: message/rfc822\r\n\r\nFrom: news@example.com\r\nTo: {recipient}\r\n"
            "Subject: sale\r\n\r\nhi\r\n--F--\r\n").encode()


def test_feedback_loop_suppresses_and_later_submissions_skip(feedback_cluster: Cluster) -> None:
    c = feedback_cluster
    n1, n2, n3 = c.ids
    first = ["ann@example.org", "bob@example.net", "cat@example.org", "dan@example.net", "eve@example.org"]
    code, text = c.submit(n1, first, make_message(campaign="spring", message_id="<spring-1@example.com>"))
    assert code == 250, text
    got = wait_for(lambda: (lambda d: d if len(d) == len(first) else None)(copies(c, "spring")), 60,
                   "every copy of the first campaign delivered")

    # Every copy: a VERP envelope sender at the bounce domain, one-click and mailto unsubscribe,
    # Feedback-ID with the campaign, no Return-Path (only the final delivery adds one).
    links, verp, mailto = {}, {}, {}
    for rcpt, raw in got.items():
        sender = envelope_from(raw)
        assert sender.endswith(f"@{BOUNCES}") and sender.startswith("b"), sender
        assert len(sender.split("@")[0]) <= 70
        verp[rcpt] = sender
        lu = header(raw, "List-Unsubscribe")
        m = re.fullmatch(r"<(https://unsub\.example\.com/u/[A-Za-z0-9_-]+)>, <mailto:(u[a-z2-7]+@"
                         + re.escape(MAILTO) + ")>", lu or "")
        assert m, lu
        links[rcpt], mailto[rcpt] = m.group(1), m.group(2)
        assert header(raw, "List-Unsubscribe-Post") == "List-Unsubscribe=One-Click"
        assert header(raw, "Feedback-ID") == "spring:acme"
        assert header(raw, "Return-Path") is None
        # Opaque tokens: neither the address nor classic VERP's local=domain form shows. (A
        # three-letter local part can turn up by chance in a random base32 token: not checked.)
        for form in (rcpt, rcpt.replace("@", "=")):
            assert form not in links[rcpt] and form not in sender and form not in mailto[rcpt], (form, sender)
    assert len(set(verp.values())) == len(first)

    # A forged or altered token changes nothing, on GET or POST.
    bad = links["ann@example.org"][:-3] + ("AAA" if not links["ann@example.org"].endswith("AAA") else "BBB")
    for url in (bad, "https://unsub.example.com/u/not-a-token"):
        assert http(c, n2, url)[0] == 404
        assert http(c, n2, url, b"List-Unsubscribe=One-Click")[0] == 404
    assert mail(c, n2, "", [f"bforged{'a' * 40}@{BOUNCES}"], dsn("x@y.example", "5.1.1"))[0] == 550

    # GET shows a button and changes nothing; POST without the one-click body changes nothing.
    status, page = http(c, n2, links["ann@example.org"])
    assert status == 200 and 'method="post"' in page and "One-Click" in page
    assert http(c, n2, links["ann@example.org"], b"foo=bar")[0] == 400
    c.wait_converged()
    assert suppressions(c, n1, "ann@example.org") == []

    # One-click POST (RFC 8058): 200 only once committed, so every node has it right after.
    status, page = http(c, n2, links["ann@example.org"], b"List-Unsubscribe=One-Click")
    assert status == 200, page
    entry, = suppressions(c, n2, "ann@example.org")
    assert entry["scope"] == "example.com" and entry["source"] == "unsubscribe"

    # A DSN with a hard 5.1.1 to bob's VERP address, from the null sender, at another node.
    code, text = mail(c, n3, "", [verp["bob@example.net"]], dsn("bob@example.net", "5.1.1"))
    assert code == 250, text
    entry, = suppressions(c, n3, "bob@example.net")
    assert entry["scope"] == "" and entry["source"] == "late-bounce" and entry["code"] == 550
    # A 4.x.x DSN is only an event: eve stays deliverable.
    code, text = mail(c, n1, "", [verp["eve@example.org"]], dsn("eve@example.org", "4.2.2", "delayed"))
    assert code == 250, text
    # An ARF complaint from a stranger (outside allow_networks, no AUTH, a real sender).
    code, text = mail(c, n1, "fbl@isp.example", [verp["cat@example.org"]], arf("cat@example.org"), source=STRANGER)
    assert code == 250, text
    entry, = suppressions(c, n1, "cat@example.org")
    assert entry["source"] == "complaint" and entry["scope"] == "example.com"
    # mailto unsubscribe.
    code, text = mail(c, n2, "dan@example.net", [mailto["dan@example.net"]],
                      b"From: dan@example.net\r\nSubject: unsubscribe\r\n\r\n\r\n")
    assert code == 250, text
    assert suppressions(c, n2, "dan@example.net")[0]["source"] == "unsubscribe"
    # Unparseable mail to a VERP address: accepted, counted, nothing changes.
    code, text = mail(c, n3, "", [verp["eve@example.org"]], b"Subject: ?\r\n\r\n\xff\xfe garbage\r\n")
    assert code == 250, text
    assert c.get(n3, "/status")["feedback"]["unparsed"] == 1
    assert suppressions(c, n3, "eve@example.org") == []

    # No open relay: a stranger may mail the feedback domains and nothing else.
    assert mail(c, n2, "", ["someone@example.org"], b"Subject: x\r\n\r\nx\r\n", source=STRANGER)[0] == 550
    assert mail(c, n2, "spam@evil.example", ["someone@example.org"], b"Subject: x\r\n\r\nx\r\n",
                source=STRANGER)[0] == 530
    assert mail(c, n2, "", ["someone@example.org"], b"Subject: x\r\n\r\nx\r\n")[0] == 550  # null sender
    assert mail(c, n2, "news@example.com", [verp["eve@example.org"], "x@example.org"],
                b"Subject: x\r\n\r\nx\r\n")[0] == 452  # never mixed

    # Events through the stream (and so the webhook).
    c.wait_converged()
    assert {e["recipient"] for e in events(c, n1, "unsubscribed")} == {"ann@example.org", "dan@example.net"}
    assert [e["recipient"] for e in events(c, n1, "complained")] == ["cat@example.org"]
    late = [e for e in events(c, n1, "bounced") if e["text"].startswith("late")]
    assert [e["recipient"] for e in late] == ["bob@example.net"] and late[0]["campaign"] == "spring"
    assert [e["recipient"] for e in events(c, n1, "delayed")] == ["eve@example.org"]

    # Later submissions skip them and still reach the others; the unsubscribe and the complaint
    # were for example.com's mail only, the bad address for everyone's.
    second = first + ["fred@example.org"]
    code, text = c.submit(n2, second, make_message(campaign="summer", message_id="<summer-1@example.com>"))
    assert code == 250, text
    code, text = c.submit(n3, ["ann@example.org", "bob@example.net"],
                          make_message(campaign="other", message_id="<o-1@other.example>",
                                       sender="news@other.example"), sender="news@other.example")
    assert code == 250, text
    sid = queued_as(text)
    wait_for(lambda: set(copies(c, "summer")) == {"eve@example.org", "fred@example.org"}
             and set(copies(c, "other")) == {"ann@example.org"}, 60, "the later campaigns delivered")
    states = {r["address"]: r["state"] for r in wait_for(
        lambda: (lambda s: s if s and all(r["state"] not in ("pending", "in_flight") for r in s["recipients"])
                 else None)(c.submission(n3, sid)), 30, "the other campaign finished")["recipients"]}
    assert states == {"ann@example.org": "delivered", "bob@example.net": "suppressed"}
    summer = {e["recipient"] for e in events(c, n1, "suppressed") if e["campaign"] == "summer"}
    assert summer == {"ann@example.org", "bob@example.net", "cat@example.org", "dan@example.net"}


def test_suppression_import_export_round_trip(feedback_cluster: Cluster, tmp_path: Path) -> None:
    c = feedback_cluster
    rows = [[f"user{i:05d}@import.example", "" if i % 3 else "example.com", f"list {i % 7}"] for i in range(3000)]
    src = tmp_path / "in.csv"
    with open(src, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["address", "scope", "reason"])
        w.writerows(rows)
        w.writerow(["not-an-address", "", "bad row"])
    done = run_cli(c.config_path, "suppress", "import", str(src), "--batch", "700", "--json", timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["rows"], summary["added"], summary["invalid"]) == (3001, 3000, 1)
    assert "imported" in done.stderr  # progress
    again = run_cli(c.config_path, "suppress", "import", str(src), "--json", timeout=120)
    assert json.loads(again.stdout)["added"] == 0  # idempotent

    out = tmp_path / "out.csv"
    done = run_cli(c.config_path, "suppress", "export", "--out", str(out), timeout=120)
    assert done.returncode == 0, done.stderr
    with open(out, newline="") as f:
        exported = list(csv.DictReader(f))
    imported = [e for e in exported if e["address"].endswith("@import.example")]
    assert [[e["address"], e["scope"], e["reason"]] for e in imported] == rows
    assert {e["source"] for e in imported} == {"import"}

    # The export reads back into an empty list the same: remove, import the export, compare.
    for e in exported:
        code = run_cli(c.config_path, "suppress", "remove", e["address"], "--scope", e["scope"]) \
            if e["address"] in ("user00000@import.example", "user00001@import.example") else None
        assert code is None or code.returncode == 0, code.stderr
    listed = json.loads(run_cli(c.config_path, "suppress", "list", "--address", "user00001@import.example",
                                "--json").stdout)
    assert listed["entries"] == []
    done = run_cli(c.config_path, "suppress", "import", str(out), "--json", timeout=120)
    assert json.loads(done.stdout)["added"] == 2
    added = run_cli(c.config_path, "suppress", "add", "zed@example.org", "--reason", "asked by phone")
    assert added.returncode == 0, added.stderr
    listed = json.loads(run_cli(c.config_path, "suppress", "list", "--address", "zed@example.org", "--json").stdout)
    assert [(e["source"], e["reason"]) for e in listed["entries"]] == [("operator", "asked by phone")]

"""The HTTP injection API on a real 3-node cluster delivering into a real capture sink: one request
of 1,000 personalised recipients, each copy rendered with its own data and delivered once; a retry
with the same Idempotency-Key after a leader kill queues nothing twice; 503 without a quorum;
send_at holds delivery;
bad JSON, bad fields, a broken template and an oversize request get their errors; a caller
outside allow_networks needs a key; `raftmail inject` and `raftmail apikey`."""
from __future__ import annotations

import http.client
import json
import subprocess
import threading
import time
from datetime import datetime, timezone
from email import message_from_bytes, policy

import pytest

from cluster import PY, Cluster, Sink, free_ports, run_cli, submission_count, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

KEY_SECRET = "test-api-key-secret-0123456789"
STRANGER = "127.0.0.2"  # outside [api] allow_networks below
MAX_REQUEST = 262144


def api_cluster(root, sink: Sink | None = None) -> Cluster:
    from raftmail.node.auth import hash_password
    sink = sink or Sink(root)
    c = Cluster(root, 3, sink=sink, batch_size=100, extra_toml=(
        'unsubscribe_url = "https://unsub.example.com/u/{token}"\n\n'
        '[feedback]\nunsubscribe_secret = ["inject-feedback-key-0123456789abcdef"]\n\n'
        f'[api]\nallow_networks = ["127.0.0.1/32"]\nmax_request_bytes = {MAX_REQUEST}\n'
        f'recipients_per_submission = 300\n\n[api.keys]\nweb = "{hash_password(KEY_SECRET)}"\n'))
    text = c.config_path.read_text()
    c.http = dict(zip(c.ids, free_ports(len(c.ids))))
    for nid, port in c.http.items():
        admin = f'admin = "127.0.0.1:{c.admin[nid]}"'
        text = text.replace(admin, f'{admin}\nhttp = "127.0.0.1:{port}"')
    c.config_path.write_text(text)
    c.start_all_and_wait()
    return c


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    c = api_cluster(tmp_path_factory.mktemp("inject"))
    yield c
    c.close()


def post(c: Cluster, nid: str, body: bytes | dict, *, headers: dict | None = None, source: str | None = None,
         timeout: float = 30) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", c.http[nid], timeout=timeout,
                                      source_address=(source, 0) if source else None)
    try:
        conn.request("POST", "/api/inject/v1", body=data, headers={"Content-Type": "application/json",
                                                                     **(headers or {})})
        r = conn.getresponse()
        text = r.read()
        return r.status, json.loads(text) if text else {}, dict(r.getheaders())
    finally:
        conn.close()


def request(rcpts: list[dict], **extra) -> dict:
    return {"envelope_sender": "news@example.com",
            "content": {"from": {"email": "news@example.com", "name": "Shöp News"},
                        "subject": "Hi {{ name }}, your code",
                        "text_body": "Dear {{ name }}, your code is {{ code }} ({{ 100 // n }}%).\n",
                        "html_body": "<p>Dear {{ name }}, code <b>{{ code }}</b></p>",
                        "headers": {"X-Campaign-ID": "{{ campaign }}"}},
            "substitutions": {"n": 4, "campaign": extra.get("campaign_id", "none")},
            "recipients": rcpts, **extra}


def copies(c: Cluster, domain: str) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    for e in c.sink.delivered():
        if e["rcpt"].endswith("@" + domain):
            out.setdefault(e["rcpt"], []).append((c.sink.maildir / e["file"]).read_bytes())
    return out


def message_of(raw: bytes):
    """The copy without the sink's two envelope lines."""
    return message_from_bytes(raw.split(b"\r\n", 2)[2], policy=policy.SMTP)


def test_a_thousand_personalised_recipients_are_each_delivered_once_with_their_own_data(cluster) -> None:
    c = cluster
    rcpts = [{"email": f"r{i}@thousand.test", "name": f"Reader {i}", "substitutions": {"code": f"C{i:04d}"}}
             for i in range(1000)]
    rcpts[7]["substitutions"]["n"] = 0  # this recipient's data breaks the template: bounced once, with why
    rcpts.append({"email": "not an address"})
    entry = c.followers()[0]
    t0 = time.monotonic()
    status, body, _ = post(c, entry, request(rcpts, campaign_id="thousand"))
    answered = time.monotonic() - t0
    assert status == 200, body
    assert body["success_count"] == 1000 and body["failed_recipients"] == ["not an address"], body
    assert body["fail_count"] == 1 and body["errors"] == [] and body["submission_id"]
    assert answered < 10, answered

    wait_for(lambda: len(copies(c, "thousand.test")) >= 999, 120, "999 copies delivered", interval=0.5)
    got = copies(c, "thousand.test")
    assert set(got) == {f"r{i}@thousand.test" for i in range(1000) if i != 7}
    ids = set()
    for i in range(1000):
        if i == 7:
            continue
        (raw,) = got[f"r{i}@thousand.test"]  # exactly one copy
        m = message_of(raw)
        assert m["Subject"] == f"Hi Reader {i}, your code"
        assert m["To"] == f"Reader {i} <r{i}@thousand.test>"
        assert m["From"] == "Shöp News <news@example.com>"
        assert m["X-Campaign-ID"] == "thousand"
        assert m["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert m.get_content_type() == "multipart/alternative"
        text = m.get_body(("plain",)).get_content()
        assert text == f"Dear Reader {i}, your code is C{i:04d} (25%).\r\n"
        assert f"<b>C{i:04d}</b>" in m.get_body(("html",)).get_content()
        ids.add(m["Message-ID"])
    assert len(ids) == 999
    bounced = wait_for(lambda: [e for e in c.get(entry, "/events?limit=10000")["events"]
                                if e["outcome"] == "bounced" and e["recipient"] == "r7@thousand.test"], 20,
                       "the bounce of r7")
    assert len(bounced) == 1 and "ZeroDivisionError" in json.dumps(bounced[0]), bounced


def test_a_retry_with_the_same_key_after_a_leader_kill_queues_nothing_twice(tmp_path) -> None:
    c = api_cluster(tmp_path)
    try:
        rcpts = [{"email": f"k{i}@retry.test", "substitutions": {"code": str(i)}} for i in range(600)]
        req = request(rcpts, campaign_id="retry")
        key = {"Idempotency-Key": "retry-request-1"}
        leader = c.leader()
        entry = c.followers()[0]
        first: dict = {}

        def send() -> None:
            first["reply"] = post(c, entry, req, headers=key)
        sender = threading.Thread(target=send)
        sender.start()
        c.kill(leader)  # while the request is in progress: its reply may be 200 or 503
        sender.join(60)
        status, body, headers = first["reply"]
        assert status in (200, 503), body
        if status == 503:
            assert headers.get("Retry-After") and "Idempotency-Key" in body["errors"][1], (body, headers)
        survivors = [n for n in c.ids if n != leader]
        c.wait_leader(30, among=survivors)
        # The retry, at the other survivor, until it is answered 200.
        other = next(n for n in survivors if n != entry)
        retried = wait_for(lambda: (r := post(c, other, req, headers=key))[0] == 200 and r, 30, "a 200 for the retry")
        assert retried[1]["success_count"] == 600
        if status == 200:
            assert retried[1]["submission_id"] == body["submission_id"]
        # And again: nothing new either way.
        again = post(c, entry, req, headers=key)
        assert again[0] == 200 and again[1]["submission_id"] == retried[1]["submission_id"], again
        wait_for(lambda: len(copies(c, "retry.test")) == 600, 90, "600 copies", interval=0.5)
        c.start(leader)
        c.wait_converged(timeout=60)
        counts = {r: len(v) for r, v in copies(c, "retry.test").items()}
        stats = c.status(c.leader())["stats"]
        # Duplicates only where the cluster counts a send as possibly in flight at the kill.
        extra = sum(counts.values()) - 600
        bound = sum(stats.get(k, 0) for k in ("reassigned_in_flight", "fenced_reports", "maybe_delivered"))
        assert extra <= bound, (extra, bound)
        # The request's parts were queued once: 2 parts of 300, whatever the retries.
        assert submission_count(c, c.leader()) == 2
        # Without a quorum: 503 with Retry-After, and nothing queued.
        alone = c.leader()
        for n in c.ids:
            if n != alone:
                c.kill(n)
        status, body, headers = post(c, alone, request([{"email": "q@noquorum.test"}]), headers={
            "Idempotency-Key": "no-quorum"})
        assert status == 503 and headers.get("Retry-After") and body["success_count"] == 0, (body, headers)
        assert "not committed on a majority" in body["errors"][0], body
        assert submission_count(c, alone) == 2
    finally:
        c.close()


def test_send_at_holds_delivery_until_its_time(cluster) -> None:
    c = cluster
    at = time.time() + 5
    send_at = datetime.fromtimestamp(at, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    rcpts = [{"email": f"s{i}@later.test", "substitutions": {"code": str(i)}} for i in range(20)]
    status, body, _ = post(c, c.leader(), request(rcpts, send_at=send_at))
    assert status == 200, body
    delivered = wait_for(lambda: len(got := [e for e in c.sink.delivered() if e["rcpt"].endswith("@later.test")])
                         == 20 and got, 60, "the scheduled copies", interval=0.2)
    assert min(e["t"] for e in delivered) >= at - 0.05, (min(e["t"] for e in delivered), at)


def test_bad_requests_get_their_errors_and_queue_nothing(cluster) -> None:
    c = cluster
    nid = c.leader()
    before = submission_count(c, nid)
    status, body, _ = post(c, nid, b'{"envelope_sender": ')
    assert status == 400 and body["errors"][0].startswith("body: not valid JSON"), body
    bad = {"envelope_sender": "nobody", "content": {"subject": 3, "text_body": "x"}, "recipients": [],
           "send_at": "tomorrow", "campaign_id": "a b", "colour": "red"}
    status, body, _ = post(c, nid, bad)
    assert status == 400, body
    fields = sorted(e.split(":")[0] for e in body["errors"])
    assert fields == ["campaign_id", "colour", "content.from", "content.subject", "envelope_sender",
                      "recipients", "send_at"], body["errors"]
    broken = request([{"email": "a@broken.test"}])
    broken["content"]["text_body"] = "Hello {% if %}"
    status, body, _ = post(c, nid, broken)
    assert status == 400 and body["errors"][0].startswith("content.text_body: template does not compile"), body
    status, body, _ = post(c, nid, request([{"email": "a@big.test", "substitutions": {"pad": "x" * MAX_REQUEST}}]))
    assert status == 413 and "max_request_bytes" in body["errors"][0], body
    status, body, _ = post(c, nid, request([{"email": "a@dialect.test"}], template_dialect="Handlebars"))
    assert status == 400 and body["errors"] == ['template_dialect: only "Jinja" is supported'], body
    assert submission_count(c, nid) == before


def test_a_caller_outside_allow_networks_needs_a_key(cluster) -> None:
    c = cluster
    nid = c.leader()
    req = request([{"email": "a@stranger.test", "substitutions": {"code": "S"}}])
    status, body, headers = post(c, nid, req, source=STRANGER)
    assert status == 401 and headers.get("WWW-Authenticate", "").startswith("Bearer"), body
    status, _, _ = post(c, nid, req, source=STRANGER, headers={"Authorization": "Bearer web.wrong-secret"})
    assert status == 401
    status, body, _ = post(c, nid, req, source=STRANGER, headers={"Authorization": f"Bearer web.{KEY_SECRET}"})
    assert status == 200 and body["success_count"] == 1, body
    wait_for(lambda: copies(c, "stranger.test"), 30, "the keyed request's copy")


def test_the_cli_injects_a_request_file_and_makes_keys(cluster, tmp_path) -> None:
    c = cluster
    path = tmp_path / "request.json"
    path.write_text(json.dumps({"envelope_sender": "news@example.com",
                                "content": "From: news@example.com\nTo: {{ email }}\nSubject: {{ greeting }}\n\n"
                                           "{{ greeting }}, {{ name }}!\n",
                                "substitutions": {"greeting": "Hello"},
                                "recipients": [{"email": "cli@cli.test", "name": "Cleo"}]}))
    done = run_cli(c.config_path, "inject", str(path), "--idempotency-key", "cli-1")
    assert done.returncode == 0, done.stderr + done.stdout
    assert json.loads(done.stdout)["success_count"] == 1
    (raw,) = wait_for(lambda: copies(c, "cli.test").get("cli@cli.test"), 30, "the CLI's copy")
    m = message_of(raw)
    assert m["Subject"] == "Hello" and m.get_content() == "Hello, Cleo!\r\n" and m["Date"] and m["Message-ID"]
    made = subprocess.run([PY, "-m", "raftmail.cli", "apikey", "ops"], capture_output=True, text=True, timeout=30)
    lines = made.stdout.splitlines()
    assert made.returncode == 0 and lines[0].startswith("ops.") and lines[1].startswith('ops = "scrypt$'), made

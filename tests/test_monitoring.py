"""Monitoring on real 3-node clusters: Prometheus metrics, outcome events (`raftmail events --follow`)
across a leader kill, the leader's webhook with a failing receiver, /readyz losing and regaining
the quorum, and the live view; plus the pure parts (readiness, domain labels, watch model)."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from cluster import PY, Cluster, make_message, queued_as, wait_for
from raftmail.cli.render import WatchModel, render_watch
from raftmail.node.metrics import OTHER_DOMAIN, domain_label, readiness
from raftmail.consensus.state import EVENT_FIELDS
from raftmail.node.webhook import WebhookPoster, retry_delay

pytestmark = pytest.mark.timeout(150)

FINAL = {"delivered", "bounced", "suppressed", "cancelled", "expired"}
DONE_TIMEOUT = 40.0  # seconds a campaign may take, a leader kill and lease expiry included
THROTTLED_DOMAIN = '[delivery.domains."example.com"]\nmax_connections = 10\n'


# ---------------------------------------------------------------- helpers

def scrape(c: Cluster, nid: str) -> dict[tuple[str, frozenset], float]:
    """/metrics of one node, parsed by prometheus-client's own parser: {(sample, labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{c.admin[nid]}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(m: dict, name: str, **labels: str) -> float:
    return m.get((name, frozenset(labels.items())), 0.0)


def total(m: dict, name: str, **labels: str) -> float:
    """Sum over every label set that includes `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in m.items() if n == name and want <= ls)


def http(c: Cluster, nid: str, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{c.admin[nid]}{path}", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def live(c: Cluster) -> list[str]:
    return [n for n in c.ids if c.alive(n)]


def submit_ok(c: Cluster, nid: str, rcpts: list[str], campaign: str, mid: str) -> str:
    code, text = c.submit(nid, rcpts, make_message(campaign=campaign, message_id=mid))
    assert code == 250, text
    return queued_as(text)


def all_events(c: Cluster, nid: str) -> list[dict]:
    out, after = [], 0
    while True:
        page = c.get(nid, f"/events?after={after}&limit=1000")["events"]
        if not page:
            return out
        out += page
        after = page[-1]["seq"]


def final_outcomes(events: list[dict]) -> dict[str, list[str]]:
    """recipient -> every final outcome it got, in event order."""
    out: dict[str, list[str]] = {}
    for e in events:
        if e["outcome"] in FINAL:
            out.setdefault(e["recipient"], []).append(e["outcome"])
    return out


def wait_queue_done(c: Cluster, n: int) -> None:
    def done():
        nid = live(c)[0]
        q = c.queue(nid)
        return sum(q[s] for s in FINAL) == n and q["in_flight"] == 0
    wait_for(done, DONE_TIMEOUT, f"{n} recipients to reach a final state", interval=0.2)


class LineReader:
    """Collects a subprocess's stdout lines in a thread (a pipe read never blocks the test)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._run, args=(proc,), daemon=True)
        self._thread.start()

    def _run(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.append(line)

    def join(self) -> None:
        self._thread.join(10)


class Receiver:
    """A webhook receiver on 127.0.0.1: answers 500 to the first `fail_first` POSTs, then 200."""

    def __init__(self, fail_first: int) -> None:
        self.fail_first = fail_first
        self.attempts = 0
        self.batches: list[list[dict]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.attempts += 1
                    ok = receiver.attempts > receiver.fail_first
                    if ok:
                        receiver.batches.append(json.loads(body))
                self.send_response(200 if ok else 500)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[dict]:
        with self.lock:
            return [e for b in self.batches for e in b]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------- metrics

@pytest.mark.cluster
def test_metrics_parse_move_with_a_campaign_and_follow_a_leader_change(make_cluster) -> None:
    c = make_cluster(extra_toml=THROTTLED_DOMAIN)
    before = {n: scrape(c, n) for n in c.ids}
    for m in before.values():
        assert sum(value(m, "raftmail_raft_role", role=r) for r in ("leader", "follower", "candidate")) == 1
        assert value(m, "raftmail_raft_quorum") == 1 and value(m, "raftmail_ready") == 1
    rcpts = [f"m{i:02d}@example.com" for i in range(20)] + [f"o{i}@example.org" for i in range(5)]
    submit_ok(c, "n1", rcpts, "metrics", "<metrics-1@example.com>")
    code, text = c.submit("n1", rcpts, make_message(campaign="metrics", message_id="<metrics-1@example.com>"))
    assert code == 250 and "Already queued" in text, text
    code, _ = c.submit("n1", ["someone@nodot"])
    assert code == 553
    wait_queue_done(c, len(rcpts))
    c.wait_converged()
    after = {n: scrape(c, n) for n in c.ids}

    n1, n1_before = after["n1"], before["n1"]
    moved = {r: value(n1, "raftmail_intake_submissions_total", result=r)
             - value(n1_before, "raftmail_intake_submissions_total", result=r)
             for r in ("accepted", "duplicate", "refused")}
    assert moved == {"accepted": 1, "duplicate": 1, "refused": 0}, moved
    assert value(n1, "raftmail_intake_recipients_total", result="accepted") == len(rcpts)
    assert value(n1, "raftmail_intake_recipients_total", result="duplicate") == len(rcpts)
    assert value(n1, "raftmail_intake_refused_total", command="RCPT", code="553") == 1
    assert value(n1, "raftmail_intake_seconds_count") == 2
    # Deliveries are counted by the node that made them: the cluster's sum is the campaign.
    delivered = {d: sum(value(after[n], "raftmail_deliveries_total", outcome="delivered", domain=d) for n in c.ids)
                 for d in ("example.com", OTHER_DOMAIN)}
    assert delivered == {"example.com": 20, OTHER_DOMAIN: 5}
    domains = {dict(ls).get("domain") for m in after.values() for (n, ls) in m if n == "raftmail_deliveries_total"}
    assert domains <= {"example.com", OTHER_DOMAIN}, domains  # capped: example.org is "other"
    assert sum(value(after[n], "raftmail_delivery_seconds_count", domain="example.com") for n in c.ids) == 20
    for n in c.ids:
        m = after[n]
        assert value(m, "raftmail_recipients", state="delivered") == len(rcpts)
        assert value(m, "raftmail_recipients", state="pending") == 0
        assert value(m, "raftmail_outcome_events_total") == len(rcpts)
        assert value(m, "raftmail_duplicate_submissions_total") == 1
        assert value(m, "raftmail_raft_applied_index") > value(before[n], "raftmail_raft_applied_index")
        assert value(m, "raftmail_body_store_bodies") >= 1 and value(m, "raftmail_body_store_bytes") > 0
    assert sum(value(after[n], "raftmail_batches_started_total") for n in c.ids) >= 2

    old = c.leader()
    term_before = value(after[old], "raftmail_raft_term")
    c.kill(old)
    new = c.wait_leader(among=live(c))
    survivors = {n: scrape(c, n) for n in live(c)}
    for n, m in survivors.items():
        leading = value(m, "raftmail_raft_role", role="leader")
        # Each change into or out of leadership counts once, so the count is odd exactly while leading.
        assert leading == value(m, "raftmail_raft_leader_changes_total") % 2, (n, leading)
        assert leading == (1 if n == new else 0)
        assert value(m, "raftmail_raft_term") > term_before
    assert value(survivors[new], "raftmail_raft_leader_changes_total") >= 1
    wait_for(lambda: all(value(scrape(c, n), "raftmail_ready") == 1 for n in live(c)), 15, "survivors ready")


# ---------------------------------------------------------------- events --follow

@pytest.mark.cluster
@pytest.mark.faults
def test_events_follow_shows_each_final_outcome_once_across_a_leader_kill(make_cluster) -> None:
    c = make_cluster(delay=0.2, batch_size=10)  # 2 s per batch: the kill lands mid-campaign
    old = c.leader()
    first = next(n for n in c.ids if n != old)
    rcpts = [f"f{i:03d}@example.com" for i in range(60)]
    for k in range(3):
        submit_ok(c, first, rcpts[20 * k:20 * (k + 1)], "follow", f"<follow-{k}@example.com>")
    # Read from the leader first, so its death forces the command onto another node.
    proc = subprocess.Popen([PY, "-m", "raftmail.cli", "events", "--config", str(c.config_path), "--follow",
                             "--node", old], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reader = LineReader(proc)
    try:
        wait_for(lambda: len(reader.lines) >= 10, 20, "the first events on stdout")
        c.kill(old)
        at_kill = len(final_outcomes([json.loads(line) for line in list(reader.lines)]))
        assert at_kill < len(rcpts)
        c.wait_leader(among=live(c))
        wait_queue_done(c, len(rcpts))
        survivor = live(c)[0]
        expected = all_events(c, survivor)
        wait_for(lambda: len(reader.lines) >= len(expected), 20, "every committed event on stdout")
        time.sleep(1.0)  # a few more polls: anything printed twice would show now
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        reader.join()
    printed = [json.loads(line) for line in reader.lines]
    assert "Traceback" not in err, err
    seqs = [e["seq"] for e in printed]
    assert seqs == list(range(1, len(expected) + 1)), seqs  # in order, no gap, no repeat
    assert printed == expected  # the same events every node holds
    finals = final_outcomes(printed)
    assert sorted(finals) == rcpts
    assert all(v == ["delivered"] for v in finals.values()), {k: v for k, v in finals.items() if v != ["delivered"]}
    assert set(EVENT_FIELDS) == set(printed[0])
    assert "reading events from" in err, err  # it switched away from the killed node
    assert "gap" not in err, err

    r = subprocess.run([PY, "-m", "raftmail.cli", "events", "--config", str(c.config_path), "--campaign", "follow",
                        "--after", str(seqs[-5])], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["seq"] for line in r.stdout.splitlines()] == seqs[-4:]


# ---------------------------------------------------------------- webhook

@pytest.mark.cluster
@pytest.mark.faults
def test_webhook_gets_every_outcome_at_least_once_despite_failures_and_a_leader_kill(make_cluster) -> None:
    receiver = Receiver(fail_first=3)
    try:
        c = make_cluster(extra_toml=f'[monitoring]\nwebhook_url = "http://127.0.0.1:{receiver.port}/hook?token=t"\n'
                                    "webhook_batch = 7\nwebhook_retry_first = 0.2\nwebhook_max_retry_interval = 1\n")
        first = [f"w{i:02d}@example.com" for i in range(30)]
        submit_ok(c, "n2", first, "hook1", "<hook-1@example.com>")
        wait_queue_done(c, len(first))

        def received_all() -> bool:
            committed = {e["seq"] for e in all_events(c, live(c)[0])}
            return bool(committed) and committed <= {e["seq"] for e in receiver.events()}
        wait_for(received_all, 20, "every event at the webhook", interval=0.2)
        assert receiver.attempts >= 4 and len(receiver.batches) >= 30 // 7
        assert all(len(b) <= 7 for b in receiver.batches)
        assert set(receiver.events()[0]) == set(EVENT_FIELDS)
        assert sorted(final_outcomes(receiver.events())) == first
        old = c.leader()
        failed = total(scrape(c, old), "raftmail_webhook_posts_failed_total")
        assert failed >= 3  # the leader alone posts, so it saw every failure
        assert (c.data_dir(old) / "webhook.cursor").read_text().strip().isdigit()

        c.kill(old)
        new = c.wait_leader(among=live(c))
        second = [f"x{i:02d}@example.com" for i in range(10)]
        submit_ok(c, new, second, "hook2", "<hook-2@example.com>")
        wait_queue_done(c, len(first) + len(second))
        wait_for(received_all, 20, "every event at the webhook after the leader kill", interval=0.2)
        got = final_outcomes(receiver.events())
        assert sorted(got) == sorted(first + second)
        assert all(set(v) == {"delivered"} for v in got.values())  # repeats allowed, nothing else
    finally:
        receiver.close()


def test_webhook_poster_retries_with_backoff_and_skips_only_what_the_ring_lost(tmp_path: Path) -> None:
    receiver = Receiver(fail_first=2)
    ring = [[seq, 1.0, "delivered", "c", "s", seq, f"r{seq}@example.com", "n1", "h:25", 250, "ok", 1]
            for seq in range(11, 21)]  # events 1..10 already left the ring

    def read(after: int, limit: int) -> tuple[list[list], int, int]:
        return [e for e in ring if e[0] > after][:limit], 11, 20

    poster = WebhookPoster(f"http://127.0.0.1:{receiver.port}/", tmp_path / "cursor", read, lambda: True,
                           batch=4, timeout=5, retry_first=0.05, max_retry_interval=0.2)

    async def drive() -> list[float]:
        delays = []
        async with aiohttp.ClientSession() as session:
            while poster.cursor < 20:
                delays.append(await poster.step(session))
        return delays
    try:
        delays = asyncio.run(asyncio.wait_for(drive(), 20))
    finally:
        receiver.close()
    assert poster.events_skipped == 10 and poster.posts_failed == 2
    assert 0.04 <= delays[0] <= 0.2 and delays[1] >= delays[0] * 0.8 / 1.2  # doubling, jittered, capped
    assert [e["seq"] for e in receiver.events()] == list(range(11, 21))
    assert all(len(b) <= 4 for b in receiver.batches)
    assert (tmp_path / "cursor").read_text().strip() == "20"
    restarted = WebhookPoster("http://127.0.0.1:9/", tmp_path / "cursor", read, lambda: True)
    assert restarted.cursor == 20  # resumes after what was acknowledged
    assert all(retry_delay(n, 1.0, 300.0, 0.2) <= 300.0 for n in range(1, 40))


def test_webhook_does_not_follow_redirects(tmp_path: Path) -> None:
    """A 3xx is a failed POST: the events stay where the operator pointed them (a redirect could
    send recipient addresses elsewhere, even in clear text)."""
    from aiohttp import web
    moved_to: list[list] = []

    async def hook(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect("/elsewhere")

    async def elsewhere(request: web.Request) -> web.Response:
        moved_to.append(await request.json())
        return web.Response(text="ok")

    ring = [[1, 1.0, "delivered", "c", "s", 0, "r1@example.com", "n1", "h:25", 250, "ok", 1]]
    poster = WebhookPoster("http://127.0.0.1:1/hook", tmp_path / "cursor", lambda after, limit: (ring, 1, 1),
                           lambda: True, timeout=5, retry_first=0.05, max_retry_interval=0.2)

    async def drive() -> float:
        app = web.Application()
        app.router.add_post("/hook", hook)
        app.router.add_post("/elsewhere", elsewhere)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        poster.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
        try:
            async with aiohttp.ClientSession() as session:
                return await poster.step(session)
        finally:
            await runner.cleanup()
    delay = asyncio.run(asyncio.wait_for(drive(), 20))
    assert moved_to == [] and poster.posts_failed == 1 and poster.posts_ok == 0
    assert poster.cursor == 0 and delay > 0  # retried later, nothing acknowledged


def test_webhook_checks_the_receivers_certificate(tmp_path: Path) -> None:
    """Over https the receiver must present a certificate the node trusts: a self-signed one is a
    failed POST, and no event reaches it."""
    import ssl

    from aiohttp import web

    from raftmail.node.tls import server_context, write_self_signed
    cert, key = write_self_signed(tmp_path / "tls", "127.0.0.1")
    received: list[list] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(text="ok")

    ring = [[1, 1.0, "delivered", "c", "s", 0, "r1@example.com", "n1", "h:25", 250, "ok", 1]]
    poster = WebhookPoster("https://127.0.0.1:1/hook", tmp_path / "cursor", lambda after, limit: (ring, 1, 1),
                           lambda: True, timeout=5, retry_first=0.05, max_retry_interval=0.2)

    async def drive() -> None:
        app = web.Application()
        app.router.add_post("/hook", hook)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context(cert, key))
        await site.start()
        poster.url = f"https://127.0.0.1:{runner.addresses[0][1]}/hook"
        try:
            async with poster.session() as session:
                await poster.step(session)
            # The receiver does serve TLS: a client that trusts its certificate gets through.
            trusting = ssl.create_default_context(cafile=str(cert))
            async with aiohttp.ClientSession() as session:
                async with session.post(poster.url, json=[], ssl=trusting) as resp:
                    assert resp.status == 200
        finally:
            await runner.cleanup()
    asyncio.run(asyncio.wait_for(drive(), 20))
    assert received == [[]]  # only the trusting client's empty list
    assert poster.posts_failed == 1 and poster.posts_ok == 0 and poster.cursor == 0


# ---------------------------------------------------------------- readiness

@pytest.mark.cluster
@pytest.mark.faults
def test_readyz_false_without_quorum_and_true_again_after_catching_up(make_cluster) -> None:
    c = make_cluster()
    wait_for(lambda: all(http(c, n, "/readyz")[0] == 200 for n in c.ids), 15, "every node ready")
    assert http(c, "n1", "/readyz?write=1") == (200, {"ready": True, "node": "n1", "reason": "a noop write committed"})
    survivor = c.followers()[0]
    others = [n for n in c.ids if n != survivor]
    for n in others:
        c.kill(n)
    status, body = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(http(c, survivor, "/readyz")), 15,
                            "the survivor to say it is not ready")
    assert body["ready"] is False and "no quorum" in body["reason"], body
    assert http(c, survivor, "/healthz")[0] == 200  # the process is up all the same
    assert value(scrape(c, survivor), "raftmail_ready") == 0
    assert value(scrape(c, survivor), "raftmail_raft_quorum") == 0
    assert http(c, survivor, "/readyz?write=1")[0] == 503

    for n in others:
        c.start(n)
    wait_for(lambda: all(http(c, n, "/readyz")[0] == 200 for n in c.ids), 30, "every node ready again")
    lags = {n: value(scrape(c, n), "raftmail_raft_lag_entries") for n in c.ids}
    assert all(lag <= 100 for lag in lags.values()), lags
    assert http(c, survivor, "/readyz?write=1")[0] == 200

    proc = subprocess.Popen([PY, "-m", "raftmail.cli", "status", "--watch", "--config", str(c.config_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "160"})
    time.sleep(2.5)  # two or three redraws
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=15)
    assert "Traceback" not in err, err
    leader = c.leader()
    assert f"leader {leader}" in out and out.count("ready") >= 3, out
    assert all(n in out for n in c.ids)


def test_readiness_verdicts() -> None:
    base = {"role": "follower", "has_quorum": True, "leader_addr": "10.0.0.1:7000",
            "partners_connected": ["10.0.0.1:7000", "10.0.0.3:7000"], "leader_commit_index": 120,
            "applied_index": 100}
    assert readiness(base, 3, 100)[0] is True
    assert readiness({**base, "applied_index": 10}, 3, 100) == (False, "catching up: applied index 10 is 110 "
                                                                  "entries behind the leader's commit index 120 "
                                                                  "(ready within 100)")
    assert "no quorum: connected to 1 of 3" in readiness({**base, "has_quorum": False, "partners_connected": []}, 3, 100)[1]
    # Connected, but the leader went silent (a follower cut off with it, or stalled).
    assert readiness({**base, "has_quorum": False, "leader_silent_for": 2.25}, 3, 100) == \
        (False, "no quorum: nothing heard from the leader 10.0.0.1:7000 for 2.2s")
    assert "not connected" in readiness({**base, "partners_connected": ["10.0.0.3:7000"]}, 3, 100)[1]
    assert "no known leader" in readiness({**base, "leader_addr": None}, 3, 100)[1]
    assert "no known leader" in readiness({**base, "has_quorum": False, "leader_addr": None}, 3, 100)[1]
    assert readiness({**base, "role": "leader", "leader_addr": "10.0.0.2:7000"}, 3, 100)[0] is True
    assert readiness({**base, "leader_commit_index": None}, 3, 100)[0] is False


def test_domain_labels_are_capped_to_configured_domains() -> None:
    known = frozenset({"gmail.com", "example.com"})
    assert domain_label("Gmail.COM.", known) == "gmail.com"
    assert {domain_label(f"d{i}.example", known) for i in range(1000)} == {OTHER_DOMAIN}


def test_watch_view_shows_rates_progress_and_time_left() -> None:
    now = 1_000_000.0
    view = {"cluster": "t", "leader": "n1", "in_quorum": 3, "can_lose": 1, "queue": {"pending": 60, "delivered": 40},
            "nodes": [{"id": f"n{i}", "role": "leader" if i == 1 else "follower", "term": 2, "applied_index": 50,
                       "lag": 0, "batches_in_flight": 1} for i in (1, 2, 3)]}
    ready = {"n1": (True, "ok"), "n2": (False, "catching up: 300 behind"), "n3": (None, "refused")}
    camp = {"id": "spring", "created_at": now - 300, "paused": False, "cancelled": False, "recipients": 100,
            "counts": {"delivered": 40, "deferred": 5, "pending": 55}}
    events = [{"t": now - 30 + i * 0.5, "recipient": f"r{i}@gmail.com", "outcome": "delivered",
               "campaign": "spring"} for i in range(40)]
    events += [{"t": now - 5, "recipient": "x@yahoo.com", "outcome": "deferred", "campaign": "spring"}]
    events += [{"t": now - 500, "recipient": "old@gmail.com", "outcome": "delivered", "campaign": "spring"}]
    model = WatchModel()
    model.update(view, ready, [camp], events, now)
    assert model.domain_rates()[0] == ("gmail.com", 40.0, 0.0, 0.0)  # the old one is outside the window
    (row,) = model.campaign_rows()
    assert row["done"] == 40 and row["eta"] == pytest.approx(60 / (40 / 60))  # 60 left at 40 per minute
    console = Console(record=True, width=160)
    console.print(render_watch(model))
    text = console.export_text()
    assert "leader n1" in text and "gmail.com" in text and "yahoo.com" in text
    assert "40/100 (40.0%)" in text and "1m30s" in text
    assert "not ready: catching up: 300 behind" in text and "unreachable" in text

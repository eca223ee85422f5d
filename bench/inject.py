"""A personalised campaign through raftmail's HTTP injection API, compared in the same run with the
way a campaign tool feeds Postfix today: one SMTP transaction per personalised copy (16
connections) into a private Postfix, which relays to the same destination (Postfix's smtp-sink,
or the plain aiosmtpd server where smtp-sink is not installed).

    .venv/bin/python bench/inject.py --recipients 100000 --runs 3   # the goal's size
    .venv/bin/python bench/inject.py --recipients 2000 --runs 1     # a short check of the machinery

Per run, on fresh clusters:
- "answered": seconds from the first byte of the request until its reply (200 only once the
  whole request is committed on a majority), on an idle cluster, the campaign scheduled a day
  ahead, so nothing else competes; RSS growth per queued recipient is measured then: a follower's
  (the replicated state and the Raft log) and the leader's (which also parsed the request).
- "end to end": a second request, sent now, until the destination counted every copy.
- Postfix: the same number of copies rendered by the client, until the destination counted every one.
Prints medians with min-max and the ratio to Postfix. Everything runs on 127.0.0.1; Postfix
needs `bash bench/install-peers.sh`.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import smtplib
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
import urllib.request
from email.message import EmailMessage
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.lib.cluster import Cluster, ClusterSpec  # noqa: E402
from bench.lib.peers import start_destination  # noqa: E402
from bench.lib.postfix import PostfixRelay  # noqa: E402
from bench.lib.procs import wait_until  # noqa: E402
from bench.lib.report import describe_tree  # noqa: E402
from raftmail.consensus.commands import NewSubmission, Submit, encode_command  # noqa: E402
from raftmail.consensus.state import MailState  # noqa: E402
from raftmail.node.local_cluster import free_ports  # noqa: E402

SMTP_CONNECTIONS = 16  # the campaign tool's parallel SMTP connections into Postfix
POSTFIX_DESTINATION_CONCURRENCY = 20  # Postfix's default_destination_concurrency_limit


def request(n: int, campaign: str, send_at: str | None = None) -> dict:
    r = {"envelope_sender": "news@example.com", "campaign_id": campaign,
         "content": {"from": {"email": "news@example.com", "name": "Bench News"},
                     "subject": "Hello {{ name }}, your code {{ code }}",
                     "text_body": "Dear {{ name }},\n\nyour personal code is {{ code }}.\n\nBench News\n",
                     "html_body": "<p>Dear {{ name }},</p><p>your personal code is <b>{{ code }}</b>.</p>"},
         "recipients": [{"email": f"r{i}@{campaign}.bench", "name": f"Reader {i}",
                         "substitutions": {"code": f"C{i:07d}"}} for i in range(n)]}
    if send_at is not None:
        r["send_at"] = send_at
    return r


def copy_for(i: int) -> bytes:
    """What a campaign tool renders itself and submits, one transaction per copy."""
    m = EmailMessage()
    m["From"] = "Bench News <news@example.com>"
    m["To"] = f"Reader {i} <r{i}@postfix.bench>"
    m["Subject"] = f"Hello Reader {i}, your code C{i:07d}"
    m["Message-ID"] = f"<bench-{i}@postfix.bench>"
    m.set_content(f"Dear Reader {i},\n\nyour personal code is C{i:07d}.\n\nBench News\n")
    m.add_alternative(f"<p>Dear Reader {i},</p><p>your personal code is <b>C{i:07d}</b>.</p>", subtype="html")
    return m.as_bytes()


def start_cluster(root: Path, dest_port: int, n: int, per: int) -> tuple[Cluster, dict[str, int]]:
    # Postfix's default_destination_concurrency_limit is 20 connections to one destination: the
    # same for raftmail's one destination domain (its default is 10).
    spec = ClusterSpec(relay_port=dest_port, extra={
        "delivery": {"unsubscribe_url": "https://u.example.com/u/{token}"},
        "delivery.domains.default": {"max_connections": POSTFIX_DESTINATION_CONCURRENCY},
        "feedback": {"unsubscribe_secret": ["bench-feedback-key-0123456789abcdef"]},
        "api": {"recipients_per_submission": per, "max_recipients": max(n, 1000), "max_request_bytes": 256 * 2**20}})
    c = Cluster(root, spec)
    http = dict(zip(c.ids, free_ports(len(c.ids))))
    text = c.config_path.read_text()
    for nid, port in http.items():
        admin = f'admin = "127.0.0.1:{c.by_id[nid].admin}"'
        text = text.replace(admin, f'{admin}\nhttp = "127.0.0.1:{port}"')
    c.config_path.write_text(text)
    return c, http


def post(http_port: int, body: dict, key: str, timeout: float) -> tuple[dict, float, int]:
    """The reply, seconds until it came, and the request's size."""
    data = json.dumps(body).encode()
    started = time.monotonic()
    req = urllib.request.Request(f"http://127.0.0.1:{http_port}/api/inject/v1", data=data,
                                 headers={"Content-Type": "application/json", "Idempotency-Key": key})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        reply = json.loads(r.read())
    return reply, time.monotonic() - started, len(data)


def api_answered(root: Path, dest_port: int, n: int, per: int, timeout: float) -> dict:
    """The request answered on an idle cluster (sent a day ahead), and state per queued recipient."""
    c, http = start_cluster(root, dest_port, n, per)
    try:
        leader = c.start_all()
        rss_before = {nid: c.rss(nid) for nid in c.ids}
        tomorrow = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1)).isoformat()
        reply, answered, size = post(http[leader], request(n, "queued", tomorrow), "bench-queued", timeout)
        assert reply["success_count"] == n, reply
        for nid in c.ids:
            wait_until(lambda: sum(c.get(nid, "/status")["queue"].values()) >= n, timeout, f"{nid} to apply it")
        growth = {nid: (c.rss(nid) - rss_before[nid]) / n for nid in c.ids}
        bodies = c.get(leader, "/status")["bodies"]["bytes"]
    finally:
        c.stop_all()
    # A follower holds the replicated state and the Raft log; the leader also parsed the request.
    return {"answered_s": answered, "leader_bytes_per_rcpt": growth[leader],
            "state_bytes_per_rcpt": max(v for nid, v in growth.items() if nid != leader),
            "body_bytes_per_rcpt": bodies / n, "request_bytes": size}


def api_end_to_end(root: Path, dest, n: int, per: int, timeout: float) -> dict:
    c, http = start_cluster(root, dest.port, n, per)
    try:
        leader = c.start_all()
        before, cpu_before = dest.messages(), c.cpu_seconds()
        started = time.monotonic()
        reply, answered, _ = post(http[leader], request(n, "now"), "bench-now", timeout)
        assert reply["success_count"] == n, reply
        wait_until(lambda: dest.messages() >= before + n, timeout, f"{n} copies at the destination")
        seconds = time.monotonic() - started
        cpu = c.cpu_seconds() - cpu_before
    finally:
        c.stop_all()
    return {"rcpt_per_s": n / seconds, "answered_under_load_s": answered, "cpu_ms_per_rcpt": 1000 * cpu / n}


def postfix_end_to_end(root: Path, dest, n: int, timeout: float) -> dict:
    copies = [copy_for(i) for i in range(n)]  # rendered before the clock starts, as the API's request is built
    relay = PostfixRelay(root, dest.port)
    relay.start()
    try:
        before = dest.messages()
        failures: list[str] = []
        last_answer = [0.0]

        def worker(w: int) -> None:
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=timeout) as s:
                for i in range(w, n, SMTP_CONNECTIONS):
                    try:
                        s.sendmail("news@example.com", [f"r{i}@postfix.bench"], copies[i])
                    except smtplib.SMTPException as e:
                        failures.append(str(e))
            last_answer[0] = max(last_answer[0], time.monotonic())

        started = time.monotonic()
        threads = [threading.Thread(target=worker, args=(w,)) for w in range(SMTP_CONNECTIONS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failures:
            raise SystemExit(f"{len(failures)} SMTP transactions refused by Postfix, e.g. {failures[0]}")
        wait_until(lambda: dest.messages() >= before + n, timeout, f"{n} copies at the destination")
        seconds = time.monotonic() - started
    finally:
        relay.stop()
    return {"rcpt_per_s": n / seconds, "answered_s": last_answer[0] - started}


def state_bytes(n: int, per: int) -> float:
    """Bytes the replicated state holds per queued recipient of a request: the same submit
    commands the API proposes, applied in this process and counted by tracemalloc (the RSS rows
    add the Raft log kept until compaction, and what the allocator keeps after parsing)."""
    state, now = MailState(), time.time()

    def submit(prefix: str) -> bytes:
        return encode_command(Submit(now, 86400.0, 10**8, [NewSubmission(
            f"{prefix}.{k}", "queued", "news@example.com", "0" * 64, 1000,
            [f"r{i}@queued.bench" for i in range(s, min(n, s + per))], None, "example.com", now + 86400, s)
            for k, s in enumerate(range(0, n, per))]))
    state.apply_blob(submit("warm"))  # the first of everything (campaign, interned names) not counted
    blob = submit("queued")
    gc.collect()
    tracemalloc.start()
    state.apply_blob(blob)
    del blob
    gc.collect()
    held = sum(stat.size for stat in tracemalloc.take_snapshot().statistics("filename"))
    tracemalloc.stop()
    return held / n


def spread(values: list[float], digits: int) -> str:
    med = statistics.median(values)
    return f"{med:.{digits}f}" if len(values) == 1 else \
        f"{med:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipients", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--per-submission", type=int, default=1000, help="[api] recipients_per_submission")
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args()
    n, tree = args.recipients, describe_tree()
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="raftmail-bench-inject-") as tmp:
        Path(tmp).chmod(0o755)  # Postfix's own user must reach its queue below it
        for run in range(args.runs):
            root = Path(tmp) / f"run{run}"
            root.mkdir()
            dest = start_destination(root / "dest")
            try:
                row: dict = {}
                # Alternate the order, so drift over the whole run hits both alike.
                steps = [("postfix", lambda: postfix_end_to_end(root / "postfix", dest, n, args.timeout)),
                         ("e2e", lambda: api_end_to_end(root / "e2e", dest, n, args.per_submission, args.timeout))]
                for name, step in (steps if run % 2 == 0 else steps[::-1]):
                    row[name] = step()
                row["answered"] = api_answered(root / "answered", dest.port, n, args.per_submission, args.timeout)
            finally:
                dest.stop()
            runs.append(row)
            print(f"run {run + 1}: api {row['e2e']['rcpt_per_s']:.0f} rcpt/s, postfix {row['postfix']['rcpt_per_s']:.0f}"
                  f" rcpt/s, answered in {row['answered']['answered_s']:.2f} s", file=sys.stderr)
    col = lambda step, key: [r[step][key] for r in runs]  # noqa: E731
    ratios = [r["e2e"]["rcpt_per_s"] / r["postfix"]["rcpt_per_s"] for r in runs]
    print(f"{n} personalised recipients, 3 raftmail nodes vs a private Postfix, into {dest.kind} on "
          f"127.0.0.1; commit {tree}; median (min–max) of {args.runs} run(s)\n")
    print("| measure | raftmail API (one request) | Postfix (one SMTP transaction per copy) |")
    print("|---|---:|---:|")
    print(f"| recipients/s end to end | {spread(col('e2e', 'rcpt_per_s'), 0)} | {spread(col('postfix', 'rcpt_per_s'), 0)} |")
    print(f"| request answered after, idle (s) | {spread(col('answered', 'answered_s'), 2)} | – |")
    print(f"| request answered after, while delivering (s) | {spread(col('e2e', 'answered_under_load_s'), 2)} | "
          f"{spread(col('postfix', 'answered_s'), 2)} (last copy accepted) |")
    print(f"| replicated state per queued recipient (B) | {state_bytes(n, args.per_submission):.0f} | – |")
    print(f"| follower RSS growth per queued recipient: state and log (B) | "
          f"{spread(col('answered', 'state_bytes_per_rcpt'), 0)} | – |")
    print(f"| leader RSS growth per queued recipient, request parsing included (B) | "
          f"{spread(col('answered', 'leader_bytes_per_rcpt'), 0)} | – |")
    print(f"| body store per recipient (B) | {spread(col('answered', 'body_bytes_per_rcpt'), 1)} | – |")
    print(f"| node CPU per recipient, 3 nodes (ms) | {spread(col('e2e', 'cpu_ms_per_rcpt'), 2)} | – |")
    print(f"\nraftmail API / Postfix, recipients/s end to end: {spread(ratios, 2)}x "
          f"(request of {runs[0]['answered']['request_bytes'] / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()

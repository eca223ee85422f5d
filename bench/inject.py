"""A personalised campaign through the HTTP injection API, end to end, compared in the same run
with the way a campaign tool feeds an MTA today: one SMTP transaction per personalised copy, into
the same 3-node cluster and the same counting SMTP server (bench/lib/plain_smtpd.py).

    .venv/bin/python bench/inject.py --recipients 100000     # the issue's size
    .venv/bin/python bench/inject.py --recipients 2000       # a short run that checks the machinery

Prints one table: recipients per second end to end (from the first byte sent until every recipient
is in a final state on the leader), seconds until the request (or the last SMTP transaction) is
answered, body-store bytes per recipient, and the log bytes per recipient of the submit commands.
Everything runs on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import json
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from email.message import EmailMessage
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.lib.cluster import Cluster, ClusterSpec, queue_final  # noqa: E402
from raftmail.consensus.commands import NewSubmission, Submit, encode_command  # noqa: E402
from raftmail.node.local_cluster import free_ports  # noqa: E402

SMTP_CONNECTIONS = 16  # the campaign tool's parallel SMTP connections


def request(n: int, domain: str) -> dict:
    return {"envelope_sender": "news@example.com", "campaign_id": f"bench-{domain.split('.')[0]}",
            "content": {"from": {"email": "news@example.com", "name": "Bench News"},
                        "subject": "Hello {{ name }}, your code {{ code }}",
                        "text_body": "Dear {{ name }},\n\nyour personal code is {{ code }}.\n\nBench News\n",
                        "html_body": "<p>Dear {{ name }},</p><p>your personal code is <b>{{ code }}</b>.</p>"},
            "recipients": [{"email": f"r{i}@{domain}", "name": f"Reader {i}",
                            "substitutions": {"code": f"C{i:07d}"}} for i in range(n)]}


def copy_for(i: int, domain: str) -> bytes:
    """What a campaign tool renders itself and submits, one transaction per copy."""
    m = EmailMessage()
    m["From"] = "Bench News <news@example.com>"
    m["To"] = f"Reader {i} <r{i}@{domain}>"
    m["Subject"] = f"Hello Reader {i}, your code C{i:07d}"
    m["Message-ID"] = f"<bench-{i}@{domain}>"
    m["X-Campaign-ID"] = f"bench-{domain.split('.')[0]}"
    m.set_content(f"Dear Reader {i},\n\nyour personal code is C{i:07d}.\n\nBench News\n")
    m.add_alternative(f"<p>Dear Reader {i},</p><p>your personal code is <b>C{i:07d}</b>.</p>", subtype="html")
    return m.as_bytes()


def wait_final(c: Cluster, total: int, timeout: float) -> float:
    _, at = c.wait_queue(c.leader() or c.wait_ready(), lambda q: queue_final(q) >= total, timeout,
                         f"{total} recipients in a final state", interval=0.2)
    return at


def body_bytes(c: Cluster) -> int:
    return max(c.get(nid, "/status")["bodies"]["bytes"] for nid in c.ids)


def run_api(c: Cluster, http_port: int, n: int, per: int, timeout: float) -> dict:
    data = json.dumps(request(n, "api.bench")).encode()
    bodies = body_bytes(c)
    started = time.monotonic()
    req = urllib.request.Request(f"http://127.0.0.1:{http_port}/api/inject/v1", data=data,
                                 headers={"Content-Type": "application/json", "Idempotency-Key": "bench-api"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        reply = json.loads(r.read())
    answered = time.monotonic() - started
    assert reply["success_count"] == n, reply
    end = wait_final(c, n, timeout)
    log_bytes = sum(len(encode_command(Submit(0.0, 86400.0, 10**7, [NewSubmission(
        f"{reply['submission_id']}.{k}", "bench-api", "news@example.com", "0" * 64, len(data),
        [f"r{i}@api.bench" for i in range(s, min(n, s + per))], "0" * 32, "example.com", None, s)])))
        for k, s in enumerate(range(0, n, per)))
    return {"rcpt_per_s": n / (end - started), "answered_s": answered,
            "body_bytes_per_rcpt": (body_bytes(c) - bodies) / n, "log_bytes_per_rcpt": log_bytes / n,
            "request_bytes": len(data)}


def run_smtp(c: Cluster, n: int, done_before: int, timeout: float) -> dict:
    ports = [c.by_id[nid].smtp for nid in c.ids]
    bodies = body_bytes(c)
    failures: list[str] = []
    last_answer = [0.0]

    def worker(w: int) -> None:
        with smtplib.SMTP("127.0.0.1", ports[w % len(ports)], timeout=timeout) as s:
            for i in range(w, n, SMTP_CONNECTIONS):
                try:
                    s.sendmail("news@example.com", [f"r{i}@smtp.bench"], copy_for(i, "smtp.bench"))
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
        raise SystemExit(f"{len(failures)} SMTP transactions refused, e.g. {failures[0]}")
    end = wait_final(c, done_before + n, timeout)
    return {"rcpt_per_s": n / (end - started), "answered_s": last_answer[0] - started,
            "body_bytes_per_rcpt": (body_bytes(c) - bodies) / n, "log_bytes_per_rcpt": None,
            "request_bytes": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipients", type=int, default=2000)
    parser.add_argument("--per-submission", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="raftmail-bench-inject-") as tmp:
        root = Path(tmp)
        sink_port = free_ports(1)[0]
        sink = subprocess.Popen([sys.executable, str(Path(__file__).parent / "lib" / "plain_smtpd.py"),
                                 "--port", str(sink_port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert sink.stdout is not None and sink.stdout.readline().startswith("READY")
        spec = ClusterSpec(relay_port=sink_port, extra={
            "delivery": {"unsubscribe_url": "https://u.example.com/u/{token}"},
            "feedback": {"unsubscribe_secret": ["bench-feedback-key-0123456789abcdef"]},
            "api": {"recipients_per_submission": args.per_submission, "max_recipients": max(args.recipients, 1000),
                    "max_request_bytes": 256 * 2**20}})
        c = Cluster(root, spec)
        http = dict(zip(c.ids, free_ports(len(c.ids))))
        text = c.config_path.read_text()
        for nid, port in http.items():
            admin = f'admin = "127.0.0.1:{c.by_id[nid].admin}"'
            text = text.replace(admin, f'{admin}\nhttp = "127.0.0.1:{port}"')
        c.config_path.write_text(text)
        try:
            leader = c.start_all()
            rows = {"api (one request)": run_api(c, http[leader], args.recipients, args.per_submission, args.timeout),
                    f"smtp ({SMTP_CONNECTIONS} connections, one transaction per copy)":
                        run_smtp(c, args.recipients, args.recipients, args.timeout)}
        finally:
            c.stop_all()
            sink.communicate("quit\n", timeout=10)
    print(f"{args.recipients} personalised recipients, 3 nodes, into a counting SMTP server on 127.0.0.1\n")
    print("| way in | rcpt/s end to end | answered after (s) | body bytes/rcpt | log bytes/rcpt (submit) |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        log = "–" if r["log_bytes_per_rcpt"] is None else f"{r['log_bytes_per_rcpt']:.0f}"
        print(f"| {name} | {r['rcpt_per_s']:.0f} | {r['answered_s']:.2f} | {r['body_bytes_per_rcpt']:.0f} | {log} |")
    api, smtp = rows["api (one request)"], next(v for k, v in rows.items() if k.startswith("smtp"))
    print(f"\napi / smtp end to end: {api['rcpt_per_s'] / smtp['rcpt_per_s']:.1f}x")


if __name__ == "__main__":
    main()

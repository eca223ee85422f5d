"""Memory follows the queue, not the history: RSS over 1,000,000 one-recipient submissions under
one campaign id.

Two parts, both run by default:

* `state` (the 1,000,000): drives the replicated state machine (consensus/state.py) directly in
  this process, with the commands a cluster commits, msgpack-encoded as Raft carries them:
  submissions (50 per group-commit entry, each with its own Message-ID key and body digest, all
  under the one `X-Campaign-ID`), the leader's assignments (100 recipients per batch, 10 domains),
  the holders' reports (99% delivered, 1% `550 5.1.1`, which suppresses the address), and a prune
  every simulated minute with the count bounds of node/config.py's defaults. Time is simulated at
  `--rate` submissions per second, so retention passes within the run; `--retention`,
  `--archive-retention` and `--dedupe-window` are short for that reason (the defaults are 7 days,
  30 days and 24 hours). A full cluster at 1,000,000 would take hours of intake on this machine.
  It prints RSS and the size of every record table at every 100,000 submissions, and the slowest
  prune (the work the Raft tick thread does per prune command).
* `cluster` (the smaller real check): a real 3-node cluster on 127.0.0.1 delivering into a real
  capture sink (`raftmail sink`); `--cluster-rounds` rounds of `--cluster-per-round` one-recipient
  SMTP submissions under one campaign id (30,000 by default), each round delivered and retired
  (short retention, as above) before each node's RSS is read. Growth is measured from the first
  round after the replicated ring of the last 20,000 outcome events is full.

    .venv/bin/python bench/memory_history.py                 # both parts
    .venv/bin/python bench/memory_history.py --part state --submissions 200000
    .venv/bin/python bench/memory_history.py --part cluster --cluster-rounds 4

Exit status 1 when RSS (after malloc_trim, so memory glibc keeps free for reuse does not count)
grew by more than `--max-growth` (fraction) between the first checkpoint after retention has
passed and the last one; raw RSS is printed beside it.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import shutil
import smtplib
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from raftmail.consensus.commands import Assign, Command, NewSubmission, Prune, Report, ReportRow, Submit, encode_command  # noqa: E402,E501
from raftmail.consensus.state import EVENT_RING, MailState  # noqa: E402
from raftmail.node.config import IntakeSection, StorageSection  # noqa: E402

DOMAINS = 10
SUBS_PER_ENTRY = 50  # submissions per group-committed Raft entry
BATCH = 100  # recipients per batch (the [delivery] batch_size default)
PRUNE_EVERY = 60.0  # simulated seconds (the maintenance_interval_seconds default)
CAMPAIGN = "weekly-newsletter"


def rss_mb(pid: int | None = None) -> float:
    with open(f"/proc/{pid or 'self'}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def trimmed_rss_mb() -> float | None:
    """RSS after glibc's malloc_trim(0) hands free heap pages back: what the live objects need,
    without memory the allocator keeps for reuse. None without glibc."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return None
    return rss_mb()


def apply(state: MailState, command: Command):
    return state.apply_blob(encode_command(command))


def run_state(args: argparse.Namespace) -> bool:
    st_def, in_def = StorageSection(), IntakeSection()
    bounds = {"max_finished": args.max_finished or st_def.max_finished_recipients,
              "max_archived": args.max_archived or st_def.max_archived_recipients,
              "max_suppressed": st_def.max_suppressed_addresses,
              "max_dedupe": in_def.dedupe_max_keys}
    print(f"state machine, {args.submissions:,} one-recipient submissions under campaign {CAMPAIGN!r} at "
          f"{args.rate:g}/s simulated; retention {args.retention:g} s, archives {args.archive_retention:g} s, "
          f"dedupe window {args.dedupe_window:g} s; bounds {bounds}")
    state = MailState()
    t0 = 1_800_000_000.0
    now = t0
    next_prune = now + PRUNE_EVERY
    slowest_prune = 0.0
    prune_times: list[float] = []
    settled_at = args.retention + args.archive_retention + args.dedupe_window + 2 * PRUNE_EVERY
    rows = []
    settled_rss = None
    header = (f"{'submitted':>10} {'sim h':>6} {'RSS MB':>7} {'trimmed':>7} {'live':>7} {'finished':>8} {'archived':>8} "
              f"{'dedupe':>8} {'suppr.':>7} {'camp.subs':>9} {'blocks k':>8} {'slowest prune ms':>16}")
    print(header)
    started = time.monotonic()
    step = 1000
    for base in range(0, args.submissions, step):
        n = min(step, args.submissions - base)
        for i in range(base, base + n, SUBS_PER_ENTRY):
            subs = []
            for j in range(i, min(base + n, i + SUBS_PER_ENTRY)):
                body = hashlib.sha256(b"personalised body %d" % j).hexdigest()
                key = hashlib.sha256(b"news@example.com\0<%d@example.com>" % j).hexdigest()[:32]
                subs.append(NewSubmission(f"{int(now * 1000):x}-n1-{j}", CAMPAIGN, "news@example.com", body, 2048,
                                          [f"reader{j}@example{j % DOMAINS}.com"], key))
            res = apply(state, Submit(now, args.dedupe_window, in_def.max_queued_recipients, subs,
                                      bounds["max_dedupe"]))
            assert all(r[0] == "ok" for r in res), res[:3]
        now += n / args.rate
        # The leader's round: lease what is eligible, the holders report it.
        for domain, items in state.eligible(now, 10 * n).items():
            for k in range(0, len(items), BATCH):
                chunk = items[k:k + BATCH]
                got = apply(state, Assign("n1", domain, now, lease=30, term=1, max_connections=1000,
                                          max_per_minute=0, items=chunk))
                bid = got["batch"]
                results = [ReportRow(sid, idx, 550, "5.1.1", "no such user", None, "mx")
                           if args.bounce_every and int(sid.rsplit("-", 1)[1]) % args.bounce_every == 0
                           else ReportRow(sid, idx, 250, "2.0.0", "ok", None, "mx") for sid, idx in chunk]
                apply(state, Report(batch=bid, node="n1", now=now + 0.5, max_age=259200, results=results))
        while now >= next_prune:
            cmd = Prune(now, args.retention, args.archive_retention, dedupe_window=args.dedupe_window, **bounds)
            t = time.perf_counter()
            res = apply(state, cmd)
            prune_times.append(time.perf_counter() - t)
            slowest_prune = max(slowest_prune, prune_times[-1])
            if not res.get("more"):
                next_prune += PRUNE_EVERY
        done = base + n
        if done % args.every == 0 or done == args.submissions:
            gc.collect()
            rss = rss_mb()
            trimmed = trimmed_rss_mb()
            camp = state.campaigns.get(CAMPAIGN)
            row = (done, (now - t0) / 3600, rss, trimmed or 0.0, len(state.submissions), len(state.finished),
                   len(state.archived), len(state.dedupe), len(state.suppressed), len(camp.submissions) if camp else 0,
                   sys.getallocatedblocks() / 1000, slowest_prune * 1000)
            rows.append(row)
            print(f"{row[0]:>10,} {row[1]:>6.2f} {row[2]:>7.1f} {row[3]:>7.1f} {row[4]:>7,} {row[5]:>8,} {row[6]:>8,} "
                  f"{row[7]:>8,} {row[8]:>7,} {row[9]:>9,} {row[10]:>8.0f} {row[11]:>16.1f}", flush=True)
            if settled_rss is None and now - t0 > settled_at and done % args.every == 0:
                settled_rss = (rss, trimmed or rss)
                settled_row = len(rows) - 1
    took = time.monotonic() - started
    summary = state.campaign_summary(state.campaigns[CAMPAIGN])
    prune_times.sort()
    print(f"{len(prune_times)} prunes: median {prune_times[len(prune_times) // 2] * 1000:.1f} ms, p99 "
          f"{prune_times[int(len(prune_times) * 0.99)] * 1000:.1f} ms, slowest {prune_times[-1] * 1000:.1f} ms "
          "(the slowest include Python's cyclic garbage collection, which any command may trigger)")
    print(f"campaign shows {summary['submissions']:,} submissions, "
          f"{summary['recipients']:,} recipients still counted; {took:.0f} s wall time")
    if settled_rss is None:
        print("retention never passed within the run: no verdict on growth")
        return True
    # Rows at multiples of --every sit at the same point of the prune cycle (with the defaults:
    # 90,000 submissions = 5 simulated minutes at 300/s), so they compare like with like.
    last = [r for r in rows if r[0] % args.every == 0][-1]
    raw = (last[2] - settled_rss[0]) / settled_rss[0]
    live = ((last[3] or last[2]) - settled_rss[1]) / settled_rss[1]
    print(f"from {rows[settled_row][0]:,} submissions (retention passed) to {last[0]:,}: RSS {settled_rss[0]:.1f} -> "
          f"{last[2]:.1f} MB ({raw * 100:+.1f}%), after malloc_trim {settled_rss[1]:.1f} -> {last[3] or last[2]:.1f} MB "
          f"({live * 100:+.1f}%)")
    return live <= args.max_growth


# ---------------------------------------------------------------------------- real cluster


def run_cluster(args: argparse.Namespace) -> bool:
    from lib.cluster import Cluster, ClusterSpec
    from lib.procs import free_port, spawn, wait_port, wait_until

    root = Path(tempfile.mkdtemp(prefix="raftmail-memory-"))
    sink_port = free_port()
    sink = spawn("sink", [sys.executable, "-m", "raftmail.cli", "sink", "--listen", f"127.0.0.1:{sink_port}",
                          "--maildir", str(root / "sink")], root / "sink.log")
    spec = ClusterSpec(relay_port=sink_port, extra={
        # The body cache (64 MiB by default) is bounded but would still be filling at this size:
        # 1 MiB keeps it out of the measurement.
        "storage": {"body_retention_seconds": 1.0, "archive_retention_seconds": 3.0,
                    "maintenance_interval_seconds": 1.0, "body_gc_grace_seconds": 1.0,
                    "body_cache_bytes": 2**20},
        "intake": {"dedupe_window_seconds": 3.0},
        "delivery": {"report_interval": 0.1}})
    cluster = Cluster(root / "cluster", spec)
    print(f"real cluster: {args.cluster_rounds} rounds of {args.cluster_per_round:,} one-recipient submissions "
          f"under campaign {CAMPAIGN!r}")
    ok = True
    try:
        wait_port(sink_port, 15, "the capture sink")
        cluster.start_all()
        leader = cluster.wait_ready()
        ports = cluster.smtp_ports()
        rows = []

        def submit(worker: int, count: int, offset: int) -> None:
            with smtplib.SMTP("127.0.0.1", ports[worker % len(ports)], timeout=30) as s:
                for j in range(offset + worker, offset + count, args.cluster_clients):
                    msg = (f"From: news@example.com\r\nTo: reader{j}@example.com\r\nSubject: Weekly {j}\r\n"
                           f"Message-ID: <weekly-{j}@example.com>\r\nX-Campaign-ID: {CAMPAIGN}\r\n\r\n"
                           f"Hello reader {j}.\r\n").encode()
                    for _ in range(50):
                        try:
                            s.sendmail("news@example.com", [f"reader{j}@example.com"], msg)
                            break
                        except smtplib.SMTPResponseException as e:
                            if e.smtp_code // 100 != 4:
                                raise
        for r in range(args.cluster_rounds):
            offset = r * args.cluster_per_round
            t = time.monotonic()
            with ThreadPoolExecutor(args.cluster_clients) as pool:
                for f in [pool.submit(submit, w, args.cluster_per_round, offset) for w in range(args.cluster_clients)]:
                    f.result()
            submitted = time.monotonic() - t
            total = offset + args.cluster_per_round

            def retired():
                st = cluster.status(leader)
                return st if st and st.get("submissions", 1) == 0 and sum(
                    st["queue"].get(k, 0) for k in ("pending", "in_flight", "deferred")) == 0 else None
            wait_until(retired, 300, "every submission delivered and archived", interval=0.5)
            time.sleep(args.settle)  # not synchronisation: archives and keys age past their retention
            rss = {n.id: rss_mb(cluster.procs[n.id].pid) for n in cluster.nodes}
            st = cluster.status(leader) or {}
            rows.append((total, rss))
            print(f"  after {total:>7,} submissions ({submitted:.0f} s intake): RSS MB "
                  + ", ".join(f"{k} {v:.1f}" for k, v in rss.items())
                  + f"; live submissions {st.get('submissions')}, campaigns {st.get('campaigns')}", flush=True)
        # The replicated ring of the last EVENT_RING outcome events fills first: compare from the
        # first round after it is full.
        settled = [i for i, (total, _) in enumerate(rows) if total > EVENT_RING]
        if len(settled) >= 2:
            first, last = rows[settled[0]][1], rows[-1][1]
            worst = max((last[k] - first[k]) / first[k] for k in first)
            print(f"largest node RSS growth from round {settled[0] + 1} ({rows[settled[0]][0]:,} submissions, "
                  f"event ring full) to round {len(rows)}: {worst * 100:+.1f}%")
            ok = worst <= args.max_growth
        else:
            print(f"fewer than two rounds after the event ring ({EVENT_RING:,}) filled: no verdict on growth")
    finally:
        cluster.stop_all()
        sink.stop()
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["state", "cluster", "both"], default="both")
    p.add_argument("--submissions", type=int, default=1_000_000)
    p.add_argument("--every", type=int, default=90_000,
                   help="print a row every this many submissions (a multiple of rate x 60 s compares like with like)")
    p.add_argument("--rate", type=float, default=300.0, help="simulated submissions per second")
    p.add_argument("--retention", type=float, default=60.0, help="[storage] body_retention_seconds")
    p.add_argument("--archive-retention", type=float, default=300.0, help="[storage] archive_retention_seconds")
    p.add_argument("--dedupe-window", type=float, default=300.0, help="[intake] dedupe_window_seconds")
    p.add_argument("--max-finished", type=int, default=0, help="default: [storage] max_finished_recipients")
    p.add_argument("--max-archived", type=int, default=0, help="default: [storage] max_archived_recipients")
    p.add_argument("--bounce-every", type=int, default=100,
                   help="one recipient in this many bounces with 5.1.1 and is suppressed (0: none)")
    p.add_argument("--max-growth", type=float, default=0.05)
    p.add_argument("--cluster-rounds", type=int, default=5)
    p.add_argument("--cluster-per-round", type=int, default=6000)
    p.add_argument("--cluster-clients", type=int, default=6)
    p.add_argument("--keep", action="store_true", help="keep the cluster's data and logs")
    p.add_argument("--settle", type=float, default=5.0, help="seconds after each round before RSS is read")
    args = p.parse_args()
    from lib.report import describe_tree
    print(f"raftmail: {describe_tree()}")
    ok = True
    if args.part in ("state", "both"):
        ok = run_state(args) and ok
    if args.part in ("cluster", "both"):
        ok = run_cluster(args) and ok
    print("flat" if ok else "GREW")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

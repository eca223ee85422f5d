#!/usr/bin/env python3
"""raftmail benchmark harness.

    python bench/run.py                 # full: every case, 5 runs each, idle-machine checks
    python bench/run.py --quick         # tiny: a few hundred messages, 1 run each
    python bench/run.py --cases intake-baseline,intake-raftmail --runs 3
    python bench/run.py --list

Starts everything itself on 127.0.0.1 (raftmail nodes, Postfix's smtp-source and smtp-sink, a plain
aiosmtpd server, a private Postfix), prints a table of median / min / max with the ratio to the
baselines measured in the same invocation, and writes it to bench/results/latest.md (raw samples
next to it as latest.json). Peers: `sudo bench/install-peers.sh`. See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from lib import cases, loadgen, peers, procs, report, runner  # noqa: E402
from lib.report import UNCOMMITTED, describe_tree  # noqa: E402
from lib.cluster import DEFAULT_NODE_COMMAND  # noqa: E402
from lib.cpu import DEFAULT_MAX_WAIT, IdlePolicy  # noqa: E402

DEFAULT_OUT = BENCH_DIR / "results" / "latest.md"
FULL_RUNS = 5
QUICK_RUNS = 1
EXIT_USAGE = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, 1 run per case, no idle checks (the smoke test's mode)")
    parser.add_argument("--cases", default="all",
                        help="comma list of case ids, or the groups all / peers / raftmail (default all)")
    parser.add_argument("--runs", type=int, help=f"runs per case (default {FULL_RUNS}; {QUICK_RUNS} with --quick)")
    parser.add_argument("--messages", type=int, help="2 KB messages per run of the intake/e2e cases")
    parser.add_argument("--generator", choices=("auto", "smtp-source", "python"), default="auto",
                        help="load generator; auto = smtp-source, or with --quick the Python one if "
                             "smtp-source is missing")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown table (default %(default)s)")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter for raftmail nodes and the Python peers (default: this one)")
    parser.add_argument("--node-command", default=DEFAULT_NODE_COMMAND,
                        help="how to start one node; {python}, {config}, {node} are filled in "
                             "(default: %(default)s)")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (logs, configs)")
    parser.add_argument("--no-idle-check", action="store_true",
                        help="full mode: don't wait for a quiet machine or discard disturbed runs")
    parser.add_argument("--idle-wait", type=float, default=DEFAULT_MAX_WAIT,
                        help="full mode: longest wait for a quiet machine before each run, seconds "
                             "(default %(default)s)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    return parser.parse_args(argv)


def select_cases(spec: str) -> list[cases.Case]:
    wanted: set[str] = set()
    for name in (part.strip() for part in spec.split(",") if part.strip()):
        if name in cases.GROUPS:
            wanted.update(cases.GROUPS[name])
        elif name in cases.CASES_BY_ID:
            wanted.add(name)
        else:
            known = ", ".join([*cases.GROUPS, *cases.CASES_BY_ID])
            raise ValueError(f"unknown case {name!r}; known: {known}")
    # Registry order, whatever the order given: the latency cases read the intake medians.
    return [case for case in cases.CASES if case.id in wanted]


def resolve_generator(choice: str, quick: bool) -> tuple[str | None, str | None]:
    """(generator, warning) or (None, error)."""
    have_source = peers.find_tool("smtp-source") is not None
    if choice == "python":
        return "python", None
    if have_source:
        return "smtp-source", None
    if choice == "auto" and quick:
        return "python", (f"smtp-source not found, using the Python load generator instead "
                          f"(recorded in the table); for the real yardstick {peers.INSTALL_HINT}")
    return None, f"smtp-source not found: {peers.INSTALL_HINT}; or pass --generator python"


def python_has_peers(python: str) -> str | None:
    done = subprocess.run([python, "-c", "import aiosmtpd, aiosmtplib"], capture_output=True, text=True)
    if done.returncode != 0:
        return (f"{python} cannot import aiosmtpd/aiosmtplib; run with the project's venv "
                "(.venv/bin/python bench/run.py) or pass --python")
    return None


def describe_machine() -> str:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({model}), Linux {platform.release()}, Python {platform.python_version()}"


def header_lines(args: argparse.Namespace, ctx: cases.Ctx, started: float, quick: bool) -> list[str]:
    sizes = ctx.sizes
    generator = (f"smtp-source (Postfix {peers.postfix_version() or '?'})"
                 if ctx.generator == "smtp-source" else f"Python ({loadgen.GENERATOR_NAME})")
    destination = ("smtp-sink" if ctx.destination == "smtp-sink"
                   else "plain aiosmtpd server (smtp-sink not installed)")
    idle = ("on: wait for others < 0.06 cores, discard runs where they used > 0.10"
            if ctx.idle.enabled else "off")
    return [
        f"mode: {'quick' if quick else 'full'}; runs per case: {ctx.runs}"
        + ("" if quick else f" (catch-up and memory: at most {cases.HEAVY_CASE_RUNS}; failover: 10)")
        + f"; idle check: {idle}",
        f"load generator: {generator}; latency and failover always use {loadgen.GENERATOR_NAME} "
        "(they time every reply)",
        f"destination of deliveries: {destination}; every address 127.0.0.1",
        f"sizes: {sizes.messages} × 2 KB, {sizes.bulk_messages} × {cases.BULK_RECIPIENTS} rcpt, "
        f"{sizes.large_messages} × 50 KB; {sizes.sessions} sessions; catch-up {sizes.catchup_outcomes} "
        f"outcomes; memory {sizes.memory_recipients} recipients",
        f"machine: {describe_machine()}",
        f"raftmail: {describe_tree()}; nodes started with `{args.node_command}`",
        f"took {time.monotonic() - started:.0f} s",
    ]


FOOTER = [
    "Ratios divide this row's median by the named row's median, both measured in this invocation. "
    "msg/s and rcpt/s: higher is better; s, ms and bytes/rcpt: lower is better. "
    "Intake rates count 250 replies (raftmail replies 250 only once committed) over the load "
    "generator's wall time; end-to-end rates run until the last recipient reached the destination.",
]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for case in cases.CASES:
            print(f"{case.id:28} {case.group:9} {case.rows[0].title}")
        return 0
    try:
        selected = select_cases(args.cases)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    generator, message = resolve_generator(args.generator, args.quick)
    if generator is None:
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE
    if message:
        print(f"warning: {message}", file=sys.stderr)
    if args.out.resolve() == DEFAULT_OUT.resolve() and describe_tree().endswith(UNCOMMITTED):
        # The recorded results must name the tree they measured: commit first, or write elsewhere.
        print(f"error: the work tree has uncommitted changes; commit them before writing {DEFAULT_OUT.name}, "
              "or pass --out to write the table somewhere else", file=sys.stderr)
        return EXIT_USAGE
    problem = python_has_peers(args.python)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    procs.install_cleanup_handlers()
    sizes = cases.QUICK if args.quick else cases.FULL
    if args.messages:
        sizes = cases.Sizes(**{**asdict(sizes), "messages": args.messages})
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="raftmail-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)  # Postfix's own user must reach its queue below it

    def progress(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    ctx = cases.Ctx(
        quick=args.quick, runs=args.runs or (QUICK_RUNS if args.quick else FULL_RUNS),
        generator=generator, python=args.python, workdir=workdir,
        idle=IdlePolicy(enabled=not args.quick and not args.no_idle_check, max_wait=args.idle_wait),
        sizes=sizes,
        node_command=args.node_command,
        destination="smtp-sink" if peers.find_tool("smtp-sink") else "aiosmtpd", progress=progress)
    started = time.monotonic()
    rows: list[report.Row] = []
    capabilities: dict[str, str | None] = {}
    try:
        for case in selected:
            rows += runner.run_case(case, ctx, capabilities)
    finally:
        procs.cleanup_all()
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = header_lines(args, ctx, started, args.quick)
    text = report.render(f"raftmail benchmark, {when}", header, rows, FOOTER)
    print(text)
    report.write_atomically(args.out, text)
    report.write_atomically(args.out.with_suffix(".json"), report.rows_json(rows, {"lines": header}))
    if args.keep or args.workdir:
        progress(f"scratch folder kept: {workdir}")
    progress(f"table written to {args.out}")
    return 1 if any(row.error for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

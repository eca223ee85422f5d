"""Smoke test of the benchmark harness (bench/run.py): tiny `--quick` runs must produce the table.

Only that each selected case measured something is checked, never how fast: timed assertions do
not belong in the test suite. Every server involved listens on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "bench" / "run.py"
RUN_TIMEOUT = 170


def _tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidate = Path("/usr/sbin") / name
    return str(candidate) if os.access(candidate, os.X_OK) else None


def run_bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, str, dict[str, dict]]:
    """Run the harness in quick mode; returns the process, the markdown written, rows by key."""
    out = tmp_path / "latest.md"
    done = subprocess.run([sys.executable, str(RUN), "--quick", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=ROOT)
    assert out.exists(), f"no table written (exit {done.returncode}): {done.stderr[-3000:]}"
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    return done, out.read_text(), {row["key"]: row for row in rows}


def assert_measured(rows: dict[str, dict], key: str) -> dict:
    row = rows[key]
    assert row["error"] is None and row["skipped"] is None, row
    assert len(row["samples"]) == 1 and row["samples"][0] > 0, row
    return row


def table_line(markdown: str, key: str) -> str:
    lines = [line for line in markdown.splitlines() if line.startswith(f"| {key} |")]
    assert len(lines) == 1, f"no table row for {key} in:\n{markdown}"
    return lines[0]


def test_python_generator_against_plain_aiosmtpd(tmp_path: Path) -> None:
    done, markdown, rows = run_bench(tmp_path, "--generator", "python",
                                     "--cases", "intake-baseline,latency-baseline")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_measured(rows, "intake-baseline")["load"] == "python"
    p50 = assert_measured(rows, "latency-baseline-p50")["samples"][0]
    p99 = assert_measured(rows, "latency-baseline-p99")["samples"][0]
    assert p50 <= p99
    assert "load generator: Python (python-aiosmtplib" in markdown
    assert "| median | min | max |" in markdown
    # The table went to stdout as well as to the file.
    assert table_line(done.stdout, "intake-baseline") == table_line(markdown, "intake-baseline")


def test_unknown_case_is_refused(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(RUN), "--quick", "--cases", "no-such-case",
                           "--out", str(tmp_path / "t.md")], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, cwd=ROOT)
    assert done.returncode == 2
    assert "unknown case 'no-such-case'" in done.stderr
    assert not (tmp_path / "t.md").exists()


@pytest.mark.skipif(not all(_tool(t) for t in ("smtp-source", "smtp-sink", "postfix")),
                    reason="Postfix's smtp-source/smtp-sink/postfix not installed: run bench/install-peers.sh")
@pytest.mark.skipif(os.geteuid() != 0, reason="the private Postfix instance needs root")
def test_postfix_peers_with_smtp_source(tmp_path: Path) -> None:
    done, markdown, rows = run_bench(tmp_path, "--generator", "smtp-source",
                                     "--cases", "sink-direct,intake-baseline,intake-postfix,e2e-postfix")
    assert done.returncode == 0, done.stderr[-3000:]
    for key in ("sink-direct", "intake-baseline", "intake-postfix", "e2e-postfix"):
        assert assert_measured(rows, key)["load"] == "smtp-source"
    # Postfix's intake is compared with the aiosmtpd ceiling measured in the same invocation.
    assert "× intake-baseline" in table_line(markdown, "intake-postfix")
    assert "load generator: smtp-source (Postfix" in markdown


def _raftmail_start_problem() -> str | None:
    done = subprocess.run([sys.executable, "-m", "raftmail.cli", "start", "--help"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    if done.returncode == 0:
        return None
    last = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit {done.returncode}"]
    return last[0]


def test_raftmail_cluster_intake(tmp_path: Path) -> None:
    problem = _raftmail_start_problem()
    if problem:
        pytest.skip(f"`python -m raftmail.cli start --help` fails, raftmail nodes cannot start yet: {problem}")
    done, markdown, rows = run_bench(tmp_path, "--cases", "intake-raftmail")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_measured(rows, "intake-raftmail")
    # No baseline was selected, so the ratio column says so instead of inventing one.
    assert "intake-baseline not measured" in table_line(markdown, "intake-raftmail")


def test_intake_workers_prototype_answers_250_only_for_committed_submissions() -> None:
    """bench/multicore.py: SMTP intake in worker processes beside each node's core. The script
    itself fails when a 250 from a worker is not counted by the leader, or a worker dies."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "multicore.py"), "--runs", "1",
                           "--messages", "200", "--nodes", "3"],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    split = [line for line in done.stdout.splitlines() if line.startswith("| 3 | core + 1 intake worker")]
    assert len(split) == 1, done.stdout
    rate, core_ms, workers_ms = (float(cell.split()[0]) for cell in split[0].split("|")[3:6])
    # The workers took the load: SMTP sessions cost CPU in them, and the cores committed.
    assert rate > 0 and core_ms > 0 and workers_ms > 0, split[0]

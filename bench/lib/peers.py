"""The independent SMTP peers: Postfix's smtp-source (load) and smtp-sink (destination), the plain
aiosmtpd server (intake ceiling, and destination when smtp-sink is missing), and the Python load
generator. Every address is 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .procs import LOOPBACK, BenchError, free_port, spawn, wait_port, wait_until

HERE = Path(__file__).resolve().parent
SBIN = Path("/usr/sbin")
INSTALL_HINT = ("install Postfix's smtp-source/smtp-sink with `sudo bench/install-peers.sh` "
                "(Debian's postfix package, left unconfigured and not running)")
SENDER = "bench@example.test"
RECIPIENT = "rcpt@example.test"
HELO_NAME = "load.example.test"
SINK_BACKLOG = 1024
SINK_MAX_SESSIONS = 512
DEFAULT_START_TIMEOUT = 15.0
# A load that has not finished by its deadline is reported as failed rather than waited for:
# 20 messages/s and 200 recipients/s are far below anything that works.
LOAD_DEADLINE_PER_MESSAGE = 0.05
LOAD_DEADLINE_PER_RECIPIENT = 0.005
MIN_LOAD_DEADLINE = 120.0
COUNT_POLL_INTERVAL = 0.01


def find_tool(name: str) -> str | None:
    """A Postfix tool from PATH or /usr/sbin (often not on a user's PATH)."""
    found = shutil.which(name)
    if found:
        return found
    candidate = SBIN / name
    return str(candidate) if os.access(candidate, os.X_OK) else None


def postfix_version() -> str | None:
    postconf = find_tool("postconf")
    if not postconf:
        return None
    done = subprocess.run([postconf, "-d", "-h", "mail_version"], capture_output=True, text=True)
    return done.stdout.strip() or None if done.returncode == 0 else None


def running_as_root() -> bool:
    return os.geteuid() == 0


# --------------------------------------------------------------------------------------------
# Destinations
# --------------------------------------------------------------------------------------------


class SmtpSink:
    """Postfix's smtp-sink on 127.0.0.1: accepts everything, counts sessions and messages."""

    kind = "smtp-sink"

    def __init__(self, workdir: Path, port: int | None = None, extra_args: tuple[str, ...] = ()):
        binary = find_tool("smtp-sink")
        if not binary:
            raise BenchError(f"smtp-sink not found: {INSTALL_HINT}")
        self.port = port or free_port()
        self.workdir = workdir
        argv = [binary, "-c", "-m", str(SINK_MAX_SESSIONS)]
        if running_as_root():
            argv += ["-u", "nobody"]  # smtp-sink refuses to run as root
        argv += [*extra_args, f"{LOOPBACK}:{self.port}", str(SINK_BACKLOG)]
        self._counts = {"sess": 0, "quit": 0, "mesg": 0}
        self._lock = threading.Lock()
        self.child = spawn("smtp-sink", argv, capture=True)
        self._reader = threading.Thread(target=self._read_counters, daemon=True)
        self._reader.start()
        try:
            wait_port(self.port, DEFAULT_START_TIMEOUT, "smtp-sink")
        except BenchError:
            self.stop()
            raise

    def _read_counters(self) -> None:
        # -c prints "sess=N quit=N mesg=N" records, each ended by CR, as things happen.
        stream = self.child.proc.stdout
        buffer = b""
        while chunk := stream.read1(65536):
            buffer += chunk
            *records, buffer = buffer.split(b"\r")
            if records:
                self._parse(records[-1])

    def _parse(self, record: bytes) -> None:
        fields = dict(part.split(b"=", 1) for part in record.split() if b"=" in part)
        with self._lock:
            for key in self._counts:
                if key.encode() in fields:
                    self._counts[key] = int(fields[key.encode()])

    def messages(self) -> int:
        with self._lock:
            return self._counts["mesg"]

    def stop(self) -> None:
        self.child.stop(grace=3.0)


class PlainSmtpd:
    """The plain aiosmtpd server (plain_smtpd.py) in its own process."""

    kind = "aiosmtpd"

    def __init__(self, workdir: Path, python: str = sys.executable, port: int | None = None):
        self.port = port or free_port()
        self.child = spawn("plain-smtpd", [python, str(HERE / "plain_smtpd.py"), "--port",
                                           str(self.port)], capture=True, stdin=subprocess.PIPE)
        line = self._readline(DEFAULT_START_TIMEOUT)
        if not line.startswith("READY"):
            err = self.child.proc.stderr.read().decode("utf-8", "replace") if not self.child.alive() else ""
            self.stop()
            raise BenchError(f"plain aiosmtpd server did not start: {line!r} {err[-500:]}")

    def _readline(self, timeout: float) -> str:
        result: list[str] = []
        reader = threading.Thread(
            target=lambda: result.append(self.child.proc.stdout.readline().decode()), daemon=True)
        reader.start()
        reader.join(timeout)
        return result[0].strip() if result else ""

    def stats(self) -> dict[str, int]:
        try:
            self.child.proc.stdin.write(b"stats\n")
            self.child.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise BenchError(f"plain aiosmtpd server is gone: {exc}") from None
        line = self._readline(DEFAULT_START_TIMEOUT)
        if not line:
            raise BenchError("plain aiosmtpd server did not answer 'stats'")
        return json.loads(line)

    def messages(self) -> int:
        return self.stats()["messages"]

    def stop(self) -> None:
        try:
            self.child.proc.stdin.write(b"quit\n")
            self.child.proc.stdin.close()
            self.child.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.child.stop(grace=3.0)


def start_destination(workdir: Path, prefer_smtp_sink: bool = True,
                      python: str = sys.executable) -> SmtpSink | PlainSmtpd:
    """smtp-sink when installed (C, never the bottleneck), else the plain aiosmtpd server."""
    if prefer_smtp_sink and find_tool("smtp-sink"):
        return SmtpSink(workdir)
    return PlainSmtpd(workdir, python)


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """What to send; `sessions` and `messages` are split over the targets."""

    messages: int
    sessions: int = 20
    recipients: int = 1
    body_bytes: int = 2048
    reuse: bool = False
    # Carry on past 4xx/5xx replies and count them (smtp-source -A), instead of ending the run at
    # the first one; for raftmail, whose 451 on a leader change is a normal "try again".
    tolerate_refusals: bool = False

    @property
    def total_recipients(self) -> int:
        return self.messages * self.recipients


@dataclass
class LoadResult:
    generator: str
    elapsed: float
    messages_ok: int
    recipients_ok: int
    error: str | None = None
    latency_ms: dict | None = None
    start_lag_ms: dict | None = None  # paced Python runs: lateness against the schedule
    send_seconds: float | None = None  # Python runs: from the first to the last message started
    refused: int = 0                   # transactions refused (only counted with tolerate_refusals)
    first_refusal: str | None = None


def split(total: int, parts: int) -> list[int]:
    """`total` into `parts` near-equal non-negative shares."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def load_deadline(load: Load) -> float:
    return max(MIN_LOAD_DEADLINE, load.messages * LOAD_DEADLINE_PER_MESSAGE
               + load.total_recipients * LOAD_DEADLINE_PER_RECIPIENT)


def smtp_source_argv(binary: str, port: int, messages: int, sessions: int, load: Load) -> list[str]:
    argv = [binary, "-4", "-s", str(sessions), "-m", str(messages), "-r", str(load.recipients),
            "-l", str(load.body_bytes), "-N", "-f", SENDER, "-t", RECIPIENT, "-M", HELO_NAME]
    if load.reuse:
        argv.append("-d")
    if load.tolerate_refusals:
        argv.append("-A")
    return argv + [f"inet:{LOOPBACK}:{port}"]


def run_smtp_source(ports: list[int], load: Load) -> LoadResult:
    """One smtp-source per target port, started together; elapsed runs until the last one ends."""
    binary = find_tool("smtp-source")
    if not binary:
        raise BenchError(f"smtp-source not found: {INSTALL_HINT}")
    sessions = split(load.sessions, len(ports))
    messages = split(load.messages, len(ports))
    with tempfile.TemporaryDirectory(prefix="smtp-source-") as logdir:
        # stderr to files, not pipes: with -A every refusal is a warning line, far more than a
        # pipe buffer holds while we wait for the process.
        logs = [Path(logdir) / f"{i}.log" for i in range(len(ports))]
        started = time.monotonic()
        children = [spawn("smtp-source", smtp_source_argv(binary, port, m, max(1, s), load), log)
                    for port, m, s, log in zip(ports, messages, sessions, logs) if m > 0]
        deadline = started + load_deadline(load)
        ended = started
        errors: list[str] = []
        for child in children:
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                errors.append(f"smtp-source did not finish within {deadline - started:.0f} s")
                continue
            ended = max(ended, time.monotonic())
            child.stop()  # already ended: only forgets it
            if child.proc.returncode != 0:
                last = child.log_tail().strip().splitlines()[-1:]
                errors.append(last[0] if last else f"exit {child.proc.returncode}")
        refusals = [line for log in logs if log.exists()
                    for line in log.read_text(errors="replace").splitlines() if "warning:" in line]
    elapsed = ended - started
    ok = 0 if errors else load.messages - len(refusals)
    return LoadResult(f"smtp-source (Postfix {postfix_version() or '?'})", elapsed, ok,
                      ok * load.recipients, "; ".join(errors) or None, refused=len(refusals),
                      first_refusal=refusals[0].split("warning:", 1)[1].strip() if refusals else None)


def loadgen_argv(ports: list[int], load: Load, python: str, *, rate: float | None = None,
                 keep_going: bool = False, records: Path | None = None) -> list[str]:
    argv = [python, str(HERE / "loadgen.py"), "--messages", str(load.messages),
            "--sessions", str(load.sessions), "--recipients", str(load.recipients),
            "--body-bytes", str(load.body_bytes), "--deadline", str(load_deadline(load))]
    for port in ports:
        argv += ["--target", f"{LOOPBACK}:{port}"]
    if load.reuse:
        argv.append("--reuse")
    if rate:
        argv += ["--rate", str(rate)]
    if keep_going or load.tolerate_refusals:
        argv.append("--keep-going")
    if records:
        argv += ["--records", str(records)]
    return argv


def parse_loadgen_output(returncode: int, stdout: bytes, stderr: bytes) -> LoadResult:
    out = stdout.decode("utf-8", "replace").strip()
    err = stderr.decode("utf-8", "replace").strip()
    try:
        summary = json.loads(out.splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise BenchError(f"python load generator failed: {err[-500:] or out[-500:]}") from None
    error = summary["first_error"] if returncode != 0 else None
    if summary.get("timed_out"):
        error = f"load generator deadline passed; first error: {summary['first_error']}"
    return LoadResult(summary["generator"], summary["elapsed"], summary["ok"],
                      summary["recipients_ok"], error, summary["latency_ms"],
                      summary.get("start_lag_ms"), summary.get("send_seconds"),
                      refused=summary["failed"], first_refusal=summary["first_error"])


def run_python_load(ports: list[int], load: Load, python: str = sys.executable, *,
                    rate: float | None = None, keep_going: bool = False,
                    records: Path | None = None) -> LoadResult:
    """The Python generator in its own process, so it never shares the harness's GIL."""
    child = spawn("loadgen", loadgen_argv(ports, load, python, rate=rate, keep_going=keep_going,
                                          records=records), capture=True)
    stdout, stderr = child.proc.communicate()
    child.stop()  # already ended: only forgets it
    return parse_loadgen_output(child.proc.returncode, stdout, stderr)


def drive(ports: list[int], load: Load, generator: str, python: str = sys.executable) -> LoadResult:
    """Send `load` to the ports with "smtp-source" or "python"."""
    if generator == "smtp-source":
        return run_smtp_source(ports, load)
    return run_python_load(ports, load, python)


def wait_for_count(count_fn: Callable[[], int], expected: int, timeout: float, what: str) -> float:
    """Poll a counter until it reaches `expected`; returns the monotonic time it was seen there."""
    wait_until(lambda: count_fn() >= expected, timeout, f"{what} to reach {expected}",
               interval=COUNT_POLL_INTERVAL)
    return time.monotonic()

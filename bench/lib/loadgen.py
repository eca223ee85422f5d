"""Python SMTP load generator (asyncio + aiosmtplib): the stand-in for Postfix's smtp-source when
it is not installed, and the only generator that times each reply (latency and failover cases).

    python loadgen.py --target 127.0.0.1:2525 [--target ...] --messages 300 --sessions 20

Like `smtp-source -s S -m N -r R -l B -N`: S concurrent sessions, session j bound to target
j mod len(targets); by default a new connection per message, `--reuse` keeps it open. Recipients
are numbered uniquely across the run (1rcpt@example.test, 2rcpt@...). Without `--keep-going` the
first refused message ends the run, as with smtp-source. With `--rate` messages are sent open-loop
on a fixed schedule instead of as fast as the sessions allow.

Prints one JSON object: counts, elapsed seconds, the monotonic clock at the start (comparable with
other processes' time.monotonic() on Linux), and latency from the final "." to the reply.
`--records FILE` also writes one JSON line per message: [target, t_start, t_dot, t_reply, code,
error, index]. Only ever connects to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass, field
from email.utils import formatdate

import aiosmtplib

LOOPBACK = "127.0.0.1"
HELO_NAME = "load.example.test"
SENDER = "bench@example.test"
RECIPIENT_DOMAIN = "example.test"
LINE_CHARS = 78  # smtp-source -l writes lines of 78 characters plus CRLF
DEFAULT_SESSIONS = 20
DEFAULT_BODY_BYTES = 2048
DEFAULT_TIMEOUT = 60.0
DEFAULT_DEADLINE = 3600.0
GENERATOR_NAME = f"python-aiosmtplib {aiosmtplib.__version__}"


@dataclass
class Record:
    target: int
    t_start: float
    t_dot: float | None = None
    t_reply: float | None = None
    code: int | None = None
    error: str | None = None
    due: float | None = None      # paced runs: when the schedule wanted this message to start
    index: int = 0                # the message number: its recipients are recipients_for(index, n)

    def as_list(self) -> list:
        return [self.target, self.t_start, self.t_dot, self.t_reply, self.code, self.error, self.index]


@dataclass
class Plan:
    targets: list[tuple[str, int]]
    messages: int
    sessions: int = DEFAULT_SESSIONS
    recipients: int = 1
    body_bytes: int = DEFAULT_BODY_BYTES
    reuse: bool = False
    rate: float | None = None
    keep_going: bool = False
    timeout: float = DEFAULT_TIMEOUT
    deadline: float = DEFAULT_DEADLINE


@dataclass
class RunState:
    plan: Plan
    body: bytes
    next_index: int = 0
    t0: float = 0.0
    stop: bool = False
    first_error: str | None = None
    records: list[Record] = field(default_factory=list)

    def take(self) -> int | None:
        if self.stop or self.next_index >= self.plan.messages:
            return None
        index = self.next_index
        self.next_index += 1
        return index


def make_body(body_bytes: int) -> bytes:
    """About `body_bytes` of 78-character lines, like smtp-source -l."""
    line = b"X" * LINE_CHARS + b"\r\n"
    count = max(1, body_bytes // len(line))
    return line * count


def recipients_for(index: int, per_message: int) -> list[str]:
    first = index * per_message + 1
    return [f"{first + k}rcpt@{RECIPIENT_DOMAIN}" for k in range(per_message)]


def build_message(index: int, recipients: list[str], body: bytes) -> bytes:
    headers = (
        f"From: <{SENDER}>\r\n"
        f"To: <{recipients[0]}>\r\n"
        f"Date: {formatdate(localtime=False)}\r\n"
        f"Message-ID: <{os.getpid()}.{index}.{time.time_ns()}@{HELO_NAME}>\r\n"
        f"Subject: bench message {index}\r\n\r\n"
    )
    return headers.encode("ascii") + body


def _describe(exc: BaseException) -> tuple[int | None, str]:
    code = getattr(exc, "code", None)
    text = f"{type(exc).__name__}: {exc}".strip()
    return (code if isinstance(code, int) else None), text[:300]


class Session:
    """One SMTP client session; records when the final dot of each message is written."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.smtp: aiosmtplib.SMTP | None = None
        self.t_dot: float | None = None

    async def open(self) -> None:
        smtp = aiosmtplib.SMTP(hostname=self.host, port=self.port, local_hostname=HELO_NAME,
                               timeout=self.timeout, start_tls=False)
        await smtp.connect()
        await smtp.ehlo()
        write = smtp.protocol.write

        def timed_write(data: bytes) -> None:
            # aiosmtplib writes the whole message with its final ".\r\n" in one call.
            if data.endswith(b"\r\n.\r\n"):
                self.t_dot = time.monotonic()
            write(data)

        smtp.protocol.write = timed_write  # type: ignore[method-assign]
        self.smtp = smtp

    async def send(self, recipients: list[str], message: bytes) -> int:
        assert self.smtp is not None
        await self.smtp.mail(SENDER)
        for recipient in recipients:
            await self.smtp.rcpt(recipient)
        response = await self.smtp.data(message)
        return response.code

    async def close(self, polite: bool = True) -> None:
        if self.smtp is None:
            return
        smtp, self.smtp = self.smtp, None
        try:
            if polite and smtp.is_connected:
                await smtp.quit()
        except Exception:  # the server may already be gone; closing is best effort
            pass
        smtp.close()


async def _one_message(state: RunState, session_box: list[Session | None], target: int,
                       index: int, due: float | None) -> None:
    plan = state.plan
    host, port = plan.targets[target]
    record = Record(target, time.monotonic(), due=due, index=index)
    state.records.append(record)
    recipients = recipients_for(index, plan.recipients)
    try:
        if session_box[0] is None:
            session_box[0] = Session(host, port, plan.timeout)
            await session_box[0].open()
        session = session_box[0]
        session.t_dot = None
        record.code = await session.send(recipients, build_message(index, recipients, state.body))
        record.t_dot, record.t_reply = session.t_dot, time.monotonic()
        if not plan.reuse:
            await session.close()
            session_box[0] = None
    except Exception as exc:  # any failure is data for this run, never a crash of the generator
        record.t_reply = time.monotonic()
        record.code, record.error = _describe(exc)
        if session_box[0] is not None:
            record.t_dot = session_box[0].t_dot
            await session_box[0].close(polite=False)
            session_box[0] = None
        if state.first_error is None:
            state.first_error = record.error
        if not plan.keep_going:
            state.stop = True


async def _session_loop(state: RunState, target: int) -> None:
    plan = state.plan
    box: list[Session | None] = [None]
    try:
        while (index := state.take()) is not None:
            due = None
            if plan.rate:
                due = state.t0 + index / plan.rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await _one_message(state, box, target, index, due)
    finally:
        if box[0] is not None:
            await box[0].close()


def _percentile(sorted_values: list[float], fraction: float) -> float | None:
    if not sorted_values:
        return None
    rank = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[rank]


def summarise(state: RunState, elapsed: float, timed_out: bool) -> dict:
    ok = [r for r in state.records if r.error is None and r.code == 250]
    latencies = sorted((r.t_reply - r.t_dot) * 1000.0 for r in ok if r.t_dot and r.t_reply)
    # How far behind its schedule a paced run started messages: large lags mean the generator
    # (or its sessions, all busy) could not keep the rate, and the server saw less load.
    lags = sorted(max(0.0, r.t_start - r.due) * 1000.0 for r in state.records if r.due is not None)
    starts = [r.t_start for r in state.records]
    return {
        "generator": GENERATOR_NAME,
        "started_monotonic": state.t0,
        "elapsed": elapsed,
        "attempted": len(state.records),
        "ok": len(ok),
        "failed": len(state.records) - len(ok),
        "recipients_ok": len(ok) * state.plan.recipients,
        "first_error": state.first_error,
        "timed_out": timed_out,
        "send_seconds": (max(starts) - state.t0) if starts else 0.0,
        "start_lag_ms": {"p50": _percentile(lags, 0.50), "p99": _percentile(lags, 0.99),
                         "max": lags[-1] if lags else None},
        "latency_ms": {
            "count": len(latencies),
            "p50": _percentile(latencies, 0.50),
            "p99": _percentile(latencies, 0.99),
            "max": latencies[-1] if latencies else None,
        },
    }


async def run(plan: Plan) -> tuple[dict, list[Record]]:
    for host, _port in plan.targets:
        if host != LOOPBACK:
            raise ValueError(f"refusing target {host}: this generator only talks to {LOOPBACK}")
    state = RunState(plan, make_body(plan.body_bytes))
    state.t0 = time.monotonic()
    tasks = [asyncio.create_task(_session_loop(state, j % len(plan.targets)))
             for j in range(plan.sessions)]
    done, pending = await asyncio.wait(tasks, timeout=plan.deadline)
    timed_out = bool(pending)
    if pending:
        state.stop = True
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    ends = [r.t_reply for r in state.records if r.t_reply]
    elapsed = (max(ends) if ends else time.monotonic()) - state.t0
    return summarise(state, elapsed, timed_out), state.records


def parse_target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if host != LOOPBACK:
        raise argparse.ArgumentTypeError(f"target must be {LOOPBACK}:PORT, got {text!r}")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=parse_target, action="append", required=True)
    parser.add_argument("--messages", type=int, help="messages in all (default: rate x duration)")
    parser.add_argument("--sessions", type=int, default=DEFAULT_SESSIONS)
    parser.add_argument("--recipients", type=int, default=1, help="recipients per message")
    parser.add_argument("--body-bytes", type=int, default=DEFAULT_BODY_BYTES)
    parser.add_argument("--reuse", action="store_true", help="keep connections open")
    parser.add_argument("--rate", type=float, help="open loop: messages per second")
    parser.add_argument("--duration", type=float, help="with --rate: seconds of load")
    parser.add_argument("--keep-going", action="store_true", help="don't stop at the first failure")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="per SMTP command")
    parser.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE, help="whole run")
    parser.add_argument("--records", help="write one JSON line per message here")
    args = parser.parse_args(argv)
    messages = args.messages
    if messages is None:
        if not (args.rate and args.duration):
            parser.error("give --messages, or --rate with --duration")
        messages = int(args.rate * args.duration)
    plan = Plan(targets=args.target, messages=messages, sessions=args.sessions,
                recipients=args.recipients, body_bytes=args.body_bytes, reuse=args.reuse,
                rate=args.rate, keep_going=args.keep_going, timeout=args.timeout,
                deadline=args.deadline)
    summary, records = asyncio.run(run(plan))
    if args.records:
        with open(args.records, "w") as handle:
            for record in records:
                handle.write(json.dumps(record.as_list()) + "\n")
    print(json.dumps(summary), flush=True)
    complete = summary["ok"] == messages and not summary["timed_out"]
    return 0 if complete or args.keep_going else 1


if __name__ == "__main__":
    sys.exit(main())

"""Capture sink: an SMTP server that raftmail's quick start and tests deliver into.

Every accepted recipient of every message becomes one file in a maildir, and every SMTP event
becomes one JSON line in ``maildir/log.jsonl``, so tests can check exactly-once delivery,
concurrency and throughput from the outside. Reply rules let a run make chosen recipients
fail at RCPT time (permanently or for the first N attempts) the way real receivers do.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import json
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO

from aiosmtpd.smtp import SMTP, Envelope, Session

LOG_NAME = "log.jsonl"
MESSAGE_SUFFIX = ".eml"
TEMP_PREFIX = ".tmp-"
SEQ_WIDTH = 8

DEFAULT_MAX_MESSAGE_BYTES = 50 * 2**20
DEFAULT_MAX_CONNECTIONS = 1000
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_STOP_GRACE = 5.0
DEFAULT_DELAY = 0.0  # seconds the sink waits before accepting each message (a slow receiver)
# What the sink does once it has a message's final dot: "reply" (250), "hang" (store it, never
# answer: the sender's reply timeout decides) or "drop" (store it, close the connection unanswered).
AFTER_DATA_CHOICES = ("reply", "hang", "drop")
DEFAULT_HOSTNAME = "raftmail-sink"  # fixed so the greeting never needs a DNS lookup
MAX_SAFE_RECIPIENT_CHARS = 120

_RULE_CODE_MIN, _RULE_CODE_MAX = 200, 599
_DEFAULT_RULE_TEXT = {2: "2.0.0 OK", 3: "3.0.0 Continue", 4: "4.0.0 Temporary failure",
                      5: "5.0.0 Rejected"}
_TIMES_SUFFIX = re.compile(r"\*(\d+)\s*$")
_CODE_AND_TEXT = re.compile(r"^(\d{3})(?:\s+(.*))?$", re.DOTALL)
_UNSAFE_FILENAME_CHARS = re.compile(r"[^A-Za-z0-9._@+=-]")
_SEQ_FILENAME = re.compile(r"^(\d{%d,})\..*%s$" % (SEQ_WIDTH, re.escape(MESSAGE_SUFFIX)))


@dataclass(frozen=True)
class ReplyRule:
    """How the sink answers RCPT TO for one recipient (or every recipient, ``"*"``)."""

    recipient: str
    code: int
    text: str
    times: int | None  # None = always; N = only the first N times the recipient is seen

    @property
    def reply(self) -> str:
        return f"{self.code} {self.text}".rstrip()


def parse_reply_rule(spec: str) -> ReplyRule:
    """Parse ``ADDRESS=CODE TEXT`` or ``ADDRESS=CODE TEXT*N`` into a ReplyRule."""
    if "\r" in spec or "\n" in spec:
        raise ValueError(f"reply rule {spec!r}: must be a single line")
    address, sep, answer = spec.partition("=")
    if not sep:
        raise ValueError(f"reply rule {spec!r}: expected ADDRESS=CODE TEXT[*N]")
    recipient = _parse_rule_recipient(spec, address)
    answer, times = _split_times(spec, answer.strip())
    code, text = _parse_code_and_text(spec, answer)
    return ReplyRule(recipient=recipient, code=code, text=text, times=times)


def _parse_rule_recipient(spec: str, address: str) -> str:
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    if address == "*":
        return address
    if not address or any(ch.isspace() for ch in address) or "@" not in address:
        raise ValueError(f"reply rule {spec!r}: recipient must be an address like "
                         f"user@example.test or '*', got {address!r}")
    return address.lower()


def _split_times(spec: str, answer: str) -> tuple[str, int | None]:
    match = _TIMES_SUFFIX.search(answer)
    if match is None:
        return answer, None
    times = int(match.group(1))
    if times < 1:
        raise ValueError(f"reply rule {spec!r}: *N must be at least 1, got {times}")
    return answer[:match.start()].rstrip(), times


def _parse_code_and_text(spec: str, answer: str) -> tuple[int, str]:
    match = _CODE_AND_TEXT.match(answer)
    if match is None:
        raise ValueError(f"reply rule {spec!r}: expected a 3-digit SMTP code after '=', "
                         f"got {answer!r}")
    code = int(match.group(1))
    if not _RULE_CODE_MIN <= code <= _RULE_CODE_MAX:
        raise ValueError(f"reply rule {spec!r}: code must be {_RULE_CODE_MIN}.."
                         f"{_RULE_CODE_MAX}, got {code}")
    text = (match.group(2) or "").strip() or _DEFAULT_RULE_TEXT[code // 100]
    return code, text


class _ReplyBook:
    """Chooses the RCPT answer per recipient and counts down limited (``*N``) rules."""

    def __init__(self, rules: Sequence[ReplyRule]) -> None:
        # Exact-address rules win over "*"; within each group the given order decides.
        self._rules = ([r for r in rules if r.recipient != "*"]
                       + [r for r in rules if r.recipient == "*"])
        self._used: dict[tuple[int, str], int] = {}

    def answer(self, recipient: str) -> Optional[ReplyRule]:
        """Return the rule to apply now (consuming one use), or None for a normal 250."""
        recipient = recipient.lower()
        for index, rule in enumerate(self._rules):
            if rule.recipient not in ("*", recipient):
                continue
            if rule.times is None:
                return rule
            used = self._used.get((index, recipient), 0)
            if used < rule.times:
                self._used[(index, recipient)] = used + 1
                return rule
        return None


# Sequence numbers are shared by every sink in the process so two sinks on one maildir can
# never hand out the same file name.
_seq_lock = threading.Lock()
_last_seq = 0


def _highest_seq_on_disk(maildir: Path) -> int:
    highest = 0
    for entry in os.scandir(maildir):
        match = _SEQ_FILENAME.match(entry.name)
        if match:
            highest = max(highest, int(match.group(1)))
    return highest


def _reserve_seq_floor(floor: int) -> None:
    global _last_seq
    with _seq_lock:
        _last_seq = max(_last_seq, floor)


def _next_seq() -> int:
    global _last_seq
    with _seq_lock:
        _last_seq += 1
        return _last_seq


def safe_recipient(address: str) -> str:
    """File-name-safe form of a recipient address (lowercased, odd characters -> '_')."""
    safe = _UNSAFE_FILENAME_CHARS.sub("_", address.lower()).lstrip(".")
    return safe[:MAX_SAFE_RECIPIENT_CHARS] or "_"


def message_filename(seq: int, recipient: str) -> str:
    return f"{seq:0{SEQ_WIDTH}d}.{safe_recipient(recipient)}{MESSAGE_SUFFIX}"


def _envelope_preamble(mail_from: str, recipient: str) -> bytes:
    return (f"X-Sink-Envelope-From: {mail_from or '<>'}\r\n"
            f"X-Sink-Envelope-To: {recipient}\r\n").encode("utf-8", "surrogateescape")


def _message_id(raw: bytes) -> Optional[str]:
    """Message-ID header value of a raw message, or None; only the header block is parsed."""
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        end = raw.find(b"\n\n")
    header_block = raw if end < 0 else raw[:end]
    parser = email.parser.HeaderParser(policy=email.policy.compat32)
    headers = parser.parsestr(header_block.decode("utf-8", "replace"))
    value = headers.get("Message-ID")
    return None if value is None else " ".join(str(value).split())


def _format_peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = peer[0]
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return str(peer)


def read_log(maildir: Path) -> list[dict]:
    """All events of ``maildir/log.jsonl``; an unfinished last line (writer mid-way) is skipped."""
    path = Path(maildir) / LOG_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    unfinished = lines.pop()  # "" when the file ends with a newline
    events = [json.loads(line) for line in lines if line.strip()]
    if unfinished.strip():
        try:
            events.append(json.loads(unfinished))
        except json.JSONDecodeError:
            pass
    return events


class _SinkSMTP(SMTP):
    """aiosmtpd protocol that reports connection open/close to its sink and enforces the cap."""

    def __init__(self, sink: CaptureSink, **kwargs: Any) -> None:
        super().__init__(sink._handler, **kwargs)
        self._sink = sink
        self.sink_conn = 0
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._sink._unavailable():
            # A receiver that is down for a while: 421 to everything (RFC 5321 3.8).
            self._refused = True
            self._sink._on_refused(transport.get_extra_info("peername"), "unavailable")
            transport.write(b"421 4.3.2 Service not available, try again later\r\n")
            transport.close()
            return
        if self._sink._at_connection_cap():
            # Answer like a busy real server so the sender backs off and retries later.
            self._refused = True
            self._sink._on_refused(transport.get_extra_info("peername"))
            transport.write(b"421 4.3.2 Too many connections, try again later\r\n")
            transport.close()
            return
        super().connection_made(transport)
        self.sink_conn = self._sink._on_connect(self, transport.get_extra_info("peername"))

    def connection_lost(self, error: Optional[Exception]) -> None:
        if self._refused:
            return
        super().connection_lost(error)
        self._sink._on_disconnect(self)


class _SinkHandler:
    """aiosmtpd hooks: reply rules at RCPT, file-per-recipient storage at end of DATA."""

    def __init__(self, sink: CaptureSink) -> None:
        self._sink = sink

    async def handle_EHLO(self, server: _SinkSMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        # aiosmtpd reads and answers commands in order, so pipelined clients work; it only
        # does not say so. Real receivers do, and so do we, so senders pipeline to the sink.
        responses = responses[:-1] + ["250-PIPELINING"] + responses[-1:]
        if self._sink.eight_bit_mime:
            return responses
        return [r for r in responses if r[4:].upper() != "8BITMIME"]

    async def handle_RCPT(self, server: _SinkSMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        rule = self._sink._replies.answer(address)
        code, reply = (250, "250 OK") if rule is None else (rule.code, rule.reply)
        if code < 400:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        else:
            self._sink.stats["rcpt_rejected"] += 1
        self._sink._log({"event": "rcpt", "conn": server.sink_conn, "t": time.time(),
                         "rcpt": address, "code": code})
        return reply

    async def handle_DATA(self, server: _SinkSMTP, session: Session,
                          envelope: Envelope) -> str:
        if self._sink.delay > 0:
            await asyncio.sleep(self._sink.delay)
        raw = envelope.original_content or b""
        try:
            stored = self._sink._store_message(envelope.mail_from or "", envelope.rcpt_tos, raw)
        except OSError as exc:
            return f"451 4.3.0 Sink could not store message: {exc.strerror or exc}"
        message_id = _message_id(raw)
        for recipient, name in stored:
            self._sink._log({"event": "message", "conn": server.sink_conn, "t": time.time(),
                             "mail_from": envelope.mail_from or "", "rcpt": recipient,
                             "message_id": message_id, "file": name, "size": len(raw),
                             "eight_bit": not raw.isascii(), "peer": _format_peer(session.peer),
                             "helo": session.host_name})
        self._sink.stats["messages"] += 1
        self._sink.stats["recipients"] += len(stored)
        behaviour = self._sink._after_data_now()
        if behaviour != "reply":
            # The copy is stored (and logged) as received; only the reply goes missing.
            self._sink._log({"event": "no_reply", "conn": server.sink_conn, "t": time.time(),
                             "how": behaviour, "rcpts": list(envelope.rcpt_tos)})
            if behaviour == "drop" and server.transport is not None:
                server.transport.abort()
            await asyncio.sleep(self._sink.idle_timeout)  # cancelled when the connection goes
            return "421 4.4.2 Timeout"
        return "250 OK"


class CaptureSink:
    """SMTP server storing each accepted (message, recipient) as one file in ``maildir``."""

    def __init__(self, maildir: Path, rules: Sequence[ReplyRule] = (), *,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 stop_grace: float = DEFAULT_STOP_GRACE,
                 hostname: str = DEFAULT_HOSTNAME,
                 delay: float = DEFAULT_DELAY,
                 after_data: str = "reply",
                 after_data_times: int = 0,
                 unavailable_for: float = 0.0,
                 eight_bit_mime: bool = True) -> None:
        if after_data not in AFTER_DATA_CHOICES:
            raise ValueError(f"after_data must be one of {', '.join(AFTER_DATA_CHOICES)}, got {after_data!r}")
        self.maildir = Path(maildir)
        self.after_data = after_data
        self.after_data_left = after_data_times  # 0: every message
        self.unavailable_for = unavailable_for
        self.eight_bit_mime = eight_bit_mime  # False: a receiver without 8BITMIME (RFC 6152)
        self._started_at = time.monotonic()
        self.rules = tuple(rules)
        self.max_message_bytes = max_message_bytes
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.stop_grace = stop_grace
        self.hostname = hostname
        self.delay = delay
        self.stats: dict = {"connections_open": 0, "connections_max": 0, "connections_total": 0,
                            "connections_refused": 0, "messages": 0, "recipients": 0,
                            "rcpt_rejected": 0}
        self._replies = _ReplyBook(self.rules)
        self._handler = _SinkHandler(self)
        self._server: Optional[asyncio.AbstractServer] = None
        self._log_file: Optional[TextIO] = None
        self._open: set[_SinkSMTP] = set()
        self._all_closed = asyncio.Event()
        self._conn_counter = 0

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0 = any free port) and return the bound port."""
        if self._server is not None:
            raise RuntimeError("sink already started")
        self.maildir.mkdir(parents=True, exist_ok=True)
        self._started_at = time.monotonic()
        self._remove_stale_temp_files()
        _reserve_seq_floor(_highest_seq_on_disk(self.maildir))
        self._log_file = open(self.maildir / LOG_NAME, "a", encoding="utf-8")
        self._all_closed = asyncio.Event()
        self._all_closed.set()
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(lambda: self._new_protocol(loop), host, port)
        except BaseException:
            self._close_log()
            raise
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening, drop open connections (aborting unfinished DATA) and close the log."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for protocol in list(self._open):
            if protocol.transport is not None:
                protocol.transport.close()
        await server.wait_closed()
        try:
            # connection_lost runs on a later loop turn; wait so disconnects reach the log.
            await asyncio.wait_for(self._all_closed.wait(), self.stop_grace)
        except asyncio.TimeoutError:
            pass
        self._close_log()

    # -- internals used by the protocol and handler -------------------------------------

    def _new_protocol(self, loop: asyncio.AbstractEventLoop) -> _SinkSMTP:
        return _SinkSMTP(self, data_size_limit=self.max_message_bytes, enable_SMTPUTF8=True,
                         decode_data=False, hostname=self.hostname, timeout=self.idle_timeout,
                         loop=loop)

    def _unavailable(self) -> bool:
        return time.monotonic() - self._started_at < self.unavailable_for

    def _after_data_now(self) -> str:
        """The after-data behaviour for this message (consuming one of a limited count)."""
        if self.after_data == "reply":
            return "reply"
        if self.after_data_left == 0:
            return self.after_data
        if self.after_data_left < 0:
            return "reply"
        self.after_data_left -= 1
        if self.after_data_left == 0:
            self.after_data_left = -1  # used up: reply normally from now on
        return self.after_data

    def _at_connection_cap(self) -> bool:
        return self.stats["connections_open"] >= self.max_connections

    def _on_connect(self, protocol: _SinkSMTP, peer: Any) -> int:
        self._conn_counter += 1
        self._open.add(protocol)
        self._all_closed.clear()
        stats = self.stats
        stats["connections_open"] += 1
        stats["connections_total"] += 1
        stats["connections_max"] = max(stats["connections_max"], stats["connections_open"])
        self._log({"event": "connect", "conn": self._conn_counter, "t": time.time(),
                   "peer": _format_peer(peer), "open": stats["connections_open"]})
        return self._conn_counter

    def _on_refused(self, peer: Any, why: str = "max_connections") -> None:
        self.stats["connections_refused"] += 1
        self._log({"event": "refused", "t": time.time(), "peer": _format_peer(peer),
                   "open": self.stats["connections_open"], "why": why})

    def _on_disconnect(self, protocol: _SinkSMTP) -> None:
        if protocol not in self._open:
            return
        self._open.discard(protocol)
        self.stats["connections_open"] -= 1
        self._log({"event": "disconnect", "conn": protocol.sink_conn, "t": time.time()})
        if not self._open:
            self._all_closed.set()

    def _store_message(self, mail_from: str, recipients: Sequence[str],
                       raw: bytes) -> list[tuple[str, str]]:
        """Write one file per recipient; all become visible only after every write succeeded."""
        staged: list[tuple[str, str, Path]] = []
        try:
            for recipient in recipients:
                name = message_filename(_next_seq(), recipient)
                temp = self.maildir / f"{TEMP_PREFIX}{name}"
                with open(temp, "wb") as out:
                    out.write(_envelope_preamble(mail_from, recipient))
                    out.write(raw)
                staged.append((recipient, name, temp))
        except OSError:
            for _, _, temp in staged:
                temp.unlink(missing_ok=True)
            raise
        for _, name, temp in staged:
            os.replace(temp, self.maildir / name)
        return [(recipient, name) for recipient, name, _ in staged]

    def _log(self, event: dict) -> None:
        if self._log_file is None or self._log_file.closed:
            return
        self._log_file.write(json.dumps(event) + "\n")
        self._log_file.flush()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _remove_stale_temp_files(self) -> None:
        # Left behind only if a previous sink died mid-write; they were never acknowledged.
        for entry in os.scandir(self.maildir):
            if entry.name.startswith(TEMP_PREFIX) and entry.name.endswith(MESSAGE_SUFFIX):
                Path(entry.path).unlink(missing_ok=True)


async def run_sink(host: str, port: int, maildir: Path, rules: Sequence[ReplyRule], *,
                   max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                   max_connections: int = DEFAULT_MAX_CONNECTIONS,
                   delay: float = DEFAULT_DELAY, after_data: str = "reply", after_data_times: int = 0,
                   unavailable_for: float = 0.0, eight_bit_mime: bool = True) -> None:
    """Run a capture sink until cancelled, SIGTERM or SIGINT."""
    sink = CaptureSink(maildir, rules, max_message_bytes=max_message_bytes,
                       max_connections=max_connections, delay=delay, after_data=after_data,
                       after_data_times=after_data_times, unavailable_for=unavailable_for,
                       eight_bit_mime=eight_bit_mime)
    bound = await sink.start(host, port)
    stop_requested = asyncio.Event()
    installed = _install_stop_signals(stop_requested)
    try:
        print(f"sink listening on {host}:{bound}, maildir {maildir}", flush=True)
        await stop_requested.wait()
    finally:
        loop = asyncio.get_running_loop()
        for signum in installed:
            loop.remove_signal_handler(signum)
        await sink.stop()


def _install_stop_signals(stop_requested: asyncio.Event) -> list[int]:
    loop = asyncio.get_running_loop()
    installed = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, stop_requested.set)
        except (NotImplementedError, RuntimeError, ValueError):
            continue  # not the main thread, or a platform without loop signal handlers
        installed.append(signum)
    return installed

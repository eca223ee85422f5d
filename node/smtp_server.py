"""The SMTP protocol of intake: aiosmtpd's server with our connection limits, line checks and
timeouts, and the handler hooks, each of which only asks `Intake` (intake.py) for the decision.

This is the one module that touches aiosmtpd's private names (listed in AIOSMTPD_INTERNALS and
checked at start-up), which is why it is not split further: an aiosmtpd upgrade is checked here
and nowhere else."""
from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import logging
import re
from typing import Any, Iterable, Protocol

import aiosmtpd
from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session, TLSSetupException, syntax

from raftmail.node.auth import address_of, client_key, peer_address
from raftmail.node.config import ConfigError
from raftmail.node.feedback import R_FEEDBACK_MIXED, R_NULL_SENDER_ONLY_FEEDBACK, FeedbackDesk
from raftmail.node.intake import (MAX_COMMAND_LINE_BYTES, R_COMMAND_LINE_END, R_COMMAND_NUL, R_COMMAND_TOO_LONG,
                                  R_DATA_TIMEOUT, R_IDLE, R_INTERNAL, R_TEXT_LINE_TOO_LONG, R_TLS_ACTIVE,
                                  R_TOO_MANY_CONN, R_TOO_MANY_FROM_CLIENT, R_TOO_MANY_STRANGERS,
                                  R_UNAUTHENTICATED_TIMEOUT, Intake)
from raftmail.node.tls import TLSConfigError, server_context

log = logging.getLogger("raftmail.intake")


class IntakeObserver(Protocol):
    """Who watches intake's answers (the node's metrics)."""

    def refused(self, command: str, reply: str) -> None: ...

    def data_answered(self, reply: str, n_recipients: int, seconds: float) -> None: ...


class _Unobserved:
    def refused(self, command: str, reply: str) -> None:
        pass

    def data_answered(self, reply: str, n_recipients: int, seconds: float) -> None:
        pass


# ------------------------------------------------------------------ aiosmtpd internals
# IntakeSMTP overrides and reads names of aiosmtpd's SMTP that are not its documented interface.
# This module is the only one that touches them, and this list names every one. A renamed or
# removed name would fail silently (an override never called, a deadline or line check no longer
# running), so the node checks the list at start-up and refuses to run when one is missing.
# pyproject.toml pins the version they were read from.
AIOSMTPD_VERSION = "1.4.6"


class AiosmtpdMismatch(Exception):
    """The installed aiosmtpd lacks a name IntakeSMTP relies on."""


# (name, kind, parameters). Kinds: "method", "coroutine" (async method), "init-attribute" (set by
# SMTP.__init__), or a type for a class attribute. Parameters (after self) where the override
# is called with them, None otherwise.
AIOSMTPD_INTERNALS: tuple[tuple[str, Any, tuple[str, ...] | None], ...] = (
    ("_cb_client_connected", "method", ("reader", "writer")),  # wraps the reader: line checks
    ("_reset_timeout", "method", ("duration",)),  # every activity: the deadline timer
    ("_timeout_cb", "method", ()),  # the 421 replies on a timeout
    ("_timeout_handle", "init-attribute", None),  # the pending timer, cancelled by aiosmtpd
    ("_timeout_duration", "init-attribute", None),  # idle_timeout
    ("_getaddr", "method", ("arg",)),  # the fast path for MAIL and RCPT paths
    ("command_size_limits", dict, None),  # made per connection (aiosmtpd's is shared by all)
    ("command_size_limit", int, None),
    ("local_part_limit", int, None),
    ("check_auth_needed", "coroutine", ("caller_method",)),  # who may submit (Intake decides)
    ("smtp_DATA", "coroutine", ("arg",)),  # the DATA deadline
    ("smtp_EHLO", "coroutine", ("hostname",)),  # one write for the reply; the MAIL line limit
    ("smtp_STARTTLS", "coroutine", ("arg",)),  # no second TLS layer
    ("smtp_AUTH", "coroutine", ("arg",)),  # an authenticated session leaves the strangers' share
)
# SMTP.__init__ keeps, from dir(), only the names with these prefixes in its per-connection hook
# tables (see _HookListing).
AIOSMTPD_HOOK_PREFIXES = ("auth_", "smtp_", "handle_")


def _code_strings(code: Any) -> set[str]:
    """Names and string constants of a code object and the code nested in it (comprehensions)."""
    found = set(code.co_names) | {c for c in code.co_consts if isinstance(c, str)}
    for const in code.co_consts:
        if inspect.iscode(const):
            found |= _code_strings(const)
    return found


def aiosmtpd_mismatches(smtp_class: type = SMTP) -> list[str]:
    """What of AIOSMTPD_INTERNALS the given aiosmtpd SMTP class lacks, one phrase each."""
    init_names = _code_strings(smtp_class.__init__.__code__)
    missing = []
    for name, kind, params in AIOSMTPD_INTERNALS:
        what = f"SMTP.{name}"
        if kind == "init-attribute":
            if name not in init_names:
                missing.append(f"{what} (an attribute SMTP.__init__ sets)")
            continue
        value = inspect.getattr_static(smtp_class, name, None)
        if isinstance(kind, type):
            if not isinstance(value, kind):
                missing.append(f"{what} (a class attribute of type {kind.__name__})")
            continue
        if not inspect.isfunction(value) or (kind == "coroutine") != inspect.iscoroutinefunction(value):
            missing.append(f"{what} ({'an async method' if kind == 'coroutine' else 'a method'})")
            continue
        if params is not None and tuple(inspect.signature(value).parameters)[1:] != params:
            missing.append(f"{what}(self, {', '.join(params)}) (a method with these parameters)")
    for prefix in AIOSMTPD_HOOK_PREFIXES:
        if prefix not in init_names:
            missing.append(f"SMTP.__init__ taking hooks named {prefix}*")
    return missing


def check_aiosmtpd() -> None:
    """At start-up: raise AiosmtpdMismatch naming the first internal the installed aiosmtpd lacks."""
    missing = aiosmtpd_mismatches()
    if missing:
        installed = getattr(aiosmtpd, "__version__", "unknown")
        raise AiosmtpdMismatch(f"intake needs aiosmtpd {AIOSMTPD_VERSION} (installed: {installed}); "
                               f"missing: {'; '.join(missing)}")


class BadCommandLine(Exception):
    """A command line refused before aiosmtpd parses it; its reply goes out via handle_exception."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


def command_line_refusal(line: bytes) -> str | None:
    """RFC 5321 2.3.8: a command line ends with CRLF, and CR or LF appear nowhere else."""
    if b"\0" in line:
        return R_COMMAND_NUL
    if not line.endswith(b"\r\n") or b"\r" in line[:-2] or b"\n" in line[:-2]:
        return R_COMMAND_LINE_END
    return None


# The paths nearly every client sends: <dot-atom@dot-atom> (RFC 5322 atext, ASCII) or <>, then
# anything. Everything else goes to aiosmtpd's full parser.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"
_SIMPLE_PATH = re.compile(rf"<(?:({_DOT_ATOM}@{_DOT_ATOM}))?>(.*)", re.DOTALL)


# aiosmtpd's own refusals carry no RFC 3463 code: one is added by reply code, the text is kept.
_HAS_ENHANCED = re.compile(r"^\d\d\d[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")
_ENHANCED_BY_CODE = {421: "4.3.0", 450: "4.2.0", 451: "4.3.0", 452: "4.3.1", 454: "4.7.0",
                     500: "5.5.2", 501: "5.5.4", 502: "5.5.1", 503: "5.5.1", 504: "5.5.4",
                     530: "5.7.0", 550: "5.0.0", 552: "5.3.4", 553: "5.1.3", 554: "5.0.0", 555: "5.5.4"}


def with_enhanced_code(status: str) -> str:
    """A 4xx/5xx reply with an enhanced status code; other replies (EHLO lines, 334, 354) as is."""
    if len(status) < 5 or status[0] not in "45" or not status[:3].isdigit() or _HAS_ENHANCED.match(status):
        return status
    enhanced = _ENHANCED_BY_CODE.get(int(status[:3]), f"{status[0]}.0.0")
    if status.startswith("50") and ("not recognized" in status or "not implemented" in status):
        enhanced = "5.5.1"  # RFC 3463: invalid command, rather than a syntax error
    return f"{status[:4]}{enhanced} {status[4:].removeprefix('Error: ')}"


@functools.cache
def _hook_names(cls: type) -> list[str]:
    """The names of cls that aiosmtpd's tables keep. dir(cls) is the class part of dir() of an
    instance. Cached per class: classes are not changed at run time."""
    return [name for name in dir(cls) if name.startswith(AIOSMTPD_HOOK_PREFIXES)]


class _HookListing:
    """While `_listing_hooks_only` is set (only while aiosmtpd's SMTP.__init__ runs, see
    IntakeSMTP.__init__), dir() lists only the names aiosmtpd keeps in its hook tables. aiosmtpd
    builds them per connection from dir() and inspect.getmembers(), a getattr of every attribute;
    both sort by name, so the tables come out the same, much cheaper."""

    _listing_hooks_only = False

    def __dir__(self) -> Iterable[str]:
        if not self._listing_hooks_only:
            return super().__dir__()
        own = [name for name in vars(self) if name.startswith(AIOSMTPD_HOOK_PREFIXES)]
        return set(_hook_names(type(self))).union(own) if own else _hook_names(type(self))


class IntakeHandler(_HookListing):
    """aiosmtpd hooks: small, each delegating to Intake."""

    def __init__(self, intake: Intake, observer: IntakeObserver | None = None,
                 feedback: FeedbackDesk | None = None) -> None:
        self.intake = intake
        self.observer = observer or _Unobserved()
        # Mail to the feedback domains is taken from anyone (null sender included) and goes to
        # the desk, not the queue; every other recipient still needs Intake's permission.
        self.feedback = feedback if feedback is not None and feedback.domains else None

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname  # aiosmtpd leaves this to an EHLO hook
        if self.intake.auth_refusal(session):
            responses = [r for r in responses if not r[4:].upper().startswith("AUTH")]
        return responses

    async def handle_AUTH(self, server: SMTP, session: Session, envelope: Envelope, args: list[str]) -> Any:
        return self.intake.auth_refusal(session) or MISSING

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> Any:
        assert self.intake.auth is not None  # handle_AUTH refused AUTH without users
        return await self.intake.auth.plain(server, args)

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> Any:
        assert self.intake.auth is not None
        return await self.intake.auth.login(server, args)

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        null_ok = address == "<>" and self.feedback is not None  # reports come from the null sender
        refusal = (self.intake.storage_refusal() or self.intake.address_refusal(address, envelope.smtp_utf8)
                   or (None if null_ok else self.intake.check_sender(address)))
        if refusal:
            self.observer.refused("MAIL", refusal)
            return refusal
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        feedback = self.feedback is not None and self.feedback.is_feedback_address(address)
        if feedback:
            refusal = ((R_FEEDBACK_MIXED if envelope.rcpt_tos and not _for_feedback(envelope) else None)
                       or self.intake.check_recipient(address, len(envelope.rcpt_tos))
                       or self.feedback.recipient_refusal(address))
        else:
            refusal = ((R_FEEDBACK_MIXED if _for_feedback(envelope) else None)
                       or (R_NULL_SENDER_ONLY_FEEDBACK if envelope.mail_from == "<>" else None)
                       # check_auth_needed left the permission to here when feedback is taken
                       or (self.intake.submission_refusal(session) if self.feedback is not None else None)
                       or self.intake.address_refusal(address, envelope.smtp_utf8)
                       or self.intake.check_recipient(address, len(envelope.rcpt_tos)))
        if refusal:
            self.observer.refused("RCPT", refusal)
            return refusal
        envelope.rcpt_tos.append(address)
        if feedback:
            envelope.feedback = True  # type: ignore[attr-defined]
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        server.committing = True  # type: ignore[attr-defined]
        started = asyncio.get_running_loop().time()
        try:
            if self.feedback is not None and _for_feedback(envelope):
                reply = await self.feedback.accept(envelope.mail_from, envelope.rcpt_tos, envelope.original_content,
                                                   peer_address(session))
            else:
                reply = await self.intake.accept(envelope.mail_from, envelope.rcpt_tos, envelope.original_content)
        finally:
            server.committing = False  # type: ignore[attr-defined]
        self.observer.data_answered(reply, len(envelope.rcpt_tos), asyncio.get_running_loop().time() - started)
        return reply

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, BadCommandLine):
            return error.reply
        if isinstance(error, TLSSetupException):
            log.info("STARTTLS handshake failed: %r", error.__cause__)
            return "454 4.7.0 TLS handshake failed"
        log.exception("SMTP session error")
        return R_INTERNAL


def _for_feedback(envelope: Envelope) -> bool:
    return getattr(envelope, "feedback", False)


# aiosmtpd reads the signature of handle_EHLO for every connection; inspect uses a __signature__.
IntakeHandler.handle_EHLO.__signature__ = inspect.signature(IntakeHandler.handle_EHLO)  # type: ignore[attr-defined]


class IntakeSMTP(_HookListing, SMTP):
    """aiosmtpd's server with connection limits (in all, per client outside allow_networks, and a
    share for all such clients until they authenticate),
    the submission policy of Intake, strict line ends, timeouts that answer 421 (idle, a session
    outside allow_networks that does not authenticate, message text that takes too long), and
    enhanced status codes on its own refusals."""

    command_size_limit = MAX_COMMAND_LINE_BYTES - 2  # aiosmtpd measures the line without CRLF
    _idle_deadline = 0.0  # see _reset_timeout
    _timer_due = float("inf")  # when the pending timer fires; inf: none pending
    _auth_deadline = float("inf")  # a client outside allow_networks must AUTH before this
    _data_deadline = float("inf")  # the DATA under way must reach its final dot before this
    _client: str | None = None  # the per-client count this connection holds (outsiders only)
    _stranger = False  # holds one of the strangers' slots (outside allow_networks, not authenticated)
    _fired_for = 0.0  # the deadline the last timer that fired was set for
    _held: list[str] | None = None  # see smtp_EHLO

    _REWRITE = {
        "552 Error: Too much mail data": "552 5.3.4 Message exceeds the size limit of {limit} bytes",
        "552 Error: message size exceeds fixed maximum message size":
            "552 5.3.4 Message exceeds the size limit of {limit} bytes",
        "500 Command line too long": R_COMMAND_TOO_LONG,
        "500 Line too long (see RFC5321 4.5.3.1.6)": R_TEXT_LINE_TOO_LONG,
    }

    def __init__(self, handler: Any, *, intake: Intake, connections: dict, max_connections: int,
                 clients: dict[str, int] | None = None, max_connections_per_client: int = 0,
                 max_stranger_connections: int = 0, unauthenticated_timeout: float = 0.0,
                 data_timeout: float = 0.0, **kw: Any) -> None:
        """clients: open connections per client_key, shared by the server's connections (only
        clients outside allow_networks are counted); connections["strangers"]: open connections
        outside allow_networks not authenticated; 0 turns a limit or timeout off."""
        # Per connection: aiosmtpd's class-level table is shared by every connection.
        self.command_size_limits = collections.defaultdict(lambda: self.command_size_limit)
        listed = [self, handler] if isinstance(handler, _HookListing) else [self]
        for obj in listed:  # the handler too: __init__ does not await, no other server sees it
            obj._listing_hooks_only = True
        try:
            super().__init__(handler, **kw)
        finally:
            for obj in listed:
                del obj._listing_hooks_only
        self.intake = intake
        self._connections = connections
        self._max_connections = max_connections
        self._clients = clients if clients is not None else {}
        self._max_per_client = max_connections_per_client
        self._max_strangers = max_stranger_connections
        self._unauthenticated_timeout = unauthenticated_timeout
        self._data_timeout = data_timeout
        self._counted = False
        self.committing = False
        self.auth_failures = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._counted:  # after STARTTLS: the same connection, now over TLS
            super().connection_made(transport)
            return
        refusal = None
        address = address_of(transport.get_extra_info("peername"))
        outsider = self.intake is not None and not self.intake.in_allowed_network(address)
        key = client_key(address) if outsider and self._max_per_client else None
        if self._connections["open"] >= self._max_connections:
            refusal = R_TOO_MANY_CONN
        elif key is not None and self._clients.get(key, 0) >= self._max_per_client:
            refusal = R_TOO_MANY_FROM_CLIENT
            self._connections["refused_per_client"] = self._connections.get("refused_per_client", 0) + 1
        elif outsider and self._max_strangers and self._connections.get("strangers", 0) >= self._max_strangers:
            # The rest of max_connections is kept for allow_networks and authenticated users.
            refusal = R_TOO_MANY_STRANGERS
            self._connections["refused_strangers"] = self._connections.get("refused_strangers", 0) + 1
        if refusal:
            self._connections["refused"] += 1
            transport.write(f"{refusal}\r\n".encode())  # type: ignore[attr-defined]
            transport.close()
            return
        if key is not None:
            self._clients[key] = self._clients.get(key, 0) + 1
            self._client = key
        if outsider:
            self._stranger = True
            self._connections["strangers"] = self._connections.get("strangers", 0) + 1
        if outsider and self._unauthenticated_timeout:
            self._auth_deadline = self.loop.time() + self._unauthenticated_timeout
        self._connections["open"] += 1
        self._counted = True
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._counted:
            self._connections["open"] -= 1
            self._counted = False
            if self._client is not None:
                left = self._clients.get(self._client, 1) - 1
                if left > 0:
                    self._clients[self._client] = left
                else:
                    self._clients.pop(self._client, None)  # the table holds open clients only
                self._client = None
            self._leave_strangers()
            super().connection_lost(error)

    def _leave_strangers(self) -> None:
        if self._stranger:
            self._stranger = False
            self._connections["strangers"] -= 1

    def _cb_client_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super()._cb_client_connected(reader, writer)
        self._watch_lines(reader)

    def _watch_lines(self, reader: asyncio.StreamReader) -> None:
        """Check each command line before aiosmtpd parses it, and count message text as activity."""
        read = reader.readuntil
        overrun = False  # the next line read is the tail of an over-long one (aiosmtpd refuses it)

        async def readuntil(separator: bytes = b"\n") -> bytes:
            nonlocal overrun
            try:
                line = await read(separator)
            except asyncio.LimitOverrunError:
                overrun = separator == b"\n"
                raise
            if separator != b"\n":  # DATA reads up to CRLF: message text
                self._reset_timeout()  # a client sending message text is not idle
            elif overrun:
                overrun = False
            else:  # a command line or an AUTH response
                refusal = command_line_refusal(line)
                if refusal:
                    raise BadCommandLine(refusal)
            return line
        reader.readuntil = readuntil  # type: ignore[method-assign]

    def _due(self) -> float:
        """When the session times out: idle_timeout after its last activity, or earlier at the
        AUTH or DATA deadline. While committing, the commit's own deadline rules."""
        due = self._idle_deadline
        if self.committing:
            return due
        if self._auth_deadline < due and not (self.session is not None and self.session.authenticated):
            due = self._auth_deadline
        return min(due, self._data_deadline)

    def _reset_timeout(self, duration: float | None = None) -> None:
        # Per command and per message line: moving the deadline is cheaper than a new timer each
        # time. A timer that comes due before the deadline sets itself again for the deadline.
        self._idle_deadline = self.loop.time() + (duration or self._timeout_duration)
        self._arm_timer()

    def _arm_timer(self) -> None:
        due = self._due()
        if self._timer_due > due:
            if self._timeout_handle is not None:
                self._timeout_handle.cancel()
            self._set_timer(due)

    def _set_timer(self, due: float) -> None:
        self._timer_due = due
        self._timeout_handle = self.loop.call_at(due, self._timer_fired)

    def _timer_fired(self) -> None:
        fired_for, self._timer_due = self._timer_due, float("inf")
        due = self._due()
        if due > fired_for:  # active, or authenticated, since the timer was set
            self._set_timer(due)
            return
        self._fired_for = fired_for  # the loop may run a timer a hair early: which deadline it was
        self._timeout_cb()

    def _timeout_cb(self) -> None:
        if self.committing:  # the client waits for our reply; the commit has its own deadline
            self._reset_timeout()
            return
        address, now = peer_address(self.session), max(self.loop.time(), self._fired_for)
        if now >= self._data_deadline:
            reply = R_DATA_TIMEOUT.format(host=self.hostname, seconds=self._data_timeout)
            self._connections["data_timeouts"] = self._connections.get("data_timeouts", 0) + 1
            log.info("closing connection from %s: message text not complete within %gs (data_timeout)",
                     address, self._data_timeout)
        elif now >= self._auth_deadline and not (self.session is not None and self.session.authenticated):
            reply = R_UNAUTHENTICATED_TIMEOUT.format(host=self.hostname, seconds=self._unauthenticated_timeout)
            self._connections["unauthenticated_timeouts"] = self._connections.get("unauthenticated_timeouts", 0) + 1
            log.info("closing connection from %s: not authenticated within %gs (unauthenticated_timeout)",
                     address, self._unauthenticated_timeout)
        else:
            reply = R_IDLE.format(host=self.hostname)
            log.info("closing idle connection from %s", address)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(f"{reply}\r\n".encode())  # type: ignore[attr-defined]
        super()._timeout_cb()

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        # One deadline for the whole message text: a client that drips a line at a time is not
        # idle, but must not hold the connection (and its slot) for ever.
        if self._data_timeout:
            self._data_deadline = self.loop.time() + self._data_timeout
            self._arm_timer()
        try:
            await super().smtp_DATA(arg)
        finally:
            self._data_deadline = float("inf")

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        # aiosmtpd widens the MAIL line limit on every EHLO; start from the base each time.
        self.command_size_limits.clear()
        self._held = []  # the reply's lines go out in one write (one send), not one each
        try:
            await super().smtp_EHLO(hostname)
        finally:
            held, self._held = self._held, None
        if held:
            await super().push("\r\n".join(held))

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        await super().smtp_AUTH(arg)
        if self.session is not None and self.session.authenticated:
            self._leave_strangers()  # a user now: the strangers' share is for those who are not

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        # RFC 3207: no second TLS layer; aiosmtpd would try to nest one and lose the connection.
        if self.session is not None and self.session.ssl is not None:
            await self.push(R_TLS_ACTIVE)
            return
        await super().smtp_STARTTLS(arg)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's answer for MAIL and RCPT paths, without its email-header parser (and the
        class it defines per call) for the simple forms; the same answer for every input."""
        m = _SIMPLE_PATH.fullmatch(arg) if arg and not self.local_part_limit else None
        if m is None:
            return super()._getaddr(arg)
        address, rest = m.groups()
        if address is None:
            return "<>", rest  # aiosmtpd keeps the null path as "<>" and its rest untouched
        if "=?" in address:  # the parser would decode an RFC 2047 encoded word
            return super()._getaddr(arg)
        if rest[:1] in (" ", "\t"):  # the parser drops whitespace (any, str.lstrip) after the '>'
            rest = rest.lstrip()
        if rest[:1] == "(":  # ... and comments
            return super()._getaddr(arg)
        return address, rest

    async def check_auth_needed(self, caller_method: str) -> bool:
        """aiosmtpd asks this before MAIL, RCPT, DATA, VRFY and HELP; Intake decides."""
        if caller_method == "HELP":
            return False
        feedback = getattr(self.event_handler, "feedback", None)
        if feedback is not None and (caller_method in ("MAIL", "RCPT")
                                     or caller_method == "DATA" and _for_feedback(self.envelope)):
            return False  # anyone may mail the feedback domains: RCPT asks Intake for the others
        refusal = self.intake.submission_refusal(self.session)
        if refusal:
            await self.push(refusal)
            return True
        return False

    async def push(self, status: Any) -> None:
        if isinstance(status, str):
            template = self._REWRITE.get(status)
            status = template.format(limit=self.data_size_limit) if template else with_enhanced_code(status)
            if self._held is not None:
                self._held.append(status)
                return
        await super().push(status)


async def start_smtp_server(intake: Intake, host: str, port: int, *, hostname: str,
                            observer: IntakeObserver | None = None,
                            feedback: FeedbackDesk | None = None,
                            reuse_port: bool = False) -> asyncio.AbstractServer:
    """The SMTP listener of `intake`. With `reuse_port`, several processes may listen on the same
    port and the kernel spreads connections over them (bench/multicore.py's intake workers)."""
    limits = intake.limits
    tls_context = None
    if limits.tls_cert is not None and limits.tls_key is not None:
        try:
            tls_context = server_context(limits.tls_cert, limits.tls_key)
        except TLSConfigError as e:
            raise ConfigError(intake.config.path, "[intake] tls_key",
                              f"{limits.tls_cert} and {limits.tls_key} cannot serve STARTTLS: {e}") from None
    connections = intake.connections
    clients: dict[str, int] = {}  # open connections per client outside allow_networks
    handler = IntakeHandler(intake, observer, feedback)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: IntakeSMTP(handler, intake=intake, connections=connections,
                           max_connections=limits.max_connections, clients=clients,
                           max_connections_per_client=limits.max_connections_per_client,
                           max_stranger_connections=limits.max_stranger_connections,
                           unauthenticated_timeout=limits.unauthenticated_timeout,
                           data_timeout=limits.data_timeout,
                           data_size_limit=limits.max_message_bytes, enable_SMTPUTF8=True,
                           decode_data=False, hostname=hostname, timeout=limits.idle_timeout,
                           tls_context=tls_context, require_starttls=False,
                           # Intake decides when AUTH is allowed (auth_refusal), per session.
                           auth_require_tls=False),
        host, port, reuse_address=True, reuse_port=reuse_port, backlog=512)
    return server

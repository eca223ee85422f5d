"""Sending one batch (one destination domain) over one reused SMTP connection.

`deliver_batch` sends each recipient its own transaction, over the routes node/routes.py picked,
and reports one `Outcome` per recipient it attempted. The session is node/smtp_client.py's:
MAIL, RCPT and DATA go in one write when the receiver offers PIPELINING. SMTP and network trouble never
raises out of here: it becomes a code-0 outcome, which the classifier treats as a deferral.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from raftmail.consensus.outcomes import parse_enhanced
from raftmail.node.message import seven_bit_copy
from raftmail.node.routes import Route
from raftmail.node.smtp_client import (
    SmtpReply,
    SmtpReplyError,
    SmtpSession,
    SmtpSessionError,
    check_helo_name,
    data_payload,
    envelope_command,
)
from raftmail.node.tls import client_context

log = logging.getLogger(__name__)

NO_ROUTE_TEXT = "no route to domain"
TLS_NOT_OFFERED_TEXT = "4.7.10 TLS required but not offered"
# RFC 3463 X.7.5, cryptographic failure: the receiver's certificate did not verify, so neither
# the relay password nor the message was sent.
TLS_UNTRUSTED_TEXT = "4.7.5 TLS certificate not trusted"
# RFC 3463 X.6.3: conversion required but not possible (a raw 8-bit header, no 8BITMIME).
NO_8BITMIME_TEXT = "4.6.3 receiver does not take 8-bit content and this message cannot be converted"
# Prefix of the text of a message whose final reply was lost after its content was sent: the
# recipient may have received it, so a retry can duplicate it (reported, not hidden).
AMBIGUOUS_PREFIX = "ambiguous: "
LEASE_POLL_SECONDS = 0.1  # how often a command waiting for its reply re-reads the lease


@dataclass(frozen=True)
class Outcome:
    """The final reply for one recipient; code 0 means no SMTP reply (connect error, timeout)."""

    index: int
    code: int
    enhanced: str | None
    text: str
    remote: str
    # The final dot was sent and no reply came (timeout, connection lost): the receiver may have
    # the message, so a retry may duplicate it (counted by the cluster, bounded by config).
    maybe_delivered: bool = False


# ---------------------------------------------------------------------------------------------
# Sending one batch


async def deliver_batch(
    routes: Sequence[Route],
    mail_from: str,
    messages: AsyncIterator[tuple] | Iterable[tuple],
    *,
    helo_name: str,
    connect_timeout: float,
    command_timeout: float,
    may_send: Callable[[], bool],
    on_outcome: Callable[[Outcome], None],
    require_tls: bool = False,
    max_reconnects: int = 1,
    tls_verify: bool = True,
    tls_ca_file: Path | None = None,
    lease_left: Callable[[], float] | None = None,
    seven_bit: Callable[[bytes], bytes] = seven_bit_copy,
    source_address: str | None = None,
) -> None:
    """Send each (index, recipient, message) as its own transaction over one SMTP connection; a
    fourth item, when given, is that message's envelope sender instead of `mail_from` (VERP).

    `may_send` is asked before every message; once it says no, the batch stops and the remaining
    recipients get no outcome (their lease decides). Every attempted recipient gets exactly one
    `on_outcome` call. After a lost connection the in-flight recipient gets a code-0 outcome and
    the connection is reopened, at most `max_reconnects` times per batch. SMTP and network errors
    never raise; an invalid `helo_name` raises ValueError before anything is sent.

    With `tls_verify`, a route that gets relay credentials, and every route when `require_tls`,
    must show a certificate that chains to `tls_ca_file` (system CAs when None) and names the
    route's host; otherwise nothing is sent there (no plaintext fallback) and the recipients are
    deferred with TLS_UNTRUSTED_TEXT.

    `lease_left` (seconds the batch's lease still allows) bounds every command of a transaction,
    the wait for the reply to the final dot included: a command is abandoned (and the connection
    dropped) when the lease runs out before its reply, and the final dot is never sent once the
    lease has run out. Renewals extend the lease while a command waits.

    A message with 8-bit bytes goes to a receiver that does not offer 8BITMIME as `seven_bit`
    makes it (re-encoded and signed again); one it cannot convert is deferred, never sent raw.
    """
    sender = _BatchSender(
        routes,
        mail_from,
        helo_name=helo_name,
        connect_timeout=connect_timeout,
        command_timeout=command_timeout,
        require_tls=require_tls,
        max_reconnects=max_reconnects,
        tls_verify=tls_verify,
        tls_ca_file=tls_ca_file,
        lease_left=lease_left,
        seven_bit=seven_bit,
        source_address=source_address,
    )
    try:
        async for index, recipient, message, *envelope in _each(messages):
            if not may_send():
                break
            outcome = await sender.deliver(index, recipient, message, envelope[0] if envelope else None)
            if outcome is None:
                break  # the lease ran out before the final dot: nothing of it was sent
            on_outcome(outcome)
    except BaseException:
        sender.abort()  # cancelled or a caller bug: no polite QUIT, just let go of the socket
        raise
    await sender.quit()


async def _each(messages: AsyncIterator[tuple] | Iterable[tuple]) -> AsyncIterator[tuple]:
    if hasattr(messages, "__aiter__"):
        async for item in messages:
            yield item
    else:
        for item in messages:
            yield item


class _LeaseEnded(Exception):
    """The batch's lease ran out while a command waited for its reply."""


class _RouteFailed(Exception):
    """Opening a session on one route failed; the message says why."""


class _TlsNotOffered(_RouteFailed):
    pass


class _TlsUntrusted(_RouteFailed):
    pass


class _BatchSender:
    """The one SMTP session of a batch, opened lazily and reopened after a loss."""

    def __init__(
        self,
        routes: Sequence[Route],
        mail_from: str,
        *,
        helo_name: str,
        connect_timeout: float,
        command_timeout: float,
        require_tls: bool,
        max_reconnects: int,
        tls_verify: bool = True,
        tls_ca_file: Path | None = None,
        lease_left: Callable[[], float] | None = None,
        seven_bit: Callable[[bytes], bytes] = seven_bit_copy,
        source_address: str | None = None,
    ) -> None:
        # A bad HELO name is a configuration error: raise it now, before anything is sent.
        check_helo_name(helo_name)
        self._routes = list(routes)
        self._mail_from = mail_from
        self._helo_name = helo_name
        self._source_address = source_address  # a pool's address to bind (None: the system's choice)
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._require_tls = require_tls
        self._tls_verify = tls_verify
        self._tls_ca_file = tls_ca_file
        self._reconnects_left = max_reconnects
        self._lease_left = lease_left
        self._seven_bit = seven_bit
        self._session: SmtpSession | None = None
        self._remote = ""
        self._opened_before = False
        # Once set, the batch cannot be sent: (text, enhanced, remote) for every further recipient.
        self._failure: tuple[str, str | None, str] | None = (
            None if self._routes else (NO_ROUTE_TEXT, None, "")
        )

    # -- per message ---------------------------------------------------------------------------

    async def deliver(self, index: int, recipient: str, message: bytes, mail_from: str | None = None) -> Outcome | None:
        """The recipient's outcome, or None when the lease ran out before anything of this
        message could be sent (no outcome: the lease decides)."""
        if self._failure is None and not self._connected():
            await self._reopen()
        if self._failure is not None:
            text, enhanced, remote = self._failure
            return Outcome(index, 0, enhanced, text, remote)
        return await self._transaction(index, recipient, message, mail_from or self._mail_from)

    async def _reply(self, stage: str) -> SmtpReply:
        """The next reply, waited for at most `command_timeout` and never past the lease (re-read
        as it waits: renewals move it). Raises _LeaseEnded or asyncio.TimeoutError."""
        session = self._session
        assert session is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._command_timeout
        while (reply := session.reply_nowait()) is None:
            left = deadline - loop.time()
            lease = self._lease_left() if self._lease_left is not None else left
            if lease <= 0:
                raise _LeaseEnded(f"lease ended waiting for the reply to {stage}")
            if left <= 0:
                raise asyncio.TimeoutError(f"no reply to {stage} within {self._command_timeout:g}s")
            await session.wait(min(left, lease, LEASE_POLL_SECONDS))
        return reply

    async def _transaction(self, index: int, recipient: str, message: bytes, mail_from: str) -> Outcome | None:
        session = self._session
        assert session is not None
        stage = "MAIL FROM"
        if not message.isascii() and not session.supports("8bitmime"):
            try:
                message = self._seven_bit(message)
            except ValueError as exc:
                return Outcome(index, 0, None, f"{NO_8BITMIME_TEXT}: {exc}", self._remote)
        try:
            mail_options, encoding = self._envelope_options(mail_from, recipient, message)
            mail = envelope_command(b"MAIL FROM:", mail_from, mail_options, encoding)
            stage = "RCPT TO"
            rcpt = envelope_command(b"RCPT TO:", recipient, [], encoding)
        except ValueError as exc:
            # The address cannot go on a command line (non-ASCII without SMTPUTF8); nothing
            # was sent for it, so the session stays usable.
            return Outcome(index, 0, None, f"{stage} not sent: {exc}", self._remote)
        if self._lease_left is not None and self._lease_left() <= 0:
            return None
        commands = [("MAIL FROM", mail), ("RCPT TO", rcpt), ("DATA command", b"DATA\r\n")]
        refused: SmtpReply | None = None
        try:
            if session.pipelining:  # RFC 2920: the three commands in one write, replies in order
                session.write(b"".join(line for _, line in commands))
            for stage, line in commands:
                if not session.pipelining:
                    if refused is not None:
                        break
                    session.write(line)
                reply = await self._reply(stage)
                if refused is None and not (reply.code == 354 if stage == "DATA command" else reply.ok):
                    if reply.code < 400:  # neither accepted nor refused: not a receiver to trust
                        raise SmtpSessionError(f"unexpected reply to {stage}: {reply.code} {reply.text[:100]}")
                    refused = reply
            if refused is not None:
                if stage == "DATA command" and reply.code == 354:
                    # DATA accepted although MAIL or RCPT was refused: end it with no content.
                    session.write(b".\r\n")
                    await self._reply("an empty DATA")
                await self._reset()
                return self._outcome(index, refused.code, refused.text)
            stage = "DATA"
            if self._lease_left is not None and self._lease_left() <= 0:
                # Cut off from the cluster (no renewal): no copy may leave after the lease.
                self.abort()
                return None
            session.write(data_payload(message))
            reply = await self._reply("the final dot")
            if reply.code != 250:
                await self._reset()
            return self._outcome(index, reply.code, reply.text)
        except (_LeaseEnded, OSError, asyncio.TimeoutError) as exc:
            self.abort()
            if refused is not None:
                # The receiver answered before the session broke (a 421 and a close, say):
                # its answer is the outcome, and nothing of the message was sent.
                return self._outcome(index, refused.code, refused.text)
            maybe = stage == "DATA"  # the content was sent: the receiver may have the message
            if isinstance(exc, _LeaseEnded):
                # Before the content, no outcome: the lease decides and nothing was sent.
                return Outcome(index, 0, None, f"{AMBIGUOUS_PREFIX}{exc}", self._remote, maybe_delivered=True) \
                    if maybe else None
            prefix = AMBIGUOUS_PREFIX if maybe else ""
            text = f"{prefix}connection lost during {stage}: {_describe(exc)}"
            return Outcome(index, 0, None, text, self._remote, maybe_delivered=maybe)

    def _envelope_options(self, mail_from: str, recipient: str, message: bytes) -> tuple[list[str], str]:
        assert self._session is not None
        options: list[str] = []
        encoding = "ascii"
        if not (mail_from.isascii() and recipient.isascii()) and self._session.supports("smtputf8"):
            options.append("SMTPUTF8")
            encoding = "utf-8"
        if not message.isascii() and self._session.supports("8bitmime"):
            options.append("BODY=8BITMIME")
        return options, encoding

    def _outcome(self, index: int, code: int, text: str) -> Outcome:
        return Outcome(index, code, parse_enhanced(text), text, self._remote)

    async def _reset(self) -> None:
        # RSET ends the refused transaction so the next recipient starts clean.
        if not self._connected():
            return
        assert self._session is not None
        try:
            self._session.write(b"RSET\r\n")
            await self._reply("RSET")
        except (_LeaseEnded, OSError, asyncio.TimeoutError):
            self.abort()

    # -- session -------------------------------------------------------------------------------

    def _connected(self) -> bool:
        return self._session is not None and self._session.connected

    async def _reopen(self) -> None:
        if self._opened_before:
            if self._reconnects_left <= 0:
                self._failure = ("connection failed: connection lost, no reconnect left", None, self._remote)
                return
            self._reconnects_left -= 1
        self._opened_before = True
        self._failure = await self._open_any()

    async def _open_any(self) -> tuple[str, str | None, str] | None:
        """Open a session on the first route that works; the failure triple when none does."""
        reasons: list[str] = []
        tls_missing = untrusted = 0
        for route in self._routes:
            try:
                self._session = await self._open(route, try_tls=True)
                self._remote = route.remote
                return None
            except _TlsNotOffered:
                tls_missing += 1
                reasons.append(f"{route.remote}: {TLS_NOT_OFFERED_TEXT}")
            except _TlsUntrusted as exc:
                untrusted += 1
                reasons.append(f"{route.remote}: {exc}")
            except _RouteFailed as exc:
                reasons.append(f"{route.remote}: {exc}")
        last_remote = self._routes[-1].remote
        if tls_missing == len(self._routes):
            return (TLS_NOT_OFFERED_TEXT, parse_enhanced(TLS_NOT_OFFERED_TEXT), last_remote)
        if untrusted == len(self._routes):
            text = "; ".join(reasons) if len(reasons) > 1 else reasons[0].split(": ", 1)[1]
            return (text, parse_enhanced(TLS_UNTRUSTED_TEXT), last_remote)
        return ("connection failed: " + "; ".join(reasons), None, last_remote)

    async def _open(self, route: Route, *, try_tls: bool) -> SmtpSession:
        # A password, or a domain that must never see clear text, needs a receiver we can trust;
        # otherwise TLS is opportunistic: encrypt even with an unverifiable certificate.
        verify = self._tls_verify and (route.username is not None or self._require_tls)
        # No plaintext retry once STARTTLS broke when a password or TLS is at stake.
        may_fall_back = route.username is None and not self._require_tls
        stage = "connect"
        session: SmtpSession | None = None
        try:
            session = await SmtpSession.connect(
                route.address or route.host, route.port, source_address=self._source_address,
                connect_timeout=self._connect_timeout, timeout=self._command_timeout)
            stage = "EHLO"
            await session.greet(self._helo_name)
            if session.supports("starttls") and try_tls:
                stage = "STARTTLS"
                context = client_context(verify=verify, ca_file=self._tls_ca_file if verify else None)
                await session.starttls(context, server_hostname=route.host)
                stage = "EHLO after STARTTLS"
                await session.greet(self._helo_name)
            elif self._require_tls:
                raise _TlsNotOffered(TLS_NOT_OFFERED_TEXT)
            if route.username is not None:
                stage = "AUTH"
                if not session.tls and not session.peer_is_loopback():
                    # Relay passwords never travel in clear text over a network (Postfix's noplaintext).
                    raise _RouteFailed("AUTH refused: connection is not encrypted")
                await session.login(route.username, route.password or "")
            return session
        except _RouteFailed:
            if session is not None:
                session.close()
            raise
        except (SmtpReplyError, OSError, asyncio.TimeoutError, ValueError) as exc:
            if session is not None:
                session.close()
            if isinstance(exc, ssl.SSLCertVerificationError):
                log.warning("STARTTLS with %s: certificate not trusted (%s); nothing sent there",
                            route.remote, exc.verify_message)
                raise _TlsUntrusted(f"{TLS_UNTRUSTED_TEXT} ({exc.verify_message}); no password or mail "
                                    "sent (set [delivery] tls_ca_file to trust its CA)") from exc
            if stage.startswith(("STARTTLS", "EHLO after")) and may_fall_back:
                # Opportunistic TLS that breaks must not stop delivery: retry in plain text.
                log.info("STARTTLS with %s failed (%s); retrying without TLS", route.remote, exc)
                return await self._open(route, try_tls=False)
            raise _RouteFailed(f"{stage} failed: {_describe(exc)}") from exc

    async def quit(self) -> None:
        if self._connected():
            assert self._session is not None
            await self._session.quit()
        self.abort()

    def abort(self) -> None:
        if self._session is not None:
            self._session.close()


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__

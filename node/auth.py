"""SMTP AUTH for intake: salted scrypt password hashes, constant-time checks, a slow-down for
addresses that keep failing, and the PLAIN and LOGIN mechanisms.

The mechanisms use aiosmtpd's AUTH command, challenge exchange and AuthResult, but verify the
password in a worker thread: aiosmtpd's built-in mechanisms call a synchronous authenticator, and
one scrypt check (tens of milliseconds, by design) would stall every connection of the node.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
import secrets
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping

from aiosmtpd.smtp import MISSING, AuthResult

from raftmail.consensus.backoff import next_retry_delay

log = logging.getLogger("raftmail.auth")

SCHEME = "scrypt"
# scrypt cost: 16 MiB and about 50 ms per check on a current CPU, so a stolen cluster file does
# not give the passwords away cheaply.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
KEY_BYTES = 32
# Refuse hashes that would make one check absurdly expensive (a typo in the cluster file).
MAX_SCRYPT_N = 2**20
MAX_SCRYPT_MEMORY = 1 << 30

MAX_LOGIN_BYTES = 255
MAX_PASSWORD_BYTES = 1024

# Failed AUTH: the first failure from an address costs `base` seconds, each further recent one
# doubles it, up to the cap; failures older than the window are forgotten.
AUTH_FAIL_DELAY_CAP = 30.0
AUTH_FAIL_WINDOW = 900.0
AUTH_FAIL_TRACKED_ADDRESSES = 10000
# Failures remembered per client: enough to reach the cap (and to log "N recent"), no more.
AUTH_FAIL_TIMES_PER_CLIENT = 64
# scrypt checks run in their own threads (never the event loop's, nor the pool that writes
# message bodies); at most this many at once, and at most AUTH_CHECKS_WAITING waiting for one.
AUTH_CHECKS_IN_PARALLEL = 2
AUTH_CHECKS_WAITING = 32
# IPv6 clients are counted per /64: one host usually holds a whole /64.
IPV6_CLIENT_PREFIX = 64
MAX_AUTH_FAILURES_PER_CONNECTION = 3

# The prompts every LOGIN client expects (draft-murchison-sasl-login); clients ignore their text.
LOGIN_USERNAME_CHALLENGE = "Username:"
LOGIN_PASSWORD_CHALLENGE = "Password:"

R_AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
R_AUTH_TOO_MANY = "421 4.7.0 Too many failed authentication attempts; closing connection"
R_AUTH_BAD_BASE64 = "501 5.5.2 Cannot decode the base64 response"
R_AUTH_BAD_PLAIN = "501 5.5.2 AUTH PLAIN needs authzid NUL login NUL password"
R_AUTH_LINE_TOO_LONG = "500 5.5.6 Authentication exchange line is too long"
R_AUTH_BUSY = "454 4.7.0 Temporary authentication failure: too many AUTH attempts in progress, try again later"


# --------------------------------------------------------------------------------------------
# Password hashes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PasswordHash:
    n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    def __str__(self) -> str:
        salt = base64.b64encode(self.salt).decode()
        key = base64.b64encode(self.key).decode()
        return f"{SCHEME}${self.n}${self.r}${self.p}${salt}${key}"


def _derive(password: bytes, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    # OpenSSL wants a memory ceiling above 128*r*n; give it that plus room.
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=length,
                          maxmem=128 * r * n * (p + 1) + (1 << 20))


def hash_password(password: str | bytes, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """A new salted hash string for the cluster file: "scrypt$N$r$p$salt$key" (base64)."""
    raw = password.encode("utf-8") if isinstance(password, str) else password
    if not raw:
        raise ValueError("the password is empty")
    if len(raw) > MAX_PASSWORD_BYTES:
        raise ValueError(f"the password is longer than {MAX_PASSWORD_BYTES} bytes")
    salt = secrets.token_bytes(SALT_BYTES)
    return str(PasswordHash(n, r, p, salt, _derive(raw, salt, n, r, p, KEY_BYTES)))


def parse_hash(text: str) -> PasswordHash:
    """Parse a hash string made by hash_password; ValueError (never echoing it) if it is not one."""
    parts = text.split("$") if isinstance(text, str) else []
    if len(parts) != 6 or parts[0] != SCHEME:
        raise ValueError(f'is not a password hash made by `raftmail passwd` (expected "{SCHEME}$...")')
    try:
        n, r, p = (int(x) for x in parts[1:4])
        salt = base64.b64decode(parts[4], validate=True)
        key = base64.b64decode(parts[5], validate=True)
    except (ValueError, binascii.Error):
        raise ValueError("is a damaged password hash (bad number or base64); make a new one with "
                         "`raftmail passwd`") from None
    if n < 2 or n & (n - 1) or n > MAX_SCRYPT_N or r < 1 or p < 1 or 128 * r * n * p > MAX_SCRYPT_MEMORY:
        raise ValueError("has scrypt parameters out of range; make a new one with `raftmail passwd`")
    if len(salt) < 8 or len(key) < 16:
        raise ValueError("has a salt or key that is too short; make a new one with `raftmail passwd`")
    return PasswordHash(n, r, p, salt, key)


def verify_password(password: str | bytes, stored: PasswordHash | str) -> bool:
    """Constant-time comparison of a candidate password with a stored hash."""
    h = parse_hash(stored) if isinstance(stored, str) else stored
    raw = password.encode("utf-8") if isinstance(password, str) else password
    if len(raw) > MAX_PASSWORD_BYTES:
        return False
    return hmac.compare_digest(_derive(raw, h.salt, h.n, h.r, h.p, len(h.key)), h.key)


class UserDirectory:
    """The [intake.users] table: login -> hash. Unknown logins cost the same scrypt check as
    known ones, so the reply time does not tell which logins exist."""

    def __init__(self, users: Mapping[str, str]) -> None:
        self._users = {name: parse_hash(value) for name, value in users.items()}
        self._decoy = PasswordHash(SCRYPT_N, SCRYPT_R, SCRYPT_P, b"\0" * SALT_BYTES, b"\0" * KEY_BYTES)

    def __len__(self) -> int:
        return len(self._users)

    def known(self, login: bytes) -> str | None:
        """The user name if `login` is one of [intake.users], else None."""
        name = login.decode("utf-8", "replace")
        return name if name in self._users else None

    def check(self, login: bytes, password: bytes) -> str | None:
        """The user name if login and password match, else None. Blocking: run it in a thread."""
        try:
            name = login.decode("utf-8")
        except UnicodeDecodeError:
            name = ""
        stored = self._users.get(name)
        ok = verify_password(password, stored or self._decoy)
        return name if ok and stored is not None else None


# --------------------------------------------------------------------------------------------
# Slow-down for failures
# --------------------------------------------------------------------------------------------


class FailureThrottle:
    """Recent AUTH failures per client (client_key: an IPv4 address or an IPv6 /64), on this
    node. Memory is bounded: at most `max_addresses` clients, the least recently failing
    forgotten first, and at most AUTH_FAIL_TIMES_PER_CLIENT failure times each."""

    def __init__(self, base_delay: float, *, cap: float = AUTH_FAIL_DELAY_CAP, window: float = AUTH_FAIL_WINDOW,
                 max_addresses: int = AUTH_FAIL_TRACKED_ADDRESSES) -> None:
        self.base_delay = base_delay
        self.cap = cap
        self.window = window
        self.max_addresses = max_addresses
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def recent(self, address: str, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        key = client_key(address)
        times = self._failures.get(key)
        if not times:
            return 0
        while times and now - times[0] > self.window:
            times.popleft()
        if not times:
            del self._failures[key]
        return len(times)

    def __len__(self) -> int:
        return len(self._failures)

    def delay(self, address: str, now: float | None = None) -> float:
        """Seconds an AUTH attempt from `address` waits before it is checked (and a failure
        before it is answered): 0 without recent failures, then base, 2*base, 4*base ... cap."""
        count = self.recent(address, now)
        if count == 0:
            return 0.0
        return next_retry_delay(count, first=self.base_delay, max_interval=self.cap)

    def record_failure(self, address: str, now: float | None = None) -> int:
        """Note one failure; returns the number of recent failures from the address."""
        now = time.monotonic() if now is None else now
        key = client_key(address)
        times = self._failures.pop(key, None) or deque(maxlen=AUTH_FAIL_TIMES_PER_CLIENT)
        times.append(now)
        self._failures[key] = times
        while len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)
        return self.recent(address, now)


# --------------------------------------------------------------------------------------------
# Mechanisms
# --------------------------------------------------------------------------------------------


class SMTPAuth:
    """PLAIN and LOGIN over aiosmtpd's AUTH command. Each attempt waits out the address's
    slow-down, is checked off the event loop, and failures are logged with their count."""

    def __init__(self, users: UserDirectory, throttle: FailureThrottle, *,
                 checks_in_parallel: int = AUTH_CHECKS_IN_PARALLEL,
                 max_failures_per_connection: int = MAX_AUTH_FAILURES_PER_CONNECTION,
                 counters: dict[str, int] | None = None) -> None:
        self.users = users
        self.throttle = throttle
        self.max_failures_per_connection = max_failures_per_connection
        self._checks = asyncio.Semaphore(checks_in_parallel)
        self._executor = ThreadPoolExecutor(max_workers=checks_in_parallel, thread_name_prefix="auth-check")
        self._pending = 0  # checks running or waiting for a thread
        self._checks_in_parallel = checks_in_parallel
        self.max_waiting = AUTH_CHECKS_WAITING
        self._tag_key = secrets.token_bytes(16)
        self.counters = counters if counters is not None else {"auth_ok": 0, "auth_failed": 0}
        self.counters.setdefault("auth_ok", 0)
        self.counters.setdefault("auth_failed", 0)

    def describe_login(self, login: bytes) -> str:
        """How a failed login is logged. A configured user by name; anything else only as a
        tag, since users sometimes type their password into the login field. The tag is keyed
        per process, so repeats can be told apart in one log without a guessable hash."""
        user = self.users.known(login)
        if user is not None:
            return f"user {user}"
        tag = hmac.new(self._tag_key, login, hashlib.sha256).hexdigest()[:8]
        return f"an unknown login (tag {tag})"

    async def plain(self, server: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await _challenge(server, "")
            if blob is None:
                return AuthResult(success=False, handled=True)
        else:
            blob = _b64(args[1])
            if blob is None:
                await server.push(R_AUTH_BAD_BASE64)
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\0")
        if len(parts) != 3:
            await server.push(R_AUTH_BAD_PLAIN)
            return AuthResult(success=False, handled=True)
        return await self.verify(server, parts[1], parts[2])

    async def login(self, server: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await _challenge(server, LOGIN_USERNAME_CHALLENGE)
        else:
            login = _b64(args[1])
            if login is None:
                await server.push(R_AUTH_BAD_BASE64)
                return AuthResult(success=False, handled=True)
        if login is None:
            return AuthResult(success=False, handled=True)
        password = await _challenge(server, LOGIN_PASSWORD_CHALLENGE)
        if password is None:
            return AuthResult(success=False, handled=True)
        return await self.verify(server, login, password)

    async def verify(self, server: Any, login: bytes, password: bytes) -> AuthResult:
        address = peer_address(server.session)
        wait = self.throttle.delay(address)
        if wait:
            await asyncio.sleep(wait)
        user = None
        if len(login) <= MAX_LOGIN_BYTES and len(password) <= MAX_PASSWORD_BYTES:
            if self._pending >= self._checks_in_parallel + self.max_waiting:
                # Not a failure of this client: no slow-down, the client tries again later.
                self.counters["auth_busy"] = self.counters.get("auth_busy", 0) + 1
                await server.push(R_AUTH_BUSY)
                return AuthResult(success=False, handled=True)
            self._pending += 1
            try:
                async with self._checks:
                    loop = asyncio.get_running_loop()
                    user = await loop.run_in_executor(self._executor, self.users.check, login, password)
            finally:
                self._pending -= 1
        if user is not None:
            self.counters["auth_ok"] += 1
            log.info("AUTH as %s from %s", user, address)
            return AuthResult(success=True, auth_data=user)
        self.counters["auth_failed"] += 1
        recent = self.throttle.record_failure(address)
        log.warning("AUTH failed for %s from %s (%d recent failures from %s; next attempt waits %.1fs)",
                    self.describe_login(login), address, recent, client_key(address), self.throttle.delay(address))
        await asyncio.sleep(self.throttle.delay(address))
        failures = getattr(server, "auth_failures", 0) + 1
        server.auth_failures = failures
        if failures >= self.max_failures_per_connection:
            await server.push(R_AUTH_TOO_MANY)
            if server.transport is not None:
                server.transport.close()
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False, message=R_AUTH_INVALID)


def client_key(address: str) -> str:
    """Who a client is for limits and slow-downs: an IPv4 address as is, an IPv6 address as its
    /64 (one host usually holds a whole /64 and can pick any address in it)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_CLIENT_PREFIX), strict=False))
    return str(ip)


def peer_address(session: Any) -> str:
    """The client's IP address as text ("" when unknown); IPv4-mapped IPv6 becomes IPv4."""
    return address_of(getattr(session, "peer", None))


def address_of(peer: Any) -> str:
    """peer_address for a socket's peername tuple."""
    host = peer[0] if isinstance(peer, tuple) and peer and isinstance(peer[0], str) else ""
    if host.startswith("::ffff:") and "." in host:
        return host[len("::ffff:"):]
    return host


def _b64(text: str) -> bytes | None:
    if text == "=":  # RFC 4954: an empty initial response
        return b""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, binascii.Error):
        return None


async def _challenge(server: Any, challenge: str) -> bytes | None:
    """One 334 exchange through aiosmtpd; None when the client aborted or sent garbage (the
    reply is already sent then)."""
    try:
        answer = await server.challenge_auth(challenge)
    except ValueError:  # the reader's line limit: RFC 4954's reply for an over-long line
        await server.push(R_AUTH_LINE_TOO_LONG)
        return None
    return None if answer is MISSING else answer

"""Cluster configuration: load and validate the cluster TOML file into frozen dataclasses.

Every refusal is a ConfigError whose text is a single line, "<file>: <key>: <what is wrong>", so an
operator can fix the file without reading code. Nothing is defaulted silently that could lose mail
or split the cluster: unknown keys, wrong types and inconsistent limits are all refused at load.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import math
import os
import re
import string
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, NoReturn
from urllib.parse import urlsplit

__all__ = [
    "Address",
    "ClusterSection",
    "Config",
    "ConfigError",
    "DeliverySection",
    "DkimSection",
    "DomainLimits",
    "IntakeSection",
    "MonitoringSection",
    "NodeConfig",
    "RaftSection",
    "StorageSection",
    "load_config",
]

# Bytes, not characters: the secret feeds a key derivation, so its entropy is measured in bytes.
# `raftmail secret` prints 32 random bytes (43 characters).
MIN_SECRET_BYTES = 32
MIN_ADMIN_TOKEN_CHARS = 16
MIN_TOKEN_KEY_BYTES = 32
# cluster.example.toml's secret: public, so only accepted while every address is loopback.
EXAMPLE_SECRET = "change-me-example-secret-0123456789"
NODE_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
CLUSTER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_SELECTOR_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?"
_SELECTOR_RE = re.compile(rf"{_SELECTOR_LABEL}(?:\.{_SELECTOR_LABEL})*")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_TOML_POSITION_RE = re.compile(r"\s*\(at (line \d+, column \d+|end of document)\)\s*$")
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_MAX_SHOWN_CHARS = 60

# TOML reads `a.test = ...` as a nested table, a common slip when naming domains.
_QUOTE_ROUTE_HINT = 'quote domain names that contain dots, like "example.test" = "host:port"'
_QUOTE_DOMAIN_HINT = 'quote domain names that contain dots: [delivery.domains."gmail.com"]'

SECRET_WHY = (
    "it authenticates and encrypts Raft traffic, and pysyncobj unpickles whatever it decrypts, "
    "so anyone who knows it can run code on every node"
)
TOKEN_KEY_WHY = (
    "it signs the unsubscribe links of [delivery] unsubscribe_url; it is its own random key, "
    "never derived from the cluster secret (`raftmail secret` prints one)"
)
CANONICAL_WHY = (
    "pysyncobj treats differently spelled addresses as different members, "
    "so node addresses must be spelled one canonical way"
)


class ConfigError(Exception):
    """A refused configuration. str(e) is one line: "<path>: <key>: <what is wrong>"."""

    def __init__(self, path: str | Path, key: str | None = None, problem: str | None = None) -> None:
        # All three go to Exception so the error survives pickling between processes.
        super().__init__(str(path), key, problem)
        self.path = str(path)
        self.key = key
        self.problem = problem

    def __str__(self) -> str:
        parts = [self.path] + [part for part in (self.key, self.problem) if part]
        return re.sub(r"\s*[\r\n]+\s*", " ", ": ".join(parts))


# --------------------------------------------------------------------------------------------
# Dataclasses
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        # Brackets keep IPv6 round-trippable through parse(); pysyncobj itself wants host:port
        # unbracketed, so consensus code should build its own string from host and port.
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse "host:port" or "[ipv6]:port"; IP literals and host names come back canonical."""
        if not isinstance(text, str):
            raise ValueError('must be a "host:port" string')
        if text.startswith("["):
            end = text.find("]")
            if end < 0 or text[end + 1 : end + 2] != ":":
                raise ValueError('must be "[ipv6]:port"')
            host, port_text = _canonical_ipv6(text[1:end]), text[end + 2 :]
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep or not host:
                raise ValueError('must be "host:port"')
            if ":" in host:
                raise ValueError('IPv6 addresses need brackets, like "[::1]:25"')
            host = _canonical_host(host)
        return cls(host, _parse_port(port_text))


@dataclass(frozen=True)
class NodeConfig:
    id: str
    raft: Address
    smtp: Address
    admin: Address


@dataclass(frozen=True)
class ClusterSection:
    name: str
    secret: str = field(repr=False)
    data_dir: Path
    fsync: bool = False
    # Bearer token for every admin route but /healthz, /readyz and /metrics; required when a
    # node's admin address is not loopback.
    admin_token: str | None = field(default=None, repr=False)
    # Optional token that may only read (GET) the admin routes: status, campaigns, events.
    read_token: str | None = field(default=None, repr=False)
    # Key of the per-recipient unsubscribe tokens (the unsubscribe service verifies with it).
    token_key: str | None = field(default=None, repr=False)
    # Peer requests (body fetches, body streams) a node serves at once.
    max_peer_requests: int = 64
    # Sealed body batches a node keeps sending to slow peers in the background, in bytes.
    max_background_push_bytes: int = 64 * 2**20


@dataclass(frozen=True)
class RaftSection:
    election_timeout_min: float = 0.3
    election_timeout_max: float = 0.7
    heartbeat_interval: float = 0.08
    connection_timeout: float = 3.5
    max_commands_in_flight: int = 200
    # Group commit of every command a node proposes: entries in flight, and bytes per entry
    # (under pysyncobj's 64 KiB append_entries batch, so a group never takes its chunked path).
    max_entries_in_flight: int = 2
    max_entry_bytes: int = 60000
    compaction_min_entries: int = 5000
    compaction_min_seconds: float = 300.0
    snapshot_chunk_bytes: int = 262144
    # The Raft port: the largest frame a peer may send (snapshots travel in snapshot_chunk_bytes
    # chunks, log entries in 64 KiB batches), and connections that have not yet proven the
    # cluster secret: how many at once, for how long.
    max_frame_bytes: int = 4194304
    max_pending_connections: int = 16
    handshake_timeout: float = 5.0
    # Disk space the Raft journal reserves ahead of use (allocated, so a full disk refuses an
    # entry cleanly instead of killing the node); it grows by this much at a time.
    journal_reserve_bytes: int = 8388608


FRAME_OVERHEAD_BYTES = 65536  # room in a Raft frame beyond a snapshot chunk (framing, sealing)
DEFAULT_ALLOW_NETWORKS = ("127.0.0.0/8", "::1/128")
MAX_LOGIN_CHARS = 255


def _default_allow_networks() -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(n) for n in DEFAULT_ALLOW_NETWORKS)


def _no_users() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True)
class IntakeSection:
    max_message_bytes: int = 10485760
    max_recipients: int = 1000
    commit_timeout: float = 5.0
    dedupe_window_seconds: float = 86400.0
    # Idempotency keys (envelope sender, Message-ID, recipient) remembered at most, oldest
    # forgotten first, so a key table never outgrows memory within the window.
    dedupe_max_keys: int = 2000000
    max_connections: int = 200
    # Clients outside allow_networks: connections at once per IPv4 address or IPv6 /64, so one
    # stranger cannot take every slot.
    max_connections_per_client: int = 10
    # Clients outside allow_networks that have not authenticated: connections at once, so
    # strangers from many addresses cannot take the slots kept for allow_networks and users who
    # authenticated. Unless set, half of max_connections (resolved when the file is read).
    max_stranger_connections: int = 100
    idle_timeout: float = 300.0
    # Seconds a client outside allow_networks may stay connected without authenticating.
    unauthenticated_timeout: float = 60.0
    # Seconds from the 354 to the final dot, however steadily the text arrives.
    data_timeout: float = 300.0
    max_queued_recipients: int = 5000000
    # Who may submit: clients in these networks without AUTH, everyone else only after AUTH.
    allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        default_factory=_default_allow_networks)
    users: Mapping[str, str] = field(default_factory=_no_users, repr=False)  # login -> scrypt hash
    tls_cert: Path | None = None
    tls_key: Path | None = None
    allow_plaintext_auth_on_loopback: bool = False
    auth_fail_delay: float = 1.0  # seconds after a failed AUTH; doubles per recent failure ...
    auth_fail_delay_max: float = 30.0  # ... up to this


@dataclass(frozen=True)
class DomainLimits:
    max_connections: int = 10
    max_per_minute: int = 0  # 0 = unlimited
    # Never send to this domain in clear text: without STARTTLS the recipient is deferred.
    require_tls: bool = False


@dataclass(frozen=True)
class DkimSection:
    domain: str
    selector: str
    key_file: Path


def _no_routes() -> Mapping[str, Address]:
    return MappingProxyType({})


def _default_domains() -> Mapping[str, DomainLimits]:
    return MappingProxyType({"default": DomainLimits()})


@dataclass(frozen=True)
class DeliverySection:
    relay: Address | None = None
    relay_username: str | None = None
    relay_password: str | None = field(default=None, repr=False)
    routes: Mapping[str, Address] = field(default_factory=_no_routes)
    domains: Mapping[str, DomainLimits] = field(default_factory=_default_domains)
    helo_name: str = "localhost"
    batch_size: int = 100
    lease_seconds: float = 30.0
    # The leader expires a lease only once its own monotonic clock says lease_seconds plus this
    # much passed since it applied the batch's assignment or last renewal (covers heartbeats and
    # apply delays between nodes; the heartbeat is 0.08 s).
    lease_expiry_margin: float = 1.0
    # A holder starts no SMTP command, and sends no final dot, within this much of its lease end
    # as its own monotonic clock measures it.
    lease_send_margin: float = 1.0
    # Final dots sent without a reply (timeout, connection lost) before a recipient is not tried
    # again: it ends `expired`, its event text saying it was maybe delivered.
    max_maybe_delivered: int = 3
    max_concurrent_batches: int = 20
    connect_timeout: float = 30.0
    command_timeout: float = 60.0
    report_every: int = 50
    report_interval: float = 0.2
    retry_first: float = 300.0
    retry_factor: float = 2.0
    retry_max_interval: float = 14400.0
    retry_jitter: float = 0.2
    max_age: float = 259200.0
    unsubscribe_url: str | None = None
    dkim: DkimSection | None = None
    # Verify the receiver's certificate (and host name) whenever relay credentials are sent or the
    # domain has require_tls; plain opportunistic STARTTLS stays unverified, as MX certificates
    # often are. tls_ca_file: a PEM bundle to trust instead of the system's CAs.
    tls_verify: bool = True
    tls_ca_file: Path | None = None

    def limits_for(self, domain: str) -> DomainLimits:
        """Limits for a recipient domain: its own [delivery.domains."x"] table, else the default."""
        specific = self.domains.get(_normalise_domain(domain))
        if specific is not None:
            return specific
        return self.domains.get("default", DomainLimits())


@dataclass(frozen=True)
class StorageSection:
    # Bodies and per-recipient detail of finished submissions are kept this long (7 days) ...
    body_retention_seconds: float = 604800.0
    # ... then a compressed record of each recipient's final state, this long (30 days).
    archive_retention_seconds: float = 2592000.0
    # How often the leader applies the retention and each node deletes expired bodies.
    maintenance_interval_seconds: float = 60.0
    # Count bounds, whatever the retention, in recipients (oldest first): finished submissions
    # keep per-recipient detail for at most this many recipients (then they are archived) ...
    max_finished_recipients: int = 200000
    # ... and the compact final-state records at most this many (then they are dropped) ...
    max_archived_recipients: int = 2000000
    # ... and addresses on the suppression list (the oldest entry is forgotten first).
    max_suppressed_addresses: int = 1000000
    # A body no live submission references is deleted only once its file is this old: a new
    # submission of the same bytes, stored but not yet committed, refreshes it.
    body_gc_grace_seconds: float = 3600.0
    # Recently written or read bodies kept in memory for the sender (0: none; no body over a
    # quarter of it is kept).
    body_cache_bytes: int = 64 * 2**20


# At most this many outcome events per webhook POST (the /events endpoint's own page limit).
MAX_WEBHOOK_BATCH = 10000


@dataclass(frozen=True)
class MonitoringSection:
    # Outcome events are POSTed here in batches by the Raft leader; None = no webhook.
    # Not repr'd: the URL often carries the receiver's token.
    webhook_url: str | None = field(default=None, repr=False)
    webhook_batch: int = 500  # events per POST
    webhook_timeout: float = 10.0  # seconds per POST
    webhook_retry_first: float = 1.0  # seconds before the first retry; doubles per failure ...
    webhook_max_retry_interval: float = 300.0  # ... up to this
    # /readyz: ready only when the applied index is within this many entries of the leader's commit.
    ready_max_lag: int = 100
    # /readyz?write=1: a committed noop younger than this proves the quorum without a new write.
    ready_write_window: float = 3.0


@dataclass(frozen=True)
class Config:
    path: Path
    cluster: ClusterSection
    nodes: tuple[NodeConfig, ...]
    raft: RaftSection
    intake: IntakeSection
    delivery: DeliverySection
    storage: StorageSection
    monitoring: MonitoringSection = field(default_factory=MonitoringSection)

    def node(self, node_id: str) -> NodeConfig:
        for node in self.nodes:
            if node.id == node_id:
                return node
        known = ", ".join(node.id for node in self.nodes)
        raise ConfigError(self.path, "--node", f"unknown node id {json.dumps(node_id)}; known ids: {known}")

    def node_data_dir(self, node_id: str) -> Path:
        return self.cluster.data_dir / self.node(node_id).id

    def majority(self) -> int:
        return len(self.nodes) // 2 + 1


# --------------------------------------------------------------------------------------------
# Small parsing helpers
# --------------------------------------------------------------------------------------------


def _parse_port(text: str) -> int:
    if not _PORT_RE.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise ValueError("port must be a number from 1 to 65535")
    return int(text)


def _canonical_ipv6(text: str) -> str:
    try:
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        raise ValueError("not a valid IPv6 address in brackets") from None


def _canonical_host(text: str) -> str:
    """An IPv4 literal in canonical form, or a lower-cased DNS host name."""
    name = text.lower()
    labels = name.split(".")
    if all(label.isdigit() for label in labels):
        try:
            return str(ipaddress.IPv4Address(name))
        except ValueError:
            raise ValueError(f"{json.dumps(text)} is not a valid IPv4 address") from None
    if len(name) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels):
        raise ValueError(f"{json.dumps(text)} is not a valid host name")
    return name


def _normalise_domain(domain: str) -> str:
    return domain.strip().rstrip(".").lower()


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _is_localhost(host: str) -> bool:
    return host == "localhost" or host.endswith(".localhost")


def _toml_key(name: str) -> str:
    return name if _BARE_KEY_RE.fullmatch(name) else json.dumps(name, ensure_ascii=False)


def _describe(value: Any) -> str:
    """A value as it would appear in TOML, short enough for a one-line error."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        shown = json.dumps(value, ensure_ascii=False)
        return shown if len(shown) <= _MAX_SHOWN_CHARS else shown[: _MAX_SHOWN_CHARS - 4] + '..."'
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"a {type(value).__name__}"


def _kind_of(value: Any) -> str:
    """Describe only the type, for values that must not be echoed (secrets, passwords)."""
    if isinstance(value, str):
        return "a string"
    return _describe(value) if isinstance(value, (dict, list)) else f"a {type(value).__name__}"


@dataclass(frozen=True)
class _Rule:
    """A numeric constraint; `wording` has a {kind} slot for "integer" or "number"."""

    wording: str
    test: Callable[[float], bool]


POSITIVE = _Rule("a positive {kind}", lambda v: v > 0)
UNLIMITED_IF_ZERO = _Rule("a non-negative {kind} (0 means unlimited)", lambda v: v >= 0)
AT_LEAST_ONE = _Rule("a {kind} >= 1", lambda v: v >= 1)
FRACTION = _Rule("a {kind} >= 0 and < 1", lambda v: 0 <= v < 1)


class _Section:
    """One TOML table being read; names its keys the way the errors print them."""

    def __init__(self, src: str, label: str, table: Mapping[str, Any]) -> None:
        self.src = src
        self.label = label
        self.table = table

    def key(self, name: str) -> str:
        return f"{self.label} {_toml_key(name)}"

    def fail(self, name: str, problem: str) -> NoReturn:
        raise ConfigError(self.src, self.key(name), problem)

    def has(self, name: str) -> bool:
        return name in self.table

    def check_keys(self, allowed: Iterable[str], table_hint: str = "") -> None:
        allowed = list(allowed)
        for name, value in self.table.items():
            if name in allowed:
                continue
            problem = f"unknown key; allowed keys: {', '.join(allowed)}"
            close = difflib.get_close_matches(name, allowed, n=1)
            if close:
                problem += f" (did you mean {close[0]}?)"
            if table_hint and isinstance(value, dict):
                problem += f" ({table_hint})"
            self.fail(name, problem)

    def integer(self, name: str, rule: _Rule = POSITIVE) -> int:
        value = self.table[name]
        # bool is a subclass of int in Python, but `true` is never a sensible count.
        if isinstance(value, bool) or not isinstance(value, int) or not rule.test(value):
            self.fail(name, f"must be {rule.wording.format(kind='integer')}, got {_describe(value)}")
        return value

    def number(self, name: str, rule: _Rule = POSITIVE) -> float:
        value = self.table[name]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or not rule.test(value):
            self.fail(name, f"must be {rule.wording.format(kind='number')}, got {_describe(value)}")
        return float(value)

    def boolean(self, name: str) -> bool:
        value = self.table[name]
        if not isinstance(value, bool):
            self.fail(name, f"must be true or false, got {_describe(value)}")
        return value

    def text(self, name: str, *, secret: bool = False) -> str:
        value = self.table[name]
        if not isinstance(value, str):
            shown = _kind_of(value) if secret else _describe(value)
            self.fail(name, f"must be a string, got {shown}")
        if not value.strip():
            self.fail(name, "must not be empty")
        return value

    def required_text(self, name: str, why: str = "", *, secret: bool = False) -> str:
        if name not in self.table:
            self.fail(name, f"is required{': ' + why if why else ''}")
        return self.text(name, secret=secret)

    def subtable(self, name: str, hint: str = "") -> Mapping[str, Any]:
        value = self.table.get(name, {})
        if not isinstance(value, dict):
            self.fail(name, f"must be a table{' (' + hint + ')' if hint else ''}, got {_describe(value)}")
        return value


def _numbers(sec: _Section, cls: type, rules: Mapping[str, _Rule] | None = None) -> dict[str, Any]:
    """Read the int/float fields of `cls` that the table sets; absent ones keep the class default."""
    rules = rules or {}
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not sec.has(f.name) or type(f.default) not in (int, float):
            continue
        rule = rules.get(f.name, POSITIVE)
        values[f.name] = sec.integer(f.name, rule) if type(f.default) is int else sec.number(f.name, rule)
    return values


def _resolve_path(base_dir: Path, value: str) -> Path:
    """Relative paths mean "next to the config file", so the cluster runs from any working dir."""
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    return Path(os.path.normpath(path))


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def _cluster_section(src: str, base_dir: Path, table: Mapping[str, Any]) -> ClusterSection:
    sec = _Section(src, "[cluster]", table)
    sec.check_keys(_field_names(ClusterSection))
    name = sec.required_text("name", "it identifies this cluster in logs and reports")
    if not CLUSTER_NAME_RE.fullmatch(name):
        sec.fail("name", f"must be 1-64 of A-Z a-z 0-9 . _ - starting with a letter or digit, got {_describe(name)}")
    secret = sec.required_text("secret", SECRET_WHY, secret=True)
    secret_bytes = len(secret.encode("utf-8"))
    if secret_bytes < MIN_SECRET_BYTES:
        sec.fail("secret", f"is {secret_bytes} bytes, needs at least {MIN_SECRET_BYTES} random bytes (UTF-8; "
                           f"`raftmail secret` prints one): {SECRET_WHY}")
    data_dir_text = sec.required_text("data_dir", "each node keeps its Raft log and message bodies under it")
    data_dir = _resolve_path(base_dir, data_dir_text)
    fsync = sec.boolean("fsync") if sec.has("fsync") else False
    admin_token = _token(sec, "admin_token") if sec.has("admin_token") else None
    read_token = _token(sec, "read_token") if sec.has("read_token") else None
    if read_token is not None and admin_token is None:
        sec.fail("read_token", "is set but admin_token is not: set admin_token too, or every route stays open")
    if read_token is not None and read_token == admin_token:
        sec.fail("read_token", "must differ from admin_token")
    token_key = None
    if sec.has("token_key"):
        token_key = sec.text("token_key", secret=True)
        key_bytes = len(token_key.encode("utf-8"))
        if key_bytes < MIN_TOKEN_KEY_BYTES:
            sec.fail("token_key", f"is {key_bytes} bytes, needs at least {MIN_TOKEN_KEY_BYTES}: {TOKEN_KEY_WHY}")
        if token_key in (secret, admin_token, read_token):
            sec.fail("token_key", "must differ from the secret and the admin tokens: "
                                  "the unsubscribe service that holds it must not control the cluster")
    return ClusterSection(name=name, secret=secret, data_dir=data_dir, fsync=fsync, admin_token=admin_token,
                          read_token=read_token, token_key=token_key, **_numbers(sec, ClusterSection))


def _token(sec: _Section, name: str) -> str:
    token = sec.text(name, secret=True)
    if len(token) < MIN_ADMIN_TOKEN_CHARS:
        sec.fail(name, f"is {len(token)} characters, needs at least {MIN_ADMIN_TOKEN_CHARS} so it cannot be guessed")
    if not token.isascii() or not token.isprintable() or " " in token:
        sec.fail(name, "must be printable ASCII without spaces (it travels in an HTTP header)")
    return token


def _is_loopback(address: Address) -> bool:
    ip = _ip(address.host)
    return ip is not None and ip.is_loopback


def check_admin_exposure(config: Config, node_id: str) -> None:
    """A node whose admin address is not loopback needs [cluster] admin_token: without it anyone
    who reaches that port could pause or cancel campaigns and change the membership."""
    node = config.node(node_id)
    if config.cluster.admin_token is None and not _is_loopback(node.admin):
        raise ConfigError(config.path, "[cluster] admin_token",
                          f"is required: node {node_id}'s admin address {node.admin} is not loopback, and "
                          "without a token anyone who reaches it controls the cluster")


def _check_cross_sections(src: str, config: Config) -> None:
    """Rules that involve more than one section."""
    addresses = [a for n in config.nodes for a in (n.raft, n.smtp, n.admin)]
    if config.cluster.secret == EXAMPLE_SECRET and not all(_is_loopback(a) for a in addresses):
        raise ConfigError(src, "[cluster] secret", "is the example file's public secret, allowed only while "
                          "every node address is loopback; set your own (`raftmail secret` prints one)")
    if config.delivery.unsubscribe_url is not None and config.cluster.token_key is None:
        raise ConfigError(src, "[cluster] token_key", f"is required when [delivery] unsubscribe_url is set: "
                          f"{TOKEN_KEY_WHY}")


def _node_address(sec: _Section, role: str) -> Address:
    text = sec.required_text(role, f'every node needs a "host:port" {role} address')
    try:
        address = Address.parse(text)
    except ValueError as exc:
        sec.fail(role, f"{exc}, got {_describe(text)}")
    if _is_localhost(address.host):
        sec.fail(role, f'"{address.host}" is not canonical, write 127.0.0.1 or [::1] instead: {CANONICAL_WHY}')
    ip = _ip(address.host)
    if role == "raft" and ip is None:
        sec.fail(role, f"must be an IP literal, got host name {json.dumps(address.host)}: {CANONICAL_WHY}")
    if ip is not None and ip.is_unspecified:
        sec.fail(role, f"{address} is a wildcard; give the address that peers and clients connect to")
    return address


def _node(src: str, index: int, table: Any) -> NodeConfig:
    if not isinstance(table, dict):
        raise ConfigError(src, f"[[node]] #{index}", f"must be a table, got {_describe(table)}")
    sec = _Section(src, f"[[node]] #{index}", table)
    node_id = sec.required_text("id", "it names the node on the command line (--node) and its data folder")
    if not NODE_ID_RE.fullmatch(node_id):
        sec.fail("id", f"must be 1-32 characters from A-Z a-z 0-9 _ -, got {_describe(node_id)}")
    # From here on errors name the node by its id, which is how the operator knows it.
    sec.label = f"[[node]] {node_id}"
    sec.check_keys(("id", "raft", "smtp", "admin"))
    return NodeConfig(
        id=node_id,
        raft=_node_address(sec, "raft"),
        smtp=_node_address(sec, "smtp"),
        admin=_node_address(sec, "admin"),
    )


def _nodes(src: str, raw: Any) -> tuple[NodeConfig, ...]:
    if raw is None or raw == []:
        raise ConfigError(src, "[[node]]", "no nodes: add one [[node]] table (id, raft, smtp, admin) per member")
    if not isinstance(raw, list):
        raise ConfigError(src, "[[node]]", f"must be an array of tables (write [[node]]), got {_describe(raw)}")
    nodes: list[NodeConfig] = []
    # Compared ignoring case: each id names a data folder, and some file systems ignore case.
    index_by_id: dict[str, int] = {}
    owner_by_address: dict[tuple[str, int], str] = {}
    for index, table in enumerate(raw, start=1):
        node = _node(src, index, table)
        earlier = index_by_id.setdefault(node.id.lower(), index)
        if earlier != index:
            raise ConfigError(
                src,
                f"[[node]] #{index} id",
                f"{json.dumps(node.id)} is already used by [[node]] #{earlier}; node ids must be unique (ignoring case)",
            )
        for role in ("raft", "smtp", "admin"):
            address: Address = getattr(node, role)
            owner = owner_by_address.setdefault((address.host, address.port), f"{node.id} {role}")
            if owner != f"{node.id} {role}":
                problem = f"port {address.port} is already used by {owner} ({address})"
                raise ConfigError(src, f"[[node]] {node.id} {role}", problem)
        nodes.append(node)
    return tuple(nodes)


def _ordered(
    sec: _Section, earlier: str, later: str, values: Mapping[str, float], *, strict: bool, factor: float = 1.0
) -> None:
    """Refuse unless factor*earlier < later (or <= when not strict); blame the key the file set."""
    low, high = values[earlier] * factor, values[later]
    if low < high or (not strict and low == high):
        return
    blamed = later if sec.has(later) or not sec.has(earlier) else earlier
    left = f"{factor:g} * {earlier}" if factor != 1 else earlier
    relation = "less than" if strict else "at most"
    sec.fail(
        blamed,
        f"{left} ({low:g}) must be {relation} {later} ({high:g}); required: "
        "0 < heartbeat_interval*3 < election_timeout_min < election_timeout_max <= connection_timeout",
    )


def _raft_section(src: str, table: Mapping[str, Any]) -> RaftSection:
    sec = _Section(src, "[raft]", table)
    sec.check_keys(_field_names(RaftSection))
    raft = RaftSection(**_numbers(sec, RaftSection))
    values = dataclasses.asdict(raft)
    # Heartbeats must arrive several times per election timeout, or followers start needless
    # elections; a connection must outlive an election so a slow peer is not cut off mid-vote.
    _ordered(sec, "heartbeat_interval", "election_timeout_min", values, strict=True, factor=3)
    _ordered(sec, "election_timeout_min", "election_timeout_max", values, strict=True)
    _ordered(sec, "election_timeout_max", "connection_timeout", values, strict=False)
    if raft.max_frame_bytes < raft.snapshot_chunk_bytes + FRAME_OVERHEAD_BYTES:
        blamed = "max_frame_bytes" if sec.has("max_frame_bytes") else "snapshot_chunk_bytes"
        sec.fail(blamed, f"max_frame_bytes ({raft.max_frame_bytes}) must be at least snapshot_chunk_bytes "
                         f"({raft.snapshot_chunk_bytes}) + {FRAME_OVERHEAD_BYTES}: a snapshot chunk must fit a frame")
    return raft


def _allow_networks(sec: _Section) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    value = sec.table["allow_networks"]
    if not isinstance(value, list):
        sec.fail("allow_networks", f'must be an array of networks like ["127.0.0.0/8", "::1/128"], got {_describe(value)}')
    networks = []
    for item in value:
        if not isinstance(item, str):
            sec.fail("allow_networks", f'must hold networks as strings like "10.0.0.0/8", got {_describe(item)}')
        try:
            networks.append(ipaddress.ip_network(item.strip(), strict=True))
        except ValueError as exc:
            hint = ""
            try:
                hint = f" (did you mean {ipaddress.ip_network(item.strip(), strict=False)}?)"
            except ValueError:
                pass
            sec.fail("allow_networks", f"{_describe(item)} is not a network in CIDR form: {exc}{hint}")
    return tuple(networks)


def _users(src: str, sec: _Section) -> Mapping[str, str]:
    from raftmail.node.auth import parse_hash

    users_sec = _Section(src, "[intake.users]", sec.subtable("users", 'write [intake.users] with name = "scrypt$..." lines'))
    users: dict[str, str] = {}
    for name in users_sec.table:
        if not name or len(name) > MAX_LOGIN_CHARS or not name.isprintable() or any(c.isspace() for c in name):
            users_sec.fail(name, f"a login must be 1-{MAX_LOGIN_CHARS} printable characters without spaces")
        value = users_sec.text(name, secret=True)
        try:
            parse_hash(value)
        except ValueError as exc:
            users_sec.fail(name, str(exc))
        users[name] = value
    return MappingProxyType(users)


def _tls_files(src: str, base_dir: Path, sec: _Section) -> tuple[Path | None, Path | None]:
    if not sec.has("tls_cert") and not sec.has("tls_key"):
        return None, None
    for name, other in (("tls_cert", "tls_key"), ("tls_key", "tls_cert")):
        if not sec.has(other):
            sec.fail(name, f"is set but {other} is not; STARTTLS needs both")
    paths = {name: _resolve_path(base_dir, sec.text(name)) for name in ("tls_cert", "tls_key")}
    # Checked now so a typo stops the node at start-up instead of failing every STARTTLS later.
    for name, path in paths.items():
        try:
            with open(path, "rb") as handle:
                first_byte = handle.read(1)
        except OSError as exc:
            sec.fail(name, f"cannot read {path}: {exc.strerror or exc}")
        if not first_byte:
            sec.fail(name, f"{path} is empty")
    from raftmail.node.tls import TLSConfigError, server_context

    try:
        server_context(paths["tls_cert"], paths["tls_key"])
    except TLSConfigError as exc:
        sec.fail("tls_key", f"{paths['tls_cert']} and {paths['tls_key']} cannot serve STARTTLS: {exc}")
    return paths["tls_cert"], paths["tls_key"]


def _intake_section(src: str, base_dir: Path, table: Mapping[str, Any]) -> IntakeSection:
    sec = _Section(src, "[intake]", table)
    sec.check_keys(_field_names(IntakeSection))
    tls_cert, tls_key = _tls_files(src, base_dir, sec)
    plaintext_ok = sec.boolean("allow_plaintext_auth_on_loopback") if sec.has("allow_plaintext_auth_on_loopback") \
        else False
    intake = IntakeSection(
        **_numbers(sec, IntakeSection),
        allow_networks=_allow_networks(sec) if sec.has("allow_networks") else _default_allow_networks(),
        users=_users(src, sec),
        tls_cert=tls_cert,
        tls_key=tls_key,
        allow_plaintext_auth_on_loopback=plaintext_ok,
    )
    if not sec.has("max_stranger_connections"):
        intake = dataclasses.replace(intake, max_stranger_connections=max(1, intake.max_connections // 2))
    elif intake.max_stranger_connections > intake.max_connections:
        sec.fail("max_stranger_connections", f"({intake.max_stranger_connections}) must be at most "
                                             f"max_connections ({intake.max_connections})")
    if intake.users and tls_cert is None and not plaintext_ok:
        sec.fail("users", "are set but tls_cert and tls_key are not: AUTH is offered only after STARTTLS "
                          "(for a loopback-only test, set allow_plaintext_auth_on_loopback = true)")
    if intake.auth_fail_delay_max < intake.auth_fail_delay:
        name = "auth_fail_delay_max" if sec.has("auth_fail_delay_max") else "auth_fail_delay"
        sec.fail(name, f"auth_fail_delay_max ({intake.auth_fail_delay_max:g}) must be at least "
                       f"auth_fail_delay ({intake.auth_fail_delay:g})")
    if not intake.allow_networks and not intake.users:
        sec.fail("allow_networks", "is empty and [intake.users] has no users, so nobody could submit")
    if intake.max_queued_recipients < intake.max_recipients:
        name = "max_queued_recipients" if sec.has("max_queued_recipients") else "max_recipients"
        sec.fail(
            name,
            f"max_queued_recipients ({intake.max_queued_recipients}) must be at least max_recipients "
            f"({intake.max_recipients}), or a full-size submission could never be accepted",
        )
    return intake


def _domain_key(sec: _Section, name: str, *, allow_default: bool = False) -> str:
    domain = _normalise_domain(name)
    if allow_default and domain == "default":
        return domain
    labels = domain.split(".")
    if not domain or len(domain) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels):
        sec.fail(name, "is not a valid domain name")
    return domain


def _routes(src: str, table: Mapping[str, Any]) -> Mapping[str, Address]:
    sec = _Section(src, "[delivery.routes]", table)
    routes: dict[str, Address] = {}
    for name, value in table.items():
        domain = _domain_key(sec, name)
        if isinstance(value, dict):
            sec.fail(name, f'must be a "host:port" string, got a table ({_QUOTE_ROUTE_HINT})')
        if not isinstance(value, str):
            sec.fail(name, f'must be a "host:port" string, got {_describe(value)}')
        if domain in routes:
            sec.fail(name, f"routes {domain} a second time (domain names ignore case)")
        try:
            routes[domain] = Address.parse(value)
        except ValueError as exc:
            sec.fail(name, f"{exc}, got {_describe(value)}")
    return MappingProxyType(routes)


def _domains(src: str, table: Mapping[str, Any]) -> Mapping[str, DomainLimits]:
    outer = _Section(src, "[delivery.domains]", table)
    limits: dict[str, DomainLimits] = {}
    # The default table is read first: a domain's own table only overrides what it sets.
    for name in sorted(table, key=lambda n: _normalise_domain(n) != "default"):
        value = table[name]
        domain = _domain_key(outer, name, allow_default=True)
        if not isinstance(value, dict):
            outer.fail(name, f"must be a table like [delivery.domains.{_toml_key(name)}], got {_describe(value)}")
        if domain in limits:
            outer.fail(name, f"sets limits for {domain} a second time (domain names ignore case)")
        sec = _Section(src, f"[delivery.domains.{_toml_key(name)}]", value)
        sec.check_keys(_field_names(DomainLimits), _QUOTE_DOMAIN_HINT)
        base = limits.get("default", DomainLimits())
        read = _numbers(sec, DomainLimits, {"max_per_minute": UNLIMITED_IF_ZERO})
        if sec.has("require_tls"):
            read["require_tls"] = sec.boolean("require_tls")
        limits[domain] = dataclasses.replace(base, **read)
    limits.setdefault("default", DomainLimits())
    return MappingProxyType(limits)


def _dkim_section(src: str, base_dir: Path, table: Mapping[str, Any]) -> DkimSection:
    sec = _Section(src, "[delivery.dkim]", table)
    sec.check_keys(_field_names(DkimSection))
    domain_text = sec.required_text("domain", "it is the d= domain of the DKIM signature")
    domain = _normalise_domain(domain_text)
    if not all(_LABEL_RE.fullmatch(label) for label in domain.split(".")):
        sec.fail("domain", f"is not a valid domain name, got {_describe(domain_text)}")
    selector = sec.required_text("selector", "it is the s= selector that receivers look up in DNS")
    if not _SELECTOR_RE.fullmatch(selector):
        sec.fail("selector", f"must be DNS labels separated by dots, got {_describe(selector)}")
    key_file_text = sec.required_text("key_file", "it holds the private key that signs outgoing mail")
    key_file = _resolve_path(base_dir, key_file_text)
    # Checked now so a typo stops the node at start-up instead of failing every delivery later.
    try:
        with open(key_file, "rb") as handle:
            first_byte = handle.read(1)
    except OSError as exc:
        sec.fail("key_file", f"cannot read {key_file}: {exc.strerror or exc}")
    if not first_byte:
        sec.fail("key_file", f"{key_file} is empty")
    return DkimSection(domain=domain, selector=selector, key_file=key_file)


def _url_template_problem(url: str) -> str | None:
    """Why `url` is not a usable unsubscribe template, or None if it is."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(url) if name is not None]
        hostname = urlsplit(url).hostname
    except ValueError as exc:
        return f"is not a valid URL template ({exc})"
    if not url.startswith("https://") or not hostname:
        return "must be an https:// URL"
    if any(ch.isspace() for ch in url):
        return "must not contain spaces"
    if "{token}" not in url:
        return "must contain {token}, where each recipient's unsubscribe token goes"
    if any(name != "token" for name in fields):
        return "may contain no placeholder other than {token} (write other braces as {{ and }})"
    return None


def _unsubscribe_url(sec: _Section) -> str:
    url = sec.text("unsubscribe_url")
    problem = _url_template_problem(url)
    if problem:
        sec.fail("unsubscribe_url", f"{problem}, got {_describe(url)}")
    return url


def _helo_name(sec: _Section) -> str:
    helo = sec.text("helo_name")
    if helo.startswith("[") and helo.endswith("]") and _ip(helo[1:-1].removeprefix("IPv6:")) is not None:
        return helo
    try:
        return _canonical_host(helo)
    except ValueError:
        sec.fail("helo_name", f'must be a host name or address literal like "[192.0.2.1]", got {_describe(helo)}')


def _relay_login(sec: _Section, relay: Address | None) -> tuple[str | None, str | None]:
    username = sec.text("relay_username") if sec.has("relay_username") else None
    password = sec.text("relay_password", secret=True) if sec.has("relay_password") else None
    if (username is not None or password is not None) and relay is None:
        sec.fail("relay_username" if username is not None else "relay_password", "is set but relay is not")
    if (username is None) != (password is None):
        missing = "relay_password" if password is None else "relay_username"
        sec.fail(missing, "relay_username and relay_password must be set together")
    return username, password


def _ca_file(sec: _Section, base_dir: Path) -> Path:
    path = _resolve_path(base_dir, sec.text("tls_ca_file"))
    from raftmail.node.tls import TLSConfigError, client_context

    try:  # loaded now so a typo stops the node at start, not every delivery later
        client_context(verify=True, ca_file=path)
    except TLSConfigError as exc:
        sec.fail("tls_ca_file", f"{path}: {exc}")
    return path


def _delivery_section(src: str, base_dir: Path, table: Mapping[str, Any]) -> DeliverySection:
    sec = _Section(src, "[delivery]", table)
    sec.check_keys(_field_names(DeliverySection))
    numbers = _numbers(
        sec,
        DeliverySection,
        {"retry_factor": AT_LEAST_ONE, "retry_jitter": FRACTION, "lease_expiry_margin": NON_NEGATIVE},
    )
    relay = None
    if sec.has("relay"):
        try:
            relay = Address.parse(sec.text("relay"))
        except ValueError as exc:
            sec.fail("relay", f"{exc}, got {_describe(table['relay'])}")
    username, password = _relay_login(sec, relay)
    routes_table = sec.subtable("routes", 'write [delivery.routes] with "domain" = "host:port" lines')
    domains_table = sec.subtable("domains", 'write [delivery.domains.default] and [delivery.domains."gmail.com"]')
    dkim = _dkim_section(src, base_dir, sec.subtable("dkim")) if sec.has("dkim") else None
    delivery = DeliverySection(
        tls_verify=sec.boolean("tls_verify") if sec.has("tls_verify") else True,
        tls_ca_file=_ca_file(sec, base_dir) if sec.has("tls_ca_file") else None,
        relay=relay,
        relay_username=username,
        relay_password=password,
        routes=_routes(src, routes_table),
        domains=_domains(src, domains_table),
        helo_name=_helo_name(sec) if sec.has("helo_name") else DeliverySection.helo_name,
        unsubscribe_url=_unsubscribe_url(sec) if sec.has("unsubscribe_url") else None,
        dkim=dkim,
        **numbers,
    )
    if delivery.lease_send_margin * 2 >= delivery.lease_seconds:
        name = "lease_send_margin" if sec.has("lease_send_margin") else "lease_seconds"
        sec.fail(name, f"lease_send_margin ({delivery.lease_send_margin:g}) must be less than half of "
                       f"lease_seconds ({delivery.lease_seconds:g}), or a holder could hardly send")
    if delivery.retry_max_interval < delivery.retry_first:
        name = "retry_max_interval" if sec.has("retry_max_interval") else "retry_first"
        sec.fail(
            name,
            f"retry_max_interval ({delivery.retry_max_interval:g}) must be at least "
            f"retry_first ({delivery.retry_first:g})",
        )
    return delivery


def _storage_section(src: str, table: Mapping[str, Any]) -> StorageSection:
    sec = _Section(src, "[storage]", table)
    sec.check_keys(_field_names(StorageSection))
    return StorageSection(**_numbers(sec, StorageSection, {"body_cache_bytes": NON_NEGATIVE}))


NON_NEGATIVE = _Rule("a non-negative {kind}", lambda v: v >= 0)


def _webhook_url(sec: _Section) -> str:
    url = sec.text("webhook_url", secret=True)
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError:
        sec.fail("webhook_url", "is not a valid URL")
    if parts.scheme not in ("http", "https") or not hostname:
        sec.fail("webhook_url", "must be an https:// URL with a host (http:// only for a loopback IP)")
    if any(ch.isspace() for ch in url):
        sec.fail("webhook_url", "must not contain spaces")
    # Events carry recipient addresses: never in clear text over a network.
    if parts.scheme == "http" and not _is_loopback_host(hostname):
        sec.fail("webhook_url", f"must be https:// (events carry recipient addresses); http:// is allowed only "
                                f"for a loopback IP such as 127.0.0.1 or [::1], got host {json.dumps(hostname)}")
    return url


def _is_loopback_host(host: str) -> bool:
    # An IP literal only: what a name resolves to is not known at load.
    ip = _ip(host)
    return ip is not None and ip.is_loopback


def _monitoring_section(src: str, table: Mapping[str, Any]) -> MonitoringSection:
    sec = _Section(src, "[monitoring]", table)
    sec.check_keys(_field_names(MonitoringSection))
    numbers = _numbers(sec, MonitoringSection, {"ready_max_lag": NON_NEGATIVE})
    url = _webhook_url(sec) if sec.has("webhook_url") else None
    if url is None:
        # Tuning a webhook that does not exist is a slip (a misspelt or missing URL key).
        for name in table:
            if name.startswith("webhook_"):
                sec.fail(name, "is set but webhook_url is not")
    monitoring = MonitoringSection(webhook_url=url, **numbers)
    if monitoring.webhook_batch > MAX_WEBHOOK_BATCH:
        sec.fail("webhook_batch", f"must be at most {MAX_WEBHOOK_BATCH}, got {monitoring.webhook_batch}")
    if monitoring.webhook_max_retry_interval < monitoring.webhook_retry_first:
        name = "webhook_max_retry_interval" if sec.has("webhook_max_retry_interval") else "webhook_retry_first"
        sec.fail(
            name,
            f"webhook_max_retry_interval ({monitoring.webhook_max_retry_interval:g}) must be at least "
            f"webhook_retry_first ({monitoring.webhook_retry_first:g})",
        )
    return monitoring


# --------------------------------------------------------------------------------------------
# File level
# --------------------------------------------------------------------------------------------

_SECTIONS = ("cluster", "node", "raft", "intake", "delivery", "storage", "monitoring")


def _section_label(name: str, value: Any) -> str:
    if name == "node" or isinstance(value, list):
        return f"[[{_toml_key(name)}]]"
    return f"[{_toml_key(name)}]"


def _read_toml(src: str, path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(src, "file", f"cannot read the config file: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(src, f"byte {exc.start}", "the file is not valid UTF-8, which TOML requires") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = _TOML_POSITION_RE.search(message)
        where = match.group(1) if match else "TOML"
        what = message[: match.start()] if match else message
        raise ConfigError(src, where, f"TOML syntax error: {what}") from None


def _top_level_table(src: str, document: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = document.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(src, f"[{name}]", f"must be a table, got {_describe(value)}")
    return value


def load_config(path: str | Path) -> Config:
    """Read and validate the cluster file; raise ConfigError on the first problem found."""
    src = str(path)
    file_path = Path(path).expanduser().absolute()
    base_dir = file_path.parent
    document = _read_toml(src, file_path)
    for name, value in document.items():
        if name not in _SECTIONS:
            allowed = ", ".join(_section_label(s, None) for s in _SECTIONS)
            raise ConfigError(src, _section_label(name, value), f"unknown section; allowed sections: {allowed}")
    if "cluster" not in document:
        raise ConfigError(src, "[cluster]", "is required: it holds the cluster name, secret and data_dir")
    config = Config(
        path=file_path,
        cluster=_cluster_section(src, base_dir, _top_level_table(src, document, "cluster")),
        nodes=_nodes(src, document.get("node")),
        raft=_raft_section(src, _top_level_table(src, document, "raft")),
        intake=_intake_section(src, base_dir, _top_level_table(src, document, "intake")),
        delivery=_delivery_section(src, base_dir, _top_level_table(src, document, "delivery")),
        storage=_storage_section(src, _top_level_table(src, document, "storage")),
        monitoring=_monitoring_section(src, _top_level_table(src, document, "monitoring")),
    )
    _check_cross_sections(src, config)
    return config

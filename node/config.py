"""Cluster configuration: load and validate the cluster TOML file into frozen dataclasses.

Every refusal is a ConfigError whose text is a single line, "<file>: <key>: <what is wrong>", so an
operator can fix the file without reading code. Nothing is defaulted silently that could lose mail
or split the cluster: unknown keys, wrong types and inconsistent limits are all refused at load.

The schema (frozen dataclasses) is in config_types.py, the key reader and value checks every
parser shares in config_read.py; this module has one parser per section, in file order, and is
long because each refusal is spelled out key by key.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
import re
import string
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from raftmail.node.config_read import (AT_LEAST_ONE, CANONICAL_WHY, CLUSTER_NAME_RE, ConfigError,
                                       EXAMPLE_SECRET, FRACTION, MIN_ADMIN_TOKEN_CHARS, MIN_SECRET_BYTES,
                                       MIN_UNSUBSCRIBE_SECRET_BYTES, NODE_ID_RE, SECRET_WHY, UNSUBSCRIBE_SECRET_WHY,
                                       UNLIMITED_IF_ZERO, _LABEL_RE, _QUOTE_DOMAIN_HINT, _QUOTE_ROUTE_HINT,
                                       _Rule, _SELECTOR_RE, _Section, _TOML_POSITION_RE, _canonical_host,
                                       _describe, _field_names, _ip, _is_localhost,
                                       _numbers, _resolve_path, _toml_key)
from raftmail.consensus.domains import normalise_domain
from raftmail.node.dkim import load_signing_key
from raftmail.node.content import BARE_NEWLINE_MODES
from raftmail.node.config_types import (Address, ApiSection, BackoffSection, ClusterSection, Config, DeliverySection, DkimSection,
                                        DomainLimits, FeedbackSection, FRAME_OVERHEAD_BYTES, UNSUBSCRIBE_SCOPES, IntakeSection, MAX_LOGIN_CHARS,
                                        MAX_WEBHOOK_BATCH, MonitoringSection, NodeConfig, PoolSection, RaftSection,
                                        SiteSection, SourceAddress, StorageSection, _default_allow_networks)

__all__ = [
    "Address",
    "ApiSection",
    "ClusterSection",
    "Config",
    "ConfigError",
    "DeliverySection",
    "DkimSection",
    "DomainLimits",
    "FeedbackSection",
    "IntakeSection",
    "MonitoringSection",
    "NodeConfig",
    "RaftSection",
    "StorageSection",
    "load_config",
]

# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def _cluster_section(src: str, base_dir: Path, table: Mapping[str, Any]) -> ClusterSection:
    sec = _Section(src, "[cluster]", table)
    if sec.has("token_key"):
        # Moved: it authenticates more than links now, and takes a list (rotation).
        sec.fail("token_key", "is no longer read: unsubscribe links and VERP addresses are authenticated with "
                              "[feedback] unsubscribe_secret = [\"<key>\"] (a list: the first key makes tokens, "
                              "every key is tried when one is read); move the key there")
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
    return ClusterSection(name=name, secret=secret, data_dir=data_dir, fsync=fsync, admin_token=admin_token,
                          read_token=read_token, **_numbers(sec, ClusterSection))


def _choice(sec: _Section, name: str, allowed: tuple[str, ...], default: str) -> str:
    if not sec.has(name):
        return default
    value = sec.text(name)
    if value not in allowed:
        sec.fail(name, f"must be one of {', '.join(json.dumps(a) for a in allowed)}, got {_describe(value)}")
    return value


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
    fb = config.feedback
    if not fb.unsubscribe_secret:
        needs = [key for key, value in (("[delivery] unsubscribe_url", config.delivery.unsubscribe_url),
                                        ("[feedback] bounce_domain", fb.bounce_domain),
                                        ("[feedback] unsubscribe_mailto", fb.unsubscribe_mailto)) if value is not None]
        if needs:
            raise ConfigError(src, "[feedback] unsubscribe_secret", f"is required when {needs[0]} is set: "
                              f"{UNSUBSCRIBE_SECRET_WHY}")
    cluster = config.cluster
    for key in fb.unsubscribe_secret:
        if key in (cluster.secret, cluster.admin_token, cluster.read_token):
            raise ConfigError(src, "[feedback] unsubscribe_secret", "must differ from the cluster secret and the "
                              "admin tokens: a key every link and bounce address is checked with must not "
                              "control the cluster")
    ids = {n.id for n in config.nodes}
    for pool in config.delivery.pools.values():
        for source in pool.sources:
            if source.node not in ids:
                raise ConfigError(src, f"[[delivery.pools.{pool.name}.sources]] node",
                                  f"{source.node!r} (of {source.address}) is not a [[node]] id ({', '.join(sorted(ids))})")
    if any(n.http is not None for n in config.nodes) and config.delivery.unsubscribe_url is None:
        raise ConfigError(src, "[delivery] unsubscribe_url", "is required when a [[node]] has http: the public "
                          "listener serves the unsubscribe links it names")


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
    sec.check_keys(("id", "raft", "smtp", "admin", "http"))
    return NodeConfig(
        id=node_id,
        raft=_node_address(sec, "raft"),
        smtp=_node_address(sec, "smtp"),
        admin=_node_address(sec, "admin"),
        http=_node_address(sec, "http") if sec.has("http") else None,
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
        for role in ("raft", "smtp", "admin", "http"):
            address: Address | None = getattr(node, role)
            if address is None:
                continue
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
    def bad_login(name: str) -> str | None:
        if not name or len(name) > MAX_LOGIN_CHARS or not name.isprintable() or any(c.isspace() for c in name):
            return f"a login must be 1-{MAX_LOGIN_CHARS} printable characters without spaces"
        return None
    return _hashes(src, sec, "users", 'write [intake.users] with name = "scrypt$..." lines', bad_login)


def _hashes(src: str, sec: _Section, table: str, hint: str, bad_name: Callable[[str], str | None]) -> Mapping[str, str]:
    """A table of name = salted hash (passwords, API keys), every hash checked."""
    from raftmail.node.auth import parse_hash

    sub = _Section(src, f"{sec.label[:-1]}.{table}]", sec.subtable(table, hint))
    out: dict[str, str] = {}
    for name in sub.table:
        why = bad_name(name)
        if why:
            sub.fail(name, why)
        value = sub.text(name, secret=True)
        try:
            parse_hash(value)
        except ValueError as exc:
            sub.fail(name, str(exc))
        out[name] = value
    return MappingProxyType(out)


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
        bare_newline=_choice(sec, "bare_newline", BARE_NEWLINE_MODES, IntakeSection.bare_newline),
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
    domain = normalise_domain(name)
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
    for name in sorted(table, key=lambda n: normalise_domain(n) != "default"):
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


def _dkim_entries(src: str, base_dir: Path, value: Any) -> tuple[DkimSection, ...]:
    """[[delivery.dkim]] entries (one [delivery.dkim] table is one entry)."""
    tables = [value] if isinstance(value, Mapping) else value
    if not isinstance(tables, list) or not all(isinstance(t, Mapping) for t in tables):
        raise ConfigError(src, "[delivery.dkim]", f"must be a table or an array of tables ([[delivery.dkim]]), "
                                                  f"got {_describe(value)}")
    entries = tuple(_dkim_entry(src, base_dir, table, f"[[delivery.dkim]] #{i + 1}" if len(tables) > 1
                                else "[delivery.dkim]") for i, table in enumerate(tables))
    defaults = {e.domain for e in entries if e.default}
    if len(defaults) > 1:
        raise ConfigError(src, "[[delivery.dkim]] default", f"marks entries of {len(defaults)} domains "
                          f"({', '.join(sorted(defaults))}); the default signs as one domain (one key per algorithm)")
    seen: set[tuple[str, str]] = set()
    for e in entries:
        if (e.domain, e.selector) in seen:
            raise ConfigError(src, "[[delivery.dkim]] selector", f"{e.selector} appears twice for {e.domain}")
        seen.add((e.domain, e.selector))
    return entries


def _dkim_entry(src: str, base_dir: Path, table: Mapping[str, Any], where: str) -> DkimSection:
    sec = _Section(src, where, table)
    sec.check_keys(_field_names(DkimSection))
    domain_text = sec.required_text("domain", "it is the d= domain of the DKIM signature")
    domain = normalise_domain(domain_text)
    if not all(_LABEL_RE.fullmatch(label) for label in domain.split(".")):
        sec.fail("domain", f"is not a valid domain name, got {_describe(domain_text)}")
    selector = sec.required_text("selector", "it is the s= selector that receivers look up in DNS")
    if not _SELECTOR_RE.fullmatch(selector):
        sec.fail("selector", f"must be DNS labels separated by dots, got {_describe(selector)}")
    key_file_text = sec.required_text("key_file", "it holds the private key that signs outgoing mail")
    key_file = _resolve_path(base_dir, key_file_text)
    # Checked now so a typo stops the node at start-up instead of failing every delivery later.
    try:
        pem = key_file.read_bytes()
    except OSError as exc:
        sec.fail("key_file", f"cannot read {key_file}: {exc.strerror or exc}")
    if not pem:
        sec.fail("key_file", f"{key_file} is empty")
    try:
        load_signing_key(pem)
    except (ValueError, TypeError) as exc:
        sec.fail("key_file", f"{key_file} does not hold a usable private key: {exc}")
    default = sec.boolean("default") if sec.has("default") else False
    return DkimSection(domain=domain, selector=selector, key_file=key_file, default=default)


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


_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_MX_PATTERN_RE = re.compile(r"(\*\.)?[a-z0-9*](?:[a-z0-9.*-]{0,251}[a-z0-9])?")
MAX_SOURCE_WEIGHT = 1000
MAX_WARMUP_DAYS = 366


def _string_list(sec: _Section, name: str) -> list[str]:
    value = sec.table[name]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        sec.fail(name, f'must be a list of non-empty strings, got {_describe(value)}')
    return value


def _named_tables(src: str, label: str, table: Mapping[str, Any], keys: list[str],
                  example: str) -> Iterator[tuple[str, _Section]]:
    """Each [label.NAME] table of `table`, its name checked, read as a section with `keys`."""
    outer = _Section(src, f"[{label}]", table)
    for name, value in table.items():
        if not _NAME_RE.fullmatch(name):
            outer.fail(name, "must be a name of letters, digits, - and _ (at most 64)")
        if not isinstance(value, dict):
            outer.fail(name, f"must be a table like [{label}.{name}] with {example}")
        sec = _Section(src, f"[{label}.{name}]", value)
        sec.check_keys(keys)
        yield name, sec


def _sites(src: str, table: Mapping[str, Any]) -> Mapping[str, SiteSection]:
    """[delivery.sites.NAME] tables: a receiver's MX host patterns and the limits its domains share."""
    default = DomainLimits()
    sites: dict[str, SiteSection] = {}
    for name, sec in _named_tables(src, "delivery.sites", table, ["mx", "max_connections", "max_per_minute"],
                                   'mx = ["*.example.net"]'):
        value = sec.table
        if not sec.has("mx"):
            sec.fail("mx", 'is required: the MX host names of this receiver, like ["*.google.com"]')
        patterns = tuple(normalise_domain(p) for p in _string_list(sec, "mx"))
        if not patterns or not all(_MX_PATTERN_RE.fullmatch(p) for p in patterns):
            sec.fail("mx", f"must be one or more host names or patterns like \"*.google.com\", got "
                           f"{_describe(value['mx'])}")
        read = _numbers(sec, DomainLimits, {"max_per_minute": UNLIMITED_IF_ZERO})
        sites[name] = SiteSection(name, patterns, read.get("max_connections", default.max_connections),
                                  read.get("max_per_minute", default.max_per_minute))
    return MappingProxyType(sites)


def _warmup_start(sec: _Section) -> float:
    value = sec.table["warmup_start"]
    if isinstance(value, datetime.datetime) or not isinstance(value, (datetime.date, str)):
        sec.fail("warmup_start", f"must be a date like 2026-12-01 (UTC day 1 of the warm-up), got {_describe(value)}")
    try:
        day = value if isinstance(value, datetime.date) else datetime.date.fromisoformat(value)
    except ValueError:
        sec.fail("warmup_start", f"must be a date like 2026-12-01, got {_describe(value)}")
    return datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.timezone.utc).timestamp()


def _source(src: str, label: str, value: Any) -> SourceAddress:
    if not isinstance(value, dict):
        raise ConfigError(src, label, f"must be a table with address, node and ehlo, got {_describe(value)}")
    sec = _Section(src, label, value)
    sec.check_keys(_field_names(SourceAddress))
    address = sec.required_text("address", "the IP address connections bind")
    ip = _ip(address)
    if ip is None:
        sec.fail("address", f"must be an IP address, got {_describe(address)}")
    node = sec.required_text("node", "the id of the node that has this address")
    ehlo_text = sec.required_text("ehlo", "the name sent in EHLO from this address (its reverse DNS name)")
    try:
        ehlo = _canonical_host(ehlo_text)
    except ValueError:
        sec.fail("ehlo", f"must be a host name, got {_describe(ehlo_text)}")
    weight = sec.integer("weight", _Rule(f"an {{kind}} from 1 to {MAX_SOURCE_WEIGHT}",
                                         lambda v: 1 <= v <= MAX_SOURCE_WEIGHT)) if sec.has("weight") else 1
    warmup: tuple[int, ...] = ()
    if sec.has("warmup"):
        caps = value["warmup"]
        if not isinstance(caps, list) or not 0 < len(caps) <= MAX_WARMUP_DAYS or not all(
                isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in caps):
            sec.fail("warmup", f"must be a list of 1 to {MAX_WARMUP_DAYS} positive daily caps like [50, 100, 500], "
                               f"got {_describe(caps)}")
        warmup = tuple(caps)
        if not sec.has("warmup_start"):
            sec.fail("warmup_start", "is required with warmup: the UTC date of warm-up day 1, like 2026-12-01")
    start = _warmup_start(sec) if sec.has("warmup_start") else 0.0
    return SourceAddress(str(ip), node, ehlo, weight, warmup, start)


def _pools(src: str, table: Mapping[str, Any]) -> Mapping[str, PoolSection]:
    """[delivery.pools.NAME] tables, each with [[delivery.pools.NAME.sources]]."""
    pools: dict[str, PoolSection] = {}
    seen: dict[str, str] = {}
    for name, sec in _named_tables(src, "delivery.pools", table, ["sources", "senders", "campaigns"],
                                   "[[delivery.pools.NAME.sources]]"):
        raw = sec.table.get("sources")
        if not isinstance(raw, list) or not raw:
            sec.fail("sources", f"needs at least one source: add [[delivery.pools.{name}.sources]] with address, "
                                "node and ehlo")
        sources = tuple(_source(src, f"[[delivery.pools.{name}.sources]] #{i + 1}", v) for i, v in enumerate(raw))
        for s in sources:
            if s.address in seen:
                sec.fail("sources", f"{s.address} is already a source of pool {seen[s.address]}; an address "
                                    "belongs to one pool (its warm-up is counted once)")
            seen[s.address] = name
        senders = tuple(_domain_key(sec, d) for d in _string_list(sec, "senders")) if sec.has("senders") else ()
        campaigns = tuple(_string_list(sec, "campaigns")) if sec.has("campaigns") else ()
        pools[name] = PoolSection(name, sources, senders, campaigns)
    return MappingProxyType(pools)


def _dns_servers(sec: _Section) -> tuple[Address, ...]:
    servers = []
    for text in _string_list(sec, "dns_servers"):
        try:
            address = Address.parse(text)
        except ValueError as exc:
            sec.fail("dns_servers", f"{exc}, got {_describe(text)}")
        if _ip(address.host) is None:
            sec.fail("dns_servers", f"must name resolvers by IP address, got {_describe(text)}")
        servers.append(address)
    return tuple(servers)


def _delivery_section(src: str, base_dir: Path, table: Mapping[str, Any]) -> DeliverySection:
    sec = _Section(src, "[delivery]", table)
    sec.check_keys(_field_names(DeliverySection))
    numbers = _numbers(
        sec,
        DeliverySection,
        {"retry_factor": AT_LEAST_ONE, "retry_jitter": FRACTION, "lease_expiry_margin": NON_NEGATIVE,
         "mx_port": _Rule("a port number from 1 to 65535", lambda v: 1 <= v <= 65535)},
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
    dkim = _dkim_entries(src, base_dir, table["dkim"]) if sec.has("dkim") else ()
    backoff_sec = _Section(src, "[delivery.backoff]", sec.subtable("backoff", "write [delivery.backoff] with its "
                                                                              "step_seconds, suspend_level, ... lines"))
    backoff_sec.check_keys(_field_names(BackoffSection))
    backoff = BackoffSection(**_numbers(backoff_sec, BackoffSection))
    pools = _pools(src, sec.subtable("pools", "write [delivery.pools.NAME] tables"))
    default_pool = sec.text("default_pool") if sec.has("default_pool") else None
    if default_pool is not None and default_pool not in pools:
        sec.fail("default_pool", f"names no [delivery.pools.{default_pool}] (pools: {', '.join(pools) or 'none'})")
    delivery = DeliverySection(
        sites=_sites(src, sec.subtable("sites", 'write [delivery.sites.NAME] with mx = ["*.example.net"]')),
        pools=pools,
        default_pool=default_pool,
        dns_servers=_dns_servers(sec) if sec.has("dns_servers") else (),
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
        backoff=backoff,
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


def _feedback_domain(sec: _Section, name: str) -> str:
    text = sec.text(name)
    domain = normalise_domain(text)
    if len(domain) > 253 or "." not in domain or not all(_LABEL_RE.fullmatch(label) for label in domain.split(".")):
        sec.fail(name, f"must be a domain name like bounces.example.com, got {_describe(text)}")
    return domain


def _feedback_section(src: str, table: Mapping[str, Any]) -> FeedbackSection:
    sec = _Section(src, "[feedback]", table)
    sec.check_keys(_field_names(FeedbackSection))
    keys: tuple[str, ...] = ()
    if sec.has("unsubscribe_secret"):
        value = table["unsubscribe_secret"]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(k, str) for k in value):
            sec.fail("unsubscribe_secret", 'must be a list of keys like ["<key>"] (the first makes tokens)')
        for key in value:
            if len(key.encode("utf-8")) < MIN_UNSUBSCRIBE_SECRET_BYTES:
                sec.fail("unsubscribe_secret", f"a key is {len(key.encode('utf-8'))} bytes, each needs at least "
                                               f"{MIN_UNSUBSCRIBE_SECRET_BYTES}: {UNSUBSCRIBE_SECRET_WHY}")
        if len(set(value)) != len(value):
            sec.fail("unsubscribe_secret", "lists a key twice")
        keys = tuple(value)
    feedback_id = sec.text("feedback_id") if sec.has("feedback_id") else None
    if feedback_id is not None and (not feedback_id.isascii() or not feedback_id.isprintable()
                                    or any(c.isspace() for c in feedback_id) or len(feedback_id) > 200):
        sec.fail("feedback_id", f"must be printable ASCII without spaces, at most 200 characters (it goes in a "
                                f"header), got {_describe(feedback_id)}")
    section = FeedbackSection(
        unsubscribe_secret=keys,
        unsubscribe_scope=_choice(sec, "unsubscribe_scope", UNSUBSCRIBE_SCOPES, FeedbackSection.unsubscribe_scope),
        unsubscribe_mailto=_feedback_domain(sec, "unsubscribe_mailto") if sec.has("unsubscribe_mailto") else None,
        bounce_domain=_feedback_domain(sec, "bounce_domain") if sec.has("bounce_domain") else None,
        feedback_id=feedback_id,
        **_numbers(sec, FeedbackSection),
    )
    return section


def _api_section(src: str, table: Mapping[str, Any]) -> ApiSection:
    sec = _Section(src, "[api]", table)
    sec.check_keys(_field_names(ApiSection))
    keys = _hashes(src, sec, "keys", 'write [api.keys] with name = "scrypt$..." lines (raftmail apikey NAME prints one)',
                   lambda name: None if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name)
                   else "a key name is 1-64 letters, digits, '-' or '_'")
    api = ApiSection(**_numbers(sec, ApiSection),
                     allow_networks=_allow_networks(sec) if sec.has("allow_networks") else _default_allow_networks(),
                     keys=keys)
    if api.recipients_per_submission > api.max_recipients:
        sec.fail("recipients_per_submission", f"({api.recipients_per_submission}) must be at most max_recipients "
                                              f"({api.max_recipients})")
    return api


# --------------------------------------------------------------------------------------------
# File level
# --------------------------------------------------------------------------------------------

_SECTIONS = ("cluster", "node", "raft", "intake", "delivery", "storage", "monitoring", "feedback", "api")


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
        feedback=_feedback_section(src, _top_level_table(src, document, "feedback")),
        api=_api_section(src, _top_level_table(src, document, "api")),
    )
    _check_cross_sections(src, config)
    return config

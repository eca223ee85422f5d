"""The cluster file's reader: its errors, value checks and the per-section key reader that every
section parser uses (config.py)."""
from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn


# Bytes, not characters: the secret feeds a key derivation, so its entropy is measured in bytes.
# `raftmail secret` prints 32 random bytes (43 characters).
MIN_SECRET_BYTES = 32
MIN_ADMIN_TOKEN_CHARS = 16
MIN_UNSUBSCRIBE_SECRET_BYTES = 32
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
    "it authenticates and encrypts Raft traffic and the body channel, so anyone who knows it can "
    "read every message body and take part in Raft"
)
UNSUBSCRIBE_SECRET_WHY = (
    "it authenticates the unsubscribe links and VERP bounce addresses; its own random keys, never "
    "the cluster secret (`raftmail secret` prints one)"
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

"""Checks of one field of a command as msgpack decoded it: each returns the value or raises
CommandRefused naming the field and what is wrong. Pure."""
from __future__ import annotations

import math
from typing import Any

Item = tuple[str, int]  # (submission id, recipient index)


class CommandRefused(Exception):
    """A command that is invalid: refused identically on every replica, state unchanged."""


def num(m: dict, key: str) -> float:
    """A finite number, kept as sent (an int stays an int: snapshots hold what was sent)."""
    v = m.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise CommandRefused(f"{key} must be a finite number")
    return v


def opt_num(m: dict, key: str) -> float | None:
    return num(m, key) if key in m else None


def count(m: dict, key: str) -> int:
    return int(num(m, key))


def opt_count(m: dict, key: str) -> int | None:
    return int(num(m, key)) if key in m else None


def string(m: dict, key: str) -> str:
    v = m.get(key)
    if not isinstance(v, str) or not v:
        raise CommandRefused(f"{key} must be a non-empty string")
    return v


def is_item(x: Any) -> bool:
    """[submission id, recipient index]; bool is not an index (it would not survive a snapshot)."""
    return isinstance(x, (list, tuple)) and len(x) >= 2 and isinstance(x[0], str) and type(x[1]) is int


def items_of(v: Any, what: str) -> tuple[Item, ...]:
    if not isinstance(v, list) or not all(is_item(i) for i in v):
        raise CommandRefused(f"{what} must be a list of [submission, index]")
    return tuple((i[0], i[1]) for i in v)

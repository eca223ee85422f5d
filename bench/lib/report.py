"""Rows of results and the markdown table they become (printed, and written to a file)."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Row:
    """One measured quantity: a sample per clean run, or why there are none."""

    key: str
    case: str
    title: str
    unit: str
    baselines: tuple[str, ...] = ()
    lower_is_better: bool = False
    samples: list[float] = field(default_factory=list)
    load: str = ""
    discarded: int = 0
    skipped: str | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None


def fmt_value(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "–"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def ratio_text(row: Row, rows: dict[str, Row]) -> str:
    """'0.42× intake-baseline; 0.71× intake-postfix' against baselines measured in this run."""
    if row.median is None:
        return ""
    if not row.baselines:
        return "–"
    parts = []
    for key in row.baselines:
        base = rows.get(key)
        if base is None or not base.median:
            parts.append(f"{key} not measured")
        else:
            parts.append(f"{row.median / base.median:.2f}× {key}")
    return "; ".join(parts)


def runs_text(row: Row) -> str:
    text = str(len(row.samples))
    return f"{text} (+{row.discarded} discarded)" if row.discarded else text


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_table(rows: list[Row]) -> str:
    by_key = {row.key: row for row in rows}
    lines = ["| row | what | unit | median | min | max | runs | ratio to baseline (same run) | load |",
             "|---|---|---|---:|---:|---:|---:|---|---|"]
    for row in rows:
        if row.skipped or (row.error and not row.samples):
            status = f"skipped: {row.skipped}" if row.skipped else f"error: {row.error}"
            lines.append(f"| {row.key} | {_escape(row.title)} | {row.unit} | – | – | – | 0 | "
                         f"{_escape(status)} | {row.load} |")
            continue
        lowest = min(row.samples) if row.samples else None
        highest = max(row.samples) if row.samples else None
        ratio = ratio_text(row, by_key)
        if row.error:
            ratio = f"{ratio}; error in a later run: {row.error}"
        lines.append(
            f"| {row.key} | {_escape(row.title)} | {row.unit} | {fmt_value(row.median)} | "
            f"{fmt_value(lowest)} | {fmt_value(highest)} | {runs_text(row)} | {_escape(ratio)} | "
            f"{row.load} |")
    return "\n".join(lines)


def render_notes(rows: list[Row]) -> str:
    lines = []
    for row in rows:
        for note in row.notes:
            lines.append(f"- {row.key}: {note}")
    return "\n".join(lines)


def render(title: str, header: list[str], rows: list[Row], footer: list[str] = ()) -> str:
    parts = [f"# {title}", "", *[f"- {line}" for line in header], "", render_table(rows)]
    notes = render_notes(rows)
    if notes:
        parts += ["", "Notes:", "", notes]
    if footer:
        parts += ["", *footer]
    return "\n".join(parts) + "\n"


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def rows_json(rows: list[Row], header: dict) -> str:
    return json.dumps({"header": header, "rows": [asdict(row) | {"median": row.median} for row in rows]},
                      indent=1)


UNCOMMITTED = " + uncommitted changes"


def describe_tree() -> str:
    """The commit a result was measured on, marked when the tree had uncommitted changes."""
    repo = str(Path(__file__).resolve().parents[2])

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (UNCOMMITTED if git("status", "--porcelain") else "")

"""Runs a case several times: waits for a quiet machine (full mode), discards runs that others
disturbed, keeps one sample per clean run, and turns failures into table rows, never crashes."""

from __future__ import annotations

import sys
import time
import traceback

from .cases import HEAVY_CASE_RUNS, Case, Ctx, Measurement
from .cpu import OthersMeter
from .peers import find_tool
from .postfix import available as postfix_unavailable
from .cluster import raftmail_available
from .procs import BenchError
from .report import Row

MAX_DISCARDS_PER_RUN = 1  # a case may repeat as many runs as it keeps when others disturbed them


def missing_capability(ctx: Ctx, need: str, cache: dict[str, str | None]) -> str | None:
    """Why `need` is not available here (None when it is); asked once per invocation."""
    if need not in cache:
        if need == "smtp-sink":
            cache[need] = None if find_tool("smtp-sink") else \
                "smtp-sink is not installed: run `sudo bench/install-peers.sh`"
        elif need == "postfix":
            cache[need] = postfix_unavailable()
        elif need == "raftmail":
            why = raftmail_available(ctx.python, ctx.node_command)
            cache[need] = f"raftmail nodes cannot start: {why}" if why else None
        else:
            raise ValueError(f"unknown capability {need}")
    return cache[need]


def make_rows(case: Case, ctx: Ctx) -> list[Row]:
    rows = []
    for spec in case.rows:
        load = "python (timed)" if spec.timed_load else ctx.generator
        row = Row(spec.key, case.id, spec.title, spec.unit, spec.baselines, spec.lower_is_better, load=load)
        ctx.rows[spec.key] = row
        rows.append(row)
    return rows


def collapse_notes(per_run: list[list[str]]) -> list[str]:
    """The notes of all runs: once if every run said the same, else prefixed by run number."""
    distinct = {tuple(notes) for notes in per_run}
    if len(distinct) <= 1:
        return list(per_run[0]) if per_run else []
    return [f"run {i + 1}: {note}" for i, notes in enumerate(per_run) for note in notes]


def run_case(case: Case, ctx: Ctx, capabilities: dict[str, str | None]) -> list[Row]:
    rows = make_rows(case, ctx)
    for need in case.needs:
        why = missing_capability(ctx, need, capabilities)
        if why:
            for row in rows:
                row.skipped = why
            ctx.progress(f"[{case.id}] skipped: {why}")
            return rows
    wanted = min(ctx.runs, HEAVY_CASE_RUNS) if case.heavy and not ctx.quick else ctx.runs
    if case.full_runs is not None and not ctx.quick:
        wanted = case.full_runs
    discards_left = wanted * MAX_DISCARDS_PER_RUN
    clean = 0
    disturbed_kept = 0
    per_run_notes: list[list[str]] = []
    busy_starts: list[float] = []  # others' usage when a run started without the machine going quiet
    while clean < wanted:
        ctx.run_index = clean
        ctx.run_notes = []
        idle, usage = ctx.idle.wait_for_idle()
        if not idle:
            busy_starts.append(usage)
        meter = OthersMeter()
        meter.start()
        started = time.monotonic()
        try:
            measurement: Measurement = case.measure(ctx)
        except BenchError as exc:
            _fail(rows, str(exc), ctx, case)
            break
        except Exception as exc:  # a harness bug: keep going with the other cases, show where
            traceback.print_exc(file=sys.stderr)
            _fail(rows, f"{type(exc).__name__}: {exc}", ctx, case)
            break
        others = meter.stop()
        seconds = time.monotonic() - started
        if ctx.idle.noisy(others):
            if discards_left > 0:
                discards_left -= 1
                for row in rows:
                    row.discarded += 1
                ctx.progress(f"[{case.id}] run discarded: other processes used {others:.2f} cores")
                continue
            disturbed_kept += 1
        clean += 1
        per_run_notes.append(measurement.notes + ctx.run_notes)
        for row in rows:
            if row.key in measurement.values:
                row.samples.append(measurement.values[row.key])
        shown = ", ".join(f"{k}={v:.4g}" for k, v in measurement.values.items())
        ctx.progress(f"[{case.id}] run {clean}/{wanted} ({seconds:.1f} s, others {others:.2f} cores): {shown}")
    busy_notes = []
    if busy_starts:
        busy_notes.append(f"the machine did not become quiet within {ctx.idle.max_wait:g} s before "
                          f"{len(busy_starts)} run(s) (others used up to {max(busy_starts):.2f} cores); "
                          "they ran anyway")
    if disturbed_kept:
        busy_notes.append(f"{disturbed_kept} kept run(s) were disturbed by other processes "
                          f"(> {ctx.idle.noisy_threshold:.2f} cores) after the discard budget ran out")
    notes = collapse_notes(per_run_notes) + busy_notes
    for row in rows:
        row.notes = list(notes) if row is rows[0] else []
    return rows


def _fail(rows: list[Row], error: str, ctx: Ctx, case: Case) -> None:
    for row in rows:
        row.error = error
    ctx.progress(f"[{case.id}] error: {error}")

"""`raftmail suppress`: the replicated suppression list (add, remove, list, import, export)."""
from __future__ import annotations

import csv
import json
import sys
import time
import urllib.error
from pathlib import Path
from typing import Any, Iterator

import click

from raftmail.cli.common import config_option, load_or_exit
from raftmail.node.config import Config

IMPORT_BATCH = 1000  # rows per committed command: about 60 KB, one Raft entry
MAX_IMPORT_BATCH = 5000  # the state machine's bound on one command
BATCH_TRIES = 20  # a batch is retried on the next node this many times (no quorum, a leader change)


def _post(config: Config, path: str, body: dict, timeout: float = 30.0) -> tuple[int, Any]:
    """POST to the nodes in turn until one answers other than "unreachable" or "not committed"."""
    from raftmail.node.client import post_json
    status, answer = 0, {"error": "no node answered"}
    for n in config.nodes:
        status, answer = post_json(str(n.admin), path, body, config.cluster.admin_token, timeout)
        if status not in (0, 503):
            break
    return status, answer


def _get(config: Config, path: str, timeout: float = 30.0) -> Any:
    from raftmail.node.client import get_json, read_token
    last = "no node answered"
    for n in config.nodes:
        try:
            return get_json(str(n.admin), path, timeout, read_token(config))
        except urllib.error.HTTPError as e:
            last = f"{n.id}: HTTP {e.code}"
            if e.code in (400, 401, 403):
                break
        except (OSError, ValueError) as e:
            last = f"{n.id}: {getattr(e, 'reason', e)}"
    click.echo(f"error: {last}", err=True)
    sys.exit(1)


def _done(status: int, answer: Any, as_json: bool, message: str) -> None:
    if status == 200:
        click.echo(json.dumps(answer) if as_json else message)
        return
    click.echo(f"error: {answer.get('error', status) if isinstance(answer, dict) else status}", err=True)
    sys.exit(1)


@click.group()
def suppress() -> None:
    """The suppression list: addresses the cluster never sends to (for one From: domain with
    --scope, else for everything). Bounces, complaints and unsubscribes add to it by themselves."""


@suppress.command()
@click.argument("address")
@config_option
@click.option("--scope", default="", help="Only for mail from this From: domain (default: everything).")
@click.option("--reason", default="operator", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def add(address: str, config_path: str, scope: str, reason: str, as_json: bool) -> None:
    """Suppress ADDRESS (committed before this returns)."""
    config = load_or_exit(config_path)
    status, answer = _post(config, "/suppressions", {"address": address, "scope": scope, "reason": reason})
    _done(status, answer, as_json, f"{address}: suppressed" + ("" if answer.get("new", True) else " already"))


@suppress.command()
@click.argument("address")
@config_option
@click.option("--scope", default="", help="The From: domain of the entry to remove (default: the global one).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def remove(address: str, config_path: str, scope: str, as_json: bool) -> None:
    """Send to ADDRESS again."""
    config = load_or_exit(config_path)
    status, answer = _post(config, "/suppressions/remove", {"address": address, "scope": scope})
    _done(status, answer, as_json, f"{address}: no longer suppressed")


def _print_entries(entries: list[dict]) -> None:
    for e in entries:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["at"]))
        click.echo(f"{e['address']}\t{e['scope'] or '*'}\t{e['source']}\t{at}Z\t{e['reason']}")


@suppress.command(name="list")
@config_option
@click.option("--address", default=None, help="Every entry of this address.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 10000))
@click.option("--offset", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_(config_path: str, address: str | None, limit: int, offset: int, as_json: bool) -> None:
    """Entries, oldest first: address, scope (* = everything), source, time (UTC), reason."""
    from urllib.parse import urlencode
    config = load_or_exit(config_path)
    query = {"address": address} if address is not None else {"limit": limit, "offset": offset}
    answer = _get(config, f"/suppressions?{urlencode(query)}")
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    _print_entries(answer["entries"])
    if "total" in answer:
        click.echo(f"({len(answer['entries'])} of {answer['total']} shown)", err=True)


@suppress.command()
@config_option
@click.option("--out", "out", type=click.Path(dir_okay=False), default="-", show_default=True,
              help="Where to write the CSV (address,scope,source,at,reason); - for standard output.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line instead of CSV.")
def export(config_path: str, out: str, as_json: bool) -> None:
    """Every entry, as CSV that `suppress import` reads back."""
    from raftmail.node.client import read_token
    import urllib.request
    config = load_or_exit(config_path)
    token = read_token(config)
    last = "no node answered"
    for n in config.nodes:
        req = urllib.request.Request(f"http://{n.admin}/suppressions/export",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                _write_export(r, out, as_json)
                return
        except (OSError, ValueError) as e:
            last = f"{n.id}: {getattr(e, 'reason', e)}"
    click.echo(f"error: {last}", err=True)
    sys.exit(1)


def _write_export(lines: Any, out: str, as_json: bool) -> None:
    handle = sys.stdout if out == "-" else open(out + ".partial", "w", newline="")
    n = 0
    try:
        writer = csv.writer(handle)
        if not as_json:
            writer.writerow(["address", "scope", "source", "at", "reason"])
        for raw in lines:
            e = json.loads(raw)
            if as_json:
                handle.write(json.dumps(e) + "\n")
            else:
                writer.writerow([e["address"], e["scope"], e["source"], f"{e['at']:.3f}", e["reason"]])
            n += 1
    finally:
        if handle is not sys.stdout:
            handle.close()
    if out != "-":
        Path(out + ".partial").replace(out)  # a cut-off export never passes for a whole one
    click.echo(f"{n} entries exported", err=True)


def _rows(path: str) -> Iterator[list[str]]:
    """address[,scope[,reason]] per row; a header row naming "address" first is skipped; the
    columns of `suppress export` are read too (scope second, reason last)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        exported = False
        if header is not None:
            if header and header[0].strip().lower() == "address":
                exported = len(header) >= 5 and header[4].strip().lower() == "reason"
            else:
                yield header
        for row in reader:
            if exported and len(row) >= 5:
                row = [row[0], row[1], row[4]]
            yield row


@suppress.command(name="import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@config_option
@click.option("--batch", default=IMPORT_BATCH, show_default=True, type=click.IntRange(1, MAX_IMPORT_BATCH),
              help="Rows per committed command.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary (progress stays on stderr).")
def import_(file: str, config_path: str, batch: int, as_json: bool) -> None:
    """Add every address of a CSV file (address[,scope[,reason]]), in bounded batches, each committed
    before the next is sent; progress on stderr. Running it again adds nothing twice."""
    config = load_or_exit(config_path)
    totals = {"rows": 0, "added": 0, "already": 0, "invalid": 0}
    started = time.monotonic()
    last_report = 0.0

    def send(rows: list[list[str]]) -> None:
        for attempt in range(BATCH_TRIES):
            status, answer = _post(config, "/suppressions/import", {"entries": rows})
            if status == 200:
                for k in ("added", "already", "invalid"):
                    totals[k] += answer[k]
                return
            if status in (400, 401, 403):
                break
            time.sleep(min(2.0, 0.2 * (attempt + 1)))
        click.echo(f"error: batch at row {totals['rows'] - len(rows) + 1} not committed: "
                   f"{answer.get('error', status) if isinstance(answer, dict) else status}; "
                   f"{totals['added']} added before it (run the import again: nothing is added twice)", err=True)
        sys.exit(1)

    pending: list[list[str]] = []
    for row in _rows(file):
        cells = [c.strip() for c in row] + ["", ""]
        if not cells[0]:
            continue
        pending.append([cells[0], cells[1].lower(), cells[2]])
        totals["rows"] += 1
        if len(pending) >= batch:
            send(pending)
            pending = []
            if time.monotonic() - last_report >= 1.0:
                last_report = time.monotonic()
                click.echo(f"imported {totals['rows']} rows ({totals['added']} new) in "
                           f"{time.monotonic() - started:.1f}s", err=True)
    if pending:
        send(pending)
    totals["seconds"] = round(time.monotonic() - started, 2)
    click.echo(json.dumps(totals) if as_json else
               f"{totals['rows']} rows: {totals['added']} added, {totals['already']} already suppressed, "
               f"{totals['invalid']} invalid, in {totals['seconds']}s")


COMMANDS = [suppress]

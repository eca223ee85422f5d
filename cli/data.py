"""The cluster's data: online backup, restore into a new cluster, forced recovery."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from raftmail.cli.common import config_option, load_or_exit, node_or_exit



@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="The cluster file (TOML).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="The backup file to write.")
@click.option("--verify", "verify_path", type=click.Path(dir_okay=False, exists=True),
              help="Check a backup file's manifest and every digest (no cluster needed).")
def backup(config_path: str | None, out_path: str | None, verify_path: str | None) -> None:
    """Online backup of a live cluster (--config F --out FILE), or check a backup file (--verify FILE)."""
    from raftmail.node.backup import BackupError, fetch_backup, read_backup
    try:
        if verify_path:
            m = read_backup(Path(verify_path))
            click.echo(f"ok: {verify_path}: cluster {m['cluster']}, index {m['index']}, term {m['term']}, "
                       f"{len(m['parts']) - 1} bodies, counts {json.dumps(m['counts'])}")
            return
        if not config_path or not out_path:
            click.echo("error: give --config and --out, or --verify FILE", err=True)
            sys.exit(2)
        config = load_or_exit(config_path)
        started = time.monotonic()
        m = fetch_backup(config, Path(out_path), lambda s: click.echo(s, err=True))
    except BackupError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    size = Path(out_path).stat().st_size
    click.echo(f"wrote {out_path}: {size} bytes in {time.monotonic() - started:.2f} s; cluster {m['cluster']}, "
               f"index {m['index']}, term {m['term']}, {len(m['parts']) - 1} bodies, counts {json.dumps(m['counts'])}")


@click.command()
@config_option
@click.option("--from", "from_path", required=True, type=click.Path(dir_okay=False, exists=True),
              help="The backup file.")
def restore(config_path: str, from_path: str) -> None:
    """Seed the (empty) data dirs of a new cluster from a backup file; then start its nodes."""
    from raftmail.node.backup import BackupError
    from raftmail.node.backup import restore as seed
    config = load_or_exit(config_path)
    try:
        out = seed(config, Path(from_path), time.time(), lambda s: click.echo(s, err=True))
    except (BackupError, ValueError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    click.echo(f"restored {len(config.nodes)} data dirs from cluster {out['manifest']['cluster']} "
               f"index {out['manifest']['index']}: {out['bodies']} bodies, counts {json.dumps(out['counts'])}, "
               f"{out['returned']} recipients returned from batches in flight")


@click.command()
@config_option
@click.option("--node", "node_id", required=True, help="The surviving node (stopped).")
@click.option("--force-new-cluster", is_flag=True, help="Required: make it a one-member cluster.")
@click.option("--yes", is_flag=True, help="Do not ask for the typed confirmation.")
def recover(config_path: str, node_id: str, force_new_cluster: bool, yes: bool) -> None:
    """When a majority of the members is lost for good: restart one surviving node as a one-member
    cluster from its own data, then join new nodes as usual. Refused while a majority answers."""
    import pickle

    from raftmail.node.recovery import RecoveryRefused, check_recoverable, force_new_cluster as force, plan
    config = load_or_exit(config_path)
    node_or_exit(config, node_id)
    if not force_new_cluster:
        click.echo("error: recover needs --force-new-cluster (it forgets every other member)", err=True)
        sys.exit(2)
    try:
        p = plan(config, node_id)
        check_recoverable(config, node_id, {node_id: {}, **p.lost})
    except (RecoveryRefused, RuntimeError, ValueError, pickle.UnpicklingError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    q = p.state.queue_counts()
    click.echo(f"{node_id} holds the log up to entry {p.last_index} (snapshot {p.snapshot_index}); the last entry "
               f"it knew committed is {p.commit_index}.\n"
               f"May be lost: whatever the lost members committed after entry {p.commit_index} and this node "
               f"never received. {p.forced_entries} entries after it are committed now (their clients were "
               f"told to retry with the same Message-ID; retries are de-duplicated).\n"
               f"It holds {q['pending']} pending, {q['deferred']} deferred and {q['in_flight']} in-flight recipients "
               f"({len(p.state.batches)} batches; in-flight ones go back to the queue, counted as possibly sent).\n"
               f"Members removed for good: {', '.join(sorted(p.lost)) or 'none'}.")
    if not yes:
        typed = click.prompt(f"type the node id ({node_id}) to make it a one-member cluster", default="",
                             show_default=False)
        if typed.strip() != node_id:
            click.echo("not confirmed; nothing was changed", err=True)
            sys.exit(1)
    out = force(config, p, time.time())
    click.echo(f"{node_id} is now a one-member cluster (queue {json.dumps(out['queue'])}; {out['returned']} "
               f"recipients returned from batches). The old Raft directory is kept as {out['kept']}.\n"
               f"Next: raftmail start --config {config_path} --node {node_id}; then, for each new node listed in "
               f"the file: raftmail join --config {config_path} --node ID, and start it. Never start a lost "
               f"member again with its old data.")


COMMANDS = [backup, restore, recover]

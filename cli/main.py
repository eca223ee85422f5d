"""`raftmail`: thin click commands over raftmail.node. This module has the group and the commands
that run processes (a node, a local cluster, the capture sink); the others are grouped by task."""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from raftmail.cli.common import config_option, load_or_exit
from raftmail.node.config import Address, ConfigError
from raftmail.node.logs import setup_logging


@click.group()
@click.version_option(package_name="raftmail")
def main() -> None:
    """raftmail: bulk email that is never lost when a server dies."""


@main.command()
@config_option
@click.option("--node", "node_id", required=True, help="Which [[node]] of the file this process is.")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-format", default="text", type=click.Choice(["text", "json"]))
def start(config_path: str, node_id: str, log_level: str, log_format: str) -> None:
    """Run one node in the foreground."""
    config = load_or_exit(config_path)
    try:
        config.node(node_id)
    except ConfigError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    setup_logging(log_level, log_format, node_id)
    from raftmail.consensus.pysyncobj_compat import PysyncobjMismatch
    from raftmail.node.smtp_server import AiosmtpdMismatch
    from raftmail.node.runtime import run_node
    try:
        run_node(config, node_id)
    except (ConfigError, AiosmtpdMismatch, PysyncobjMismatch) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except OSError as e:
        click.echo(f"error: node {node_id} cannot start: {e}", err=True)
        sys.exit(1)
    except Exception as e:
        if type(e).__name__ == "SyncObjException" and "BindError" in str(e):
            click.echo(f"error: node {node_id}: raft address {config.node(node_id).raft} is in use "
                       "or not local", err=True)
            sys.exit(1)
        raise


def _is_local(host: str) -> bool:
    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        pass
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


@main.command()
@config_option
@click.option("--with-sink/--no-sink", default=False,
              help="Also run the capture sink on the [delivery] relay address (quick start).")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
def up(config_path: str, with_sink: bool, log_level: str) -> None:
    """Start every node of the file whose addresses are local, as child processes, in the
    foreground. Ctrl-C or SIGTERM stops them all."""
    config = load_or_exit(config_path)
    local = [n for n in config.nodes if _is_local(n.raft.host)]
    if not local:
        click.echo(f"error: {config_path}: no [[node]] has a local raft address", err=True)
        sys.exit(2)
    children: dict[str, subprocess.Popen] = {}
    if with_sink:
        relay = config.delivery.relay
        if relay is None or not _is_local(relay.host):
            click.echo(f"error: {config_path}: --with-sink needs [delivery] relay on a local address", err=True)
            sys.exit(2)
        maildir = config.cluster.data_dir / "sink"
        children["sink"] = subprocess.Popen([sys.executable, "-m", "raftmail.cli", "sink", "--listen",
                                             str(relay), "--maildir", str(maildir)])
    for n in local:
        children[n.id] = subprocess.Popen([sys.executable, "-m", "raftmail.cli", "start", "--config",
                                           str(config.path), "--node", n.id, "--log-level", log_level])
    stopping = False

    def stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    click.echo(f"started {', '.join(children)}; Ctrl-C stops them. "
               f"Status: raftmail status --config {config_path}", err=True)
    exited: set[str] = set()
    while not stopping and len(exited) < len(children):
        time.sleep(0.2)
        for name, p in children.items():
            if name not in exited and p.poll() is not None:
                exited.add(name)
                click.echo(f"{name} exited with status {p.returncode}", err=True)
    for p in children.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for name, p in children.items():
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            click.echo(f"{name} did not stop in time; killing it", err=True)
            p.kill()
            p.wait()
    sys.exit(0 if stopping else 1)


@main.command()
@click.option("--listen", default="127.0.0.1:2600", show_default=True, help="host:port to listen on.")
@click.option("--maildir", required=True, type=click.Path(file_okay=False), help="Where messages are stored.")
@click.option("--reply", "replies", multiple=True, metavar="ADDRESS=CODE TEXT[*N]",
              help="Answer ADDRESS (or *) with CODE TEXT, optionally only the first N times.")
@click.option("--delay", default=0.0, show_default=True, type=click.FloatRange(min=0.0), metavar="SECONDS",
              help="Wait this long before accepting each message (a slow receiver).")
@click.option("--after-data", type=click.Choice(["reply", "hang", "drop"]), default="reply", show_default=True,
              help="After a message's final dot: reply 250, store it and never reply (hang), or store it "
                   "and close the connection unanswered (drop).")
@click.option("--after-data-times", default=0, show_default=True, type=click.IntRange(min=0), metavar="N",
              help="Apply --after-data to the first N messages only (0: every message).")
@click.option("--unavailable-for", default=0.0, show_default=True, type=click.FloatRange(min=0.0),
              metavar="SECONDS", help="Answer every connection 421 for this long after start.")
@click.option("--8bitmime/--no-8bitmime", "eight_bit_mime", default=True, show_default=True,
              help="Offer 8BITMIME in the EHLO reply (without it, stored 8-bit messages are logged as such).")
def sink(listen: str, maildir: str, replies: tuple[str, ...], delay: float, after_data: str,
         after_data_times: int, unavailable_for: float, eight_bit_mime: bool) -> None:
    """A capture sink: an SMTP server that stores what it receives (one file per recipient)."""
    from raftmail.node.sink import parse_reply_rule, run_sink
    try:
        addr = Address.parse(listen)
        rules = [parse_reply_rule(r) for r in replies]
    except ValueError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    logging.basicConfig(level=logging.WARNING)
    try:
        asyncio.run(run_sink(addr.host, addr.port, Path(maildir), rules, delay=delay, after_data=after_data,
                             after_data_times=after_data_times, unavailable_for=unavailable_for,
                             eight_bit_mime=eight_bit_mime))
    except OSError as e:
        click.echo(f"error: sink cannot listen on {listen}: {e.strerror}", err=True)
        sys.exit(1)


# ------------------------------------------------------------------ cluster views


def _register() -> None:
    from raftmail.cli import data, inject, keys, operate, suppress
    for module in (operate, data, keys, suppress, inject):
        for command in module.COMMANDS:
            main.add_command(command)


_register()

if __name__ == "__main__":
    main()

"""`raftmail`: thin click commands over raftmail.node."""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from raftmail.node.config import Address, Config, ConfigError, load_config

config_option = click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
                             help="The cluster file (TOML).")


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


def _setup_logging(level: str, fmt: str, node_id: str | None = None) -> None:
    from raftmail.node.logs import setup_logging
    setup_logging(level, fmt, node_id)


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
    config = _load(config_path)
    try:
        config.node(node_id)
    except ConfigError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    _setup_logging(log_level, log_format, node_id)
    from raftmail.node.intake import AiosmtpdMismatch
    from raftmail.node.runtime import run_node
    try:
        run_node(config, node_id)
    except (ConfigError, AiosmtpdMismatch) as e:
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
    config = _load(config_path)
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
def sink(listen: str, maildir: str, replies: tuple[str, ...], delay: float, after_data: str,
         after_data_times: int, unavailable_for: float) -> None:
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
                             after_data_times=after_data_times, unavailable_for=unavailable_for))
    except OSError as e:
        click.echo(f"error: sink cannot listen on {listen}: {e.strerror}", err=True)
        sys.exit(1)


# ------------------------------------------------------------------ cluster views

def _fetch_all(config: Config, path: str, timeout: float = 2.0) -> dict[str, Any]:
    from raftmail.node.client import get_json_all, read_token
    return get_json_all([(n.id, str(n.admin)) for n in config.nodes], path, timeout, read_token(config))


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--watch", is_flag=True, help="A live view, redrawn every second, until Ctrl-C.")
def status(config_path: str, as_json: bool, watch: bool) -> None:
    """The whole cluster: nodes, roles, indexes, lag, leader, fault tolerance, queue.
    Exit status 0 when a leader and a quorum are reachable, 1 otherwise."""
    from raftmail.node.client import cluster_status
    config = _load(config_path)
    if watch:
        _watch(config)
        return
    view = cluster_status(config, _fetch_all(config, "/status"))
    if as_json:
        click.echo(json.dumps(view, indent=2, sort_keys=True))
    else:
        from raftmail.cli.render import print_status
        print_status(view)
    sys.exit(0 if view["healthy"] else 1)


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def campaigns(config_path: str, as_json: bool) -> None:
    """Campaigns with counts per state and percent done."""
    from raftmail.node.client import first_answer
    config = _load(config_path)
    answers = _fetch_all(config, "/campaigns")
    answer = first_answer(answers)
    if answer is None:
        why = "; ".join(f"{nid}: {a.get('error')}" for nid, a in answers.items() if isinstance(a, dict))
        click.echo(f"error: no node answered ({why})", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(answer, indent=2, sort_keys=True))
    else:
        from raftmail.cli.render import print_campaigns
        print_campaigns(answer["campaigns"])


def _campaign_action(action: str, config_path: str, campaign_id: str) -> None:
    from raftmail.node.client import post_campaign_action
    config = _load(config_path)
    ok, message = post_campaign_action(config, campaign_id, action)
    click.echo(message, err=not ok)
    sys.exit(0 if ok else 1)


@main.command()
@click.argument("campaign_id")
@config_option
def pause(campaign_id: str, config_path: str) -> None:
    """Stop assigning a campaign's recipients (batches in flight finish)."""
    _campaign_action("pause", config_path, campaign_id)


@main.command()
@click.argument("campaign_id")
@config_option
def resume(campaign_id: str, config_path: str) -> None:
    """Continue a paused campaign with what is still pending (nothing is sent twice)."""
    _campaign_action("resume", config_path, campaign_id)


@main.command()
@click.argument("campaign_id")
@config_option
def cancel(campaign_id: str, config_path: str) -> None:
    """Mark every recipient of the campaign that is not yet sent as cancelled."""
    _campaign_action("cancel", config_path, campaign_id)


@main.command()
@config_option
@click.option("--node", "node_id", required=True, help="The [[node]] of the file to add.")
def join(config_path: str, node_id: str) -> None:
    """Add a node (already listed in the file) to the running cluster. Then start it there with
    `raftmail start`; it catches up from the leader and takes batches."""
    from raftmail.node.client import membership_change
    config = _load(config_path)
    ok, message = membership_change(config, _node_or_exit(config, node_id).id, "join")
    click.echo(message, err=not ok)
    if ok:
        click.echo(f"now start it: raftmail start --config {config_path} --node {node_id}")
    sys.exit(0 if ok else 1)


@main.command()
@config_option
@click.option("--node", "node_id", required=True, help="The member to remove.")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for its batches to move.")
def leave(config_path: str, node_id: str, timeout: float) -> None:
    """Remove a node cleanly: it gets no new batches, its batches finish or move, then it leaves
    the Raft membership and stops itself. Remove it from the file afterwards."""
    from raftmail.node.client import membership_change
    config = _load(config_path)
    ok, message = membership_change(config, _node_or_exit(config, node_id).id, "leave", timeout)
    click.echo(message, err=not ok)
    sys.exit(0 if ok else 1)


@main.command()
@config_option
@click.option("--timeout", default=30.0, show_default=True, help="Seconds before the drill fails.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def drill(config_path: str, timeout: float, as_json: bool) -> None:
    """A failover drill: the leader steps down; time the election, the first committed write after
    it, and every node catching up."""
    from raftmail.node.client import run_drill
    config = _load(config_path)
    result = run_drill(config, timeout)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    elif result["ok"]:
        click.echo(f"drill passed: leader {result['old_leader']} stepped down; {result['new_leader']} elected "
                   f"in {result['elected_seconds']:.2f}s; accepting writes after {result['accepting_seconds']:.2f}s; "
                   f"every node caught up after {result['caught_up_seconds']:.2f}s")
    else:
        click.echo(f"drill FAILED: {result.get('error') or result}", err=True)
    sys.exit(0 if result["ok"] else 1)


def _node_or_exit(config: Config, node_id: str):
    try:
        return config.node(node_id)
    except ConfigError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


# ------------------------------------------------------------------ outcome events and the live view

EVENTS_PAGE = 1000  # events asked per request
EVENTS_POLL = 0.5  # seconds between polls once caught up (--follow)


class EventFollower:
    """Follows the cluster's outcome events (GET /events) by seq, from any node: a seq is never
    returned twice, a node that stops answering is replaced by the next one, and a gap (events
    that left the replicated ring before they were read) is reported, never hidden."""

    def __init__(self, nodes: list[tuple[str, str]], campaign: str | None = None, after: int = 0,
                 limit: int = EVENTS_PAGE, timeout: float = 2.0, token: str | None = None) -> None:
        self.nodes = nodes
        self.token = token
        self.campaign = campaign
        self.seq = after
        self.limit = limit
        self.timeout = timeout
        self.at = 0  # index of the node asked first
        self.answering: str | None = None  # the node that answered last
        self.silent = False  # no node answered the last poll (said once, not every poll)

    def poll(self) -> tuple[list[dict] | None, bool, list[str]]:
        """(new events or None when no node answered, whether more are waiting, notes for stderr)."""
        from urllib.parse import urlencode
        from raftmail.node.client import get_json
        query = {"after": self.seq, "limit": self.limit, **({"campaign": self.campaign} if self.campaign else {})}
        notes, failed = [], []
        for _ in range(len(self.nodes)):
            nid, admin = self.nodes[self.at]
            try:
                answer = get_json(admin, f"/events?{urlencode(query)}", self.timeout, self.token)
            except (OSError, ValueError) as e:
                failed.append(f"{nid}: {getattr(e, 'reason', e)}")
                self.at = (self.at + 1) % len(self.nodes)
                continue
            if self.answering != nid or self.silent:
                if self.answering is not None or failed:
                    notes.append(f"reading events from {nid}" + (f" ({'; '.join(failed)})" if failed else ""))
                self.answering, self.silent = nid, False
            return self._take(answer, notes), len(answer["events"]) >= self.limit, notes
        if not self.silent:
            notes.append(f"no node answered ({'; '.join(failed)})")
            self.silent = True
        return None, False, notes

    def _take(self, answer: dict, notes: list[str]) -> list[dict]:
        oldest = answer["oldest"]
        if self.seq + 1 < oldest:
            notes.append(f"gap: events {self.seq + 1}..{oldest - 1} left the replicated ring before they "
                         f"were read; continuing from {oldest}")
            self.seq = oldest - 1
        fresh = [e for e in answer["events"] if e["seq"] > self.seq]
        if fresh:
            self.seq = fresh[-1]["seq"]
        return fresh


def _node_order(config: Config, first: str | None) -> list[tuple[str, str]]:
    nodes = [(n.id, str(n.admin)) for n in config.nodes]
    return sorted(nodes, key=lambda n: n[0] != first)


@main.command()
@config_option
@click.option("--campaign", "campaign_id", default=None, help="Only this campaign's events.")
@click.option("--follow", is_flag=True, help="Keep printing new events as they commit, until Ctrl-C.")
@click.option("--after", default=0, show_default=True, type=click.IntRange(min=0),
              help="Start after this event seq (the last one you have).")
@click.option("--node", "node_id", default=None, help="Ask this node first (any node answers).")
def events(config_path: str, campaign_id: str | None, follow: bool, after: int, node_id: str | None) -> None:
    """Recipient outcomes (delivered, deferred, bounced, suppressed, expired, cancelled) for the
    whole cluster, one JSON line each, in commit order, each seq once."""
    config = _load(config_path)
    if node_id is not None:
        _node_or_exit(config, node_id)
    from raftmail.node.client import read_token
    follower = EventFollower(_node_order(config, node_id), campaign_id, after, token=read_token(config))
    answered = False
    try:
        while True:
            page, more, notes = follower.poll()
            for note in notes:
                click.echo(note, err=True)
            if page is not None:
                answered = True
                for e in page:
                    sys.stdout.write(json.dumps(e) + "\n")
                sys.stdout.flush()
            if more:
                continue
            if not follow:
                break
            time.sleep(EVENTS_POLL)
    except KeyboardInterrupt:
        pass
    if not answered and not follow:
        click.echo("error: no node answered", err=True)
        sys.exit(1)


def _readiness(config: Config) -> dict[str, tuple[bool | None, str]]:
    """GET /readyz on every node: {id: (ready, reason)}, (None, error) when unreachable."""
    import urllib.error
    from concurrent.futures import ThreadPoolExecutor
    from raftmail.node.client import get_json

    def one(admin: str) -> tuple[bool | None, str]:
        try:
            return True, get_json(admin, "/readyz", 1.0).get("reason", "")
        except urllib.error.HTTPError as e:
            try:
                return False, json.loads(e.read()).get("reason", str(e))
            except ValueError:
                return False, str(e)
        except (OSError, ValueError) as e:
            return None, str(getattr(e, "reason", e))
    with ThreadPoolExecutor(len(config.nodes)) as pool:
        return dict(zip([n.id for n in config.nodes], pool.map(one, [str(n.admin) for n in config.nodes])))


def _watch(config: Config) -> None:
    from raftmail.cli.render import run_watch
    from raftmail.node.client import cluster_status, first_answer
    from raftmail.node.client import read_token
    follower = EventFollower(_node_order(config, None), limit=10000, token=read_token(config))

    def fetch() -> tuple[dict, dict, list, list]:
        view = cluster_status(config, _fetch_all(config, "/status", timeout=1.0))
        campaigns = (first_answer(_fetch_all(config, "/campaigns", timeout=1.0)) or {}).get("campaigns", [])
        new: list[dict] = []
        more = True
        while more:  # at start: the whole ring (at most EVENT_RING events), then what is new
            page, more, _notes = follower.poll()
            new += page or []
        return view, _readiness(config), campaigns, new
    run_watch(fetch)


# ------------------------------------------------------------------ intake security: AUTH users, TLS

@main.command()
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
        config = _load(config_path)
        started = time.monotonic()
        m = fetch_backup(config, Path(out_path), lambda s: click.echo(s, err=True))
    except BackupError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    size = Path(out_path).stat().st_size
    click.echo(f"wrote {out_path}: {size} bytes in {time.monotonic() - started:.2f} s; cluster {m['cluster']}, "
               f"index {m['index']}, term {m['term']}, {len(m['parts']) - 1} bodies, counts {json.dumps(m['counts'])}")


@main.command()
@config_option
@click.option("--from", "from_path", required=True, type=click.Path(dir_okay=False, exists=True),
              help="The backup file.")
def restore(config_path: str, from_path: str) -> None:
    """Seed the (empty) data dirs of a new cluster from a backup file; then start its nodes."""
    from raftmail.node.backup import BackupError
    from raftmail.node.backup import restore as seed
    config = _load(config_path)
    try:
        out = seed(config, Path(from_path), time.time(), lambda s: click.echo(s, err=True))
    except (BackupError, ValueError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    click.echo(f"restored {len(config.nodes)} data dirs from cluster {out['manifest']['cluster']} "
               f"index {out['manifest']['index']}: {out['bodies']} bodies, counts {json.dumps(out['counts'])}, "
               f"{out['returned']} recipients returned from batches in flight")


@main.command()
@click.argument("user")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin (scripts).")
def passwd(user: str, password_stdin: bool) -> None:
    """Make a salted password hash for USER, to paste under [intake.users] in the cluster file."""
    import re

    from raftmail.node.auth import hash_password
    from raftmail.node.config import MAX_LOGIN_CHARS
    if not user or len(user) > MAX_LOGIN_CHARS or not user.isprintable() or any(c.isspace() for c in user):
        click.echo(f"error: a login must be 1-{MAX_LOGIN_CHARS} printable characters without spaces", err=True)
        sys.exit(2)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        hashed = hash_password(password)
    except ValueError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    key = user if re.fullmatch(r"[A-Za-z0-9_-]+", user) else json.dumps(user)
    click.echo("# under [intake.users] in the cluster file:", err=True)
    click.echo(f"{key} = {json.dumps(hashed)}")


@main.command()
def secret() -> None:
    """Print a new random secret (32 random bytes, URL-safe base64) for [cluster] secret,
    admin_token, read_token or token_key. Use a different one for each."""
    import secrets
    click.echo(secrets.token_urlsafe(32))


@main.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for cert.pem and key.pem.")
@click.option("--host", required=True, help="The host name or IP address clients connect to.")
@click.option("--days", default=365, show_default=True, type=click.IntRange(1, 3650), help="Validity.")
@click.option("--force", is_flag=True, help="Replace existing cert.pem and key.pem.")
def certs(out_dir: str, host: str, days: int, force: bool) -> None:
    """Generate a self-signed certificate and key for STARTTLS on intake (for test setups; use a
    certificate from your CA in production)."""
    from raftmail.node.tls import write_self_signed
    try:
        cert, key = write_self_signed(Path(out_dir).absolute(), host, days=days, overwrite=force)
    except (FileExistsError, ValueError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except OSError as e:
        click.echo(f"error: cannot write to {out_dir}: {e.strerror or e}", err=True)
        sys.exit(2)
    click.echo(f"wrote {cert} and {key}: self-signed for {host}, valid {days} days", err=True)
    click.echo(f'[intake]\ntls_cert = {json.dumps(str(cert))}\ntls_key = {json.dumps(str(key))}')


if __name__ == "__main__":
    main()

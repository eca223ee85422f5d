"""Watching and steering a running cluster: status, campaigns, events, membership, drills."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from raftmail.cli.common import config_option, fetch_all, load_or_exit, node_or_exit
from raftmail.node.config import Config


@click.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--watch", is_flag=True, help="A live view, redrawn every second, until Ctrl-C.")
def status(config_path: str, as_json: bool, watch: bool) -> None:
    """The whole cluster: nodes, roles, indexes, lag, leader, fault tolerance, queue.
    Exit status 0 when a leader and a quorum are reachable, 1 otherwise."""
    from raftmail.node.client import cluster_status
    config = load_or_exit(config_path)
    if watch:
        _watch(config)
        return
    view = cluster_status(config, fetch_all(config, "/status"))
    if as_json:
        click.echo(json.dumps(view, indent=2, sort_keys=True))
    else:
        from raftmail.cli.render import print_status
        print_status(view)
    sys.exit(0 if view["healthy"] else 1)


@click.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def campaigns(config_path: str, as_json: bool) -> None:
    """Campaigns with counts per state and percent done."""
    from raftmail.node.client import first_answer
    config = load_or_exit(config_path)
    answers = fetch_all(config, "/campaigns")
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
    config = load_or_exit(config_path)
    ok, message = post_campaign_action(config, campaign_id, action)
    click.echo(message, err=not ok)
    sys.exit(0 if ok else 1)


@click.command()
@click.argument("campaign_id")
@config_option
def pause(campaign_id: str, config_path: str) -> None:
    """Stop assigning a campaign's recipients (batches in flight finish)."""
    _campaign_action("pause", config_path, campaign_id)


@click.command()
@click.argument("campaign_id")
@config_option
def resume(campaign_id: str, config_path: str) -> None:
    """Continue a paused campaign with what is still pending (nothing is sent twice)."""
    _campaign_action("resume", config_path, campaign_id)


@click.command()
@click.argument("campaign_id")
@config_option
def cancel(campaign_id: str, config_path: str) -> None:
    """Mark every recipient of the campaign that is not yet sent as cancelled."""
    _campaign_action("cancel", config_path, campaign_id)


@click.command()
@config_option
@click.option("--node", "node_id", required=True, help="The [[node]] of the file to add.")
def join(config_path: str, node_id: str) -> None:
    """Add a node (already listed in the file) to the running cluster. Then start it there with
    `raftmail start`; it catches up from the leader and takes batches."""
    from raftmail.node.client import membership_change
    config = load_or_exit(config_path)
    ok, message = membership_change(config, node_or_exit(config, node_id).id, "join")
    click.echo(message, err=not ok)
    if ok:
        click.echo(f"now start it: raftmail start --config {config_path} --node {node_id}")
    sys.exit(0 if ok else 1)


@click.command()
@config_option
@click.option("--node", "node_id", required=True, help="The member to remove.")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for its batches to move.")
def leave(config_path: str, node_id: str, timeout: float) -> None:
    """Remove a node cleanly: it gets no new batches, its batches finish or move, then it leaves
    the Raft membership and stops itself. Remove it from the file afterwards."""
    from raftmail.node.client import membership_change
    config = load_or_exit(config_path)
    ok, message = membership_change(config, node_or_exit(config, node_id).id, "leave", timeout)
    click.echo(message, err=not ok)
    sys.exit(0 if ok else 1)


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="The cluster file (TOML) of the cluster to drill.")
@click.option("--restore", "restore_path", type=click.Path(dir_okay=False, exists=True),
              help="Instead: restore this backup file into a throw-away local cluster and check it.")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds before the drill fails.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def drill(config_path: str | None, restore_path: str | None, timeout: float, as_json: bool) -> None:
    """A failover drill: the leader steps down; time the election, the first committed write after
    it, and every node catching up. With --restore FILE: a restore drill (nothing is sent off this
    machine, and the throw-away cluster is removed afterwards)."""
    if restore_path is not None:
        _restore_drill(Path(restore_path), as_json)
    if config_path is None:
        click.echo("error: drill needs --config (a failover drill) or --restore FILE (a restore drill)", err=True)
        sys.exit(2)
    from raftmail.node.client import run_drill
    config = load_or_exit(config_path)
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


def _restore_drill(path: Path, as_json: bool) -> None:
    from raftmail.node.recovery import drill_restore
    result = drill_restore(path, (lambda s: None) if as_json else (lambda s: click.echo(s, err=True)))
    if as_json:
        click.echo(json.dumps(result, indent=2))
    elif result["ok"]:
        click.echo(f"restore drill passed: backup of cluster {result['cluster']} at index {result['index']} "
                   f"restored into 3 local nodes in {result['seconds']:.1f}s; {result['bodies']} bodies; queue "
                   f"{json.dumps(result['counts'])} matches the manifest "
                   f"({result['returned']} recipients returned from batches in flight)")
    else:
        click.echo(f"restore drill FAILED: {result['error']}", err=True)
    sys.exit(0 if result["ok"] else 1)



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


@click.command()
@config_option
@click.option("--campaign", "campaign_id", default=None, help="Only this campaign's events.")
@click.option("--follow", is_flag=True, help="Keep printing new events as they commit, until Ctrl-C.")
@click.option("--after", default=0, show_default=True, type=click.IntRange(min=0),
              help="Start after this event seq (the last one you have).")
@click.option("--node", "node_id", default=None, help="Ask this node first (any node answers).")
def events(config_path: str, campaign_id: str | None, follow: bool, after: int, node_id: str | None) -> None:
    """Recipient outcomes (delivered, deferred, bounced, suppressed, expired, cancelled) for the
    whole cluster, one JSON line each, in commit order, each seq once."""
    config = load_or_exit(config_path)
    if node_id is not None:
        node_or_exit(config, node_id)
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
        view = cluster_status(config, fetch_all(config, "/status", timeout=1.0))
        campaigns = (first_answer(fetch_all(config, "/campaigns", timeout=1.0)) or {}).get("campaigns", [])
        new: list[dict] = []
        more = True
        while more:  # at start: the whole ring (at most EVENT_RING events), then what is new
            page, more, _notes = follower.poll()
            new += page or []
        return view, _readiness(config), campaigns, new
    run_watch(fetch)


# ------------------------------------------------------------------ intake security: AUTH users, TLS


COMMANDS = [status, campaigns, pause, resume, cancel, join, leave, drill, events]

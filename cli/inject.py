"""The injection API from scripts: `inject` posts a request file to a node's public listener;
`apikey` makes a key for callers outside [api] allow_networks."""
from __future__ import annotations

import json
import os
import re
import sys
import urllib.error
import urllib.request

import click

from raftmail.cli.common import config_option, load_or_exit


@click.command()
@click.argument("name")
def apikey(name: str) -> None:
    """Make a new API key NAME: prints the key once (give it to the caller, who sends
    `Authorization: Bearer KEY`) and the line to paste under [api.keys] in the cluster file."""
    import secrets

    from raftmail.node.auth import hash_password
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        click.echo("error: a key name is 1-64 letters, digits, '-' or '_'", err=True)
        sys.exit(2)
    secret = secrets.token_urlsafe(32)
    click.echo("# the key, shown only now (the cluster keeps only its salted hash):", err=True)
    click.echo(f"{name}.{secret}")
    click.echo("# under [api.keys] in the cluster file, on every node:", err=True)
    click.echo(f"{name} = {json.dumps(hash_password(secret))}")


@click.command()
@config_option
@click.argument("request_file", type=click.File("rb"))
@click.option("--node", "node_id", default=None, help="Send to this node (default: each node with http in turn).")
@click.option("--idempotency-key", default=None, help="Idempotency-Key header: a retry with it queues nothing twice.")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for a node's answer.")
def inject(config_path: str, request_file, node_id: str | None, idempotency_key: str | None, timeout: float) -> None:
    """Send REQUEST_FILE (KumoMTA's JSON injection request; - for stdin) to POST /api/inject/v1 and
    print the reply. A key for callers outside [api] allow_networks comes from RAFTMAIL_API_KEY.
    Exit 0 on 200, 1 otherwise; a 503 is retried on the next node."""
    config = load_or_exit(config_path)
    nodes = [n for n in config.nodes if n.http is not None and node_id in (None, n.id)]
    if not nodes:
        click.echo("error: no [[node]] with an http address" + (f" named {node_id}" if node_id else ""), err=True)
        sys.exit(2)
    body = request_file.read()
    headers = {"Content-Type": "application/json"}
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    if os.environ.get("RAFTMAIL_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['RAFTMAIL_API_KEY']}"
    status, text = 0, ""
    for node in nodes:
        req = urllib.request.Request(f"http://{node.http}/api/inject/v1", data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, text = r.status, r.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode("utf-8", "replace")
        except OSError as e:
            status, text = 0, f"{node.id}: {e}"
        if status not in (0, 503):
            break
    click.echo(text)
    sys.exit(0 if status == 200 else 1)


COMMANDS = [apikey, inject]

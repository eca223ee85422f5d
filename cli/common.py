"""What the commands share: the --config option, loading the file, logging."""
from __future__ import annotations

import sys
from typing import Any

import click

from raftmail.node.config import Config, ConfigError, load_config



config_option = click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
                             help="The cluster file (TOML).")


def load_or_exit(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)




def fetch_all(config: Config, path: str, timeout: float = 2.0) -> dict[str, Any]:
    from raftmail.node.client import get_json_all, read_token
    return get_json_all([(n.id, str(n.admin)) for n in config.nodes], path, timeout, read_token(config))



def node_or_exit(config: Config, node_id: str):
    try:
        return config.node(node_id)
    except ConfigError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)

"""Secrets and keys: password hashes, random secrets, TLS certificates."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click



@click.command()
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


@click.command()
def secret() -> None:
    """Print a new random secret (32 random bytes, URL-safe base64) for [cluster] secret,
    admin_token, read_token or a key of [feedback] unsubscribe_secret. Use a different one for each."""
    import secrets
    click.echo(secrets.token_urlsafe(32))


@click.command()
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



COMMANDS = [passwd, secret, certs]

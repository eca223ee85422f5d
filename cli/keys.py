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



@click.group()
def dkim() -> None:
    """DKIM keys for [[delivery.dkim]] (one per sending domain and selector)."""


@dkim.command()
@click.argument("domain")
@click.argument("selector")
@click.option("--algorithm", type=click.Choice(["rsa", "ed25519"]), default="rsa", show_default=True,
              help="rsa (2048 bits, what every receiver checks) or ed25519 (RFC 8463; sign with both).")
@click.option("--out", "out_dir", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Folder for DOMAIN.SELECTOR.ALGORITHM.pem (made 0700 if new).")
def keygen(domain: str, selector: str, algorithm: str, out_dir: str) -> None:
    """Write a new private key for DOMAIN and SELECTOR (mode 0600, never over an existing file),
    and print the DNS TXT record to publish and the [[delivery.dkim]] entry to add. Rotate by
    publishing a new selector's record first, then adding its entry (and `kill -HUP` the nodes)."""
    import os
    import re

    from raftmail.node.dkim import dns_record, load_signing_key, new_private_key_pem
    domain = domain.strip().lower().rstrip(".")
    label = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
    if not re.fullmatch(rf"{label}(?:\.{label})+", domain):
        click.echo(f"error: {domain!r} is not a domain name", err=True)
        sys.exit(2)
    if not re.fullmatch(rf"{label}(?:\.{label})*", selector.lower()):
        click.echo(f"error: selector {selector!r} must be DNS labels separated by dots", err=True)
        sys.exit(2)
    folder = Path(out_dir).absolute()
    path = folder / f"{domain}.{selector}.{algorithm}.pem"
    pem = new_private_key_pem(algorithm)
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        click.echo(f"error: {path} exists; a selector's key is never replaced: pick a new selector", err=True)
        sys.exit(2)
    except OSError as e:
        click.echo(f"error: cannot write {path}: {e.strerror}", err=True)
        sys.exit(1)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    name, value = dns_record(domain, selector, load_signing_key(pem))
    click.echo(f"wrote {path}", err=True)
    click.echo("# DNS: publish this TXT record (long values split into 255-byte strings by your DNS tool)")
    click.echo(f"{name}. IN TXT \"{value}\"")
    click.echo("# cluster file: add this entry on every node, then `kill -HUP` each node (or restart)")
    click.echo(f"[[delivery.dkim]]\ndomain = {json.dumps(domain)}\nselector = {json.dumps(selector)}\n"
               f"key_file = {json.dumps(str(path))}")


COMMANDS = [passwd, secret, certs, dkim]

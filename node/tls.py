"""TLS: every SSLContext a node uses is built here: the server context for STARTTLS on intake from
a PEM certificate and key, the client contexts for delivery and the webhook, and a self-signed pair
for test setups (`raftmail certs`)."""
from __future__ import annotations

import datetime
import functools
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
DEFAULT_DAYS = 365
# RSA rather than EC: every SMTP client in use handles it.
DEFAULT_KEY_BITS = 2048
MIN_TLS = ssl.TLSVersion.TLSv1_2


class TLSConfigError(ValueError):
    """A certificate or key that cannot serve STARTTLS; str() is one line for the operator."""


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise TLSConfigError("the key file is encrypted; give an unencrypted PEM key")


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """An SSLContext for STARTTLS on intake (TLS 1.2 or later). Raises TLSConfigError with the
    reason when the files are not a matching PEM certificate and key."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_TLS
    # Submission clients rarely have certificates; intake authenticates them with AUTH.
    context.verify_mode = ssl.CERT_NONE
    try:
        context.load_cert_chain(str(cert_file), str(key_file), password=_no_password)
    except TLSConfigError:
        raise
    except ssl.SSLError as exc:
        raise TLSConfigError(_explain(exc)) from None
    except OSError as exc:
        raise TLSConfigError(f"cannot read it: {exc.strerror or exc}") from None
    return context


@functools.lru_cache(maxsize=8)
def client_context(*, verify: bool, ca_file: Path | None = None) -> ssl.SSLContext:
    """The SSLContext for STARTTLS on delivery and for HTTPS webhooks (TLS 1.2 or later), built
    once per kind.
    verify: the certificate must chain to ca_file (a PEM bundle; the system's CAs when None) and
    name the host connected to. Without verify: encryption only (opportunistic TLS, RFC 7435).
    Raises TLSConfigError when ca_file cannot be read or holds no certificate."""
    if not verify:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        try:
            context = ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
        except ssl.SSLError as exc:
            if "NO_CERTIFICATE" in str(exc.reason):
                raise TLSConfigError("holds no PEM certificate (-----BEGIN CERTIFICATE-----)") from None
            raise TLSConfigError(f"not a PEM CA bundle: {exc.reason or exc}") from None
        except OSError as exc:
            raise TLSConfigError(f"cannot read it: {exc.strerror or exc}") from None
        if ca_file is not None and not context.cert_store_stats()["x509"]:
            raise TLSConfigError("holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    context.minimum_version = MIN_TLS
    return context


def _explain(exc: ssl.SSLError) -> str:
    text = f"{exc.reason or ''} {exc}".upper()
    if "KEY_VALUES_MISMATCH" in text:
        return "the key does not belong to the certificate"
    if "PEM" in text or "NO_START_LINE" in text or "ASN1" in text:
        return "not a PEM certificate and key (-----BEGIN ...)"
    return f"OpenSSL refused the certificate or key: {exc.reason or exc}"


def _subject_names(host: str) -> list[x509.GeneralName]:
    try:
        return [x509.IPAddress(ipaddress.ip_address(host))]
    except ValueError:
        return [x509.DNSName(host)]


def self_signed(host: str, *, days: int = DEFAULT_DAYS, key_bits: int = DEFAULT_KEY_BITS) -> tuple[bytes, bytes]:
    """A self-signed certificate for `host` (a DNS name or IP literal) and its key, both PEM."""
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"{host!r} is not a host name or IP address")
    key = rsa.generate_private_key(public_exponent=65537, key_size=key_bits)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_subject_names(host)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def write_self_signed(out_dir: Path, host: str, *, days: int = DEFAULT_DAYS, overwrite: bool = False) -> tuple[Path, Path]:
    """Write cert.pem and key.pem (mode 0600) for `host` into out_dir; returns their paths.
    Refuses (FileExistsError) to replace existing files unless `overwrite`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out_dir / CERT_FILE, out_dir / KEY_FILE
    if not overwrite:
        for path in (cert_path, key_path):
            if path.exists():
                raise FileExistsError(f"{path} already exists (use --force to replace it)")
    cert_pem, key_pem = self_signed(host, days=days)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(key_path, flags, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key_pem)
    os.chmod(key_path, 0o600)
    cert_path.write_bytes(cert_pem)
    return cert_path, key_path

"""Domain names as the whole cluster compares them: the state machine groups recipients into
batches and rate limits by them, the config keys its per-domain tables and routes by them, the
feedback desk recognises its domains by them, and metrics label deliveries by them, so
"Example.COM." is one domain everywhere. Pure."""
from __future__ import annotations


def normalise_domain(domain: str) -> str:
    """`domain` without surrounding white space or the root's trailing dot, in lower case."""
    return domain.strip().rstrip(".").lower()


def domain_of(address: str) -> str:
    """The normalised domain of a mail address (what follows its last "@")."""
    return normalise_domain(address.rpartition("@")[2])

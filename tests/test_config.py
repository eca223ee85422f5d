"""Cluster config loading: the example file, defaults, path resolution, and every refusal."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest

from raftmail.node.dkim import new_private_key_pem
from raftmail.node.config import (
    Address,
    Config,
    ConfigError,
    DeliverySection,
    DomainLimits,
    IntakeSection,
    RaftSection,
    StorageSection,
    load_config,
)

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "cluster.example.toml"
SECRET = "test-secret-0123456789abcdef-0123456789"
FEEDBACK_KEY = "test-feedback-key-0123456789abcdef-0123456789"

CLUSTER = f"""
[cluster]
name = "test"
secret = "{SECRET}"
data_dir = "state"
"""

NODES = """
[[node]]
id = "n1"
raft = "127.0.0.1:7101"
smtp = "127.0.0.1:2501"
admin = "127.0.0.1:8101"

[[node]]
id = "n2"
raft = "127.0.0.1:7102"
smtp = "127.0.0.1:2502"
admin = "127.0.0.1:8102"

[[node]]
id = "n3"
raft = "127.0.0.1:7103"
smtp = "127.0.0.1:2503"
admin = "127.0.0.1:8103"
"""

FEEDBACK = f"""
[feedback]
unsubscribe_secret = ["{FEEDBACK_KEY}"]
"""

BASE = CLUSTER + FEEDBACK + NODES


def with_feedback(lines: str) -> str:
    return BASE.replace(FEEDBACK, FEEDBACK + lines)


def write(tmp_path: Path, text: str, name: str = "cluster.toml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def refused(path: Path, *fragments: str) -> str:
    """Load `path`, expect a one-line ConfigError naming the file and every fragment."""
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "\n" not in message and "\r" not in message, message
    assert message.startswith(f"{path}: "), message
    assert path.name in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def node_block(node_id: str, raft: str, smtp: str, admin: str) -> str:
    return f'\n[[node]]\nid = "{node_id}"\nraft = "{raft}"\nsmtp = "{smtp}"\nadmin = "{admin}"\n'


# --------------------------------------------------------------------------------------------
# Files that load
# --------------------------------------------------------------------------------------------


def test_example_file_loads_with_three_local_nodes() -> None:
    config = load_config(EXAMPLE)
    assert [node.id for node in config.nodes] == ["n1", "n2", "n3"]
    assert config.majority() == 2
    assert config.cluster.name == "example"
    assert config.cluster.secret == "change-me-example-secret-0123456789"
    assert config.cluster.data_dir == REPO / "data"
    n2 = config.node("n2")
    assert (str(n2.raft), str(n2.smtp), str(n2.admin)) == ("127.0.0.1:7102", "127.0.0.1:2502", "127.0.0.1:8102")
    assert config.node_data_dir("n3") == REPO / "data" / "n3"
    sink = Address("127.0.0.1", 2600)
    assert config.delivery.relay == sink
    assert dict(config.delivery.routes) == {d: sink for d in ("example.com", "example.net", "example.org", "example.test")}
    assert config.delivery.lease_seconds == 10.0 and isinstance(config.delivery.lease_seconds, float)
    assert config.delivery.retry_first == 60.0
    assert config.intake.max_recipients == 1000
    assert config.intake.max_message_bytes == 10485760


def test_every_address_in_example_is_loopback() -> None:
    config = load_config(EXAMPLE)
    addresses = [a for n in config.nodes for a in (n.raft, n.smtp, n.admin)]
    addresses += [config.delivery.relay, *config.delivery.routes.values()]
    assert {a.host for a in addresses} == {"127.0.0.1"}


def test_minimal_file_gets_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE))
    assert isinstance(config, Config)
    assert config.raft == RaftSection()
    assert config.intake == IntakeSection()
    assert config.storage == StorageSection()
    assert config.delivery == DeliverySection()
    assert config.cluster.fsync is False
    assert config.cluster.admin_token is None
    assert config.delivery.relay is None and config.delivery.dkim == ()
    assert dict(config.delivery.routes) == {}
    assert dict(config.delivery.domains) == {"default": DomainLimits()}
    assert config.delivery.limits_for("gmail.com") == DomainLimits(max_connections=10, max_per_minute=0)
    assert config.path == tmp_path / "cluster.toml"


def test_values_are_read_and_ints_become_floats(tmp_path: Path) -> None:
    text = BASE + """
[raft]
election_timeout_min = 1
election_timeout_max = 2
heartbeat_interval = 0.25
connection_timeout = 2
[intake]
max_recipients = 50
commit_timeout = 2
[delivery]
helo_name = "Mail.Example.COM"
retry_jitter = 0
unsubscribe_url = "https://example.test/u/{token}?x={{literal}}"
[storage]
body_retention_seconds = 60
"""
    config = load_config(write(tmp_path, text))
    assert config.raft.election_timeout_min == 1.0 and type(config.raft.election_timeout_min) is float
    assert config.raft.connection_timeout == 2.0
    assert config.intake.max_recipients == 50 and config.intake.commit_timeout == 2.0
    assert config.delivery.helo_name == "mail.example.com"
    assert config.delivery.retry_jitter == 0.0
    assert config.delivery.unsubscribe_url == "https://example.test/u/{token}?x={{literal}}"
    assert config.storage.body_retention_seconds == 60.0


def test_relative_data_dir_resolves_against_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, BASE.replace('"state"', '"../var/./state"'), name="etc/cluster.toml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(path)
    assert config.cluster.data_dir == tmp_path / "var" / "state"
    assert config.cluster.data_dir.is_absolute()
    assert config.node_data_dir("n1") == tmp_path / "var" / "state" / "n1"


def test_relative_config_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, BASE)
    monkeypatch.chdir(tmp_path)
    config = load_config("cluster.toml")
    assert config.path == tmp_path / "cluster.toml"
    assert config.cluster.data_dir == tmp_path / "state"


def test_absolute_data_dir_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "abs-data"
    config = load_config(write(tmp_path, BASE.replace('"state"', f'"{target}"')))
    assert config.cluster.data_dir == target


def test_domain_limits_inherit_from_default_and_ignore_case(tmp_path: Path) -> None:
    text = BASE + """
[delivery.domains.default]
max_connections = 4
max_per_minute = 100
[delivery.domains."GMail.com"]
max_per_minute = 0
"""
    delivery = load_config(write(tmp_path, text)).delivery
    assert delivery.domains["default"] == DomainLimits(4, 100)
    assert delivery.domains["gmail.com"] == DomainLimits(4, 0)
    assert delivery.limits_for("GMAIL.COM.") == DomainLimits(4, 0)
    assert delivery.limits_for("yahoo.com") == DomainLimits(4, 100)


def test_routes_keys_are_lowercased(tmp_path: Path) -> None:
    text = BASE + '[delivery.routes]\n"Example.TEST" = "127.0.0.1:2600"\n"v6.test" = "[::1]:2601"\n'
    routes = load_config(write(tmp_path, text)).delivery.routes
    assert routes["example.test"] == Address("127.0.0.1", 2600)
    assert str(routes["v6.test"]) == "[::1]:2601"


def test_dkim_key_file_resolves_relative_to_config(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "mail.pem").write_bytes(new_private_key_pem("ed25519"))
    text = BASE + '[delivery.dkim]\ndomain = "Example.test"\nselector = "s1"\nkey_file = "keys/mail.pem"\n'
    (dkim,) = load_config(write(tmp_path, text)).delivery.dkim
    assert (dkim.domain, dkim.selector, dkim.key_file, dkim.default) == ("example.test", "s1", tmp_path / "keys" / "mail.pem", False)


def test_backoff_section_is_read_and_checked(tmp_path: Path) -> None:
    backoff = load_config(write(tmp_path, BASE + "[delivery.backoff]\nsuspend_seconds = 60\n")).delivery.backoff
    assert (backoff.suspend_seconds, backoff.step_seconds, backoff.suspend_level) == (60.0, 60.0, 4)
    refused(write(tmp_path, BASE + "[delivery.backoff]\nsuspend_level = 0\n"), "[delivery.backoff] suspend_level",
            "positive")
    refused(write(tmp_path, BASE + "[delivery.backoff]\nhalve = true\n"), "[delivery.backoff] halve")


def test_dkim_entries_per_domain_with_one_default_domain(tmp_path: Path) -> None:
    for name in ("a-rsa", "a-ed", "b", "c"):
        (tmp_path / f"{name}.pem").write_bytes(new_private_key_pem("ed25519"))
    entries = ('[[delivery.dkim]]\ndomain = "brand-a.example"\nselector = "r1"\nkey_file = "a-rsa.pem"\ndefault = true\n'
               '[[delivery.dkim]]\ndomain = "brand-a.example"\nselector = "e1"\nkey_file = "a-ed.pem"\ndefault = true\n'
               '[[delivery.dkim]]\ndomain = "brand-b.example"\nselector = "s1"\nkey_file = "b.pem"\n')
    dkim = load_config(write(tmp_path, BASE + entries)).delivery.dkim
    assert [(e.domain, e.selector, e.default) for e in dkim] == [
        ("brand-a.example", "r1", True), ("brand-a.example", "e1", True), ("brand-b.example", "s1", False)]
    two_defaults = entries + '[[delivery.dkim]]\ndomain = "brand-c.example"\nselector = "s1"\nkey_file = "c.pem"\ndefault = true\n'
    refused(write(tmp_path, BASE + two_defaults), "[[delivery.dkim]] default", "2 domains")
    twice = entries + '[[delivery.dkim]]\ndomain = "brand-b.example"\nselector = "s1"\nkey_file = "c.pem"\n'
    refused(write(tmp_path, BASE + twice), "[[delivery.dkim]] selector", "s1 appears twice for brand-b.example")
    (tmp_path / "bad.pem").write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n")
    bad = '[[delivery.dkim]]\ndomain = "x.example"\nselector = "s1"\nkey_file = "bad.pem"\n'
    refused(write(tmp_path, BASE + entries + bad), "[[delivery.dkim]] #4 key_file", "does not hold a usable private key")


def test_relay_with_login(tmp_path: Path) -> None:
    text = BASE + '[delivery]\nrelay = "127.0.0.1:2600"\nrelay_username = "u"\nrelay_password = "p4ss"\n'
    delivery = load_config(write(tmp_path, text)).delivery
    assert (delivery.relay, delivery.relay_username, delivery.relay_password) == (Address("127.0.0.1", 2600), "u", "p4ss")


def test_secret_counts_utf8_bytes(tmp_path: Path) -> None:
    # Eleven euro signs are eleven characters but 33 bytes: enough.
    config = load_config(write(tmp_path, BASE.replace(SECRET, "€" * 11)))
    assert config.cluster.secret == "€" * 11


def test_ipv6_node_addresses_are_canonicalised(tmp_path: Path) -> None:
    text = CLUSTER + node_block("a", "[0:0::1]:7101", "[::1]:2501", "[::1]:8101")
    node = load_config(write(tmp_path, text)).node("a")
    assert node.raft == Address("::1", 7101)
    assert str(node.raft) == "[::1]:7101"


def test_sections_are_frozen_and_secrets_not_in_repr(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE + '[delivery.routes]\n"a.test" = "127.0.0.1:1"\n'))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.raft.heartbeat_interval = 5.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.delivery.routes["b.test"] = Address("127.0.0.1", 2)  # type: ignore[index]
    assert SECRET not in repr(config)


def test_address_parse_and_str_round_trip() -> None:
    for text in ("127.0.0.1:25", "[::1]:25", "mx.example.test:2525"):
        assert str(Address.parse(text)) == text
    assert Address.parse("MX.Example.Test:25") == Address("mx.example.test", 25)
    for bad in ("127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536", "::1:25", "[::1]25", "host:+25", ":25"):
        with pytest.raises(ValueError):
            Address.parse(bad)


def test_unknown_node_id_names_file_and_flag(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    config = load_config(path)
    with pytest.raises(ConfigError) as caught:
        config.node("n9")
    message = str(caught.value)
    assert "cluster.toml" in message and "--node" in message and "n9" in message
    assert "n1, n2, n3" in message
    with pytest.raises(ConfigError):
        config.node_data_dir("n9")


def test_config_error_survives_pickling() -> None:
    error = ConfigError("cluster.toml", "[intake] max_recipients", "must be a positive integer, got -3")
    again = pickle.loads(pickle.dumps(error))
    assert str(again) == str(error) == "cluster.toml: [intake] max_recipients: must be a positive integer, got -3"


# --------------------------------------------------------------------------------------------
# Refusals: file level
# --------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    refused(tmp_path / "absent.toml", "cannot read", "No such file")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    (tmp_path / "dir.toml").mkdir()
    refused(tmp_path / "dir.toml", "cannot read")


def test_toml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    refused(write(tmp_path, '[cluster]\nname = "x"\nsecret "no equals"\n'), "line 3, column", "TOML syntax error")


def test_toml_duplicate_key(tmp_path: Path) -> None:
    refused(write(tmp_path, BASE + "[intake]\nmax_recipients = 1\nmax_recipients = 2\n"), "TOML syntax error")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "cluster.toml"
    path.write_bytes(b'[cluster]\nname = "\xff"\n')
    refused(path, "UTF-8")


def test_unknown_section_lists_allowed(tmp_path: Path) -> None:
    refused(write(tmp_path, BASE + "[bogus]\nx = 1\n"), "[bogus]", "unknown section", "[cluster]", "[[node]]", "[storage]")


def test_unknown_array_section(tmp_path: Path) -> None:
    refused(write(tmp_path, BASE + "[[nodes]]\nid = 'x'\n"), "[[nodes]]", "unknown section")


def test_node_written_as_single_table(tmp_path: Path) -> None:
    text = CLUSTER + '[node]\nid = "n1"\nraft = "127.0.0.1:1"\nsmtp = "127.0.0.1:2"\nadmin = "127.0.0.1:3"\n'
    refused(write(tmp_path, text), "[[node]]", "array of tables")


def test_missing_cluster_section(tmp_path: Path) -> None:
    refused(write(tmp_path, NODES), "[cluster]", "required")


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    refused(write(tmp_path, "raft = 3\n" + BASE), "[raft]", "must be a table")


@pytest.mark.parametrize(
    ("extra", "key", "hint"),
    [
        ("[intake]\nmax_recipient = 5\n", "[intake] max_recipient", "max_recipients"),
        ("[raft]\nelection_timeout = 1.0\n", "[raft] election_timeout", "election_timeout_min"),
        ("[delivery]\nrelay_host = 'x'\n", "[delivery] relay_host", "relay"),
        ("[storage]\nretention = 5\n", "[storage] retention", "body_retention_seconds"),
        ("[cluster.extra]\n", "[cluster] extra", "admin_token"),
        ("[delivery.domains.default]\nmax_conns = 1\n", "[delivery.domains.default] max_conns", "max_connections"),
        ("[delivery.domains.gmail.com]\nmax_connections = 1\n", "[delivery.domains.gmail] com", '"gmail.com"'),
    ],
)
def test_unknown_key_lists_allowed(tmp_path: Path, extra: str, key: str, hint: str) -> None:
    refused(write(tmp_path, BASE + extra), key, "unknown key", "allowed keys", hint)


def test_unknown_node_key(tmp_path: Path) -> None:
    refused(write(tmp_path, BASE + 'port = 5\n'), "[[node]] n3 port", "unknown key", "id, raft, smtp, admin")


def test_unknown_dkim_key(tmp_path: Path) -> None:
    refused(write(tmp_path, BASE + "[delivery.dkim]\nkey = 'x'\n"), "[delivery.dkim] key", "key_file")


# --------------------------------------------------------------------------------------------
# Refusals: types and limits
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "key", "got"),
    [
        ("[intake]\nmax_recipients = true\n", "[intake] max_recipients", "true (a boolean)"),
        ("[intake]\nmax_recipients = '10'\n", "[intake] max_recipients", '"10"'),
        ("[intake]\nmax_recipients = 1.5\n", "[intake] max_recipients", "1.5"),
        ("[raft]\nheartbeat_interval = 'fast'\n", "[raft] heartbeat_interval", '"fast"'),
        ("[raft]\nheartbeat_interval = false\n", "[raft] heartbeat_interval", "false (a boolean)"),
        ("[delivery]\nlease_seconds = inf\n", "[delivery] lease_seconds", "inf"),
        ("[delivery]\nlease_seconds = nan\n", "[delivery] lease_seconds", "nan"),
        ("[delivery]\nbatch_size = [1]\n", "[delivery] batch_size", "an array"),
        ("[delivery]\nhelo_name = 5\n", "[delivery] helo_name", "5"),
        ("[delivery]\nrelay = 2600\n", "[delivery] relay", "2600"),
        ("[delivery]\nroutes = 'x'\n", "[delivery] routes", '"x"'),
        ("[delivery.routes]\n'a.test' = 2600\n", '[delivery.routes] "a.test"', "2600"),
        ("[delivery.domains.default]\nmax_connections = true\n", "[delivery.domains.default] max_connections", "true (a boolean)"),
        ("[storage]\nbody_retention_seconds = 1979-05-27\n", "[storage] body_retention_seconds", "a date"),
    ],
)
def test_wrong_type(tmp_path: Path, extra: str, key: str, got: str) -> None:
    refused(write(tmp_path, BASE + extra), key, f"got {got}")


def test_fsync_must_be_boolean(tmp_path: Path) -> None:
    refused(write(tmp_path, BASE.replace('data_dir = "state"', 'data_dir = "state"\nfsync = 1')), "[cluster] fsync", "true or false, got 1")


def test_spec_example_message_exactly(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "[intake]\nmax_recipients = -3\n")
    message = refused(path)
    assert message == f"{path}: [intake] max_recipients: must be a positive integer, got -3"


POSITIVE_KEYS = [
    ("raft", name) for name in ("max_commands_in_flight", "compaction_min_entries", "compaction_min_seconds", "snapshot_chunk_bytes")
] + [("intake", f.name) for f in dataclasses.fields(IntakeSection) if type(f.default) in (int, float)] + [
    ("delivery", name)
    for name in (
        "batch_size", "lease_seconds", "max_concurrent_batches", "connect_timeout", "command_timeout",
        "report_every", "report_interval", "retry_first", "retry_max_interval", "max_age",
    )
] + [("storage", "body_retention_seconds"), ("delivery.domains.default", "max_connections")]


@pytest.mark.parametrize(("section", "name"), POSITIVE_KEYS)
@pytest.mark.parametrize("value", ["0", "-3"])
def test_non_positive_limits(tmp_path: Path, section: str, name: str, value: str) -> None:
    refused(write(tmp_path, BASE + f"[{section}]\n{name} = {value}\n"), f"[{section}] {name}", "must be a positive", f"got {value}")


def test_raft_timing_zero_heartbeat(tmp_path: Path) -> None:
    refused(write(tmp_path, BASE + "[raft]\nheartbeat_interval = 0\n"), "[raft] heartbeat_interval", "positive")


@pytest.mark.parametrize(
    ("extra", "name"),
    [
        ("retry_factor = 0.5", "retry_factor"),
        ("retry_jitter = 1.0", "retry_jitter"),
        ("retry_jitter = -0.1", "retry_jitter"),
    ],
)
def test_retry_shape_limits(tmp_path: Path, extra: str, name: str) -> None:
    refused(write(tmp_path, BASE + f"[delivery]\n{extra}\n"), f"[delivery] {name}")


def test_retry_max_below_first(tmp_path: Path) -> None:
    refused(write(tmp_path, BASE + "[delivery]\nretry_max_interval = 100\n"), "[delivery] retry_max_interval", "retry_first (300)")


def test_max_per_minute_zero_ok_negative_refused(tmp_path: Path) -> None:
    ok = load_config(write(tmp_path, BASE + "[delivery.domains.default]\nmax_per_minute = 0\n", "ok.toml"))
    assert ok.delivery.limits_for("x.test").max_per_minute == 0
    refused(write(tmp_path, BASE + "[delivery.domains.default]\nmax_per_minute = -1\n"), "[delivery.domains.default] max_per_minute", "non-negative")


def test_queue_smaller_than_one_submission(tmp_path: Path) -> None:
    text = BASE + "[intake]\nmax_recipients = 100\nmax_queued_recipients = 10\n"
    refused(write(tmp_path, text), "[intake] max_queued_recipients", "max_recipients (100)")


@pytest.mark.parametrize(
    ("raft", "key", "fragment"),
    [
        ("heartbeat_interval = 0.2", "[raft] heartbeat_interval", "3 * heartbeat_interval (0.6) must be less than election_timeout_min (0.3)"),
        ("election_timeout_min = 0.2", "[raft] election_timeout_min", "less than election_timeout_min"),
        ("election_timeout_max = 0.3", "[raft] election_timeout_max", "election_timeout_min (0.3) must be less than election_timeout_max (0.3)"),
        ("connection_timeout = 0.5", "[raft] connection_timeout", "election_timeout_max (0.7) must be at most connection_timeout (0.5)"),
        ("election_timeout_max = 5.0", "[raft] election_timeout_max", "at most connection_timeout"),
    ],
)
def test_raft_timing_rules(tmp_path: Path, raft: str, key: str, fragment: str) -> None:
    refused(write(tmp_path, BASE + f"[raft]\n{raft}\n"), key, fragment, "heartbeat_interval*3 < election_timeout_min")


def test_raft_frame_must_hold_a_snapshot_chunk(tmp_path: Path) -> None:
    refused(write(tmp_path, BASE + "[raft]\nmax_frame_bytes = 262144\n"), "[raft] max_frame_bytes",
            "at least snapshot_chunk_bytes (262144) + 65536")
    refused(write(tmp_path, BASE + "[raft]\nsnapshot_chunk_bytes = 8388608\n", "big.toml"),
            "[raft] snapshot_chunk_bytes", "must be at least")
    ok = load_config(write(tmp_path, BASE + "[raft]\nmax_frame_bytes = 327680\njournal_reserve_bytes = 65536\n", "ok.toml"))
    assert ok.raft.max_frame_bytes == 327680 and ok.raft.journal_reserve_bytes == 65536


def test_raft_timing_allows_equal_max_and_connection(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE + "[raft]\nelection_timeout_max = 3.5\n"))
    assert config.raft.election_timeout_max == config.raft.connection_timeout == 3.5


# --------------------------------------------------------------------------------------------
# Refusals: cluster section
# --------------------------------------------------------------------------------------------


def test_missing_secret_explains_why(tmp_path: Path) -> None:
    text = BASE.replace(f'secret = "{SECRET}"\n', "")
    refused(write(tmp_path, text), "[cluster] secret", "required", "encrypts Raft traffic", "take part in Raft")


def test_short_secret_is_refused_without_echoing_it(tmp_path: Path) -> None:
    message = refused(write(tmp_path, BASE.replace(SECRET, "hunter2-short")), "[cluster] secret", "13 bytes", "32", "raftmail secret", "take part in Raft")
    assert "hunter2" not in message


def test_secret_of_wrong_type_not_echoed(tmp_path: Path) -> None:
    message = refused(write(tmp_path, BASE.replace(f'"{SECRET}"', "1234567890123456789")), "[cluster] secret", "must be a string")
    assert "1234567890123456789" not in message


def test_short_admin_token(tmp_path: Path) -> None:
    text = BASE.replace('data_dir = "state"', 'data_dir = "state"\nadmin_token = "abc"')
    message = refused(write(tmp_path, text), "[cluster] admin_token", "at least 16")
    assert '"abc"' not in message


@pytest.mark.parametrize("name", ["data_dir", "name"])
def test_required_cluster_keys(tmp_path: Path, name: str) -> None:
    lines = [line for line in BASE.splitlines() if not line.startswith(f"{name} =")]
    refused(write(tmp_path, "\n".join(lines)), f"[cluster] {name}", "required")


def test_bad_cluster_name(tmp_path: Path) -> None:
    refused(write(tmp_path, BASE.replace('name = "test"', 'name = "my cluster"')), "[cluster] name", '"my cluster"')


# --------------------------------------------------------------------------------------------
# Refusals: nodes
# --------------------------------------------------------------------------------------------


def test_no_nodes(tmp_path: Path) -> None:
    refused(write(tmp_path, CLUSTER), "[[node]]", "no nodes")


def test_empty_node_array(tmp_path: Path) -> None:
    refused(write(tmp_path, "node = []\n" + CLUSTER), "[[node]]", "no nodes")


def test_duplicate_node_id(tmp_path: Path) -> None:
    text = BASE + node_block("n2", "127.0.0.1:7104", "127.0.0.1:2504", "127.0.0.1:8104")
    refused(write(tmp_path, text), "[[node]] #4 id", '"n2" is already used by [[node]] #2')


def test_duplicate_node_id_ignoring_case(tmp_path: Path) -> None:
    text = BASE + node_block("N1", "127.0.0.1:7104", "127.0.0.1:2504", "127.0.0.1:8104")
    refused(write(tmp_path, text), "[[node]] #4 id", '"N1"', "ignoring case")


@pytest.mark.parametrize("bad_id", ["n 1", "", "n/1", "x" * 33, "nœud"])
def test_invalid_node_id(tmp_path: Path, bad_id: str) -> None:
    text = CLUSTER + node_block(bad_id, "127.0.0.1:7101", "127.0.0.1:2501", "127.0.0.1:8101")
    refused(write(tmp_path, text), "[[node]] #1 id")


def test_node_id_missing(tmp_path: Path) -> None:
    text = CLUSTER + '[[node]]\nraft = "127.0.0.1:1"\nsmtp = "127.0.0.1:2"\nadmin = "127.0.0.1:3"\n'
    refused(write(tmp_path, text), "[[node]] #1 id", "required")


def test_node_address_missing(tmp_path: Path) -> None:
    text = CLUSTER + '[[node]]\nid = "n1"\nraft = "127.0.0.1:1"\nsmtp = "127.0.0.1:2"\n'
    refused(write(tmp_path, text), "[[node]] n1 admin", "required")


def test_duplicate_port_spec_message(tmp_path: Path) -> None:
    text = CLUSTER + node_block("n1", "127.0.0.1:7101", "127.0.0.1:2501", "127.0.0.1:8101")
    text += node_block("n2", "127.0.0.1:7102", "127.0.0.1:2501", "127.0.0.1:8102")
    message = refused(write(tmp_path, text))
    assert f"cluster.toml: [[node]] n2 smtp: port 2501 is already used by n1 smtp" in message


@pytest.mark.parametrize(
    ("nodes", "key", "owner"),
    [
        (node_block("n1", "127.0.0.1:7101", "127.0.0.1:2501", "127.0.0.1:2501"), "[[node]] n1 admin", "n1 smtp"),
        (
            node_block("n1", "127.0.0.1:7101", "127.0.0.1:2501", "127.0.0.1:8101")
            + node_block("n2", "127.0.0.1:7102", "127.0.0.1:2502", "127.0.0.1:7101"),
            "[[node]] n2 admin",
            "n1 raft",
        ),
        (
            node_block("n1", "[::1]:7101", "127.0.0.1:2501", "127.0.0.1:8101")
            + node_block("n2", "[0::1]:7101", "127.0.0.1:2502", "127.0.0.1:8102"),
            "[[node]] n2 raft",
            "n1 raft",
        ),
    ],
)
def test_duplicate_address_across_roles(tmp_path: Path, nodes: str, key: str, owner: str) -> None:
    refused(write(tmp_path, CLUSTER + nodes), key, f"already used by {owner}")


def test_same_port_on_different_hosts_is_fine(tmp_path: Path) -> None:
    text = CLUSTER + node_block("n1", "127.0.0.1:7101", "127.0.0.1:2501", "127.0.0.1:8101")
    text += node_block("n2", "127.0.0.2:7101", "127.0.0.2:2501", "127.0.0.2:8101")
    assert load_config(write(tmp_path, text)).majority() == 2


@pytest.mark.parametrize(
    ("raft", "fragment"),
    [
        ("127.0.0.1", "host:port"),
        ("127.0.0.1:0", "1 to 65535"),
        ("127.0.0.1:65536", "1 to 65535"),
        ("127.0.0.1:raft", "1 to 65535"),
        ("::1:7101", "brackets"),
        ("[::1:7101", "[ipv6]:port"),
        ("[not-v6]:7101", "IPv6"),
        ("300.1.1.1:7101", "not a valid IPv4"),
        ("127.0.0.01:7101", "not a valid IPv4"),
        ("bad_host!:7101", "not a valid host name"),
    ],
)
def test_malformed_node_address(tmp_path: Path, raft: str, fragment: str) -> None:
    text = CLUSTER + node_block("n1", raft, "127.0.0.1:2501", "127.0.0.1:8101")
    refused(write(tmp_path, text), "[[node]] n1 raft", fragment)


@pytest.mark.parametrize("role", ["raft", "smtp", "admin"])
def test_localhost_refused_for_node_addresses(tmp_path: Path, role: str) -> None:
    addresses = {"raft": "127.0.0.1:7101", "smtp": "127.0.0.1:2501", "admin": "127.0.0.1:8101"}
    addresses[role] = "LocalHost:9999"
    text = CLUSTER + node_block("n1", addresses["raft"], addresses["smtp"], addresses["admin"])
    refused(write(tmp_path, text), f"[[node]] n1 {role}", '"localhost"', "127.0.0.1", "pysyncobj treats differently spelled")


def test_raft_address_must_be_ip_literal(tmp_path: Path) -> None:
    text = CLUSTER + node_block("n1", "node1.example.test:7101", "127.0.0.1:2501", "127.0.0.1:8101")
    refused(write(tmp_path, text), "[[node]] n1 raft", "IP literal", "pysyncobj")


def test_smtp_address_may_be_host_name(tmp_path: Path) -> None:
    text = CLUSTER + node_block("n1", "127.0.0.1:7101", "MX1.example.test:2501", "127.0.0.1:8101")
    assert load_config(write(tmp_path, text)).node("n1").smtp == Address("mx1.example.test", 2501)


@pytest.mark.parametrize("role", ["raft", "smtp"])
def test_wildcard_node_address_refused(tmp_path: Path, role: str) -> None:
    addresses = {"raft": "127.0.0.1:7101", "smtp": "127.0.0.1:2501"}
    addresses[role] = "0.0.0.0:9999"
    text = CLUSTER + node_block("n1", addresses["raft"], addresses["smtp"], "127.0.0.1:8101")
    refused(write(tmp_path, text), f"[[node]] n1 {role}", "wildcard")


# --------------------------------------------------------------------------------------------
# Refusals: delivery
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://example.test/u/{token}", "https://"),
        ("https:///u/{token}", "https://"),
        ("https://example.test/unsubscribe", "{token}"),
        ("https://example.test/u/{token}/{list}", "no placeholder other than {token}"),
        ("https://example.test/u/{token", "not a valid URL template"),
        ("https://example.test/u/ {token}", "spaces"),
    ],
)
def test_bad_unsubscribe_url(tmp_path: Path, url: str, fragment: str) -> None:
    refused(write(tmp_path, BASE + f'[delivery]\nunsubscribe_url = "{url}"\n'), "[delivery] unsubscribe_url", fragment)


def test_malformed_relay(tmp_path: Path) -> None:
    refused(write(tmp_path, BASE + '[delivery]\nrelay = "127.0.0.1"\n'), "[delivery] relay", "host:port")


def test_relay_login_without_relay(tmp_path: Path) -> None:
    text = BASE + '[delivery]\nrelay_username = "u"\nrelay_password = "secret-pass"\n'
    message = refused(write(tmp_path, text), "[delivery] relay_username", "relay is not")
    assert "secret-pass" not in message


def test_relay_password_without_username(tmp_path: Path) -> None:
    text = BASE + '[delivery]\nrelay = "127.0.0.1:2600"\nrelay_password = "secret-pass"\n'
    refused(write(tmp_path, text), "[delivery] relay_username", "together")


def test_route_with_bad_address(tmp_path: Path) -> None:
    refused(write(tmp_path, BASE + '[delivery.routes]\n"a.test" = "127.0.0.1:99999"\n'), '[delivery.routes] "a.test"', "65535")


def test_route_with_unquoted_dotted_domain(tmp_path: Path) -> None:
    refused(write(tmp_path, BASE + '[delivery.routes]\na.test = "127.0.0.1:2600"\n'), "[delivery.routes] a", "quote domain names")


def test_route_with_invalid_domain(tmp_path: Path) -> None:
    refused(write(tmp_path, BASE + '[delivery.routes]\n"bad domain" = "127.0.0.1:2600"\n'), '[delivery.routes] "bad domain"', "domain name")


def test_route_duplicate_ignoring_case(tmp_path: Path) -> None:
    text = BASE + '[delivery.routes]\n"a.test" = "127.0.0.1:1"\n"A.TEST" = "127.0.0.1:2"\n'
    refused(write(tmp_path, text), '[delivery.routes] "A.TEST"', "second time")


def test_bad_helo_name(tmp_path: Path) -> None:
    refused(write(tmp_path, BASE + '[delivery]\nhelo_name = "bad name"\n'), "[delivery] helo_name", "host name")


def test_dkim_key_file_missing(tmp_path: Path) -> None:
    text = BASE + '[delivery.dkim]\ndomain = "example.test"\nselector = "s1"\nkey_file = "nope.pem"\n'
    refused(write(tmp_path, text), "[delivery.dkim] key_file", "cannot read", str(tmp_path / "nope.pem"))


def test_dkim_key_file_empty(tmp_path: Path) -> None:
    (tmp_path / "empty.pem").write_bytes(b"")
    text = BASE + '[delivery.dkim]\ndomain = "example.test"\nselector = "s1"\nkey_file = "empty.pem"\n'
    refused(write(tmp_path, text), "[delivery.dkim] key_file", "empty")


def test_dkim_missing_selector(tmp_path: Path) -> None:
    (tmp_path / "k.pem").write_text("key")
    text = BASE + '[delivery.dkim]\ndomain = "example.test"\nkey_file = "k.pem"\n'
    refused(write(tmp_path, text), "[delivery.dkim] selector", "required")


# --------------------------------------------------------------------------------------------
# [monitoring]
# --------------------------------------------------------------------------------------------


def test_monitoring_defaults_without_a_webhook(tmp_path: Path) -> None:
    from raftmail.node.config import MonitoringSection
    config = load_config(write(tmp_path, BASE))
    assert config.monitoring == MonitoringSection()
    assert config.monitoring.webhook_url is None
    assert config.monitoring.ready_max_lag == 100


def test_monitoring_values_are_read(tmp_path: Path) -> None:
    text = BASE + """
[monitoring]
webhook_url = "https://hooks.example.test/raftmail?token=abc"
webhook_batch = 50
webhook_timeout = 3
webhook_retry_first = 2
webhook_max_retry_interval = 60
ready_max_lag = 0
ready_write_window = 5
"""
    m = load_config(write(tmp_path, text)).monitoring
    assert m.webhook_url == "https://hooks.example.test/raftmail?token=abc"
    assert (m.webhook_batch, m.webhook_timeout, m.webhook_retry_first) == (50, 3.0, 2.0)
    assert m.webhook_max_retry_interval == 60.0 and isinstance(m.webhook_timeout, float)
    assert m.ready_max_lag == 0 and m.ready_write_window == 5.0
    assert "abc" not in repr(m)  # the URL's token stays out of logs and tracebacks


@pytest.mark.parametrize(
    ("body", "key", "fragment"),
    [
        ('webhook_url = "ftp://hooks.example.test/x"', "webhook_url", "https:// URL with a host"),
        ('webhook_url = "http://hooks.example.test/x"', "webhook_url", "must be https://"),
        ('webhook_url = "http://localhost:8080/x"', "webhook_url", "loopback IP"),
        ('webhook_url = "http://10.0.0.1/x"', "webhook_url", "recipient addresses"),
        ('webhook_url = "https:///x"', "webhook_url", "with a host"),
        ('webhook_url = "https://hooks.example.test/a b"', "webhook_url", "spaces"),
        ('webhook_url = "http://[::1/x"', "webhook_url", "not a valid URL"),
        ("webhook_url = 5", "webhook_url", "must be a string"),
        ('webhook_url = "https://h.test/"\nwebhook_batch = 0', "webhook_batch", "positive integer"),
        ('webhook_url = "https://h.test/"\nwebhook_batch = 20000', "webhook_batch", "at most 10000"),
        ('webhook_url = "https://h.test/"\nwebhook_timeout = -1', "webhook_timeout", "positive number"),
        ('webhook_url = "https://h.test/"\nwebhook_retry_first = 10\nwebhook_max_retry_interval = 5',
         "webhook_max_retry_interval", "must be at least webhook_retry_first"),
        ('webhook_url = "https://h.test/"\nwebhook_retry_first = 900', "webhook_retry_first", "(300)"),
        ("webhook_batch = 10", "webhook_batch", "is set but webhook_url is not"),
        ("ready_max_lag = -1", "ready_max_lag", "non-negative integer"),
        ("ready_write_window = 0", "ready_write_window", "positive number"),
        ('webhok_url = "https://h.test/"', "webhok_url", "did you mean webhook_url?"),
    ],
)
def test_monitoring_refusals(tmp_path: Path, body: str, key: str, fragment: str) -> None:
    refused(write(tmp_path, BASE + f"[monitoring]\n{body}\n"), f"[monitoring] {key}", fragment)


def test_monitoring_refusal_does_not_echo_the_webhook_token(tmp_path: Path) -> None:
    message = refused(write(tmp_path, BASE + '[monitoring]\nwebhook_url = "ftp://h.test/?token=s3cret-token"\n'),
                      "[monitoring] webhook_url")
    assert "s3cret-token" not in message


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/hook", "http://127.0.0.9/hook", "http://[::1]:8080/hook",
                                 "https://hooks.example.test/hook"])
def test_webhook_in_clear_text_only_to_loopback(tmp_path: Path, url: str) -> None:
    config = load_config(write(tmp_path, BASE + f'[monitoring]\nwebhook_url = "{url}"\n'))
    assert config.monitoring.webhook_url == url


def test_clear_text_webhook_stops_the_node_at_start_with_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys
    path = write(tmp_path, BASE + '[monitoring]\nwebhook_url = "http://hooks.example.test/x?token=s3cret"\n')
    done = subprocess.run([sys.executable, "-m", "raftmail.cli", "start", "--config", str(path), "--node", "n1"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "[monitoring] webhook_url" in lines[0] and "https://" in lines[0], lines
    assert "s3cret" not in done.stderr


def test_monitoring_is_an_allowed_section(tmp_path: Path) -> None:
    refused(write(tmp_path, BASE + "[bogus]\nx = 1\n"), "[bogus]", "[monitoring]")


# --------------------------------------------------------------------------------------------
# [intake] security keys: allow_networks, users, TLS
# --------------------------------------------------------------------------------------------


def _tls_pair(tmp_path: Path, folder: str = "tls", host: str = "127.0.0.1") -> tuple[Path, Path]:
    from raftmail.node.tls import write_self_signed
    return write_self_signed(tmp_path / folder, host)


def _hash(password: str = "a test password") -> str:
    from raftmail.node.auth import hash_password
    return hash_password(password)


def test_intake_security_defaults(tmp_path: Path) -> None:
    intake = load_config(write(tmp_path, BASE)).intake
    assert [str(n) for n in intake.allow_networks] == ["127.0.0.0/8", "::1/128"]
    assert dict(intake.users) == {}
    assert intake.tls_cert is None and intake.tls_key is None
    assert intake.allow_plaintext_auth_on_loopback is False
    assert intake.auth_fail_delay == 1.0 and intake.auth_fail_delay_max == 30.0


def test_intake_security_keys_are_read_and_tls_paths_resolve(tmp_path: Path) -> None:
    _tls_pair(tmp_path)
    hashed = _hash()
    text = BASE + (
        '[intake]\nallow_networks = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"]\n'
        'tls_cert = "tls/cert.pem"\ntls_key = "tls/key.pem"\nauth_fail_delay = 0.5\n'
        f'\n[intake.users]\nalice = "{hashed}"\n"news@example.com" = "{hashed}"\n'
    )
    intake = load_config(write(tmp_path, text)).intake
    assert [str(n) for n in intake.allow_networks] == ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32"]
    assert sorted(intake.users) == ["alice", "news@example.com"]
    assert intake.tls_cert == tmp_path / "tls" / "cert.pem" and intake.tls_key == tmp_path / "tls" / "key.pem"
    assert intake.auth_fail_delay == 0.5
    assert hashed not in repr(intake)


def test_users_without_tls_are_fine_when_plaintext_auth_on_loopback_is_allowed(tmp_path: Path) -> None:
    text = BASE + f'[intake]\nallow_plaintext_auth_on_loopback = true\nallow_networks = []\n[intake.users]\nbob = "{_hash()}"\n'
    intake = load_config(write(tmp_path, text)).intake
    assert intake.allow_plaintext_auth_on_loopback is True and intake.allow_networks == () and list(intake.users) == ["bob"]


@pytest.mark.parametrize(
    ("body", "key", "fragment"),
    [
        ('allow_networks = "10.0.0.0/8"', "allow_networks", "must be an array"),
        ('allow_networks = ["10.0.0.1/8"]', "allow_networks", "did you mean 10.0.0.0/8?"),
        ('allow_networks = ["banana"]', "allow_networks", "not a network in CIDR form"),
        ("allow_networks = [5]", "allow_networks", "as strings"),
        ("allow_networks = []", "allow_networks", "nobody could submit"),
        ('tls_cert = "tls/cert.pem"', "tls_cert", "tls_key is not"),
        ('tls_key = "tls/key.pem"', "tls_key", "tls_cert is not"),
        ('tls_cert = "tls/cert.pem"\ntls_key = "tls/missing.pem"', "tls_key", "cannot read"),
        ('tls_cert = "tls/cert.pem"\ntls_key = "tls"', "tls_key", "cannot read"),
        ('tls_cert = "tls/cert.pem"\ntls_key = "empty.pem"', "tls_key", "is empty"),
        ('tls_cert = "tls/cert.pem"\ntls_key = "other/key.pem"', "tls_key", "does not belong to the certificate"),
        ('tls_cert = "tls/cert.pem"\ntls_key = "tls/cert.pem"', "tls_key", "cannot serve STARTTLS"),
        ('allow_plaintext_auth_on_loopback = "yes"', "allow_plaintext_auth_on_loopback", "true or false"),
        ("auth_fail_delay = 0", "auth_fail_delay", "positive number"),
        ("auth_fail_delay = 5\nauth_fail_delay_max = 2", "auth_fail_delay_max", "at least auth_fail_delay (5)"),
        ("users = 5", "users", "must be a table"),
    ],
)
def test_intake_security_refusals(tmp_path: Path, body: str, key: str, fragment: str) -> None:
    _tls_pair(tmp_path)
    _tls_pair(tmp_path, "other")
    (tmp_path / "empty.pem").write_bytes(b"")
    refused(write(tmp_path, BASE + f"[intake]\n{body}\n"), f"[intake] {key}", fragment)


def test_users_without_tls_are_refused(tmp_path: Path) -> None:
    refused(write(tmp_path, BASE + f'[intake.users]\nalice = "{_hash()}"\n'), "[intake] users", "STARTTLS",
            "allow_plaintext_auth_on_loopback")


@pytest.mark.parametrize("value", ['"hunter2-plaintext"', '"scrypt$1$2$3$4$5"', "42"])
def test_user_with_a_bad_hash_is_refused_without_echoing_it(tmp_path: Path, value: str) -> None:
    _tls_pair(tmp_path)
    text = BASE + f'[intake]\ntls_cert = "tls/cert.pem"\ntls_key = "tls/key.pem"\n[intake.users]\nalice = {value}\n'
    message = refused(write(tmp_path, text), "[intake.users] alice")
    assert value.strip('"') not in message.replace(str(tmp_path), "")  # the path may hold "42"


def test_user_login_with_spaces_is_refused(tmp_path: Path) -> None:
    text = BASE + f'[intake]\nallow_plaintext_auth_on_loopback = true\n[intake.users]\n"two words" = "{_hash()}"\n'
    refused(write(tmp_path, text), '[intake.users] "two words"', "without spaces")


def test_require_tls_per_domain(tmp_path) -> None:
    from raftmail.node.config import load_config
    src = Path(__file__).resolve().parent.parent / "cluster.example.toml"
    text = src.read_text() + '\n[delivery.domains."bank.example"]\nrequire_tls = true\n'
    p = tmp_path / "c.toml"
    p.write_text(text.replace('data_dir = "data"', f'data_dir = "{tmp_path}/data"'))
    cfg = load_config(p)
    assert cfg.delivery.limits_for("bank.example").require_tls is True
    assert cfg.delivery.limits_for("other.example").require_tls is False
    p.write_text(text.replace("require_tls = true", 'require_tls = "yes"'))
    with pytest.raises(ConfigError, match="require_tls"):
        load_config(p)


# --------------------------------------------------------------------------------------------
# Connection limits on intake; certificate checks on delivery
# --------------------------------------------------------------------------------------------


def test_intake_connection_limits_have_defaults_and_are_read(tmp_path: Path) -> None:
    default = load_config(write(tmp_path, BASE)).intake
    assert (default.max_connections_per_client, default.unauthenticated_timeout, default.data_timeout) == (10, 60.0, 300.0)
    intake = load_config(write(tmp_path, BASE + "[intake]\nmax_connections_per_client = 3\n"
                                                "unauthenticated_timeout = 5\ndata_timeout = 30\n")).intake
    assert (intake.max_connections_per_client, intake.unauthenticated_timeout, intake.data_timeout) == (3, 5.0, 30.0)


@pytest.mark.parametrize(("body", "key", "fragment"), [
    ("max_connections_per_client = 0", "max_connections_per_client", "positive integer"),
    ("unauthenticated_timeout = 0", "unauthenticated_timeout", "positive number"),
    ('data_timeout = "5m"', "data_timeout", "positive number"),
])
def test_intake_connection_limit_refusals(tmp_path: Path, body: str, key: str, fragment: str) -> None:
    refused(write(tmp_path, BASE + f"[intake]\n{body}\n"), f"[intake] {key}", fragment)


def test_delivery_verifies_by_default_and_reads_a_ca_file(tmp_path: Path) -> None:
    from raftmail.node.tls import write_self_signed
    assert load_config(write(tmp_path, BASE)).delivery.tls_verify is True
    assert load_config(write(tmp_path, BASE)).delivery.tls_ca_file is None
    write_self_signed(tmp_path / "relay", "127.0.0.1")
    delivery = load_config(write(tmp_path, BASE + '[delivery]\ntls_ca_file = "relay/cert.pem"\n')).delivery
    assert delivery.tls_ca_file == tmp_path / "relay" / "cert.pem"
    assert load_config(write(tmp_path, BASE + "[delivery]\ntls_verify = false\n")).delivery.tls_verify is False


@pytest.mark.parametrize(("body", "fragment"), [
    ('tls_ca_file = "missing.pem"', "cannot read"),
    ('tls_ca_file = "relay/key.pem"', "holds no PEM certificate"),
    ('tls_ca_file = "empty.pem"', "holds no PEM certificate"),
    ('tls_ca_file = "relay"', "cannot read"),
    ('tls_verify = "yes"', "true or false"),
])
def test_delivery_tls_refusals(tmp_path: Path, body: str, fragment: str) -> None:
    from raftmail.node.tls import write_self_signed
    write_self_signed(tmp_path / "relay", "127.0.0.1")
    (tmp_path / "empty.pem").write_text("# nothing here\n")
    key = body.split(" ")[0]
    refused(write(tmp_path, BASE + f"[delivery]\n{body}\n"), f"[delivery] {key}", fragment)


def test_strangers_share_is_half_of_max_connections_unless_set(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, BASE)).intake.max_stranger_connections == 100
    config = load_config(write(tmp_path, BASE + "\n[intake]\nmax_connections = 31\n"))
    assert config.intake.max_stranger_connections == 15
    config = load_config(write(tmp_path, BASE + "\n[intake]\nmax_connections = 31\nmax_stranger_connections = 31\n"))
    assert config.intake.max_stranger_connections == 31
    refused(write(tmp_path, BASE + "\n[intake]\nmax_connections = 30\nmax_stranger_connections = 31\n"),
            "[intake] max_stranger_connections", "at most max_connections (30)")
    refused(write(tmp_path, BASE + "\n[intake]\nmax_stranger_connections = 0\n"), "[intake] max_stranger_connections")


# ---------------------------------------------------------------- admin tokens, feedback keys, the example secret


def test_a_31_byte_secret_is_refused(tmp_path: Path) -> None:
    refused(write(tmp_path, BASE.replace(SECRET, "s" * 31)), "[cluster] secret", "31 bytes", "at least 32")
    assert load_config(write(tmp_path, BASE.replace(SECRET, "s" * 32))).cluster.secret == "s" * 32


def test_the_example_secret_is_refused_off_loopback(tmp_path: Path) -> None:
    from raftmail.node.config import EXAMPLE_SECRET
    example = BASE.replace(SECRET, EXAMPLE_SECRET)
    assert load_config(write(tmp_path, example)).cluster.secret == EXAMPLE_SECRET  # loopback: fine
    message = refused(write(tmp_path, example.replace('smtp = "127.0.0.1:2501"', 'smtp = "192.0.2.10:2501"')),
                      "[cluster] secret", "example", "loopback", "raftmail secret")
    assert EXAMPLE_SECRET not in message


def test_the_example_file_secret_is_the_one_refused_off_loopback() -> None:
    from raftmail.node.config import EXAMPLE_SECRET
    assert f'secret = "{EXAMPLE_SECRET}"' in EXAMPLE.read_text()


def test_unsubscribe_links_need_their_own_feedback_key(tmp_path: Path) -> None:
    text = CLUSTER + NODES + '[delivery]\nunsubscribe_url = "https://u.example/{token}"\n'
    refused(write(tmp_path, text), "[feedback] unsubscribe_secret", "required", "unsubscribe_url")
    refused(write(tmp_path, CLUSTER + NODES + '[feedback]\nbounce_domain = "b.example.com"\n'),
            "[feedback] unsubscribe_secret", "required", "bounce_domain")
    short = BASE.replace(FEEDBACK_KEY, "k" * 20)
    message = refused(write(tmp_path, short), "[feedback] unsubscribe_secret", "20 bytes", "32")
    assert "k" * 20 not in message
    refused(write(tmp_path, BASE.replace(FEEDBACK_KEY, SECRET)), "[feedback] unsubscribe_secret", "must differ")
    rotated = BASE.replace(f'["{FEEDBACK_KEY}"]', f'["{"n" * 32}", "{FEEDBACK_KEY}"]')
    assert load_config(write(tmp_path, rotated)).feedback.unsubscribe_secret == ("n" * 32, FEEDBACK_KEY)


def test_the_old_token_key_is_refused_with_where_it_went(tmp_path: Path) -> None:
    old = BASE.replace('data_dir = "state"\n', f'data_dir = "state"\ntoken_key = "{FEEDBACK_KEY}"\n')
    message = refused(write(tmp_path, old), "[cluster] token_key", "no longer read", "[feedback] unsubscribe_secret")
    assert FEEDBACK_KEY not in message


def test_feedback_section(tmp_path: Path) -> None:
    text = with_feedback('bounce_domain = "Bounces.Example.COM."\nunsubscribe_mailto = "unsub.example.com"\n'
                         'unsubscribe_scope = "cluster"\nfeedback_id = "acme:news"\n')
    fb = load_config(write(tmp_path, text)).feedback
    assert (fb.bounce_domain, fb.unsubscribe_mailto, fb.unsubscribe_scope, fb.feedback_id) == (
        "bounces.example.com", "unsub.example.com", "cluster", "acme:news")
    assert fb.domains() == {"bounces.example.com", "unsub.example.com"}
    refused(write(tmp_path, with_feedback('unsubscribe_scope = "world"\n')), "[feedback] unsubscribe_scope", '"domain"')
    refused(write(tmp_path, with_feedback('bounce_domain = "not a domain"\n')), "[feedback] bounce_domain")
    refused(write(tmp_path, with_feedback('feedback_id = "a b"\n')), "[feedback] feedback_id", "without spaces")
    refused(write(tmp_path, with_feedback('unsubscribe_secrets = []\n')), "[feedback] unsubscribe_secrets", "unknown key")


def test_node_http_and_bare_newline(tmp_path: Path) -> None:
    with_http = BASE.replace('admin = "127.0.0.1:8101"\n', 'admin = "127.0.0.1:8101"\nhttp = "127.0.0.1:8443"\n')
    refused(write(tmp_path, with_http), "[delivery] unsubscribe_url", "http")
    config = load_config(write(tmp_path, with_http + '[delivery]\nunsubscribe_url = "https://u.example/u/{token}"\n'))
    assert str(config.node("n1").http) == "127.0.0.1:8443" and config.node("n2").http is None
    clash = BASE.replace('admin = "127.0.0.1:8101"\n', 'admin = "127.0.0.1:8101"\nhttp = "127.0.0.1:2502"\n')
    refused(write(tmp_path, clash), "[[node]] n", "already used")
    assert load_config(write(tmp_path, BASE)).intake.bare_newline == "normalize"
    assert load_config(write(tmp_path, BASE + '[intake]\nbare_newline = "reject"\n')).intake.bare_newline == "reject"
    refused(write(tmp_path, BASE + '[intake]\nbare_newline = "yes"\n'), "[intake] bare_newline", '"normalize"')


def test_read_token_needs_an_admin_token_and_differs_from_it(tmp_path: Path) -> None:
    read = 'read_token = "read-token-0123456789"\n'
    refused(write(tmp_path, BASE.replace('data_dir = "state"\n', 'data_dir = "state"\n' + read)),
            "[cluster] read_token", "admin_token is not")
    both = 'admin_token = "read-token-0123456789"\n' + read
    refused(write(tmp_path, BASE.replace('data_dir = "state"\n', 'data_dir = "state"\n' + both)),
            "[cluster] read_token", "must differ")
    spaced = 'admin_token = "admin token with spaces 0123"\n'
    refused(write(tmp_path, BASE.replace('data_dir = "state"\n', 'data_dir = "state"\n' + spaced)),
            "[cluster] admin_token", "without spaces")


def test_a_non_loopback_admin_address_needs_an_admin_token(tmp_path: Path) -> None:
    from raftmail.node.config import check_admin_exposure
    text = BASE.replace('admin = "127.0.0.1:8101"', 'admin = "192.0.2.10:8101"')
    config = load_config(write(tmp_path, text))  # the file is fine for the CLI ...
    with pytest.raises(ConfigError) as caught:
        check_admin_exposure(config, "n1")  # ... but node n1 may not start without a token
    assert "[cluster] admin_token" in str(caught.value) and "192.0.2.10:8101" in str(caught.value)
    check_admin_exposure(config, "n2")  # n2's admin address is loopback
    tokened = text.replace('data_dir = "state"\n', 'data_dir = "state"\nadmin_token = "admin-token-0123456789"\n')
    check_admin_exposure(load_config(write(tmp_path, tokened)), "n1")

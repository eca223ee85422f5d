"""Template objects and rendering (node/templates.py) and the API's [api] section, without a
cluster: deterministic copies, MIME structure, per-recipient failures, the sandbox's bounds."""
from __future__ import annotations

import time
from email import message_from_bytes, policy

import pytest

from raftmail.node.templates import RenderLimits, TemplateFailure, build_object, compile_problems, render_copy

pytestmark = pytest.mark.timeout(60)

LIMITS = RenderLimits(max_template_bytes=4096, max_rendered_bytes=65536, max_render_seconds=0.2)
CONTENT = {"from": ["news@shop.test", "Shöp"], "reply_to": ["help@shop.test", None], "subject": "Hi {{ name }}",
           "text_body": "Code {{ code }}\n", "html_body": "<p>{{ name }}</p>", "headers": [["X-Code", "{{ code }}"]],
           "attachments": [[b"%PDF-1.4\n", "application/pdf", "terms.pdf"]]}


def obj(content: dict = CONTENT, rcpts: list | None = None) -> bytes:
    return build_object(content, {"code": "ALL"}, rcpts or [["Ann <x>", {"code": "A1"}], [None, {}]], 1_700_000_000.0)


def test_a_copy_is_the_same_bytes_every_time_and_carries_its_own_data() -> None:
    blob = obj()
    first = render_copy(blob, "d1", 0, "ann@x.test", LIMITS)
    assert render_copy(blob, "d1", 0, "ann@x.test", LIMITS) == first
    m = message_from_bytes(first, policy=policy.SMTP)
    assert (m["Subject"], m["To"], m["X-Code"]) == ("Hi Ann <x>", '"Ann <x>" <ann@x.test>', "A1")
    assert m["From"] == "Shöp <news@shop.test>" and b"=?utf-8?" in first  # RFC 2047 on the wire
    assert m["Date"] == "Tue, 14 Nov 2023 22:13:20 +0000" and m["Message-ID"] is None  # the sender adds it
    assert m.get_content_type() == "multipart/mixed"
    assert [p.get_content_type() for p in m.walk()] == ["multipart/mixed", "multipart/alternative", "text/plain",
                                                         "text/html", "application/pdf"]
    assert m.get_body(("html",)).get_content() == "<p>Ann &lt;x&gt;</p>\r\n"  # HTML bodies are escaped
    other = message_from_bytes(render_copy(blob, "d1", 1, "bob@x.test", LIMITS), policy=policy.SMTP)
    assert other["To"] == "bob@x.test" and other["X-Code"] == "ALL"
    assert m.get_boundary() != other.get_boundary()


def test_a_raw_template_gets_crlf_and_a_date() -> None:
    blob = obj({"raw": "From: a@shop.test\nTo: {{ email }}\nSubject: {{ code }}\n\nHi\n"}, [[None, {"code": "Z"}]])
    assert render_copy(blob, "d2", 0, "b@x.test", LIMITS) == (
        b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\nFrom: a@shop.test\r\nTo: b@x.test\r\nSubject: Z\r\n\r\nHi\r\n")


@pytest.mark.parametrize("template, why", [
    ("{{ 1 // n }}", "ZeroDivisionError"),
    ("{{ a.b.c }}", "UndefinedError"),
    ("{{ ''.__class__.__mro__ }}", "SecurityError"),
    ("{{ 'x' * 100000000 }}", "output size"),
    ("{{ 'x'.center(999999999) }}", "output size"),
    ("{{ 'x'|center(999999999) }}", "output size"),
    ("{{ '%999999999d' % 1 }}", "output size"),
    ("{{ '{:>999999999}'.format(1) }}", "output size"),
    ("{% for i in range(60000) %}{% for j in range(60000) %}{% endfor %}{% endfor %}", "longer than"),
    ("{% for i in range(100000) %}{% endfor %}", "output size"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
])
def test_a_template_that_fails_for_a_recipient_says_why_within_the_bounds(template: str, why: str) -> None:
    content = {"raw": "Subject: x\r\n\r\n" + template}
    assert compile_problems(content, LIMITS) == {}
    started = time.monotonic()
    with pytest.raises(TemplateFailure, match=why):
        render_copy(obj(content, [[None, {"n": 0}]]), "d-" + template, 0, "a@x.test", LIMITS)
    assert time.monotonic() - started < 2


def test_a_subject_cannot_smuggle_headers() -> None:
    content = dict(CONTENT, subject="{{ code }}")
    with pytest.raises(TemplateFailure, match="linefeed|carriage"):
        render_copy(obj(content, [[None, {"code": "x\r\nBcc: all@x.test"}]]), "d3", 0, "a@x.test", LIMITS)


def test_templates_that_do_not_compile_or_are_too_large_are_named() -> None:
    assert set(compile_problems(dict(CONTENT, subject="{% if %}", text_body="{{ x"), LIMITS)) == {
        "content.subject", "content.text_body"}
    assert list(compile_problems({"raw": "x" * 5000}, LIMITS)) == ["content"]
    # Constant expressions are evaluated while compiling: bounded there too, then left for rendering.
    started = time.monotonic()
    assert compile_problems({"raw": "{{ 'x'|center(999999999) }}"}, LIMITS) == {}
    assert time.monotonic() - started < 1


def test_the_api_section_reads_keys_and_bounds(tmp_path) -> None:
    from raftmail.node.auth import hash_password
    from raftmail.node.config import ConfigError, load_config
    from test_config import CLUSTER, NODES
    path = tmp_path / "c.toml"
    path.write_text(CLUSTER + NODES + f'[api]\nmax_recipients = 10\nrecipients_per_submission = 5\n'
                                      f'allow_networks = ["10.0.0.0/8"]\n[api.keys]\nweb = "{hash_password("s")}"\n')
    api = load_config(path).api
    assert (api.max_recipients, api.recipients_per_submission, list(api.keys)) == (10, 5, ["web"])
    path.write_text(CLUSTER + NODES + '[api.keys]\nweb = "plain"\n')
    with pytest.raises(ConfigError, match=r"\[api.keys\] web: is not a password hash"):
        load_config(path)
    path.write_text(CLUSTER + NODES + '[api]\nmax_recipients = 10\nrecipients_per_submission = 50\n')
    with pytest.raises(ConfigError, match="recipients_per_submission"):
        load_config(path)


SHAPES = {
    "text and html": {},
    "text only": {"html_body": None, "attachments": []},
    "html only": {"text_body": None, "attachments": []},
    "non-ascii everywhere": {"from": ["news@shop.test", "Bäckerei Müller, Köln"], "subject": "Grüße, {{ name }} — "
                             "ein sehr langer Betreff, der gefaltet werden muss, weil er länger als eine Zeile ist",
                             "text_body": "Schöne Grüße\n{{ code }}\n", "headers": [["X-Note", "Straße {{ code }}"]]},
    "long ascii subject and lines": {"subject": "word " * 40 + "{{ code }}", "text_body": "x" * 2000 + "\nend\n"},
    "attachments with hard names": {"attachments": [[bytes(range(256)) * 40, "application/octet-stream",
                                                     'a "quoted" \\ name.bin'],
                                                    [b"hello", "text/plain", "Übersicht.txt"]]},
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_shape_of_copy_parses_back_to_what_was_asked(shape: str) -> None:
    content = {**CONTENT, **SHAPES[shape]}
    content = {k: v for k, v in content.items() if v is not None}
    raw = render_copy(obj(content, [["Zoë O'Brien", {"code": "C-1"}]]), "d-" + shape, 0, "zoe@x.test", LIMITS)
    assert raw.isascii() and all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert b"\n" not in raw.replace(b"\r\n", b"")
    m = message_from_bytes(raw, policy=policy.default)
    name = "Zoë O'Brien"
    assert m["From"].addresses[0].display_name == (content["from"][1] or "")
    assert m["To"].addresses[0].display_name == name and m["To"].addresses[0].addr_spec == "zoe@x.test"
    assert m["Subject"] == content["subject"].replace("{{ name }}", name).replace("{{ code }}", "C-1")
    for header, template in content["headers"]:
        assert m[header] == template.replace("{{ code }}", "C-1")
    text, html = m.get_body(("plain",)), m.get_body(("html",))
    if content.get("text_body") is not None:
        expected = content["text_body"].replace("{{ code }}", "C-1")
        assert text.get_content().replace("\r\n", "\n") == expected
    if content.get("html_body") is not None:
        assert html.get_content().replace("\r\n", "\n") == "<p>Zoë O&#39;Brien</p>\n"
    attachments = [(p.get_content(), p.get_content_type(), p.get_filename()) for p in m.iter_attachments()]
    assert attachments == [(d if t != "text/plain" else d.decode(), t, f) for d, t, f in content["attachments"]]

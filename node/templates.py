"""Templates of the HTTP injection API: the stored template object, its checks, and each
recipient's copy rendered from it just before sending.

A request is stored once, as one content-addressed object in the body store (msgpack): the
content, the request-wide substitutions, each recipient's name and substitutions in request
order, and the time it was accepted. The log holds only per-recipient metadata; a copy is
rendered from the object on the sending node, the same bytes on every retry and every node:
the Date is the acceptance time, MIME boundaries derive from the object and the position, and
nothing else varies (Message-ID, List-Unsubscribe and DKIM are added as for SMTP mail,
node/message.py).

Jinja2 runs in its immutable sandbox (callers are not trusted with Python objects), with bounds
on the rendered size and the time per copy: the time is checked at every call, loop step of
`range` and output chunk, and operators and calls that would build one huge value (`"x" * n`,
`"x".center(n)`, `"%9999999d" % 1`) are refused before they run.
"""
from __future__ import annotations

import base64
import hashlib
import re
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from email.charset import QP, Charset
from email.header import Header
from email.utils import encode_rfc2231, format_datetime, formataddr
from typing import Any, Iterator

import msgpack
from jinja2 import Template, TemplateError as JinjaError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from raftmail.node.content import with_date
from raftmail.node.intake import Intake

KIND = "raftmail.template/1"  # first key of every template object
CACHE_OBJECTS = 8  # compiled objects kept per node process (a batch uses one)
MAX_EXPONENT = 256
# Headers the caller may not set: the builder, delivery or render_for_recipient own them.
OWNED_HEADERS = frozenset({"from", "to", "reply-to", "subject", "date", "message-id", "mime-version",
                           "content-type", "content-transfer-encoding", "content-disposition", "return-path",
                           "list-unsubscribe", "list-unsubscribe-post", "dkim-signature"})
_FORMAT_WIDTH = re.compile(r"%[-#0 +]*(\d+)|\{[^{}]*:[^{}]*?(\d+)[^{}]*\}")


class TemplateFailure(ValueError):
    """A template does not compile, or does not render for one recipient's data."""


@dataclass(frozen=True)
class RenderLimits:
    max_template_bytes: int = 1048576
    max_rendered_bytes: int = 2097152
    max_render_seconds: float = 0.25


# ------------------------------------------------------------------------------- the sandbox

_clock = threading.local()  # this thread's copy being rendered: deadline and byte budget


@contextmanager
def _bounded(limits: "RenderLimits") -> Iterator[None]:
    """Bounds for this thread while it compiles or renders one copy (compiling evaluates constant
    expressions, so it is bounded too)."""
    _clock.deadline = time.monotonic() + limits.max_render_seconds
    _clock.budget = limits.max_rendered_bytes
    try:
        yield
    finally:
        _clock.deadline, _clock.budget = float("inf"), 1 << 62


def _check_clock() -> None:
    if time.monotonic() > getattr(_clock, "deadline", float("inf")):
        raise TemplateFailure("rendering took longer than the limit")


def _check_size(n: int) -> None:
    if n > getattr(_clock, "budget", 1 << 62):
        raise TemplateFailure("rendering would exceed the output size limit")


def _check_format(fmt: Any) -> None:
    if isinstance(fmt, str):
        for m in _FORMAT_WIDTH.finditer(fmt):
            _check_size(int(m.group(1) or m.group(2)))


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_clock()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    _check_size(len(seq) * n)
        elif operator == "**" and isinstance(right, int) and abs(right) > MAX_EXPONENT:
            raise TemplateFailure(f"exponent over {MAX_EXPONENT}")
        elif operator == "%":
            _check_format(left)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's names)
        _check_clock()
        for a in (*args, *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool):
                _check_size(a)  # widths and counts: "x".center(n), "x".ljust(n), range is bounded apart
        if getattr(__obj, "__name__", "") in ("format", "format_map"):
            _check_format(getattr(__obj, "__self__", None))
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Any:
        wrapped = super().wrap_str_format(value)  # str.format and format_map come through here
        if wrapped is None:
            return None

        def checked(*args: Any, **kwargs: Any) -> str:
            _check_format(value.__self__)
            return wrapped(*args, **kwargs)
        return checked


def _bounded_range(*args: int) -> Iterator[int]:
    if len(range(*args)) > 100000:
        raise TemplateFailure("range over 100000 items")
    for i in range(*args):
        _check_clock()
        yield i


def _wrap_filter(f: Any, formats: bool = False) -> Any:
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _check_clock()
        for a in (*args[1:], *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool):
                _check_size(a)
        if formats and args:
            _check_format(args[0])
        return f(*args, **kwargs)
    for attr in ("jinja_pass_arg",):
        if hasattr(f, attr):
            setattr(bounded, attr, getattr(f, attr))
    return bounded


def _environment(autoescape: bool) -> _Sandbox:
    # Not optimized: the optimizer evaluates constant expressions while compiling.
    env = _Sandbox(autoescape=autoescape, keep_trailing_newline=True, optimized=False)
    env.globals["range"] = _bounded_range
    for name in ("center", "indent", "wordwrap", "truncate", "format"):
        env.filters[name] = _wrap_filter(env.filters[name], formats=name == "format")
    return env


_TEXT = _environment(autoescape=False)
_HTML = _environment(autoescape=True)


# ------------------------------------------------------------------------------- the object

def templated_fields(content: dict) -> list[tuple[str, str]]:
    """(field name as the caller wrote it, template text) of a content value, in a fixed order."""
    if "raw" in content:
        return [("content", content["raw"])]
    out = [("content.subject", content["subject"])]
    out += [(f"content.{k}", content[k]) for k in ("text_body", "html_body") if content.get(k) is not None]
    out += [(f"content.headers.{name}", value) for name, value in content["headers"]]
    return out


def compile_problems(content: dict, limits: RenderLimits) -> dict[str, str]:
    """field -> why, for every template of `content` that is too large or does not compile."""
    fields = templated_fields(content)
    total = sum(len(text.encode("utf-8", "surrogatepass")) for _, text in fields)
    if total > limits.max_template_bytes:
        return {"content": f"templates are {total} bytes together, at most {limits.max_template_bytes}"}
    problems = {}
    for name, text in fields:
        try:
            with _bounded(limits):
                (_HTML if name == "content.html_body" else _TEXT).from_string(text)
        except TemplateFailure as e:
            problems[name] = f"template does not compile: {e}"
        except JinjaError as e:
            line = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
            problems[name] = f"template does not compile{line}: {e.message if hasattr(e, 'message') else e}"
    return problems


def build_object(content: dict, substitutions: dict, recipients: list[list], accepted_at: float) -> bytes:
    """The stored object: `recipients` are [name or None, substitutions] in position order."""
    return msgpack.packb({"kind": KIND, "date": accepted_at, "content": content, "subs": substitutions,
                          "rcpts": recipients}, use_bin_type=True)


@dataclass
class _Compiled:
    date: float
    content: dict
    subs: dict
    rcpts: list
    templates: dict[str, Template]
    _attachments: list[str] | None = None

    def attachment_parts(self) -> list[str]:
        """The attachments' MIME parts: the same for every copy, so encoded once."""
        if self._attachments is None:
            self._attachments = [_attachment_part(*a) for a in self.content.get("attachments", ())]
        return self._attachments


_cache: "OrderedDict[str, _Compiled]" = OrderedDict()
_cache_lock = threading.Lock()


def _compiled(digest: str, data: bytes, limits: RenderLimits) -> _Compiled:
    with _cache_lock:
        hit = _cache.get(digest)
        if hit is not None:
            _cache.move_to_end(digest)
            return hit
    obj = msgpack.unpackb(data, raw=False)
    if not isinstance(obj, dict) or obj.get("kind") != KIND:
        raise TemplateFailure("the stored body is not a template object")
    with _bounded(limits):
        templates = {name: (_HTML if name == "content.html_body" else _TEXT).from_string(text)
                     for name, text in templated_fields(obj["content"])}
    for template in templates.values():
        # A template's globals are a ChainMap over its environment's, which Jinja copies into
        # every render's context key by key in Python: 40 % of a copy's render time. Ours are
        # fixed when the module loads, so a plain dict of the same names renders the same.
        template.globals = dict(template.globals)
    entry = _Compiled(obj["date"], obj["content"], obj["subs"], obj["rcpts"], templates)
    with _cache_lock:
        _cache[digest] = entry
        while len(_cache) > CACHE_OBJECTS:
            _cache.popitem(last=False)
    return entry


def render_copy(data: bytes, digest: str, position: int, address: str, limits: RenderLimits) -> bytes:
    """The message of the recipient at `position` (CRLF line ends, no Message-ID: the sender adds
    it). Raises TemplateFailure with the reason when this recipient's data does not render."""
    obj = _compiled(digest, data, limits)
    if not 0 <= position < len(obj.rcpts):
        raise TemplateFailure(f"no recipient data at position {position}")
    name, own = obj.rcpts[position]
    context = {**obj.subs, "email": address, **({"name": name} if name is not None else {}), **own}
    try:
        with _bounded(limits):
            text = {field: _render(t, context) for field, t in obj.templates.items()}
    except TemplateFailure:
        raise
    except Exception as e:  # the caller's template met this recipient's data
        raise TemplateFailure(f"template failed for this recipient: {type(e).__name__}: {e}") from None
    if "raw" in obj.content:
        message = re.sub(r"\r?\n|\r", "\r\n", text["content"]).encode("utf-8", "surrogateescape")
        refusal = Intake.content_refusal(message)  # what SMTP intake refuses, a rendered copy may not be
        if refusal:
            raise TemplateFailure(f"the rendered message is refused: {refusal}")
        return with_date(message, obj.date)
    try:
        return _assemble(obj, text, name, address, digest, position)
    except Exception as e:  # e.g. a line break a substitution put into a header
        raise TemplateFailure(f"the copy cannot be built for this recipient: {e}") from None


def _render(template: Template, context: dict) -> str:
    out: list[str] = []
    size = 0
    for chunk in template.generate(context):
        size += len(chunk)
        _check_size(size)
        _check_clock()
        out.append(chunk)
    _clock.budget -= size  # one budget for every field of the copy
    return "".join(out)


def _assemble(obj: _Compiled, text: dict[str, str], name: str | None, address: str, digest: str,
              position: int) -> bytes:
    """MIME from the standard library's encoders (RFC 2047 headers, quoted-printable and base64
    bodies, RFC 2231 file names), laid out as the email package lays it out: text and HTML as
    multipart/alternative, attachments after it in multipart/mixed. Written directly rather than
    through EmailMessage, whose header registry cost 1.7 ms per copy; the tests parse every shape
    back with the email package."""
    c = obj.content
    head = [_address_header("From", c["from"]), _address_header("To", [address, name])]
    if c.get("reply_to"):
        head.append(_address_header("Reply-To", c["reply_to"]))
    head.append(_header("Subject", text["content.subject"]))
    head.append(f"Date: {format_datetime(datetime.fromtimestamp(obj.date, timezone.utc))}{CRLF}")
    head += [_header(header, text[f"content.headers.{header}"]) for header, _ in c["headers"]]
    head.append(f"MIME-Version: 1.0{CRLF}")
    plain, html = text.get("content.text_body"), text.get("content.html_body")
    parts = [_text_part(plain, "plain")] if plain is not None else []
    if html is not None or plain is None:
        parts.append(_text_part(html or "", "html"))
    # Boundaries from the object and the position, so every rendering of this copy is the same.
    seed = hashlib.sha256(f"{digest}:{position}".encode()).hexdigest()[:24]
    boundaries = iter(f"=_rm_{seed}_{n}" for n in range(2))
    attachments = obj.attachment_parts()
    outer = next(boundaries) if attachments else None
    body = parts[0] if len(parts) == 1 else _multipart("alternative", next(boundaries), parts)
    if outer is not None:
        body = _multipart("mixed", outer, [body, *attachments])
    return ("".join(head) + body).encode("ascii")


CRLF = "\r\n"
MAX_LINE = 998  # characters of a line without its CRLF (RFC 5322 2.1.1)
_QP = Charset("utf-8")
_QP.body_encoding = QP


def _no_line_break(what: str, value: str) -> None:
    if "\r" in value or "\n" in value:
        raise ValueError(f"{what} contains a linefeed or carriage return")


def _header(name: str, value: str) -> str:
    """One header field, folded at 78 columns; RFC 2047 encoded words when it is not ASCII."""
    _no_line_break(name, value)
    if value.isascii() and len(name) + 2 + len(value) <= 78:
        return f"{name}: {value}{CRLF}"
    charset = "us-ascii" if value.isascii() else "utf-8"
    return f"{name}: {Header(value, charset, maxlinelen=78, header_name=name).encode(linesep=CRLF)}{CRLF}"


def _address_header(name: str, pair: list) -> str:
    email, display = pair[0], pair[1] if len(pair) > 1 else None
    _no_line_break(name, email + (display or ""))
    return _header(name, formataddr((display or "", email), charset="utf-8"))


def _text_part(text: str, subtype: str) -> str:
    """A text part: 7bit when it is ASCII with short lines, else quoted-printable UTF-8; it always
    ends with a line break, as with the email package's set_content."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines[-1] == "":
        lines.pop()
    if text.isascii() and all(len(line) <= MAX_LINE for line in lines):
        cte, body = "7bit", "".join(line + CRLF for line in lines)
    else:
        body = _QP.body_encode("\n".join(lines) + "\n").replace("\n", CRLF)
        cte, body = "quoted-printable", body if body.endswith(CRLF) else body + CRLF
    return f'Content-Type: text/{subtype}; charset="utf-8"{CRLF}Content-Transfer-Encoding: {cte}{CRLF}{CRLF}{body}'


def _multipart(subtype: str, boundary: str, parts: list[str]) -> str:
    # The line break before a delimiter belongs to it (RFC 2046 5.1.1): each part keeps its own.
    inner = "".join(f"--{boundary}{CRLF}{part}{CRLF}" for part in parts)
    return f'Content-Type: multipart/{subtype}; boundary="{boundary}"{CRLF}{CRLF}{inner}--{boundary}--{CRLF}'


def _attachment_part(data: bytes, content_type: str, file_name: str) -> str:
    _no_line_break("an attachment's file name", file_name)
    if file_name.isascii():
        quoted = file_name.replace("\\", "\\\\").replace('"', '\\"')
        disposition = f'attachment; filename="{quoted}"'
    else:
        disposition = f"attachment; filename*={encode_rfc2231(file_name, 'utf-8')}"
    encoded = base64.encodebytes(data).decode("ascii").replace("\n", CRLF)
    return (f"Content-Type: {content_type}{CRLF}Content-Transfer-Encoding: base64{CRLF}"
            f"Content-Disposition: {disposition}{CRLF}{CRLF}{encoded}")

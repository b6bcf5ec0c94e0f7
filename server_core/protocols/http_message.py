"""HTTP request and response objects, and the byte-level rendering of responses.

`Request` is built once per request on the hot path, so it stores the raw parser output
(method, URL, header list, body as bytes) and decodes lazily: a handler that never
looks at the headers never pays for a dict. `Response` is what handlers return when
they need a status, headers or a content type; plain `str`/`bytes`/`dict`/`list`
results are rendered by `render_result` without building a `Response`.

Invariants: every rendered response carries Content-Length (no chunked responses) and a
Date; header names and values never contain CR or LF (rejected with ValueError, so a
handler cannot split a response); HEAD responses carry no body.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs

CRLF = b"\r\n"
TEXT_TYPE = b"text/plain; charset=utf-8"
BYTES_TYPE = b"application/octet-stream"
JSON_TYPE = b"application/json"

KEEP_CLOSE = 0  # answer with Connection: close, then close
KEEP_IMPLICIT = 1  # HTTP/1.1 default keep-alive: no Connection header needed
KEEP_EXPLICIT = 2  # the client asked with Connection: keep-alive (HTTP/1.0): echo it

_METHODS = {
    m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
}
_STATUS_LINES = {
    int(s): f"HTTP/1.1 {int(s)} {s.phrase}\r\n".encode() for s in HTTPStatus
}


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        if not 100 <= status <= 999:
            raise ValueError(f"HTTP status must be 100..999, got {status}")
        line = f"HTTP/1.1 {status} Status\r\n".encode()
    return line


class Request:
    """One parsed HTTP request (method, path, query, headers, body).

    The connection builds it field by field: without an `__init__` of its own,
    `Request()` is a bare C allocation, cheaper than a Python `__init__` call by about
    a tenth of the whole hot path. `raw_headers` is a sequence of (name, value) bytes
    pairs as sent (a tuple when the head was memoized: do not mutate it).
    """

    __slots__ = ("_headers", "_method", "body", "keep_alive", "raw_headers", "url")

    _method: bytes
    url: bytes
    raw_headers: Sequence[tuple[bytes, bytes]]
    body: bytes
    keep_alive: int  # KEEP_CLOSE, KEEP_IMPLICIT or KEEP_EXPLICIT
    _headers: dict[str, str] | None  # `headers`, once built

    @property
    def method(self) -> str:
        method = self._method
        return _METHODS.get(method) or method.decode("latin-1")

    @property
    def target(self) -> str:
        """The request target as sent: path and query, not percent-decoded."""
        return self.url.decode("latin-1")

    @property
    def path(self) -> str:
        """The path part of the target, as sent (not percent-decoded)."""
        return self.url.partition(b"?")[0].decode("latin-1")

    @property
    def query(self) -> str:
        """The query string without `?` ('' when absent)."""
        return self.url.partition(b"?")[2].decode("latin-1")

    @property
    def query_params(self) -> dict[str, list[str]]:
        return parse_qs(self.query, keep_blank_values=True)

    def query_param(self, name: str, default: str | None = None) -> str | None:
        values = self.query_params.get(name)
        return values[0] if values else default

    @property
    def headers(self) -> dict[str, str]:
        """Headers with lower-case names; repeated headers joined with ', '."""
        headers = self._headers
        if headers is None:
            headers = {}
            for raw_name, raw_value in self.raw_headers:
                name = raw_name.decode("latin-1").lower()
                value = raw_value.decode("latin-1")
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
            self._headers = headers
        return headers

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)

    def text(self, encoding: str = "utf-8") -> str:
        return self.body.decode(encoding)

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target}>"


HeaderInput = Mapping[str, str] | Iterable[tuple[str, str]] | None


class Response:
    """An HTTP response with a status, headers and a body."""

    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(
        self,
        body: str | bytes = b"",
        status: int = 200,
        headers: HeaderInput = None,
        content_type: str | None = None,
    ) -> None:
        self.status = status
        if isinstance(body, str):
            self.body = body.encode()
            self.content_type = content_type or TEXT_TYPE.decode()
        else:
            self.body = bytes(body)
            self.content_type = content_type or BYTES_TYPE.decode()
        items = headers.items() if isinstance(headers, Mapping) else (headers or ())
        self.headers: list[tuple[str, str]] = [(str(k), str(v)) for k, v in items]

    @classmethod
    def json(cls, data: Any, status: int = 200, headers: HeaderInput = None) -> Response:
        return cls(_dump_json(data), status, headers, JSON_TYPE.decode())

    def render(self, date_line: bytes, keep_alive: int, head_only: bool) -> bytes:
        out = [status_line(self.status), date_line]
        has_type = False
        for name, value in self.headers:
            _check_header(name, value)
            lower = name.lower()
            if lower in ("content-length", "connection", "date", "transfer-encoding"):
                continue  # we own these: framing and connection management
            has_type = has_type or lower == "content-type"
            out.append(f"{name}: {value}\r\n".encode("latin-1"))
        no_body = self.status < 200 or self.status in (204, 304)
        if not has_type and not no_body:
            _check_header("content-type", self.content_type)
            out.append(f"Content-Type: {self.content_type}\r\n".encode("latin-1"))
        if not no_body:
            out.append(b"Content-Length: %d\r\n" % len(self.body))
        out.append(_connection_header(keep_alive))
        out.append(CRLF)
        if not head_only and not no_body:
            out.append(self.body)
        return b"".join(out)

    def __repr__(self) -> str:
        return f"<Response {self.status} {len(self.body)} bytes>"


def _check_header(name: str, value: str) -> None:
    if "\r" in name or "\n" in name or ":" in name or not name:
        raise ValueError(f"invalid header name {name!r}")
    if "\r" in value or "\n" in value:
        raise ValueError(f"invalid header value for {name}: {value!r}")


def _connection_header(keep_alive: int) -> bytes:
    if keep_alive == KEEP_CLOSE:
        return b"Connection: close\r\n"
    if keep_alive == KEEP_EXPLICIT:
        return b"Connection: keep-alive\r\n"
    return b""


def _dump_json(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def simple_head(date_line: bytes, content_type: bytes) -> bytes:
    """The fixed start of a 200 response, up to and including `Content-Length: `."""
    return (
        _STATUS_LINES[200] + date_line + b"Content-Type: " + content_type + b"\r\nContent-Length: "
    )


def render_simple(head: bytes, body: bytes, keep_alive: int, head_only: bool) -> bytes:
    """A 200 response from a precomputed `simple_head`."""
    if keep_alive == KEEP_IMPLICIT:
        if head_only:
            return b"%s%d\r\n\r\n" % (head, len(body))
        return b"%s%d\r\n\r\n%s" % (head, len(body), body)
    return b"%s%d\r\n%s\r\n%s" % (
        head,
        len(body),
        _connection_header(keep_alive),
        b"" if head_only else body,
    )


def error_response(status: int, date_line: bytes, keep_alive: int = KEEP_CLOSE) -> bytes:
    """A short plain-text error page (400, 408, 413, 431, 500, ...)."""
    phrase = _STATUS_LINES.get(status, b"").decode().split(" ", 2)[-1].strip() or "Error"
    body = f"{status} {phrase}\n".encode()
    return (
        status_line(status)
        + date_line
        + b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n" % len(body)
        + _connection_header(keep_alive)
        + CRLF
        + body
    )


def render_result(
    result: Any, date_line: bytes, heads: tuple[bytes, bytes, bytes], keep_alive: int,
    head_only: bool,
) -> bytes:
    """Render what a handler returned: str, bytes, dict/list (JSON) or a Response."""
    text_head, bytes_head, json_head = heads
    if isinstance(result, str):
        return render_simple(text_head, result.encode(), keep_alive, head_only)
    if isinstance(result, (bytes, bytearray, memoryview)):
        return render_simple(bytes_head, bytes(result), keep_alive, head_only)
    if isinstance(result, Response):
        return result.render(date_line, keep_alive, head_only)
    if isinstance(result, (dict, list)):
        return render_simple(json_head, _dump_json(result).encode(), keep_alive, head_only)
    raise TypeError(f"cannot send a {type(result).__name__} as an HTTP response")

"""svctl's own codec for the Status call: protobuf wire format <-> plain data, stdlib only.

Why: `svctl status` is a short-lived process measured against `supervisorctl status`
(issue 2), and loading google.protobuf plus the generated module costs it ~25-30 ms
of a ~200 ms run (the descriptor pool, python_message, text_format... even with the
upb backend). Status is the one call on that path, and its messages are plain
(strings, int64, double, bool, maps, repeated messages, google.protobuf.Struct), so
svctl encodes StatusRequest and decodes StatusResponse itself. Every other command
keeps using the generated messages (agent._pb).

Invariants:
- `decode_status(raw)` equals `agent.cli.to_dict(StatusResponse.FromString(raw))`:
  every field present (proto3 defaults included), in declaration order, int64 as int,
  double as float, Struct numbers that are integral as int;
- SCHEMA mirrors proto/svcd/v1/agent.proto; tests/test_cli.py rebuilds it from the
  generated descriptors and fails when they differ (add a field to the .proto: add it
  here too);
- fields the schema does not know (a newer agent) are skipped, as generated code would;
  malformed input raises WireError, never returns half a status.
"""

from __future__ import annotations

from struct import unpack_from
from typing import Any

# Field kinds: scalar names, a message name (its SCHEMA entry), or a map.
STRING = "string"
INT64 = "int64"
DOUBLE = "double"
BOOL = "bool"
ENUM = "enum"  # google.protobuf.NullValue only: decoded to None, like to_dict does
STRUCT = "google.protobuf.Struct"
VALUE = "google.protobuf.Value"
LIST_VALUE = "google.protobuf.ListValue"

#: (number, name, kind, repeated); a map field is ("map", key kind, value kind).
Field = tuple[int, str, "str | tuple[str, str, str]", bool]
SCHEMA: dict[str, tuple[Field, ...]] = {
    "svcd.v1.StatusResponse": (
        (1, "agent", "svcd.v1.AgentInfo", False),
        (2, "services", "svcd.v1.ServiceStatus", True),
    ),
    "svcd.v1.AgentInfo": (
        (1, "name", STRING, False),
        (2, "version", STRING, False),
        (3, "pid", INT64, False),
        (4, "uptime_s", DOUBLE, False),
        (5, "registry", STRING, False),
    ),
    "svcd.v1.ServiceStatus": (
        (1, "name", STRING, False),
        (2, "state", STRING, False),
        (3, "desired", INT64, False),
        (4, "ready", INT64, False),
        (5, "generation", INT64, False),
        (6, "workers", "svcd.v1.WorkerStatus", True),
        (7, "listen", STRING, True),
        (8, "required_ready", INT64, False),
        (9, "reloads", INT64, False),
        (10, "advertise", STRING, False),
        (11, "meta", ("map", STRING, STRING), False),
        (12, "log_lines_dropped", INT64, False),
        (13, "log_lines_cut", INT64, False),
    ),
    "svcd.v1.WorkerStatus": (
        (1, "worker", STRING, False),
        (2, "index", INT64, False),
        (3, "pid", INT64, False),
        (4, "generation", INT64, False),
        (5, "state", STRING, False),
        (6, "ready", BOOL, False),
        (7, "health", STRING, False),
        (8, "restarts", INT64, False),
        (9, "uptime_s", DOUBLE, False),
        (10, "rss_bytes", DOUBLE, False),
        (11, "cpu_percent", DOUBLE, False),
        (12, "connections", INT64, False),
        (13, "requests", INT64, False),
        (14, "qps", DOUBLE, False),
        (15, "cpu_seconds", DOUBLE, False),
        (16, "send_fail", INT64, False),
        (17, "timers", INT64, False),
        (18, "bytes_in", INT64, False),
        (19, "bytes_out", INT64, False),
        (20, "started_at", DOUBLE, False),
        (21, "health_reason", STRING, False),
        (22, "status_text", STRING, False),
        (23, "last_exit", STRING, False),
        (24, "exit_counts", ("map", STRING, INT64), False),
        (25, "metrics", STRUCT, True),
        (26, "num_fds", INT64, False),
        (27, "num_threads", INT64, False),
        (28, "last_exit_reason", STRING, False),
    ),
    STRUCT: ((1, "fields", ("map", STRING, VALUE), False),),
    VALUE: (
        (1, "null_value", ENUM, False),
        (2, "number_value", DOUBLE, False),
        (3, "string_value", STRING, False),
        (4, "bool_value", BOOL, False),
        (5, "struct_value", STRUCT, False),
        (6, "list_value", LIST_VALUE, False),
    ),
    LIST_VALUE: ((1, "values", VALUE, True),),
}

# Wire types (https://protobuf.dev/programming-guides/encoding/).
VARINT = 0
I64 = 1
LEN = 2
I32 = 5
TAG_BITS = 3
UINT64 = 1 << 64
INT64_SIGN = 1 << 63
MAX_VARINT_SHIFT = 63  # a varint is at most 10 bytes
#: The largest integer a double holds exactly: bigger integral Struct numbers stay floats.
EXACT_FLOAT_INT = 2**53
DEFAULTS: dict[str, Any] = {STRING: "", INT64: 0, DOUBLE: 0.0, BOOL: False, ENUM: 0}
_WIRE_TYPE = {STRING: LEN, INT64: VARINT, DOUBLE: I64, BOOL: VARINT, ENUM: VARINT}


class WireError(ValueError):
    """The bytes are not a well-formed message of the expected type."""


def encode_status_request(service: str) -> bytes:
    """svcd.v1.StatusRequest{service}: field 1, a string (empty: omitted, as proto3 does)."""
    if not service:
        return b""
    data = service.encode()
    return bytes([1 << TAG_BITS | LEN]) + _encode_varint(len(data)) + data


def decode_status(raw: bytes) -> dict[str, Any]:
    """svcd.v1.StatusResponse as `svctl status --json` prints it. Raises WireError."""
    try:
        status: dict[str, Any] = _decode(memoryview(raw), "svcd.v1.StatusResponse")
    except (IndexError, UnicodeDecodeError) as exc:
        raise WireError(f"malformed StatusResponse: {exc}") from None
    return status


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > MAX_VARINT_SHIFT:
            raise WireError("varint longer than 10 bytes")


def _skip(buf: memoryview, pos: int, wire: int) -> int:
    """Past a field this schema does not know (sent by a newer agent)."""
    if wire == VARINT:
        return _varint(buf, pos)[1]
    if wire == I64:
        return pos + 8
    if wire == LEN:
        size, pos = _varint(buf, pos)
        return pos + size
    if wire == I32:
        return pos + 4
    raise WireError(f"unsupported wire type {wire}")


def _default(kind: str | tuple[str, str, str], repeated: bool) -> Any:
    if repeated:
        return []
    if isinstance(kind, tuple):
        return {}
    if kind in DEFAULTS:
        return DEFAULTS[kind]
    return _decode(memoryview(b""), kind)


def _scalar(buf: memoryview, pos: int, kind: str, wire: int) -> tuple[Any, int]:
    if wire != _WIRE_TYPE[kind]:
        raise WireError(f"{kind} field with wire type {wire}")
    if kind == STRING:
        size, pos = _varint(buf, pos)
        end = pos + size
        if end > len(buf):
            raise WireError("string runs past the end")
        return str(buf[pos:end], "utf-8"), end
    if kind == DOUBLE:
        if pos + 8 > len(buf):
            raise WireError("double runs past the end")
        return unpack_from("<d", buf, pos)[0], pos + 8
    value, pos = _varint(buf, pos)
    if kind == BOOL:
        return value != 0, pos
    if kind == INT64:
        value %= UINT64
        return value - UINT64 if value >= INT64_SIGN else value, pos
    return value, pos  # ENUM


def _submessage(buf: memoryview, pos: int, wire: int) -> tuple[memoryview, int]:
    if wire != LEN:
        raise WireError(f"message field with wire type {wire}")
    size, pos = _varint(buf, pos)
    end = pos + size
    if end > len(buf):
        raise WireError("message runs past the end")
    return buf[pos:end], end


def _decode(buf: memoryview, name: str) -> Any:
    fields = SCHEMA[name]
    by_number = {f[0]: f for f in fields}
    present: dict[str, Any] = {}
    pos = 0
    end = len(buf)
    while pos < end:
        tag, pos = _varint(buf, pos)
        number, wire = tag >> TAG_BITS, tag & ((1 << TAG_BITS) - 1)
        field = by_number.get(number)
        if field is None:
            pos = _skip(buf, pos, wire)
            continue
        _, fname, kind, repeated = field
        if isinstance(kind, tuple):  # a map entry: {1: key, 2: value}
            entry, pos = _submessage(buf, pos, wire)
            key, value = _map_entry(entry, kind[1], kind[2])
            present.setdefault(fname, {})[key] = value
            continue
        if kind in DEFAULTS:
            value, pos = _scalar(buf, pos, kind, wire)
        else:
            sub, pos = _submessage(buf, pos, wire)
            value = _decode(sub, kind)
        if repeated:
            present.setdefault(fname, []).append(value)
        else:
            if name == VALUE:
                present.clear()  # a oneof: the member sent last is the one set
            present[fname] = value  # proto3: the last one wins
    if name == STRUCT:
        return {k: _plain_value(v) for k, v in present.get("fields", {}).items()}
    if name == VALUE:
        return present
    if name == LIST_VALUE:
        return present.get("values", [])
    return {f[1]: present[f[1]] if f[1] in present else _default(f[2], f[3]) for f in fields}


def _map_entry(entry: memoryview, key_kind: str, value_kind: str) -> tuple[Any, Any]:
    key = _default(key_kind, False)
    value: Any = None
    pos = 0
    while pos < len(entry):
        tag, pos = _varint(entry, pos)
        number, wire = tag >> TAG_BITS, tag & ((1 << TAG_BITS) - 1)
        if number == 1:
            key, pos = _scalar(entry, pos, key_kind, wire)
        elif number == 2 and value_kind in DEFAULTS:
            value, pos = _scalar(entry, pos, value_kind, wire)
        elif number == 2:
            sub, pos = _submessage(entry, pos, wire)
            value = _decode(sub, value_kind)
        else:
            pos = _skip(entry, pos, wire)
    if value is None:
        value = _default(value_kind, False)
    return key, value


def _plain_value(value: dict[str, Any]) -> Any:
    """A decoded google.protobuf.Value (at most one member: a oneof) as JSON, like
    agent.cli._value: integral numbers as int."""
    if not value:
        return None
    ((which, member),) = value.items()
    if which == "number_value":
        number: float = member
        return int(number) if number.is_integer() and abs(number) < EXACT_FLOAT_INT else number
    if which in ("string_value", "bool_value", "struct_value"):
        return member
    if which == "list_value":
        return [_plain_value(v) for v in member]
    return None  # null_value

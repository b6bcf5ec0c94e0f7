"""Checking one value: strings, numbers, durations, sizes, modes, signals, ids, rlimits.

Each function takes a value as TOML produced it and returns the checked value or an
`Invalid` saying why not, in the words that follow `file: key: ` in a problem. They
never raise (for any TOML value), never record anything and know nothing of tables or
keys: `table.Table` puts them together with where the value came from.
"""

from __future__ import annotations

import grp
import math
import pwd
import re
import resource
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import TypeVar

from agent.config.wording import got, hint, one_of, show

MAX_DURATION = 30 * 24 * 3600.0  #: seconds; larger values overflow timers or mean a typo
MAX_SIZE = 1 << 50  #: bytes (1 PiB)
MAX_RLIMIT = 2**63 - 1  #: rlim_t; larger is "unlimited", which users spell out
MAX_ID = 2**32 - 2  #: largest uid/gid (2**32 - 1 is "no id")
MAX_MODE = 0o777
MAX_MODE_DIGITS = 4  #: "0022", "0755"
HTTP_STATUSES = (100, 599)

DURATION_RE = re.compile(r"\s*(\d{1,15}(?:\.\d{1,9})?)\s*(ms|s|m|h)?\s*")
SIZE_RE = re.compile(r"\s*(\d{1,20}(?:\.\d{1,9})?)\s*([A-Za-z]*)\s*")
STATUS_RANGE_RE = re.compile(r"\s*(\d{3})\s*(?:-\s*(\d{3})\s*)?")

DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
#: IEC units are binary; single letters are binary too (as systemd and docker read
#: them); kB/MB/GB are decimal (SI)
SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "kb": 1000,
    "m": 1 << 20,
    "mib": 1 << 20,
    "mb": 1000**2,
    "g": 1 << 30,
    "gib": 1 << 30,
    "gb": 1000**3,
    "t": 1 << 40,
    "tib": 1 << 40,
    "tb": 1000**4,
}

RLIMITS = frozenset(n[len("RLIMIT_") :].lower() for n in dir(resource) if n.startswith("RLIMIT_"))
#: limits counted in bytes accept sizes such as "8MiB"
BYTE_RLIMITS = frozenset({"as", "core", "data", "fsize", "memlock", "msgqueue", "rss", "stack"})
UNLIMITED = ("unlimited", "infinity")

T = TypeVar("T")


@dataclass(frozen=True)
class Invalid:
    """Why a value was refused: the reason, as it reads after `file: key: `."""

    reason: str


def text(value: object, what: str = "a string") -> str | Invalid:
    """`value` when it is a string that can be passed on (no NUL, encodable as UTF-8)."""
    if not isinstance(value, str):
        return Invalid(f"must be {what}, got {got(value)}")
    if "\x00" in value:
        return Invalid("must not contain NUL characters")
    try:
        value.encode()
    except UnicodeEncodeError:
        return Invalid("must be valid UTF-8")
    return value


def string(value: object, *, empty_ok: bool = False) -> str | Invalid:
    checked = text(value)
    if isinstance(checked, str) and not checked and not empty_ok:
        return Invalid("must not be empty")
    return checked


def choice(value: object, options: Mapping[str, T]) -> T | Invalid:
    checked = text(value)
    if isinstance(checked, Invalid):
        return checked
    if checked not in options:
        did_you_mean = hint(checked, options)
        return Invalid(f"must be one of {one_of(options)}; got {show(checked)}{did_you_mean}")
    return options[checked]


def boolean(value: object) -> bool | Invalid:
    if not isinstance(value, bool):
        return Invalid(f"must be true or false, got {got(value)}")
    return value


def integer(value: object, minimum: int, maximum: int) -> int | Invalid:
    if isinstance(value, bool) or not isinstance(value, int):
        return Invalid(f"must be an integer, got {got(value)}")
    if value < minimum:
        return Invalid(f"must be >= {minimum}, got {show(value)}")
    if value > maximum:
        return Invalid(f"must be <= {maximum}, got {show(value)}")
    return value


def in_range(
    value: float, minimum: float, maximum: float, *, above: bool, unit: str
) -> float | Invalid:
    """`value` as a float when finite and in range. `above`: strictly above `minimum`."""
    shown = show(value)
    if isinstance(value, float) and not math.isfinite(value):
        return Invalid(f"must be a finite number, got {shown}")
    if above and value <= minimum:
        return Invalid(f"must be > {minimum:g}{unit}, got {shown}")
    if value < minimum:
        return Invalid(f"must be >= {minimum:g}{unit}, got {shown}")
    if value > maximum:
        return Invalid(f"must be <= {maximum:g}{unit}, got {shown}")
    return float(value)


def number(value: object, minimum: float, maximum: float, *, above: bool) -> float | Invalid:
    """A plain number (int or float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return Invalid(f"must be a number, got {got(value)}")
    return in_range(value, minimum, maximum, above=above, unit="")


def duration(value: object, *, zero_ok: bool, maximum: float) -> float | Invalid:
    """Seconds: a number, or a string with a unit ("500ms", "30s", "5m", "1h")."""
    seconds: float | int
    if isinstance(value, str):
        match = DURATION_RE.fullmatch(value)
        if match is None:
            return Invalid(
                f'must be seconds or a duration like "500ms", "30s", "5m", "1h"; got {show(value)}'
            )
        seconds = float(match.group(1)) * DURATION_UNITS[match.group(2) or "s"]
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        return Invalid(f"must be a number of seconds, got {got(value)}")
    else:
        seconds = value
    return in_range(seconds, 0.0, maximum, above=not zero_ok, unit=" s")


def size(value: object, minimum: int) -> int | Invalid:
    """Bytes: an integer, or a string like "512MiB", "1G", "100kB"."""
    if isinstance(value, str):
        match = SIZE_RE.fullmatch(value)
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in SIZE_UNITS:
            return Invalid(
                f'must be bytes or a size like "512MiB", "1G", "100kB"; got {show(value)}'
            )
        try:
            amount = Decimal(match.group(1)) * SIZE_UNITS[unit]
        except InvalidOperation:  # pragma: no cover - the regex admits only decimals
            return Invalid(f"is not a size: {show(value)}")
        if amount > MAX_SIZE:
            return Invalid(f"must be <= {MAX_SIZE} bytes, got {show(value)}")
        result = int(amount)
    elif isinstance(value, bool) or not isinstance(value, int):
        return Invalid(f'must be a size (bytes, or a string like "512MiB"), got {got(value)}')
    else:
        result = value
    if result < minimum:
        mebibytes = f' (bytes: "{value}MiB" is {value} mebibytes)' if isinstance(value, int) else ""
        return Invalid(f"must be >= {minimum} bytes, got {show(value)}{mebibytes}")
    if result > MAX_SIZE:
        return Invalid(f"must be <= {MAX_SIZE} bytes, got {show(value)}")
    return result


def mode(value: object) -> int | Invalid:
    """A permission mode: an integer (write 0o022 in TOML) or an octal string "0022"."""
    if isinstance(value, str):
        digits = value[2:] if value.lower().startswith("0o") else value
        if not (1 <= len(digits) <= MAX_MODE_DIGITS) or any(c not in "01234567" for c in digits):
            return Invalid(f'must be an octal mode like "0022", got {show(value)}')
        result = int(digits, 8)
    elif isinstance(value, bool) or not isinstance(value, int):
        return Invalid(f'must be an octal string like "0022" or an integer, got {got(value)}')
    else:
        result = value
    if not 0 <= result <= MAX_MODE:
        return Invalid(f"must be between 0 and 0o777, got {show(value)}")
    return result


def signal_name(value: object) -> str | Invalid:
    """A signal by name ("SIGTERM", "TERM", "term") or number; returned as "SIGTERM"."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return signal.Signals(value).name
        except ValueError:
            return Invalid(f"is not a signal number: {value}")
    checked = text(value, 'a signal name like "SIGTERM"')
    if isinstance(checked, Invalid):
        return checked
    upper = checked.upper()
    candidate = upper if upper.startswith("SIG") else "SIG" + upper
    names = [s.name for s in signal.Signals if not s.name.startswith("SIG_")]
    if candidate not in names:
        return Invalid(f"is not a signal name: {show(checked)}{hint(candidate, names)}")
    return candidate


def status_range(value: object) -> tuple[int, int] | Invalid:
    """`"200-399"`, `"200"` or `200`: an inclusive range of HTTP status codes."""
    if isinstance(value, int) and not isinstance(value, bool):
        low = high = value
    elif isinstance(value, str) and (match := STATUS_RANGE_RE.fullmatch(value)):
        low = int(match.group(1))
        high = int(match.group(2) or low)
    else:
        return Invalid(f'must be a status or a range like "200-399", got {got(value)}')
    lowest, highest = HTTP_STATUSES
    if not lowest <= low <= high <= highest:
        return Invalid(
            f"must be HTTP statuses from {lowest} to {highest}, low to high, got {show(value)}"
        )
    return low, high


def user_id(value: object) -> int | Invalid:
    """A user name (must exist) or a numeric uid."""
    return _account_id(value, "user", lambda name: pwd.getpwnam(name).pw_uid)


def group_id(value: object) -> int | Invalid:
    """A group name (must exist) or a numeric gid."""
    return _account_id(value, "group", lambda name: grp.getgrnam(name).gr_gid)


def _account_id(value: object, what: str, lookup: Callable[[str], int]) -> int | Invalid:
    if isinstance(value, int) and not isinstance(value, bool):
        return integer(value, 0, MAX_ID)
    checked = text(value, f"a {what} name or a numeric id")
    if isinstance(checked, Invalid):
        return checked
    if checked.isascii() and checked.isdigit() and len(checked) <= len(str(MAX_ID)):
        return integer(int(checked), 0, MAX_ID)
    try:
        return int(lookup(checked))
    except (KeyError, ValueError, OverflowError):
        return Invalid(f"no such {what}: {show(checked)}")


def rlimit(name: str, value: object) -> int | Invalid:
    """The value of resource limit `name` (one of RLIMITS): a number, a size for limits
    counted in bytes, or "unlimited"."""
    if isinstance(value, str) and value.lower() in UNLIMITED:
        return resource.RLIM_INFINITY
    if name in BYTE_RLIMITS:
        return size(value, 0)
    if isinstance(value, str):
        return Invalid(f'must be an integer or "unlimited", got {show(value)}')
    return integer(value, 0, MAX_RLIMIT)

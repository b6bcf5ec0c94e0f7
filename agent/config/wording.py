"""How a problem quotes the user's input back: type names, short values, keys, hints.

Invariants: nothing here fails on any value TOML can produce (huge integers, NaN,
control characters, lone surrogates are all shown, shortened where long), and a quoted
string is always a valid JSON string, so a message never breaks its line.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable
from datetime import date, datetime, time

MAX_SHOWN = 60  #: characters of a bad value quoted back in a message
HINT_CUTOFF = 0.6  #: difflib similarity for "did you mean"
BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")

#: TOML's types as a problem names them; first match wins (bool is an int, datetime a date)
TYPE_NAMES: tuple[tuple[type, str], ...] = (
    (bool, "a boolean"),
    (int, "an integer"),
    (float, "a float"),
    (str, "a string"),
    (list, "an array"),
    (dict, "a table"),
    (datetime, "a date-time"),
    (date, "a date"),
    (time, "a time"),
)

#: names other tools use for our keys, for "did you mean"
ALIASES = {
    "workers": "count",
    "numprocs": "count",
    "instances": "count",
    "processes": "count",
    "directory": "cwd",
    "workdir": "cwd",
    "working_directory": "cwd",
    "environment": "env",
    "autorestart": "restart",
    "stopsignal": "stop_signal",
    "kill_signal": "stop_signal",
    "port": "listen",
    "bind": "listen",
    "args": "command",
    "cmd": "command",
    "exec": "command",
    "stop_timeout": "graceful_timeout",
    "stopwaitsecs": "graceful_timeout",
    "kill_timeout": "graceful_timeout",
    "max_memory_restart": "max_memory",
    "type": "kind",
    "url": "path",
}


def type_name(value: object) -> str:
    """`a string`, `an integer`, ...: the TOML type of `value`, with its article."""
    for kind, name in TYPE_NAMES:
        if isinstance(value, kind):
            return name
    return type(value).__name__


def show(value: object) -> str:
    """A value as TOML would spell it, shortened: what the user wrote, quoted back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = value if len(value) <= MAX_SHOWN else value[:MAX_SHOWN] + "..."
        return json.dumps(text, ensure_ascii=False)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int):
        text = str(value) if abs(value) < 10**MAX_SHOWN else "(a huge integer)"
        return text
    return type_name(value)


def got(value: object) -> str:
    """`a string ("4")`: the type, and the value when it is short enough to help."""
    if isinstance(value, (bool, int, float, str)):
        return f"{type_name(value)} ({show(value)})"
    return type_name(value)


def key_part(name: str) -> str:
    """A table key as it appears in a dotted path: bare when TOML allows, else quoted."""
    if BARE_KEY_RE.fullmatch(name):
        return name
    return show(name)


def one_of(options: Iterable[str]) -> str:
    return ", ".join(show(o) for o in options)


def hint(name: str, known: Iterable[str]) -> str:
    """` (did you mean "count"?)` when `name` is another tool's word or a near miss."""
    known = list(known)
    alias = ALIASES.get(name.lower())
    if alias in known:
        return f' (did you mean "{alias}"?)'
    close = difflib.get_close_matches(name, known, n=1, cutoff=HINT_CUTOFF)
    return f' (did you mean "{close[0]}"?)' if close else ""

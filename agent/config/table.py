"""Reading one TOML table: typed getters that record every problem where it was found.

Invariants:
- Every problem lands in one `Problems` list, in the order found, named by file and by
  the dotted path of its key (`services.api.listen[1]`).
- A getter returns its `default` when the key is absent *or* its value is bad; a bad
  value is recorded and its key lands in `Table.bad`, so that checks between keys can
  skip it (a cross-check on a value already reported only adds noise).
- Every key handed out is marked seen; `finish()` reports whatever is left as an
  unknown key, with a "did you mean" when one is close.
"""

from __future__ import annotations

import enum
import math
import os
import re
import shlex
from collections.abc import Callable, Collection, Iterable, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

from agent.config import addresses, values
from agent.config.model import ConfigProblem
from agent.config.values import MAX_DURATION, Invalid
from agent.config.wording import got, hint, key_part, show

INDEXED_RE = re.compile(r"(.*?)((?:\[\d+\])+)")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: set by svcd for every worker (SPEC.md "Protocols"); a service may not override them
RESERVED_ENV = frozenset(
    {
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "SVCD_SERVICE",
        "SVCD_WORKER",
    }
)


class _Missing(enum.Enum):
    MISSING = enum.auto()


MISSING = _Missing.MISSING
D = TypeVar("D")
T = TypeVar("T")


class Problems:
    """Where every problem of one load goes, in the order found."""

    def __init__(self) -> None:
        self.items: list[ConfigProblem] = []

    def add(self, file: str, key: str, reason: str) -> None:
        self.items.append(ConfigProblem(file, key, reason))

    def add_at(self, file: str, reason: str, line: int, column: int) -> None:
        """A problem of the file's text itself, at a line and column."""
        self.items.append(ConfigProblem(file, "", reason, line, column))


class Table:
    """Typed, checked access to one TOML table; remembers the keys it handed out."""

    def __init__(
        self,
        problems: Problems,
        file: str,
        prefix: str,
        data: Mapping[str, Any],
        base_dir: str,
    ) -> None:
        self.problems = problems
        self.file = file
        self.prefix = prefix
        self.data = data
        self.base_dir = base_dir
        self.seen: set[str] = set()
        self.bad: set[str] = set()

    # -- bookkeeping

    def key(self, name: str) -> str:
        """The dotted path of `name` in this table; `name` may carry an index: listen[1]."""
        index = ""
        match = INDEXED_RE.fullmatch(name)
        if match:
            name, index = match.group(1), match.group(2)
        part = key_part(name) + index
        return f"{self.prefix}.{part}" if self.prefix else part

    def problem(self, name: str, reason: str) -> None:
        self.bad.add(name)
        self.problems.add(self.file, self.key(name), reason)

    def has(self, name: str) -> bool:
        return name in self.data

    def ok(self, *names: str) -> bool:
        """None of `names` had a bad value (cross-checks on bad values only add noise)."""
        return not self.bad.intersection(names)

    def raw(self, name: str) -> object:
        self.seen.add(name)
        return self.data.get(name, MISSING)

    def finish(self, vocabulary: Iterable[str] | None = None) -> None:
        """Report every key nobody asked for as unknown.

        The "did you mean" comes from the keys this table read, or from `vocabulary`
        for tables whose keys are open-ended (rlimits: only those present are read).
        """
        known = self.seen if vocabulary is None else sorted(vocabulary)
        for name in self.data:
            if name in self.seen:
                continue
            did_you_mean = hint(name, known)
            if name == "include" and self.prefix and vocabulary is None:
                did_you_mean = " (a top-level include must come before the first [table])"
            self.problems.add(self.file, self.key(name), "unknown key" + did_you_mean)

    def sub(self, name: str) -> Table | None:
        """A nested table, or None when absent (or not a table: reported)."""
        value = self.raw(name)
        if value is MISSING:
            return None
        if not isinstance(value, dict):
            self.problem(name, f"must be a table, got {got(value)}")
            return None
        return Table(self.problems, self.file, self.key(name), value, self.base_dir)

    def accept(self, name: str, checked: T | Invalid, default: D) -> T | D:
        """`checked` when it is a value; else record the problem and give `default`."""
        if isinstance(checked, Invalid):
            self.problem(name, checked.reason)
            return default
        return checked

    def get(self, name: str, default: D, check: Callable[[object], T | Invalid]) -> T | D:
        """The value of `name` passed through `check`; `default` when absent or bad."""
        value = self.raw(name)
        if value is MISSING:
            return default
        return self.accept(name, check(value), default)

    # -- scalars (see `values` for what each accepts)

    def string(self, name: str, default: D, *, empty_ok: bool = False) -> str | D:
        return self.get(name, default, lambda v: values.string(v, empty_ok=empty_ok))

    def choice(self, name: str, options: Mapping[str, T], default: D) -> T | D:
        return self.get(name, default, lambda v: values.choice(v, options))

    def boolean(self, name: str, default: D) -> bool | D:
        return self.get(name, default, values.boolean)

    def integer(self, name: str, default: D, *, minimum: int, maximum: int) -> int | D:
        return self.get(name, default, lambda v: values.integer(v, minimum, maximum))

    def number(
        self, name: str, default: D, *, minimum: float, maximum: float, above: bool = False
    ) -> float | D:
        return self.get(name, default, lambda v: values.number(v, minimum, maximum, above=above))

    def duration(
        self, name: str, default: D, *, zero_ok: bool = False, maximum: float = MAX_DURATION
    ) -> float | D:
        return self.get(
            name, default, lambda v: values.duration(v, zero_ok=zero_ok, maximum=maximum)
        )

    def size(self, name: str, default: D, *, minimum: int = 1) -> int | D:
        return self.get(name, default, lambda v: values.size(v, minimum))

    def mode(self, name: str, default: D) -> int | D:
        return self.get(name, default, values.mode)

    def address(self, name: str) -> tuple[str, int] | None:
        return self.get(name, None, addresses.address)

    def user_id(self, name: str, value: object) -> int | None:
        return self.accept(name, values.user_id(value), None)

    def group_id(self, name: str, value: object) -> int | None:
        return self.accept(name, values.group_id(value), None)

    # -- paths

    def resolve(self, path: str) -> str:
        """Relative paths are relative to the directory of the file that wrote them."""
        return os.path.normpath(os.path.join(self.base_dir, path))

    def path(self, name: str, default: D) -> str | D:
        text = self.string(name, None)
        return default if text is None else self.resolve(text)

    def directory(self, name: str) -> str | None:
        path = self.path(name, None)
        if path is not None and not os.path.isdir(path):
            self.problem(name, f"{show(path)} is not an existing directory")
            return None
        return path

    def readable_file(self, name: str) -> str | None:
        path = self.path(name, None)
        if path is None:
            return None
        if not os.path.isfile(path):
            self.problem(name, f"{show(path)} is not an existing file")
            return None
        if not os.access(path, os.R_OK):
            self.problem(name, f"{show(path)} is not readable")
            return None
        return path

    def socket_path(self, name: str, default: str) -> str:
        path = self.path(name, None)
        return default if path is None else self.accept(name, addresses.unix_path(path), default)

    # -- composite values

    def argv(self, name: str) -> tuple[str, ...] | None:
        """A command: an array of strings (argv), or a string split like a shell would.

        It is never run by a shell: quotes group words, nothing else is interpreted.
        """
        value = self.raw(name)
        if value is MISSING:
            return None
        words: list[str] | None
        if isinstance(value, str):
            text = self.accept(name, values.text(value), None)
            if text is None:
                return None
            try:
                words = shlex.split(text)
            except ValueError as exc:
                self.problem(name, f"cannot split into words: {exc}")
                return None
        elif isinstance(value, list):
            words = self._items(name, value, empty_ok=True)
            if words is None:
                return None
        else:
            self.problem(name, f"must be an array of strings or a string, got {got(value)}")
            return None
        if not words or not words[0]:
            self.problem(name, "must not be empty (the program to run comes first)")
            return None
        return tuple(words)

    def str_list(self, name: str) -> tuple[str, ...] | None:
        """An array of non-empty strings; a lone string counts as a one-element array."""
        value = self.raw(name)
        if value is MISSING:
            return None
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            self.problem(name, f"must be an array of strings, got {got(value)}")
            return None
        checked = self._items(name, items, empty_ok=False)
        return None if checked is None else tuple(checked)

    def _items(self, name: str, items: list[Any], *, empty_ok: bool) -> list[str] | None:
        """The strings of array `name`; None at the first bad one (reported by index)."""
        out: list[str] = []
        for i, item in enumerate(items):
            text = values.text(item)
            if isinstance(text, Invalid):
                self.problem(f"{name}[{i}]", text.reason)
                self.bad.add(name)
                return None
            if not text and not empty_ok:
                self.problem(f"{name}[{i}]", "must not be empty")
                return None
            out.append(text)
        return out

    def open_table(
        self,
        name: str,
        check: Callable[[str, object], T | Invalid],
        vocabulary: Collection[str] | None = None,
    ) -> Mapping[str, T]:
        """A table whose keys the user names (roles) or picks from `vocabulary` (rlimits):
        the value of each key that `check(key, value)` accepts. A key outside
        `vocabulary` is unknown."""
        table = self.sub(name)
        out: dict[str, T] = {}
        if table is None:
            return MappingProxyType(out)
        for key in list(table.data):
            if vocabulary is not None and key not in vocabulary:
                continue  # finish() reports it with a hint
            value = table.accept(key, check(key, table.raw(key)), None)
            if value is not None:
                out[key] = value
        table.finish(vocabulary)
        if table.bad:
            self.bad.add(name)
        return MappingProxyType(out)

    def string_table(self, name: str, *, env: bool) -> Mapping[str, str] | None:
        """A table of string values (numbers are taken as their text).

        `env`: keys must be environment variable names, and booleans are refused (true
        could mean "1" or "true" to the program: the user should say which).
        """
        table = self.sub(name)
        if table is None:
            return None
        out: dict[str, str] = {}
        for key, value in table.data.items():
            table.seen.add(key)
            if env:
                if not ENV_NAME_RE.fullmatch(key):
                    table.problem(key, "is not a valid environment variable name")
                    continue
                if key in RESERVED_ENV:
                    table.problem(key, "is set by svcd for every worker and cannot be overridden")
                    continue
            elif "\x00" in key:
                table.problem(key, "key must not contain NUL characters")
                continue
            if isinstance(value, bool):
                if env:
                    table.problem(key, 'must be a string: quote it ("true", "1")')
                    continue
                out[key] = "true" if value else "false"
            elif isinstance(value, (int, float)):
                if isinstance(value, float) and not math.isfinite(value):
                    table.problem(key, f"must be a finite number or a string, got {show(value)}")
                    continue
                out[key] = str(value)
            else:
                text = table.accept(key, values.text(value), None)
                if text is not None:
                    out[key] = text
        if table.bad:
            self.bad.add(name)
        return MappingProxyType(out)

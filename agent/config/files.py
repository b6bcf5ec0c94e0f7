"""Reading config files: the main file and its includes, into parsed TOML documents.

Invariants:
- Only regular files of at most MAX_FILE_BYTES are read, as UTF-8; opening never
  blocks (a glob may match a FIFO or a device).
- Includes are followed depth-first in sorted glob order; a file is read once however
  many patterns match it; at most MAX_INCLUDE_FILES files and MAX_INCLUDE_DEPTH levels.
  A cycle is a problem, not a hang.
- A TOML syntax error is a problem of the whole file, with its line and column.
- Paths in an include are relative to the including file's directory, and so is the
  name a problem shows for the included file.
"""

from __future__ import annotations

import glob
import itertools
import os
import re
import stat
import tomllib
from dataclasses import dataclass
from typing import Any

from agent.config.table import Problems, Table
from agent.config.wording import show

MAX_FILE_BYTES = 1024 * 1024  #: one config file, main or included
MAX_INCLUDE_DEPTH = 8  #: main -> a -> b ... ; deeper is almost surely a cycle or a mistake
MAX_INCLUDE_FILES = 128  #: total files read for one config
TOML_POSITION_RE = re.compile(r"^(.*) \(at line (\d+), column (\d+)\)$", re.DOTALL)
TOO_LARGE = f"file too large (limit {MAX_FILE_BYTES} bytes)"


@dataclass
class Document:
    """One parsed config file."""

    display: str  #: the path as shown in problems
    path: str  #: absolute
    text: str
    data: dict[str, Any]

    @property
    def base_dir(self) -> str:
        return os.path.dirname(self.path)

    def table(self, problems: Problems) -> Table:
        """The file's top-level table."""
        return Table(problems, self.display, "", self.data, self.base_dir)


def read_text(display: str, path: str, problems: Problems) -> str | None:
    """The text of a regular file of at most MAX_FILE_BYTES, or None (reported)."""
    try:
        # O_NONBLOCK: a glob may match a FIFO or a device; never hang opening one
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except (OSError, ValueError) as exc:
        problems.add(display, "", f"cannot read: {getattr(exc, 'strerror', None) or exc}")
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            problems.add(display, "", "not a regular file")
            return None
        if info.st_size > MAX_FILE_BYTES:
            problems.add(
                display, "", f"file too large ({info.st_size} bytes, limit {MAX_FILE_BYTES})"
            )
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        problems.add(display, "", f"cannot read: {exc.strerror or exc}")
        return None
    finally:
        os.close(fd)
    if len(raw) > MAX_FILE_BYTES:  # it grew after the fstat
        problems.add(display, "", TOO_LARGE)
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.add(display, "", f"not valid UTF-8 (byte {exc.start})")
        return None


def parse_toml(display: str, text: str, problems: Problems) -> dict[str, Any] | None:
    """The TOML document in `text`, or None (reported, with line and column if known)."""
    if len(text) > MAX_FILE_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        problems.add(display, "", TOO_LARGE)
        return None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = TOML_POSITION_RE.match(message)
        if match:
            line, column = int(match.group(2)), int(match.group(3))
            problems.add_at(display, f"TOML syntax error: {match.group(1)}", line, column)
        else:
            problems.add(display, "", f"TOML syntax error: {message}")
        return None
    except RecursionError:
        problems.add(display, "", "TOML syntax error: nested too deeply")
        return None


class Loader:
    """Reads the main file and its includes into `Document`s, reporting as it goes.

    `documents[0]` is the main file when it parsed; the includes follow in the order
    read.
    """

    def __init__(self, problems: Problems) -> None:
        self.problems = problems
        self.documents: list[Document] = []
        self.seen_paths: set[str] = set()

    def add(self, display: str, path: str, text: str, chain: tuple[str, ...] = ()) -> None:
        """Parse one file and follow its includes. `chain`: the real paths including it."""
        self.seen_paths.add(os.path.realpath(path))
        data = parse_toml(display, text, self.problems)
        if data is None:
            return
        doc = Document(display, path, text, data)
        self.documents.append(doc)
        self._follow_includes(doc, (*chain, os.path.realpath(path)))

    def _follow_includes(self, doc: Document, chain: tuple[str, ...]) -> None:
        table = doc.table(self.problems)
        patterns = table.str_list("include")
        if not patterns:
            return
        for i, pattern in enumerate(patterns):
            key = f"include[{i}]"
            matches = self._matches(table, key, pattern, doc.base_dir)
            for match in matches:
                if os.path.isdir(match):
                    continue  # "conf.d/*" may match a subdirectory: not a config file
                display = (
                    match
                    if os.path.isabs(pattern)
                    else os.path.normpath(
                        os.path.join(
                            os.path.dirname(doc.display), os.path.relpath(match, doc.base_dir)
                        )
                    )
                )
                real = os.path.realpath(match)
                if real in chain:
                    table.problem(key, f"include cycle: {show(display)} includes itself")
                    continue
                if real in self.seen_paths:
                    continue  # two patterns matching one file: read it once
                if len(chain) >= MAX_INCLUDE_DEPTH:
                    table.problem(key, f"includes nested deeper than {MAX_INCLUDE_DEPTH} files")
                    return
                if len(self.seen_paths) >= MAX_INCLUDE_FILES:
                    table.problem(key, f"more than {MAX_INCLUDE_FILES} config files")
                    return
                text = read_text(display, match, self.problems)
                self.seen_paths.add(real)
                if text is not None:
                    self.add(display, match, text, chain)

    @staticmethod
    def _matches(table: Table, key: str, pattern: str, base_dir: str) -> list[str]:
        """The paths `pattern` names, sorted; none when it is a problem (reported)."""
        absolute = os.path.join(base_dir, pattern)
        if glob.has_magic(pattern):
            # bounded: a pattern such as "/*/*/*" must not walk the whole disk
            found = list(itertools.islice(glob.iglob(absolute), MAX_INCLUDE_FILES + 1))
            if len(found) > MAX_INCLUDE_FILES:
                table.problem(key, f"matches more than {MAX_INCLUDE_FILES} files")
                return []
            return sorted(found)
        if os.path.isdir(absolute):
            # `include = ["conf.d"]` would otherwise include nothing, silently
            hint = show(os.path.join(pattern, "*.toml"))
            table.problem(key, f"{show(pattern)} is a directory (did you mean {hint}?)")
            return []
        if os.path.exists(absolute):
            return [absolute]
        table.problem(key, f"no such file: {show(pattern)}")
        return []

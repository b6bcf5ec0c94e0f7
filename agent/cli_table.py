"""A small column formatter for svctl's tables: plain text, ANSI colour on terminals.

svctl prints a table per call and exits, so it cannot afford a rendering library's
import and layout time (rich cost `svctl status` ~50 ms of import and ~25 ms of layout,
a third of its wall time); this module is stdlib-only and imports nothing beyond `os`.

Invariants:
- colour is a decoration: the plain text of a line is the same with and without it,
  so scripts and tests that read the table see exactly what a user sees;
- colour only when the stream is a terminal, `NO_COLOR` is unset or empty
  (https://no-color.org) and `TERM` is not `dumb`;
- cells never wrap or get cut; a column is as wide as its widest cell (or its name);
- no trailing spaces: the last column of a row is not padded.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from typing import TypeAlias

#: SGR parameters of the style words used by svctl (combine with spaces: "bold red").
SGR = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "cyan": "36"}
RESET = "\x1b[0m"
#: Between two columns (rich's default look: one space of padding on each side).
GAP = "  "
RULE_UNICODE = "─"
RULE_ASCII = "-"


def use_color(stream: IO[str]) -> bool:
    """Whether ANSI colour belongs on `stream` (a terminal that has not opted out)."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def rule_char(stream: IO[str]) -> str:
    """A box-drawing rule where the stream can encode it, else a hyphen."""
    encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
    return RULE_UNICODE if encoding == "utf8" else RULE_ASCII


def sgr(style: str) -> str:
    """The escape sequence that turns on `style` ("" for no style or unknown words)."""
    codes = [SGR[word] for word in style.split() if word in SGR]
    return f"\x1b[{';'.join(codes)}m" if codes else ""


class Text:
    """A line fragment made of styled segments; its width is that of its plain text."""

    __slots__ = ("segments",)

    def __init__(self, text: str = "", style: str = "") -> None:
        self.segments: list[tuple[str, str]] = [(text, style)] if text else []

    def append(self, text: str, style: str = "") -> Text:
        if text:
            self.segments.append((text, style))
        return self

    @property
    def plain(self) -> str:
        return "".join(text for text, _ in self.segments)

    def render(self, color: bool, base: str = "") -> str:
        """The text, each segment in `base` + its own style when `color`."""
        if not color:
            return self.plain
        out = []
        for text, style in self.segments:
            on = sgr(f"{base} {style}")
            out.append(f"{on}{text}{RESET}" if on else text)
        return "".join(out)


if TYPE_CHECKING:
    Cell: TypeAlias = "str | Text"


def _text(cell: Cell) -> Text:
    return cell if isinstance(cell, Text) else Text(cell)


class Table:
    """Columns with a header, a rule, rows, and optional sections (a rule before each);
    rows of a section may carry a style for the whole row (the "total" row is bold)."""

    def __init__(self, columns: Sequence[str], right: Iterable[str] = ()) -> None:
        self.columns = list(columns)
        right_set = set(right)
        self._right = [name in right_set for name in self.columns]
        # each section: a list of (cells, row style)
        self._sections: list[list[tuple[list[Text], str]]] = [[]]

    def add_row(self, cells: Sequence[Cell], style: str = "") -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells for {len(self.columns)} columns")
        self._sections[-1].append(([_text(c) for c in cells], style))

    def add_section(self) -> None:
        self._sections.append([])

    def lines(self, color: bool, rule: str = RULE_UNICODE) -> list[str]:
        """The table as lines of text (no newlines)."""
        widths = [len(name) for name in self.columns]
        for section in self._sections:
            for cells, _ in section:
                for i, cell in enumerate(cells):
                    widths[i] = max(widths[i], len(cell.plain))
        header = [Text(name) for name in self.columns]
        out = [self._line(header, widths, color, "bold")]
        line_rule = rule * (sum(widths) + len(GAP) * (len(widths) - 1))
        for n, section in enumerate(self._sections):
            if n == 0 or section:
                out.append(line_rule)
            out.extend(self._line(cells, widths, color, style) for cells, style in section)
        return out

    def _line(self, cells: list[Text], widths: list[int], color: bool, style: str) -> str:
        parts = []
        last = len(cells) - 1
        for i, cell in enumerate(cells):
            pad = " " * (widths[i] - len(cell.plain))
            text = cell.render(color, style)
            if self._right[i]:
                parts.append(pad + text)
            else:
                parts.append(text if i == last else text + pad)
        return GAP.join(parts).rstrip(" ")

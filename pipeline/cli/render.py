"""Terminal output that fits the console (80 columns too) and never cuts an ID.

A rich table narrower than its content wraps or truncates its cells: a run id, a model
name or a data version came out as ``cessl-ecg-…`` or split across two lines, useless to
copy. Here:

- :func:`print_fields`: ``label  value`` lines; a value that does not fit beside its label
  goes below it, wrapped between words only (a word wider than the console, e.g. a long
  URI, is left whole for the terminal to wrap).
- :func:`print_records`: a table when the table fits the console with every cell on one
  line; otherwise one block of fields per row, headed by its first column.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

INDENT = 2
GAP = 2  # spaces between a label and its value
UNBOUNDED = 1_000_000


def _text(value: Any) -> Text:
    return value if isinstance(value, Text) else Text(str(value))


def _words(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` columns, broken between words only."""
    return textwrap.wrap(text, max(width, 1), break_long_words=False, break_on_hyphens=False) or [""]


def field_lines(rows: Sequence[tuple[str, Any]], width: int, indent: int = INDENT) -> list[Text]:
    """The lines of ``label  value`` rows, the labels in one column; a value too wide for the
    rest of the line goes on the next lines, indented under its label, wrapped between words."""
    if not rows:
        return []
    column = max(len(label) for label, _ in rows) + GAP
    lines = []
    for label, value in rows:
        text = _text(value)
        if indent + column + text.cell_len <= width:
            lines.append(Text(" " * indent + label.ljust(column)) + text)
        else:
            lines.append(Text(" " * indent + label))
            lines.extend(
                Text(" " * (indent + GAP)) + Text(part, style=text.style)
                for part in _words(text.plain, width - indent - GAP)
            )
    return lines


def print_fields(console: Console, title: str, rows: Sequence[tuple[str, Any]]) -> None:
    """``title`` then its ``label  value`` rows (:func:`field_lines`), each line left whole."""
    if title:
        console.print(Text(title, style="bold"))
    for line in field_lines(rows, console.width):
        console.print(line, soft_wrap=True)


def _table(title: str, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> Table:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, no_wrap=True)
    for row in rows:
        table.add_row(*(_text(row.get(c, "")) for c in columns))
    return table


def print_records(console: Console, title: str, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """``rows`` as a table if it fits ``console`` unwrapped, else one block of fields per row
    (headed by the row's first column; empty fields left out)."""
    table = _table(title, columns, rows)
    unbounded = console.options.update_width(UNBOUNDED)  # measure() clamps to the width it is given
    if console.measure(table, options=unbounded).maximum <= console.width:
        console.print(table)
        return
    console.print(Text(title, style="bold"))
    head, *rest = columns
    for row in rows:
        console.print(Text(f"{head} {row.get(head, '')}", style="bold"), soft_wrap=True)
        for line in field_lines([(c, row[c]) for c in rest if str(row.get(c, "")) != ""], console.width):
            console.print(line, soft_wrap=True)

"""Terminal output: rich tables on a terminal, plain aligned text otherwise."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["print_table", "fmt", "print_json", "json_mode"]

_JSON_OUT = None  # the real stdout while a --json command runs (its other output goes to stderr)


def json_mode(stream) -> None:
    """Send :func:`print_json` to ``stream`` (the CLI's stdout under ``--json``; None: sys.stdout)."""
    global _JSON_OUT
    _JSON_OUT = stream


def print_json(document: Any) -> None:
    """The one JSON document of a ``--json`` command, on stdout."""
    import json

    out = _JSON_OUT or sys.stdout
    out.write(json.dumps(document, indent=2) + "\n")
    out.flush()


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value)
    return str(value)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], file=None) -> None:
    """Print a table; rich when writing to a terminal, fixed-width text otherwise (logs, pipes)."""
    file = file or sys.stdout
    text_rows = [[fmt(v) for v in row] for row in rows]
    if file.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for col in columns:
            table.add_column(col)
        for row in text_rows:
            table.add_row(*row)
        Console(file=file).print(table)
        return
    widths = [max([len(c)] + [len(r[i]) for r in text_rows]) for i, c in enumerate(columns)]
    print(title, file=file)
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)), file=file)
    for row in text_rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)), file=file)

"""How meshctl prints: a command's answer as JSON or for people (answer), tables, key: value
lines, events; and the errors a command raises for main() to report. Every command module
(meshctl.py, ctlcommands.py, ctlpairing.py, ctlrecovery.py) shares these."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO


class UsageError(Exception):
    """The command cannot run as given (exit code 2)."""


class ImportFailed(Exception):
    """Some lines of an import were refused (each was reported); the others were written."""


def cell(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:16]  # a key: a unique prefix is enough to read (and for `meshctl remove`)
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(cell(v) for v in value) or "-"
    if isinstance(value, dict):
        return " ".join(f"{k}={cell(v)}" for k, v in value.items())
    return str(value)


def ago(when: Any) -> str:
    """A unix time as people read it in a table: '12 s ago', '3 min ago'."""
    if not isinstance(when, int | float):
        return cell(when)
    seconds = max(0, int(time.time() - when))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


def for_people(row: dict[str, Any]) -> dict[str, Any]:
    """One way to name a device on screen: its fingerprint (as in the logs, events and
    `meshd identity`), in the DEVICE column, instead of the API's full hex key."""
    if "fingerprint" not in row:
        return row
    shown = {"device": row["fingerprint"]}
    shown.update((k, v) for k, v in row.items() if k not in ("device", "fingerprint"))
    return shown


def table(rows: Sequence[dict[str, Any]], out: TextIO, empty: str) -> None:
    """Columns in the order keys first appear; a message instead of an empty table."""
    if not rows:
        print(empty, file=out)
        return
    rows = [for_people(row) for row in rows]
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    cells = [[ago(row.get(column)) if column == "last_seen" else cell(row.get(column))
              for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip(), file=out)
    for line in cells:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip(), file=out)


def key_values(data: dict[str, Any], out: TextIO, prefix: str = "") -> None:
    for key, value in data.items():
        if isinstance(value, dict) and value:
            key_values(value, out, f"{prefix}{key}.")
        else:
            print(f"{prefix}{key}: {cell(value)}", file=out)


def emit_json(value: Any, out: TextIO) -> None:
    print(json.dumps(value, indent=2, sort_keys=False), file=out)


def answer(args: argparse.Namespace, out: TextIO, value: Any,
           text: str | Callable[[TextIO], None]) -> None:
    """A command's answer: with --json, the API's answer as one JSON document; else text for
    people (a line, or a function that prints it)."""
    if args.json:
        emit_json(value, out)
    elif callable(text):
        text(out)
    else:
        print(text, file=out)


def describe_event(event: dict[str, Any]) -> str:
    details = " ".join(f"{k}={cell(v)}" for k, v in (event.get("data") or {}).items())
    return f"{time.strftime('%H:%M:%S')} {event.get('type')} {details}".rstrip()

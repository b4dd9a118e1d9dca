"""meshctl's commands about losing devices: remove a device (also with the recovery words),
create the recovery words, and recover the circle from them through the relays."""

from __future__ import annotations

import argparse
import datetime
import getpass
import sys
import time
from typing import Any, TextIO

from ..api.client import Client
from .ctloutput import UsageError, answer, cell, key_values
from .ctlpairing import progress


def remove(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    since = getattr(args, "distrust_since", None)
    since_ms = parse_time_ms(since) if since is not None else None
    words = read_words() if args.recovery_words else None
    result = client.remove(args.device, force=args.force, recovery_words=words,
                           distrust_since_ms=since_ms)

    def people(out: TextIO) -> None:
        print(f"Removed {args.device}: it can no longer sync with the circle or read anything "
              "new.", file=out)
        key_values(result, out)

    answer(args, out, result, people)


def parse_time_ms(text: str) -> int:
    """An ISO 8601 time (UTC when it names no zone), in unix milliseconds."""
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"not a time: {text!r} (use e.g. 2026-12-01T10:00 or "
                         "2026-12-01T10:00+01:00)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return max(0, int(when.timestamp() * 1000))


def recovery_key(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    result = client.recovery_key()

    def people(out: TextIO) -> None:
        words = result.get("words", [])
        print("Your recovery key. Write these words on paper and keep them somewhere safe:", file=out)
        print("with them and a relay address, anyone can restore your circle; without them, losing", file=out)
        print("every device means losing your data. They are not shown again.\n", file=out)
        for index in range(0, len(words), 6):
            print("  " + "  ".join(f"{index + i + 1:2}. {w:<10}"
                                   for i, w in enumerate(words[index:index + 6])).rstrip(), file=out)

    answer(args, out, result, people)


def read_words() -> list[str]:
    if sys.stdin.isatty():
        text = getpass.getpass("Recovery words (typing is hidden): ")
    else:
        text = sys.stdin.read()
    words = text.split()
    if not words:
        raise UsageError("no recovery words given (type them, or pipe them on stdin)")
    return words


def _ask(question: str) -> bool:
    """A yes/no answer from the person at the terminal (stdin may carry the words)."""
    try:
        with open("/dev/tty", "r+") as tty:  # noqa: PTH123 - a terminal, not a file
            tty.write(f"{question} [y/N] ")
            tty.flush()
            return tty.readline().strip().lower() in ("y", "yes")
    except OSError:
        raise UsageError("cannot ask which devices to re-admit without a terminal: "
                         "run it interactively, or pass --yes to re-admit them all") from None


def _choose_readmitted(devices: list[dict[str, Any]], yes: bool, out: TextIO) -> list[str]:
    """The devices the owner re-admits: each one shown, then asked about (--yes: all)."""
    print(f"The recovered circle has {len(devices)} other device(s):", file=out)
    for device in devices:
        seen = device.get("last_seen")
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(seen)) if seen else "no entry in the backup"
        print(f"  {cell(device.get('name'))}  {str(device.get('device'))[:16]}  last wrote: {when}", file=out)
    if yes:
        return [d["device"] for d in devices]
    return [d["device"] for d in devices
            if _ask(f"Re-admit {cell(d.get('name'))} ({str(d.get('device'))[:16]})? A lost or stolen "
                    "device should not be")]


def recover(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    words = read_words()
    started = time.monotonic()
    print("Reading the circle from every relay...", file=sys.stderr, flush=True)
    preview = client.recover(words, args.relay or "", preview=True)
    readmit = _choose_readmitted(preview.get("devices") or [], args.yes, sys.stderr if args.json else out)
    print("Restoring the circle from the relays' backup...", file=sys.stderr, flush=True)
    stop = progress(client, sys.stderr, started)
    try:
        result = client.recover(words, args.relay or "", readmit=readmit)
    finally:
        stop()

    def people(out: TextIO) -> None:
        print(f"Recovered in {time.monotonic() - started:.1f} s.", file=out)
        key_values({k: v for k, v in result.items() if k != "warning"}, out)
        if result.get("warning"):
            print(f"NOTE: {result['warning']}", file=out)

    answer(args, out, result, people)

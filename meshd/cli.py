"""Command-line entry points: `meshd` (the daemon and relay) and `meshctl` (the client).

Only this module configures logging handlers. meshctl talks to the daemon only through
meshd.client (the local API); it never opens the state directory itself.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .identity import KeyFileError, load_or_create_identity


# sd-daemon(3) priority prefixes: journald reads them from the start of each stderr line.
_SYSLOG_PRIORITY = {
    logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7,
}


class _JournalFormatter(logging.Formatter):
    """Plain lines with a <priority> prefix: journald adds the timestamp and the unit."""

    def format(self, record: logging.LogRecord) -> str:
        priority = _SYSLOG_PRIORITY.get(record.levelno, 6)
        return f"<{priority}>{super().format(record)}"


def stderr_is_journal() -> bool:
    """True when stderr is connected to journald (systemd sets JOURNAL_STREAM=dev:inode)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in stream.split(":"))
        info = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (info.st_dev, info.st_ino) == (device, inode)


def configure_logging(level: str) -> None:
    """The only place meshd configures log handlers: one stderr handler for the process."""
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal():
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def meshd_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshd", description="meshd: sync the devices one person owns")
    parser.add_argument("--version", action="version", version=f"meshd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    identity = commands.add_parser("identity", help="create (if needed) and show this device's identity")
    identity.add_argument("--state-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "identity":
        try:
            device = load_or_create_identity(args.state_dir)
        except KeyFileError as err:
            print(f"meshd: {err}", file=sys.stderr)
            return 1
        print(f"device fingerprint {device.fingerprint}")
        return 0
    return 2


def meshctl_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshctl", description="control a running meshd")
    parser.add_argument("--version", action="version", version=f"meshctl {__version__}")
    parser.parse_args(argv)
    parser.print_help()
    return 0

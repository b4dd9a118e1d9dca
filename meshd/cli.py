"""Command-line entry points: `meshd` (the daemon and relay) and `meshctl` (the client).

Only this module configures logging handlers. meshctl talks to the daemon only through
meshd.client (the local API); it never opens the state directory itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .identity import KeyFileError, load_or_create_identity


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

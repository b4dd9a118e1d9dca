"""meshctl: the command-line client of a running meshd (only through meshd.api.client).

Human-readable output by default, `--json` for scripts (one JSON document per command; `watch`
and `log` print one JSON object per line). Exit codes: 0 ok, 1 the daemon refused or failed,
2 usage error, 3 the daemon is not running, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from .. import __version__
from ..api.client import Client, ClientError, DaemonNotRunning, ImportInterrupted
from ..config import SYSTEM_SOCKET, default_socket_path
from . import ctlcommands, ctlpairing, ctlrecovery
from .ctloutput import ImportFailed, UsageError, answer, describe_event, table

EXIT_OK, EXIT_DAEMON_ERROR, EXIT_USAGE, EXIT_NOT_RUNNING, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


# --- which daemon ------------------------------------------------------------------------

def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except OSError:
        return False


def choose_socket(explicit: Path | None, env: dict[str, str] | None = None) -> Path:
    """--socket, else $MESHD_SOCKET, else this user's daemon, else the system daemon.

    The user's socket wins when both exist (a user service is the more specific choice);
    with neither, the user's path is returned so the error names where meshctl looked first.
    """
    env = dict(os.environ) if env is None else env
    if explicit is not None:
        return explicit
    if env.get("MESHD_SOCKET"):
        return Path(env["MESHD_SOCKET"])
    user = default_socket_path()
    if not _is_socket(user) and _is_socket(SYSTEM_SOCKET):
        return SYSTEM_SOCKET
    return user


# --- commands ---------------------------------------------------------------------------

def cmd_peers(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    peers = client.peers()
    answer(args, out, peers, lambda out: table(
        peers, out, "No peers connected. Devices of the circle appear here when they are on "
                    "this network or reachable through a relay."))


def cmd_devices(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    devices = client.devices()
    answer(args, out, devices, lambda out: table(
        devices, out, "No devices: this daemon is not in a circle yet (`meshctl invite` on a "
                      "device of the circle, then `meshctl join CODE` here)."))


def cmd_relay(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    if args.relay_command == "add":
        token = args.token
        if token == "-":  # off the command line (and the shell's history): from stdin
            token = sys.stdin.readline().strip()
        answer(args, out, client.add_relay(args.address, token),
               f"Added relay {args.address}. The other devices of the circle start using it "
               "when they next sync with this one (over the LAN or another relay).")
    elif args.relay_command == "remove":
        answer(args, out, client.remove_relay(args.address),
               f"Removed relay {args.address}. The other devices of the circle stop using it "
               "when they next sync with this one.")
    else:
        relays = client.relays()
        answer(args, out, relays, lambda out: table(
            relays, out, "No relays. Add one with `meshctl relay add HOST:PORT#KEY` "
                         "(the address `meshd relay` prints)."))


MAX_RECORD_BYTES = 1024 * 1024  # protocol/logs.md: a body holds at most 1 MiB


def cmd_send(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    if args.text == "-":
        # Sent as it is (no base64), so the whole 1 MiB a record holds fits in one request.
        body = sys.stdin.buffer.read(MAX_RECORD_BYTES + 1)
        if len(body) > MAX_RECORD_BYTES:
            raise UsageError(f"stdin holds more than {MAX_RECORD_BYTES} bytes, the most one "
                             "record can hold; split it into several records")
        result = client.write_raw(args.stream, body, args.id)
    else:
        result = client.write(args.stream, args.text, args.id)
    answer(args, out, result, f"Saved record {result.get('id', '?')} in {args.stream}.")


SHOWN_IMPORT_ERRORS = 20


def cmd_import(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    err = sys.stderr
    live = err.isatty()
    started = time.monotonic()

    def progress(written: int, failed: int) -> None:
        if live:
            rate = written / max(time.monotonic() - started, 1e-6)
            print(f"\rimported {written} records ({failed} failed), {rate:,.0f}/s",
                  end="", file=err, flush=True)

    interrupted: ImportInterrupted | None = None
    try:
        result = client.import_lines(sys.stdin.buffer, args.stream, progress)
    except ImportInterrupted as error:  # what was written before it is said, then the error
        interrupted, result = error, error.result
    if live:
        print(file=err)

    def people(out: TextIO) -> None:
        for refused in result["errors"][:SHOWN_IMPORT_ERRORS]:
            error = refused["error"]
            print(f"line {refused['line']}: {error['message']} [{error['code']}]", file=err)
        if len(result["errors"]) > SHOWN_IMPORT_ERRORS:
            print(f"... and {len(result['errors']) - SHOWN_IMPORT_ERRORS} more", file=err)
        print(f"Imported {result['written']} records, {result['failed']} failed.", file=out)
        if interrupted is not None:
            interrupted_lines(result, err)

    answer(args, out, result, people)
    if interrupted is not None:
        raise interrupted
    if result["failed"]:
        raise ImportFailed


def interrupted_lines(result: dict[str, Any], err: TextIO) -> None:
    """Which lines of an interrupted import to send again (none of the others is missing)."""
    for refused in result["refused"]:
        print(f"lines {refused['first_line']}-{refused['last_line']} were refused "
              f"[{refused['error']['code']}]: none of them was written", file=err)
    for request in result["unanswered"]:
        print(f"lines {request['first_line']}-{request['last_line']} got no answer: "
              "they may or may not have been written", file=err)
    if result["not_sent_from"] is not None:
        print(f"lines from {result['not_sent_from']} on were not sent", file=err)


def cmd_clear(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError(f"clearing {args.stream} deletes its records on every device; "
                             "pass --yes to do it without asking")
        typed = input(f"Delete every record of {args.stream!r} on every device of the circle? "
                       "This cannot be undone. Type the stream's name to confirm: ")
        if typed.strip() != args.stream:
            raise UsageError("not confirmed: nothing was cleared")
    answer(args, out, client.clear(args.stream),
           f"Cleared {args.stream}: its records are deleted here and on every device as it syncs.")


def cmd_watch(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    types = [t for t in (args.types or "").split(",") if t] or None
    with client.events(types) as stream:
        for event in stream:
            print(json.dumps(event) if args.json else describe_event(event), file=out, flush=True)


# --- arguments --------------------------------------------------------------------------

def json_anywhere(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--json after the command too (`meshctl peers --json`): SUPPRESS keeps the value the
    main parser set when the subcommand does not see the option."""
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable JSON output")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshctl", description="Control a running meshd through its local API.")
    parser.add_argument("--version", action="version", version=f"meshctl {__version__}")
    parser.add_argument("--socket", type=Path, default=None,
                        help="the daemon's API socket (default: $MESHD_SOCKET, else the user "
                        f"daemon's $XDG_RUNTIME_DIR/meshd/meshd.sock, else {SYSTEM_SOCKET})")
    parser.add_argument("--json", action="store_true", help="machine-readable JSON output")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable[..., None], help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        json_anywhere(sub)
        return sub

    add("status", ctlcommands.status, "this device, its circle, and each device's path, last "
        "contact and how far behind it is")
    add("peers", cmd_peers, "connected circle devices and how they are reached")
    add("devices", cmd_devices, "the devices of the circle")
    invite = add("invite", ctlpairing.invite, "make a one-time code for a new device to join")
    invite.add_argument("--wait", action="store_true",
                        help="wait until a device has joined and show the words to compare")
    join = add("join", ctlpairing.join, "join a circle with the code another device showed")
    join.add_argument("code")
    join.add_argument("--relay", help="pair through this relay (HOST:PORT#KEY) when the inviting "
                      "device is on another network")
    remove = add("remove", ctlrecovery.remove, "remove a device from the circle (lost or sold)")
    remove.add_argument("device")
    remove.add_argument("--force", action="store_true",
                        help="also when it is this device itself or the circle's last device")
    remove.add_argument("--recovery-words", action="store_true",
                        help="sign with the recovery words (read from stdin), outranking what the "
                        "device did meanwhile: settles a dispute with a thief that removed this device")
    remove.add_argument("--distrust-since", metavar="TIME",
                        help="the device's entries dated from TIME on (ISO 8601, UTC unless a zone "
                        "is given, e.g. 2026-12-01T10:00) stop counting on every device: its "
                        "deletes and clears no longer hide anything, its puts vanish. Default: "
                        "everything this device has received from it keeps counting, nothing later")
    add("recovery-key", ctlrecovery.recovery_key, "create the recovery words (write them down)")
    recover = add("recover", ctlrecovery.recover, "restore the circle from the recovery words (read from stdin)")
    recover.add_argument("--relay", help="relay address HOST:PORT#KEY holding the backup")
    recover.add_argument("--yes", action="store_true",
                         help="re-admit every device the relays list, without asking (for scripts)")
    relay = add("relay", cmd_relay, "list, add or remove relays")
    relay_commands = relay.add_subparsers(dest="relay_command", required=True, metavar="ACTION")
    json_anywhere(relay_commands.add_parser("list", help="the relays this device uses"))
    relay_add = json_anywhere(relay_commands.add_parser(
        "add", help="use another relay (on every device of the circle)"))
    relay_add.add_argument("address", help="HOST:PORT#KEY")
    relay_add.add_argument("--token", help="the relay's enrolment token, for a relay in token mode "
                           "(`meshd relay` prints it; '-' reads it from stdin); kept on this "
                           "device only")
    json_anywhere(relay_commands.add_parser("remove", help="stop using a relay (on every device of the circle)")
                  ).add_argument("address", help="HOST:PORT#KEY, as `relay list` shows it")
    send = add("send", cmd_send, "write a record to a stream ('-' reads the body from stdin)")
    send.add_argument("stream")
    send.add_argument("text")
    send.add_argument("--id", help="record id (default: a new one)")
    imports = add("import", cmd_import, "write records from NDJSON on stdin, one object per line: "
                  '{"stream": S, "id": ID, "body": TEXT | "body_b64": B64} (see protocol/api.md)')
    imports.add_argument("--stream", help="the stream of lines that name none")
    log = add("log", ctlcommands.log, "show a stream's records with their time and author")
    log.add_argument("stream")
    log.add_argument("--limit", type=int, default=None)
    log.add_argument("--after", default=None, help="cursor from a previous page")
    clear = add("clear", cmd_clear, "delete every record of a stream, on every device")
    clear.add_argument("stream")
    clear.add_argument("--yes", action="store_true", help="do not ask for confirmation (scripts)")
    watch = add("watch", cmd_watch, "print events as they happen (Ctrl-C to stop)")
    watch.add_argument("--types", help="comma-separated event types or prefixes, e.g. entry,peer")
    ctlcommands.register(add)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:  # argparse: 0 for --help/--version, 2 for usage errors
        return int(exit.code or 0)
    client = Client(choose_socket(args.socket))
    try:
        args.handler(client, args, sys.stdout)
    except DaemonNotRunning as err:
        print(f"meshctl: {err}", file=sys.stderr)
        if err.code == "daemon-not-running" and args.socket is None and not os.environ.get("MESHD_SOCKET"):
            print(f"meshctl: looked for {default_socket_path()} (your own meshd) and {SYSTEM_SOCKET} "
                  "(the system service); use --socket or MESHD_SOCKET for another", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except ClientError as err:
        print(f"meshctl: {err} [{err.code}]", file=sys.stderr)
        return EXIT_DAEMON_ERROR
    except UsageError as err:
        print(f"meshctl: {err}", file=sys.stderr)
        return EXIT_USAGE
    except ImportFailed:
        return EXIT_DAEMON_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `meshctl watch | head`
        return EXIT_OK
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

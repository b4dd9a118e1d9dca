"""`meshd relay`, the command: options, the key and storage, listeners, signals.

RelayServer (relay/server.py) is the relay; this starts one from the command line.
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

import trio

from ..cmd.logsetup import configure_logging
from ..identity import KeyFileError, ensure_private_dir, load_or_create_key
from ..protocol.admission import ALLOW_LIST, MODES, TOKEN, Admission, format_token
from ..protocol.crypto import DHKeyPair
from ..protocol.relay import Limits
from .server import RelayServer
from .storage import DATABASE_FILE, RelayStorage, SQLiteRelayStorage

log = logging.getLogger("meshd.relay.server")

KEY_FILE = "relay.x25519"
# --admission token: the enrolment token, made on first use (0600), the same at every start.
TOKEN_FILE = "enrolment.token"
# The relay's configuration key for --database, read from the environment (a systemd
# EnvironmentFile keeps a password off the command line).
DATABASE_ENV = "MESHD_RELAY_DATABASE"

def relay_address(host: str, port: int, key: bytes) -> str:
    """HOST:PORT#KEY, the line devices put in their config (KEY: base64url, no padding)."""
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port}#{base64.urlsafe_b64encode(key).decode().rstrip('=')}"


def _listen_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def _public_address(text: str) -> tuple[str, int | None]:
    from .advertise import PublicAddressError, parse_public_address
    try:
        return parse_public_address(text)
    except PublicAddressError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.allow_circle and args.admission != ALLOW_LIST:
        parser.error("--allow-circle needs --admission allow-list")
    try:
        # Token mode: the token is read (or made) in the state directory at start-up.
        args.policy = Admission(args.admission, frozenset(args.allow_circle), args.max_circles,
                                args.max_total_bytes, args.max_connections_per_source,
                                bytes(32) if args.admission == TOKEN else None)
    except ValueError as err:
        parser.error(str(err))
    return args


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """`meshd relay`'s options (meshd's man page and completions are generated from it)."""
    defaults = Limits()
    parser = argparse.ArgumentParser(prog="meshd relay", description="run a meshd relay",
                                     add_help=add_help)
    parser.add_argument("--state-dir", type=Path, required=True,
                        help="the relay's key (relay.x25519) and, without --database, its "
                             "SQLite database; relay processes sharing one database share "
                             "this key file")
    parser.add_argument("--database", default=os.environ.get(DATABASE_ENV) or None,
                        metavar="postgresql://...",
                        help="store in this PostgreSQL database instead (several relay "
                             f"processes may share it; default: ${DATABASE_ENV}, else SQLite "
                             "in the state directory)")
    parser.add_argument("--listen", type=_listen_address, default=("0.0.0.0", 7744),
                        help="HOST:PORT (port 0: any free port; default 0.0.0.0:7744)")
    parser.add_argument("--public-address", type=_public_address, default=None,
                        metavar="HOST[:PORT]",
                        help="the name or address devices dial, printed in HOST:PORT#KEY "
                        "(default: the --listen host, or this machine's FQDN when listening on "
                        "every address; the port defaults to the one listened on)")
    parser.add_argument("--advertise", type=_listen_address, default=None, metavar="HOST:PORT",
                        help="with --database: where the other relay processes reach this one "
                             "(a join there for an offer held here is passed on; default: the "
                             "--listen host, 127.0.0.1 for a wildcard, and the bound port)")
    parser.add_argument("--quota-bytes", type=int, default=defaults.quota_bytes)
    parser.add_argument("--max-envelope-bytes", type=int, default=defaults.max_envelope_bytes)
    parser.add_argument("--ttl-seconds", type=int, default=defaults.ttl_s)
    parser.add_argument("--rate", type=float, default=defaults.rate_per_s,
                        help="requests per second per device key")
    parser.add_argument("--burst", type=float, default=defaults.burst)
    admission = Admission()
    parser.add_argument("--admission", choices=MODES, default=admission.mode,
                        help="open: anyone may add a circle (within the caps); allow-list: only "
                        "the circles given with --allow-circle; token: a new circle needs the "
                        f"enrolment token printed at start (kept in STATE_DIR/{TOKEN_FILE}; "
                        "circles already held need none)")
    parser.add_argument("--allow-circle", action="append", type=_circle_id, default=[],
                        metavar="CIRCLE_ID", help="a circle id (base64url) admitted in allow-list mode")
    parser.add_argument("--max-circles", type=int, default=admission.max_circles)
    parser.add_argument("--max-total-bytes", type=int, default=admission.max_total_bytes)
    parser.add_argument("--max-connections-per-source", type=int,
                        default=admission.max_connections_per_source)
    parser.add_argument("--log-level", default="info")
    return parser


def _circle_id(text: str) -> bytes:
    try:
        value = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        value = b""
    if len(value) != 32:
        raise argparse.ArgumentTypeError(f"{text!r} is not a base64url circle id (32 bytes)")
    return value


async def run_relay(args: argparse.Namespace) -> None:
    ensure_private_dir(args.state_dir)
    static = DHKeyPair.from_private_bytes(load_or_create_key(args.state_dir / KEY_FILE, "x25519"))
    limits = Limits(quota_bytes=args.quota_bytes, max_envelope_bytes=args.max_envelope_bytes,
                    ttl_s=args.ttl_seconds, rate_per_s=args.rate, burst=args.burst)
    policy: Admission = args.policy
    if policy.mode == TOKEN:
        policy = replace(policy, token=load_or_create_key(args.state_dir / TOKEN_FILE, "enrolment"))
    storage = open_storage(args)
    try:
        host, port = args.listen
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound_port = listeners[0].socket.getsockname()[1]
        server = RelayServer(storage, static, limits=limits, admission=policy)
        if storage.shared:
            advertise_host, advertise_port = args.advertise or (
                "127.0.0.1" if host in ("0.0.0.0", "::", "") else host, bound_port)
            server.advertise = (f"[{advertise_host}]:{advertise_port}" if ":" in advertise_host
                                else f"{advertise_host}:{advertise_port}")
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve, listeners)
                from .advertise import advertised, is_unspecified
                public_host, public_port = advertised(host, bound_port, args.public_address)
                if args.public_address is None and is_unspecified(host):
                    log.warning("listening on every address: devices are told %s; if they cannot "
                                "reach that name, pass --public-address HOST[:PORT]", public_host)
                print(relay_address(public_host, public_port, static.public), flush=True)
                if policy.token is not None:  # stdout, for the operator: never a log line
                    print(f"enrolment token: {format_token(policy.token)}", flush=True)
                log.info("relay listening on %s:%d", host, bound_port)
                from .. import sdnotify
                sdnotify.ready(f"listening on {host}:{bound_port}")
                async for _ in signals:
                    log.info("SIGTERM: stopping")
                    nursery.cancel_scope.cancel()
                    break
    finally:
        storage.close()


class DatabaseError(Exception):
    """--database names something the relay cannot use."""


def open_storage(args: argparse.Namespace) -> RelayStorage:
    if args.database is None:
        return SQLiteRelayStorage(args.state_dir / DATABASE_FILE)
    if not args.database.startswith(("postgresql://", "postgres://")):
        raise DatabaseError("--database takes a postgresql:// URL")
    try:
        from .postgres import PostgresStorageError, open_postgres
    except ImportError as err:
        raise DatabaseError(f"the PostgreSQL backend needs psycopg ({err}): "
                            "pip install 'meshd[postgres]'") from None
    try:
        return open_postgres(args.database)
    except PostgresStorageError as err:
        raise DatabaseError(str(err)) from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level)
    try:
        trio.run(run_relay, args)
    except (KeyFileError, DatabaseError) as err:
        print(f"meshd relay: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except OSError as err:
        print(f"meshd relay: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_parser", "main", "relay_address", "run_relay"]

"""The `meshd` command: `meshd run` (the daemon), `meshd relay` and `meshd identity`.

Logging handlers are configured only by the entry points, through meshd.cmd.logsetup. meshctl
talks to the daemon only through meshd.api.client (the local API); it never opens the state
directory itself.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import trio

from .. import __version__, memory
from ..identity import KeyFileError, load_or_create_identity
from .logsetup import configure_logging


def build_parser(with_relay_options: bool = False) -> argparse.ArgumentParser:
    """meshd's command line (also the source of its man page and shell completions)."""
    parser = argparse.ArgumentParser(prog="meshd", description="meshd: sync the devices one person owns")
    parser.add_argument("--version", action="version", version=f"meshd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the daemon (what the systemd unit starts)")
    run.add_argument("--config", type=Path, help="TOML file; it must exist (the system unit passes "
                     "/etc/meshd/meshd.toml; default: $CONFIGURATION_DIRECTORY/meshd.toml, else "
                     "$XDG_CONFIG_HOME/meshd/meshd.toml, read only if it exists)")
    run.add_argument("--state-dir", type=Path, help="where keys and the database live (default: "
                     "$STATE_DIRECTORY, else $XDG_STATE_HOME/meshd)")
    run.add_argument("--socket", type=Path, help="the local API socket, unless systemd passes one "
                     "(default: $RUNTIME_DIRECTORY/meshd.sock, else $XDG_RUNTIME_DIR/meshd/meshd.sock)")
    run.add_argument("--listen", help="HOST:PORT for device connections (default *:7743)")
    run.add_argument("--name", dest="device_name", help="this device's name in the circle")
    run.add_argument("--peer", dest="peers", action="append", metavar="HOST:PORT",
                     help="also dial this address (repeatable)")
    run.add_argument("--relay", dest="relays", action="append", metavar="HOST:PORT#KEY",
                     help="use this relay (repeatable)")
    run.add_argument("--interface", dest="interfaces", action="append", metavar="NAME_OR_ADDRESS",
                     help="restrict mDNS to this interface (repeatable)")
    run.add_argument("--no-discovery", dest="discovery", action="store_const", const=False,
                     help="do not use mDNS")
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    # meshd_main hands `meshd relay ...` to the relay's own parser; its options are copied in
    # only for the man page and completions (importing the relay costs an idle daemon memory).
    parents = []
    if with_relay_options:
        from ..relay.command import build_parser as relay_parser
        parents.append(relay_parser(add_help=False))
    commands.add_parser("relay", parents=parents,
                        help="run a relay server: a mailbox for the circle's encrypted envelopes",
                        description="Run a relay. It prints its address HOST:PORT#KEY when ready.")
    identity = commands.add_parser("identity", help="create (if needed) and show this device's identity")
    identity.add_argument("--state-dir", type=Path, required=True)
    return parser


def meshd_main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["relay"]:  # the relay owns its whole command line
        from ..relay.command import main as relay_main
        _bound_memory()
        return relay_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "identity":
        try:
            device = load_or_create_identity(args.state_dir)
        except KeyFileError as err:
            print(f"meshd: {err}", file=sys.stderr)
            return 1
        print(f"device fingerprint {device.fingerprint}")
        return 0
    _bound_memory()
    return _run_daemon(args)


def _bound_memory() -> None:
    """Allocator limits before any thread starts, and a periodic trim (meshd/memory.py)."""
    memory.configure()
    memory.start_trimming()


# sysexits.h EX_CONFIG: the units list it in RestartPreventExitStatus=, so a configuration
# mistake stops the service with its message instead of restarting every few seconds.
EXIT_CONFIG = 78
def documented_parser() -> argparse.ArgumentParser:
    """The whole command line, relay options included: what packaging/build-docs renders."""
    return build_parser(with_relay_options=True)


STOP_GRACE_S = 4.5  # SIGTERM to exit stays inside systemd's and the brief's 5 s
# Cancelling still waits for worker threads (a backup segment being sealed, a commit): past
# this the process exits at once. Nothing is lost: an acknowledged write was committed, and
# SQLite rolls back an unfinished commit at the next start, as after a kill -9.
HARD_STOP_S = 4.8
# Allocations between collections of the young generation: 10x CPython's default of 700.
GC_THRESHOLD0 = 7000


def _run_daemon(args: argparse.Namespace) -> int:
    from ..config import ConfigError, load_config

    overrides = {key: getattr(args, key) for key in
                 ("state_dir", "socket", "listen", "device_name", "peers", "relays", "interfaces",
                  "discovery", "log_level")}
    try:
        config = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"meshd: configuration error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(config.log_level)
    log = logging.getLogger("meshd")
    from ..api.routes import ApiSocketError
    from ..excgroup import first_leaf
    from ..store.db import StoreError

    started = trio.Event()  # (set inside the run; read here only after it)
    try:
        return trio.run(_serve_until_signalled, config, started)
    except BaseException as raised:  # noqa: BLE001 - start-up failures become one clear line
        err = first_leaf(raised)
        if started.is_set():
            # Not a start-up failure: say so, with what ended it (a bug: its traceback).
            log.error("meshd stopped by an error: %s: %s", type(err).__name__, err,
                      exc_info=None if isinstance(err, (StoreError, OSError)) else raised)
            return 1
        if isinstance(err, (KeyFileError, ApiSocketError, StoreError, OSError)):
            log.error("cannot start: %s", err)
            return 1
        raise



def _exit_now() -> None:
    log = logging.getLogger("meshd")
    log.warning("stopping took %.1f s: exiting without waiting for worker threads", HARD_STOP_S)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(0)


def _settle_collector() -> None:
    """Once the daemon is up: what start-up built (modules, config, services) lives as long as
    the process, so the cyclic collector stops scanning it (gc.freeze), and collects the young
    generation less often (GC_THRESHOLD0 allocations, not CPython's 700). Profiles of the batch
    route gave about 1 us per entry of collection with the defaults (bench/batch_stages.py)."""
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD0, *gc.get_threshold()[1:])


async def _serve_until_signalled(config: Any, started: trio.Event | None = None) -> int:
    from ..daemon import Daemon

    daemon = Daemon(config)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            if started is not None:
                started.set()
            _settle_collector()

            async def stop_on_signal() -> None:
                async for signum in signals:
                    logging.getLogger("meshd").info("%s received: stopping", signal.Signals(signum).name)
                    deadline = threading.Timer(HARD_STOP_S, _exit_now)
                    deadline.daemon = True  # a clean stop does not wait for it
                    deadline.start()
                    daemon.stop()
                    await trio.sleep(STOP_GRACE_S)  # the grace period itself, not a synchronisation
                    logging.getLogger("meshd").warning("clean stop took too long; cancelling")
                    nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signal)
            await daemon.stopped.wait()
            nursery.cancel_scope.cancel()
    return 0

"""meshctl's pairing commands: invite (and wait for the new device) and join, with the
daemon's pairing and sync events shown while a join runs."""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from ..api.client import Client, ClientError, EventStream
from .ctloutput import answer, cell, describe_event, table


def invite(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    # Subscribe before the code exists, so the pairing's event cannot slip past us.
    events = client.events(["pair"]) if args.wait and not args.json else None
    result = client.invite()
    code = result.get("code", "?")

    def people(out: TextIO) -> None:
        print(f"Invitation code: {code}", file=out)
        print(f"On the new device, run:  meshctl join {code}", file=out)
        expires = result.get("expires_in_s", result.get("expires_in"))
        if isinstance(expires, int | float):
            print(f"The code works once and expires in {int(expires)} s.", file=out)
        else:
            print("The code works once and expires soon.", file=out)

    answer(args, out, result, people)
    if events is not None:
        print("Waiting for the new device (Ctrl-C to stop waiting; the code stays valid)...",
              file=out, flush=True)
        with events:
            for event in events:
                data = event.get("data") or {}
                if event.get("type") == "pair.joined" and data.get("code") == code:
                    print(f"{data.get('name')} joined. Check that it shows the same words: "
                          f"{' '.join(data.get('sas', []))}", file=out)
                    return
                if event.get("type") == "pair.failed" and data.get("code") == code:
                    print(f"A pairing attempt failed ({data.get('reason')}); the code is used up. "
                          "Run `meshctl invite` again.", file=out)
                    raise SystemExit(1)


def progress(client: Client, err: TextIO, started: float) -> Callable[[], None]:
    """Print pairing and sync events while a long request runs; returns a stop function."""
    try:
        stream: EventStream | None = client.events(["pair", "sync", "peer", "member"], heartbeats=True)
    except ClientError:
        return lambda: None

    def run() -> None:
        assert stream is not None
        try:
            for event in stream:
                if event.get("type") == "heartbeat":
                    print(f"... still working ({time.monotonic() - started:.0f} s)", file=err, flush=True)
                else:
                    print(f"... {describe_event(event)}", file=err, flush=True)
        except ClientError:
            pass

    thread = threading.Thread(target=run, name="meshctl-progress", daemon=True)
    thread.start()

    def stop() -> None:
        assert stream is not None
        stream.close()
        thread.join(timeout=2)
    return stop


def join(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    started = time.monotonic()
    print(f"Joining with code {args.code}: looking for the inviting device on this network "
          "and through the relay (Ctrl-C to give up)...", file=sys.stderr, flush=True)
    stop = progress(client, sys.stderr, started)
    try:
        result = client.join(args.code, args.relay) if args.relay else client.join(args.code)
    finally:
        stop()

    def people(out: TextIO) -> None:
        print(f"Joined the circle {cell(result.get('circle'))} in "
              f"{time.monotonic() - started:.1f} s.", file=out)
        if result.get("sas"):
            print(f"Check that the inviting device shows the same words: {' '.join(result['sas'])}",
                  file=out)
        table(result.get("devices") or [], out, "")

    answer(args, out, result, people)

"""meshctl's everyday commands beyond the basics: status with the devices' paths and lag,
log with times and author names, streams, delete and rename (meshctl.py registers them)."""

from __future__ import annotations

import argparse
import time
from typing import Any, TextIO

from ..api.client import Client
from ..identity import fingerprint
from .ctloutput import answer, for_people, key_values, table

HLC_COUNTER_BITS = 16  # protocol/logs.md: hlc = milliseconds << 16 | counter


def _when(hlc: Any) -> str:
    if not isinstance(hlc, int) or hlc <= 0:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((hlc >> HLC_COUNTER_BITS) / 1000))


def status(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    result = client.status()

    def people(out: TextIO) -> None:  # --json: as GET /v1/status; the devices are GET /v1/peers
        peers = client.peers()
        key_values(for_people(result), out)  # the fingerprint, not the hex key, names this device
        for relay in result.get("relays") or []:
            if isinstance(relay, dict) and (relay.get("misbehaviour") or relay.get("holes")):
                print(f"WARNING: relay {relay.get('address')}: {relay.get('error')}", file=out)
        print("", file=out)
        table([{"fingerprint": p.get("fingerprint"), "device": p.get("device"), "name": p.get("name"),
                "path": p.get("path"), "last_seen": p.get("last_seen"), "behind": p.get("behind")}
               for p in peers], out,
              "No other devices yet: `meshctl invite` here, then `meshctl join CODE` on the new one.")

    answer(args, out, result, people)


def log(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    result = client.read(args.stream, args.after, args.limit)
    answer(args, out, result, lambda out: _print_records(client, args.stream, result, out))


def _print_records(client: Client, stream: str, result: dict[str, Any], out: TextIO) -> None:
    records = result.get("records", [])
    if not records:
        print(f"No records in {stream}.", file=out)
    names = {d.get("device"): d.get("name") for d in client.devices()} if records else {}
    for record in records:
        body = record.get("body")
        if body is None:
            body = f"<{len(record.get('body_b64', ''))} base64 chars>" if "body_b64" in record else "<deleted>"
        author = str(record.get("author") or "")
        try:
            who = names.get(author) or fingerprint(bytes.fromhex(author))
        except ValueError:
            who = author or "-"
        print(f"{_when(record.get('hlc'))}  {who}  {record.get('id', '?')}  {body}", file=out)
    if result.get("next"):
        print(f"(more: meshctl log {stream} --after {result['next']})", file=out)


def streams(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    result = client.streams()
    answer(args, out, result, lambda out: table(
        result, out, "No streams yet: `meshctl send STREAM TEXT` writes the first record."))


def delete(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    answer(args, out, client.delete(args.stream, args.id),
           f"Deleted record {args.id} of {args.stream} (on every device as they sync).")


def rename(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    result = client.rename(args.name)
    answer(args, out, result, f"This device ({result.get('fingerprint')}) is now called "
           f"{result.get('name')!r} here, and on the other devices as they sync.")


def register(add: Any) -> None:
    """Add the commands through meshctl's add(name, handler, help)."""
    streams_parser = add("streams", streams, "the streams and how many records each holds")
    del streams_parser
    delete_parser = add("delete", delete, "delete a record of a stream (on every device)")
    delete_parser.add_argument("stream")
    delete_parser.add_argument("id", help="the record id (`meshctl log STREAM` shows it)")
    add("rename", rename, "rename this device (on every device of the circle)").add_argument(
        "name", help="1 to 64 bytes of printable UTF-8")

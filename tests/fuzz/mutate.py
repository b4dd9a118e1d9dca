"""Structure-aware mutation fuzzing of every sans-IO decoder (`make fuzz`).

Each input is a valid seed, decoded to its msgpack value, with one to four mutations: a
subtree replaced by a hostile value (wrong type, huge or boundary integers, surrogate-free
odd strings, bytes of boundary lengths, deep nesting, maps with mixed key types), an item
dropped or duplicated, a map key added; for byte targets, also byte flips, truncations and
splices of the encoding. Any exception other than RemoteProtocolError is a finding: it is
saved under tests/fuzz/regressions/ (replayed by `make test`) and the run fails.

    python -m tests.fuzz.mutate [--inputs N] [--seed S] [--target NAME ...]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import msgpack

from .targets import TARGETS, Target, check, pack

REGRESSIONS = Path(__file__).with_name("regressions")

HOSTILE_INTS = [0, -1, 1, True, False, 2**31, 2**32, 2**53, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)]


def hostile_leaf(rng: random.Random) -> Any:
    choice = rng.randrange(12)
    if choice == 0:
        return rng.choice(HOSTILE_INTS)
    if choice == 1:
        return rng.randbytes(rng.choice([0, 1, 16, 31, 32, 33, 64, 65, 80, 300]))
    if choice == 2:
        return rng.choice(["", "a", "genesis", "epoch", "relay.register", "log.entries", "\u00e9" * 40,
                           "x" * 300, "\u0000", "circle.records", "pair.welcome"])
    if choice == 3:
        return None
    if choice == 4:
        return rng.random() * rng.choice([1, 1e300])
    if choice == 5:
        return {"a": b"", b"b": b""}  # mixed key types: the relay killer of issue #12
    if choice == 6:
        value: Any = 0
        for _ in range(rng.choice([5, 30, 200])):
            value = [value]
        return value
    if choice == 7:
        return [rng.randbytes(32) for _ in range(rng.choice([0, 1, 3, 300]))]
    if choice == 8:
        return {rng.choice(["t", "rid", "records", "device", "boxes", "epoch"]): hostile_leaf(rng)}
    if choice == 9:
        return {1: 2} if rng.random() < 0.5 else {b"k": 1}
    if choice == 10:
        return [hostile_leaf(rng) for _ in range(rng.randrange(4))]
    return msgpack.ExtType(1, b"x") if rng.random() < 0.1 else rng.randbytes(2)


def mutate_value(value: Any, rng: random.Random, depth: int = 0) -> Any:
    """value with one random subtree changed (containers copied, never shared)."""
    if depth > 6 or rng.random() < 0.15 or not isinstance(value, list | tuple | dict) or not value:
        return hostile_leaf(rng)
    if isinstance(value, list | tuple):
        items = list(value)
        action = rng.randrange(10)
        index = rng.randrange(len(items))
        if action == 0:
            del items[index]
        elif action == 1:
            items.insert(index, items[index])
        elif action == 2:
            items.append(hostile_leaf(rng))
        else:
            items[index] = mutate_value(items[index], rng, depth + 1)
        return items
    mapping = dict(value)
    keys = list(mapping)
    key = rng.choice(keys)
    action = rng.randrange(10)
    if action == 0:
        del mapping[key]
    elif action == 1:
        mapping[rng.choice(["extra", b"extra", "t"])] = hostile_leaf(rng)
    else:
        mapping[key] = mutate_value(mapping[key], rng, depth + 1)
    return mapping


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    if not data:
        return rng.randbytes(rng.randrange(64))
    buffer = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        action = rng.randrange(5)
        index = rng.randrange(len(buffer)) if buffer else 0
        if action == 0 and buffer:
            buffer[index] ^= 1 << rng.randrange(8)
        elif action == 1:
            del buffer[index:]
        elif action == 2 and buffer:
            buffer[index] = rng.choice([0x00, 0x7F, 0x80, 0xC0, 0xC1, 0xC4, 0xD9, 0xDC, 0xDD, 0xDF, 0xFF])
        elif action == 3:
            buffer[index:index] = rng.randbytes(rng.randrange(1, 9))
        else:
            buffer += rng.randbytes(rng.randrange(1, 5))
    return bytes(buffer)


def generate(target: Target, seeds: list[Any], rng: random.Random) -> Any:
    seed = rng.choice(seeds)
    if target.takes == "bytes":
        if rng.random() < 0.4:
            return mutate_bytes(seed, rng)
        try:
            value = msgpack.unpackb(seed, raw=False, strict_map_key=False)
        except (ValueError, msgpack.UnpackException):
            return mutate_bytes(seed, rng)
        for _ in range(rng.randrange(1, 5)):
            value = mutate_value(value, rng)
        try:
            return pack(value)
        except (TypeError, ValueError, OverflowError):
            return mutate_bytes(seed, rng)
    value = seed
    for _ in range(rng.randrange(1, 5)):
        value = mutate_value(value, rng)
    try:  # what arrives went through msgpack: round-trip it
        return msgpack.unpackb(pack(value), raw=False, strict_map_key=False)
    except (TypeError, ValueError, OverflowError):
        return seed


def save_regression(target: Target, value: Any, err: BaseException) -> Path:
    REGRESSIONS.mkdir(exist_ok=True)
    data = value if target.takes == "bytes" else pack(value)
    path = REGRESSIONS / f"{target.name}-{abs(hash(data)) % 10**10}.json"
    path.write_text(json.dumps({"target": target.name, "takes": target.takes, "hex": data.hex(),
                                "found": f"{type(err).__name__}: {err}"[:300]}, indent=1) + "\n")
    return path


def fuzz(target: Target, inputs: int, seed: int, *, stop_after_s: float | None = None) -> list[Path]:
    rng = random.Random(seed)
    seeds = target.seeds()
    findings: list[Path] = []
    started = time.monotonic()
    for count in range(inputs):
        value = generate(target, seeds, rng)
        try:
            check(target, value)
        except Exception as err:  # noqa: BLE001 - every other exception is the finding
            findings.append(save_regression(target, value, err))
            traceback.print_exception(err, limit=4)
            if len(findings) >= 5:
                break
        if stop_after_s is not None and count % 256 == 0 and time.monotonic() - started > stop_after_s:
            break
    return findings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=1_000_000, help="inputs per target")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--target", action="append", choices=sorted(TARGETS))
    args = parser.parse_args(argv)
    failed = 0
    for name in args.target or sorted(TARGETS):
        started = time.monotonic()
        findings = fuzz(TARGETS[name], args.inputs, args.seed)
        took = time.monotonic() - started
        print(f"{name:18} {args.inputs:>9,} inputs  {args.inputs / took:>9,.0f}/s  "
              f"{len(findings)} finding(s)", flush=True)
        failed += len(findings)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

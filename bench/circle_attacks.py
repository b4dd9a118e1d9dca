"""Issue 14's attack figures, each beside a baseline measured in the same run.

1. Concurrent epochs (sans-IO core, no I/O): laptop removes phone while desktop, cut off,
   rotates; both records carry one epoch number. A trial converges when, on both replicas
   and for both remaining members, the number the envelopes and backups carry resolves to
   the current record's key (what senders seal under), and adverts use that key.
                                                                    target: 20 of 20
   Baseline: the same trials resolved by the old rule (highest record hash per number).
1b. The same race with real daemons and a real relay process (tests/integration/epochrace.py):
   alpha removes the thief while beta, cut off, pairs a phone (pairing is the API's rotation);
   beta's side is replayed until the pairing's record has the higher hash (the order in
   which the old rule goes wrong). A trial converges when every member holds one circle and
   one current epoch record not sealed to the thief, no member's device port takes the
   thief's key for the race's number, nothing acknowledged is lost, and the thief neither
   stays a member nor reads what is written after.                  target: N of N
   Baseline: the same trials with daemons on the old rule (tests/integration/old_epoch_rule.py).
2. Reads by a removed device behind a withholding relay (real daemons, real relay process
   patched to lie: tests/integration/lying_relay.py). alpha removes the thief; beta, which
   reaches the others only through the relay, writes a secret once it lists 2 devices (or
   after 10 s); we count trials in which the thief's daemon shows the secret within 3 s of
   alpha receiving it.                                              target: 0 of N
   Baseline: the same trials with an honest relay (what the relay's push alone achieves).
3. What a stranger learns at the device port: an independent Noise implementation
   (noiseprotocol) sends message 1 of plain Noise_XX, and of Noise_XXpsk0 with a made-up
   PSK, to a paired daemon; bytes received, and bytes of the daemon's static key it reads.
                                                                    target: 0 and 0
   Baseline: the same knock on a plain Noise_XX responder (meshd's transport as the device
   port used it before), in this process.

Run: .venv/bin/python bench/circle_attacks.py [--trials N] [--quick]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshd.protocol.circle import Circle
from meshd.protocol.records import Record
from tests.integration.daemons import DaemonProcess, RelayProcess, pair, start_all  # noqa: E402
from tests.integration.epochrace import RaceOutcome, run_race  # noqa: E402
from tests.integration.test_lying_relay import lying_relay, relay_path_only  # noqa: E402
from tests.protocol.test_circle import fork, make_device  # noqa: E402

LEARN_LIMIT_S = 10.0
READ_WINDOW_S = 3.0


def _old_rule(circle: Circle, dh) -> dict[int, bytes]:  # noqa: ANN001
    """The pre-fix resolution: per number, the highest hash among records sealed to dh."""
    best: dict[int, Record] = {}
    for encoded in circle.records():
        record = Record.decode(encoded)
        if record.epoch is None or bytes(dh.public) not in record.boxes or not circle.is_effective(record.hash):
            continue
        if record.epoch not in best or record.hash > best[record.epoch].hash:
            best[record.epoch] = record
    return {n: circle.record(r.hash).hash for n, r in best.items()}


def concurrent_epochs(trials: int) -> tuple[int, int]:
    new = old = 0
    for seed in range(trials):
        rng = random.Random(seed).randbytes
        laptop, desktop, phone = (make_device(n, rng) for n in ("laptop", "desktop", "phone"))
        circle = Circle.create(laptop.signer, laptop.info, rng)
        circle.add_device(laptop.signer, desktop.info, rng)
        circle.add_device(laptop.signer, phone.info, rng)
        rng = random.Random(seed + 1000).randbytes
        left, right = fork(circle), fork(circle)
        left.remove_device(laptop.signer, phone.key, rng)
        right.rotate_epoch(desktop.signer, rng)
        right.merge(left.records())
        left.merge(right.records())
        ok_new = ok_old = True
        for replica in (left, right):
            n, current = replica.state.epoch_number, replica.state.epoch_record
            for member in (laptop, desktop):
                key = replica.epoch_key(member.dh)
                ok_new &= replica.readable_epochs(member.dh).get(n) == key
                ok_new &= replica.recent_epochs(member.dh, 1)[0] == replica.current_keys(member.dh)
                ok_old &= _old_rule(replica, member.dh).get(n) == current
        new += ok_new
        old += ok_old
    return new, old


async def daemon_races(trials: int, old_rule: bool) -> list[RaceOutcome]:
    launcher = [sys.executable, "-m", "tests.integration.old_epoch_rule" if old_rule else "meshd"]
    outcomes = []
    for trial in range(trials):
        with tempfile.TemporaryDirectory(prefix="meshd-bench-") as tmp:
            outcomes.append(await run_race(Path(tmp) / str(trial), launcher))
    return outcomes


def _race_line(outcomes: list[RaceOutcome]) -> str:
    took = sum(bool(o.thief_psk_taken_by) for o in outcomes)
    attempts = sum(o.attempts for o in outcomes)
    return (f"{sum(o.converged_on_removal for o in outcomes)} of {len(outcomes)} "
            f"(a member's port took the thief's key in {took}; {attempts} pairings for {len(outcomes)} races)")


async def _devices_are(daemon: DaemonProcess, count: int) -> bool:
    return bool((await daemon.status())["devices"] == count)


async def _has(daemon: DaemonProcess, text: str) -> bool:
    return text in await daemon.texts("chat")


async def _within(daemon: DaemonProcess, check: Any, limit_s: float) -> bool:
    """Whether check() held within limit_s (re-checked on each of the daemon's events)."""
    try:
        await daemon.until(check, limit_s, "a bench condition")
    except AssertionError:
        return False
    return True


async def _withholding_trial(root: Path, lying: bool) -> tuple[bool, bool]:
    """(beta learned of the removal in time, the thief read the secret)."""
    relay = lying_relay(root) if lying else RelayProcess(root)
    address = await relay.start()
    alpha, beta, thief = (DaemonProcess(root, name) for name in ("alpha", "beta", "thief"))
    daemons = [alpha, beta, thief]
    try:
        await start_all(daemons)
        await pair(alpha, beta)
        await pair(alpha, thief)
        await relay_path_only(daemons, address)
        thief_id = (await thief.status())["device"]
        await alpha.request("POST", f"/v1/devices/{thief_id[:16]}/remove")
        learned = await _within(beta, lambda: _devices_are(beta, 2), LEARN_LIMIT_S)
        secret = f"secret after the removal {time.time()}"
        await beta.write("chat", secret)
        await _within(alpha, lambda: _has(alpha, secret), LEARN_LIMIT_S)
        read = await _within(thief, lambda: _has(thief, secret), READ_WINDOW_S)
        return learned, read
    finally:
        for process in (*daemons, relay):
            process.kill()


async def withholding(trials: int, lying: bool) -> tuple[int, int]:
    learned = reads = 0
    for trial in range(trials):
        with tempfile.TemporaryDirectory(prefix="meshd-bench-") as tmp:
            ok, read = await _withholding_trial(Path(tmp) / str(trial), lying)
        learned += ok
        reads += read
    return learned, reads


def static_key_exposure() -> tuple[dict[str, tuple[int, int]], tuple[int, int]]:
    """Per knock: (bytes received, static key bytes learnt); and the plain-XX baseline."""
    from meshd.identity import load_or_create_identity
    from meshd.net.transport import open_secure_connection
    from meshd.protocol.crypto import DHKeyPair as KeyPair
    from tests.integration.daemons import form_circle
    from tests.integration.test_device_port_privacy import _stranger_knocks

    patterns = {"plain XX": (b"Noise_XX_25519_ChaChaPoly_BLAKE2b", None),
                "XXpsk0, made-up PSK": (b"Noise_XXpsk0_25519_ChaChaPoly_BLAKE2b", os.urandom(32))}

    async def daemon_side(root: Path) -> dict[str, tuple[int, int]]:
        alpha, beta = DaemonProcess(root, "alpha"), DaemonProcess(root, "beta")
        try:
            await form_circle([alpha, beta])
            port = int((await alpha.status())["listen"][0].rsplit(":", 1)[1])
            static = bytes(load_or_create_identity(alpha.state_dir).noise.public)
            out = {}
            for name, (pattern, psk) in patterns.items():
                received, learnt = await trio.to_thread.run_sync(_stranger_knocks, port, pattern, psk)
                out[name] = (len(received), len(learnt) if learnt == static else 0)
            return out
        finally:
            alpha.kill()
            beta.kill()

    async def baseline() -> tuple[int, int]:
        static = KeyPair.generate(os.urandom)
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        result: list[tuple[bytes, bytes]] = []

        async def knock() -> None:
            result.append(await trio.to_thread.run_sync(_stranger_knocks, port, *patterns["plain XX"]))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(knock)
            stream = await listeners[0].accept()
            with trio.move_on_after(15):
                try:
                    await open_secure_connection(stream, initiator=False, static=static,
                                                 authorize=lambda key: False)
                except Exception:  # noqa: BLE001 - the stranger hangs up: any error will do
                    pass
        await listeners[0].aclose()
        received, learnt = result[0]
        return len(received), len(learnt) if learnt == bytes(static.public) else 0

    with tempfile.TemporaryDirectory(prefix="meshd-bench-") as tmp:
        measured = trio.run(daemon_side, Path(tmp))
    return measured, trio.run(baseline)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="3 daemon trials instead of --trials")
    parser.add_argument("--daemons-only", action="store_true", help="figure 2 only (e.g. on an older tree)")
    parser.add_argument("--race-trials", type=int, default=None,
                        help="real-daemon races for figure 1b (default: as --trials; --quick: 1)")
    args = parser.parse_args()
    daemon_trials = 3 if args.quick else args.trials
    race_trials = args.race_trials if args.race_trials is not None else 1 if args.quick else args.trials

    if not args.daemons_only:
        new, old = concurrent_epochs(args.trials)
        print(f"1. concurrent removal + rotation, converged on the removal's key: "
              f"{new} of {args.trials} (baseline, highest hash per number: {old} of {args.trials})")
        if race_trials:
            now = _race_line(trio.run(daemon_races, race_trials, False))
            then = _race_line(trio.run(daemon_races, race_trials, True))
            print(f"1b. real daemons, removal + concurrent pairing, converged on the removal's "
                  f"key: {now} (baseline, daemons on the old rule: {then})")
    learned, reads = trio.run(withholding, daemon_trials, True)
    honest_learned, honest_reads = trio.run(withholding, daemon_trials, False)
    print(f"2. withholding relay: beta learned of the removal in {learned} of {daemon_trials}, "
          f"the removed device read the secret in {reads} of {daemon_trials} "
          f"(baseline, honest relay: learned {honest_learned}, read {honest_reads} of {daemon_trials})")

    if not args.daemons_only:
        measured, (base_bytes, base_static) = static_key_exposure()
        for name, (received, learnt) in measured.items():
            print(f"3. stranger at the device port ({name}): {received} bytes received, {learnt} "
                  f"bytes of the static key learnt (baseline, plain XX responder: {base_bytes} "
                  f"bytes received, {base_static} learnt)")


if __name__ == "__main__":
    main()

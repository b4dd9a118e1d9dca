"""Vectors for claims and membership records (a chain, rejections, concurrent histories) and recovery words."""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack
from vec_common import Device, Draws, deterministic_sealed_boxes, document, hx, pack

from meshd.protocol import circle as circle_module
from meshd.protocol.circle import Circle
from meshd.protocol.codes import wordlist
from meshd.protocol.crypto import SigningKeyPair, derive_key
from meshd.protocol.entry import sign_head
from meshd.protocol.epochs import open_box
from meshd.protocol.records import DeviceInfo, Record, RecordRejected
from meshd.protocol.recovery import (
    RecoveryWordsError,
    entropy_to_words,
    recovery_member,
    words_to_seed,
)

# ---- circle records ------------------------------------------------------------------


def circle_vectors() -> dict[str, Any]:
    rng = Draws("circle")
    laptop, desktop, phone = Device("laptop", rng), Device("desktop", rng), Device("phone", rng)
    stranger = Device("stranger", rng)
    recovery_seed = rng(32)
    rec_signer, rec_dh, rec_info = recovery_member(recovery_seed)
    with deterministic_sealed_boxes(rng):
        circle = Circle.create(laptop.signer, laptop.info, rng)
        chain: list[tuple[str, bytes]] = [("genesis", circle.records()[0]), ("epoch 1", circle.records()[1])]
        steps = [
            ("laptop adds desktop", lambda: circle.add_device(laptop.signer, desktop.info, rng)),
            ("laptop enrols the recovery member", lambda: circle.enrol_recovery(
                laptop.signer, rec_info, rng)),
            ("desktop adds phone", lambda: circle.add_device(desktop.signer, phone.info, rng)),
            ("laptop removes phone", lambda: circle.remove_device(laptop.signer, phone.key, rng)),
            ("the recovery member rotates", lambda: circle.rotate_epoch(rec_signer, rng)),
        ]
        for name, step in steps:
            made = step()
            kinds = [Record.decode(r).kind for r in made]
            chain += [(f"{name}: {kind}", r) for kind, r in zip(kinds, made, strict=True)]
        records = [r for _, r in chain]
        state = circle.state
        ids = circle.circle_id
        phone_removed_at = next(i for i, (n, _) in enumerate(chain) if n.endswith(": remove")) + 1

        def heads_of(prefix: int) -> tuple[bytes, ...]:
            return Circle.from_records(records[:prefix]).state.heads

        def epoch_body(number: int, recipients: list[bytes]) -> dict[str, Any]:
            key = rng(32)
            return {"boxes": [[dh, circle_module.seal(dh, key)] for dh in sorted(recipients)],
                    "epoch": number}

        members_dh = [bytes(d.dh.public) for d in (laptop, desktop)] + [bytes(rec_dh.public)]
        full = len(records)
        top = state.epoch_number
        other = Circle.create(laptop.signer, laptop.info, rng)
        tampered = bytearray(records[2])
        tampered[-1] ^= 1
        bad_recovery = DeviceInfo(stranger.key, bytes(stranger.dh.public), "x", recovery=True).claimed(
            stranger.signer)
        noncanonical = records[2][:2] + b"\xcc\x01" + records[2][3:]
        assert records[2][2] == 1
        candidates: list[tuple[str, int, bytes]] = [
            ("removed phone starts an epoch after its removal", full,
             Record.sign(phone.signer, ids, "epoch", heads_of(full), epoch_body(top + 1, members_dh)).encoded),
            ("a stranger starts an epoch", full,
             Record.sign(stranger.signer, ids, "epoch", heads_of(full), epoch_body(top + 1, members_dh)).encoded),
            ("epoch number not above its ancestors'", full,
             Record.sign(laptop.signer, ids, "epoch", heads_of(full), epoch_body(top, members_dh)).encoded),
            ("epoch not sealed to the recovery member", full,
             Record.sign(laptop.signer, ids, "epoch", heads_of(full), epoch_body(top + 1, members_dh[:2])).encoded),
            ("the removed phone added again", full,
             Record.sign(laptop.signer, ids, "add", heads_of(full), {"device": phone.info.proof}).encoded),
            ("desktop added twice", full,
             Record.sign(laptop.signer, ids, "add", heads_of(full), {"device": desktop.info.proof}).encoded),
            ("a parent nobody has", full,
             Record.sign(laptop.signer, ids, "epoch", [rng(32)], epoch_body(top + 1, members_dh)).encoded),
            ("a record of another circle", full,
             Record.sign(laptop.signer, other.circle_id, "epoch", other.state.heads,
                         epoch_body(2, [bytes(laptop.dh.public)])).encoded),
            ("a recovery claim in an add record", full,
             _unchecked_record(laptop.signer, ids, "add", heads_of(full), {"device": bad_recovery.proof})),
            ("epoch number 2^32", full,
             _unchecked_record(laptop.signer, ids, "epoch", heads_of(full), epoch_body(2**32, members_dh))),
            ("the add record with its signature's last byte flipped", 2, bytes(tampered)),
            ("the add record with its version as cc 01", 2, noncanonical),
            ("records without their genesis", 0, b"".join([])),
        ]
    def verdict(base: list[bytes]) -> str:
        try:
            Circle.from_records(base)
        except RecordRejected as err:
            return err.reason
        return "ok"

    rejections = []
    for name, prefix, record in candidates:
        base = records[:prefix] + ([record] if record else records[1:4])
        rejections.append({"name": name, "prefix": prefix,
                           "records": [hx(r) for r in base[prefix:]], "reason": verdict(base)})
    expected = ["removed-key", "not-a-member", "stale-epoch", "bad-boxes", "removed-key",
                "duplicate-device", "unknown-parents", "wrong-circle", "bad-body", "bad-body",
                "bad-signature", "malformed", "no-genesis"]
    assert [r["reason"] for r in rejections] == expected, [r["reason"] for r in rejections]

    steps_out = []
    for index, (name, record) in enumerate(chain):
        after = Circle.from_records(records[: index + 1]).state
        decoded = Record.decode(record)
        entry: dict[str, Any] = {
            "name": name, "kind": decoded.kind, "record": hx(record), "hash": hx(decoded.hash),
            "signed_bytes": hx(b"meshd/circle-record/1\x00" + pack(msgpack.unpackb(record)[0])),
            "verdict": "ok",
            "members_after": sorted(hx(k) for k in after.members),
            "removed_after": sorted(hx(k) for k in after.removed),
            "epoch_after": after.epoch_number,
        }
        if decoded.epoch is not None:
            holder = next(d for d in (laptop, desktop, phone) if bytes(d.dh.public) in decoded.boxes)
            epoch_key = open_box(holder.dh, decoded.boxes[bytes(holder.dh.public)])
            entry["epoch_key"] = hx(epoch_key)
        steps_out.append(entry)
    assert phone_removed_at > 0
    return document(
        "membership records: claims, a chain from genesis, verdicts",
        ["protocol/circle.md#device-claim", "protocol/circle.md#record",
         "protocol/circle.md#validity-decided-once-from-the-records-causal-past",
         "protocol/circle.md#epochs", "protocol/circle.md#recovery-words-and-the-recovery-member",
         "protocol/circle.md#bodies"],
        "chain: each record names all heads of the records before it (a linear history), so "
        "each is valid against the state of all earlier ones and counts. Every box opens, "
        "with the recipient's X25519 secret, to the record's epoch_key. rejections: the "
        "set chain[:prefix] + records, given to Circle.from_records, is rejected with reason "
        "(circle.md's list). concurrent: replicas of one circle act while partitioned "
        "(each record names its replica's heads), then every record is merged; the state "
        "follows from the merge rule (members, removed, the current epoch). removal_points: "
        "base plus each case's records; a remove may carry cutoff = [seq, hash, sig], a head "
        "the removed key signed (logs.md), and the state's cutoff per removed key is the "
        "smallest among its counting removes (circle.md \"The removal point\"). More cases are "
        "in tests/protocol/test_circle.py and tests/protocol/test_removal_cutoff.py.",
        devices=[d.describe() for d in (laptop, desktop, phone, stranger)],
        recovery={"seed": hx(recovery_seed), "sign_key": hx(bytes(rec_signer.public)),
                  "dh_key": hx(bytes(rec_dh.public)), "x25519_private": hx(bytes(rec_dh.private)),
                  "claim": hx(rec_info.proof)},
        circle_id=hx(ids), chain=steps_out,
        final_state={"members": sorted(hx(k) for k in state.members),
                     "removed": sorted(hx(k) for k in state.removed),
                     "epoch": state.epoch_number, "heads": [hx(h) for h in state.heads]},
        rejections=rejections,
        concurrent=concurrent_cases(),
        removal_points=removal_point_cases(),
    )


def removal_point_cases() -> dict[str, Any]:
    """Removes carrying a cutoff (circle.md "The removal point"): base (a circle of laptop,
    desktop, phone) plus each case's records: valid ones with the state's cutoff that counts
    (the smallest of the counting removes), and bad ones (bad-body)."""
    rng = Draws("circle-cutoff")
    laptop, desktop, phone = (Device(n, rng) for n in ("laptop", "desktop", "phone"))
    heads = [sign_head(phone.signer, seq, rng(32)) for seq in (1, 7)]
    out = []
    with deterministic_sealed_boxes(rng):
        base = Circle.create(laptop.signer, laptop.info, rng)
        base.add_device(laptop.signer, desktop.info, rng)
        base.add_device(laptop.signer, phone.info, rng)
        prefix = len(base.records())

        def case(name: str, replicas: list[Circle], reason: str = "ok", extra: bytes = b"") -> None:
            records = list(dict.fromkeys(r for c in replicas for r in c.records()))
            records += [extra] if extra else []
            entry: dict[str, Any] = {"name": name, "records": [hx(r) for r in records[prefix:]],
                                     "verdict": reason}
            if reason == "ok":
                state = Circle.from_records(records).state
                entry["cutoffs"] = {hx(k): [c.seq, hx(c.hash), hx(c.sig)]
                                    for k, c in sorted(state.cutoffs.items())}
            else:
                try:
                    Circle.from_records(records)
                    raise AssertionError(name)
                except RecordRejected as err:
                    assert err.reason == reason, (name, err.reason)
            out.append(entry)

        one = Circle.from_records(base.records())
        one.remove_device(laptop.signer, phone.key, rng, cutoff=heads[1])
        case("laptop removes phone, its entries count up to 7", [one])
        two = Circle.from_records(base.records())
        two.remove_device(desktop.signer, phone.key, rng, cutoff=heads[0])
        case("desktop concurrently removes phone with a cutoff at 1: the smallest counts", [one, two])
        three = Circle.from_records(base.records())
        three.remove_device(desktop.signer, phone.key, rng)
        case("a concurrent remove without a cutoff does not lift it", [one, three])
        boxes = [[d.info.dh_key, circle_module.seal(d.info.dh_key, rng(32))]
                 for d in sorted((laptop, desktop), key=lambda d: d.info.dh_key)]
        forged = sign_head(desktop.signer, 7, heads[1].hash)
        for name, cutoff in (("a cutoff signed by another key", [7, heads[1].hash, forged.sig]),
                             ("seq 0 with a non-zero hash", [0, heads[1].hash, bytes(64)])):
            body = {"boxes": boxes, "cutoff": cutoff, "epoch": base.state.epoch_number + 1,
                    "removed": phone.key}
            case(name, [base], "bad-body",
                 _unchecked_record(laptop.signer, base.circle_id, "remove", base.state.heads, body))
    return {"base": [hx(r) for r in base.records()], "cases": out}


def concurrent_cases() -> list[dict[str, Any]]:
    """Partitioned replicas that each act alone, then merge: circle.md's consequence table."""
    rng = Draws("circle-concurrent")
    laptop, desktop, phone, tablet, extra = (Device(n, rng) for n in
                                             ("laptop", "desktop", "phone", "tablet", "extra"))

    def founded(*devices: Device) -> Circle:
        circle = Circle.create(devices[0].signer, devices[0].info, rng)
        for device in devices[1:]:
            circle.add_device(devices[0].signer, device.info, rng)
        return circle

    def fork(circle: Circle) -> Circle:
        return Circle.from_records(circle.records())

    def worked_example(c: Circle) -> list[Circle]:
        a, b = fork(c), fork(c)
        a.remove_device(laptop.signer, phone.key, rng)
        b.rotate_epoch(phone.signer, rng)
        return [a, b]

    def mutual(c: Circle) -> list[Circle]:
        a, b = fork(c), fork(c)
        a.remove_device(laptop.signer, desktop.key, rng)
        b.remove_device(desktop.signer, laptop.key, rng)
        return [a, b]

    def removed_removes_another(c: Circle) -> list[Circle]:
        a, b = fork(c), fork(c)
        a.remove_device(laptop.signer, desktop.key, rng)
        b.remove_device(desktop.signer, phone.key, rng)
        return [a, b]

    def removed_adds_a_remover(c: Circle) -> list[Circle]:
        a, b = fork(c), fork(c)
        a.remove_device(laptop.signer, desktop.key, rng)
        b.add_device(desktop.signer, extra.info, rng)
        b.remove_device(extra.signer, laptop.key, rng)
        return [a, b]

    def three_cycle(c: Circle) -> list[Circle]:
        a, b, d = fork(c), fork(c), fork(c)
        a.remove_device(laptop.signer, desktop.key, rng)
        b.remove_device(desktop.signer, phone.key, rng)
        d.remove_device(phone.signer, laptop.key, rng)
        return [a, b, d]

    cases = [
        ("circle.md worked example: laptop removes phone while phone starts an epoch",
         (laptop, desktop, phone), worked_example),
        ("laptop and desktop remove each other", (laptop, desktop, phone), mutual),
        ("desktop, removed by laptop, concurrently removes phone", (laptop, desktop, phone),
         removed_removes_another),
        ("desktop, removed by laptop, adds extra, who removes laptop", (laptop, desktop, phone),
         removed_adds_a_remover),
        ("laptop removes desktop, desktop removes phone, phone removes laptop",
         (laptop, desktop, phone, tablet), three_cycle),
    ]
    out = []
    with deterministic_sealed_boxes(rng):
        for name, devices, act in cases:
            base = founded(*devices)
            replicas = act(base)
            records = list(dict.fromkeys(r for replica in replicas for r in replica.records()))
            state = Circle.from_records(records).state
            out.append({
                "name": name, "devices": {hx(d.key): d.name for d in devices},
                "records": [hx(r) for r in records],
                "members": sorted(hx(k) for k in state.members),
                "removed": sorted(hx(k) for k in state.removed),
                "epoch": state.epoch_number,
                "epoch_record": hx(state.epoch_record) if state.epoch_record else None,
                "needs_rotation": state.needs_rotation,
            })
    names = {hx(d.key): d.name for d in (laptop, desktop, phone, tablet, extra)}
    assert [[names[k] for k in case["removed"]] for case in out] == [
        ["phone"], sorted(["laptop", "desktop"], key=lambda n: hx({d.name: d for d in (laptop, desktop)}[n].key)),
        ["desktop"], ["desktop"],
        [names[k] for k in sorted(hx(d.key) for d in (laptop, desktop, phone))]], out
    return out


def _unchecked_record(signer: SigningKeyPair, circle_id: bytes, kind: str, parents: Any,
                      body: dict[str, Any]) -> bytes:
    """A signed record that Record.sign would refuse to build (its body is invalid)."""
    unsigned = [1, circle_id, kind, sorted(parents), bytes(signer.public),
                {k: body[k] for k in sorted(body)}]
    return pack([unsigned, signer.sign(b"meshd/circle-record/1\x00" + pack(unsigned))])



# ---- recovery words ------------------------------------------------------------------


def recovery_vectors() -> dict[str, Any]:
    rng = Draws("recovery")
    vectors = []
    for entropy in (bytes(32), bytes([0xFF] * 32), rng(32)):
        words = entropy_to_words(entropy)
        assert words_to_seed(words) == entropy
        signer, dh, info = recovery_member(entropy)
        vectors.append({
            "entropy": hx(entropy), "words": " ".join(words),
            "ed25519_seed": hx(derive_key(entropy, b"recovery-sign", b"meshd/recovery/1")),
            "sign_key": hx(bytes(signer.public)),
            "x25519_private": hx(bytes(dh.private)), "dh_key": hx(bytes(dh.public)),
            "name_text": info.name, "claim": hx(info.proof),
        })
    good = vectors[2]["words"].split()
    swapped = good[:]
    swapped[0], swapped[1] = swapped[1], swapped[0]
    changed = good[:]
    changed[23] = wordlist()[(wordlist().index(changed[23]) + 1) % 2048]
    invalid = [("first two words swapped", swapped), ("last word changed", changed),
               ("23 words", good[:23]), ("a word not in the list", [*good[:5], "meshd", *good[6:]])]
    rejected = []
    for name, words in invalid:
        try:
            words_to_seed(words)
            verdict = "ok"
        except RecoveryWordsError:
            verdict = "invalid"
        rejected.append({"name": name, "words": " ".join(words), "verdict": verdict})
    assert all(r["verdict"] == "invalid" for r in rejected)
    words_file = ("\n".join(wordlist()) + "\n").encode()
    return document(
        "recovery words to the recovery member's keys",
        ["protocol/circle.md#recovery-words-and-the-recovery-member", "protocol/circle.md#derive_key",
         "protocol/circle.md#device-claim"],
        "24 BIP39 English words = 256 bits of entropy then the first 8 bits of its SHA-256, "
        "11 bits a word, most significant first. The entropy is the seed (no PBKDF2). "
        "ed25519 seed = derive_key(seed, 'recovery-sign', 'meshd/recovery/1'), x25519 "
        "private = derive_key(seed, 'recovery-dh', 'meshd/recovery/1'); the claim is the "
        "recovery member's (name 'recovery key', recovery true).",
        wordlist={"lines": 2048, "bytes": len(words_file), "sha256": hashlib.sha256(words_file).hexdigest()},
        vectors=vectors, invalid=rejected,
    )

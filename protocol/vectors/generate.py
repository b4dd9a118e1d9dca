"""Generate meshd's published test vectors from the code (protocol/vectors/*.json).

    PYTHONPATH=. python protocol/vectors/generate.py           write the files
    PYTHONPATH=. python protocol/vectors/generate.py --check   exit 1 if any file differs

Deterministic: every random input comes from `Draws(label)`, a BLAKE2b stream keyed by a
fixed label, and libsodium's sealed boxes (whose ephemeral key libsodium draws itself) are
made here from a drawn ephemeral key by libsodium's own construction, so they open with
crypto_box_seal_open like any other. Ed25519 signatures are deterministic. The vectors are
checked in; tests/protocol/test_vectors_current.py asserts the files equal what this script
produces now (code and vectors cannot drift), and tests/interop/ verifies every vector from
the spec pages with hashlib, PyNaCl, noiseprotocol and msgpack alone.

Every value is lowercase hex unless a field name says otherwise (`*_text`, `*_words`,
numbers, reasons). Each file names the spec pages it covers in "spec".
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
from nacl import bindings as sodium

from meshd.protocol import circle as circle_module
from meshd.protocol.circle import (
    Circle,
    DeviceInfo,
    Record,
    RecordRejected,
    epoch_keys,
)
from meshd.protocol.codes import sas_words, wordlist
from meshd.protocol.cpace import (
    DSI,
    S_IN_BYTES,
    CPaceAbort,
    CPaceInitiator,
    calculate_generator,
    generator_string,
    intermediate_session_key,
    scalar_mult,
    scalar_mult_vfy,
    transcript_ir,
)
from meshd.protocol.crypto import DHKeyPair, SigningKeyPair, derive_key
from meshd.protocol.discovery import (
    make_advert,
    recognise,
    short_device_id,
    window_key,
    window_of,
)
from meshd.protocol.envelope import (
    EnvelopeRejected,
    mailbox_id,
    open_backup,
    open_envelope,
    seal_backup,
    seal_envelope,
)
from meshd.protocol.log import (
    ZERO_HASH,
    Batch,
    EntryRejected,
    batch_message,
    blake2b_256,
    encode_header,
    entry_hash,
    order_key,
    sign_head,
    verify_batch,
)
from meshd.protocol.pairing import (
    PAIRING_PROLOGUE,
    PairingHandshake,
    channel_identifier,
    make_invitation,
    psk_from_isk,
)
from meshd.protocol.recovery import (
    RecoveryWordsError,
    entropy_to_words,
    recovery_member,
    words_to_seed,
)

HERE = Path(__file__).resolve().parent
GENERATOR = "protocol/vectors/generate.py"


# ---- deterministic inputs ------------------------------------------------------------


class Draws:
    """rng(n) for the code under test: a BLAKE2b-512 counter stream keyed by a label."""

    def __init__(self, label: str) -> None:
        self._label = label.encode()
        self._counter = 0
        self._buffer = b""

    def __call__(self, n: int) -> bytes:
        while len(self._buffer) < n:
            self._buffer += hashlib.blake2b(self._counter.to_bytes(8, "big"), key=self._label).digest()
            self._counter += 1
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out


class Queue:
    """rng(n) that hands out planned values in order (each of the size asked)."""

    def __init__(self, *values: bytes) -> None:
        self._values = list(values)

    def __call__(self, n: int) -> bytes:
        value = self._values.pop(0)
        assert len(value) == n, (len(value), n)
        return value

    def empty(self) -> bool:
        return not self._values


def hx(data: bytes) -> str:
    return bytes(data).hex()


def pack(value: Any) -> bytes:
    return bytes(msgpack.packb(value, use_bin_type=True))


@contextmanager
def deterministic_sealed_boxes(rng: Callable[[int], bytes]) -> Iterator[None]:
    """circle.py's seal() with the ephemeral key drawn from rng (libsodium's sealed box:
    nonce = BLAKE2b-192(epk || pk), box = epk || crypto_box(m, nonce, pk, esk))."""

    def seal(recipient: bytes, plaintext: bytes) -> bytes:
        esk = rng(32)
        epk = sodium.crypto_scalarmult_base(esk)
        nonce = hashlib.blake2b(epk + recipient, digest_size=24).digest()
        return epk + sodium.crypto_box(plaintext, nonce, recipient, esk)

    original = circle_module.seal
    circle_module.seal = seal
    try:
        yield
    finally:
        circle_module.seal = original


class Device:
    """A test device with keys from a label (its secrets are published: test keys only)."""

    def __init__(self, name: str, rng: Callable[[int], bytes]) -> None:
        self.name = name
        self.signer = SigningKeyPair(rng(32))
        self.dh = DHKeyPair.from_private_bytes(rng(32))
        self.info = DeviceInfo(bytes(self.signer.public), bytes(self.dh.public), name).claimed(self.signer)

    @property
    def key(self) -> bytes:
        return bytes(self.signer.public)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ed25519_seed": hx(bytes(self.signer.seed)),
            "sign_key": hx(self.key),
            "x25519_private": hx(bytes(self.dh.private)),
            "dh_key": hx(bytes(self.dh.public)),
            "claim": hx(self.info.proof),
        }


def document(construction: str, spec: list[str], notes: str, **body: Any) -> dict[str, Any]:
    return {"construction": construction, "spec": spec, "generated_by": GENERATOR,
            "notes": notes, **body}


# ---- derive_key and the epoch subkeys ------------------------------------------------


def derive_key_vectors() -> dict[str, Any]:
    rng = Draws("derive_key")
    key32, key64 = rng(32), rng(64)
    cases = [
        (key32, b"mailbox", (7).to_bytes(8, "big"), 32),
        (key32, b"backup", (7).to_bytes(8, "big"), 32),
        (key32, b"meshd-mailbox-id", rng(32), 32),  # a 16-byte label: no padding
        (key32, b"meshd/device-id", b"", 8),
        (key64, b"meshd-pair-psk", b"", 32),
        (key64, b"meshd-pair-sas", b"", 8),
        (key32, b"recovery-sign", b"meshd/recovery/1", 32),
        (key32, b"x", b"", 64),
    ]
    vectors = [
        {"key": hx(key), "label_text": label.decode(), "personal": hx(label.ljust(16, b"\0")),
         "context": hx(context), "size": size, "output": hx(derive_key(key, label, context, size))}
        for key, label, context, size in cases
    ]
    epochs = []
    for number in (1, 2, 2**32 - 1):
        epoch_key = rng(32)
        keys = epoch_keys(number, epoch_key)
        epochs.append({"epoch_key": hx(epoch_key), "number": number,
                       "context": hx(number.to_bytes(8, "big")),
                       "mailbox": hx(keys.mailbox), "backup": hx(keys.backup),
                       "discovery": hx(keys.discovery), "mailbox_id_key": hx(keys.mailbox_id_key)})
    return document(
        "derive_key and the per-purpose epoch subkeys",
        ["protocol/circle.md#derive_key", "protocol/circle.md#epochs"],
        "derive_key(key, label, context, size) = BLAKE2b(key=key, data=context, digest_size=size, "
        "personal=label zero-padded to 16 bytes, salt=16 zero bytes). epoch_subkeys: label per "
        "field (mailbox, backup, discovery, mailbox-id), context = number as 8-byte big-endian.",
        derive_key=vectors, epoch_subkeys=epochs,
    )


# ---- envelopes and mailbox ids -------------------------------------------------------


def _epoch(number: int, rng: Callable[[int], bytes]) -> tuple[bytes, Any]:
    epoch_key = rng(32)
    return epoch_key, epoch_keys(number, epoch_key)


def envelope_vectors() -> dict[str, Any]:
    rng = Draws("envelope")
    sender, recipient = Device("laptop", rng), Device("desktop", rng)
    epoch_key, keys = _epoch(3, rng)
    mailbox = mailbox_id(keys, recipient.key)
    other_epoch_key, other_keys = _epoch(4, rng)
    vectors = []
    for seq, payload in ((1, {"t": "log.entries", "note": "hello"}),
                         (2**40, {"t": "relay.vector", "vector": {sender.key: 5}})):
        nonce = rng(24)
        envelope = seal_envelope(keys=keys, mailbox=mailbox, signer=sender.signer, seq=seq,
                                 payload=payload, rng=Queue(nonce))
        body = pack(payload)
        signed = b"meshd/envelope-signature/1\x00" + pack([mailbox, 3, seq, body])
        signature = sender.signer.sign(signed)
        opened = open_envelope(envelope, mailbox=mailbox,
                               keys_for_epoch={3: keys}.get, is_sender_allowed={sender.key}.__contains__)
        assert (opened.seq, opened.payload) == (seq, payload)
        vectors.append({
            "seq": seq, "payload": hx(body), "nonce": hx(nonce),
            "associated_data": hx(b"meshd/envelope/1\x00" + mailbox + (3).to_bytes(4, "big")),
            "signed_bytes": hx(signed), "signature": hx(signature),
            "plaintext": hx(pack([sender.key, seq, body, signature])),
            "envelope": hx(envelope),
        })
    good = bytes.fromhex(vectors[0]["envelope"])
    other_mailbox = mailbox_id(keys, sender.key)

    def verdict(data: bytes, box: bytes, allowed: set[bytes]) -> str:
        try:
            open_envelope(data, mailbox=box, keys_for_epoch={3: keys, 4: other_keys}.get,
                          is_sender_allowed=allowed.__contains__)
        except EnvelopeRejected as err:
            return err.reason
        return "ok"

    flipped = bytearray(good)
    flipped[-1] ^= 1
    relabelled = bytearray(good)
    relabelled[1:5] = (4).to_bytes(4, "big")
    stranger = Device("stranger", rng)
    not_member = seal_envelope(keys=keys, mailbox=mailbox, signer=stranger.signer, seq=1,
                               payload={"t": "x"}, rng=Queue(rng(24)))
    rejections = [
        ("tampered ciphertext", bytes(flipped), mailbox),
        ("moved to another mailbox", good, other_mailbox),
        ("relabelled with epoch 4 (a key is known for it)", bytes(relabelled), mailbox),
        ("epoch 9: no key", good[:1] + (9).to_bytes(4, "big") + good[5:], mailbox),
        ("unknown format version 02", b"\x02" + good[1:], mailbox),
        ("44 bytes: shorter than header and tag", good[:44], mailbox),
        ("sealed by a key that is not a member", not_member, mailbox),
    ]
    return document(
        "mailbox ids and envelope seal/open",
        ["protocol/relay.md#mailbox-ids", "protocol/relay.md#envelope",
         "protocol/circle.md#derive_key", "protocol/README.md"],
        "mailbox_id = derive_key(mailbox_id_key, 'meshd-mailbox-id', recipient sign_key). "
        "envelope = 01 || epoch u32 || nonce || XChaCha20-Poly1305-IETF(mailbox key, nonce, "
        "associated_data, plaintext) with the 16-byte tag appended. Rejections are opened by "
        "the recipient holding epochs 3 and 4, with only the sender a member.",
        sender=sender.describe(), recipient=recipient.describe(),
        epoch={"number": 3, "epoch_key": hx(epoch_key), "mailbox": hx(keys.mailbox),
               "mailbox_id_key": hx(keys.mailbox_id_key)},
        other_epoch={"number": 4, "epoch_key": hx(other_epoch_key), "mailbox": hx(other_keys.mailbox)},
        mailbox_ids=[{"sign_key": hx(d.key), "mailbox_id": hx(mailbox_id(keys, d.key))}
                     for d in (recipient, sender)],
        envelopes=vectors,
        rejections=[{"name": name, "mailbox": hx(box), "envelope": hx(data),
                     "reason": verdict(data, box, {sender.key})}
                    for name, data, box in rejections],
    )


# ---- log entries and batches ---------------------------------------------------------


def _entries(author: SigningKeyPair, ops: list[tuple[int, str, str, str, bytes]]) -> list[dict[str, Any]]:
    prev = ZERO_HASH
    out = []
    for seq, (hlc, stream, record_id, op, body) in enumerate(ops, start=1):
        header = encode_header(bytes(author.public), seq, prev, hlc, stream, record_id, op,
                               blake2b_256(body), len(body))
        out.append({"seq": seq, "prev_hash": hx(prev), "hlc": hlc, "stream": stream,
                    "record_id": record_id, "op": op, "body": hx(body),
                    "body_hash": hx(blake2b_256(body)), "body_len": len(body),
                    "header": hx(header), "entry_hash": hx(entry_hash(header)),
                    "order_key": hx(order_key(hlc, bytes(author.public), seq))})
        prev = entry_hash(header)
    return out


def log_vectors() -> dict[str, Any]:
    rng = Draws("log")
    author = Device("laptop", rng)
    spec_example = encode_header(bytes(range(32)), 1, ZERO_HASH, 5 << 16, "chat", "m1", "put",
                                 blake2b_256(b"hi"), 2)
    base = 1_764_000_000_000 << 16
    entries = _entries(author.signer, [
        (base, "chat", "m1", "put", b"hi"),
        (base + 1, "chat", "m2", "put", "h\u00e9llo".encode()),
        (base + (5 << 16), "chat", "m1", "delete", b""),
        (base + (9 << 16), "chat", "", "clear", b""),
    ])
    last = bytes.fromhex(entries[-1]["entry_hash"])
    head = sign_head(author.signer, 4, last)
    headers = [bytes.fromhex(e["header"]) for e in entries]
    bodies: list[bytes | None] = [bytes.fromhex(e["body"]) for e in entries]
    bodies[2] = bodies[3] = b""
    bodies[0] = None  # superseded by the delete: a sender may withhold it
    message = batch_message(author.key, headers, bodies, head)
    allowed = {author.key}.__contains__

    def verdict(msg: dict[str, Any]) -> str:
        try:
            verify_batch(Batch.from_message(msg), 0, ZERO_HASH, allowed)
        except EntryRejected as err:
            return err.reason
        return "ok"

    assert verdict(message) == "ok"
    broken = [headers[0], headers[2], headers[3]]  # entry 2 missing: seq jumps
    chain = list(headers)
    chain[1] = encode_header(author.key, 2, bytes(32), entries[1]["hlc"], "chat", "m2", "put",
                             bytes.fromhex(entries[1]["body_hash"]), entries[1]["body_len"])
    cases = [
        ("head signature flipped", batch_message(
            author.key, headers, bodies, type(head)(4, last, head.sig[:-1] + bytes([head.sig[-1] ^ 1])))),
        ("body differs from its hash", batch_message(
            author.key, headers, [None, b"hullo", b"", b""], head)),
        ("prev_hash of entry 2 is zeros", batch_message(
            author.key, chain[:2], bodies[:2], sign_head(author.signer, 2, entry_hash(chain[1])))),
        ("head seq is not the batch's last seq", batch_message(author.key, broken, [None, b"", b""], head)),
        ("seq 2 missing, the head re-signed as seq 3", batch_message(
            author.key, broken, [None, b"", b""], sign_head(author.signer, 3, last))),
        ("head names another hash", batch_message(
            author.key, headers, bodies, sign_head(author.signer, 4, bytes(32)))),
    ]
    return document(
        "log entry headers, the hash chain, signed heads and a log.entries batch",
        ["protocol/logs.md#entry-header", "protocol/logs.md#chain-and-signatures-signed-heads",
         "protocol/logs.md#the-view", "protocol/logs.md#sync-messages",
         "protocol/logs.md#verification-of-a-batch-all-before-anything-is-committed"],
        "header = msgpack [1, author, seq, prev_hash, hlc, stream, record_id, op, body_hash, "
        "body_len]; entry_hash = BLAKE2b-256(header); head signature = Ed25519(author, "
        "'meshd/log-head/1\\0' || msgpack([author, seq, hash])). The batch is verified by a "
        "receiver holding nothing of this author; rejections give the logs.md reason.",
        spec_example={"header": hx(spec_example), "entry_hash": hx(entry_hash(spec_example))},
        author=author.describe(), entries=entries,
        head={"seq": 4, "hash": hx(last), "signed_bytes": hx(b"meshd/log-head/1\x00" + pack([author.key, 4, last])),
              "sig": hx(head.sig)},
        batch=hx(pack(message)),
        rejections=[{"name": name, "batch": hx(pack(msg)), "reason": verdict(msg)} for name, msg in cases],
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
            epoch_key = circle_module._open_box(holder.dh, decoded.boxes[bytes(holder.dh.public)])  # noqa: SLF001
            entry["epoch_key"] = hx(epoch_key)
        steps_out.append(entry)
    assert phone_removed_at > 0
    return document(
        "membership records: claims, a chain from genesis, verdicts",
        ["protocol/circle.md#device-claim", "protocol/circle.md#record",
         "protocol/circle.md#validity-decided-once-from-the-records-causal-past",
         "protocol/circle.md#epochs", "protocol/circle.md#recovery-words-and-the-recovery-member"],
        "chain: each record names all heads of the records before it (a linear history), so "
        "each is valid against the state of all earlier ones and counts. Every box opens, "
        "with the recipient's X25519 secret, to the record's epoch_key. rejections: the "
        "set chain[:prefix] + records, given to Circle.from_records, is rejected with reason "
        "(circle.md's list). concurrent: replicas of one circle act while partitioned "
        "(each record names its replica's heads), then every record is merged; the state "
        "follows from the merge rule (members, removed, the current epoch). More cases are "
        "in tests/protocol/test_circle.py.",
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
    )


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


# ---- the backup blob -----------------------------------------------------------------


def backup_vectors() -> dict[str, Any]:
    rng = Draws("backup")
    laptop = Device("laptop", rng)
    with deterministic_sealed_boxes(rng):
        circle = Circle.create(laptop.signer, laptop.info, rng)
    epoch_key = circle.epoch_key(laptop.dh)
    keys = epoch_keys(1, epoch_key)
    entries = _entries(laptop.signer, [(1 << 16, "notes", "n1", "put", b"remember")])
    header = bytes.fromhex(entries[0]["header"])
    head = sign_head(laptop.signer, 1, entry_hash(header))
    snapshot = {"records": circle.records(),
                "logs": [batch_message(laptop.key, [header], [b"remember"], head)]}
    nonce = rng(24)
    blob = seal_backup(keys=keys, circle_id=circle.circle_id, signer=laptop.signer, version=7,
                       snapshot=snapshot, rng=Queue(nonce))
    body = pack(snapshot)
    signed = b"meshd/backup-signature/1\x00" + pack([circle.circle_id, 1, 7, body])
    opened = open_backup(blob, circle_id=circle.circle_id, version=7, keys_for_epoch={1: keys}.get,
                         is_signer_allowed={laptop.key}.__contains__)
    assert opened.snapshot["logs"][0]["t"] == "log.entries"

    def verdict(version: int) -> str:
        try:
            open_backup(blob, circle_id=circle.circle_id, version=version,
                        keys_for_epoch={1: keys}.get, is_signer_allowed={laptop.key}.__contains__)
        except EnvelopeRejected as err:
            return err.reason
        return "ok"

    return document(
        "the backup blob",
        ["protocol/relay.md#backup-blob", "protocol/relay.md#envelope", "protocol/logs.md#sync-messages"],
        "blob = 01 || epoch u32 || nonce || XChaCha20-Poly1305-IETF(backup key, nonce, "
        "'meshd/backup/1\\0' || circle_id || epoch u32, plaintext). The snapshot holds the "
        "circle's records and one log.entries batch (with its 't').",
        signer=laptop.describe(), circle_id=hx(circle.circle_id),
        epoch={"number": 1, "epoch_key": hx(epoch_key), "backup": hx(keys.backup)},
        version=7, snapshot=hx(body), nonce=hx(nonce),
        associated_data=hx(b"meshd/backup/1\x00" + circle.circle_id + (1).to_bytes(4, "big")),
        signed_bytes=hx(signed), signature=hx(laptop.signer.sign(signed)),
        plaintext=hx(pack([laptop.key, 7, body, laptop.signer.sign(signed)])),
        blob=hx(blob),
        version_checks=[{"relay_says": v, "reason": verdict(v)} for v in (7, 8)],
    )


# ---- CPace and the pairing handshake -------------------------------------------------


def _cpace_case(prs: bytes, nameplate: int, sid: bytes, ya: bytes, yb: bytes) -> dict[str, Any]:
    ci = channel_identifier(nameplate)
    g = calculate_generator(prs, ci, sid)
    big_ya, big_yb = scalar_mult(ya, g), scalar_mult(yb, g)
    k = scalar_mult_vfy(ya, big_yb)
    assert k == scalar_mult_vfy(yb, big_ya)
    isk = intermediate_session_key(sid, k, transcript_ir(big_ya, b"", big_yb, b""))
    initiator = CPaceInitiator(prs=prs, ci=ci, sid=sid, rng=Queue(ya))
    assert initiator.message == big_ya and initiator.finish(big_yb) == isk
    return {"prs_text": prs.decode(), "nameplate": nameplate, "ci": hx(ci), "sid": hx(sid),
            "generator_string": hx(generator_string(DSI, prs, ci, sid, S_IN_BYTES)),
            "generator": hx(g), "ya": hx(ya), "yb": hx(yb), "Ya": hx(big_ya), "Yb": hx(big_yb),
            "K": hx(k), "ISK": hx(isk), "psk": hx(psk_from_isk(isk))}


def pairing_vectors() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    rng = Draws("pairing")
    invitation = make_invitation(rng, now=0.0)
    joiner_static = DHKeyPair.from_private_bytes(rng(32))
    inviter_static = DHKeyPair.from_private_bytes(rng(32))
    joiner_e, ya, inviter_e, yb = rng(32), rng(32), rng(32), rng(32)
    joiner_rng, inviter_rng = Queue(joiner_e, ya), Queue(yb, inviter_e)
    joiner = PairingHandshake.joiner(invitation.code, static=joiner_static, rng=joiner_rng)
    inviter = PairingHandshake.inviter(invitation, static=inviter_static, rng=inviter_rng,
                                       on_attempt=lambda: None)
    (m1,) = joiner.initial_frames()
    (m2,) = inviter.on_frame(m1)
    (m3,) = joiner.on_frame(m2)
    assert inviter.on_frame(m3) == [] and joiner.done and inviter.done
    assert joiner_rng.empty() and inviter_rng.empty()
    result = joiner.result()
    assert result.handshake_hash == inviter.result().handshake_hash
    sid = sodium.crypto_scalarmult_base(joiner_e)
    cpace = _cpace_case(invitation.code.encode(), invitation.nameplate, sid, ya, yb)
    more = Draws("cpace")
    cases = [cpace, _cpace_case(b"7-zebra-garden", 7, more(32), more(32), more(32)),
             _cpace_case(b"999-zoo-zoo", 999, more(32), more(32), more(32))]
    aborts = []
    for point in (bytes(32), (1).to_bytes(32, "little")):
        try:
            scalar_mult_vfy(ya, point)
        except CPaceAbort as err:
            aborts.append({"y": hx(ya), "Y": hx(point), "reason": err.reason})
    assert len(aborts) == 2
    cpace_doc = document(
        "CPace (CPACE-X25519-SHA512, initiator-responder) as pairing uses it",
        ["protocol/pairing.md#cpace"],
        "CI = lv_cat('meshd/1/pair', ascii nameplate); generator = Elligator2(SHA-512("
        "generator_string)[:32] with the top bit cleared); Ya = X25519(ya, generator); "
        "K = X25519(ya, Yb); ISK = SHA-512(lv_cat('CPace255_ISK', sid, K) || lv_cat(Ya, '') "
        "|| lv_cat(Yb, '')); psk = derive_key(ISK, 'meshd-pair-psk'). Case 0 is the one in "
        "pairing.json. aborts: X25519 with these points gives the all-zero K.",
        cases=cases, aborts=aborts,
    )
    pairing_doc = document(
        "the pairing handshake: Noise_XXpsk3_25519_ChaChaPoly_BLAKE2b keyed by CPace",
        ["protocol/pairing.md#the-code", "protocol/pairing.md#the-handshake",
         "protocol/pairing.md#cpace", "protocol/channel.md"],
        "Noise messages without the channel's 2-byte length prefix. The joiner (initiator) "
        "draws e then ya; the inviter ya's answer yb then its e. The PSK (cpace.json case 0) "
        "is set once it is known; it is first used by message 3's psk token.",
        code_text=invitation.code, nameplate=invitation.nameplate,
        protocol_name_text="Noise_XXpsk3_25519_ChaChaPoly_BLAKE2b", prologue=hx(PAIRING_PROLOGUE),
        joiner={"x25519_private": hx(bytes(joiner_static.private)), "dh_key": hx(bytes(joiner_static.public)),
                "ephemeral_private": hx(joiner_e), "cpace_scalar": hx(ya)},
        inviter={"x25519_private": hx(bytes(inviter_static.private)), "dh_key": hx(bytes(inviter_static.public)),
                 "ephemeral_private": hx(inviter_e), "cpace_scalar": hx(yb)},
        psk=cpace["psk"],
        messages=[{"payload": hx(p), "message": hx(m)} for p, m in (
            (pack([invitation.nameplate, bytes.fromhex(cpace["Ya"])]), m1),
            (pack([bytes.fromhex(cpace["Yb"])]), m2), (b"", m3))],
        handshake_hash=hx(result.handshake_hash),
        check_words=sas_words(result.handshake_hash),
    )
    sas_rng = Draws("sas")
    hashes = [result.handshake_hash, bytes(64), sas_rng(64)]
    sas_doc = document(
        "check words (short authentication string) from a handshake hash",
        ["protocol/pairing.md#short-authentication-string", "protocol/circle.md#derive_key"],
        "v = big-endian integer of derive_key(handshake_hash, 'meshd-pair-sas', '', 8); word i "
        "(0..3) = BIP39 English word (v >> 11*i) & 0x7ff. The first hash is pairing.json's.",
        vectors=[{"handshake_hash": hx(h), "digest": hx(derive_key(h, b"meshd-pair-sas", b"", 8)),
                  "words": sas_words(h)} for h in hashes],
    )
    return cpace_doc, pairing_doc, sas_doc


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


# ---- discovery -----------------------------------------------------------------------


def discovery_vectors() -> dict[str, Any]:
    rng = Draws("discovery")
    device = Device("laptop", rng)
    discovery_key = rng(32)
    unix_time = 1_764_651_234
    window = window_of(unix_time)
    hint = short_device_id(device.key)
    advert = make_advert(discovery_key, window, hint, rng)
    recognised = {str(offset): recognise(advert.txt, [discovery_key], window + offset) is not None
                  for offset in (-2, -1, 0, 1, 2)}
    assert recognised == {"-2": False, "-1": True, "0": True, "1": True, "2": False}
    return document(
        "the discovery TXT record's sealed device hint for a given window",
        ["protocol/discovery.md#time-windows", "protocol/discovery.md#keys",
         "protocol/discovery.md#the-device-advert-service-_meshd_tcplocal", "protocol/circle.md#derive_key"],
        "window = floor(unix_time / 900); window key = derive_key(discovery key, "
        "'meshd/mdns-win', u64be(window)); hint = derive_key(sign_key, 'meshd/device-id', '', 8); "
        "h = XChaCha20-Poly1305-IETF(window key, n, 'meshd/mdns-hint/1\\0', hint); n and h in "
        "unpadded base64url. recognised_by_window_offset: whether a member whose own window is "
        "(advert window + offset) recognises it (a member tries its w, w-1, w+1).",
        sign_key=hx(device.key), discovery_key=hx(discovery_key), unix_time=unix_time,
        window=window, window_key=hx(window_key(discovery_key, window)), device_hint=hx(hint),
        txt=advert.txt, nonce=hx(_unb64(advert.txt["n"])),
        ciphertext=hx(_unb64(advert.txt["h"])),
        recognised_by_window_offset=recognised,
    )


def _unb64(text: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# ---- all of them ---------------------------------------------------------------------


def build() -> dict[str, dict[str, Any]]:
    cpace, pairing, sas = pairing_vectors()
    return {
        "derive_key.json": derive_key_vectors(),
        "envelope.json": envelope_vectors(),
        "backup.json": backup_vectors(),
        "circle.json": circle_vectors(),
        "log.json": log_vectors(),
        "cpace.json": cpace,
        "pairing.json": pairing,
        "check_words.json": sas,
        "recovery.json": recovery_vectors(),
        "discovery.json": discovery_vectors(),
    }


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name, doc in build().items():
        path = HERE / name
        text = render(doc)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print("stale vectors (run protocol/vectors/generate.py):", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

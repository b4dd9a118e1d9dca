"""Vectors for derive_key and the epoch subkeys, envelopes, the backup blob, discovery adverts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vec_common import Device, Draws, Queue, deterministic_sealed_boxes, document, hx, pack
from vec_log import log_entries

from meshd.protocol.circle import (
    Circle,
    epoch_keys,
)
from meshd.protocol.crypto import derive_key
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
    batch_message,
    entry_hash,
    sign_head,
)

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



# ---- the backup blob -----------------------------------------------------------------


def backup_vectors() -> dict[str, Any]:
    rng = Draws("backup")
    laptop = Device("laptop", rng)
    with deterministic_sealed_boxes(rng):
        circle = Circle.create(laptop.signer, laptop.info, rng)
    epoch_key = circle.epoch_key(laptop.dh)
    keys = epoch_keys(1, epoch_key)
    entries = log_entries(laptop.signer, [(1 << 16, "notes", "n1", "put", b"remember")])
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

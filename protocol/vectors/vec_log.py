"""Vectors for log entry headers, signed heads and log.entries batches."""

from __future__ import annotations

from typing import Any

from vec_common import Device, Draws, document, hx, pack

from meshd.protocol.crypto import SigningKeyPair
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

# ---- log entries and batches ---------------------------------------------------------


def log_entries(author: SigningKeyPair, ops: list[tuple[int, str, str, str, bytes]]) -> list[dict[str, Any]]:
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
    entries = log_entries(author.signer, [
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

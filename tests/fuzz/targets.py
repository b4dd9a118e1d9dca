"""Every decoder of untrusted input in meshd/protocol, with valid seed inputs to mutate.

A target takes either bytes (what arrives on the wire) or a decoded msgpack value (what
the channel hands on after decode_message), and must raise nothing but RemoteProtocolError
(every typed rejection is one) for any input. The fuzzers (hypothesis in the suite,
mutate.py for `make fuzz`) and the regression replay all use this table.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from meshd.protocol import (
    backupset,
    channel,
    circle,
    cpace,
    cutoff,
    discovery,
    envelope,
    log,
    pairing,
    records,
    relay,
    schema,
    sync,
)
from meshd.protocol.crypto import DHKeyPair, SigningKeyPair

KEY = bytes(range(32))
WALL_MS = 1_700_000_000_000


@dataclass(frozen=True)
class Target:
    name: str
    takes: str  # "bytes" or "value"
    run: Callable[[Any], object]
    seeds: Callable[[], list[Any]]


def pack(value: Any) -> bytes:
    return bytes(msgpack.packb(value, use_bin_type=True))


@functools.lru_cache(maxsize=1)
def _circle() -> circle.Circle:
    rng = functools.partial(os.urandom)
    signers = [SigningKeyPair(bytes([i]) * 32) for i in (1, 2, 3)]
    dhs = [DHKeyPair.from_private_bytes(bytes([i + 10]) * 32) for i in (1, 2, 3)]
    infos = [records.DeviceInfo(bytes(s.public), bytes(d.public), f"d{i}").claimed(s)
             for i, (s, d) in enumerate(zip(signers, dhs, strict=True))]
    made = circle.Circle.create(signers[0], infos[0], rng)
    made.add_device(signers[0], infos[1], rng)
    made.add_device(signers[0], infos[2], rng)
    # Both shapes of a removal point (cutoff.py): a head the removed device signed, and
    # "nothing of it counts".
    signed_head = log.compose_batch(signers[1], 0, bytes(32), 0, WALL_MS,
                                    [log.Write("chat", "m1", log.PUT, b"hi")]).heads[-1]
    made.remove_device(signers[0], infos[1].sign_key, rng, cutoff=signed_head)
    made.remove_device(signers[0], infos[2].sign_key, rng, cutoff=cutoff.NOTHING_COUNTS)
    return made


def _record_seeds() -> list[bytes]:
    return _circle().records()


def _claim_seeds() -> list[bytes]:
    return [r.device.proof for r in map(records.Record.decode, _record_seeds()) if r.device]


@functools.lru_cache(maxsize=1)
def _batch() -> log.VerifiedBatch:
    signer = SigningKeyPair(bytes([3]) * 32)
    writes = [log.Write("chat", "m1", log.PUT, b"hi"), log.Write("chat", "m1", log.DELETE),
              log.Write("chat", "", log.CLEAR)]
    return log.compose_batch(signer, 0, bytes(32), 0, WALL_MS, writes)


def _batch_message() -> dict[str, Any]:
    verified = _batch()
    return log.batch_message(verified.author, verified.headers, verified.bodies, verified.heads[-1])


def _decode_batch(value: Any) -> object:
    if not isinstance(value, dict):
        raise TypeError("harness: a log.entries message is a map")  # not the decoder's input
    batch = log.Batch.from_message(value)
    return log.verify_batch(batch, 0, bytes(32), lambda author: True,
                            hlc_bound=log.hlc_limit(WALL_MS))


def _sync_receive(value: Any) -> object:
    session = sync.SyncSession(now=0.0)
    session.start({}, 0.0)
    session.receive({"t": "log.hello", "vector": {}}, 0.0)
    return session.receive(value, 1.0)


def _relay_requests() -> list[dict[str, Any]]:
    return [
        {"t": "relay.register", "rid": 1, "records": _record_seeds()},
        {"t": "relay.register", "rid": 13, "records": _record_seeds(), "token": b"t" * 32},
        {"t": "relay.deposit", "rid": 2, "mailbox": KEY, "envelope": b"x" * 40},
        {"t": "relay.fetch", "rid": 3, "mailbox": KEY, "after": 0, "limit": 10},
        {"t": "relay.ack", "rid": 4, "mailbox": KEY, "upto": 5},
        {"t": "relay.subscribe", "rid": 5, "mailbox": KEY, "after": 0},
        {"t": "relay.records", "rid": 6},
        {"t": "relay.backup_get", "rid": 7},
        {"t": "relay.backup_put", "rid": 8, "expected_version": 1, "version": 2, "blob": b"b"},
        {"t": "relay.rendezvous", "rid": 9, "nameplate": 7, "role": "offer"},
        {"t": "relay.segment_put", "rid": 10, "id": bytes(16), "blob": b"s"},
        {"t": "relay.segment_get", "rid": 11, "id": bytes(16)},
        {"t": "relay.segment_delete", "rid": 12, "ids": [bytes(16), bytes([1]) * 16]},
        {"t": "relay.pipe", "data": b"p"},
        {"t": "relay.pipe_close"},
    ]


def _relay_answers() -> list[dict[str, Any]]:
    return [
        {"t": "relay.envelopes", "rid": 1, "mailbox": KEY, "items": [[1, b"e"]], "more": False},
        {"t": "relay.error", "rid": 2, "code": "rate-limited", "message": "m", "retry_after": 1.5},
        {"t": "relay.registered", "rid": 3, "circle": KEY, "quota": 1 << 28, "used": 0,
         "max_envelope": 1 << 20, "ttl": 86400, "incarnation": bytes(16)},
        {"t": "relay.ok", "rid": 4, "id": 9}, {"t": "relay.records", "records": [b"r"]},
        {"t": "relay.backup", "rid": 5, "version": 2, "blob": b"b"},
        {"t": "relay.segment", "rid": 6, "id": bytes(16), "blob": None},
        {"t": "relay.pipe", "data": b"d"},
    ]


def _relay_answer(value: Any) -> object:
    if not isinstance(value, dict):
        raise TypeError("harness: a relay frame is a map")
    if value.get("t") == "relay.envelopes":
        return relay.parse_envelopes(value)
    if value.get("t") == "relay.error":
        return relay.parse_error(value)
    return relay.check_answer(value)


def _dict_only(function: Callable[[dict[str, Any]], object]) -> Callable[[Any], object]:
    """Frames reach these parsers only as maps (decode_message guarantees it)."""
    def run(value: Any) -> object:
        if not isinstance(value, dict):
            raise TypeError("harness: not a map")
        return function(value)
    return run


def _manifest_seeds() -> list[dict[str, Any]]:
    ref = backupset.SegmentRef(bytes(16), bytes(32), KEY, 1, 3, 100, 1, 2)
    return [{"format": 2, "records": _record_seeds(), "logs": [], "segments": [ref.pack()]},
            {"records": [], "logs": [_batch_message()]}]  # format 1


def _txt(value: Any) -> object:
    keys = [bytes(32), KEY]
    discovery.recognise(value, keys, 12345)
    return discovery.invitation_nameplate(value)


def _envelope_fields(data: Any) -> object:
    return envelope._fields(data, "envelope")  # noqa: SLF001 - the decrypted plaintext's decoder


def _envelope_payload(data: Any) -> object:
    return envelope._unpack_map(data)  # noqa: SLF001


TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("circle.record", "bytes", records.Record.decode, _record_seeds),
    Target("circle.claim", "bytes", records.DeviceInfo.verify_claim, _claim_seeds),
    Target("log.header", "bytes", log.Header.decode, lambda: list(_batch().headers)),
    Target("log.batch", "value", _decode_batch, lambda: [_batch_message()]),
    Target("sync.receive", "value", _dict_only(_sync_receive),
           lambda: [_batch_message(), {"t": "log.credit", "bytes": 100}]),
    Target("channel.message", "bytes", channel.decode_message,
           lambda: [pack({"t": "circle.heads", "heads": [KEY]}), pack(_batch_message())]),
    Target("relay.request", "value", _dict_only(relay.parse_request), _relay_requests),
    Target("relay.answer", "value", _relay_answer, _relay_answers),
    Target("backup.manifest", "value", _dict_only(backupset.Manifest.from_snapshot), _manifest_seeds),
    Target("envelope.fields", "bytes", _envelope_fields,
           lambda: [pack([KEY, 7, pack({"t": "log.entries"}), bytes(64)])]),
    Target("envelope.payload", "bytes", _envelope_payload, lambda: [pack(_batch_message())]),
    Target("discovery.txt", "value", _txt,
           lambda: [{"h": "AAAA", "n": "abc", "w": "1"}, {b"i": b"12"}, {b"v": b"1", b"p": b"12"},
                    {b"v": b"1", b"n": b"A" * 32, b"h": b"B" * 32}]),
    Target("pairing.first", "bytes", pairing.decode_first_payload,
           lambda: [pairing.encode_first_payload(7, KEY)]),
    Target("pairing.second", "bytes", pairing.decode_second_payload,
           lambda: [pairing.encode_second_payload(KEY)]),
    Target("pairing.device", "value", _dict_only(pairing.parse_device_message),
           lambda: [pairing.device_message(_claim_seeds()[0])]),
    Target("pairing.reply", "value", _dict_only(pairing.parse_reply),
           lambda: [{"t": "pair.refused", "reason": "no"}, {"t": "pair.welcome"},
                    {"t": "pair.welcome", "records": [b"r"], "relays": ["127.0.0.1:1#AAAA"],
                     "inviter": KEY, "port": 4000}]),
    Target("cpace.u", "bytes", cpace.decode_u_coordinate, lambda: [KEY]),
    Target("schema.unpack", "bytes",
           lambda data: schema.unpack(data, records.RECORD_SCHEMA, max_bytes=1 << 16),
           _record_seeds),
]}


def check(target: Target, value: Any) -> None:
    """Run one input; anything but RemoteProtocolError (or a harness TypeError for an
    input shape the decoder never receives) propagates as the finding."""
    from meshd.protocol.errors import RemoteProtocolError

    try:
        target.run(value)
    except RemoteProtocolError:
        pass
    except TypeError as err:
        if not str(err).startswith("harness:"):
            raise

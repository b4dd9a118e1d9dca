"""Circle records and devices: the spec's constants, the wire shapes, and how one record or
device claim is encoded, signed, decoded and checked on its own (protocol/circle.md).

Whether a record is valid or counts depends on the other records: circledag.py and
mergerule.py decide that.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack

from .crypto import (
    KEY_LEN,
    SIGNATURE_LEN,
    SigningKeyPair,
    blake2b_256,
    signature_is_valid,
)
from .cutoff import CUTOFF_SCHEMA, cutoff_from_wire
from .entry import Head
from .errors import LocalProtocolError, RemoteProtocolError
from .schema import (
    Anything,
    Array,
    Bin,
    Bool,
    Int,
    Map,
    MapOf,
    OneOf,
    Schema,
    SchemaError,
    Text,
    Tuple,
    unpack,
)

# ---- Spec constants (protocol/circle.md) ----------------------------------------------

RECORD_VERSION = 1
RECORD_DOMAIN = b"meshd/circle-record/1\x00"
CLAIM_DOMAIN = b"meshd/device-claim/1\x00"
GENESIS, ADD, REMOVE, EPOCH, RECOVERY = "genesis", "add", "remove", "epoch", "recovery"
KINDS = frozenset({GENESIS, ADD, REMOVE, EPOCH, RECOVERY})
MAX_RECORD_BYTES = 64 * 1024
MAX_PARENTS = 256
# A circle holds at most this many records (a relay.register carries them all).
MAX_CIRCLE_RECORDS = 4096
MAX_NAME_BYTES = 64
MAX_EPOCH_NUMBER = 2**32 - 1  # envelopes, backups carry it as a u32 (protocol/circle.md)
# The genesis record's random nonce: the circle id must differ for every circle a device
# founds, and the founder's claim alone is the same each time.
GENESIS_NONCE_BYTES = 16
# A sealed 32-byte key: 32-byte ephemeral public key + 32 bytes + 16-byte tag.
SEALED_KEY_BYTES = 80
EPOCH_LABELS = {
    "mailbox": b"mailbox",
    "backup": b"backup",
    "discovery": b"discovery",
    "mailbox_id_key": b"mailbox-id",
    "device_psk": b"device-psk",
}

# ---- Wire shapes (protocol/circle.md): checked before anything else reads a value -------

# "Device claim": [[1, sign_key, dh_key, name, recovery], signature]
CLAIM_SCHEMA = Tuple(
    Tuple(OneOf(RECORD_VERSION), Bin(exact=KEY_LEN), Bin(exact=KEY_LEN), Text(1, MAX_NAME_BYTES), Bool()),
    Bin(exact=SIGNATURE_LEN),
)
# "Record": [[version, circle_id, kind, parents, author, body], signature]; the body's shape
# depends on the kind ("Bodies"), so the record schema only bounds it.
RECORD_SCHEMA = Tuple(
    Tuple(OneOf(RECORD_VERSION), Bin(max_len=KEY_LEN), OneOf(*KINDS),
          Array(Bin(exact=KEY_LEN), 0, MAX_PARENTS), Bin(exact=KEY_LEN),
          MapOf(Text(1, 16), Anything(), 4)),
    Bin(exact=SIGNATURE_LEN),
)
_BOXES = Array(Tuple(Bin(exact=KEY_LEN), Bin(exact=SEALED_KEY_BYTES)))
_EPOCH = Int(1, MAX_EPOCH_NUMBER)
_CLAIM = Bin(1, MAX_RECORD_BYTES)
BODY_SCHEMAS: dict[str, Schema] = {
    GENESIS: Map({"device": _CLAIM, "nonce": Bin(exact=GENESIS_NONCE_BYTES)}, sorted_keys=True),
    ADD: Map({"device": _CLAIM}, sorted_keys=True),
    RECOVERY: Map({"device": _CLAIM}, sorted_keys=True),
    # "cutoff" (optional): the removal point, see cutoff.py; absent = everything counts.
    REMOVE: Map({"boxes": _BOXES, "epoch": _EPOCH, "removed": Bin(exact=KEY_LEN)},
                {"cutoff": CUTOFF_SCHEMA}, sorted_keys=True),
    EPOCH: Map({"boxes": _BOXES, "epoch": _EPOCH}, sorted_keys=True),
}



class RecordRejected(RemoteProtocolError):
    """A circle record that cannot be accepted; reason is a short stable code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"circle record rejected: {reason}" + (f" ({detail})" if detail else ""))
        self.reason = reason


class CircleOperationError(LocalProtocolError):
    """A local circle operation that meshd refuses (the message is for the user)."""


def _pack(obj: Any) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def _unpack_canonical(data: bytes, what: str, schema: Schema, reason: str = "malformed") -> Any:
    """Decode msgpack of the declared shape that must be byte-for-byte canonical."""
    try:
        obj = unpack(data, schema, max_bytes=MAX_RECORD_BYTES)
    except SchemaError as err:
        raise RecordRejected(reason, f"{what}: {err}") from err
    # Re-packing what msgpack just decoded cannot fail (64-bit ints, str and bin keys).
    if _pack(obj) != data:
        raise RecordRejected(reason, f"{what} is not canonically encoded")
    return obj


# ---- Devices --------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceInfo:
    """A member's public identity. proof is its self-signed claim (see claim()) when known."""

    sign_key: bytes
    dh_key: bytes
    name: str
    recovery: bool = False
    proof: bytes = field(default=b"", compare=False, repr=False)

    def __post_init__(self) -> None:
        if not (len(self.sign_key) == KEY_LEN and len(self.dh_key) == KEY_LEN):
            raise CircleOperationError("device keys must be 32 bytes")
        if not isinstance(self.name, str) or not 0 < len(self.name.encode()) <= MAX_NAME_BYTES:
            raise CircleOperationError(f"device name must be 1 to {MAX_NAME_BYTES} bytes of UTF-8")

    def _fields(self) -> list[Any]:
        return [RECORD_VERSION, bytes(self.sign_key), bytes(self.dh_key), self.name, self.recovery]

    def claim(self, signer: SigningKeyPair) -> bytes:
        """The device's self-signed record: proves it holds sign_key and binds dh_key to it."""
        if bytes(signer.public) != bytes(self.sign_key):
            raise CircleOperationError("a device claim is signed by the device's own key")
        unsigned = self._fields()
        return _pack([unsigned, signer.sign(CLAIM_DOMAIN + _pack(unsigned))])

    def claimed(self, signer: SigningKeyPair) -> DeviceInfo:
        """This DeviceInfo carrying its own claim, ready for add_device/recover/create."""
        return replace(self, proof=self.claim(signer))

    @staticmethod
    def verify_claim(data: bytes) -> DeviceInfo:
        obj = _unpack_canonical(data, "device claim", CLAIM_SCHEMA)
        (_version, sign_key, dh_key, name, recovery), signature = obj
        if not signature_is_valid(sign_key, CLAIM_DOMAIN + _pack(obj[0]), signature):
            raise RecordRejected("bad-signature", "device claim")
        return DeviceInfo(sign_key, dh_key, name, recovery, proof=data)


# ---- Records --------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Record:
    """One decoded, signature-checked membership record. Equal when their hashes are."""

    circle_id: bytes
    kind: str
    parents: tuple[bytes, ...]
    author: bytes
    body: Mapping[str, Any]
    signature: bytes
    hash: bytes
    encoded: bytes = field(repr=False)
    version: int = RECORD_VERSION
    # Parsed from body for the kinds that carry them.
    device: DeviceInfo | None = field(default=None, repr=False)
    target: bytes | None = field(default=None, repr=False)
    epoch: int | None = None
    boxes: Mapping[bytes, bytes] = field(default_factory=dict, repr=False)
    cutoff: Head | None = None  # a remove's removal point (cutoff.py)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Record) and other.hash == self.hash

    def __hash__(self) -> int:
        return hash(self.hash)

    def encode(self) -> bytes:
        return self.encoded

    @classmethod
    def sign(
        cls,
        signer: SigningKeyPair,
        circle_id: bytes,
        kind: str,
        parents: Iterable[bytes],
        body: Mapping[str, Any],
    ) -> Record:
        unsigned = [
            RECORD_VERSION,
            bytes(circle_id),
            kind,
            sorted(bytes(p) for p in parents),
            bytes(signer.public),
            {key: body[key] for key in sorted(body)},
        ]
        signature = signer.sign(RECORD_DOMAIN + _pack(unsigned))
        return cls.decode(_pack([unsigned, signature]))

    @classmethod
    def decode(cls, data: bytes) -> Record:
        """Parse and check everything that needs no other record. Raises RecordRejected.

        Records that decoded are remembered (up to DECODED_CACHE_BYTES and
        DECODED_CACHE_RECORDS): a circle is decoded again whole at every merge and on every
        copy, and the signature check is most of a decode's cost."""
        cached = _decoded.get(data) if type(data) is bytes else None
        if cached is not None:
            return cached
        record = cls._decode(data)
        global _decoded_bytes
        if _decoded_bytes + len(data) > DECODED_CACHE_BYTES or len(_decoded) >= DECODED_CACHE_RECORDS:
            _decoded.clear()
            _decoded_bytes = 0
        _decoded[data] = record
        _decoded_bytes += len(data)
        return record

    @classmethod
    def _decode(cls, data: bytes) -> Record:
        obj = _unpack_canonical(data, "record", RECORD_SCHEMA)
        unsigned, signature = obj
        _version, circle_id, kind, parents, author, body = unsigned
        if list(body) != sorted(body):  # checked: at most 3 short str keys
            raise RecordRejected("malformed", "body must be a map with sorted keys")
        try:
            BODY_SCHEMAS[kind].check(body, "$[0][5]")
        except SchemaError as err:
            raise RecordRejected("bad-body", f"{kind} body: {err}") from err
        if parents != sorted(set(parents)):  # checked: at most 256 32-byte bytes
            raise RecordRejected("malformed", "parents must be sorted distinct 32-byte hashes")
        if kind == GENESIS:
            if circle_id or parents:
                raise RecordRejected("malformed", "genesis has no circle id and no parents")
        elif len(circle_id) != KEY_LEN or not parents:
            raise RecordRejected("malformed", "a record names its circle and 1 to 256 parents")
        if not signature_is_valid(author, RECORD_DOMAIN + _pack(unsigned), signature):
            raise RecordRejected("bad-signature")
        return cls(
            circle_id=circle_id,
            kind=kind,
            parents=tuple(parents),
            author=author,
            body=types.MappingProxyType(body),
            signature=signature,
            hash=blake2b_256(data),
            encoded=data,
            **_parse_body(kind, author, body),
        )


# Decoded records by their encoding (see Record.decode). A Record is immutable, so one
# decoding serves every reader, in any thread (dict operations are atomic); the size count
# may drift by a record under races, and is reset with the cache.
# Bounded both ways: a decoded record holds a few KiB of objects besides its encoding.
DECODED_CACHE_BYTES = 4 * 1024 * 1024
DECODED_CACHE_RECORDS = 4096
_decoded: dict[bytes, Record] = {}
_decoded_bytes = 0


def _parse_body(kind: str, author: bytes, body: dict[str, Any]) -> dict[str, Any]:
    """The parsed fields of a body already checked against BODY_SCHEMAS[kind]."""
    if kind in (GENESIS, ADD, RECOVERY):
        try:
            device = DeviceInfo.verify_claim(body["device"])
        except RecordRejected as err:
            raise RecordRejected("bad-body", f"device claim: {err.reason}") from err
        if device.recovery != (kind == RECOVERY):
            raise RecordRejected("bad-body", "recovery flag does not match the record kind")
        if kind == GENESIS and device.sign_key != author:
            raise RecordRejected("bad-body", "genesis enrols its own author")
        return {"device": device}
    number, boxes = body["epoch"], body["boxes"]
    recipients = [box[0] for box in boxes]
    if recipients != sorted(set(recipients)):
        raise RecordRejected("bad-body", "boxes must be sorted by distinct recipient")
    parsed: dict[str, Any] = {"epoch": number, "boxes": {dh: box for dh, box in boxes}}
    if kind == REMOVE:
        parsed["target"] = body["removed"]
        if "cutoff" in body:
            cutoff = cutoff_from_wire(body["cutoff"], body["removed"])
            if cutoff is None:
                raise RecordRejected("bad-body", "the cutoff is not a head the removed device signed")
            parsed["cutoff"] = cutoff
    return parsed

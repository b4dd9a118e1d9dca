"""circle.md's records, validity and merge rule written again from the page, for the
independent vector checker (no meshd import: see test_vectors.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .reference import blake2b_256, head_signed_bytes, pack, public_of_seed, sign, unpack, verifies

# ---- circle.md -----------------------------------------------------------------------

CLAIM_DOMAIN = b"meshd/device-claim/1\x00"
RECORD_DOMAIN = b"meshd/circle-record/1\x00"
MAX_EPOCH = 2**32 - 1


class Rejected(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def is_key(value: Any) -> bool:
    return isinstance(value, bytes) and len(value) == 32


def make_claim(seed: bytes, dh_key: bytes, name: str, recovery: bool) -> bytes:
    fields = [1, public_of_seed(seed), dh_key, name, recovery]
    return pack([fields, sign(seed, CLAIM_DOMAIN + pack(fields))])


def canonical(data: bytes) -> Any:
    """circle.md "Canonical encoding": re-encode and compare, else malformed."""
    try:
        value = unpack(data)
    except Exception as err:  # noqa: BLE001
        raise Rejected("malformed") from err
    if pack(value) != data:
        raise Rejected("malformed")
    return value


def verify_claim(data: bytes) -> tuple[bytes, bytes, str, bool]:
    obj = canonical(data)
    if not (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], list) and len(obj[0]) == 5):
        raise Rejected("malformed")
    (version, sign_key, dh_key, name, recovery), signature = obj
    if version != 1 or not (is_key(sign_key) and is_key(dh_key) and type(recovery) is bool):
        raise Rejected("malformed")
    if not isinstance(name, str) or not 0 < len(name.encode()) <= 64:
        raise Rejected("malformed")
    if not (isinstance(signature, bytes) and verifies(sign_key, CLAIM_DOMAIN + pack(obj[0]), signature)):
        raise Rejected("bad-signature")
    return sign_key, dh_key, name, recovery


@dataclass
class Rec:
    data: bytes
    hash: bytes
    circle_id: bytes
    kind: str
    parents: list[bytes]
    author: bytes
    device: tuple[bytes, bytes, str, bool] | None = None
    epoch: int | None = None
    boxes: dict[bytes, bytes] = field(default_factory=dict)
    removed: bytes | None = None
    cutoff: tuple[int, bytes, bytes] | None = None  # a remove's removal point


def decode_record(data: bytes) -> Rec:
    """circle.md "Record" and "Bodies": everything that needs no other record."""
    obj = canonical(data)
    if not (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], list) and len(obj[0]) == 6):
        raise Rejected("malformed")
    unsigned, signature = obj
    version, circle_id, kind, parents, author, body = unsigned
    if version != 1 or kind not in ("genesis", "add", "remove", "epoch", "recovery"):
        raise Rejected("malformed")
    if not (isinstance(circle_id, bytes) and is_key(author) and isinstance(parents, list)):
        raise Rejected("malformed")
    if not all(is_key(p) for p in parents) or parents != sorted(set(parents)):
        raise Rejected("malformed")
    if not isinstance(body, dict) or list(body) != sorted(body):
        raise Rejected("malformed")
    if kind == "genesis":
        if circle_id or parents:
            raise Rejected("malformed")
    elif len(circle_id) != 32 or not 0 < len(parents) <= 256:
        raise Rejected("malformed")
    if not (isinstance(signature, bytes) and len(signature) == 64):
        raise Rejected("malformed")
    if not verifies(author, RECORD_DOMAIN + pack(unsigned), signature):
        raise Rejected("bad-signature")
    record = Rec(data, blake2b_256(data), circle_id, kind, parents, author)
    if kind in ("genesis", "add", "recovery"):
        expected = ["device", "nonce"] if kind == "genesis" else ["device"]
        if list(body) != expected or not isinstance(body["device"], bytes):
            raise Rejected("bad-body")
        if kind == "genesis" and not (isinstance(body["nonce"], bytes) and len(body["nonce"]) == 16):
            raise Rejected("bad-body")
        try:
            record.device = verify_claim(body["device"])
        except Rejected as err:
            raise Rejected("bad-body") from err
        if record.device[3] != (kind == "recovery"):
            raise Rejected("bad-body")
        if kind == "genesis" and record.device[0] != author:
            raise Rejected("bad-body")
        return record
    expected = ["boxes", "epoch", "removed"] if kind == "remove" else ["boxes", "epoch"]
    if list(body) != expected and not (kind == "remove" and list(body) == ["boxes", "cutoff", "epoch", "removed"]):
        raise Rejected("bad-body")
    number, boxes = body["epoch"], body["boxes"]
    if type(number) is not int or not 1 <= number <= MAX_EPOCH:
        raise Rejected("bad-body")
    if not isinstance(boxes, list) or not all(
            isinstance(b, list) and len(b) == 2 and is_key(b[0])
            and isinstance(b[1], bytes) and len(b[1]) == 80 for b in boxes):
        raise Rejected("bad-body")
    recipients = [b[0] for b in boxes]
    if recipients != sorted(set(recipients)):
        raise Rejected("bad-body")
    record.epoch, record.boxes = number, {b[0]: b[1] for b in boxes}
    if kind == "remove":
        if not is_key(body["removed"]):
            raise Rejected("bad-body")
        record.removed = body["removed"]
        if "cutoff" in body:
            record.cutoff = check_cutoff(body["cutoff"], body["removed"])
    return record


def check_cutoff(value: Any, removed: bytes) -> tuple[int, bytes, bytes]:
    """circle.md "The removal point": [seq, hash, sig], a head the removed key signed, or
    seq 0 with a zero hash and a zero signature."""
    if not (isinstance(value, list) and len(value) == 3):
        raise Rejected("bad-body")
    seq, entry_hash, sig = value
    if type(seq) is not int or not 0 <= seq < 1 << 40:
        raise Rejected("bad-body")
    if not (is_key(entry_hash) and isinstance(sig, bytes) and len(sig) == 64):
        raise Rejected("bad-body")
    if seq == 0:
        if entry_hash != bytes(32) or sig != bytes(64):
            raise Rejected("bad-body")
    elif not verifies(removed, head_signed_bytes(removed, seq, entry_hash), sig):
        raise Rejected("bad-body")
    return seq, entry_hash, sig


@dataclass
class State:
    """The state of a down-closed set of valid records (circle.md "The merge rule")."""

    members: dict[bytes, bytes] = field(default_factory=dict)  # sign key -> dh key
    removed: set[bytes] = field(default_factory=set)
    removed_dh: set[bytes] = field(default_factory=set)
    max_epoch: int = 0
    epoch_number: int = 0  # of the current epoch; 0 when none qualifies
    epoch_record: bytes | None = None
    needs_rotation: bool = True
    counting: set[bytes] = field(default_factory=set)
    cutoffs: dict[bytes, tuple[int, bytes, bytes]] = field(default_factory=dict)


def evaluate(ordered: Sequence[Rec], ancestors: Mapping[bytes, set[bytes]]) -> State:
    """circle.md "The merge rule", as the page states it: introduction, threat (with the
    no-veto exception), Γ in topological order, the well-founded iteration, remove wins."""
    by_hash = {r.hash: r for r in ordered}
    intros: dict[bytes, list[Rec]] = {}
    for r in ordered:
        if r.device is not None:
            intros.setdefault(r.device[0], []).append(r)

    support: dict[bytes, set[bytes]] = {}
    for r in ordered:  # parents first, so an intro's own support is known
        support[r.hash] = set()
        for intro in intros.get(r.author, ()):
            if intro.hash in ancestors[r.hash]:
                support[r.hash] |= {intro.hash} | support[intro.hash]

    def threatens(t: Rec, r: Rec) -> bool:
        """t (a valid remove) threatens r: r is by t's target and not an ancestor of t."""
        return t.removed == r.author and t.hash != r.hash and r.hash not in ancestors[t.hash]

    threats: dict[bytes, list[bytes]] = {}
    for t in ordered:
        if t.removed is None:
            continue
        for r in ordered:
            if not threatens(t, r):
                continue
            if r.removed is not None:
                # r removes V: t does not threaten r when t, or an intro supporting t's
                # author, is a record by V that r itself threatens.
                vetoes = {t.hash} | support[t.hash]
                if any(threatens(r, by_hash[x]) for x in vetoes):
                    continue
            threats.setdefault(r.hash, []).append(t.hash)

    def gamma(assumed: set[bytes]) -> set[bytes]:
        counted: set[bytes] = set()
        for r in ordered:
            if r.kind != "genesis" and not any(
                    i.hash in counted and i.hash in ancestors[r.hash] for i in intros.get(r.author, ())):
                continue
            if any(t in assumed for t in threats.get(r.hash, ())):
                continue
            counted.add(r.hash)
        return counted

    certain: set[bytes] = set()
    while True:
        possible = gamma(certain)
        more = gamma(possible)
        if more == certain:
            break
        certain = more
    counting = certain | {h for h in possible - certain if by_hash[h].removed is not None}

    state = State(counting=counting)
    state.removed = {by_hash[h].removed for h in counting if by_hash[h].removed is not None}
    for h in sorted(counting):  # the smallest cutoff among the counting removes of a key
        r = by_hash[h]
        if r.removed is not None and r.cutoff is not None:
            known = state.cutoffs.get(r.removed)
            if known is None or r.cutoff[:2] < known[:2]:
                state.cutoffs[r.removed] = r.cutoff
    for key, records in intros.items():
        state.removed_dh |= {r.device[1] for r in records if key in state.removed and r.device}
        counted = sorted((r for r in records if r.hash in counting), key=lambda r: r.hash)
        if counted and key not in state.removed and counted[0].device is not None:
            state.members[key] = counted[0].device[1]
    current: Rec | None = None
    for r in ordered:
        if r.epoch is None:
            continue
        state.max_epoch = max(state.max_epoch, r.epoch)
        if r.hash in counting and set(r.boxes) <= set(state.members.values()):
            if current is None or (r.epoch, r.hash) > (current.epoch or 0, current.hash):
                current = r
    if current is not None:
        state.epoch_number, state.epoch_record = current.epoch or 0, current.hash
        state.needs_rotation = set(current.boxes) != set(state.members.values())
    return state


def check_valid(record: Rec, state: State) -> None:
    """circle.md "Validity" rules 4 to 7 against the state of the record's ancestors."""
    if record.author not in state.members:
        raise Rejected("removed-key" if record.author in state.removed else "not-a-member")
    if record.device is not None:
        sign_key, dh_key = record.device[0], record.device[1]
        if sign_key in state.removed or dh_key in state.removed_dh:
            raise Rejected("removed-key")
        if sign_key in state.members or dh_key in state.members.values():
            raise Rejected("duplicate-device")
    if record.kind == "remove" and record.removed not in state.members:
        raise Rejected("bad-body")
    if record.epoch is not None:
        if record.epoch <= state.max_epoch:
            raise Rejected("stale-epoch")
        expected = {dh for key, dh in state.members.items() if key != record.removed}
        if set(record.boxes) != expected:
            raise Rejected("bad-boxes")


def from_records(records: Sequence[bytes]) -> tuple[State, list[Rec]]:
    """The state of a set of encoded records in any order; raises Rejected with circle.md's
    reason when one is invalid (the whole set is refused)."""
    decoded = [decode_record(r) for r in records]
    geneses = [r for r in decoded if r.kind == "genesis"]
    if not geneses:
        raise Rejected("no-genesis")
    if len({g.hash for g in geneses}) > 1:
        raise Rejected("wrong-circle")
    genesis = geneses[0]
    for record in decoded:
        if record.kind != "genesis" and record.circle_id != genesis.hash:
            raise Rejected("wrong-circle")
    placed: dict[bytes, Rec] = {}
    ordered: list[Rec] = []
    ancestors: dict[bytes, set[bytes]] = {}
    waiting = list({r.hash: r for r in decoded}.values())
    while waiting:
        ready = [r for r in waiting if all(p in placed for p in r.parents)]
        if not ready:
            raise Rejected("unknown-parents")
        for record in ready:
            placed[record.hash] = record
            ordered.append(record)
            ancestors[record.hash] = set(record.parents).union(*(ancestors[p] for p in record.parents))
        waiting = [r for r in waiting if r.hash not in placed]
    for record in ordered:  # each against the state of its own causal past
        if record.kind != "genesis":
            past = [r for r in ordered if r.hash in ancestors[record.hash]]
            check_valid(record, evaluate(past, ancestors))
    return evaluate(ordered, ancestors), ordered

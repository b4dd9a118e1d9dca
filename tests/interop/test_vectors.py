"""The independent checker: every published vector (protocol/vectors/*.json) verified from the
spec pages, with hashlib, PyNaCl, noiseprotocol and msgpack only (reference.py and
circle_rules.py).

The vectors are generated from meshd's code (tests/protocol/test_vectors_current.py keeps
them current), so a vector that agrees with the code but disagrees with the spec fails here.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from nacl import bindings as sodium
from noise.connection import Keypair, NoiseConnection

from . import circle_rules as circle
from . import reference as ref

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "protocol" / "vectors"
COVERED = {"derive_key.json", "envelope.json", "backup.json", "backup_segment.json", "circle.json", "log.json",
           "cpace.json", "pairing.json", "check_words.json", "recovery.json", "discovery.json"}


def load(name: str) -> dict[str, Any]:
    return json.loads((VECTORS / name).read_text())


def b(text: str) -> bytes:
    return bytes.fromhex(text)


@pytest.fixture(scope="module")
def wordlist(shared_vectors: Path) -> list[str]:
    """The BIP39 English list, checked as circle.md says (2,048 LF-terminated lines)."""
    data = (shared_vectors / "bip39-english.txt").read_bytes()
    assert hashlib.sha256(data).hexdigest() == \
        "2f5eed53a4727b4bf8880d8f3f199efc90e58503646d9ff8eff3a2ed3b24dbda"
    words = data.decode().split("\n")
    assert words[-1] == "" and len(words) == 2049
    return words[:-1]


# ---- the checker itself --------------------------------------------------------------


def test_the_checker_imports_nothing_from_meshd() -> None:
    allowed = {"__future__", "ast", "base64", "hashlib", "json", "pathlib", "typing", "collections",
               "dataclasses", "pytest", "msgpack", "nacl", "noise", ""}
    for path in Path(__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {(node.module or "").split(".")[0]} if node.level == 0 else set()
            else:
                continue
            assert roots <= allowed, f"{path.name} imports {roots - allowed}"


def test_every_vector_file_is_checked_and_cites_the_spec() -> None:
    assert {p.name for p in VECTORS.glob("*.json")} == COVERED
    for name in COVERED:
        doc = load(name)
        assert doc["spec"], name
        for citation in doc["spec"]:
            page, _, anchor = citation.partition("#")
            text = (ROOT / page).read_text()
            if anchor:
                headings = {_anchor(line) for line in text.splitlines() if line.startswith("#")}
                assert anchor in headings, f"{name} cites {citation}, which has no such heading"


def _anchor(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to dashes."""
    text = heading.lstrip("#").strip().lower()
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


# ---- derive_key ----------------------------------------------------------------------


def test_derive_key() -> None:
    doc = load("derive_key.json")
    for v in doc["derive_key"]:
        assert b(v["personal"]) == v["label_text"].encode().ljust(16, b"\0")
        assert ref.derive_key(b(v["key"]), v["label_text"].encode(), b(v["context"]), v["size"]) \
            == b(v["output"])
        # The same with libsodium's BLAKE2b (salt empty = 16 zero bytes), as circle.md names it.
        if v["size"] >= 16:
            assert sodium.crypto_generichash_blake2b_salt_personal(
                b(v["context"]), digest_size=v["size"], key=b(v["key"]), salt=b"",
                person=b(v["personal"])) == b(v["output"])
    for v in doc["epoch_subkeys"]:
        assert b(v["context"]) == ref.u64(v["number"])
        keys = ref.epoch_subkeys(b(v["epoch_key"]), v["number"])
        assert {name: keys[name].hex() for name in keys} == {name: v[name] for name in keys}


# ---- envelopes and backups -----------------------------------------------------------


def test_mailbox_ids_and_envelopes() -> None:
    doc = load("envelope.json")
    epoch = doc["epoch"]
    keys = ref.epoch_subkeys(b(epoch["epoch_key"]), epoch["number"])
    assert keys["mailbox"] == b(epoch["mailbox"]) and keys["mailbox_id_key"] == b(epoch["mailbox_id_key"])
    for v in doc["mailbox_ids"]:
        assert ref.mailbox_id(keys["mailbox_id_key"], b(v["sign_key"])) == b(v["mailbox_id"])
    sender, recipient = doc["sender"], doc["recipient"]
    seed = b(sender["ed25519_seed"])
    assert ref.public_of_seed(seed) == b(sender["sign_key"])
    mailbox = ref.mailbox_id(keys["mailbox_id_key"], b(recipient["sign_key"]))
    number = epoch["number"]
    for v in doc["envelopes"]:
        ad = ref.ENVELOPE_AD + mailbox + ref.u32(number)
        assert ad == b(v["associated_data"])
        signed = ref.ENVELOPE_SIGNATURE + ref.pack([mailbox, number, v["seq"], b(v["payload"])])
        assert signed == b(v["signed_bytes"])
        signature = ref.sign(seed, signed)
        assert signature == b(v["signature"])
        plaintext = ref.pack([b(sender["sign_key"]), v["seq"], b(v["payload"]), signature])
        assert plaintext == b(v["plaintext"])
        assert ref.seal(keys["mailbox"], number, b(v["nonce"]), ad, plaintext) == b(v["envelope"])
        opened = ref.open_sealed(b(v["envelope"]), keys={number: keys["mailbox"]}, ad_prefix=ref.ENVELOPE_AD,
                                 signature_context=ref.ENVELOPE_SIGNATURE, scope=mailbox,
                                 allowed=[b(sender["sign_key"])])
        assert (opened.reason, opened.number, opened.payload) == ("ok", v["seq"], ref.unpack(b(v["payload"])))
    other = doc["other_epoch"]
    both = {number: keys["mailbox"],
            other["number"]: ref.epoch_subkeys(b(other["epoch_key"]), other["number"])["mailbox"]}
    assert both[other["number"]] == b(other["mailbox"])
    for v in doc["rejections"]:
        opened = ref.open_sealed(b(v["envelope"]), keys=both, ad_prefix=ref.ENVELOPE_AD,
                                 signature_context=ref.ENVELOPE_SIGNATURE, scope=b(v["mailbox"]),
                                 allowed=[b(sender["sign_key"])])
        assert opened.reason == v["reason"], v["name"]


def test_the_backup_blob() -> None:
    doc = load("backup.json")
    signer = doc["signer"]
    seed, circle_id, number = b(signer["ed25519_seed"]), b(doc["circle_id"]), doc["epoch"]["number"]
    key = ref.epoch_subkeys(b(doc["epoch"]["epoch_key"]), number)["backup"]
    assert key == b(doc["epoch"]["backup"])
    ad = ref.BACKUP_AD + circle_id + ref.u32(number)
    assert ad == b(doc["associated_data"])
    signed = ref.BACKUP_SIGNATURE + ref.pack([circle_id, number, doc["version"], b(doc["snapshot"])])
    assert signed == b(doc["signed_bytes"]) and ref.sign(seed, signed) == b(doc["signature"])
    plaintext = ref.pack([b(signer["sign_key"]), doc["version"], b(doc["snapshot"]), b(doc["signature"])])
    assert plaintext == b(doc["plaintext"])
    assert ref.seal(key, number, b(doc["nonce"]), ad, plaintext) == b(doc["blob"])
    opened = ref.open_sealed(b(doc["blob"]), keys={number: key}, ad_prefix=ref.BACKUP_AD,
                             signature_context=ref.BACKUP_SIGNATURE, scope=circle_id,
                             allowed=[b(signer["sign_key"])])
    assert opened.reason == "ok"
    for check in doc["version_checks"]:  # relay.md: the signed version must be the relay's
        assert check["reason"] == ("ok" if check["relay_says"] == opened.number else "version-mismatch")
    # relay.md "Backup blob": the snapshot's layout.
    snapshot = opened.payload
    assert set(snapshot) == {"records", "logs"}
    state, _ = circle.from_records(snapshot["records"])
    assert ref.blake2b_256(snapshot["records"][0]) == circle_id
    assert b(signer["sign_key"]) in state.members
    for batch in snapshot["logs"]:
        assert set(batch) == {"t", "author", "headers", "bodies", "head"} and batch["t"] == "log.entries"
        assert ref.verify_batch(batch, allowed=list(state.members)) == "ok"


# ---- log entries ---------------------------------------------------------------------


def test_log_headers_chain_head_and_batch() -> None:
    doc = load("log.json")
    example = ref.header(bytes(range(32)), 1, bytes(32), 5 << 16, "chat", "m1", "put",
                         ref.blake2b_256(b"hi"), 2)
    assert example == b(doc["spec_example"]["header"])
    author = b(doc["author"]["sign_key"])
    prev = bytes(32)
    for e in doc["entries"]:
        body = b(e["body"])
        assert (ref.blake2b_256(body), len(body)) == (b(e["body_hash"]), e["body_len"])
        assert b(e["prev_hash"]) == prev
        encoded = ref.header(author, e["seq"], prev, e["hlc"], e["stream"], e["record_id"], e["op"],
                             ref.blake2b_256(body), len(body))
        assert encoded == b(e["header"])
        prev = ref.blake2b_256(encoded)
        assert prev == b(e["entry_hash"])
        assert ref.order_key(e["hlc"], author, e["seq"]) == b(e["order_key"])
        assert (e["op"] == "clear") == (e["record_id"] == "")
    head = doc["head"]
    assert b(head["hash"]) == prev
    assert ref.head_signed_bytes(author, head["seq"], prev) == b(head["signed_bytes"])
    assert ref.sign(b(doc["author"]["ed25519_seed"]), b(head["signed_bytes"])) == b(head["sig"])
    batch = ref.unpack(b(doc["batch"]))
    assert batch["headers"] == [b(e["header"]) for e in doc["entries"]]
    assert batch["head"] == {"seq": head["seq"], "hash": b(head["hash"]), "sig": b(head["sig"])}
    assert ref.verify_batch(batch, allowed=[author]) == "ok"
    assert ref.verify_batch(batch, allowed=[]) == "unknown-author"
    for v in doc["rejections"]:
        assert ref.verify_batch(ref.unpack(b(v["batch"])), allowed=[author]) == v["reason"], v["name"]


# ---- circle records ------------------------------------------------------------------


def test_claims_a_chain_of_records_and_its_states() -> None:
    doc = load("circle.json")
    secrets: dict[bytes, bytes] = {}
    for device in doc["devices"]:
        seed, dh_private = b(device["ed25519_seed"]), b(device["x25519_private"])
        assert ref.public_of_seed(seed) == b(device["sign_key"])
        assert ref.x25519_public(dh_private) == b(device["dh_key"])
        assert circle.make_claim(seed, b(device["dh_key"]), device["name"], False) == b(device["claim"])
        secrets[b(device["dh_key"])] = dh_private
    recovery = doc["recovery"]
    sign_seed, dh_private = ref.recovery_keys(b(recovery["seed"]))
    assert ref.public_of_seed(sign_seed) == b(recovery["sign_key"])
    assert ref.x25519_public(dh_private) == b(recovery["dh_key"])
    assert circle.make_claim(sign_seed, b(recovery["dh_key"]), "recovery key", True) == b(recovery["claim"])
    secrets[b(recovery["dh_key"])] = dh_private

    records = [b(step["record"]) for step in doc["chain"]]
    assert ref.blake2b_256(records[0]) == b(doc["circle_id"])
    for index, step in enumerate(doc["chain"]):
        record = circle.decode_record(records[index])
        assert (record.kind, record.hash) == (step["kind"], b(step["hash"]))
        unsigned = ref.unpack(records[index])[0]
        assert circle.RECORD_DOMAIN + ref.pack(unsigned) == b(step["signed_bytes"])
        state, _ = circle.from_records(records[: index + 1])
        assert sorted(k.hex() for k in state.members) == step["members_after"], step["name"]
        assert sorted(k.hex() for k in state.removed) == step["removed_after"], step["name"]
        assert state.epoch_number == step["epoch_after"], step["name"]
        for dh_key, box in record.boxes.items():  # circle.md "Bodies": sealed boxes
            assert ref.sealed_box_open(box, dh_key, secrets[dh_key]) == b(step["epoch_key"]), step["name"]
    state, _ = circle.from_records(list(reversed(records)))  # any order: the same state
    final = doc["final_state"]
    assert sorted(k.hex() for k in state.members) == final["members"]
    assert sorted(k.hex() for k in state.removed) == final["removed"]
    assert state.epoch_number == final["epoch"]


def test_record_rejections_give_the_spec_reasons() -> None:
    doc = load("circle.json")
    chain = [b(step["record"]) for step in doc["chain"]]
    for v in doc["rejections"]:
        with pytest.raises(circle.Rejected) as rejected:
            circle.from_records(chain[: v["prefix"]] + [b(r) for r in v["records"]])
        assert rejected.value.reason == v["reason"], v["name"]


def test_concurrent_histories_follow_the_merge_rule() -> None:
    for case in load("circle.json")["concurrent"]:
        records = [b(r) for r in case["records"]]
        for order in (records, records[::-1]):  # the state is a function of the set
            state, _ = circle.from_records(order)
            assert sorted(k.hex() for k in state.members) == case["members"], case["name"]
            assert sorted(k.hex() for k in state.removed) == case["removed"], case["name"]
            assert state.epoch_number == case["epoch"], case["name"]
            record = state.epoch_record.hex() if state.epoch_record else None
            assert record == case["epoch_record"], case["name"]
            assert state.needs_rotation == case["needs_rotation"], case["name"]


def test_removal_points_and_the_cutoff_that_counts() -> None:
    doc = load("circle.json")["removal_points"]
    base = [b(r) for r in doc["base"]]
    assert len(doc["cases"]) == 5
    for case in doc["cases"]:
        records = base + [b(r) for r in case["records"]]
        if case["verdict"] != "ok":
            with pytest.raises(circle.Rejected) as rejected:
                circle.from_records(records)
            assert rejected.value.reason == case["verdict"], case["name"]
            continue
        for order in (records, records[::-1]):
            state, _ = circle.from_records(order)
            cutoffs = {k.hex(): [c[0], c[1].hex(), c[2].hex()] for k, c in state.cutoffs.items()}
            assert cutoffs == case["cutoffs"], case["name"]


def test_the_worked_example_of_circle_md() -> None:
    """circle.md's worked example, rebuilt from the values the page gives."""
    text = (ROOT / "protocol" / "circle.md").read_text()
    example = text[text.index("## Worked example"):]
    blocks = example.split("```")
    keys = {k.strip(): v.strip() for k, v in (line.split("=") for line in blocks[1].strip().splitlines())}
    claim_hex = "".join(blocks[3].split())
    circle_id = blocks[5].strip()
    seed, dh_private = bytes([1]) * 32, bytes([2]) * 32
    sign_key, dh_key = ref.public_of_seed(seed), ref.x25519_public(dh_private)
    assert (sign_key.hex(), dh_key.hex()) == (keys["sign_key"], keys["dh_key"])
    claim = circle.make_claim(seed, dh_key, "laptop", False)
    assert len(claim) == 145 and claim.hex() == claim_hex
    unsigned = [1, b"", "genesis", [], sign_key, {"device": claim, "nonce": bytes([3]) * 16}]
    genesis = ref.pack([unsigned, ref.sign(seed, circle.RECORD_DOMAIN + ref.pack(unsigned))])
    assert len(genesis) == 293 and ref.blake2b_256(genesis).hex() == circle_id


# ---- CPace, the pairing handshake, check words ---------------------------------------


def test_cpace(shared_vectors: Path) -> None:
    # First the reference itself against the draft's own vectors (someone else's answer).
    draft = json.loads((shared_vectors / "pake" / "cpace-x25519-sha512.json").read_text())
    _check_against_draft(draft)
    for v in load("cpace.json")["cases"]:
        ci = ref.lv_cat(b"meshd/1/pair", str(v["nameplate"]).encode())
        assert ci == b(v["ci"])
        prs, sid = v["prs_text"].encode(), b(v["sid"])
        assert ref.cpace_generator_string(prs, ci, sid) == b(v["generator_string"])
        g = ref.cpace_generator(prs, ci, sid)
        assert g == b(v["generator"])
        ya, yb = ref.x25519(b(v["ya"]), g), ref.x25519(b(v["yb"]), g)
        assert (ya, yb) == (b(v["Ya"]), b(v["Yb"]))
        assert yb is not None and ya is not None
        k = ref.x25519(b(v["ya"]), yb)
        assert k == ref.x25519(b(v["yb"]), ya) == b(v["K"])
        isk = ref.cpace_isk(sid, b(v["K"]), ya, yb)
        assert isk == b(v["ISK"])
        assert ref.derive_key(isk, b"meshd-pair-psk") == b(v["psk"])
    for v in load("cpace.json")["aborts"]:
        assert ref.x25519(b(v["y"]), b(v["Y"])) is None and v["reason"] == "low-order-point"


def _check_against_draft(draft: dict[str, Any]) -> None:
    """The reference's CPace against draft-irtf-cfrg-cpace's own X25519 vectors."""
    v = {k: bytes.fromhex(x) for k, x in draft["G_25519"].items() if isinstance(x, str)}
    assert ref.cpace_generator(v["PRS"], v["CI"], v["sid"]) == v["g"]
    assert ref.x25519(v["ya"], v["g"]) == v["Ya"] and ref.x25519(v["yb"], v["g"]) == v["Yb"]
    assert ref.x25519(v["ya"], v["Yb"]) == v["K"]
    assert ref.cpace_isk(v["sid"], v["K"], v["Ya"], v["Yb"], v["ADa"], v["ADb"]) == v["ISK_IR"]


def _noise(initiator: bool, prologue: bytes, psk: bytes, static: bytes, ephemeral: bytes) -> NoiseConnection:
    noise = NoiseConnection.from_name(b"Noise_XXpsk3_25519_ChaChaPoly_BLAKE2b")
    if initiator:
        noise.set_as_initiator()
    else:
        noise.set_as_responder()
    noise.set_prologue(prologue)
    noise.set_psks(psk)
    noise.set_keypair_from_private_bytes(Keypair.STATIC, static)
    noise.set_keypair_from_private_bytes(Keypair.EPHEMERAL, ephemeral)
    with pytest.warns(UserWarning, match="ephemeral"):  # fixed ephemerals: vectors only
        noise.start_handshake()
    return noise


def test_the_pairing_handshake(wordlist: list[str]) -> None:
    doc = load("pairing.json")
    joiner, inviter = doc["joiner"], doc["inviter"]
    assert doc["prologue"] == b"meshd/1/pair".hex()
    nameplate, code = doc["nameplate"], doc["code_text"]
    number, *words = code.split("-")
    assert int(number) == nameplate and 1 <= nameplate <= 999 and len(words) == 2
    assert all(w in wordlist for w in words)
    # CPace from the code and the joiner's ephemeral key (the sid), as pairing.md says.
    ci = ref.lv_cat(b"meshd/1/pair", str(nameplate).encode())
    sid = ref.x25519_public(b(joiner["ephemeral_private"]))
    g = ref.cpace_generator(code.encode(), ci, sid)
    ya, yb = ref.x25519(b(joiner["cpace_scalar"]), g), ref.x25519(b(inviter["cpace_scalar"]), g)
    assert ya is not None and yb is not None
    k = ref.x25519(b(joiner["cpace_scalar"]), yb)
    assert k is not None
    psk = ref.derive_key(ref.cpace_isk(sid, k, ya, yb), b"meshd-pair-psk")
    assert psk == b(doc["psk"])
    payloads = [ref.pack([nameplate, ya]), ref.pack([yb]), b""]
    assert [b(m["payload"]) for m in doc["messages"]] == payloads
    # The handshake with noiseprotocol (an independent Noise implementation).
    prologue = b(doc["prologue"])
    a = _noise(True, prologue, psk, b(joiner["x25519_private"]), b(joiner["ephemeral_private"]))
    z = _noise(False, prologue, psk, b(inviter["x25519_private"]), b(inviter["ephemeral_private"]))
    sender, receiver = a, z
    for payload, expected in zip(payloads, doc["messages"], strict=True):
        message = sender.write_message(payload)
        assert message == b(expected["message"])
        assert receiver.read_message(message) == payload
        sender, receiver = receiver, sender
    assert a.handshake_finished and z.handshake_finished
    assert a.get_handshake_hash() == z.get_handshake_hash() == b(doc["handshake_hash"])
    assert ref.check_words(b(doc["handshake_hash"]), wordlist) == doc["check_words"]
    # pairing.md's table of sizes: the 2-byte length prefix, then the Noise message.
    first = 32 + len(payloads[0]) + 16
    assert len(b(doc["messages"][0]["message"])) == first and 36 <= len(payloads[0]) <= 38
    assert [len(b(m["message"])) + 2 for m in doc["messages"][1:]] == [133, 66]


def test_check_words(wordlist: list[str]) -> None:
    for v in load("check_words.json")["vectors"]:
        assert ref.derive_key(b(v["handshake_hash"]), b"meshd-pair-sas", b"", 8) == b(v["digest"])
        assert ref.check_words(b(v["handshake_hash"]), wordlist) == v["words"]


# ---- recovery words ------------------------------------------------------------------


def test_recovery_words_to_keys(wordlist: list[str]) -> None:
    doc = load("recovery.json")
    data = ("\n".join(wordlist) + "\n").encode()
    assert doc["wordlist"] == {"lines": 2048, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    for v in doc["vectors"]:
        entropy = b(v["entropy"])
        assert ref.entropy_to_words(entropy, wordlist) == v["words"].split()
        assert ref.words_to_entropy(v["words"].split(), wordlist) == entropy
        sign_seed, dh_private = ref.recovery_keys(entropy)
        assert sign_seed == b(v["ed25519_seed"]) and dh_private == b(v["x25519_private"])
        assert ref.public_of_seed(sign_seed) == b(v["sign_key"])
        assert ref.x25519_public(dh_private) == b(v["dh_key"])
        assert v["name_text"] == "recovery key"
        assert circle.make_claim(sign_seed, b(v["dh_key"]), "recovery key", True) == b(v["claim"])
    for v in doc["invalid"]:
        assert ref.words_to_entropy(v["words"].split(), wordlist) is None, v["name"]
        assert v["verdict"] == "invalid"


# ---- discovery -----------------------------------------------------------------------


def _unb64(text: str) -> bytes:
    assert "=" not in text
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_the_discovery_advert_for_a_window() -> None:
    doc = load("discovery.json")
    window = doc["unix_time"] // 900
    assert window == doc["window"]
    discovery_key = b(doc["discovery_key"])
    key = ref.derive_key(discovery_key, b"meshd/mdns-win", ref.u64(window))
    assert key == b(doc["window_key"])
    hint = ref.derive_key(b(doc["sign_key"]), b"meshd/device-id", b"", 8)
    assert hint == b(doc["device_hint"])
    txt = doc["txt"]
    assert set(txt) == {"v", "n", "h"} and txt["v"] == "1"
    assert len(txt["n"]) == len(txt["h"]) == 32
    nonce, sealed = _unb64(txt["n"]), _unb64(txt["h"])
    assert (nonce, sealed) == (b(doc["nonce"]), b(doc["ciphertext"]))
    assert ref.xchacha_encrypt(key, nonce, b"meshd/mdns-hint/1\x00", hint) == sealed
    # discovery.md "Recognition": a member tries its window w, then w-1, w+1.
    for offset, expected in doc["recognised_by_window_offset"].items():
        member_window = window + int(offset)
        opened = [ref.xchacha_decrypt(ref.derive_key(discovery_key, b"meshd/mdns-win", ref.u64(w)),
                                      nonce, b"meshd/mdns-hint/1\x00", sealed)
                  for w in (member_window, member_window - 1, member_window + 1)]
        assert any(o == hint for o in opened) == expected, offset

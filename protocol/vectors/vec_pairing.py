"""Vectors for CPace, the Noise_XXpsk3 pairing handshake and the check words."""

from __future__ import annotations

from typing import Any

from nacl import bindings as sodium
from vec_common import Draws, Queue, document, hx, pack

from meshd.protocol.codes import sas_words
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
from meshd.protocol.crypto import DHKeyPair, derive_key
from meshd.protocol.pairing import (
    PAIRING_PROLOGUE,
    PairingHandshake,
    channel_identifier,
    make_invitation,
    psk_from_isk,
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

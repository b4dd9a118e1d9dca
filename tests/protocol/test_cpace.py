"""CPace-X25519-SHA512 against the draft's own vectors (../shared/vectors/pake/)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.protocol import cpace
from meshd.protocol.errors import RemoteProtocolError

from .harness import seeded_rng


def load(shared_vectors: Path, name: str) -> dict:
    path = shared_vectors / "pake" / name
    if not path.is_file():
        pytest.fail(f"CPace vectors not found at {path}")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def suite(shared_vectors: Path) -> dict:
    data = load(shared_vectors, "cpace-x25519-sha512.json")
    assert data["suite"] == "CPACE-X25519-SHA512"
    assert data["DSI"].encode() == cpace.DSI
    assert data["DSI_ISK"].encode() == cpace.DSI_ISK
    assert data["H.s_in_bytes"] == cpace.S_IN_BYTES
    return data


@pytest.fixture(scope="module")
def vectors(suite: dict) -> dict[str, bytes]:
    return {key: bytes.fromhex(value) for key, value in suite["G_25519"].items()}


def test_generator_string_and_its_hash(suite: dict, vectors: dict[str, bytes]) -> None:
    gen_str = cpace.generator_string(
        cpace.DSI, vectors["PRS"], vectors["CI"], vectors["sid"], cpace.S_IN_BYTES
    )
    intermediate = suite["intermediate"]
    assert len(gen_str) == intermediate["generator_string_len"]
    digest = hashlib.sha512(gen_str).digest()[: cpace.FIELD_BYTES]
    assert digest.hex() == intermediate["hash_generator_string"]
    decoded = cpace.decode_u_coordinate(digest).to_bytes(32, "little")
    assert decoded.hex() == intermediate["decoded_field_element"]


def test_generator(vectors: dict[str, bytes]) -> None:
    g = cpace.calculate_generator(vectors["PRS"], vectors["CI"], vectors["sid"])
    assert g == vectors["g"]


def test_messages_shared_point_and_keys(vectors: dict[str, bytes]) -> None:
    g = vectors["g"]
    ya_point = cpace.scalar_mult(vectors["ya"], g)
    yb_point = cpace.scalar_mult(vectors["yb"], g)
    assert ya_point == vectors["Ya"]
    assert yb_point == vectors["Yb"]
    k = cpace.scalar_mult_vfy(vectors["ya"], yb_point)
    assert k == vectors["K"]
    assert cpace.scalar_mult_vfy(vectors["yb"], ya_point) == vectors["K"]
    ir = cpace.transcript_ir(ya_point, vectors["ADa"], yb_point, vectors["ADb"])
    oc = cpace.transcript_oc(ya_point, vectors["ADa"], yb_point, vectors["ADb"])
    assert cpace.intermediate_session_key(vectors["sid"], k, ir) == vectors["ISK_IR"]
    assert cpace.intermediate_session_key(vectors["sid"], k, oc) == vectors["ISK_SY"]
    assert cpace.sid_output(ir) == vectors["sid_output_ir"]
    assert cpace.sid_output(oc) == vectors["sid_output_oc"]


def test_roles_reproduce_the_vector_isk(vectors: dict[str, bytes]) -> None:
    """The two role objects, fed the vector scalars as their randomness, agree on ISK_IR."""
    initiator = cpace.CPaceInitiator(
        prs=vectors["PRS"], ci=vectors["CI"], sid=vectors["sid"],
        rng=lambda n: vectors["ya"][:n], ad=vectors["ADa"],
    )
    assert initiator.message == vectors["Ya"]
    responder = cpace.CPaceResponder(
        prs=vectors["PRS"], ci=vectors["CI"], sid=vectors["sid"],
        rng=lambda n: vectors["yb"][:n], ya=initiator.message, ada=vectors["ADa"],
        ad=vectors["ADb"],
    )
    assert responder.message == vectors["Yb"]
    assert responder.isk == vectors["ISK_IR"]
    assert initiator.finish(responder.message, vectors["ADb"]) == vectors["ISK_IR"]


def test_low_order_points_abort_and_others_match(suite: dict) -> None:
    points = suite["low_order_points"]
    scalar = bytes.fromhex(points["s"])
    must_abort = set(points["must_abort"])
    assert must_abort, "no must-abort vectors found"
    for name, u in points["u"].items():
        if name in must_abort:
            with pytest.raises(cpace.CPaceAbort) as caught:
                cpace.scalar_mult_vfy(scalar, bytes.fromhex(u))
            assert caught.value.reason == "low-order-point"
        else:
            assert cpace.scalar_mult_vfy(scalar, bytes.fromhex(u)).hex() == points["expected_q"][name]


def test_the_full_vector_file_agrees_for_x25519(shared_vectors: Path, suite: dict) -> None:
    full = load(shared_vectors, "cpace-testvectors.json")
    assert full["G_25519"] == suite["G_25519"]
    assert full["X25519_points"] == suite["low_order_points"]["u"]


def test_leb128_and_lexicographic_order() -> None:
    assert cpace.leb128(0) == b"\x00"
    assert cpace.leb128(127) == b"\x7f"
    assert cpace.leb128(128) == b"\x80\x01"
    assert cpace.leb128(300) == b"\xac\x02"
    assert cpace.lexicographically_larger(b"\x02", b"\x01\xff")
    assert cpace.lexicographically_larger(b"\x01\x00", b"\x01")
    assert not cpace.lexicographically_larger(b"\x01", b"\x01\x00")
    assert cpace.o_cat(b"\x01", b"\x02") == b"oc\x02\x01"


def test_a_wrong_point_size_aborts() -> None:
    with pytest.raises(cpace.CPaceAbort):
        cpace.scalar_mult_vfy(bytes(32), bytes(31))
    assert issubclass(cpace.CPaceAbort, RemoteProtocolError)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    password=st.binary(max_size=200),
    other=st.binary(max_size=200),
)
def test_same_password_same_key_different_password_different_key(
    seed: int, password: bytes, other: bytes
) -> None:
    rng = seeded_rng(seed)
    initiator = cpace.CPaceInitiator(prs=password, ci=b"ci", sid=b"sid", rng=rng)
    responder = cpace.CPaceResponder(prs=password, ci=b"ci", sid=b"sid", rng=rng, ya=initiator.message)
    assert initiator.finish(responder.message) == responder.isk
    if other != password:
        guesser = cpace.CPaceResponder(prs=other, ci=b"ci", sid=b"sid", rng=rng, ya=initiator.message)
        assert initiator.finish(guesser.message) != guesser.isk


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**255))
def test_elligator2_lands_on_the_curve(r: int) -> None:
    p = 2**255 - 19
    u = cpace.elligator2_u(r)
    assert 0 <= u < p
    rhs = (u**3 + 486662 * u * u + u) % p
    assert pow(rhs, (p - 1) // 2, p) in (0, 1)  # v^2 = rhs has a solution

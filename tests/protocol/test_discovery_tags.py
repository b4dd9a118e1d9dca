"""Private mDNS adverts, sans-IO: members recognise them, strangers learn nothing lasting."""

from __future__ import annotations

import random
import re

from hypothesis import given
from hypothesis import strategies as st

from meshd.protocol import discovery as d
from meshd.protocol.crypto import XAEAD_NONCE_LEN

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
HINT = b"\x01\x02\x03\x04\x05\x06\x07\x08"


def seeded_rng(seed: int):
    generator = random.Random(seed)
    return lambda n: generator.randbytes(n)


def test_windows_are_fifteen_minutes() -> None:
    assert d.window_of(0) == 0
    assert d.window_of(899.999) == 0
    assert d.window_of(900) == 1
    assert d.next_window_start(1000.0) == 1800.0


def test_a_member_recognises_the_advert_in_its_window_and_the_neighbours() -> None:
    advert = d.make_advert(KEY, 1000, HINT, seeded_rng(1))
    for window in (999, 1000, 1001):
        assert d.recognise(advert.txt, [OTHER_KEY, KEY], window) == HINT
    assert d.recognise(advert.txt, [KEY], 998) is None
    assert d.recognise(advert.txt, [KEY], 1002) is None


def test_another_circle_recognises_nothing() -> None:
    advert = d.make_advert(KEY, 1000, HINT, seeded_rng(1))
    assert d.recognise(advert.txt, [OTHER_KEY], 1000) is None
    assert d.recognise(advert.txt, [], 1000) is None


def test_zeroconf_shaped_txt_with_bytes_is_recognised() -> None:
    advert = d.make_advert(KEY, 5, HINT, seeded_rng(2))
    as_bytes = {k.encode(): v.encode() for k, v in advert.txt.items()}
    assert d.recognise(as_bytes, [KEY], 5) == HINT


def test_the_advert_is_dns_safe_and_carries_only_random_looking_fields() -> None:
    advert = d.make_advert(KEY, 7, HINT, seeded_rng(3))
    assert re.fullmatch(r"[a-z2-7]{10}", advert.instance)
    assert re.fullmatch(r"[a-z2-7]{10}\.local\.", advert.host)
    assert set(advert.txt) == {"v", "n", "h"}
    assert advert.service_name == f"{advert.instance}._meshd._tcp.local."


def test_nothing_repeats_between_adverts_of_one_device_or_of_one_circle() -> None:
    """Two adverts (same device in the next window, or two devices in the same window)
    share no field but the version: an outsider can link neither."""
    rng = seeded_rng(4)
    first = d.make_advert(KEY, 10, HINT, rng)
    later = d.make_advert(KEY, 11, HINT, rng)
    sibling = d.make_advert(KEY, 10, b"\xff" * 8, rng)
    for a, b in ((first, later), (first, sibling)):
        assert a.instance != b.instance and a.host != b.host
        assert a.txt["n"] != b.txt["n"] and a.txt["h"] != b.txt["h"]
        assert HINT.hex() not in str(a)


def test_a_tampered_hint_is_not_recognised() -> None:
    advert = d.make_advert(KEY, 10, HINT, seeded_rng(5))
    h = advert.txt["h"]
    flipped = ("A" if h[0] != "A" else "B") + h[1:]
    assert d.recognise({**advert.txt, "h": flipped}, [KEY], 10) is None
    assert d.recognise({**advert.txt, "v": "2"}, [KEY], 10) is None


def test_the_nonce_is_a_fresh_xchacha_nonce() -> None:
    advert = d.make_advert(KEY, 10, HINT, seeded_rng(6))
    assert len(d._unb64(advert.txt["n"])) == XAEAD_NONCE_LEN


txt_values = st.one_of(st.none(), st.text(max_size=80), st.binary(max_size=80), st.integers())
hostile_txt = st.one_of(
    st.dictionaries(st.sampled_from(["v", "n", "h", "p", b"v", b"n", b"h", b"p", "x"]), txt_values),
    txt_values,
    st.lists(txt_values),
)


@given(hostile_txt, st.integers(0, 2**40))
def test_recognise_never_raises_on_garbage(txt: object, window: int) -> None:
    assert d.recognise(txt, [KEY], window) is None


@given(hostile_txt)
def test_invitation_nameplate_never_raises_on_garbage(txt: object) -> None:
    result = d.invitation_nameplate(txt)
    assert result is None or 0 < result <= d.MAX_NAMEPLATE


def test_invitation_advert_round_trip() -> None:
    advert = d.make_invitation_advert(17, seeded_rng(7))
    assert d.invitation_nameplate(advert.txt) == 17
    assert d.invitation_nameplate({b"v": b"1", b"p": b"17"}) == 17
    for bad in ("0", "-1", "１７", "99999", ""):
        assert d.invitation_nameplate({"v": "1", "p": bad}) is None


def test_short_device_id_is_eight_bytes_and_key_specific() -> None:
    assert len(d.short_device_id(KEY)) == 8
    assert d.short_device_id(KEY) != d.short_device_id(OTHER_KEY)

"""The relay's enrolment-token admission mode (protocol/admission.py, protocol/relay.md
"Limits"): a new circle needs the operator's token, a circle held needs none, and the token
never appears in an error, a repr or a log line."""

from __future__ import annotations

import base64

import pytest

from meshd.protocol.admission import TOKEN, Admission, format_token, parse_token
from meshd.protocol.relay import BAD_TOKEN, MALFORMED, Limits, Register, RelayError, parse_request
from meshd.protocol.relaysession import Connection, RelayRules

from .test_relaysession import circle_of

SECRET = bytes(range(100, 132))


def refused_with(code: str, call: object, *args: object) -> RelayError:
    with pytest.raises(RelayError) as caught:
        call(*args)  # type: ignore[operator]
    assert caught.value.code == code
    return caught.value


def shown(token: bytes) -> list[str]:
    """Every spelling of a token that must not reach a message."""
    return [token.hex(), format_token(token), base64.b64encode(token).decode(), repr(token)]


def test_token_mode_admits_a_new_circle_only_with_the_operators_token() -> None:
    policy = Admission(TOKEN, token=SECRET)
    policy.check_new_circle(bytes(32), 0, SECRET)  # the right token: admitted
    for wrong in (None, b"", bytes(32), SECRET[:-1], SECRET + b"\x00", SECRET[:-1] + b"\x01"):
        err = refused_with(BAD_TOKEN, policy.check_new_circle, bytes(32), 0, wrong)
        assert err.fatal  # like not-admitted: said, then that connection ends (logged aggregated)
        assert "token" in err.message
        for spelling in shown(SECRET):
            assert spelling not in str(err) and spelling not in err.message


def test_the_relay_wide_caps_still_apply_in_token_mode() -> None:
    policy = Admission(TOKEN, token=SECRET, max_circles=1)
    refused_with("relay-full", policy.check_new_circle, bytes(32), 1, SECRET)


def test_token_mode_needs_a_token_and_other_modes_take_none() -> None:
    with pytest.raises(ValueError):
        Admission(TOKEN)
    with pytest.raises(ValueError):
        Admission(TOKEN, token=b"short")
    with pytest.raises(ValueError):
        Admission("open", token=SECRET)
    # Open mode ignores a token a device sends anyway.
    Admission().check_new_circle(bytes(32), 0, b"anything")


def test_the_token_is_not_in_the_policys_repr() -> None:
    text = repr(Admission(TOKEN, token=SECRET))
    assert all(spelling not in text for spelling in shown(SECRET))


def test_a_token_is_printed_and_parsed_as_base64url() -> None:
    assert parse_token(format_token(SECRET)) == SECRET
    assert "=" not in format_token(SECRET)
    for bad in ("", "not base64!", format_token(SECRET)[:-2], format_token(SECRET) + "AAAA"):
        with pytest.raises(ValueError) as caught:
            parse_token(bad)
        assert bad == "" or bad not in str(caught.value)  # a near-miss token is not echoed


def test_relay_register_carries_an_optional_token() -> None:
    records = [b"\x01" * 10]
    plain = parse_request({"t": "relay.register", "rid": 1, "records": records})
    assert isinstance(plain, Register) and plain.token is None
    given = parse_request({"t": "relay.register", "rid": 1, "records": records, "token": SECRET})
    assert isinstance(given, Register) and given.token == SECRET
    assert SECRET.hex() not in repr(given)
    for bad in ("text", 5, b"", bytes(65)):
        err = refused_with(MALFORMED, parse_request,
                           {"t": "relay.register", "rid": 1, "records": records, "token": bad})
        assert "token" in err.message


def test_a_new_circle_without_the_token_is_refused_before_its_records_are_verified() -> None:
    circle, m, _ = circle_of("alice", "bob")
    other, _, _ = circle_of("carol", seed=2)
    rules: RelayRules[Connection] = RelayRules(Limits(), Admission(TOKEN, token=SECRET))
    refused_with(BAD_TOKEN, rules.admit, tuple(circle.records()), None)
    refused_with(BAD_TOKEN, rules.admit, tuple(circle.records()), bytes(32))
    rules.admit(tuple(circle.records()), SECRET)
    rules.remember(circle)
    # A circle the relay holds needs no token: its members register, and offer changes.
    rules.admit(tuple(circle.records()), None)
    rules.admit(tuple(circle.records()[:1]), None)
    refused_with(BAD_TOKEN, rules.admit, tuple(other.records()), None)


def test_token_guesses_are_charged_to_the_keys_rate_bucket_like_any_request() -> None:
    circle, m, _ = circle_of("alice")
    rules: RelayRules[Connection] = RelayRules(Limits(rate_per_s=1.0, burst=2.0),
                                               Admission(TOKEN, token=SECRET))
    guess = {"t": "relay.register", "rid": 1, "records": circle.records(), "token": bytes(32)}
    for _ in range(2):  # a fresh connection each time: bad-token ends the connection
        request = rules.accept(Connection(key=bytes(m["alice"].dh.public)), guess, 0.0)
        assert isinstance(request, Register)
        refused_with(BAD_TOKEN, rules.admit, request.records, request.token)
    err = refused_with("rate-limited", rules.accept, Connection(key=bytes(m["alice"].dh.public)), guess, 0.0)
    assert err.retry_after is not None and err.retry_after > 0

"""store_errors (meshd/streamservice.py): the one translation of the store's failures into
the API's refusals, each counted, the original never leaking through."""

from __future__ import annotations

import pytest

from meshd import errors
from meshd.protocol.log import InvalidRequest
from meshd.store.db import StoreCorrupt, StoreError, StoreFull, StoreReadOnly
from meshd.streamservice import store_errors

CASES = [
    (InvalidRequest("stream name too long"), errors.InvalidArgument, "invalid-argument", None),
    (StoreFull("disk full"), errors.StorageFull, "storage-full", "store-full"),
    (StoreReadOnly("read-only file system"), errors.Unavailable, "storage-read-only", "store-read-only"),
    (StoreCorrupt("database disk image is malformed"), errors.StorageBroken, "storage-corrupt",
     "store-corrupt"),
]


@pytest.mark.parametrize(("raised", "kind", "code", "counted"), CASES)
def test_each_store_failure_becomes_its_refusal_and_is_counted(
        raised: Exception, kind: type[errors.Refusal], code: str, counted: str | None) -> None:
    counts: list[str] = []
    with pytest.raises(kind) as refused, store_errors(counts.append):
        raise raised
    assert refused.value.code == code
    assert str(raised) in refused.value.message
    assert refused.value.__suppress_context__  # the store's exception is not chained on
    assert counts == ([counted] if counted else [])


def test_anything_else_passes_through_untouched_and_uncounted() -> None:
    counts: list[str] = []
    bug = KeyError("a bug, not a refusal")
    with pytest.raises(KeyError) as raised, store_errors(counts.append):
        raise bug
    assert raised.value is bug and counts == []
    with pytest.raises(StoreError), store_errors(counts.append):  # not one of the four kinds
        raise StoreError("some other store error")
    assert counts == []


def test_a_block_that_succeeds_is_left_alone() -> None:
    counts: list[str] = []
    with store_errors(counts.append):
        value = 1
    assert value == 1 and counts == []

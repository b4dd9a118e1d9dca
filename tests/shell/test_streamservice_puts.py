"""StreamService.write_puts: the batch route's usual request (puts with fresh ids to one
stream) checked once per batch and committed as one unit, a PutRun (no Python object per
record, nothing to build between one request's commit and the next one's); None (the
route then answers record by record) when a per-batch check fails, with nothing submitted."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from meshd.api.metrics import MeshdMetrics
from meshd.protocol.entry import MAX_BODY_BYTES
from meshd.protocol.log import PUT, PutRun, Write
from meshd.streamservice import StreamService


class Logs:
    def __init__(self) -> None:
        self.units: list[Sequence[Write]] = []

    async def submit_ids(self, writes: Sequence[Write]) -> list[tuple[str, int]]:
        self.units.append(writes)
        return [(f"id{i}", 10 + i) for i in range(len(writes))]


class Host:
    def __init__(self) -> None:
        self.logs = Logs()
        self.metrics = MeshdMetrics()

    def require_member(self) -> None:
        pass

    def count_error(self, kind: str) -> None:
        raise AssertionError(kind)


async def test_puts_are_one_put_run_of_the_bodies_with_fresh_ids() -> None:
    host = Host()
    bodies = [b"a", b"", b"c"]
    written = await StreamService(host).write_puts("s", bodies)  # type: ignore[arg-type]
    assert written == [("id0", 10), ("id1", 11), ("id2", 12)]
    [unit] = host.logs.units
    assert type(unit) is PutRun and unit.stream == "s"
    assert unit.bodies is bodies  # the request's list itself: nothing built per record
    assert list(unit) == [Write("s", "", PUT, b) for b in bodies]


@pytest.mark.parametrize(("stream", "bodies"), [
    ("", [b"a"]),                                   # no stream name
    ("x" * 300, [b"a"]),                            # a name the log cannot hold
    ("s", [b"a", b"x" * (MAX_BODY_BYTES + 1)]),     # one body too large
    ("s", [b"a", "text"]),                          # one body not bytes
    ("s", []),
])
async def test_a_batch_failing_a_check_is_left_to_write_batch(stream: str, bodies: list[bytes]) -> None:
    host = Host()
    assert await StreamService(host).write_puts(stream, bodies) is None  # type: ignore[arg-type]
    assert host.logs.units == []

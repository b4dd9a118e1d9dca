"""The view's specification: the materialised view of a set of log entries (protocol/logs.md).

The view is a pure function of the set of entries: per stream, the latest put or delete per
record id by the total order (hlc, author, seq) wins; a clear hides every record whose
winning entry orders at or before it; live records are listed in that order. materialise()
is the reference the store's incremental view must agree with (the tests compare them); it
is not on the hot path. log.py re-exports it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .entry import Header


@dataclass(frozen=True, slots=True)
class ViewRecord:
    record_id: str
    author: bytes
    seq: int
    hlc: int
    body_hash: bytes


def materialise(headers: Iterable[Header]) -> dict[str, list[ViewRecord]]:
    """The view of a set of entries: per stream, live records in (hlc, author, seq) order.

    This is the specification the store's incremental view must agree with; it is used by
    the tests, not on the hot path.
    """
    cleared: dict[str, bytes] = {}
    winners: dict[tuple[str, str], Header] = {}
    for header in headers:
        if header.op == "clear":
            if header.order > cleared.get(header.stream, b""):
                cleared[header.stream] = header.order
            continue
        key = (header.stream, header.record_id)
        current = winners.get(key)
        if current is None or header.order > current.order:
            winners[key] = header
    view: dict[str, list[Header]] = {}
    for (stream, _), header in winners.items():
        if header.op == "put" and header.order > cleared.get(stream, b""):
            view.setdefault(stream, []).append(header)
    return {
        stream: [
            ViewRecord(h.record_id, h.author, h.seq, h.hlc, h.body_hash)
            for h in sorted(live, key=lambda h: h.order)
        ]
        for stream, live in sorted(view.items())
    }

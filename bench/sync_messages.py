"""Sync messages on the wire per entry in a circle of three (issue 20).

Three LogServices joined pairwise by memory channels (tests/shell/test_logsync.py's Link);
a and b each write ENTRIES entries one at a time; once every device has all of them and the
forwarding holds have had time to run out, prints the log.* messages of each type sent over
all links and the entries they carried, and the trio-thread work per entry: passes of the
PeerSync loops, version vectors built for them, and batches handed to the writer thread.
A count, not a timing: run it on two trees to compare.

Run: PYTHONPATH=. .venv/bin/python bench/sync_messages.py [ENTRIES]
"""

from __future__ import annotations

import collections
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.shell.test_logsync import Link, service, wait_until  # noqa: E402

SETTLE_S = 2.0  # longer than the forwarding hold (protocol/logs.md, "Forwarding once")


async def count(entries: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        a, b, c = service(root, 1), service(root, 2), service(root, 3)
        links = [Link(a, b), Link(a, c), Link(b, c)]
        everyone = (a, b, c)
        work: collections.Counter[str] = collections.Counter()
        for svc in everyone:
            counting(svc, "version_vector", "vectors built", work)
            counting(svc, "_verify_and_commit", "writer-thread hops", work)
        for link in links:
            counting(link.a._session, "deadline", "loop passes", work)
            counting(link.b._session, "deadline", "loop passes", work)
        want = {a.author: entries, b.author: entries}
        async with trio.open_nursery() as nursery:
            for link in links:
                link.start(nursery)
            for i in range(entries):
                await a.write("s", f"a{i}", bytes(200))
                await b.write("s", f"b{i}", bytes(200))
            await wait_until(lambda: all(s.version_vector() == want for s in everyone), *everyone)
            await trio.sleep(SETTLE_S)  # a forward after the hold would still be counted
            nursery.cancel_scope.cancel()
        # (the settle time's passes are the holds and announcements running out: counted too)
    sent = [m for link in links for side in "ab" for m in link.sent[side]]
    kinds = collections.Counter(m["t"] for m in sent)
    carried = sum(len(m["headers"]) for m in sent if m["t"] == "log.entries")
    print(f"{2 * entries} entries written; messages: "
          + ", ".join(f"{kind} {n}" for kind, n in sorted(kinds.items()))
          + f"; {sum(kinds.values())} in all, {sum(kinds.values()) / (2 * entries):.2f} per entry;"
          f" log.entries carried {carried} entries ({carried / (2 * entries):.2f} per entry)")
    print("trio-thread work per entry written: " + ", ".join(
        f"{name} {n / (2 * entries):.2f}" for name, n in sorted(work.items())))


def counting(owner: object, method: str, name: str, counter: collections.Counter[str]) -> None:
    """Count calls of owner.method (an instance attribute shadowing the method)."""
    original = getattr(owner, method)

    def counted(*args: object, **kwargs: object) -> object:
        counter[name] += 1
        return original(*args, **kwargs)

    setattr(owner, method, counted)


if __name__ == "__main__":
    trio.run(count, int(sys.argv[1]) if len(sys.argv) > 1 else 30)

"""The backup loop: when to upload to the relays (meshd/protocol/backupwindow.py decides),
and the upload to each connected relay (meshd/backup.py does the work).

RelayLinks tells it what changed: changed() for entries written or received, prompt=True
for what should be backed up at once (circle records, a relay connected or wiped). The
bytes waiting are those of this device's own entries that the relays' manifests do not
cover yet, counted from the store as they come (bounded: counting stops at the window's
size, which the last manifest's size sets); another author's entries, which this device uploads only while their own device is
away, wait for the window's time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import trio

from ..backupstate import off_loop
from ..protocol.backupwindow import BackupWindow
from ..store.db import StoreError

if TYPE_CHECKING:
    from ..backup import Backups
    from ..protocol.backupset import Manifest
    from .client import RelayClient
    from .linkhost import RelayHost

DEADLINE_MARGIN_S = 0.001


class BackupLoop:
    def __init__(self, daemon: RelayHost, backups: Backups, clients: Mapping[str, RelayClient],
                 spawn: Callable[..., None]) -> None:
        self._daemon = daemon
        self._backups = backups
        self._clients = clients  # RelayLinks' own dict: relays come and go
        self._spawn = spawn
        self.window = BackupWindow(daemon.config.backup_window)
        self._wakeup = trio.Event()
        # When the loop's wait ends by itself (trio time; inf: it waits for a change only,
        # -inf: it is not waiting, so each change wakes it).
        self._waiting_until = -math.inf
        # Own entries counted so far: (seq the relays cover, seq counted through, bytes).
        self._counted = (0, 0, 0)
        self._covers: dict[str, tuple[Manifest, int]] = {}  # relay -> its manifest, own seq covered
        self._tip_answered = -1  # the own seq when the window's answer was last worked out

    def changed(self, *, prompt: bool = False) -> None:
        """At each commit (a listener: no await) and at each prompt change. The loop is woken
        only if the change brings its upload forward: the window's answer is worked out here
        (counting the new own entries, as the loop would), since waking the loop at every
        commit to find its wait unchanged cost a task step per entry (issue 20)."""
        now = trio.current_time()
        gathering = self.window.since is not None
        self.window.changed(now, prompt=prompt)
        if self._waiting_until > -math.inf:
            tip = self._daemon.logs.version_vector().get(bytes(self._daemon.identity.signing.public), 0)
            if gathering and not prompt and tip == self._tip_answered:
                # Another author's entries: the own bytes waiting, the relays' manifests (they
                # change in the loop's own upload) and the window's start are as when the
                # answer the loop waits on was worked out, and that answer is a time, not a
                # delay from now: it would come out the same (half the commits, issue 20).
                return
            self._tip_answered = tip
            due = self.window.due_in(now, self._pending_bytes, self._manifest_bytes())
            # (a margin: the same deadline worked out again may differ in its last bits)
            if due is None or now + due >= self._waiting_until - DEADLINE_MARGIN_S:
                return
        self._wakeup.set()

    async def run(self) -> None:
        while True:
            # No await between the wake-up and due_in(): a change in between is in the window.
            now = trio.current_time()
            self._tip_answered = self._daemon.logs.version_vector().get(
                bytes(self._daemon.identity.signing.public), 0)
            due = self.window.due_in(now, self._pending_bytes, self._manifest_bytes())
            if due is None or due > 0:
                self._waiting_until = math.inf if due is None else now + due
                try:
                    with trio.move_on_after(due if due is not None else math.inf):
                        await self._wakeup.wait()
                finally:
                    self._waiting_until = -math.inf
                self._wakeup = trio.Event()
                continue
            self.window.started()
            self._wakeup = trio.Event()
            await self._upload()

    async def _upload(self) -> None:
        # A failing relay waits for its backoff, not the next change.
        if not self._daemon.is_member:
            return
        for address, client in list(self._clients.items()):
            if client.connected and not self._backups.due(address):
                await self._backups.upload(address, client)
            await self.count_covered(address)
            if (delay := self._backups.wake_in(address)) is not None:
                self._spawn(self._wake_after, delay)

    async def _wake_after(self, delay: float) -> None:
        await trio.sleep(delay)
        self.changed(prompt=True)

    async def count_covered(self, address: str) -> None:
        """Count the own entries the relay's manifest covers, once per manifest (a manifest is
        never changed in place), in a worker thread: it walks every segment (issue 20)."""
        manifest = self._backups.state(address).manifest
        cached = self._covers.get(address)
        if manifest is not None and (cached is None or cached[0] is not manifest):
            own = bytes(self._daemon.identity.signing.public)
            self._covers[address] = (manifest, await off_loop(manifest.covered, own))

    def _manifest_bytes(self) -> int:
        return max((self._backups.state(address).manifest_bytes for address in list(self._clients)), default=0)

    def _pending_bytes(self, enough: int) -> int:
        """Bytes of own entries some connected relay's manifest does not cover yet, counted
        up to `enough`; `enough` if a relay's manifest is not known yet or the store cannot
        be read (the upload finds out and says so)."""
        own = bytes(self._daemon.identity.signing.public)
        covered: int | None = None
        for address, client in list(self._clients.items()):
            if not client.connected:
                continue
            manifest = self._backups.state(address).manifest
            if manifest is None:
                return enough
            cached = self._covers.get(address)
            if cached is None:
                return enough  # not counted yet: count_covered() runs after each upload
            # Counted for this manifest or an earlier one of this relay (which covered no more:
            # a wiped relay's state has no manifest), so at most more bytes wait than do.
            covered = cached[1] if covered is None else min(covered, cached[1])
        if covered is None:
            return 0  # no relay to upload to: its connection is prompt
        tip = self._daemon.logs.version_vector().get(own, 0)
        start, through, size = self._counted
        if start != covered or through < covered:
            through, size = covered, 0
        try:
            while through < tip and size < enough:
                batch = self._daemon.logs.batch_since(own, through, enough - size)
                if batch is None:
                    break
                size += _batch_bytes(batch)
                through = batch["head"]["seq"]
        except StoreError:
            return enough
        self._counted = (covered, through, size)
        return size


def _batch_bytes(batch: dict[str, Any]) -> int:
    return sum(map(len, batch["headers"])) + sum(len(body) for body in batch["bodies"] if body)

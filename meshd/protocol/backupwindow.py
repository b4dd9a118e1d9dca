"""When the relay backup uploads: the batching window (issue 20).

Each upload stores a new manifest (of about 2-20 KB: the loose and unindexed segment
references and the circle records) besides the new entries' segment, so uploading every
few entries makes the manifest most of what is uploaded. The window gathers changes: an
upload happens once WINDOW_BYTES of entries not yet backed up have gathered, or once the
oldest change not yet backed up is `window_s` old (the backup is current within that, plus
the upload's own time, at any write rate), and never sooner than `settle_s` after it (one
upload per burst of changes, as the old debounce did). WINDOW_BYTES grows to MANIFEST_SHARE
times the last manifest's size, so when the size decides, the manifest costs at most a
quarter of the entries it is stored for (the manifest of a large log, 20-30 KB, would
otherwise be stored for every 16 KiB of entries at a few writes per second). Circle changes (records, a removal,
a new epoch), a relay (re)connected or found wiped, and the backup's own timers (a backoff
ending, another author's entries becoming this device's to upload) are prompt: they wait
only the settle time.

Sans-IO: the shell (meshd/relay/backuploop.py) passes the time and, when asked, the bytes
of entries the relays' manifests do not cover yet, and the last manifest's size.
"""

from __future__ import annotations

from collections.abc import Callable

WINDOW_S = 20.0  # the default; the config's backup_window sets it
WINDOW_BYTES = 16 * 1024  # entry bytes worth an upload of their own
SETTLE_S = 2.0
MANIFEST_SHARE = 4


class BackupWindow:
    """The changes not yet backed up, and when to upload them."""

    def __init__(self, window_s: float = WINDOW_S, *, window_bytes: int = WINDOW_BYTES,
                 settle_s: float = SETTLE_S) -> None:
        if window_s < 0 or window_bytes < 0 or settle_s < 0:
            raise ValueError("a backup window is a duration and a size, not negative")
        self.window_s = window_s
        self.window_bytes = window_bytes
        self.settle_s = min(settle_s, window_s)  # a window shorter than the settle time wins
        self.since: float | None = None  # when the oldest change not yet backed up happened
        self.prompt = False

    def changed(self, now: float, *, prompt: bool = False) -> None:
        """Something changed at `now`: entries were written (prompt=False; their size is
        asked for by due_in) or something that should be backed up promptly."""
        if self.since is None:
            self.since = now
        self.prompt = self.prompt or prompt

    def due_in(self, now: float, pending_bytes: Callable[[int], int], manifest_bytes: int = 0) -> float | None:
        """Seconds until the upload should start (0: now), or None if nothing waits.
        pending_bytes(enough) is called only when the answer depends on it: the bytes of
        entries written and not yet covered by the backup, counted up to at least `enough`.
        manifest_bytes: the size of the last manifest stored (0: not known)."""
        if self.since is None:
            return None
        age = now - self.since
        settle = max(0.0, self.settle_s - age)
        if self.prompt or age >= self.window_s:
            return settle
        enough = self.size_for(manifest_bytes)
        if pending_bytes(enough) >= enough:
            return settle
        return self.window_s - age

    def size_for(self, manifest_bytes: int) -> int:
        """The entry bytes worth an upload before the window's time, after a manifest of that size."""
        return max(self.window_bytes, MANIFEST_SHARE * manifest_bytes)

    def started(self) -> None:
        """An upload began: it backs up the log as it is now, so what changes from here on
        waits for the next one."""
        self.since = None
        self.prompt = False

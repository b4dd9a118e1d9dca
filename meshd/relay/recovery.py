"""Recovery from the words, with the owner in the loop (protocol/relay.md, "Recovery").

Every known relay is asked for the circle's records and backup; the records are merged (they
are signed, so the union is at least as fresh as the freshest relay) and the highest backup
version that verifies is opened. Its manifest lists sealed log segments (issue 20,
meshd/restore.py), fetched one at a time from the relay that served it when the owner
confirms; a format-1 backup carries its logs inline. Nothing is re-admitted silently: `preview` lists the devices
the recovered circle would keep, and `recover` keeps exactly those the owner confirmed and
removes the others.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import msgpack
import trio

from ..backupblobs import read_indexes, read_manifest
from ..backupstate import BackupFailed
from ..errors import Conflict, InvalidArgument, PeerFailed, Unavailable
from ..identity import fingerprint
from ..protocol.backupchain import is_chained
from ..protocol.backupset import Manifest, SegmentRef, open_segment
from ..protocol.circle import Circle, EpochKeys, epoch_keys
from ..protocol.crypto import DHKeyPair, short_key
from ..protocol.envelope import Backup, open_backup
from ..protocol.errors import ProtocolError
from ..protocol.log import EntryRejected, hlc_millis
from ..protocol.records import CircleOperationError, RecordRejected
from ..protocol.recovery import recovery_member
from ..protocol.relay import RelayError
from ..protocol.removal import removed_devices
from ..restore import restore_logs
from ..store.db import StoreError
from .address import RelayAddress, RelayAddressError
from .session import open_relay_session

if TYPE_CHECKING:
    from ..api.events import EventBus
    from ..identity import DeviceIdentity
    from ..net.logsync import LogService
    from ..protocol.crypto import RandomSource
    from ..protocol.records import DeviceInfo


class RecoveryHost(Protocol):
    """What recovery from the relays needs of the daemon (this module never imports it)."""

    @property
    def rng(self) -> RandomSource: ...
    @property
    def events(self) -> EventBus: ...
    @property
    def identity(self) -> DeviceIdentity: ...
    @property
    def logs(self) -> LogService: ...
    @property
    def device(self) -> DeviceInfo: ...
    def devices(self) -> list[dict[str, Any]]: ...
    def adopt_circle(self, circle: Circle, source: str) -> None: ...
    def is_author_allowed(self, sign_key: bytes) -> bool: ...

log = logging.getLogger(__name__)

# Per relay: connect, register, fetch the records and the backup.
RELAY_TIMEOUT_S = 30.0


@dataclass
class Found:
    """What the relays hold, merged."""

    circle: Circle
    backup: Backup | None = None
    backup_version: int | None = None
    relays: dict[str, str] = field(default_factory=dict)  # address -> "ok" or why not
    backup_relay: str | None = None  # the relay whose backup was opened
    manifest: Manifest = field(default_factory=Manifest)  # the opened backup's
    keys: EpochKeys | None = None  # the epoch keys that opened it
    readable: dict[int, bytes] = field(default_factory=dict)  # epochs sealed to the recovery key
    newest: dict[bytes, float] = field(default_factory=dict)  # author -> its newest entry's time

    def warning(self) -> str:
        """A relay can only serve what it holds, and may serve an older backup than another
        relay or a surviving device has: say which one this was, so the person can compare."""
        asked = ", ".join(sorted(self.relays))
        held = (f"restored backup version {self.backup_version} from relay {self.backup_relay}: "
                if self.backup is not None else
                f"no relay ({asked}) held a backup, only the circle's records: ")
        return held + ("another relay or a device of the circle may hold newer state; add the "
                       "other relays (meshctl relay add) and bring the other devices online to "
                       "sync it")

    def keys_for_epoch(self, number: int) -> EpochKeys | None:
        """A segment's keys: the manifest's own epoch record, else what the number resolves to."""
        if self.keys is not None and number == self.keys.number:
            return self.keys
        return epoch_keys(number, self.readable[number]) if number in self.readable else None

    def removed_authors(self) -> list[dict[str, Any]]:
        """Devices removed from the circle before this backup: their entries up to their removal
        are kept, but only as far as a remaining device had backed them up (issue 15, F4).
        backed_up is the last entry of theirs the backup holds without a gap."""
        inline = _heads(self.manifest.inline_logs)
        return [{"device": d.sign_key.hex(), "fingerprint": fingerprint(d.sign_key), "name": d.name,
                 "backed_up": max(self.manifest.covered(d.sign_key), inline.get(d.sign_key, 0))}
                for d in removed_devices(self.circle)]

    def devices(self) -> list[dict[str, Any]]:
        last = {**_last_seen(self.manifest.inline_logs), **self.newest}
        return [{"device": d.sign_key.hex(), "name": d.name, "last_seen": last.get(d.sign_key)}
                for d in self.circle.state.devices()]


async def gather(daemon: RecoveryHost, seed: bytes, addresses: Sequence[str]) -> Found:
    """The merged records and freshest verifiable backup of every relay that answers."""
    _, dh, _ = recovery_member(seed)
    for address in addresses:
        try:
            RelayAddress.parse(address)
        except RelayAddressError as err:
            raise InvalidArgument("bad-relay-address", str(err)) from None
    if not addresses:
        raise Unavailable("no-relay", "recovery needs the relay that holds the backup")
    fetched: dict[str, tuple[list[bytes], Any]] = {}
    status: dict[str, str] = {}

    async def ask(address: str) -> None:
        try:
            with trio.fail_after(RELAY_TIMEOUT_S):
                async with open_relay_session(address, dh, [], rng=daemon.rng) as session:
                    fetched[address] = (await session.records(), await session.backup_get())
            status[address] = "ok"
        except (RelayError, ProtocolError, trio.TooSlowError, OSError) as err:
            status[address] = f"failed: {err}"

    async with trio.open_nursery() as nursery:
        for address in addresses:
            nursery.start_soon(ask, address)
    circle: Circle | None = None
    for address in addresses:  # the order given: the same circle whichever answered first
        if address not in fetched:
            continue
        try:
            if circle is None:
                circle = Circle.from_records(fetched[address][0])
            else:
                circle.merge(fetched[address][0])
        except RecordRejected as err:
            status[address] = f"records rejected: {err.reason}"
            daemon.events.publish("relay.misbehaved", relay=address, reason="bad-records", detail=str(err))
    if circle is None:
        raise PeerFailed("recovery-failed", "no relay could provide the circle: "
                       + "; ".join(f"{a}: {s}" for a, s in sorted(status.items())))
    found = Found(circle, relays=status, readable=circle.readable_epochs(dh))
    stored = sorted(((a, s) for a, (_, s) in fetched.items() if s is not None),
                    key=lambda pair: -pair[1].version)
    for address, candidate in stored:
        opened = _open(circle, dh, candidate.blob, candidate.version)
        if opened is None:
            continue
        found.keys = opened[1]
        try:
            found.manifest = await _read_manifest(daemon, dh, address, found, opened[0].snapshot)
        except ProtocolError as err:
            log.warning("relay %s: the backup's manifest is malformed: %s", address, err)
            found.keys = None
            continue
        except (RelayError, BackupFailed, trio.TooSlowError, OSError) as err:
            log.warning("relay %s: could not read the backup's manifest chain: %s", address, err)
            found.keys = None
            continue
        found.backup = opened[0]
        found.backup_version, found.backup_relay = candidate.version, address
        break
    else:
        if stored:
            raise PeerFailed("bad-backup", "no relay's backup verifies")
    if found.backup is not None:
        try:
            circle.merge(list(found.manifest.records))
        except RecordRejected as err:
            log.warning("backup records rejected: %s", err)
        if found.manifest.segments or found.manifest.indexes:
            found.newest = await _newest_in_segments(daemon, dh, found)
    return found


async def _read_manifest(daemon: RecoveryHost, dh: DHKeyPair, address: str, found: Found,
                         snapshot: dict[str, Any]) -> Manifest:
    """The manifest of an opened backup: inline, or (format 4) read from its chain of blobs at
    the relay that served it."""
    if not is_chained(snapshot):
        return Manifest.from_snapshot(snapshot)
    with trio.fail_after(RELAY_TIMEOUT_S):
        async with open_relay_session(address, dh, [], rng=daemon.rng) as session:
            return await read_manifest(session, found.circle.circle_id, snapshot, found.keys_for_epoch)


async def _newest_in_segments(daemon: RecoveryHost, dh: DHKeyPair, found: Found) -> dict[bytes, float]:
    """The newest entry time per author of a format-2 backup, from the one segment per author
    that holds its newest entries (bounded: a segment is at most 4 MiB). Only a hint for the
    preview: a failure leaves the times out."""
    out: dict[bytes, float] = {}
    assert found.backup_relay is not None
    try:
        with trio.fail_after(RELAY_TIMEOUT_S):
            async with open_relay_session(found.backup_relay, dh, [], rng=daemon.rng) as session:
                manifest = await read_indexes(session, found.circle.circle_id, found.manifest,
                                              found.keys_for_epoch)
                newest: dict[bytes, SegmentRef] = {}
                for ref in manifest.segments:
                    if ref.author not in newest or ref.last > newest[ref.author].last:
                        newest[ref.author] = ref
                for ref in newest.values():
                    blob = await session.segment_get(ref.id)
                    if blob is None:
                        continue
                    batches = await trio.to_thread.run_sync(partial(
                        open_segment, blob, circle_id=found.circle.circle_id, ref=ref,
                        keys_for_epoch=found.keys_for_epoch))
                    out.update(_last_seen(batches[-1:]))
    except (RelayError, ProtocolError, BackupFailed, trio.TooSlowError, OSError) as err:
        log.warning("relay %s: could not read the newest backup segments: %s", found.backup_relay, err)
    return out


def _open(circle: Circle, dh: DHKeyPair, blob: bytes, version: int) -> tuple[Backup, EpochKeys] | None:
    """The backup and the keys that opened it: whichever epoch record sealed to dh carries its
    number."""
    for _, keys in circle.readable_epoch_records(dh):
        def keys_for_epoch(number: int, keys: EpochKeys = keys) -> EpochKeys | None:
            return keys if number == keys.number else None

        try:
            return open_backup(blob, circle_id=circle.circle_id, version=version,
                               keys_for_epoch=keys_for_epoch,
                               # Not a removed device's: a thief could seal a "newer" one.
                               is_signer_allowed=circle.state.is_member), keys
        except ProtocolError:
            continue
    return None


def _heads(batches: Sequence[dict[str, Any]]) -> dict[bytes, int]:
    """Per author, the highest seq of these (format-1, inline) batches."""
    out: dict[bytes, int] = {}
    for batch in batches:
        try:
            author, head = batch["author"], msgpack.unpackb(batch["headers"][-1])[2]
        except (KeyError, IndexError, TypeError, ValueError, msgpack.UnpackException):
            continue
        if isinstance(author, bytes) and type(head) is int:
            out[author] = max(out.get(author, 0), head)
    return out


def removed_note(removed: Sequence[dict[str, Any]]) -> str:
    """What the owner must know about removed devices' entries (empty if none were removed)."""
    if not removed:
        return ""
    listed = ", ".join(f"{d['name']} ({d['fingerprint']}): {d['backed_up']}" for d in removed)
    return (f"{len(removed)} device(s) were removed from the circle; the backup holds their "
            f"entries up to these numbers: {listed}. Entries they wrote that no remaining device "
            "backed up are not restored: a device that synced with them may still hold them")


def _last_seen(batches: Sequence[dict[str, Any]]) -> dict[bytes, float]:
    """Per author, the wall time (s) of its newest entry in these batches: a hint for the owner."""
    out: dict[bytes, float] = {}
    for batch in batches:
        try:
            author, headers = batch["author"], batch["headers"]
            hlc = msgpack.unpackb(headers[-1])[4]
            out[author] = max(out.get(author, 0.0), hlc_millis(hlc) / 1000)
        except (KeyError, IndexError, TypeError, ValueError, msgpack.UnpackException):
            continue
    return out


async def recover(daemon: RecoveryHost, seed: bytes, addresses: Sequence[str], *,
                  preview: bool, readmit: Sequence[str] | None) -> dict[str, Any]:
    found = await gather(daemon, seed, addresses)
    circle = found.circle
    removed = await trio.to_thread.run_sync(found.removed_authors)  # walks the manifest
    warning = " ".join(filter(None, [found.warning(), removed_note(removed)]))
    devices = await trio.to_thread.run_sync(found.devices)  # reads the inline logs, if any
    summary = {"circle": circle.circle_id.hex(), "devices": devices,
               "backup_version": found.backup_version, "relays": found.relays,
               "relay": found.backup_relay, "removed_before": removed, "warning": warning}
    if preview:
        return {"preview": True, **summary}
    if readmit is None:
        raise Conflict("confirm-devices", "recovery re-admits no device silently: preview the "
                       "devices and name those to keep (meshctl recover asks; --yes keeps them all)")
    keep = {bytes.fromhex(key) for key in readmit}
    present = {d.sign_key for d in circle.state.devices()}
    if not keep <= present:
        raise Conflict("circle-changed", "a device to re-admit is not in the circle the relays "
                       "hold now: preview again")
    signer, _, _ = recovery_member(seed)
    try:
        circle.recover(signer, daemon.device, daemon.rng)
        circle.rotate_epoch(daemon.identity.signing, daemon.rng)
        for key in sorted(present - keep):
            circle.remove_device(daemon.identity.signing, key, daemon.rng, force=True)
    except CircleOperationError as err:
        raise Conflict("cannot-recover", str(err)) from None
    daemon.adopt_circle(circle, "recovery")
    restored = await _restore_logs(daemon, seed, found)
    log.warning("RECOVERY: this device restored circle %s from the recovery key (%d entries, "
                "%d device(s) re-admitted, %d removed)", short_key(circle.circle_id), restored,
                len(keep), len(present - keep))
    if removed:
        log.warning("RECOVERY: %s", removed_note(removed))
    return {**summary, "restored_entries": restored, "devices": daemon.devices(),
            "removed": sorted(key.hex() for key in present - keep)}


async def _restore_logs(daemon: RecoveryHost, seed: bytes, found: Found) -> int:
    """Apply the backup's entries: inline batches, then each segment from the relay that
    served the manifest (one at a time, bounded memory); the entries restored."""
    ingest = ingester(daemon)
    manifest = found.manifest
    if not manifest.segments and not manifest.indexes:
        return sum([await ingest(batch) for batch in manifest.inline_logs])
    assert found.backup_relay is not None
    _, dh, _ = recovery_member(seed)
    circle_id = found.circle.circle_id
    try:
        async with open_relay_session(found.backup_relay, dh, [], rng=daemon.rng) as session:
            return await restore_logs(session, circle_id, manifest, found.keys_for_epoch, ingest)
    except ProtocolError as err:
        raise PeerFailed("bad-backup", f"a backup segment does not verify: {err}") from None
    except (RelayError, BackupFailed, trio.TooSlowError, OSError) as err:
        raise PeerFailed("recovery-failed", f"the relay could not provide the backup's "
                       f"segments: {err}") from None


def ingester(daemon: RecoveryHost) -> Callable[[dict[str, Any]], Awaitable[int]]:
    """What restore_logs applies each backed-up batch with: verified and committed in a worker
    thread (LogService.receive_message), so the trio thread keeps serving during a restore of
    any size (issue 20); a batch that does not verify or commit is logged and skipped."""

    async def ingest(batch: dict[str, Any]) -> int:
        try:
            return await daemon.logs.receive_message(batch, daemon.is_author_allowed)
        except (EntryRejected, StoreError) as err:
            log.warning("a backed-up log batch was rejected: %s", err)
            return 0

    return ingest

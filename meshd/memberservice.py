"""Losing devices: removing a device from the circle (also with the recovery words, which
settle a dispute with a thief), creating the recovery words, and recovering the circle from
them through the relays. The rules are protocol/circle.md's and protocol/recovery.py's;
this module finds the device, asks the circle, tells the peers and the relays.

It never imports the daemon: MemberHost is what it needs of it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import msgpack
import trio

from . import errors
from .circleservice import CircleService
from .config import Config
from .identity import fingerprint
from .net.peers import PeerManager
from .protocol.circle import Circle
from .protocol.crypto import short_key
from .protocol.cutoff import NOTHING_COUNTS
from .protocol.records import CircleOperationError, DeviceInfo
from .store.db import Store

if TYPE_CHECKING:
    from .pairingservice import PairingService
    from .relay.links import RelayLinks
    from .relay.recovery import RecoveryHost

    class MemberHost(RecoveryHost, Protocol):
        """What removal and recovery need of the daemon (the daemon passes itself): what
        recovery from the relays needs (RecoveryHost), and these."""

        @property
        def config(self) -> Config: ...
        @property
        def store(self) -> Store: ...
        @property
        def circles(self) -> CircleService: ...
        @property
        def circle(self) -> Circle: ...
        @property
        def is_member(self) -> bool: ...
        @property
        def peer_manager(self) -> PeerManager: ...
        @property
        def pairing(self) -> PairingService: ...
        @property
        def relay_links(self) -> Any: ...
        def require_member(self) -> None: ...
        async def start_relay_links(self) -> RelayLinks | None: ...


log = logging.getLogger(__name__)

RELAYS_STATE_KEY = "relays"
# A device removing itself tells its peers and relays first, for at most this long.
SELF_REMOVAL_NOTICE_S = 5.0


class MemberService:
    def __init__(self, host: MemberHost) -> None:
        self._d = host

    def find_device(self, text: str, also: Sequence[DeviceInfo] = ()) -> DeviceInfo:
        text = text.strip().lower()
        matches = [d for d in [*self._d.circle.state.devices(), *also]
                   if d.sign_key.hex().startswith(text) or fingerprint(d.sign_key) == text
                   or d.name.lower() == text]
        if not matches:
            raise errors.NotFound("unknown-device", f"no device of this circle matches {text!r}; "
                                  "see `meshctl devices`")
        if len(matches) > 1:
            raise errors.Conflict("ambiguous-device", f"{text!r} matches {len(matches)} devices; "
                                  "use more of its id")
        return matches[0]

    async def remove(self, device: str, *, force: bool = False,
                     recovery_words: list[str] | None = None,
                     distrust_since_ms: int | None = None) -> dict[str, Any]:
        """Remove a device. Its removal point (protocol/circle.md) is the newest signed head
        of its log this device holds, dated before distrust_since_ms when given: its
        entries after that point stop counting on every device."""
        if recovery_words is not None:
            return await self._settle(device, recovery_words, distrust_since_ms)
        d = self._d
        d.require_member()
        target = self.find_device(device)
        own = bytes(d.identity.signing.public)
        before = d.circle.state
        if not force:
            if target.sign_key == own:
                raise errors.Conflict("needs-force", "this is the device you are using: removing it "
                                      "locks it out of the circle; use --force if you mean it")
            if [dev.sign_key for dev in before.devices()] == [target.sign_key]:
                raise errors.Conflict("needs-force", "this is the circle's last device: removing it "
                                      "leaves no device; use --force if you mean it")
        cutoff = d.store.newest_head(target.sign_key, before_ms=distrust_since_ms) or NOTHING_COUNTS
        try:
            d.circle.remove_device(d.identity.signing, target.sign_key, d.rng, force=force,
                                   cutoff=cutoff)
        except CircleOperationError as err:
            raise errors.Conflict("refused", str(err)) from None
        if target.sign_key == own:
            # The others learn it now, before this device stops talking to them (later,
            # a member that dials it is handed the removal notice).
            with trio.move_on_after(SELF_REMOVAL_NOTICE_S):
                await d.peer_manager.tell_all({"t": "circle.records", "records": d.circle.records()})
                if d.relay_links is not None:
                    await d.relay_links.register_everywhere()
        d.circles.changed(before, "this device")
        return {"removed": target.sign_key.hex(), "fingerprint": fingerprint(target.sign_key),
                "name": target.name, "epoch": d.circle.state.epoch_number,
                "counts_up_to": cutoff.seq}

    async def _settle(self, device: str, words: list[str], distrust_since_ms: int | None) -> dict[str, Any]:
        """The recovery words remove a device, outranking what it did meanwhile (a thief that
        removed this device back): protocol/circle.md, "The recovery words outrank devices"."""
        from .protocol.recovery import RecoveryWordsError, recovery_member, words_to_seed
        from .protocol.removal import removed_devices
        d = self._d
        try:
            signer, _, _ = recovery_member(words_to_seed(words))
        except RecoveryWordsError as err:
            raise errors.InvalidArgument("bad-words", str(err)) from None
        target = self.find_device(device, also=removed_devices(d.circle))
        before = d.circle.state
        cutoff = d.store.newest_head(target.sign_key, before_ms=distrust_since_ms) or NOTHING_COUNTS
        try:
            d.circle.settle_with_recovery(signer, target.sign_key, d.rng, cutoff=cutoff)
        except CircleOperationError as err:
            raise errors.Conflict("refused", str(err)) from None
        log.warning("the recovery words removed device %r (%s)", target.name, short_key(target.sign_key))
        d.circles.changed(before, "the recovery words")
        if d.is_member and d.relay_links is None and (
                d.config.relays or d.store.get_state(RELAYS_STATE_KEY)):
            await d.start_relay_links()  # back in the circle: its relays again
        return {"removed": target.sign_key.hex(), "name": target.name, "member": d.is_member,
                "devices": d.devices(), "counts_up_to": cutoff.seq}

    async def recovery_key(self) -> dict[str, Any]:
        d = self._d
        d.require_member()
        from .protocol.recovery import generate_words, recovery_member, words_to_seed
        words = generate_words(d.rng)
        _, _, member = recovery_member(words_to_seed(words))
        before = d.circle.state
        old = before.recovery_members()
        d.circle.enrol_recovery(d.identity.signing, member, d.rng)
        d.circles.changed(before, "this device")
        return {"words": words, "replaced_previous": bool(old)}

    async def recover(self, words: list[str], relay: str, *, preview: bool = False,
                      readmit: list[str] | None = None) -> dict[str, Any]:
        from .protocol.recovery import RecoveryWordsError, words_to_seed
        d = self._d
        try:
            seed = words_to_seed(words)
        except RecoveryWordsError as err:
            raise errors.InvalidArgument("bad-words", str(err)) from None
        d.pairing.require_no_other_devices()
        remembered = d.store.get_state(RELAYS_STATE_KEY)
        known = [relay] if relay else []
        known += [*d.config.relays, *(msgpack.unpackb(remembered) if remembered else [])]
        addresses = list(dict.fromkeys(known))  # every relay it knows, the given one first
        # Recovery pulls in the relay client and the backup reader: loaded on first use, not at
        # start-up (a daemon's start to its first peer imports only what the LAN needs).
        from .relay.recovery import recover as recover_from_relays

        result = await recover_from_relays(d, seed, addresses, preview=preview, readmit=readmit)
        if not preview:
            relay_links = await d.start_relay_links()
            if relay_links is not None and relay:
                await relay_links.add(relay)
        return result

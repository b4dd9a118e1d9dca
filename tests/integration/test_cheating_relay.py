"""A relay that drops, reorders or tampers with a device's envelopes is caught by the daemon's
own detection path (meshd/relay/links.py: open_envelope, the SequenceTracker, RelayHealth),
and the circle heals: every record still arrives.

Real daemons and a real relay process patched to cheat once (tests/integration/
cheating_relay.py). The two devices reach each other only through that relay. A relay that
serves an older backup is test_relay_misbehaviour.py's. protocol/relay.md, "Sequence numbers" and
"Device behaviour".
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import trio

from meshd.api.client import Client
from tests.polling import poll_until

from .daemons import CONVERGE_S, DaemonProcess, start_all, wait_texts
from .relayed import pair_through_relay, relay_and_daemons

pytestmark = pytest.mark.slow

# Healing a dropped envelope takes a round trip through the relay (the recipient's version
# vector moves the sender's deposit cursor back).
HEAL_S = 3 * CONVERGE_S


def _misbehaviour(metrics: str) -> dict[str, float]:
    """meshd_relay_misbehaviour_total by reason, the reasons counted at least once."""
    counted = re.findall(r'^meshd_relay_misbehaviour_total\{reason="([^"]+)"\} (\S+)$', metrics, re.M)
    return {reason: float(n) for reason, n in counted if float(n)}


async def _deposited_alone(home: DaemonProcess, away_id: str, text: str) -> None:
    """Write text and wait until home sealed it for away in an envelope of its own (a
    counter of /v1/status, no event: polled)."""
    client = Client(home.socket_path)
    before = client.status()["relay_outbox"][away_id]["envelopes"]
    await home.write("chat", text)

    def deposited() -> bool:
        outbox = client.status()["relay_outbox"][away_id]
        return bool(outbox["behind"] == 0 and outbox["envelopes"] > before)

    await poll_until(deposited, CONVERGE_S, interval_s=0.05)


# (cheat, the misbehaviour it proves, whether a hole in the envelope sequence is seen)
ROUNDS = [
    # Ids in order, envelopes not: a hole, filled by the late envelope of the same answer.
    ("shuffle", None, True),
    # Ids out of order: no relay following protocol/relay.md answers so (MailboxReader).
    ("reorder", "mailbox-order", False),
    # Proof: the relay served bytes no member sealed.
    ("tamper", "bad-mac", True),
    # A hole only: the relay may be slower than another one, which is no proof of cheating.
    ("drop", None, True),
]


async def test_a_cheating_relay_is_caught_and_the_circle_heals(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    switch = tmp_path / "cheat"
    monkeypatch.setenv("MESHD_TEST_CHEAT_FILE", str(switch))
    async with relay_and_daemons(tmp_path, relay_names=("cheating-relay",), start=False,
                                 relay_command=(sys.executable, "-m",
                                                "tests.integration.cheating_relay")) as setup:
        home = setup.daemon("home", discovery=False)
        away = setup.daemon("away", use_relay=False, discovery=False)
        await start_all([home, away])
        await pair_through_relay(home, away, setup.address)
        await home.write("chat", "before")
        await wait_texts(away, "chat", {"before"})
        away_id = (await away.status())["device"]

        for kind, misbehaviour, hole in ROUNDS:
            # away is offline: what home writes waits at the relay, one envelope per record.
            # (Its health and metrics start again with the process: each round sees its own.)
            assert await away.stop() == 0
            letters = [f"{kind} {n}" for n in range(1, 5)]
            for text in letters:
                await _deposited_alone(home, away_id, text)
            switch.write_text(kind)
            await away.start()

            await wait_texts(away, "chat", set(letters), HEAL_S)
            assert switch.read_text() == "done", f"the relay did not get to {kind}"
            counted = _misbehaviour(await trio.to_thread.run_sync(Client(away.socket_path).metrics))
            (entry,) = (await away.request("GET", "/v1/relays"))["relays"]
            assert (counted.pop("hole", 0) >= 1) is hole, f"{kind}: a hole in the envelope sequence"
            if kind == "shuffle":
                assert "holes" not in entry, "the late envelope filled the hole"
            if misbehaviour is None:
                assert ("misbehaviour" not in entry, counted) == (True, {}), kind
            else:
                assert (entry["misbehaviour"]["reason"], entry["misbehaviour"]["count"]) == \
                    (misbehaviour, 1)
                assert counted == {misbehaviour: 1}

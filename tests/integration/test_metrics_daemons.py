"""Every metric family the daemon defines moves when the thing it counts happens: scraped
from two real daemons before and after a sync (and a backup at a real relay)."""

from __future__ import annotations

from pathlib import Path

import trio

from .daemons import (
    CONVERGE_S,
    DaemonProcess,
    RelayProcess,
    pair,
    start_all,
    wait_connected,
    wait_texts,
)


async def scrape(daemon: DaemonProcess) -> dict[str, float]:
    """Every sample of GET /metrics, keyed by its name and labels as printed."""
    text = (await daemon.request("GET", "/metrics", raw=True)).decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def families(samples: dict[str, float]) -> set[str]:
    return {name.split("{")[0] for name in samples}


async def test_each_metric_family_moves_as_it_should(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path)
    address = await relay.start()
    alpha = DaemonProcess(tmp_path, "alpha", relays=[address])
    beta = DaemonProcess(tmp_path, "beta")
    try:
        await start_all([alpha, beta])
        await pair(alpha, beta)
        await wait_connected(beta, 1)
        await wait_connected(alpha, 1)
        before = {d.name: await scrape(d) for d in (alpha, beta)}
        text = "counted " * 500
        async with alpha.event_stream() as events:
            await alpha.write("chat", text)
            await wait_texts(beta, "chat", {text})
            with trio.fail_after(CONVERGE_S):
                while (await events.next()).get("type") != "relay.backup":
                    pass
        after = {d.name: await scrape(d) for d in (alpha, beta)}

        def moved(daemon: str, sample: str) -> float:
            return after[daemon].get(sample, 0) - before[daemon].get(sample, 0)

        relay_label = f'relay="{address}"'
        expected = {
            # family: (a sample, daemon, how much at least) that must have moved
            "meshd_entries_total": [("meshd_entries_total", "alpha", 1), ("meshd_entries_total", "beta", 1)],
            "meshd_sync_bytes_total": [('meshd_sync_bytes_total{direction="sent"}', "alpha", len(text)),
                                       ('meshd_sync_bytes_total{direction="received"}', "beta", len(text))],
            "meshd_backup_bytes_total": [("meshd_backup_bytes_total", "alpha", len(text))],
        }
        for family, checks in expected.items():
            for sample, daemon, least in checks:
                assert moved(daemon, sample) >= least, (family, sample, daemon, before[daemon], after[daemon])
        # Gauges and the counters of things that did not happen here.
        assert after["alpha"]['meshd_peers{path="lan"}'] == 1 == after["beta"]['meshd_peers{path="lan"}']
        assert after["alpha"][f"meshd_backup_age_seconds{{{relay_label}}}"] < CONVERGE_S
        assert moved("alpha", f"meshd_backup_failures_total{{{relay_label}}}") == 0
        # The sweep at the first upload after the start measured the bytes alpha's blobs take.
        stored = (await alpha.request("GET", "/v1/relays"))["relays"][0]["backup"]["stored_bytes"]
        assert stored is not None
        assert after["alpha"][f"meshd_backup_stored_bytes{{{relay_label}}}"] == stored
        quiet = {"meshd_peers", "meshd_relay_deposits_total", "meshd_errors_total", "meshd_backup_age_seconds",
                 "meshd_backup_stored_bytes",
                 "meshd_backup_failures_total", "meshd_relay_misbehaviour_total", "meshd_internal_errors_total"}
        # From other issues (19: relay misbehaviour, 12: contained bugs): nothing of the kind here.
        for family in ("meshd_relay_misbehaviour_total", "meshd_internal_errors_total"):
            for daemon in ("alpha", "beta"):
                assert sum(moved(daemon, s) for s in after[daemon] if s.startswith(family)) == 0, (family, daemon)
        assert families(after["alpha"]) | families(after["beta"]) <= set(expected) | quiet, \
            "a new metric family: say in this test how it should move"
        assert sum(moved("alpha", s) for s in after["alpha"] if s.startswith("meshd_errors_total")) == 0
    finally:
        for process in (alpha, beta, relay):
            process.kill()

"""`python faulty.py WHAT meshd-args...`: meshd with one handler replaced by one that raises.

Containment tests start real daemon and relay processes through this: WHAT names the
handler that fails ("relay-records": the relay's answer to relay.records; "peer-heads":
a daemon's handling of circle.heads in a peer session, Gossip.on_heads in protocol/gossip.py;
"api-peers": GET /v1/peers), as a bug would.
"""

from __future__ import annotations

import sys
from typing import Any


class InjectedBug(RuntimeError):
    pass


def _raise(*args: Any, **kwargs: Any) -> Any:
    raise InjectedBug("injected by tests/integration/faulty.py")


def inject(what: str) -> None:
    if what == "relay-records":
        from meshd.protocol.relay import RecordsGet
        from meshd.relay import server

        dispatch = server.RelayServer._dispatch

        async def failing(self: Any, device: Any, request: Any) -> None:
            if isinstance(request, RecordsGet):
                _raise()
            await dispatch(self, device, request)

        server.RelayServer._dispatch = failing  # type: ignore[method-assign]
    elif what == "peer-heads":
        from meshd.protocol import gossip

        gossip.Gossip.on_heads = _raise  # type: ignore[method-assign]
    elif what == "api-peers":
        from meshd import daemon

        daemon.Daemon.peers = _raise  # type: ignore[method-assign, assignment]
    else:
        raise SystemExit(f"unknown fault {what!r}")


if __name__ == "__main__":
    inject(sys.argv[1])
    from meshd.cmd.meshd import meshd_main

    sys.argv = ["meshd", *sys.argv[2:]]
    sys.exit(meshd_main())

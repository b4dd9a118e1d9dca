"""The relay: a dumb, strict mailbox and backup store for circles (see protocol/relay.md).

Relay side: server.py runs `meshd relay`; storage.py/postgres.py are what it keeps and where.
Device side: client.py (sessions), links.py (the relay path), recovery.py, shared.py,
rendezvous.py. What the frames mean lives in meshd/protocol/relay.py and envelope.py.
"""

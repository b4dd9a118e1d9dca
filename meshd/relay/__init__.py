"""The relay: a dumb, strict mailbox and backup store for circles (see protocol/relay.md).

server.py runs `meshd relay`; storage.py is what it keeps and where; client.py is the device
side. What the frames mean lives in meshd/protocol/relay.py and meshd/protocol/envelope.py.
"""

"""meshd: a peer-to-peer sync daemon for the devices one person owns."""

__version__ = "0.1.0"

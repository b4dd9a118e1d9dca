"""Networking between devices: Noise channels, LAN discovery, the peer manager, log sync."""

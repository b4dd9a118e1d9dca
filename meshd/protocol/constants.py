"""Constants fixed by the wire spec (protocol/), apart from implementation tunables.

Changing anything in the first section changes the wire: bump PROTOCOL_VERSION and write
the change into protocol/CHANGELOG.md.
"""

from __future__ import annotations

# ---- Spec constants (the wire) -------------------------------------------------------

# Version changelog:
#   1: Noise_XX channel with 1-byte transport kinds, msgpack messages, fragmenting.
PROTOCOL_VERSION = 1

# The Noise prologue: a peer speaking another version fails the handshake at message 2.
PROLOGUE = b"meshd/1"

CHANNEL_PROTOCOL_NAME = b"Noise_XX_25519_ChaChaPoly_BLAKE2b"
PAIRING_PROTOCOL_NAME = b"Noise_XXpsk3_25519_ChaChaPoly_BLAKE2b"

# Noise: every message is at most 65535 bytes; the AEAD tag is 16 bytes.
MAX_NOISE_MESSAGE_BYTES = 65535
TAG_BYTES = 16
MAX_TRANSPORT_PLAINTEXT_BYTES = MAX_NOISE_MESSAGE_BYTES - TAG_BYTES  # 65519
LENGTH_PREFIX_BYTES = 2
MAX_FRAME_BYTES = MAX_NOISE_MESSAGE_BYTES

# Nonce 2**64-1 is reserved by the Noise spec (Rekey uses it); it is never used to send.
MAX_NONCE = 2**64 - 1

# A sender rekeys its direction after this many transport messages or this many seconds,
# whichever comes first (see protocol/channel.md "Rekey").
REKEY_AFTER_MESSAGES = 2**20
REKEY_AFTER_S = 120.0

# A largest application message after reassembly of its fragments.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

# Channel framing (protocol/channel.md). A handshake message larger than this is refused
# from its length prefix alone, before it is buffered: meshd's handshake messages carry small
# payloads (at most a few hundred bytes).
MAX_HANDSHAKE_FRAME_BYTES = 4096
# A transport message is at least a kind byte and its tag.
MIN_TRANSPORT_FRAME_BYTES = 1 + TAG_BYTES
MAX_FRAGMENT_BYTES = MAX_TRANSPORT_PLAINTEXT_BYTES - 1
MAX_CLOSE_REASON_BYTES = 256
# A receiver tolerates this many messages past the rekey bound before calling it a violation.
REKEY_SLACK_MESSAGES = 1024

# ---- Implementation constants (tunable without changing the wire) -------------------

# A peer that has not finished the handshake within this many seconds is dropped.
HANDSHAKE_TIMEOUT_S = 10.0
# Send a keepalive after this long without sending; drop a peer silent for DEAD_AFTER_S.
KEEPALIVE_S = 15.0
DEAD_AFTER_S = 45.0

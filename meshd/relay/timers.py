"""Every timer of the device side of a relay connection, named in one place.

The relay's own timers (registration, send, idle) are in meshd/relay/server.py and connection.py; the
protocol's fixed ones in meshd/protocol/relay.py.
"""

# Dialling and the Noise handshake to the relay.
CONNECT_TIMEOUT_S = 15.0
# An answer to a request (an offer waits the relay's OFFER_TTL_S on top of this).
REQUEST_TIMEOUT_S = 30.0
# How long a RelayClient's request waits out "rate-limited" refusals in all before it gives
# the refusal to its caller (whose own retry pause is longer).
RATE_LIMIT_PATIENCE_S = 60.0
# Reconnecting after a session ended: jittered, doubling from MIN to MAX.
MIN_BACKOFF_S = 0.5
MAX_BACKOFF_S = 60.0
# How long closing a pipe may wait to tell the relay (best effort: the relay also closes
# the pipe when the connection goes).
PIPE_CLOSE_TIMEOUT_S = 1.0

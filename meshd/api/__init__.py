"""The local API: routes, the HTTP server on the unix socket, the client, events, metrics."""

"""A synchronous client for the local API (meshctl, tests and apps use it).

Plain http.client over an AF_UNIX socket, one connection per call: no event loop to host,
and nothing stateful to get wrong between calls. Every daemon error arrives as ClientError
with the API's stable code (protocol/api.md); a daemon that is not running is the subclass
DaemonNotRunning, with a message that says how to start it.
"""

from __future__ import annotations

import base64
import errno
import http.client
import json
import socket
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from .clienterror import ClientError as ClientError
from .clienterror import DaemonNotRunning as DaemonNotRunning
from .clienterror import answer_error
from .importlines import ImportInterrupted as ImportInterrupted
from .importlines import import_lines

REQUEST_TIMEOUT = 30.0
# Joining waits for a person on the other device to confirm; recovery downloads a backup.
LONG_TIMEOUT = 15 * 60.0
# The server sends a heartbeat every 15 s, so a silent minute means the daemon is gone.
EVENTS_TIMEOUT = 60.0
# A batch request stays under the server's 1 MiB body limit (protocol/api.md).
BATCH_REQUEST_BYTES = 1024 * 1024 - 1024


_NOT_RUNNING = ("meshd is not running (nothing answers at {}). Start it with `systemctl start meshd` "
                "(or `systemctl --user start meshd`), or pass --socket PATH.")
_NOT_ALLOWED = ("not allowed to use {}. For the system service, add yourself to the 'meshd' group "
                "(`sudo usermod -aG meshd $USER`, then log in again).")


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: Path, timeout: float | None) -> None:
        super().__init__("meshd", timeout=timeout)
        self.socket_path = socket_path
        self.unix_socket: socket.socket | None = None

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.socket_path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        # http.client drops self.sock when a response says "connection: close", but the event
        # stream still needs the socket to hang up from another thread.
        self.unix_socket = sock


def _segment(text: str) -> str:
    return quote(text, safe="")


class Client:
    def __init__(self, socket_path: Path | str, timeout: float = REQUEST_TIMEOUT) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout

    # --- plumbing ---------------------------------------------------------------------

    def _open(self, method: str, path: str, body: Any = None,
              timeout: float | None = None) -> tuple[_UnixHTTPConnection, http.client.HTTPResponse]:
        connection = _UnixHTTPConnection(self.socket_path, self.timeout if timeout is None else timeout)
        if isinstance(body, bytes):  # already encoded: NDJSON for /v1/batch, else a raw body
            payload: bytes | None = body
            kind = "application/x-ndjson" if path.startswith("/v1/batch") else "application/octet-stream"
            headers = {"Content-Type": kind}
        else:
            payload = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if payload is not None else {}
        try:
            connection.putrequest(method, path)
            for name, value in headers.items():
                connection.putheader(name, value)
            connection.putheader("Content-Length", str(len(payload or b"")))
            connection.endheaders()
            if payload:
                try:
                    connection.send(payload)
                except (BrokenPipeError, ConnectionResetError):
                    # The server answered before reading it all (413 too large, 403): the
                    # answer is waiting to be read and says why, which a broken pipe does not.
                    pass
            response = connection.getresponse()
        except (FileNotFoundError, ConnectionRefusedError):
            connection.close()
            raise DaemonNotRunning("daemon-not-running", _NOT_RUNNING.format(self.socket_path)) from None
        except PermissionError:
            connection.close()
            raise ClientError("permission-denied", _NOT_ALLOWED.format(self.socket_path)) from None
        except TimeoutError:
            connection.close()
            raise ClientError("timeout", f"meshd did not answer within {connection.timeout:.0f} s") from None
        except OSError as err:
            connection.close()
            if err.errno == errno.ECONNRESET:
                raise ClientError("disconnected", "meshd closed the connection") from None
            raise ClientError("connection-failed", f"cannot talk to meshd at {self.socket_path}: {err}") from None
        except http.client.HTTPException as err:
            connection.close()
            raise ClientError("bad-response", f"meshd sent a malformed response: {err}") from None
        return connection, response

    def _raise_for(self, response: http.client.HTTPResponse, data: bytes) -> None:
        self._raise_for_status(response.status, data, response.reason)

    @staticmethod
    def _raise_for_status(status: int, data: bytes, reason: str = "") -> None:
        raise ClientError(*answer_error(status, data, reason), status)

    def _connect(self) -> socket.socket:
        """A connected socket to the daemon, or the ClientError _open raises for each failure."""
        connection = _UnixHTTPConnection(self.socket_path, self.timeout)
        try:
            connection.connect()
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonNotRunning("daemon-not-running", _NOT_RUNNING.format(self.socket_path)) from None
        except PermissionError:
            raise ClientError("permission-denied", _NOT_ALLOWED.format(self.socket_path)) from None
        except OSError as err:
            raise ClientError("connection-failed", f"cannot talk to meshd at {self.socket_path}: {err}") from None
        assert connection.unix_socket is not None
        return connection.unix_socket

    def request(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
        """Send one request; return the decoded JSON (or text) body; raise ClientError."""
        connection, response = self._open(method, path, body, timeout)
        try:
            data = response.read()
        except (OSError, http.client.HTTPException) as err:
            raise ClientError("disconnected", f"meshd closed the connection mid-response: {err}") from None
        finally:
            connection.close()
        if response.status >= 400:
            self._raise_for(response, data)
        if response.getheader("content-type", "").startswith("application/json"):
            return json.loads(data)
        return data.decode("utf-8", errors="replace")

    # --- the API, one method per route ------------------------------------------------

    def status(self) -> dict[str, Any]:
        return self.request("GET", "/v1/status")

    def peers(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/peers")["peers"]

    def devices(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/devices")["devices"]

    def invite(self) -> dict[str, Any]:
        return self.request("POST", "/v1/invite")

    def join(self, code: str, relay: str | None = None) -> dict[str, Any]:
        body = {"code": code} | ({"relay": relay} if relay else {})
        return self.request("POST", "/v1/join", body, timeout=LONG_TIMEOUT)

    def remove(self, device: str, *, force: bool = False,
               recovery_words: list[str] | None = None,
               distrust_since_ms: int | None = None) -> dict[str, Any]:
        args = (["force=1"] if force else []) + (
            [f"distrust_since={int(distrust_since_ms)}"] if distrust_since_ms is not None else [])
        query = "?" + "&".join(args) if args else ""
        body = {"recovery_words": recovery_words} if recovery_words is not None else None
        return self.request("POST", f"/v1/devices/{_segment(device)}/remove{query}", body)

    def recovery_key(self) -> dict[str, Any]:
        return self.request("POST", "/v1/recovery-key")

    def recover(self, words: list[str], relay: str = "", *, preview: bool = False,
                readmit: list[str] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"words": words, "relay": relay}
        if preview:
            body["preview"] = True
        if readmit is not None:
            body["readmit"] = readmit
        return self.request("POST", "/v1/recover", body, timeout=LONG_TIMEOUT)

    def relays(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/relays")["relays"]

    def add_relay(self, address: str, token: str | None = None) -> dict[str, Any]:
        body = {"address": address} if token is None else {"address": address, "token": token}
        return self.request("POST", "/v1/relays", body)

    def remove_relay(self, address: str) -> dict[str, Any]:
        return self.request("DELETE", f"/v1/relays/{_segment(address)}")

    def rename(self, name: str) -> dict[str, Any]:
        return self.request("POST", "/v1/rename", {"name": name})

    def streams(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/streams")["streams"]

    def write(self, stream: str, body: str | bytes, record_id: str | None = None) -> dict[str, Any]:
        payload: dict[str, Any] = {"body": body} if isinstance(body, str) else {
            "body_b64": base64.b64encode(body).decode("ascii")}
        if record_id is not None:
            payload["id"] = record_id
        return self.request("POST", f"/v1/streams/{_segment(stream)}/records", payload)

    def write_batch(self, records: Iterable[dict[str, Any]] | bytes, stream: str | None = None,
                    *, errors_only: bool = False) -> dict[str, Any]:
        """POST /v1/batch: records (dicts as in protocol/api.md, or NDJSON bytes) committed
        together; returns {"written", "failed", "results"} with an answer per line."""
        payload = records if isinstance(records, bytes) else b"".join(
            json.dumps(record, separators=(",", ":")).encode() + b"\n" for record in records)
        query = {k: v for k, v in (("stream", stream), ("results", "errors" if errors_only else None))
                 if v is not None}
        suffix = f"?{urlencode(query)}" if query else ""
        return self.request("POST", f"/v1/batch{suffix}", payload)

    def import_lines(self, lines: Iterable[bytes], stream: str | None = None,
                     progress: Callable[[int, int], None] | None = None,
                     request_bytes: int = BATCH_REQUEST_BYTES) -> dict[str, Any]:
        """Write NDJSON lines in as few batch requests as the body limit allows, pipelined on
        one connection (pipelined.py: the next request is on its way while the last one
        commits). Returns {"written", "failed", "errors": [answers with "line" numbered across
        all lines, in line order]}; progress(written, failed) is called after each answer.
        Raises ImportInterrupted (a ClientError) if a request was refused as a whole or the
        connection ended: its `result` says which lines were written (importlines.py)."""
        query = {k: v for k, v in (("stream", stream), ("results", "errors")) if v is not None}
        sock = self._connect()
        try:
            return import_lines(sock, f"/v1/batch?{urlencode(query)}", lines, request_bytes, progress,
                                describe_socket=str(self.socket_path), timeout=self.timeout)
        finally:
            sock.close()

    def write_raw(self, stream: str, body: bytes, record_id: str | None = None) -> dict[str, Any]:
        """Write bytes as they are (no base64): up to the full 1 MiB a record body may hold."""
        suffix = f"?{urlencode({'id': record_id})}" if record_id is not None else ""
        return self.request("POST", f"/v1/streams/{_segment(stream)}/raw{suffix}", body)

    def read(self, stream: str, after: str | None = None, limit: int | None = None) -> dict[str, Any]:
        query = {k: v for k, v in (("after", after), ("limit", limit)) if v is not None}
        suffix = f"?{urlencode(query)}" if query else ""
        return self.request("GET", f"/v1/streams/{_segment(stream)}/records{suffix}")

    def delete(self, stream: str, record_id: str) -> dict[str, Any]:
        return self.request("DELETE", f"/v1/streams/{_segment(stream)}/records/{_segment(record_id)}")

    def clear(self, stream: str) -> dict[str, Any]:
        """Delete every record of the stream, on every device (a clear entry)."""
        return self.request("POST", f"/v1/streams/{_segment(stream)}/clear")

    def metrics(self) -> str:
        return self.request("GET", "/metrics")

    def events(self, types: list[str] | None = None, *, heartbeats: bool = False) -> EventStream:
        """Connect to the event stream (GET /v1/events); iterate it for event dicts.

        The subscription is live when this returns (the daemon subscribes before it sends the
        response headers), so events published afterwards are delivered.
        """
        path = "/v1/events" + (f"?{urlencode({'types': ','.join(types)})}" if types else "")
        connection, response = self._open("GET", path, timeout=EVENTS_TIMEOUT)
        if response.status >= 400:
            try:
                self._raise_for(response, response.read())
            finally:
                connection.close()
        return EventStream(connection, response, heartbeats)


class EventStream:
    """Iterates events {"id", "type", "data"}; close() (from any thread) hangs up."""

    def __init__(self, connection: _UnixHTTPConnection, response: http.client.HTTPResponse,
                 heartbeats: bool) -> None:
        self._connection = connection
        self._response = response
        self._heartbeats = heartbeats
        self._closed = False

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        while True:
            try:
                line = self._response.readline()
            except (OSError, ValueError, http.client.HTTPException) as err:
                self._response.close()
                if self._closed:
                    raise StopIteration from None
                raise ClientError("disconnected", f"the event stream broke: {err}") from None
            if not line:
                self._response.close()
                if self._closed:
                    raise StopIteration
                # The daemon ended the stream: it stopped or restarted (it never ends one
                # otherwise), which a watcher must hear about rather than see as a normal end.
                raise DaemonNotRunning("daemon-stopped", f"meshd closed the event stream at "
                                       f"{self._connection.socket_path}: it stopped or restarted")
            event: dict[str, Any] = json.loads(line)
            if event.get("type") != "heartbeat" or self._heartbeats:
                return event

    def close(self) -> None:
        """Hang up. Safe from any thread: a reader blocked in another thread sees the end."""
        self._closed = True
        sock = self._connection.unix_socket
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            # The response's buffered reader keeps the descriptor until it is closed, by the
            # reader as it stops (closing it here could pull it from under a blocked readline).
            sock.close()
        self._connection.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

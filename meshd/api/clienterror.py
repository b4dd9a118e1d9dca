"""What a call to meshd fails with, on the client side (client.py re-exports these)."""

from __future__ import annotations

import json


class ClientError(Exception):
    def __init__(self, code: str, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return self.message


class DaemonNotRunning(ClientError):
    """Nothing is listening on the API socket."""


def answer_error(status: int, data: bytes, reason: str = "") -> tuple[str, str]:
    """(code, message) of an error answer: the API's own, or one made from the status."""
    try:
        error = json.loads(data)["error"]
        return str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        return "http-error", f"meshd answered {status} {reason}".rstrip()

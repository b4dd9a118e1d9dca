"""The route table's machinery: what a route is, and finding the one a request line names.

Theory of operation. A Route is a method, a path pattern of segments ("{name}" captures
one), a handler and its access (routes.py's table says which; routes.endpoint() enforces
it). routes.resolve() asks two things of this module, both on every request: split_target()
turns a request target into its path and query as urlsplit and parse_qs would, without
calling them for the usual target (a path and nothing else); routes_of_length() gives the
routes with as many segments as the request's path, in table order, from an index built
once per table (and again if the table object is replaced, as tests do), so a request is
matched against a few routes instead of all of them.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from .values import EventStream, Request, Response

# A read route's handler takes a ReadControl, a write route's a DaemonControl.
Handler = Callable[[Any, Request], Awaitable["Response | EventStream"]]


class Access(enum.Enum):
    READ = "R"  # answers from the daemon's state: handed a ReadOnlyView
    WRITE = "W"  # changes the circle, the logs or the device's settings: members only
    REJOIN = "WX"  # a write that is a way back into a circle: open to a removed device


@dataclass(frozen=True)
class Route:
    method: str
    pattern: tuple[str, ...]  # path segments; "{name}" captures one segment
    handler: Handler
    access: Access

    @property
    def writes(self) -> bool:
        return self.access is not Access.READ

    def match(self, segments: list[str]) -> dict[str, str] | None:
        if len(segments) != len(self.pattern):
            return None
        params = {}
        for want, got in zip(self.pattern, segments, strict=True):
            if want.startswith("{"):
                if not got:
                    return None
                params[want[1:-1]] = unquote(got, errors="strict")
            elif want != got:
                return None
        return params


# ROUTES by their number of segments: (the table the index was built from, the index).
_index: tuple[list[Route] | None, dict[int, list[Route]]] = (None, {})


def routes_of_length(routes: list[Route], count: int) -> list[Route]:
    """The routes of routes whose pattern has count segments, in their order."""
    global _index
    if _index[0] is not routes:
        index: dict[int, list[Route]] = {}
        for route in routes:
            index.setdefault(len(route.pattern), []).append(route)
        _index = (routes, index)
    return _index[1].get(count, [])


# A target urlsplit gives back whole as its path, with no query: a slash not followed by a
# second one (which would start a netloc), then visible ASCII without "?" or "#".
_PLAIN_TARGET = re.compile(r"/(?!/)[!\"$-/0->@-~]*")


def split_target(target: str) -> tuple[str, dict[str, list[str]]]:
    """(path, query) of a request target, as urlsplit and parse_qs(keep_blank_values=True,
    errors="strict") make them; raises what they raise (ValueError, UnicodeDecodeError)."""
    if _PLAIN_TARGET.fullmatch(target):
        return target, {}
    parts = urlsplit(target)
    return parts.path, parse_qs(parts.query, keep_blank_values=True, errors="strict")

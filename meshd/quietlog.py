"""Quiet, bounded logging of hostile or repetitive input.

A peer that misbehaves once is worth a WARNING; the same misbehaviour a thousand times a
second must not flood the journal. QuietLogger logs the first occurrence of each key at
WARNING (or INFO) and repeats at DEBUG, remembering a bounded number of keys (python-zeroconf's
QuietLogger does the same for malformed packets).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Hashable

MAX_REMEMBERED_KEYS = 512


class QuietLogger:
    def __init__(self, logger: logging.Logger, max_keys: int = MAX_REMEMBERED_KEYS) -> None:
        self._logger = logger
        self._seen: OrderedDict[Hashable, None] = OrderedDict()
        self._max_keys = max_keys

    def warning(self, key: Hashable, msg: str, *args: object) -> None:
        self._log(logging.WARNING, key, msg, *args)

    def info(self, key: Hashable, msg: str, *args: object) -> None:
        self._log(logging.INFO, key, msg, *args)

    def _log(self, level: int, key: Hashable, msg: str, *args: object) -> None:
        if key in self._seen:
            self._seen.move_to_end(key)
            self._logger.debug(msg, *args)
            return
        self._seen[key] = None
        if len(self._seen) > self._max_keys:
            self._seen.popitem(last=False)
        self._logger.log(level, msg, *args)

"""A tiny Prometheus registry: counters and gauges with labels, rendered as text format 0.0.4.

The daemon updates metrics synchronously from wherever the thing happens (a peer comes up,
an entry is committed); `GET /metrics` renders a snapshot. There is no client library
dependency: the text format is a few lines (HELP, TYPE, then one sample per label set).

MeshdMetrics is the registry the daemon uses; its attributes are the metric families the
local API documents in protocol/api.md. Label values known in advance are created at zero so
a dashboard sees a series before the first event (Prometheus cannot rate() a missing series).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = (),
                 initial: Iterable[dict[str, str]] = ()) -> None:
        if not name.replace("_", "a").isalnum() or name[0].isdigit():
            raise ValueError(f"invalid metric name {name!r}")
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._values: dict[tuple[str, ...], float] = {}
        if not self.labelnames:
            self._values[()] = 0.0
        for labels in initial:
            self._values.setdefault(self._key(labels), 0.0)

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(labels)}")
        return tuple(str(labels[name]) for name in self.labelnames)

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        for key, value in sorted(self._values.items()):
            if key:
                labels = ",".join(f'{name}="{_escape_label_value(v)}"'
                                  for name, v in zip(self.labelnames, key, strict=True))
                lines.append(f"{self.name}{{{labels}}} {_format_value(value)}")
            else:
                lines.append(f"{self.name} {_format_value(value)}")
        return lines


class Counter(_Metric):
    kind = "counter"

    def inc(self, amount: float = 1, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount


class Gauge(_Metric):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        self._values[self._key(labels)] = float(value)

    def inc(self, amount: float = 1, **labels: str) -> None:
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount

    def dec(self, amount: float = 1, **labels: str) -> None:
        self.inc(-amount, **labels)


class Registry:
    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        # Called before each render: gauges computed at scrape time (e.g. an age).
        self.collectors: list[Callable[[], None]] = []

    def _add(self, metric: _Metric) -> None:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} registered twice")
        self._metrics[metric.name] = metric

    def counter(self, name: str, help: str, labelnames: Iterable[str] = (),
                initial: Iterable[dict[str, str]] = ()) -> Counter:
        metric = Counter(name, help, labelnames, initial)
        self._add(metric)
        return metric

    def gauge(self, name: str, help: str, labelnames: Iterable[str] = (),
              initial: Iterable[dict[str, str]] = ()) -> Gauge:
        metric = Gauge(name, help, labelnames, initial)
        self._add(metric)
        return metric

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4), families in name order."""
        for collect in self.collectors:
            collect()
        lines: list[str] = []
        for name in sorted(self._metrics):
            lines.extend(self._metrics[name].render())
        return "\n".join(lines) + "\n"


def sync_payload_bytes(message: dict[str, object]) -> int:
    """Entry bytes (headers and bodies) a log.entries message carries; 0 for anything else.
    Safe on an unchecked message: what is not bytes counts nothing."""
    if message.get("t") != "log.entries":
        return 0
    total = 0
    for column in (message.get("headers"), message.get("bodies")):
        if isinstance(column, list):
            total += sum(len(item) for item in column if isinstance(item, bytes))
    return total


PEER_PATHS = ("lan", "relay")
SYNC_DIRECTIONS = ("sent", "received")
DEPOSIT_RESULTS = ("ok", "failed")
MISBEHAVIOUR_REASONS = ("rollback", "hole")


BUG_WHERE = ("peer", "relay-session", "api", "connection")

# Process-wide (containment.report_bug counts into it): every MeshdMetrics registry shows it.
INTERNAL_ERRORS = Counter(
    "meshd_internal_errors_total",
    "Unexpected exceptions (bugs) contained to one connection or request, by where.",
    ["where"], [{"where": w} for w in BUG_WHERE])


class MeshdMetrics(Registry):
    """The metric families meshd exports (documented in protocol/api.md)."""

    def __init__(self) -> None:
        super().__init__()
        self.peers = self.gauge(
            "meshd_peers", "Circle devices currently connected, by path (lan or relay).",
            ["path"], [{"path": p} for p in PEER_PATHS])
        self.entries = self.counter(
            "meshd_entries_total", "Log entries committed to the local store (own and synced).")
        self.sync_bytes = self.counter(
            "meshd_sync_bytes_total", "Log sync payload bytes exchanged with peers.",
            ["direction"], [{"direction": d} for d in SYNC_DIRECTIONS])
        self.relay_deposits = self.counter(
            "meshd_relay_deposits_total", "Envelopes deposited at a relay, by result.",
            ["result"], [{"result": r} for r in DEPOSIT_RESULTS])
        self.relay_misbehaviour = self.counter(
            "meshd_relay_misbehaviour_total", "Relay misbehaviour seen (e.g. rollback, "
            "bad-mac, bad-records) and sequence holes opened (hole), by reason.",
            ["reason"], [{"reason": r} for r in MISBEHAVIOUR_REASONS])
        self.backup_failures = self.counter(
            "meshd_backup_failures_total", "Backup uploads that failed, by relay.", ["relay"])
        self.backup_age = self.gauge(
            "meshd_backup_age_seconds", "Seconds since the backup at a relay was last confirmed current.",
            ["relay"])
        self.backup_stored = self.gauge(
            "meshd_backup_stored_bytes", "Bytes this device's backup blobs take at a relay, as its "
            "last complete sweep listed them.", ["relay"])
        self.backup_bytes = self.counter(
            "meshd_backup_bytes_total", "Backup segment bytes uploaded to relays.")
        self.errors = self.counter(
            "meshd_errors_total", "Errors by kind (e.g. protocol, store, api, relay).", ["kind"])
        self.internal_errors = INTERNAL_ERRORS
        self._add(INTERNAL_ERRORS)

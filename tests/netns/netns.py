"""A LAN of network namespaces for multi-host tests (root only), after wireguard's netns.sh.

Topology for Network(devices=3); every name carries a random run id, so parallel runs
never collide, and nothing is created in the caller's own namespace:

    ┌──────────────────────── <prefix>-<run>-br ────────────────────────┐
    │                       br0 (mcast_snooping 0)                       │
    │        ┌──────────────────┼──────────────────┐                     │
    │        v1                 v2                 v3    <- link_down(n) │
    └────────┼──────────────────┼──────────────────┼─────────────────────┘
             │ veth             │ veth             │ veth
    ┌────────┼────────┐ ┌───────┼────────┐ ┌───────┼────────┐
    │      eth0       │ │      eth0      │ │      eth0      │
    │  10.77.0.1/24   │ │  10.77.0.2/24  │ │  10.77.0.3/24  │  lo up in each;
    │ <prefix>-<run>-1│ │<prefix>-<run>-2│ │<prefix>-<run>-3│  224.0.0.0/4 -> eth0
    └─────────────────┘ └────────────────┘ └────────────────┘

Multicast (mDNS) crosses br0 because IGMP snooping is off: with snooping on and no IGMP
querier the bridge may stop flooding 224.0.0.251 to ports it has not seen joins on.

Impairments (impair(n, ...)), since this kernel has no netem qdisc and no tc classifiers
or actions, are built from what it has, nftables and the htb qdisc:
- loss: an nft table (bridge family, forward hook) in the bridge namespace drops a random
  share of the packets entering and of those leaving port vN
  (`numgen random mod 1000 < loss*1000 drop`), so each direction loses `loss`
  independently, on the wire: the device's own stack sees no error, as with real loss.
- reorder: a random half of the packets in each direction is steered (nft
  `meta priority set`, which htb honours as a class id) into a slow htb class, the other
  half into a fast one; packets taking the fast path overtake those queued on the slow
  one. Unlike netem's fixed delay, this reorders only when the slow class has a queue,
  i.e. under back-to-back traffic (a TCP burst), which is when reordering matters.
  Egress is shaped on eth0 in the device namespace; ingress on vN in the bridge namespace
  (nft bridge family, forward hook).

Everything is removed on close() (context manager exit, or atexit for a crashed test):
processes started through the harness are ended, then the namespaces are deleted, which
deletes their links.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import subprocess
import weakref
from collections.abc import Sequence
from typing import Any

SUBNET = "10.77.0"
LINK_LOCAL = "fe80::77:"  # Network(ipv6_only=True): device n is fe80::77:n on its eth0
DEVICE_INTERFACE = "eth0"
BRIDGE = "br0"
IMPAIR_TABLE = "meshd_impair"
REORDER_SLOW_RATE = "2mbit"

_live: weakref.WeakSet[Network] = weakref.WeakSet()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _nft(namespace: str, ruleset: str) -> None:
    subprocess.run(["ip", "netns", "exec", namespace, "nft", "-f", "-"], input=ruleset,
                   check=True, capture_output=True, text=True)


def available() -> tuple[bool, str]:
    """Whether namespaces can be made here; the reason when not (tests skip with it)."""
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    if shutil.which("ip") is None:
        return False, "iproute2 'ip' not found"
    probe = f"meshd-probe-{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as err:
        return False, f"cannot create a network namespace: {err.stderr.strip()}"
    try:
        _ip("-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
        _ip("-n", probe, "link", "add", "b0", "type", "bridge")
    except subprocess.CalledProcessError as err:
        return False, f"veth or bridge links unavailable: {err.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return True, ""


def impair_available() -> tuple[bool, str]:
    if shutil.which("nft") is None:
        return False, "nft (package nftables) not installed: loss cannot be applied"
    if shutil.which("tc") is None:
        return False, "tc (iproute2) not found: reordering cannot be applied"
    return True, ""


def run_in(namespace: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command in a namespace and wait for it (text output captured, check=True)."""
    kwargs = {"check": True, "capture_output": True, "text": True, **kwargs}
    return subprocess.run(["ip", "netns", "exec", namespace, *argv], **kwargs)


def popen_in(namespace: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """Start a command in a namespace. Prefer Network.popen, which also ends it on close."""
    return subprocess.Popen(["ip", "netns", "exec", namespace, *argv], **kwargs)


class Network:
    """The topology above. Device numbers run 1..devices."""

    def __init__(self, devices: int = 3, prefix: str = "meshd", *, ipv6_only: bool = False) -> None:
        if not 1 <= devices <= 250:
            raise ValueError("1..250 devices")
        self.devices = devices
        self.ipv6_only = ipv6_only
        self.run_id = secrets.token_hex(3)
        self.bridge_ns = f"{prefix}-{self.run_id}-br"
        self._namespaces: list[str] = []
        self._processes: list[subprocess.Popen[Any]] = []
        self._closed = False
        _live.add(self)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # ---- names ----------------------------------------------------------------------------

    def ns(self, n: int) -> str:
        self._check(n)
        return f"{self.bridge_ns[:-3]}-{n}"

    def address(self, n: int) -> str:
        """Device n's address: IPv4, or with ipv6_only its link-local IPv6 one (no scope)."""
        self._check(n)
        return f"{LINK_LOCAL}{n:x}" if self.ipv6_only else f"{SUBNET}.{n}"

    def bridge_port(self, n: int) -> str:
        self._check(n)
        return f"v{n}"

    def _check(self, n: int) -> None:
        if not 1 <= n <= self.devices:
            raise ValueError(f"no device {n} (1..{self.devices})")

    # ---- building and tearing down --------------------------------------------------------

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        self._add_namespace(self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "add", BRIDGE, "type", "bridge", "mcast_snooping", "0")
        _ip("-n", self.bridge_ns, "link", "set", BRIDGE, "up")
        for n in range(1, self.devices + 1):
            ns, port = self.ns(n), self.bridge_port(n)
            self._add_namespace(ns)
            _ip("-n", self.bridge_ns, "link", "add", port, "type", "veth",
                "peer", "name", DEVICE_INTERFACE, "netns", ns)
            _ip("-n", self.bridge_ns, "link", "set", port, "master", BRIDGE, "up")
            if self.ipv6_only:
                # No IPv4 at all; a fixed link-local address (no kernel-made one), usable at
                # once (nodad). Link-local multicast (ff02::fb) needs no route.
                _ip("-n", ns, "link", "set", DEVICE_INTERFACE, "addrgenmode", "none")
                _ip("-n", ns, "addr", "add", f"{self.address(n)}/64", "dev", DEVICE_INTERFACE, "nodad")
                _ip("-n", ns, "link", "set", DEVICE_INTERFACE, "up")
                continue
            _ip("-n", ns, "addr", "add", f"{self.address(n)}/24", "dev", DEVICE_INTERFACE)
            _ip("-n", ns, "link", "set", DEVICE_INTERFACE, "up")
            # Multicast has no default route to follow in a namespace without one.
            _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", DEVICE_INTERFACE)

    def close(self) -> None:
        """End our processes, then delete every namespace (their links go with them)."""
        if self._closed:
            return
        self._closed = True
        for process in self._processes:
            _end(process)
        for ns in reversed(self._namespaces):
            # Anything still inside was started through this harness (run_in's children).
            listed = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in listed.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._namespaces.clear()
        _live.discard(self)

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- running things -------------------------------------------------------------------

    def run(self, n: int, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return run_in(self.ns(n), argv, **kwargs)

    def popen(self, n: int, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        process = popen_in(self.ns(n), argv, **kwargs)
        self._processes.append(process)
        return process

    # ---- failures -------------------------------------------------------------------------

    def link_down(self, n: int) -> None:
        """Cut device n off the bridge (its eth0 sees the carrier drop, keeps its address)."""
        _ip("-n", self.bridge_ns, "link", "set", self.bridge_port(n), "down")

    def link_up(self, n: int) -> None:
        _ip("-n", self.bridge_ns, "link", "set", self.bridge_port(n), "up")

    def impair(self, n: int, loss: float = 0.2, reorder: bool = True) -> None:
        """Drop `loss` of device n's packets in each direction; optionally reorder them."""
        if not 0.0 <= loss <= 1.0:
            raise ValueError("loss is a fraction 0..1")
        self.clear_impairment(n)
        port, per_mille = self.bridge_port(n), round(loss * 1000)
        steer = "meta priority set numgen random mod 2 map { 0 : 1:10, 1 : 1:20 }"
        # Loss on the wire (the bridge), not in the device's own stack: a local nft drop
        # would fail the sender's sendto() with EPERM, which real loss never does.
        # 100% loss: a silent partition that keeps the link up (nft's numgen tops out at 999).
        chance = "" if per_mille >= 1000 else f"numgen random mod 1000 < {per_mille} "
        rules = [f'iifname "{port}" {chance}drop', f'oifname "{port}" {chance}drop']
        if reorder:
            rules.append(f'oifname "{port}" {steer}')
            _reorder_qdisc(self.bridge_ns, port)
            _reorder_qdisc(self.ns(n), DEVICE_INTERFACE)
            _nft(self.ns(n), f"""table inet {IMPAIR_TABLE} {{
  chain egress {{
    type filter hook output priority 0; policy accept;
    oifname "{DEVICE_INTERFACE}" {steer}
  }}
}}""")
        body = "\n    ".join(rules)
        _nft(self.bridge_ns, f"""table bridge {IMPAIR_TABLE}_{n} {{
  chain wire {{
    type filter hook forward priority 0; policy accept;
    {body}
  }}
}}""")

    def clear_impairment(self, n: int) -> None:
        for ns, family, table in ((self.ns(n), "inet", IMPAIR_TABLE),
                                  (self.bridge_ns, "bridge", f"{IMPAIR_TABLE}_{n}")):
            subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "table", family, table],
                           capture_output=True)
        for ns, dev in ((self.ns(n), DEVICE_INTERFACE), (self.bridge_ns, self.bridge_port(n))):
            subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"],
                           capture_output=True)


def _reorder_qdisc(namespace: str, dev: str) -> None:
    """htb with a slow class 1:10 and a fast class 1:20 (nft picks one per packet)."""
    tc = ["tc", "-n", namespace]
    subprocess.run([*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb",
                    "default", "20"], check=True, capture_output=True)
    for classid, rate, burst in (("1:10", REORDER_SLOW_RATE, "1600"), ("1:20", "10gbit", "64k")):
        subprocess.run([*tc, "class", "add", "dev", dev, "parent", "1:", "classid", classid,
                        "htb", "rate", rate, "burst", burst, "cburst", burst,
                        "quantum", "1514"], check=True, capture_output=True)


def _end(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            stream.close()


@atexit.register
def _close_all() -> None:
    for network in list(_live):
        network.close()

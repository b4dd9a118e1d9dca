"""Negative dependency test: what each layer must not import, and why (tailscale deptest)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "meshd"

FORBIDDEN_IN_PROTOCOL = {
    "trio": "meshd/protocol/ is sans-IO: the shell owns concurrency",
    "socket": "meshd/protocol/ is sans-IO: bytes in, bytes out",
    "zeroconf": "only meshd/discovery.py talks to zeroconf",
    "logging": "meshd/protocol/ raises or returns events; the shell decides what to log",
    "time": "time is passed in, so tests control it",
    "sqlite3": "storage belongs to meshd/store.py",
    "random": "randomness is passed in (rng), so tests are deterministic",
    "os": "no environment, files or os.urandom in the core",
    "asyncio": "meshd/protocol/ is sans-IO",
    "threading": "meshd/protocol/ is sans-IO",
}
ONLY_IN = {
    "nacl": ("meshd/protocol/crypto.py", "crypto.py is the one wrapper over libsodium"),
    "cryptography": ("meshd/protocol/crypto.py", "crypto.py is the one wrapper over OpenSSL"),
    "zeroconf": ("meshd/discovery.py", "zeroconf runs its own threads: quarantine it"),
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def python_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.py"))


@pytest.mark.parametrize(
    "path", python_files(PACKAGE / "protocol"), ids=lambda p: p.name
)
def test_the_sans_io_core_imports_no_io(path: Path) -> None:
    bad = imported_modules(path) & FORBIDDEN_IN_PROTOCOL.keys()
    assert not bad, {name: FORBIDDEN_IN_PROTOCOL[name] for name in bad}


@pytest.mark.parametrize("path", python_files(PACKAGE), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_quarantined_libraries_stay_in_their_module(path: Path) -> None:
    relative = f"meshd/{path.relative_to(PACKAGE)}"
    for name in imported_modules(path) & ONLY_IN.keys():
        home, reason = ONLY_IN[name]
        assert relative == home, f"{relative} imports {name}: {reason}"

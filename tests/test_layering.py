"""Negative dependency test: what each layer must not import, and why (tailscale deptest)."""

from __future__ import annotations

import ast
import importlib
import statistics
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "meshd"

FORBIDDEN_IN_PROTOCOL = {
    "trio": "meshd/protocol/ is sans-IO: the shell owns concurrency",
    "socket": "meshd/protocol/ is sans-IO: bytes in, bytes out",
    "zeroconf": "only meshd/net/discovery.py talks to zeroconf",
    "logging": "meshd/protocol/ raises or returns events; the shell decides what to log",
    "time": "time is passed in, so tests control it",
    "sqlite3": "storage belongs to meshd/store/db.py",
    "random": "randomness is passed in (rng), so tests are deterministic",
    "os": "no environment, files or os.urandom in the core",
    "asyncio": "meshd/protocol/ is sans-IO",
    "threading": "meshd/protocol/ is sans-IO",
}
ONLY_IN = {
    "nacl": ("meshd/protocol/crypto.py", "crypto.py is the one wrapper over libsodium"),
    "cryptography": ("meshd/protocol/crypto.py", "crypto.py is the one wrapper over OpenSSL"),
    "zeroconf": ("meshd/net/discovery.py", "zeroconf runs its own threads: quarantine it"),
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


# -- the import graph -------------------------------------------------------------------------
#
# Every import statement in a module counts as a dependency: module level, inside a function
# (a lazy import still needs the other module to work, and hides a cycle rather than breaking
# it) and under `if TYPE_CHECKING:` (a type-only import is still a design dependency: the
# importer reaches into the other module's objects). Relative imports are resolved against
# the importing module's package, so `from ..transport import X` inside protocol/ is seen as
# meshd.net.transport. `from . import x` resolves to the submodule meshd.<pkg>.x when it exists.
# Package __init__ modules are not nodes: importing meshd.protocol.foo runs meshd/protocol/
# __init__.py, but the dependency that matters is on foo.


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in python_files(PACKAGE)}


def _known(name: str) -> str | None:
    """The longest prefix of a dotted name that is a meshd module (None outside meshd)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def absolute_imports(path: Path, source: str | None = None) -> set[str]:
    """Every module path imports, anywhere in it, relative imports made absolute (the
    targets may lie outside meshd: `trio`, `meshd.net.transport`, `socket`...). `source`
    stands in for the file's text (the checker's own test)."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    text = path.read_text() if source is None else source
    targets: set[str] = set()
    for node in ast.walk(ast.parse(text, filename=str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                assert base, f"{module}: relative import beyond the top-level package"
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            for alias in node.names:
                submodule = f"{origin}.{alias.name}"
                targets.add(submodule if submodule in MODULES else origin)
    return targets


def meshd_dependencies(path: Path, source: str | None = None) -> set[str]:
    deps = {_known(target) for target in absolute_imports(path, source)}
    return {dep for dep in deps if dep and MODULES[dep].name != "__init__.py"} - {module_name(path)}


def import_cycles() -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    graph = {module: meshd_dependencies(path) for module, path in MODULES.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in sorted(graph[node]):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


@pytest.mark.parametrize(
    "path", python_files(PACKAGE / "protocol"), ids=lambda p: p.name
)
def test_the_sans_io_core_depends_only_on_itself(path: Path) -> None:
    """Relative and absolute imports alike: protocol/ never reaches into the shell (which
    would bring trio, sockets or sqlite into the core indirectly)."""
    outside = {dep for dep in meshd_dependencies(path) if not dep.startswith("meshd.protocol.")}
    assert not outside, f"{path.name} imports shell modules {sorted(outside)}"
    bad = {target.split(".")[0] for target in absolute_imports(path)} & FORBIDDEN_IN_PROTOCOL.keys()
    assert not bad, {name: FORBIDDEN_IN_PROTOCOL[name] for name in bad}


def test_no_import_cycles_among_meshd_modules() -> None:
    assert import_cycles() == []


def imported_names(path: Path) -> list[tuple[str, str, int]]:
    """(meshd module, name, line) for every `from <meshd module> import name` in path,
    anywhere in it (lazy and TYPE_CHECKING imports too)."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            origin = ".".join(base + ([node.module] if node.module else []))
        else:
            origin = node.module or ""
        if origin in MODULES:
            found += [(origin, alias.name, node.lineno) for alias in node.names
                      if alias.name != "*" and f"{origin}.{alias.name}" not in MODULES]
    return found


def test_every_name_imported_from_a_meshd_module_exists() -> None:
    """A module split or a merge that moves a name breaks its importers; a lazy import only
    fails when its function first runs (a relay drain once failed so, in a daemon's log)."""
    missing = []
    for path in MODULES.values():
        for origin, name, line in imported_names(path):
            if not hasattr(importlib.import_module(origin), name):
                missing.append(f"{path.relative_to(PACKAGE.parent)}:{line} {origin}.{name}")
    assert not missing, missing


def test_relative_imports_are_resolved() -> None:
    """The checker itself: relative imports from protocol/ resolve to the modules they name,
    inside a function too, so a shell import from the core cannot hide behind dots."""
    path = PACKAGE / "protocol" / "channel.py"
    source = ("from . import noise\nfrom ..store import db\n"
              "def f():\n    from ..net.transport import first_leaf\n")
    assert meshd_dependencies(path, source) == {"meshd.net.transport", "meshd.protocol.noise", "meshd.store.db"}


# -- module sizes -------------------------------------------------------------------------------

MAX_LINES = 400


def module_sizes() -> dict[str, int]:
    return {module: len(path.read_text().splitlines()) for module, path in MODULES.items()}


def test_no_module_over_400_lines() -> None:
    sizes = module_sizes()
    ordered = sorted(sizes.values())
    median = statistics.median(ordered)
    print(f"{len(sizes)} modules, max {max(ordered)} lines, median {median}")
    too_big = {m: n for m, n in sizes.items() if n > MAX_LINES}
    assert not too_big, f"modules over {MAX_LINES} lines: {too_big}"

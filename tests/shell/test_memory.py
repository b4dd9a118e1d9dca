"""meshd/memory.py: the allocator settings that keep RSS following what is held (issue 20).

Each case runs in a fresh interpreter: malloc's arenas are per process and cannot be undone.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from meshd import memory
from meshd.cmd import meshd as meshd_cmd

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or memory._glibc() is None,
                                reason="glibc malloc only")

ARENAS = """
import ctypes, ctypes.util, re, threading
from meshd import memory
if CONFIGURE:
    assert memory.configure()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
barrier = threading.Barrier(7)
held = []
def work():
    held.append([bytes(4000) for _ in range(100)])  # malloc (not pymalloc) sized
    barrier.wait()  # all six alive at once
threads = [threading.Thread(target=work) for _ in range(6)]
for t in threads:
    t.start()
barrier.wait()
for t in threads:
    t.join()
libc.open_memstream.restype = ctypes.c_void_p
buf, size = ctypes.c_char_p(), ctypes.c_size_t()
stream = ctypes.c_void_p(libc.open_memstream(ctypes.byref(buf), ctypes.byref(size)))
libc.malloc_info(0, stream)
libc.fclose(stream)
print(len(re.findall(rb"<heap nr=", buf.value)))
"""

TRIM = """
import threading
from meshd import memory
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
memory.configure()
keep = []
def work():
    chunks = [bytearray(3000) for _ in range(20000)]  # about 60 MB in the heap
    keep.extend(chunks[::50])  # one live chunk every 150 KB pins the freed pages in place
threads = threading.Thread(target=work)
threads.start()
threads.join()
before = rss_mb()
released = memory.trim()
print(before, released, rss_mb())
"""


def run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            check=True, timeout=60, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    return result.stdout.strip()


def test_worker_threads_share_a_bounded_number_of_arenas() -> None:
    # Without the limit each of the six threads gets its own arena (seven heaps): freed
    # memory then stays resident in every one of them.
    assert int(run(ARENAS.replace("CONFIGURE", "False"))) == 7  # the failure this prevents
    assert int(run(ARENAS.replace("CONFIGURE", "True"))) <= memory.ARENA_MAX


def test_trim_returns_freed_pages_pinned_inside_the_heap() -> None:
    before, released, after = run(TRIM).split()
    assert released == "True"
    assert float(after) < float(before) - 30  # of about 58 MB freed, most goes back


def test_the_meshd_command_bounds_memory_before_starting(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(memory, "configure", lambda: calls.append("configure") or True)
    monkeypatch.setattr(memory, "start_trimming", lambda: calls.append("trim"))
    monkeypatch.setattr(meshd_cmd, "_run_daemon", lambda args: calls.append("run") or 0)
    assert meshd_cmd.meshd_main(["run"]) == 0
    assert calls == ["configure", "trim", "run"]


def test_the_trimmer_thread_starts_once_and_stops() -> None:
    memory.start_trimming(3600)
    first = memory._trimmer
    memory.start_trimming(3600)
    assert first is not None and memory._trimmer is first and first.is_alive()
    memory.stop_trimming()
    assert not first.is_alive() and memory._trimmer is None

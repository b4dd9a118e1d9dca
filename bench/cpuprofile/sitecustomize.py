"""CPU profiling of any `meshd run` process started with this folder on PYTHONPATH (bench only).

Set MESHD_PROFILE_DIR to a folder: each `meshd run` process profiles its main thread (the
trio thread, where the daemon's own Python runs; SQLite commits and large seals run in
worker threads and are not in it) with cProfile from start, and writes <dir>/<pid>.prof (cumulative) and <dir>/<pid>.argv
every MESHD_PROFILE_DUMP_S seconds (default 30: the soak kills its daemons at the end) and
at a graceful stop. The dump runs in a SIGUSR2 handler on the main thread (the profiler is
per thread), which a timer thread signals. Used by bench/soak.py --profile; bench/cpuprofile/
report.py prints the functions by own time and by cumulative time, per device.
cProfile slows the process (calls cost more): use it for where the time goes and for call
counts, not for CPU figures.
MESHD_PROFILE_TIMER=thread times the trio thread's own CPU (time.thread_time) instead of wall
time: on a busy machine wall time charges a call for the time the thread was preempted or
waited for the GIL (a socket send that wakes the receiver, a lock release that hands the GIL
to a worker), which makes those calls look expensive. Slower still (a Python timer).
"""

from __future__ import annotations

import atexit
import cProfile
import os
import signal
import sys
import threading
import time

_DIR = os.environ.get("MESHD_PROFILE_DIR")


def _is_meshd_run() -> bool:
    with open("/proc/self/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    return b"run" in argv and b"meshd" in argv


def _start(directory: str) -> None:
    if os.environ.get("MESHD_PROFILE_TIMER") == "thread":
        profile = cProfile.Profile(time.thread_time_ns, 1e-9)
    else:
        profile = cProfile.Profile()
    every = float(os.environ.get("MESHD_PROFILE_DUMP_S", "30"))

    def dump(*_: object) -> None:
        profile.disable()
        pid = os.getpid()
        profile.dump_stats(os.path.join(directory, f"{pid}.prof"))
        with open(os.path.join(directory, f"{pid}.argv"), "w") as f:
            f.write(" ".join(sys.argv))
        profile.enable()

    def tick() -> None:
        while True:
            time.sleep(every)
            os.kill(os.getpid(), signal.SIGUSR2)

    signal.signal(signal.SIGUSR2, dump)
    atexit.register(dump)
    threading.Thread(target=tick, name="profile-dump", daemon=True).start()
    profile.enable()


if _DIR and _is_meshd_run():
    _start(_DIR)

"""Per-task step counts and CPU of any `meshd run` process started with this folder on PYTHONPATH (bench only).

Set MESHD_TASKSTEPS_DIR to a folder: each `meshd run` process adds a trio Instrument that
counts, per task name, the steps (before_task_step), the wake-ups (task_scheduled) and the
trio thread's CPU inside the steps (time.thread_time_ns around each step), and writes
<dir>/<pid>.json every MESHD_TASKSTEPS_DUMP_S seconds (default 10) with the thread's total
CPU, so the run loop's own share (I/O wait bookkeeping, scheduling) is total - sum of steps.
Used to find per-write fixed costs (issue 20): bench/tasksteps/report.py divides two dumps'
difference by the writes of the window. Run a soak with it:
  MESHD_TASKSTEPS_DIR=DIR PYTHONPATH=bench/tasksteps:. .venv/bin/python bench/soak.py --minutes 3 --rate 20
The instrument costs two clock reads per task step: for counts and shares, not CPU figures.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import defaultdict

_DIR = os.environ.get("MESHD_TASKSTEPS_DIR")


def _is_meshd_run() -> bool:
    with open("/proc/self/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    return b"run" in argv and b"meshd" in argv


def _start(directory: str) -> None:
    import trio

    steps: dict[str, int] = defaultdict(int)
    wakes: dict[str, int] = defaultdict(int)
    cpu: dict[str, int] = defaultdict(int)
    started = [0]
    state = {"thread_ns": 0}

    class Counter(trio.abc.Instrument):
        def before_task_step(self, task: object) -> None:
            started[0] = time.thread_time_ns()

        def after_task_step(self, task: object) -> None:
            now = time.thread_time_ns()
            name = task.name  # type: ignore[attr-defined]
            steps[name] += 1
            cpu[name] += now - started[0]
            state["thread_ns"] = now

        def task_scheduled(self, task: object) -> None:
            wakes[task.name] += 1  # type: ignore[attr-defined]

    every = float(os.environ.get("MESHD_TASKSTEPS_DUMP_S", "10"))
    path = os.path.join(directory, f"{os.getpid()}.json")

    def tick() -> None:
        while True:
            time.sleep(every)
            data = {"argv": sys.argv, "time": time.time(), "thread_ns": state["thread_ns"],
                    "steps": dict(steps), "wakes": dict(wakes), "cpu": dict(cpu)}
            with open(path + ".tmp", "w") as f:
                json.dump(data, f)
            os.replace(path + ".tmp", path)
            with open(path + f".{int(time.time())}", "w") as f:
                json.dump(data, f)

    real_run = trio.run

    def run(*args: object, **kwargs: object) -> object:
        kwargs["instruments"] = [*kwargs.get("instruments", ()), Counter()]  # type: ignore[misc]
        return real_run(*args, **kwargs)  # type: ignore[arg-type]

    trio.run = run  # type: ignore[assignment]
    threading.Thread(target=tick, name="tasksteps-dump", daemon=True).start()


if _DIR and _is_meshd_run():
    _start(_DIR)

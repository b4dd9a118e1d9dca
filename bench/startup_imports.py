"""What start-up costs before any networking: the imports `meshd run` does before READY=1.

Spawns `python -c "import meshd.cmd.meshd, meshd.daemon, meshd.net.discovery"` as the units
run it (PYTHONOPTIMIZE=2, bytecode compiled first into a private PYTHONPYCACHEPREFIX), for
each tree given, alternating, and prints the wall and CPU time (user + system) of each and
the number of modules loaded. Compare trees in one run: `git archive main | tar -x -C DIR`.

Run: .venv/bin/python bench/startup_imports.py [--runs N] TREE [TREE...]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

CODE = "import meshd.cmd.meshd, meshd.daemon, meshd.net.discovery"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="+", help="source trees (each with a meshd/ package)")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        envs = {}
        for index, tree in enumerate(args.trees):
            env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), PYTHONOPTIMIZE="2",
                       PYTHONPYCACHEPREFIX=os.path.join(cache, str(index)))
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            envs[tree] = env
            subprocess.run([sys.executable, "-c", CODE], env=env, cwd=cache, check=True)  # compile
        wall: dict[str, list[float]] = {tree: [] for tree in args.trees}
        cpu: dict[str, list[float]] = {tree: [] for tree in args.trees}
        for _ in range(args.runs):
            for tree in args.trees:
                before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
                subprocess.run([sys.executable, "-c", CODE], env=envs[tree], cwd=cache, check=True)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                wall[tree].append(time.perf_counter() - start)
                cpu[tree].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        for tree in args.trees:
            modules = subprocess.run(
                [sys.executable, "-c", CODE + "; import sys; print(len(sys.modules))"], env=envs[tree],
                cwd=cache, check=True, capture_output=True, text=True).stdout.strip()
            print(f"{tree}: CPU median {statistics.median(cpu[tree]) * 1e3:4.0f} ms (min"
                  f" {min(cpu[tree]) * 1e3:4.0f}), wall median {statistics.median(wall[tree]) * 1e3:4.0f} ms"
                  f" (min {min(wall[tree]) * 1e3:4.0f}), {modules} modules loaded")
    print(f"{args.runs} alternating runs; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

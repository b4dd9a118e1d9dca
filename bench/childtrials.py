"""Trials of a child script run in two source trees alternately, trial by trial, in one run
(the stop-race benches: a rare failure needs many trials, and alternating keeps the trees'
conditions the same)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def run_child(tree: Path, child: str, prefix: str) -> tuple[int, str]:
    """Run `child` (Python source taking a scratch directory as argv[1]) with tree's meshd:
    its exit status and what it printed (its error output's end when it printed nothing)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as root:
        done = subprocess.run([sys.executable, "-c", child, root], cwd=tree, capture_output=True,
                              text=True, env=dict(os.environ, PYTHONPATH=str(tree)), timeout=120,
                              check=False)
    return done.returncode, done.stdout.strip() or done.stderr.strip()[-600:]


def alternate(trees: dict[str, Path], trial: Callable[[Path], tuple[int, str]], trials: int,
              minutes: float) -> tuple[dict[str, int], dict[str, int]]:
    """Up to `trials` rounds of one trial per tree (none started after `minutes`), each
    printed: the failures and the trials per tree."""
    failed = dict.fromkeys(trees, 0)
    done = dict.fromkeys(trees, 0)
    deadline = time.monotonic() + minutes * 60
    for number in range(trials):
        if time.monotonic() > deadline:
            break
        for name, tree in trees.items():
            bad, out = trial(tree)
            failed[name] += bad
            done[name] += 1
            print(f"{number:3d} {name:9s} {out}", flush=True)
    return failed, done

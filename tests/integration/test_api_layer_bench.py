"""A smoke run of bench/api_layer.py at a tiny size: it still runs end to end, this tree
against itself, and prints its figures (the numbers themselves are not checked)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[2]


async def test_api_layer_bench_runs_and_prints_cpu_per_request() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = await trio.run_process(
        [sys.executable, str(REPO / "bench" / "api_layer.py"), "--writers", "2", "--requests", "20",
         "--rounds", "1", "--baseline-tree", str(REPO)],
        capture_stdout=True, capture_stderr=True, check=False, env=env)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    out = done.stdout.decode()
    assert "this tree: median" in out and "baseline: median" in out and "ratio:" in out

"""Smoke run of bench/api_write.py at a tiny size: the benchmark still runs end to end
against a real daemon and prints its figures (the numbers themselves are not checked)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import trio

BENCH = Path(__file__).resolve().parents[2] / "bench" / "api_write.py"


async def test_api_write_bench_runs_and_reports_every_figure() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = await trio.run_process(
        [sys.executable, str(BENCH), "--entries", "300", "--writes-per-writer", "3", "--rounds", "1"],
        capture_stdout=True, capture_stderr=True, check=False, env=env)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    lines = done.stdout.decode().splitlines()
    assert lines[0].startswith("1. batch writes through the API:")
    figures = json.loads(lines[-1])
    assert {"batch_entries_per_s", "raw_executemany_rows_per_s", "concurrent_writes_per_s",
            "concurrent_p50_ms", "one_writer_writes_per_s"} <= set(figures)
    assert all(value > 0 for value in figures.values())

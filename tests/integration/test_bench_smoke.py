"""Smoke runs of bench/api_write.py (against a real daemon), bench/batch_stages.py, bench/groupcommit.py and
bench/backup_sparse.py and bench/purge_stall.py at a tiny size: each still runs end to end and prints its figures (the numbers themselves are
not checked)."""

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
    assert ({"batch_entries_per_s", "raw_executemany_rows_per_s", "concurrent_writes_per_s",
            "concurrent_p50_ms", "one_writer_writes_per_s", "concurrent_client_cpu_ms_per_write",
             "fresh_writes_per_s", "fresh_daemon_cpu_ms_per_request"}
            <= set(figures))
    assert all(value > 0 for value in figures.values())


async def test_batch_stages_bench_runs_and_prints_every_stage() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = await trio.run_process(
        [sys.executable, str(BENCH.parent / "batch_stages.py"), "--lines", "50", "--rounds", "1"],
        capture_stdout=True, capture_stderr=True, check=False, env=env, cwd=BENCH.parents[1])
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    out = done.stdout.decode()
    assert all(f"{stage} " in out for stage in ("decode", "writes", "compose", "commit", "answer"))


async def test_groupcommit_bench_runs_and_counts_transactions() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = await trio.run_process(
        [sys.executable, str(BENCH.parent / "groupcommit.py"), "--writers", "4",
         "--writes-per-writer", "3", "--rounds", "1"],
        capture_stdout=True, capture_stderr=True, check=False, env=env)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    figures = json.loads(done.stdout.decode().splitlines()[-1])["this tree"]
    assert figures["writes_per_s"] > 0 and figures["cpu_us_per_write"] > 0
    assert 1 <= figures["writes_per_transaction"] <= 4  # 12 writes in 3 to 12 transactions


async def test_catchup_profile_bench_runs_and_prints_both_profiles() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = await trio.run_process(
        [sys.executable, str(BENCH.parent / "catchup_profile.py"), "--entries", "300", "--top", "5"],
        capture_stdout=True, capture_stderr=True, check=False, env=env)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    out = done.stdout.decode()
    assert "ingest without the profiler:" in out and "---- by tottime ----" in out
    assert "verify_batch" in out  # the profile covers the receiving side's verification
    assert "us/entry  COMMIT" in out  # and the time per SQL statement


async def test_sync_bench_profiles_the_receiver(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    profile = tmp_path / "receiver.txt"
    done = await trio.run_process(
        [sys.executable, str(BENCH.parent / "sync.py"), "--entries", "500", "--profile", str(profile)],
        capture_stdout=True, capture_stderr=True, check=False, env=env)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    figures = json.loads(done.stdout.decode().splitlines()[-1])
    assert figures["initial_s"] > 0
    # CPU seconds of both sides (less sensitive to the machine's load than the wall time)
    assert figures["initial_receiver_cpu_s"] > 0 and figures["initial_sender_cpu_s"] > 0
    text = profile.read_text()
    assert text.startswith("receiver, under cProfile: 500 entries")
    assert "---- trio thread, by tottime ----" in text
    verify, commit = text.split("---- verify thread, by tottime ----")[1].split(
        "---- commit thread, by tottime ----")
    assert "verify_batch" in verify  # the verifying thread's profile saw the verification
    assert "commit_batch" in commit  # the writer thread's profile saw the commits


async def test_vs_syncthing_bench_runs_meshd_only() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = await trio.run_process(
        [sys.executable, str(BENCH.parent / "vs_syncthing.py"), "--meshd-only", "--sizes", "20,30"],
        capture_stdout=True, capture_stderr=True, check=False, env=env)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    lines = done.stdout.decode().splitlines()
    assert [json.loads(line)["entries"] for line in lines[:2]] == [20, 30]
    assert lines[-1].startswith("| 30 |") and "skipped" in lines[-1]


def test_vs_syncthing_counts_arrivals_without_rescanning_finished_shards(tmp_path: Path) -> None:
    """B's arrivals are polled every 20 ms while Syncthing runs: a poll must not rescan
    every shard (at 100,000 files that took a core), only those not yet complete."""
    sys.path.insert(0, str(BENCH.parent))
    try:
        import vs_syncthing
    finally:
        sys.path.remove(str(BENCH.parent))
    counter = vs_syncthing.Arrivals(tmp_path / "tag", 250, shard_files=100)
    assert counter.count() == 0  # nothing has arrived yet, not even the directory
    (tmp_path / "tag" / "000000").mkdir(parents=True)
    for i in range(100):
        (tmp_path / "tag" / "000000" / f"{i:08d}").write_text("x")
    (tmp_path / "tag" / "000002").mkdir()
    (tmp_path / "tag" / "000002" / ".syncthing.00000200.tmp").write_text("x")  # not yet whole
    (tmp_path / "tag" / "000002" / "00000201").write_text("x")
    assert counter.count() == 101
    # Shard 0 is complete: it is not listed again (its files stay counted).
    (tmp_path / "tag" / "000000" / "00000000").unlink()
    (tmp_path / "tag" / "000002" / ".syncthing.00000200.tmp").rename(tmp_path / "tag" / "000002" / "00000200")
    assert counter.count() == 102
    assert counter.pending() == ["000001", "000002"]


async def test_backup_sparse_bench_runs_and_prints_each_day() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = await trio.run_process(
        [sys.executable, str(BENCH.parent / "backup_sparse.py"), "--entries", "20", "--day", "10"],
        capture_stdout=True, capture_stderr=True, check=False, env=env)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    rows = done.stdout.decode().splitlines()
    assert rows[0].split()[:2] == ["entries", "body"] and [r.split()[0] for r in rows[1:]] == ["10", "20"]


async def test_purge_stall_bench_runs_and_prints_each_round() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = await trio.run_process(
        [sys.executable, str(BENCH.parent / "purge_stall.py"), "--hold", "0.05", "--rounds", "1"],
        capture_stdout=True, capture_stderr=True, check=False, env=env, cwd=BENCH.parents[1])
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    rows = [line.split() for line in done.stdout.decode().splitlines() if line.startswith("new ")]
    assert len(rows) == 1 and float(rows[0][2]) > 0  # the purge landed, its time printed

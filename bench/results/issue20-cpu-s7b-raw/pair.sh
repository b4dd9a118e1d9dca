#!/bin/bash
# one pair: new (this worktree) and main (git archive) soaks at the same time, threadcpu on each
n=$1
R=/work/wt-cpu20b/bench/results/issue20-cpu-s7b-raw
PY=/work/main/.venv/bin/python
(cd /work/wt-cpu20b && TMPDIR=/tmp/cpu20b-new PYTHONPATH=/work/wt-cpu20b timeout 420 $PY bench/soak.py --minutes 4 --rate 20 --warmup 80 > $R/pair$n-new.txt 2>&1) &
(cd /tmp/base-cpu20b && TMPDIR=/tmp/cpu20b-main PYTHONPATH=/tmp/base-cpu20b timeout 420 $PY bench/soak.py --minutes 4 --rate 20 --warmup 80 > $R/pair$n-main.txt 2>&1) &
sleep 20
(cd /work/wt-cpu20b && timeout 240 $PY bench/threadcpu.py --seconds 180 --match /tmp/cpu20b-new/ > $R/pair$n-new-threads.txt 2>&1) &
(cd /work/wt-cpu20b && timeout 240 $PY bench/threadcpu.py --seconds 180 --match /tmp/cpu20b-main/ > $R/pair$n-main-threads.txt 2>&1) &
wait

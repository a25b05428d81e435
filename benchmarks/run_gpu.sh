#!/usr/bin/env bash
# Runs on the lent GPU machine (device tool `run`, from the repo root): GPU tests and all benchmarks,
# results into $OUT (copy them into benchmarks/results/ afterwards and commit).
#   carry: [".whl"] (from benchmarks/fetch_gpu_wheels.sh); DALI parts are carried separately into /tmp.
# NOT YET RUN ON A GPU: no GPU was lent to the sessions that wrote it.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results/local}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
if ls /tmp/dali.tar.part-* >/dev/null 2>&1; then  # DALI wheels joined from the carried parts
  mkdir -p /tmp/daliwhl && cat /tmp/dali.tar.part-* | tar -C /tmp/daliwhl -xf - \
    && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/daliwhl/*.whl
fi
export PYTHONPATH=$PWD:/tmp/site:${PYTHONPATH:-}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -m simmim_fast.info --json > "$OUT/info.json" 2>&1
stage=${1:-all}
if [ "$stage" = all ] || [ "$stage" = tests ]; then
  python3 -m pytest tests -q -x -p no:cacheprovider -k "not sigkill and not ddp" 2>&1 | tee "$OUT/tests.log" | tail -20
fi
if [ "$stage" = all ] || [ "$stage" = bench ]; then
  python3 -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
    --benchmark-json "$OUT/bench-gpu.json" 2>&1 | tee "$OUT/bench.log" | tail -40
fi

#!/usr/bin/env bash
# GPU evidence on a lent GPU machine: installs the wheels carried in .whl/ (benchmarks/fetch_gpu_wheels.sh:
# xformers) into /tmp/site, then runs benchmarks/gpu_evidence.py with the arguments given here. Results go
# to $OUT (evidence.json, summary.md, tests.log). From the device tool, in the repo root:
#   run(command="bash benchmarks/run_gpu.sh", carry=[".whl"], timeout_s=600)
# DALI (optional, several calls first): benchmarks/gpu_dali.sh installs into the same /tmp/site.
set -uo pipefail
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    :
  else
    echo "run_gpu.sh: installing .whl/*.whl failed; running without them" >&2
  fi
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
exec python3 benchmarks/gpu_evidence.py "$@"

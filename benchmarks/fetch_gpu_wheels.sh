#!/usr/bin/env bash
# Downloads, on the CPU machine, the wheels the GPU image lacks into .whl/ (git-ignored through
# .git/info/exclude) for benchmarks/run_gpu.sh: xformers only (3 MB), for Python 3.12 / x86-64.
# DALI is large (~270 MB in 5 carries) and optional: benchmarks/gpu_dali.sh fetches and installs it.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d .whl xformers==0.0.35
ls -la .whl
echo 'GPU run: run(command="bash benchmarks/run_gpu.sh", carry=[".whl"], timeout_s=600)'

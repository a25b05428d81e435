#!/usr/bin/env bash
# Downloads, on the CPU machine, the wheels the GPU image lacks (xformers; DALI split in <55 MB parts)
# into .whl/ (git-ignored via .git/info/exclude) for benchmarks/run_gpu.sh. See the device tool README.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
grep -qx '/.dali/' .git/info/exclude 2>/dev/null || echo '/.dali/' >> .git/info/exclude
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64)
dl() { python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" "$@"; }
mkdir -p .whl .dali
dl -d .whl xformers==0.0.35
if [ "${WITH_DALI:-0}" = 1 ]; then
  tmp=$(mktemp -d)
  dl -d "$tmp" nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13 nvidia-libnvcomp-cu13 optree libcst makefun gast astunparse nvtx
  tar -C "$tmp" -cf - . | split -b 55M - .dali/dali.tar.part-
  ls -la .dali
fi
ls -la .whl

#!/usr/bin/env bash
# Optional: NVIDIA DALI 2.4.0 (+ pinned dependencies) for the GPU machine, which has no DALI and no network.
#
#   bash benchmarks/gpu_dali.sh fetch     # CPU machine: download the wheels, split them into carry-sized parts
#   bash benchmarks/gpu_dali.sh install   # GPU machine, once per call: keep the carried part, install when complete
#
# The wheels (~270 MB) exceed one call's 64 MiB carry, so `fetch` tars them and splits the tar into parts
# of 55 MiB inside the repo, .dali/a, .dali/b, ... (git-ignored), plus .dali/SHA256SUMS. Carried files land
# in the repo at the carried path; each call copies its part into /tmp/dali-parts, which lives as long as
# the machine stays warm (only ~30 s between calls, so make the calls back to back; a fresh machine starts
# from nothing: begin again with the first part). One call per part, e.g. with 5 parts:
#   call 1: run(command="bash benchmarks/gpu_dali.sh install", carry=[".dali/SHA256SUMS", ".dali/a"])
#   call 2: same with ".dali/b"; call 3: ".dali/c"; call 4: ".dali/d"
#   call 5: run(command="bash benchmarks/gpu_dali.sh install && bash benchmarks/run_gpu.sh --only env,tests",
#               carry=[".dali/SHA256SUMS", ".dali/e", ".whl"], timeout_s=600)
# When every part is there (checksums match), `install` joins them and installs all wheels with
# pip --no-index --no-deps --target /tmp/site (benchmarks/run_gpu.sh puts /tmp/site on PYTHONPATH).
# `fetch` prints the exact call list for the parts it made.
#
# Pins: DALI 2.4.0 requires nvidia-libnvcomp-cu13==5.3.0.16 (the registry's newest is 6.x), libcst~=1.8,
# nvidia-nvimgcodec-cu13[all]>=0.9,<0.10 whose `all` extra needs nvidia-nvjpeg, nvidia-nvjpeg2k-cu13,
# nvidia-nvtiff-cu13>=0.8.0 and nvidia-libnvcomp-cu13>=5,<6; plus optree, makefun, gast<=0.7.0,
# astunparse<=1.6.3, nvtx. nvidia-nvjpeg is pinned to CUDA 13.0.2's (the GPU image's torch 2.11+cu130 ships
# cuda-toolkit 13.0.2). six, packaging, numpy, pyyaml, wheel and typing-extensions are in the GPU image.
set -euo pipefail
cd "$(dirname "$0")/.."
PINS=(
  nvidia-dali-cuda130==2.4.0
  nvidia-nvimgcodec-cu13==0.9.0.20
  nvidia-libnvcomp-cu13==5.3.0.16
  nvidia-nvjpeg==13.0.1.86
  nvidia-nvjpeg2k-cu13==0.11.0.51
  nvidia-nvtiff-cu13==0.8.0.82
  libcst==1.8.6
  optree==0.20.0
  makefun==1.16.0
  gast==0.7.0
  astunparse==1.6.3
  nvtx==0.2.17
)
PART_SIZE=55M
SITE=${SIMMIM_SITE:-/tmp/site}                  # where run_gpu.sh looks (overridable for a local check)
PARTS_DIR=${SIMMIM_DALI_PARTS:-/tmp/dali-parts}

fetch() {
  local exclude tmp
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  grep -qx '/.dali/' "$exclude" 2>/dev/null || echo '/.dali/' >> "$exclude"
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$tmp" "${PINS[@]}"
  ls -la "$tmp"
  rm -rf .dali && mkdir -p .dali
  (cd "$tmp" && tar -cf - ./*.whl) | split -b "$PART_SIZE" -a 1 - .dali/
  rm -rf "$tmp"
  (cd .dali && sha256sum [a-z] > SHA256SUMS)
  local parts=(.dali/[a-z]) n i=0
  n=${#parts[@]}
  echo "$n parts in .dali/ (each carried with .dali/SHA256SUMS, one call each, back to back):"
  for p in "${parts[@]}"; do
    i=$((i + 1))
    if [ "$i" -lt "$n" ]; then
      echo "  call $i: run(command=\"bash benchmarks/gpu_dali.sh install\", carry=[\".dali/SHA256SUMS\", \"$p\"])"
    else
      echo "  call $i: run(command=\"bash benchmarks/gpu_dali.sh install && bash benchmarks/run_gpu.sh --only env,tests\", carry=[\".dali/SHA256SUMS\", \"$p\", \".whl\"], timeout_s=600)"
    fi
  done
}

keep_carried_parts() {
  # copy each carried part whose checksum matches into $PARTS_DIR; prints how many parts are missing
  local sum name missing=0
  mkdir -p "$PARTS_DIR"
  cp .dali/SHA256SUMS "$PARTS_DIR/SHA256SUMS"
  while read -r sum name; do
    if [ -f "$PARTS_DIR/$name" ] && [ "$(sha256sum < "$PARTS_DIR/$name" | cut -d' ' -f1)" = "$sum" ]; then
      continue
    fi
    if [ -f ".dali/$name" ] && [ "$(sha256sum < ".dali/$name" | cut -d' ' -f1)" = "$sum" ]; then
      cp ".dali/$name" "$PARTS_DIR/$name"
      echo "gpu_dali.sh: kept part $name" >&2
    else
      missing=$((missing + 1))
    fi
  done < .dali/SHA256SUMS
  echo "$missing"
}

install() {
  local missing names
  if [ -f "$SITE/.dali-installed" ] && cmp -s "$SITE/.dali-installed" .dali/SHA256SUMS; then
    echo "gpu_dali.sh: DALI already installed in $SITE"
    return 0
  fi
  [ -f .dali/SHA256SUMS ] || { echo "gpu_dali.sh: carry .dali/SHA256SUMS with each part" >&2; return 1; }
  missing=$(keep_carried_parts)
  if [ "$missing" -gt 0 ]; then
    echo "gpu_dali.sh: $missing part(s) still to carry (have: $(cd "$PARTS_DIR" && ls [a-z] 2>/dev/null | tr '\n' ' '))"
    return 0
  fi
  names=$(cut -d' ' -f3 < .dali/SHA256SUMS | tr '\n' ' ')
  rm -rf "$PARTS_DIR/wheels" && mkdir -p "$PARTS_DIR/wheels"
  (cd "$PARTS_DIR" && cat $names) | tar -C "$PARTS_DIR/wheels" -xf -
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$PARTS_DIR"/wheels/*.whl
  cp .dali/SHA256SUMS "$SITE/.dali-installed"
  rm -rf "$PARTS_DIR/wheels"
  PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} python3 -c "import nvidia.dali as d; print('DALI', d.__version__)"
}

case "${1:-}" in
  fetch) fetch ;;
  install) install ;;
  *) echo "usage: bash benchmarks/gpu_dali.sh fetch|install" >&2; exit 2 ;;
esac

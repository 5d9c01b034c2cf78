#!/usr/bin/env bash
# Builds the compiled extension on this (GPU-less) machine for the lent GPU machines' Python and torch, so a
# device call can carry it and skip its ~90 s build: the file lands in diffaug_kernels/ (ignored by git), named
# for that Python; carry it (the run tool's carry list) and run gpu_check.sh with GPU_CHECK_BUILD=0, which
# checks that it loads and builds there only if it does not.
# Usage: bash tools/prebuild_gpu_ext.sh [PYTHON_VERSION] [TORCH_VERSION]   (default 3.12 and 2.11.0, what
# the H100 / H200 machines run; gpu_check.sh's env.log says). Needs the package registry for torch (once;
# the venv is kept in /tmp/prebuild-venv-<py>-<torch>). CPU kernels: x86-64-v3 (AVX2), not this machine's -march.
# Checked on an H100 (RESULTS.md): the carried build loads there, its sources hash matching the tree.
set -euo pipefail
cd "$(dirname "$0")/.."
PYV="${1:-3.12}" TV="${2:-2.11.0}"
PYBIN=$(ls -d /root/.pyenv/versions/"$PYV".*/bin/python 2>/dev/null | tail -1 || true)
[ -n "$PYBIN" ] || PYBIN=$(command -v "python$PYV") || { echo "no Python $PYV here" >&2; exit 1; }
VENV="/tmp/prebuild-venv-$PYV-$TV"
[ -x "$VENV/bin/python" ] || { "$PYBIN" -m venv "$VENV" && "$VENV/bin/pip" install -q "torch==$TV" numpy setuptools; }
B=$(mktemp -d)
git ls-files -z | xargs -0 tar cf - | tar xf - -C "$B"  # the tracked files as they are in the working tree
( cd "$B" && DIFFAUG_CPU_ARCH=x86-64-v3 TORCH_CUDA_ARCH_LIST=9.0 "$VENV/bin/python" setup.py build_ext --inplace ) \
  > "$B/build.log" 2>&1 || { tail -20 "$B/build.log"; exit 1; }
so=$(ls "$B"/diffaug_kernels/_C.cpython-*.so)
grep -q "failed to build" "$B/build.log" && { tail -20 "$B/build.log"; exit 1; }
cp "$so" diffaug_kernels/
echo "built diffaug_kernels/$(basename "$so") (torch $TV, Python $PYV); carry it and set GPU_CHECK_BUILD=0"
rm -rf "$B"

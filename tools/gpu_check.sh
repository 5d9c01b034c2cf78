#!/usr/bin/env bash
# The whole GPU check in one script (../shared/GPU.md): build in place, GPU tests, compute-sanitizer, benchmarks.
# Usage: bash tools/gpu_check.sh [OUT_DIR]   (default: $OUT, else benchmarks/results/gpu-run)
# On a machine that gets a copy of the tree, name the commit: DIFFAUG_GIT_COMMIT=<hash> bash ... (the copy's
# .git can be stale; the result files record this name).
# Logs and JSON go to a work folder; when OUT_DIR is given, a tarball of it (gpu-check.tgz) and summary.txt
# are refreshed there after every step, so a run cut off by a time limit still returns what it finished.
# Steps run in order of importance, each under its own time limit, within GPU_CHECK_BUDGET_S seconds (default
# 540); a step that no longer fits is skipped and said so. GPU_CHECK_STEPS picks and orders the steps after
# the build; GPU_TEST_WORKERS sets pytest-xdist's workers (default 8: 14 is slower); GPU_TEST_K selects GPU
# tests by a pytest -k expression (default: all); XFORMERS_WHEEL (wheel files carried along: xformers, and
# nvidia-cuda-runtime-cu12 for its libcudart.so.12) adds xformers for the tests, so its attention path is
# tested too; fetch them beforehand where the package registry is reachable, e.g.
#   pip download --no-deps -d .cache xformers==0.0.35 nvidia-cuda-runtime-cu12
# Nothing is downloaded on the GPU machine.
# The tune step (first by default) times the planar CUDA tweedie and noise kernels' variants (tools/variants.py)
# and reports the fastest of each in bf16. The built-in defaults are the shapes measured fastest on an H100
# (by this step; forward noise's differ by dtype), so the later steps keep them; GPU_CHECK_TUNE_APPLY=1 runs the
# later steps with the bf16 picks instead (DIFFAUG_CUDA_TWEEDIE_UNITS, DIFFAUG_CUDA_NOISE_UNITS: every dtype).
# The model step also times the compiled UNet with candidate settings (--candidates: group-norm statistics per
# channel, cudnn.benchmark) and keeps the generated source of the slowest inductor kernels (kernels/); model-cdt (not in the default list)
# runs it again with inductor's coordinate-descent tuning of block sizes.
# Measured on an H200 (RESULTS.md): environment 6-9 s, build 54-97 s, tests with the sanitizer beside them
# 150-215 s, ops benchmark 22-74 s, RNG floor 18-33 s, UNet/DiffAug-step benchmark 111-163 s (with the
# profile; its NCHW row, one more compile, only in the model-cudnn step), DE benchmark over 199 s (cut off;
# 64 s without its two compiled rows); the ncu step (Nsight Compute on the CUDA kernels) is not timed there.
# A task's 15 device minutes, a start included, hold about 780 s of steps: all of them do not fit. Run it as
# two calls, e.g.
#   XFORMERS_WHEEL="$(ls .cache/*.whl)" GPU_CHECK_BUDGET_S=560 GPU_CHECK_STEPS=tests,bench1,model,ncu ...
#   (carrying .cache; the call's timeout 590 s; ncu is skipped when it no longer fits), then, at once on the
#   warm machine, GPU_CHECK_BUILD=0 GPU_CHECK_STEPS=ensemble,bench2 ... with the device time left.
# Measured on an H100 (RESULTS.md): a machine start 32-200 s of device time, the build 61-93 s, tests with
# the sanitizer 157-195 s, ops benchmark 41-71 s, tune 11 s for tweedie alone and 13 s for both ops, floor
# 21-27 s, model 120 s (230 s with --candidates), ncu 16-22 s, DE benchmark over 148 s (cut off; with --reps 3
# --warmup 1 --dda-reps 0 it takes 196 s). The device tool brings back at most 8 files from $OUT: leave only
# this script's gpu-check.tgz and summary.txt there (logs copied beside them can push the tarball past that
# limit). To spare the build's device time, build the extension here first (bash tools/prebuild_gpu_ext.sh), carry
# diffaug_kernels/_C.cpython-312-x86_64-linux-gnu.so with .cache, and set GPU_CHECK_BUILD=0.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the tree's package, also where it is not pip-installed
OUT_DIR="${1:-${OUT:-benchmarks/results/gpu-run}}"
W=/tmp/gpu-check
rm -rf "$W"; mkdir -p "$W" "$OUT_DIR"
BUDGET="${GPU_CHECK_BUDGET_S:-540}"
T0=$SECONDS
status=0
export PYTHONUNBUFFERED=1
left() { echo $((BUDGET - (SECONDS - T0))); }
snap() { tar czf "$OUT_DIR/gpu-check.tgz.tmp" -C "$W" . && mv "$OUT_DIR/gpu-check.tgz.tmp" "$OUT_DIR/gpu-check.tgz"
         cp "$W/summary.txt" "$OUT_DIR/summary.txt" 2>/dev/null || true; }
note() { echo "$*" | tee -a "$W/summary.txt"; }
# step NAME MAX_S MIN_S CMD...: runs CMD under timeout min(MAX_S, time left), or skips when under MIN_S is left.
step() {
  local name=$1 max=$2 min=$3; shift 3
  local l; l=$(left)
  if [ "$l" -lt "$min" ]; then note "SKIPPED $name: ${l}s left of the budget"; status=1; return 1; fi
  [ "$l" -lt "$max" ] && max=$l
  echo; echo "=== $name (limit ${max}s, t=$((SECONDS - T0))s) ==="
  local s=$SECONDS
  timeout --kill-after=10 "$max" bash -c 'set -o pipefail; "$@"' _ "$@"; local rc=$?
  note "$name: exit $rc in $((SECONDS - s))s$([ $rc -eq 124 ] && echo ' (TIMED OUT)')"
  [ $rc -eq 0 ] || status=1
  snap
  return $rc
}

env_info() {
  nvidia-smi; nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))"
  which nvcc; ls -d /usr/local/cuda*; nvcc --version | tail -2; nproc; "$PY" -m pip list 2>/dev/null | grep -iE "^(torch|triton|timm|pytest|pytest-xdist|hypothesis|numpy) "
}
build() {
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
  "$PY" -m pip install --no-deps --no-build-isolation -e . > "$W/build.log" 2>&1 || { tail -30 "$W/build.log"; return 1; }
  tail -2 "$W/build.log"
  "$PY" -c "import diffaug_kernels as dk; b = dk.available_backends(); print(b); assert {'cpu', 'cuda', 'triton'} <= set(b), b" 2>&1 | tee -a "$W/build.log"
}
gpu_tests() {
  # xdist spreads the Triton/inductor compilation over the cores; every cuda-marked test, -x off so all report
  local par=(); "$PY" -c "import xdist" 2>/dev/null && par=(-n "${GPU_TEST_WORKERS:-8}")
  # the optional xformers attention path is tested only where xformers imports: XFORMERS_WHEEL="<wheels carried
  # to the machine>" installs them (no dependencies) into a side folder for this step. The registry's xformers
  # 0.0.35 links libcudart.so.12 (a CUDA 12.8 build); beside a CUDA 13 torch its extension then fails to load
  # and xformers refuses CUDA inputs ("wasn't build with CUDA support", seen on an H200). The nvidia-cuda-runtime-cu12
  # wheel supplies that library: any nvidia/*/lib folder installed here joins LD_LIBRARY_PATH.
  if [ -n "${XFORMERS_WHEEL:-}" ]; then
    # shellcheck disable=SC2086  # a list of wheel files
    if "$PY" -m pip install -q --no-deps --target "$W/xformers" $XFORMERS_WHEEL > "$W/xformers-install.log" 2>&1; then
      export PYTHONPATH="$W/xformers${PYTHONPATH:+:$PYTHONPATH}"
      local lib; for lib in "$W"/xformers/nvidia/*/lib; do
        [ -d "$lib" ] && export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
      done
      "$PY" -c "import xformers._cpp_lib as c; print('xformers extension:', 'loaded' if c._cpp_library_load_exception is None else c._cpp_library_load_exception)" 2>&1 | tail -1 | tee -a "$W/xformers-install.log"
    else
      tail -3 "$W/xformers-install.log"
    fi
  fi
  # GPU_TEST_K (a pytest -k expression) runs part of them, when only some code changed since a full GPU run
  local sel=(); [ -n "${GPU_TEST_K:-}" ] && sel=(-k "$GPU_TEST_K")
  "$PY" -m pytest -m cuda -q -p no:cacheprovider "${par[@]}" "${sel[@]}" --junitxml="$W/pytest-cuda.xml" tests \
    > "$W/pytest-cuda.log" 2>&1
  local rc=$?; tail -25 "$W/pytest-cuda.log"; return $rc
}
sanitize() {  # the workload (every CUDA kernel and variant, checked against the reference) is a file of its own:
  # tests/ops/test_build.py runs it under AddressSanitizer on the CPU emulation of the same kernels
  local rc=0 tool
  for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" tools/sanitize_workload.py > "$W/sanitizer-$tool.log" 2>&1
    local r=$?; echo "$tool: exit $r; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$W/sanitizer-$tool.log" | tail -1)"
    [ $r -eq 0 ] || rc=1
  done
  return $rc
}
kernel_profile() {
  # Nsight Compute on one launch of each CUDA kernel at the benchmark's size: what bounds them (DRAM throughput
  # against the issue and pipe use of the Philox / Box-Muller arithmetic), to aim the next kernel change
  cat > "$W/ncu_ops.py" <<'PY'
import torch, diffaug_kernels as dk
S = dk.NoiseSchedule.linear()
x = torch.rand(256, 3, 224, 224, device="cuda") * 2 - 1
t = torch.randint(0, 1000, (256,), device="cuda")
for dtype in (torch.bfloat16, torch.float32):
    xd = x.to(dtype)
    y = dk.forward_noise(xd, t, S, seed=1, backend="cuda")
    dk.tweedie(y, torch.randn(256, 6, 224, 224, device="cuda", dtype=dtype), t, S, backend="cuda")
dk.philox_normal(x.shape, 3, device="cuda", backend="cuda")
torch.cuda.synchronize()
PY
  command -v ncu > /dev/null || { echo "ncu not found"; return 3; }
  # --clock-control none: the GPU's own clocks, as in the benchmarks (ncu locks base clocks by default)
  ncu --clock-control none --kernel-name-base function \
      --kernel-name 'regex:forward_noise_plane_kernel|tweedie_plane_kernel|philox_normal_kernel' \
      --section SpeedOfLight --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats \
      --section WarpStateStats --section InstructionStats --section MemoryWorkloadAnalysis \
      "$PY" "$W/ncu_ops.py" > "$W/ncu-ops.txt" 2>&1
  local rc=$?
  grep -E "==ERROR==|==WARNING==|(forward_noise_plane|tweedie_plane|philox_normal)_kernel|Duration|DRAM Throughput|Compute \(SM\) Throughput|Issue Slots Busy|Executed Ipc A|Achieved Occupancy|Registers Per" "$W/ncu-ops.txt" | head -80
  return $rc
}
bench_ops() {  # bench_ops RUN
  "$PY" -m diffaug_kernels bench --device cuda --reps 50 --warmup 10 --shapes 256x3x224x224 \
    --dtypes bfloat16,float32 --ops forward_noise,tweedie,forward_noise_multi \
    --json "$W/bench-run$1.json" --plot "$W/bench-run$1.png" > "$W/bench-run$1.txt" 2> "$W/bench-run$1.log"
  local rc=$?; cat "$W/bench-run$1.txt"; tail -5 "$W/bench-run$1.log"; return $rc
}
bench_norm() {  # dk.group_norm_silu (Triton) on the 256x256 UNet's activation shapes at 224x224, bf16 and fp32:
  # its share of the copy rate (issue 25: >= 85%) against the eager and compiled published norm + scale-shift + SiLU
  "$PY" -m diffaug_kernels bench --device cuda --reps 50 --warmup 10 --ops group_norm_silu \
    --shapes 64x256x112x112,64x512x56x56,64x1024x14x14 --dtypes bfloat16,float32 --json "$W/bench-norm.json" \
    > "$W/bench-norm.txt" 2> "$W/bench-norm.log"
  local rc=$?; cat "$W/bench-norm.txt"; tail -5 "$W/bench-norm.log"; return $rc
}
bench_ensemble() {
  "$PY" -m diffaug_kernels bench-ensemble --device cuda --batch 8 --reps 5 --warmup 2 --json "$W/bench-ensemble.json" \
    --plot "$W/bench-ensemble.png" \
    > "$W/bench-ensemble.txt" 2> "$W/bench-ensemble.log"
  local rc=$?; cat "$W/bench-ensemble.txt"; tail -5 "$W/bench-ensemble.log"; return $rc
}
bench_model() {  # bench_model NAME [EXTRA ARGS...]
  local n=$1; shift
  "$PY" -m diffaug_kernels bench-model --device cuda --batch 64 --reps 3 --warmup 1 --json "$W/$n.json" --plot "$W/$n.png" "$@" \
    > "$W/$n.txt" 2> "$W/$n.log"
  local rc=$?; cat "$W/$n.txt"; tail -5 "$W/$n.log"; return $rc
}
bench_train() {  # the DiffAug training step end to end, published (fp16 eager) vs the package's (compiled bf16)
  "$PY" -m diffaug_kernels bench-train --device cuda --batch 64 --reps 5 --warmup 2 --json "$W/bench-train.json" \
    --plot "$W/bench-train.png" > "$W/bench-train.txt" 2> "$W/bench-train.log"
  local rc=$?; cat "$W/bench-train.txt"; tail -5 "$W/bench-train.log"; return $rc
}
bench_certify() {
  "$PY" -m diffaug_kernels bench-certify --device cuda --batch 200 --reps 3 --warmup 1 --json "$W/bench-certify.json" \
    --plot "$W/bench-certify.png" > "$W/bench-certify.txt" 2> "$W/bench-certify.log"
  local rc=$?; cat "$W/bench-certify.txt"; tail -5 "$W/bench-certify.log"; return $rc
}
bench_fp8() {  # FP8 3x3 convolutions (Hopper): D(t) of the digits and 256x256 models, FP8 UNet vs compiled bf16
  "$PY" -m diffaug_kernels bench-fp8 --device cuda --batch 64 --reps 5 --warmup 2 --json "$W/bench-fp8.json" \
    > "$W/bench-fp8.txt" 2> "$W/bench-fp8.log"
  local rc=$?; cat "$W/bench-fp8.txt"; tail -5 "$W/bench-fp8.log"; return $rc
}
export -f bench_fp8
bench_certify_cpu() {  # the issue's CPU target (bf16, compile=True) needs BF16 instructions, which the 2-core
  # development machine lacks (it emulates bf16 convolutions): timed on this host's CPU when it has them
  if ! grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo; then echo "this CPU has no BF16 instructions: skipped"; return 0; fi
  "$PY" -m diffaug_kernels bench-certify --device cpu --dtypes float32,bfloat16 --reps 3 --warmup 1 \
    --json "$W/bench-certify-cpu.json" --plot "$W/bench-certify-cpu.png" > "$W/bench-certify-cpu.txt" \
    2> "$W/bench-certify-cpu.log"
  local rc=$?; cat "$W/bench-certify-cpu.txt"; tail -5 "$W/bench-certify-cpu.log"; return $rc
}
bench_sample_cpu() {  # issue 22's CPU target (bf16, compile=True) needs BF16 instructions, as certify-cpu's does
  if ! grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo; then echo "this CPU has no BF16 instructions: skipped"; return 0; fi
  "$PY" -m diffaug_kernels bench-sample --device cpu --dtypes float32,bfloat16 --reps 3 --warmup 1 \
    --json "$W/bench-sample-cpu.json" > "$W/bench-sample-cpu.txt" 2> "$W/bench-sample-cpu.log"
  local rc=$?; cat "$W/bench-sample-cpu.txt"; tail -5 "$W/bench-sample-cpu.log"; return $rc
}
bench_sample() {  # classifier-guided DDIM (256x256 models, 25 steps): published fp16 loop vs dk bf16, eager, compiled
  "$PY" -m diffaug_kernels bench-sample --device cuda --batch 16 --steps 25 --dtypes bfloat16 --reps 3 --warmup 1 \
    --json "$W/bench-sample.json" --plot "$W/bench-sample.png" > "$W/bench-sample.txt" 2> "$W/bench-sample.log"
  local rc=$?; cat "$W/bench-sample.txt"; tail -5 "$W/bench-sample.log"; return $rc
}
kernel_sources() {  # kernel_sources PROFILE DEST: the generated source of the slowest inductor kernels the profile
  # names (its full-name list), and the two biggest graph wrappers (call(): buffer layouts, launch order), gzipped
  local prof=$1 dest=$2 k f n=0; mkdir -p "$dest"
  for k in $(sed -n '/inductor kernels by self time, full names:/,$p' "$prof" | awk 'NF >= 5 {print $5}' | head -12); do
    f=$(grep -rl --include='*.py' -e "def $k(" "$INDUCTOR_CACHE" 2>/dev/null | xargs -r grep -L "def call(" | head -1)
    [ -n "$f" ] && cp "$f" "$dest/$k.py" && n=$((n + 1))
  done
  for f in $(grep -rl --include='*.py' "def call(" "$INDUCTOR_CACHE" 2>/dev/null | xargs -r ls -S | head -2); do
    gzip -c "$f" > "$dest/wrapper-$(basename "$f").gz"
  done
  echo "kernel sources: $n kernels and $(ls "$dest" | grep -c wrapper) wrappers in $dest"
}
tune_variants() {  # the planar kernels' variants, interleaved; its last lines name the fastest of each in bf16
  "$PY" tools/variants.py --rounds 7 --reps 40 --json "$W/variants.json" > "$W/variants.txt" 2>&1
  local rc=$?; cat "$W/variants.txt"; return $rc
}
rng_floor() {
  "$PY" tools/floor.py --device cuda "$W/floor.json" > "$W/floor.txt" 2>&1; local rc=$?; cat "$W/floor.txt"; return $rc
}
summary() {
  "$PY" - "$W" <<'PY'
import json, os, sys
d = sys.argv[1]
runs = [json.load(open(f"{d}/bench-run{i}.json")) for i in (1, 2) if os.path.exists(f"{d}/bench-run{i}.json")]
if runs:
    r0 = runs[0]
    print(f"{r0['env']['device_name']}: copy {r0['copy_gb_s']:.0f} GB/s")
    print(f"{'op':<20}{'dtype':<10}{'impl':<24}" + "".join(f"{'ms run' + str(i + 1):>9}" for i in range(len(runs)))
          + f"{'GB/s':>7}{'%copy':>7}{'%samecp':>8}{'vs eager':>9}{'vs compiled':>12}")
    for i, r1 in enumerate(r0["rows"]):
        comp = next(r["ms"] for r in r0["rows"] if r["op"] == r1["op"] and r["dtype"] == r1["dtype"]
                    and r["impl"].startswith("compiled"))
        ms = "".join(f"{run['rows'][i]['ms']:9.3f}" for run in runs)
        same = r1.get("vs_same_bytes_copy")
        print(f"{r1['op']:<20}{r1['dtype']:<10}{r1['impl']:<24}{ms}{r1.get('gb_s', 0):7.0f}{r1['pct_copy']:6.1f}%"
              f"{100 * same if same else float('nan'):7.0f}%{r1['speedup']:8.2f}x{comp / r1['ms']:11.2f}x")
for name in ("variants", "floor", "bench-ensemble", "bench-certify", "bench-certify-cpu", "bench-sample",
             "bench-sample-cpu", "bench-norm", "bench-fp8", "bench-train",
             "bench-model", "bench-model-cdt", "bench-model-cudnn"):
    p = f"{d}/{name}.txt"
    if os.path.exists(p) and os.path.getsize(p):
        print(); print(open(p).read().rstrip())
    elif os.path.exists(f"{d}/{name}.json"):  # cut off: the rows it finished
        print(f"\n{name} (incomplete run, rows finished):")
        for r in json.load(open(f"{d}/{name}.json"))["rows"]:
            print(f"  {r['impl']:<52} {r['ms']:10.1f} ms  {r['images_per_s']:8.2f} img/s")
PY
}

# inductor's generated code goes to a cache of this run's own, so kernel_sources finds what ran; a call on a warm
# machine that keeps the build (GPU_CHECK_BUILD=0) keeps the cache too, and its compiles hit it
INDUCTOR_CACHE=/tmp/gpu-check-inductor
[ "${GPU_CHECK_BUILD:-1}" = 0 ] || rm -rf "$INDUCTOR_CACHE"
export PY W INDUCTOR_CACHE TORCHINDUCTOR_CACHE_DIR="$INDUCTOR_CACHE"
export -f env_info build gpu_tests sanitize kernel_profile bench_ops bench_ensemble bench_model kernel_sources rng_floor \
  tune_variants bench_certify bench_certify_cpu bench_train bench_sample bench_sample_cpu bench_norm
step environment 60 5 env_info 2>&1 | tee "$W/env.log"
# GPU_CHECK_BUILD=0 keeps the extension an earlier call built on the same (warm) machine, or one built beforehand
# for the machine's Python and torch and carried (tools/prebuild_gpu_ext.sh), when it loads.
if [ "${GPU_CHECK_BUILD:-1}" = 0 ] && "$PY" -c "import diffaug_kernels as dk; assert 'cuda' in dk.available_backends()" 2>/dev/null; then
  note "build: kept the extension an earlier call built"
else
  step build 300 60 build
fi
# GPU_CHECK_STEPS picks and orders the steps after the build (default: all, correctness first), e.g.
# GPU_CHECK_STEPS=bench1,floor,bench2 when only the timings are missing and device time is short; "certify"
# (bench-certify, not in the default list) times dk.certify against the published DDS loop; "certify-cpu" the
# same on the host's CPU in fp32 and bf16 when it has BF16 instructions (the issue's CPU target); "sample"
# (bench-sample, not in the default list: two compiles of the UNet and the classifier's forward and backward) times
# classifier-guided DDIM against guided-diffusion's classifier_sample loop and checks the images agree;
# "sample-cpu" the same on the host's CPU in fp32 and bf16 when it has BF16 instructions (the issue's CPU target); "train"
# (bench-train, not in the default list: two compiles, the UNet's and the classifier's forward and backward, after
# the published eager step; not yet timed on a GPU) the DiffAug training step end to end, published vs the package's.
# "norm" (not in the default list) times dk.group_norm_silu on the 256x256 UNet's activation shapes (its share of
# the copy rate); the model step times the fused UNet (bench-model --fused, the default on a GPU) and, with its
# profile, the step with it ("profile.fused"), for issue 25.
# "fp8" (bench-fp8, not in the default list: GPU_CHECK_STEPS=fp8) the FP8 3x3 convolutions on a Hopper GPU: D(t) of
# the digits and the 256x256 models, the compiled FP8 UNet against the compiled bf16 one, the four costliest conv shapes.
STEPS="${GPU_CHECK_STEPS:-tune,tests,bench1,model,ncu,ensemble,bench2,model-cudnn,floor}"
# Without the CUDA kernels (a failed compile falls back to CPU) Triton is still worth testing and timing.
if "$PY" -c "import diffaug_kernels" 2>/dev/null; then
  for s in ${STEPS//,/ }; do
    case $s in
      tests)  # correctness: tests and sanitizer side by side (compile / instrumentation bound, no timing)
        ( step "GPU tests (pytest -m cuda, xdist)" 240 30 gpu_tests > "$W/step-tests.out" 2>&1 ) &
        pt=$!
        # GPU_CHECK_SANITIZER=0 when no kernel source changed since a clean sanitizer run
        if [ "${GPU_CHECK_SANITIZER:-1}" = 0 ]; then note "compute-sanitizer: not run (GPU_CHECK_SANITIZER=0)"
        else step "compute-sanitizer (memcheck, racecheck)" 240 30 sanitize; fi
        wait $pt || status=1
        cat "$W/step-tests.out"
        grep -q "GPU tests.*exit 0" "$W/summary.txt" || status=1 ;;
      tune)  # GPU_CHECK_TUNE_APPLY=1: the later steps (benchmarks, tests) run with the bf16 picks
        if step "planar kernel variants (units per thread, block order)" 150 30 tune_variants \
           && [ "${GPU_CHECK_TUNE_APPLY:-0}" = 1 ]; then
          for pair in tweedie:DIFFAUG_CUDA_TWEEDIE_UNITS forward_noise:DIFFAUG_CUDA_NOISE_UNITS; do
            best=$(awk -v op="${pair%%:*}:" '$1 == "best" && $2 == op {print $3}' "$W/variants.txt")
            [ -n "$best" ] && export "${pair#*:}=$best" && note "later steps: ${pair#*:}=$best"
          done
        fi ;;
      bench1) step "benchmark ops, run 1" 180 40 bench_ops 1 ;;
      floor) step "what bounds the ops: RNG rate alone, per-call cost" 60 15 rng_floor ;;
      ncu) step "Nsight Compute profile of the CUDA kernels" 60 30 kernel_profile ;;
      ensemble) step "benchmark DiffAug-Ensemble vs per-t loop vs DDA" 300 90 bench_ensemble ;;
      bench2) step "benchmark ops, run 2 (run-to-run noise)" 120 30 bench_ops 2 ;;
      norm) step "benchmark group_norm_silu on the UNet's shapes" 150 40 bench_norm ;;
      certify) step "benchmark certify's noise samples vs the published DDS loop" 300 60 bench_certify ;;
      fp8) step "benchmark FP8 3x3 convolutions: D(t), FP8 UNet vs compiled bf16" 420 120 bench_fp8 ;;
      certify-cpu) step "benchmark certify on this host's CPU, fp32 and bf16 (BF16 instructions only)" 300 60 \
             bench_certify_cpu ;;
      sample) step "benchmark classifier-guided DDIM vs the published classifier_sample loop" 480 150 bench_sample ;;
      sample-cpu) step "benchmark guided DDIM on this host's CPU, fp32 and bf16 (BF16 instructions only)" 420 90 \
             bench_sample_cpu ;;
      train) step "benchmark the DiffAug training step, published vs the package's" 420 120 bench_train ;;
      model) step "benchmark UNet forward (+ fused) + DiffAug step (+ profiles)" 360 60 bench_model bench-model \
             --profile "$W/bench-model-profile.txt" --candidates \
             && kernel_sources "$W/bench-model-profile.txt" "$W/kernels" ;;
      model-cdt)  # the same with inductor's coordinate-descent tuning of its kernels' block sizes (slower compile)
        TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 step "benchmark UNet + DiffAug step, coordinate-descent tuning" \
          330 90 bench_model bench-model-cdt --profile "$W/bench-model-cdt-profile.txt" \
          && kernel_sources "$W/bench-model-cdt-profile.txt" "$W/kernels-cdt" ;;
      model-cudnn) step "benchmark UNet forward + DiffAug step, cudnn.benchmark, + NCHW" 300 60 bench_model \
                   bench-model-cudnn --cudnn-benchmark --nchw ;;
      *) note "unknown step '$s' in GPU_CHECK_STEPS"; status=1 ;;
    esac
  done
fi
echo; echo "=== summary (t=$((SECONDS - T0))s) ==="
summary 2>&1 | tee "$W/summary-table.txt"
cat "$W/summary.txt"
note "gpu_check status: $status (0 = everything passed)"
snap
exit $status

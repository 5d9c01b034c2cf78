#!/usr/bin/env bash
# The whole GPU check in one script (../shared/GPU.md): build in place, GPU tests, compute-sanitizer, benchmarks.
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (default: $OUT, else benchmarks/results/gpu-run)
# Writes logs and JSON into OUT_DIR and ends with a short table. Nothing is downloaded.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-benchmarks/results/gpu-run}}"
mkdir -p "$OUT_DIR"
status=0
step() { echo; echo "=== $* ==="; }

step "environment"
{ nvidia-smi || true; python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"; nvcc --version | tail -2; } 2>&1 | tee "$OUT_DIR/env.log"

step "build (in place, no downloads)"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
pip install --no-deps --no-build-isolation -e . > "$OUT_DIR/build.log" 2>&1 || status=1
tail -3 "$OUT_DIR/build.log"
python -c "import diffaug_kernels as dk; b = dk.available_backends(); print(b); assert {'cpu', 'cuda', 'triton'} <= set(b), b" \
  2>&1 | tee -a "$OUT_DIR/build.log" || { echo "the CUDA/Triton backends are missing: see build.log"; status=1; }

step "GPU tests (pytest -m cuda)"
python -m pytest -m cuda -q -p no:cacheprovider --junitxml="$OUT_DIR/pytest-cuda.xml" tests 2>&1 | tee "$OUT_DIR/pytest-cuda.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "compute-sanitizer (memcheck, racecheck) on the CUDA kernels"
cat > "$OUT_DIR/sanitize.py" <<'PY'
import torch, diffaug_kernels as dk
S = dk.NoiseSchedule.linear()
for dtype in (torch.float32, torch.bfloat16, torch.float64):
    for shape in ((3, 3, 17, 19), (4, 3, 32, 32)):
        x = (torch.rand(shape, device="cuda") * 2 - 1).to(dtype)
        t = torch.randint(0, 1000, (shape[0],), device="cuda")
        for cl in (False, True):
            xi = x.contiguous(memory_format=torch.channels_last) if cl else x
            y = dk.forward_noise(xi, t, S, seed=1, backend="cuda")
            z = dk.forward_noise_multi(xi, [0, 50, 450], S, seed=2, backend="cuda")
            m = torch.randn(shape[0], 2 * shape[1], *shape[2:], device="cuda").to(dtype)
            w = dk.tweedie(y, m, t, S, normalize=dk.IMAGENET_NORM, backend="cuda")
    dk.philox_normal((1001,), 3, device="cuda", backend="cuda")
torch.cuda.synchronize()
print("sanitize workload done")
PY
for tool in memcheck racecheck; do
  compute-sanitizer --tool "$tool" --error-exitcode 9 python "$OUT_DIR/sanitize.py" > "$OUT_DIR/sanitizer-$tool.log" 2>&1
  rc=$?; echo "$tool: exit $rc ($(grep -c 'ERROR SUMMARY: 0 errors' "$OUT_DIR/sanitizer-$tool.log") clean summary)"
  [ $rc -eq 0 ] || status=1
done

step "benchmarks (twice, to know the run-to-run noise)"
for run in 1 2; do
  python -m diffaug_kernels bench --device cuda --reps 50 --warmup 10 --shapes 256x3x224x224 \
    --dtypes bfloat16,float32 --ops forward_noise,tweedie,forward_noise_multi \
    --json "$OUT_DIR/bench-run$run.json" > "$OUT_DIR/bench-run$run.txt" 2> "$OUT_DIR/bench-run$run.log" || status=1
done
cat "$OUT_DIR/bench-run1.txt"

step "end-to-end: UNet forward and DiffAug step (256x256 uncond model at 224x224, batch 64)"
python -m diffaug_kernels bench-model --device cuda --batch 64 --reps 10 --json "$OUT_DIR/bench-model.json" \
  > "$OUT_DIR/bench-model.txt" 2> "$OUT_DIR/bench-model.log" || status=1
cat "$OUT_DIR/bench-model.txt"

step "summary"
python - "$OUT_DIR" <<'PY'
import json, sys
d = sys.argv[1]
runs = [json.load(open(f"{d}/bench-run{i}.json")) for i in (1, 2)]
print(f"{runs[0]['env']['device_name']}: copy {runs[0]['copy_gb_s']:.0f} GB/s")
print(f"{'op':<20}{'dtype':<10}{'impl':<22}{'ms run1':>9}{'ms run2':>9}{'%copy':>7}{'vs eager':>9}{'vs compiled':>12}")
for r1, r2 in zip(runs[0]["rows"], runs[1]["rows"]):
    comp = next(r["ms"] for r in runs[0]["rows"] if r["op"] == r1["op"] and r["dtype"] == r1["dtype"]
                and r["impl"].startswith("compiled"))
    print(f"{r1['op']:<20}{r1['dtype']:<10}{r1['impl']:<22}{r1['ms']:9.3f}{r2['ms']:9.3f}{r1['pct_copy']:6.0f}%"
          f"{r1['speedup']:8.2f}x{comp / r1['ms']:11.2f}x")
PY
echo; echo "gpu_check status: $status (0 = everything passed)"
exit $status

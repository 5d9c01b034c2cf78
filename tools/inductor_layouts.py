"""What inductor generates for the compiled UNet on a GPU, seen from a machine without one (a development tool,
not a test or a benchmark: it times nothing).

It traces the UNet forward (bf16 autocast, channels_last input, no_grad) with fake CUDA tensors, lowers it with
inductor for an H100 (torch.cuda's device queries answered by hand, cuDNN's channels_last choice for convolutions
restated), and stops where Triton would compile the kernels: inductor has written the graph's wrapper (every
buffer's layout, every launch) by then. It then lists the kernels that change an activation's layout on the way
(2-D tiled kernels, and 1-D kernels whose fastest index walks a tensor's slowest dimension: a gather one channel
plane apart per element). With torch.cat for the skip connections, such kernels are the slowest of an H100
profile of the compiled step (`python -m diffaug_kernels bench-model --profile`; RESULTS.md).

    python tools/inductor_layouts.py [--batch 64 --size 224] [--plain-cat] [--stats channel] [--wrapper F]

It reaches into torch internals, so it may need adapting to another torch release; checked with torch 2.11.0
(the GPU machines' release, in a side venv: pip install torch==2.11.0 triton==3.6.0 numpy; run with
PYTHONPATH=<repo>) and 2.14.1. At batch 64, 224x224, in elements through layout-changing kernels:
- torch 2.11: 9.7e9 with --plain-cat (the output blocks' cat in NCHW buffers, gathered by the group norm after
  it); 6.2e8 with cat_channels (the weights' casts to channels_last bf16 and attention's head reshapes);
- torch 2.14.1: 6.2e8 either way; a cat of 4-D NHWC views (another way to keep the cat NHWC) gives 1.3e9.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import shutil
import sys
import tempfile
import types

import torch


def fake_h100() -> None:
    """Answers inductor's CUDA device queries as an H100 would; call after the fake tensors exist."""
    import torch._inductor.codegen.triton as codegen_triton
    import torch._inductor.compile_fx as compile_fx
    import torch.utils._triton as utils_triton
    from torch._dynamo.device_interface import CudaInterface

    props = types.SimpleNamespace(
        name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132, regs_per_multiprocessor=65536,
        max_threads_per_multi_processor=2048, max_threads_per_block=1024, warp_size=32, total_memory=80 * 2**30,
        L2_cache_size=50 * 2**20, shared_memory_per_block_optin=232448, shared_memory_per_multiprocessor=233472,
        gcnArchName="", uuid="fake", clock_rate=1980000)
    for k, v in dict(get_device_properties=lambda *a, **k: props, is_available=lambda: True,
                     device_count=lambda: 1, current_device=lambda: 0, get_device_capability=lambda *a, **k: (9, 0),
                     get_device_name=lambda *a, **k: props.name, synchronize=lambda *a, **k: None,
                     set_device=lambda *a, **k: None).items():
        setattr(torch.cuda, k, v)
    for k, v in dict(get_device_properties=lambda *a, **k: props, current_device=lambda: 0, device_count=lambda: 1,
                     is_available=lambda: True, get_compute_capability=lambda *a, **k: 90,
                     is_bf16_supported=lambda *a, **k: True, raise_if_triton_unavailable=lambda *a, **k: None,
                     is_triton_capable=lambda *a, **k: True, synchronize=lambda *a, **k: None,
                     set_device=lambda *a, **k: None, maybe_exchange_device=lambda d: 0,
                     exchange_device=lambda d: 0).items():
        setattr(CudaInterface, k, staticmethod(v))
    torch.cuda._lazy_init = lambda: None
    import torch.cuda.random as cuda_random
    torch.cuda.get_rng_state = cuda_random.get_rng_state = lambda *a, **k: torch.zeros(16, dtype=torch.uint8)
    torch.cuda.set_rng_state = cuda_random.set_rng_state = lambda *a, **k: None
    torch.cuda.device = lambda *a, **k: contextlib.nullcontext()
    CudaInterface.Worker.get_device_properties = staticmethod(lambda *a, **k: props)
    CudaInterface.Worker.current_device = staticmethod(lambda: 0)
    compile_fx.get_cuda_device_context = lambda gm: contextlib.nullcontext()
    utils_triton.triton_hash_with_backend = codegen_triton.triton_hash_with_backend = lambda: "no-gpu"
    torch._inductor.config.compile_threads = 1
    # cuDNN on sm90 returns channels_last when the input or the weight is; without a GPU the fake convolution
    # falls back to a contiguous result, which would make every activation NCHW
    plain = torch._C._conv_determine_backend_memory_format

    def memory_format(inp, weight, backend):
        if inp.is_cuda and inp.dim() == 4 and any(
                t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() for t in (inp, weight)):
            return torch.channels_last
        return plain(inp, weight, backend)

    torch._C._conv_determine_backend_memory_format = memory_format


def generate(batch: int, size: int, flags: dict, stats: str, plain_cat: bool) -> str:
    """The wrapper source inductor writes for the compiled GPU UNet forward."""
    from torch._guards import TracingContext, tracing
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._inductor.decomposition import select_decomp_table
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    import diffaug_kernels.models.unet as unet

    torch.compiler.is_compiling = lambda: True  # the model's compiled-GPU paths (group_norm_nhwc, cat_channels)
    unet.GroupNorm32.nhwc_stats = stats
    if plain_cat:
        unet.cat_channels = lambda a, b: torch.cat([a, b], dim=1)
    with torch.device("meta"):
        model = unet.create_adm_unet(**flags).eval()
    cache = tempfile.mkdtemp(prefix="inductor-layouts-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with mode, torch.no_grad():
            model = model.to_empty(device="cuda:0")
            x = torch.empty(batch, 3, size, size, device="cuda:0").contiguous(memory_format=torch.channels_last)
            t = torch.zeros(batch, dtype=torch.long, device="cuda:0")
            fake_h100()
            named = {**dict(model.named_parameters()), **dict(model.named_buffers())}

            def forward(*args):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return (torch.func.functional_call(model, dict(zip(named, args)), (x, t)),)

            gm = make_fx(forward, decomposition_table=select_decomp_table())(*named.values())
            error = None
            try:
                with tracing(TracingContext(mode)):
                    compile_fx_inner(gm, list(named.values()), is_inference=True)
            except Exception as e:  # Triton cannot compile without a driver; the wrapper is written by then
                error = e
                if os.environ.get("INDUCTOR_LAYOUTS_DEBUG"):
                    import traceback
                    traceback.print_exc()
        wrappers = [os.path.join(d, f) for d, _, fs in os.walk(cache) for f in fs
                    if f.endswith(".py") and "def call(" in open(os.path.join(d, f)).read()]
        if not wrappers:
            sys.exit(f"inductor wrote no graph wrapper ({type(error).__name__}: {str(error)[:300]}): this torch "
                     f"release needs the script adapted")
        return open(max(wrappers, key=os.path.getsize)).read()
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def layout_changes(src: str) -> list:
    """[(kernel, launches, elements per launch, why)] of the kernels that change an activation's layout."""
    launches = collections.Counter(re.findall(r"^\s*(triton_\w+)\.run\(", src, re.M))
    out = []
    for name, body in re.findall(r"def (triton_\w+)\((.*?)\n'''", src, re.S):
        numel = re.search(r"xnumel = (\d+)", body)
        ynumel = re.search(r"ynumel = (\d+)", body)
        n = (int(numel.group(1)) if numel else 0) * (int(ynumel.group(1)) if ynumel else 1)
        why = None
        if "YBLOCK" in body:
            why = "2-D tiled kernel (a transpose)"
        elif re.search(r"\bx0 = \(?xindex % \d+\)?", body):
            for index in re.findall(r"tl\.(?:load|store)\(\w+ \+ \(([^)]*)\)", body):
                if re.search(r"(?<![\w])\d{4,}\*x0\b", index):
                    why = f"gather: the fastest index x0 strides {index[:50]}"
                    break
        if why and launches[name]:
            out.append((name, launches[name], n, why))
    return sorted(out, key=lambda r: -r[1] * r[2])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--config", default="imagenet256_uncond", help="an ADM_CONFIGS name (default: the paper's model)")
    p.add_argument("--stats", default="channel", choices=("group", "channel"), help="GroupNorm32.nhwc_stats")
    p.add_argument("--plain-cat", action="store_true", help="torch.cat for the skip connections (before the fix)")
    p.add_argument("--min-elements", type=float, default=1e7, help="list kernels moving at least this many")
    p.add_argument("--wrapper", metavar="PATH", help="also write the generated wrapper here")
    a = p.parse_args()
    from diffaug_kernels.models import ADM_CONFIGS

    src = generate(a.batch, a.size, dict(ADM_CONFIGS[a.config]), a.stats, a.plain_cat)
    if a.wrapper:
        with open(a.wrapper, "w") as f:
            f.write(src)
    rows = [r for r in layout_changes(src) if r[1] * r[2] >= a.min_elements]
    launches = len(re.findall(r"^\s*triton_\w+\.run\(", src, re.M))
    print(f"torch {torch.__version__}: {launches} Triton launches, "
          f"{len(rows)} layout-changing kernels moving >= {a.min_elements:.0e} elements")
    for name, calls, n, why in rows:
        print(f"  {calls} x {n:>13,}  {name}  {why}")
    print(f"elements through layout-changing kernels: {sum(c * n for _, c, n, _ in rows):.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

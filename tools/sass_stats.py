"""Static instruction counts of the CUDA kernels' sm_90 code (the built extension's SASS; no GPU needed): for the
planar forward-noise kernel's variants and philox_normal's kernel, the registers, stack, per-thread set-up, the
main loop and the instructions per element a thread runs (set-up + one pass of the loop, the assert's never-run
branch left out, over the elements of that pass: one K block; philox_normal's grid-stride loop alone). The
forward-noise kernels are bound by this arithmetic (81% of issue slots busy on an H100: Nsight Compute, the
ncu step of tools/gpu_check.sh), so fewer instructions per element is the lever their speed has; only a GPU run
says how much. Counts include code in the loop that valid inputs never reach (libm's huge-argument sincos in the
libm kernel).

    python tools/sass_stats.py [PATH of an extension .so or a cubin; default: the loaded extension] [--triton]

--triton adds the Triton planar forward-noise kernel's counts per autotune config (compiled here for sm_90).
"""
import re
import shutil
import subprocess
import sys

from diffaug_kernels.bench import sass
from diffaug_kernels.ops import extension

BYTES = {"c10::BFloat16": 2, "c10::Half": 2, "float": 4, "double": 8}


def demangle(names):
    if shutil.which("c++filt") is None:
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    paths = [a for a in argv if not a.startswith("--")]
    binary = paths[0] if paths else (extension.C.__file__ if extension.has_kernel("CUDA") else None)
    if binary is None:
        print("sass_stats: the extension has no CUDA kernels here (built without nvcc?)", file=sys.stderr)
        return 2
    ks = sass.kernels(binary)
    rows = []
    for k, full in zip(ks, demangle([k.name for k in ks])):
        # (builds from older sources have no unit / order arguments: 1 unit, plane-major; nor the math choice;
        # older ones still name the kernels noise_plane_kernel and normal_kernel)
        m = re.search(r"(?:forward_)?noise_plane_kernel<([\w:]+), ([\w:]+), (\d+)(?:, (\d+), (true|false))?>", full)
        n = re.search(r"(?:philox_)?normal_kernel(?:<(true|false)>)?\(", full)
        setup, loop, cold = sass.outer_loop(k)
        if m and m.group(1) == m.group(2):
            units = int(m.group(4) or 1)
            elems = 4 * int(m.group(3)) * units
            what = (f"forward_noise_plane {m.group(1).split('::')[-1]:<8} {units} unit(s), "
                    f"{'memory order' if m.group(5) == 'true' else 'plane-major'}")
            per = (setup + loop - cold) / elems
        elif n:  # a grid-stride loop: each thread makes many passes, its set-up is spread over them
            elems, per = 4, (loop - cold) / 4
            what = "philox_normal" + {"true": ", libm math", "false": ", philox.h math", None: ""}[n.group(1)]
        else:
            continue
        rows.append((what, k.regs, k.stack, setup, loop - cold, elems, per))
    print(f"{binary}\n{'kernel':<54}{'regs':>5}{'stack':>6}{'set-up':>7}{'loop':>6}{'elems':>6}{'instr/elem':>11}")
    for r in sorted(rows):
        print(f"{r[0]:<54}{r[1]:>5}{r[2]:>6}{r[3]:>7}{r[4]:>6}{r[5]:>6}{r[6]:>11.1f}")
    if "--triton" in argv:
        triton_rows()
    return 0


def triton_rows():
    """The Triton planar forward-noise kernel, compiled for sm_90 as a contiguous 256x3x224x224 forward_noise call
    gets it (sizes, strides and pointers divisible by 16, unit strides and K = 1 specialised), for each autotune
    config: straight-line code (K = 1 unrolls the loop), so instructions per element are all of them over the
    elements one thread handles."""
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from diffaug_kernels.ops import triton_kernels as tk

    fn = tk.forward_noise_plane_kernel
    names = fn.arg_names
    const_names = [names[i] for i in fn.constexprs]
    print(f"\nTriton {triton.__version__}, forward_noise_plane_kernel for sm_90\n"
          f"{'data':<6}{'BLOCK':>6}{'warps':>6}{'regs':>5}{'stack':>6}{'instr':>6}{'elems':>6}{'instr/elem':>11}")
    for data in ("bf16", "fp32"):
        for cfg in tk.CONFIGS:
            block, warps = cfg.kwargs["BLOCK"], cfg.num_warps
            sig, const, attrs = {}, {}, {}
            for i, n in enumerate(names):
                if n in const_names:
                    sig[n], const[n] = "constexpr", (False if n == "F64" else block)
                elif n in ("xss", "oss", "tb", "K"):  # Triton specialises an int argument equal to 1
                    sig[n], const[n] = "constexpr", 1
                else:
                    sig[n] = ("*i64" if n in ("t_ptr", "seed_ptr", "off_ptr") else "*fp32" if n in ("ca_ptr", "cb_ptr")
                              else "*" + data if n.endswith("_ptr") else "i32")
                    if n not in ("T", "B", "C"):  # 1000, 256, 3: not multiples of 16
                        attrs[(i,)] = [["tt.divisibility", 16]]
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                               target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(k.asm["cubin"])
                f.flush()
                kern = sass.kernels(f.name)[0]
            elems = block * 4 // (32 * warps)
            print(f"{data:<6}{block:>6}{warps:>6}{kern.regs:>5}{kern.stack:>6}{len(kern.sass):>6}{elems:>6}"
                  f"{len(kern.sass) / elems:>11.1f}")


if __name__ == "__main__":
    sys.exit(main())

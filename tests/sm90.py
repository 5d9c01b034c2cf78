"""Compiles the package's Triton launches for Hopper (sm_90) on a machine without a GPU, as a GPU launch would:
the launcher runs on CPU tensors with its autotuned kernel swapped for a recorder, the real autotuner prunes its
configs for those arguments (its prune_configs, as Autotuner.run calls it), and each kept config is compiled with
Triton's own argument specialisation of the recorded arguments (integers equal to 1 become constants, 16-divisible
integers and 16-aligned pointers get divisibility hints). The interpreter, which the other tests use, runs the
kernels' Python only; this is how the launchers' arguments, the pruning and the code a GPU would get are checked.

Run in a process with TRITON_INTERPRET=0 (the kernels module picks autotuned kernels at import); the tests start
one (run_script)."""
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run_script(body: str, tmp_path, timeout: int = 600) -> subprocess.CompletedProcess:
    """python -c body with TRITON_INTERPRET=0, a fresh Triton cache and this folder importable."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", body], env=env, capture_output=True, text=True, timeout=timeout)


class _Recorder:
    """Stands in for an autotuned kernel: kernel[grid](*args, **kwargs) keeps the arguments."""

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.args, self.kwargs = args, kwargs
        return record


def launch_configs(owner, attr: str, call):
    """[(config, CompiledKernel)] for the launch call() makes of owner.<attr> (an autotuned Triton kernel): every
    config the autotuner keeps for those arguments, compiled for sm_90."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    tuner = getattr(owner, attr)
    rec = _Recorder()
    setattr(owner, attr, rec)
    try:
        call()
    finally:
        setattr(owner, attr, tuner)
    fn = tuner.fn
    tuner.nargs = dict(zip(tuner.arg_names, rec.args))
    try:
        configs = tuner.prune_configs(rec.kwargs)
    finally:
        tuner.nargs = None
    out = []
    for cfg in configs:
        values = dict(zip(fn.arg_names, rec.args), **rec.kwargs, **cfg.kwargs)
        missing = [p.name for p in fn.params if p.name not in values]
        assert not missing, f"{fn.__name__}: the launch does not give {missing}"
        sig, const, attrs = {}, {}, {}
        for i, p in enumerate(fn.params):
            v = values[p.name]
            if p.is_constexpr:
                sig[p.name], const[p.name] = "constexpr", v
                continue
            ty, key = native_specialize_impl(BaseBackend, v, p.is_const, not p.do_not_specialize,
                                             not p.do_not_specialize_on_alignment)
            sig[p.name] = ty
            if ty == "constexpr":
                const[p.name] = key
            elif key == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        out.append((cfg, k))
    return out


def global_accesses(ptx: str, op: str) -> list:
    """Bytes moved by each global load (op "ld") or store ("st") instruction of a PTX listing."""
    return [int(v or 1) * int(bits) // 8
            for v, bits in re.findall(op + r"\.global(?:\.[a-z0-9_]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b", ptx)]

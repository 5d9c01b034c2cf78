"""Build of diffaug_kernels: one compiled extension, diffaug_kernels._C, through torch's cpp_extension.

Never downloads anything (use `pip install --no-build-isolation -e .`, torch must already be installed).
C++ sources (csrc/*.cpp) always build where a compiler is; CUDA sources (csrc/*.cu) are added when torch has
CUDA and a CUDA toolkit with nvcc is found. If the extension cannot be built the package is still installed
and runs on the reference backend (it says so once at import).

Environment: DIFFAUG_NO_EXT=1 skips the extension; DIFFAUG_CPU_ARCH overrides -march (default: native);
DIFFAUG_VEC_REPORT=1 prints GCC's vectorisation report; CUDA_HOME points at the toolkit; TORCH_CUDA_ARCH_LIST
defaults to 9.0 (Hopper).
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def find_cuda_home():
    """The real toolkit folder: CUDA_HOME if set, else the nvcc on PATH (following wrapper scripts)."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a wrapper script such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
            with open(nvcc, "rb") as f:
                head = f.read(4096).decode("utf-8", "replace")
            for tok in head.split():
                if tok.endswith("/bin/nvcc"):
                    cands.append(os.path.dirname(os.path.dirname(tok)))
        except OSError:
            pass
    cands += sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    for c in cands:
        if c and os.path.isfile(os.path.join(c, "bin", "nvcc")) and os.path.isfile(
            os.path.join(c, "include", "cuda_runtime.h")
        ):
            return c
    return None


def extensions():
    if os.environ.get("DIFFAUG_NO_EXT") == "1":
        return [], {}
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.stderr.write("diffaug_kernels: torch is not installed; building without the extension\n")
        return [], {}
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    cuda_home = find_cuda_home() if cuda_sources else None
    use_cuda = bool(cuda_sources) and cuda_home is not None and torch.version.cuda is not None
    if use_cuda:
        os.environ["CUDA_HOME"] = cuda_home  # must be set before cpp_extension is imported
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    import runpy

    from torch.utils import cpp_extension

    # csrc/'s fingerprint in a generated header only ops.cpp includes: an edit recompiles ops.cpp alone for it
    src_hash = runpy.run_path(os.path.join(ROOT, "diffaug_kernels", "ops", "sources.py"))["sources_hash"](
        os.path.join(ROOT, "csrc"))
    gen = os.path.join(ROOT, "build", "generated")
    os.makedirs(gen, exist_ok=True)
    header, text = os.path.join(gen, "dk_sources_hash.h"), f"#define DK_SOURCES_HASH {src_hash}LL\n"
    if not os.path.exists(header) or open(header).read() != text:
        with open(header, "w") as f:
            f.write(text)
    arch = os.environ.get("DIFFAUG_CPU_ARCH", "native")
    # -fopenmp: at::parallel_for is inline `#pragma omp parallel` (without it, kernels run on one thread); the
    # libgomp.so.1 it links resolves at run time to the copy torch already loaded (same SONAME), one runtime.
    cxx = ["-O3", f"-march={arch}", "-fno-math-errno", "-fopenmp", "-DNDEBUG"]
    if os.environ.get("DIFFAUG_VEC_REPORT") == "1":
        cxx += ["-fopt-info-vec-optimized"]
    sources = sorted(glob.glob("csrc/*.cpp"))
    kwargs = dict(name="diffaug_kernels._C", sources=sources, include_dirs=[os.path.join(ROOT, "csrc"), gen],
                  extra_link_args=["-fopenmp"])
    if use_cuda:
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        ext = cpp_extension.CUDAExtension(
            sources=sources + cuda_sources,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            library_dirs=[os.path.join(cuda_home, "lib"), os.path.join(cuda_home, "lib64")],
            **{k: v for k, v in kwargs.items() if k != "sources"},
        )
    else:
        ext = cpp_extension.CppExtension(extra_compile_args=cxx, **kwargs)

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """A failed CUDA compile falls back to the CPU kernels; a failed C++ compile leaves a working package
        on the reference backend. Either way the reason is printed."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001
                if not any(s.endswith(".cu") for s in ext.sources):
                    raise
                sys.stderr.write(f"\n*** diffaug_kernels: the CUDA sources failed to compile ({e}); "
                                 "building the CPU kernels only ***\n\n")
                ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
                ext.extra_compile_args = {"cxx": ext.extra_compile_args["cxx"]}
                super().build_extension(ext)

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - any build failure must not break the install
                sys.stderr.write(f"\n*** diffaug_kernels: the compiled extension failed to build ({e}); "
                                 "the package will run on the reference backend ***\n\n")

    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="diffaug-kernels",
    version="0.1.0",
    description="Fused CPU/CUDA/Triton kernels for DiffAug (diffuse-and-denoise augmentation)",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["diffaug_kernels", "diffaug_kernels.*"]),
    package_data={"diffaug_kernels": ["weights/*.safetensors"]},
    install_requires=["torch>=2.4", "numpy", "safetensors", "scikit-learn", "scipy", "timm"],
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis"]},
    entry_points={"console_scripts": ["diffaug=diffaug_kernels.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)

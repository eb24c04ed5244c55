"""Build fastoptim: a pure-Python package plus, when CUDA can be built, the extension fastoptim._C.

Environment knobs
-----------------
FASTOPTIM_CUDA        auto (default): build the extension when nvcc and a CUDA build of torch are present;
                      1: build it or fail loudly; 0: skip it (pure-Python install).
TORCH_CUDA_ARCH_LIST  architectures to compile for (default "8.0;9.0": Ampere and Hopper).
MAX_JOBS              parallel compile jobs for ninja (default: capped by cores and memory).
CUDA_HOME             the CUDA toolkit; when unset, /usr/local/cuda is preferred over guessing from
                      `nvcc` on PATH (which may be a wrapper script in /usr/local/bin).
FASTOPTIM_CUBLASLT    auto (default): link cuBLASLt (the Newton–Schulz drivers' GEMMs with a separate addend)
                      when its header and library are found, in torch's nvidia wheels first, then CUDA_HOME;
                      1: fail loudly when they are not; 0: build without it (ATen's bmm/baddbmm instead).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGE_DIR = {"fastoptim": "python/fastoptim", "fastoptim.triton_kernels": "triton_kernels"}
PACKAGES = ["fastoptim." + name for name in find_packages("python/fastoptim")] + [
    "fastoptim",
    "fastoptim.triton_kernels",
]
PACKAGE_DATA = {"fastoptim.data": ["*.txt.xz", "PROVENANCE.md"]}


def _log(msg: str) -> None:
    sys.stderr.write(f"[fastoptim setup] {msg}\n")


def _cuda_mode() -> str:
    mode = os.environ.get("FASTOPTIM_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"FASTOPTIM_CUDA must be auto, 0 or 1, got {mode!r}")
    return mode


def _find_cuda_home() -> str | None:
    """CUDA_HOME if set; else /usr/local/cuda if it holds nvcc; else the real path of `nvcc` on PATH.

    torch guesses CUDA_HOME as dirname(dirname(which nvcc)); with a wrapper in /usr/local/bin that
    gives /usr/local, which has no lib64/libcudart and the link fails.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        home = os.path.dirname(os.path.dirname(real))
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def _find_cublaslt(torch_dir: str, cuda_home: str) -> tuple[str, str] | None:
    """(include dir, library file) of cuBLASLt, from one place: the nvidia wheels next to torch (the library
    torch itself loads), else CUDA_HOME. None when neither has both."""
    site = os.path.dirname(torch_dir)
    places = [os.path.join(site, "nvidia", sub) for sub in ("cu13", "cublas", "cu12")] + [cuda_home]
    for place in places:
        header = os.path.join(place, "include", "cublasLt.h")
        libs = sorted(lib for sub in ("lib", "lib64") for lib in glob.glob(os.path.join(place, sub, "libcublasLt.so*")))
        if os.path.exists(header) and libs:
            return os.path.dirname(header), libs[0]
    return None


def _default_max_jobs() -> str:
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = 8.0
    # nvcc on a torch translation unit can take ~3 GiB
    return str(max(1, min(cores, int(mem_gib // 3))))


def _extension_modules():
    mode = _cuda_mode()
    if mode == "0":
        _log("FASTOPTIM_CUDA=0: skipping the CUDA extension")
        return [], {}

    def give_up(reason: str):
        if mode == "1":
            raise SystemExit(f"FASTOPTIM_CUDA=1 but the CUDA extension cannot be built: {reason}")
        _log(f"not building the CUDA extension: {reason}")
        return [], {}

    cuda_home = _find_cuda_home()
    if cuda_home is None:
        return give_up("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
    # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import time.
    os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as exc:  # pragma: no cover - torch is a build requirement
        return give_up(f"torch is not importable ({exc}); install torch first and use --no-build-isolation")
    if torch.version.cuda is None:
        return give_up(f"torch {torch.__version__} is a CPU-only build")

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    os.environ.setdefault("MAX_JOBS", _default_max_jobs())
    _log(
        f"building fastoptim._C with CUDA_HOME={cuda_home}, "
        f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, MAX_JOBS={os.environ['MAX_JOBS']}"
    )
    include_dirs = [os.path.join(ROOT, "csrc")]
    lt_flags, link_args = [], []
    lt_mode = os.environ.get("FASTOPTIM_CUBLASLT", "auto").strip().lower()
    if lt_mode not in ("auto", "0", "1"):
        raise SystemExit(f"FASTOPTIM_CUBLASLT must be auto, 0 or 1, got {lt_mode!r}")
    lt = _find_cublaslt(os.path.dirname(torch.__file__), cuda_home) if lt_mode != "0" else None
    if lt is not None:
        # Only csrc/gemm_lt.cu includes cublasLt.h. Its folder (an nvidia wheel's include/) also holds
        # cuda_runtime.h and the other toolkit headers of that wheel's CUDA: -isystem, searched after every -I
        # (CUDA_HOME/include among them), keeps nvcc's own toolkit headers first. The library by its path: the
        # link records its soname (libcublasLt.so.13), which the loader matches to the copy torch has loaded.
        lt_flags += ["-DFASTOPTIM_HAVE_CUBLASLT", "-isystem", lt[0]]
        link_args.append(lt[1])
        _log(f"linking cuBLASLt: {lt[1]} (header in {lt[0]})")
    elif lt_mode == "1":
        raise SystemExit("FASTOPTIM_CUBLASLT=1 but no cublasLt.h with a libcublasLt.so beside it was found")
    else:
        _log("building without cuBLASLt (not found or FASTOPTIM_CUBLASLT=0): the NS drivers use ATen's GEMMs")
    sources = sorted(
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*.cu"))
    ) + ["csrc/bindings.cpp"]
    ext = CUDAExtension(
        name="fastoptim._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={
            # Only bindings.cpp sees it (the .cu files take no torch headers): fastoptim._C.TORCH_VERSION.
            "cxx": ["-O3", f"-DFASTOPTIM_TORCH_VERSION={torch.__version__}"],
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr", *lt_flags],
        },
        extra_link_args=link_args,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_modules()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data=PACKAGE_DATA,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

"""csrc/ follows the build contract: kernels and launchers without torch headers, one bindings file."""

from __future__ import annotations

import os
import pathlib

import pytest

CSRC = pathlib.Path(__file__).resolve().parents[1] / "csrc"


def test_only_bindings_includes_torch_headers():
    for path in CSRC.iterdir():
        if path.suffix in (".cu", ".cuh", ".h") :
            text = path.read_text()
            assert "#include <torch" not in text and "#include <ATen" not in text, path.name
    bindings = (CSRC / "bindings.cpp").read_text()
    assert "ATen/cuda/CUDAContext.h" not in bindings  # pulls in cuSPARSE headers; use c10/cuda/CUDAStream.h
    assert [p.name for p in CSRC.glob("*.cpp")] == ["bindings.cpp"]


def test_sdist_carries_every_source_file(tmp_path):
    """`pip install` from an sdist builds the extension from csrc/: the sdist must hold every tracked
    source (the .cu kernels and their headers too, which setuptools would not add by itself). Built
    from a copy of the tracked files, so that the checkout's egg-info is left alone."""
    import shutil
    import subprocess
    import sys
    import tarfile

    root = CSRC.parent
    if not (root / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    listing = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True)
    tracked = [f for f in listing.stdout.splitlines() if (root / f).is_file()]
    tree = tmp_path / "tree"
    for f in tracked:
        (tree / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / f, tree / f)
    shipped = ("csrc", "python", "triton_kernels", "tests", "bench", "examples")
    wanted = {f for f in tracked if f.split("/")[0] in shipped}
    wanted |= {"setup.py", "pyproject.toml", "README.md", "Makefile"}
    env = {**os.environ, "FASTOPTIM_CUDA": "0"}  # the file list does not depend on building
    subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path)],
        cwd=tree, env=env, capture_output=True, text=True, check=True,
    )
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    missing = sorted(wanted - names)
    assert not missing, f"the sdist lacks {missing}"


# --------------------------------------------------------------------------------------------------
# The built extension's machine code (cuobjdump; no GPU needed): what makes the kernels fast.

# Kernels with a kPacked template flag (their last template argument): the packed variant reads 16-byte
# vectors (SASS LDG.E.128), the scalar one (sizes or addresses that do not allow packs) never does.
PACKED_KERNELS = ("normuon_row_stats_kernel", "normuon_apply_kernel", "normuon_stack_row_stats_kernel",
                  "normuon_stack_apply_kernel", "muon_apply_stack_kernel", "muon_apply_kernel",
                  "muon_momentum_kernel", "muon_momentum_stack_kernel", "sophia_step_kernel", "hessian_ema_kernel",
                  "sum_squares_kernel", "scale_cast_kernel")
# The .cu files that define them (only these are disassembled).
PACKED_SOURCES = ("normuon", "apply_stack", "muon_apply", "momentum", "sophia", "ns_prologue")


def _cuobjdump() -> str | None:
    """cuobjdump from PATH or the CUDA toolkit, else the copy triton's package carries."""
    import importlib.util
    import shutil

    found = shutil.which("cuobjdump") or ("/usr/local/cuda/bin/cuobjdump"
                                          if os.path.exists("/usr/local/cuda/bin/cuobjdump") else None)
    spec = importlib.util.find_spec("triton")
    if found is None and spec is not None:
        bundled = pathlib.Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        found = str(bundled) if bundled.exists() else None
    return found


@pytest.fixture(scope="module")
def hopper_sass(tmp_path_factory) -> tuple[list[str], dict[str, str]]:
    """(the cubins of fastoptim._C, {mangled kernel name: SASS} of the sm_90 code of PACKED_SOURCES)."""
    import importlib.util
    import re
    import subprocess

    spec = importlib.util.find_spec("fastoptim._C")
    if spec is None or spec.origin is None:
        pytest.skip("fastoptim._C is not built here (FASTOPTIM_CUDA=0 or no CUDA toolkit)")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton's bundled copy)")
    listing = subprocess.run([tool, "--list-elf", spec.origin], capture_output=True, text=True, check=True).stdout
    cubins = re.findall(r"(\S+\.cubin)", listing)
    arches = {name.split(".")[-2] for name in cubins}
    hopper = sorted(arch for arch in arches if arch.startswith("sm_90"))
    if not hopper:
        pytest.skip(f"fastoptim._C was built without sm_90 ({sorted(arches)}; TORCH_CUDA_ARCH_LIST)")
    folder = tmp_path_factory.mktemp("cubins")
    sass = ""
    for source in PACKED_SOURCES:
        cubin = f"{source}.{hopper[0]}.cubin"
        subprocess.run([tool, "-xelf", cubin, spec.origin], cwd=folder, capture_output=True, check=True)
        sass += subprocess.run([tool, "-sass", str(folder / cubin)], capture_output=True, text=True, check=True).stdout
    functions: dict[str, str] = {}
    for block in re.split(r"\n\s*Function : ", sass)[1:]:
        name, _, body = block.partition("\n")
        functions[name.strip()] = body
    return cubins, functions


def test_extension_holds_hopper_code_for_every_kernel_file(hopper_sass):
    cubins, _ = hopper_sass
    sources = sorted(p.stem for p in CSRC.glob("*.cu"))
    hopper = {name.split(".")[0] for name in cubins if name.split(".")[-2].startswith("sm_90")}
    assert hopper == set(sources), f"no sm_90 code for {sorted(set(sources) - hopper)}"


@pytest.mark.parametrize("kernel", PACKED_KERNELS)
def test_packed_kernels_load_16_bytes(hopper_sass, kernel):
    """Where the source uses packs, the sm_90 machine code has 16-byte vector loads (every dtype combination)."""
    import re

    _, functions = hopper_sass
    variants: dict[str, list[str]] = {"1": [], "0": []}
    for name, body in functions.items():
        found = re.search(rf"\d{kernel}I.*?Lb([01])EE", name)
        if found:
            variants[found.group(1)].append(name if "LDG.E.128" in body else "")
    packed, scalar = variants["1"], variants["0"]
    assert len(packed) >= 3 and len(scalar) == len(packed), (kernel, len(packed), len(scalar))
    assert all(packed), f"{kernel}: packed variants without LDG.E.128: {packed.count('')} of {len(packed)}"
    assert not any(scalar), f"{kernel}: 16-byte loads in the scalar variant {[n for n in scalar if n]}"

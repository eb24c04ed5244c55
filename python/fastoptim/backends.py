"""Which backend runs an op: what can run here, why not, and the choice for one call.

Three backends compute the same functions:
- ``cuda``: hand-written CUDA in csrc/, compiled into ``fastoptim._C``; CUDA tensors only.
- ``triton``: hand-written Triton in ``fastoptim.triton_kernels``; CUDA tensors, or CPU tensors
  when ``TRITON_INTERPRET=1`` (the interpreter; how CI tests it).
- ``torch``: ``fastoptim.reference``, pure PyTorch; runs everywhere.

The ops are declared once in `fastoptim.ops`; each backend's module registers its kernels in
`fastoptim._registry` (``@register_kernel(op, backend, supports=...)``) when it is imported, and this
module imports it the first time that backend can run here. A backend runs an op when it is
available, the tensors are on a device it runs on, it registered a kernel for the op and that
kernel's ``supports`` predicate accepts the arguments.

``backend="auto"`` picks, for CUDA tensors, the first of cuda -> triton -> torch that can run the op
on these arguments; for CPU tensors, torch. ``FASTOPTIM_BACKEND`` (cuda|triton|torch) replaces
``"auto"``; an explicit ``backend=`` argument wins over it. Asking for a backend that cannot run
raises BackendUnavailableError saying why.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from . import _registry
from ._registry import CHOICES, NAMES, check_backend_name

__all__ = ["CHOICES", "NAMES", "BackendStatus", "BackendUnavailableError", "available", "check_backend_name",
           "eager_select", "implementation", "interpreter_conflict", "select"]


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run this op, on this machine or on these tensors."""


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


_REBUILD = "FASTOPTIM_CUDA=1 pip install --no-build-isolation -e ."


@functools.cache
def _cuda_status() -> BackendStatus:
    try:
        from . import _C
    except ImportError as exc:
        if "undefined symbol" in str(exc):  # the usual sign of a build against another torch
            return BackendStatus(
                "cuda",
                False,
                f"fastoptim._C does not load with the running torch {torch.__version__} ({exc}): it was most likely "
                f"built against another torch (pip's build isolation installs its own); rebuild with {_REBUILD}",
            )
        return BackendStatus(
            "cuda",
            False,
            f"the extension fastoptim._C is not built ({exc}); reinstall on a machine with nvcc and a CUDA "
            f"build of torch ({_REBUILD})",
        )
    built_with = getattr(_C, "TORCH_VERSION", torch.__version__)
    if built_with != torch.__version__:
        return BackendStatus(
            "cuda",
            False,
            f"fastoptim._C was built against torch {built_with}, this is torch {torch.__version__} (torch has no "
            f"stable C++ ABI); rebuild with {_REBUILD}",
        )
    if not torch.cuda.is_available():
        return BackendStatus("cuda", False, "the extension fastoptim._C is built, but no CUDA GPU is visible")
    return BackendStatus("cuda", True, f"fastoptim._C on {torch.cuda.get_device_name()}")


@functools.cache
def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def interpreter_conflict() -> str | None:
    """Why Triton's interpreter cannot run here, or None. Triton 3.6 and older convert the 1-element
    arrays that hold scalars with int(), which numpy 2.4 refuses: every kernel whose loop bound is a
    scalar fails with "only 0-dimensional arrays can be converted to Python scalars". Triton 3.7 fixed it."""
    version = _triton_version()
    if version is None:
        return None
    import numpy
    from packaging.version import Version

    if Version(version).release < (3, 7) and Version(numpy.__version__).release >= (2, 4):
        return (
            f"triton {version}'s interpreter cannot run with numpy {numpy.__version__} (it needs numpy<2.4; "
            "triton>=3.7 works with both)"
        )
    return None


def _triton_status() -> BackendStatus:
    version = _triton_version()
    if version is None:
        return BackendStatus("triton", False, "triton is not installed")
    if _triton_interpret():
        conflict = interpreter_conflict()
        if conflict is not None:
            return BackendStatus("triton", False, f"TRITON_INTERPRET=1, but {conflict}")
        return BackendStatus(
            "triton", True, f"triton {version}, TRITON_INTERPRET=1: kernels run on CPU tensors"
        )
    if not torch.cuda.is_available():
        return BackendStatus(
            "triton",
            False,
            f"triton {version} is installed, but no GPU is visible "
            "(TRITON_INTERPRET=1 runs its kernels on CPU tensors)",
        )
    return BackendStatus("triton", True, f"triton {version} on {torch.cuda.get_device_name()}")


def _torch_status() -> BackendStatus:
    return BackendStatus("torch", True, f"pure PyTorch {torch.__version__}; runs on every device")


_STATUS = {"cuda": _cuda_status, "triton": _triton_status, "torch": _torch_status}


def available() -> dict[str, BackendStatus]:
    """Each backend's status here: whether it can run, and the reason (why not, or on what)."""
    return {name: status() for name, status in _STATUS.items()}


_MODULES = {
    "torch": "fastoptim._torch_backend",
    "cuda": "fastoptim._cuda_backend",
    "triton": "fastoptim.triton_kernels",
}


_LOADED: dict[str, ModuleType] = {}


def _module(name: str) -> ModuleType:
    """Import a backend's module, which registers its kernels (`fastoptim._registry.register_kernel`).
    A plain dict, not functools.cache: compiled steps call `select`, and dynamo traces through it."""
    module = _LOADED.get(name)
    if module is None:
        module = _LOADED[name] = importlib.import_module(_MODULES[name])
    return module


def _why_not(name: str, op: str, device: torch.device, args: tuple) -> str | None:
    """None if backend `name` can run `op` on tensors of `device` (the device the call is for: meta
    stand-ins are checked as tensors of `device`) with these kernel arguments, else why not."""
    if name != "torch":  # torch runs every op on every device
        status = _STATUS[name]()
        if not status.available:
            return status.reason
        if name == "cuda" and device.type != "cuda":
            return f"it runs on CUDA tensors, got {device.type} tensors"
        if name == "triton" and device.type != "cuda" and not (device.type == "cpu" and _triton_interpret()):
            return f"it runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device.type} tensors"
    _module(name)
    kernel = _registry.kernel(op, name)
    if kernel is None:
        return f"the {name} backend has no {op} kernel yet"
    # Without arguments the question is only whether the backend has the op for this device.
    return kernel.supports(*args) if kernel.supports is not None and args else None


def select(op: str, backend: str, device: torch.device, args: tuple = ()) -> str:
    """The backend that runs `op` on tensors of `device` with these (kernel) arguments."""
    check_backend_name(backend)
    if backend == "auto":
        forced = os.environ.get("FASTOPTIM_BACKEND", "").strip().lower()
        if forced and forced != "auto":
            backend = check_backend_name(forced, "FASTOPTIM_BACKEND")
    if backend != "auto":
        reason = _why_not(backend, op, device, args)
        if reason is not None:
            raise BackendUnavailableError(f"backend {backend!r} cannot run {op} here: {reason}")
        return backend
    order = NAMES if device.type == "cuda" else ("torch",)
    for name in order:
        if _why_not(name, op, device, args) is None:
            return name
    raise BackendUnavailableError(f"no backend can run {op} on {device} tensors")  # torch always can


def eager_select(op: str, backend: str, device: torch.device, args: tuple = ()) -> str:
    """`select` when running eagerly, so that an unusable backend fails before any tensor changes;
    under torch.compile the choice is left to the op's runtime (`implementation`), keeping the
    traced graph free of this Python logic."""
    if torch.compiler.is_compiling():
        return check_backend_name(backend)
    return select(op, backend, device, args)


def implementation(op: str, backend: str, device: torch.device, args: tuple = ()) -> Callable:
    """The function that computes `op` on these kernel arguments, at run time (inside the custom op).

    "auto" (what a compiled graph carries) is resolved here on the actual arguments. A concrete
    backend was already checked against the arguments by `eager_select`; only its availability is
    checked again, so per-tensor predicates (a loop over a Sophia list) do not run twice a call."""
    if backend == "auto":
        backend = select(op, backend, device, args)
    else:
        reason = _why_not(backend, op, device, ())
        if reason is not None:
            raise BackendUnavailableError(f"backend {backend!r} cannot run {op} here: {reason}")
    return _registry.kernel(op, backend).fn

"""The op registry: each fastoptim op is declared once, and each backend registers its implementation
of it by name (as bitsandbytes' ``_ops.py`` and ``register_kernel`` do).

Adding an op
    1. Declare it in ``fastoptim/ops.py`` with ``define``: the public function (its signature and
       docstring are the API docs; its body checks the arguments, raising before any tensor changes,
       and returns a `Call`), the custom op's annotated schema (``backend: str`` last), a fake only if
       it returns a tensor, the argument whose device it runs on, and ``kernel_args`` if the
       implementations take other arguments than the custom op.
    2. Write the specification in ``fastoptim/reference.py`` (readable PyTorch, from the paper) and
       register it in ``fastoptim/_torch_backend.py``: every op has a torch implementation.
    3. Register kernels in the backend modules: ``@register_kernel("<op>", "triton", supports=...)``
       in ``triton_kernels/<family>.py``, ``@register_kernel("<op>", "cuda", supports=...)`` in
       ``fastoptim/_cuda_backend.py``. ``supports(*kernel_args)`` returns None or the reason the kernel
       cannot run these arguments (auto dispatch then moves on); it also sees meta stand-ins
       (`fastoptim.ops.check_call`), so it reads dtypes, shapes and strides, never data.
    4. Test: the reference against float64 math (tests/test_reference.py), each kernel against the
       reference, bad input (tests/test_ops_errors.py), and an opcheck case (tests/test_dispatch.py).

A backend module registers its kernels when it is imported; `fastoptim.backends` imports it only
when that backend can run here (the Triton package: triton and a GPU or TRITON_INTERPRET=1; the cuda
module: when ``fastoptim._C`` loads), so registering never needs the backend's dependencies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

NAMES = ("cuda", "triton", "torch")
CHOICES = ("auto", *NAMES)


def check_backend_name(value: object, name: str = "backend") -> str:
    """`value` if it is one of CHOICES; else ValueError naming `name` (the one check of a backend
    argument: the ops, the optimizers and `fastoptim.backends.select` use it)."""
    if not isinstance(value, str) or value not in CHOICES:
        raise ValueError(f"{name} must be one of {CHOICES}, got {value!r}")
    return value


class Call(NamedTuple):
    """What an op's public function asks for once its arguments are checked."""

    args: tuple  # the custom op's arguments, without backend (outputs it writes already allocated)
    backend: str  # the caller's backend argument, as given
    result: Any = None  # what the public function returns, for an op that returns no tensor
    run: bool = True  # False: nothing to do (empty lists); only `backend` is still checked


@dataclass(frozen=True)
class OpSpec:
    """One declared op.

    ``op`` is the ``torch.library`` custom op ``fastoptim::<name>``; ``mutates`` names the
    arguments it writes; ``device_arg`` names the argument whose device the call runs on (a list:
    its first tensor). ``validate`` is the body of the public function: it checks the public
    arguments and returns a `Call`; `prepare` adds the backend-name check. ``kernel_args`` maps the
    custom op's arguments (without backend) to those that implementations and their ``supports``
    predicates take.
    """

    name: str
    op: Any  # torch._library.custom_ops.CustomOpDef
    mutates: tuple[str, ...]
    device_arg: str
    validate: Callable[..., Call]
    kernel_args: Callable[..., tuple]
    returns_tensor: bool
    arg_names: tuple[str, ...]  # the custom op's arguments, without backend

    def prepare(self, *args: Any, **kwargs: Any) -> Call:
        """Check the public arguments (backend included) without changing any tensor: the `Call`."""
        call = self.validate(*args, **kwargs)
        check_backend_name(call.backend)
        return call

    def device(self, op_args: tuple) -> torch.device:
        """The device the call runs on, from the custom op's arguments."""
        value = op_args[self.arg_names.index(self.device_arg)]
        return (value[0] if isinstance(value, (list, tuple)) else value).device


class Kernel(NamedTuple):
    """A backend's implementation of an op: ``fn(*kernel_args)`` and its optional predicate."""

    fn: Callable
    supports: Callable[..., str | None] | None = None


_OPS: dict[str, OpSpec] = {}
_KERNELS: dict[tuple[str, str], Kernel] = {}  # (op name, backend name) -> kernel


def declare(spec: OpSpec) -> OpSpec:
    """Add a declared op (`fastoptim.ops.define` calls this)."""
    if spec.name in _OPS:
        raise ValueError(f"op {spec.name!r} is already declared")
    _OPS[spec.name] = spec
    return spec


def op_spec(name: str) -> OpSpec:
    """The declared op `name`; ValueError listing the declared ops if there is none."""
    try:
        return _OPS[name]
    except KeyError:
        raise ValueError(f"no fastoptim op is named {name!r}; the ops are {sorted(_OPS)}") from None


def op_specs() -> Mapping[str, OpSpec]:
    """Every declared op, by name."""
    return dict(_OPS)


def register_kernel(
    op_name: str, backend_name: str, supports: Callable[..., str | None] | None = None
) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as `backend_name`'s implementation of the declared op `op_name`
    (``@register_kernel("muon_apply_", "cuda", supports=...)``). ``fn`` takes the op's kernel
    arguments; ``supports``, if given, takes the same arguments and returns None or why ``fn``
    cannot run them. Returns ``fn`` unchanged. An unknown op or backend raises ValueError, and so
    does a second, different implementation of the same op for the same backend."""
    if backend_name not in NAMES:
        raise ValueError(f"backend_name must be one of {NAMES}, got {backend_name!r}")
    if op_name not in _OPS:
        raise ValueError(
            f"the {backend_name} backend registers a kernel for {op_name!r}, which is not a declared op "
            f"(declare it in fastoptim/ops.py); the ops are {sorted(_OPS)}"
        )

    def register(fn: Callable) -> Callable:
        key = (op_name, backend_name)
        earlier = _KERNELS.get(key)
        if earlier is not None and _qualified_name(earlier.fn) != _qualified_name(fn):  # a reload re-registers
            raise ValueError(
                f"{op_name} already has a {backend_name} kernel ({_qualified_name(earlier.fn)}); "
                f"cannot also register {_qualified_name(fn)}"
            )
        _KERNELS[key] = Kernel(fn, supports)
        return fn

    return register


def _qualified_name(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def kernel(op_name: str, backend_name: str) -> Kernel | None:
    """`backend_name`'s registered implementation of `op_name`, or None (the backend module must
    have been imported; `fastoptim.backends` does that)."""
    return _KERNELS.get((op_name, backend_name))


def kernels() -> Mapping[tuple[str, str], Kernel]:
    """Every registered implementation, by (op name, backend name)."""
    return dict(_KERNELS)


class KernelTable(MutableMapping):
    """One backend's kernels as a live ``{op name: fn}`` mapping (the former ``OPS`` dicts):
    setting an entry replaces the function and keeps its predicate, so a test can route an op
    through an instrumented launcher with ``monkeypatch.setitem``."""

    def __init__(self, backend_name: str) -> None:
        self._backend = backend_name

    def __getitem__(self, op_name: str) -> Callable:
        found = kernel(op_name, self._backend)
        if found is None:
            raise KeyError(op_name)
        return found.fn

    def __setitem__(self, op_name: str, fn: Callable) -> None:
        op_spec(op_name)
        earlier = kernel(op_name, self._backend)
        _KERNELS[(op_name, self._backend)] = Kernel(fn, earlier.supports if earlier else None)

    def __delitem__(self, op_name: str) -> None:
        if kernel(op_name, self._backend) is None:
            raise KeyError(op_name)
        del _KERNELS[(op_name, self._backend)]

    def __iter__(self) -> Iterator[str]:
        return iter([op for op, backend in _KERNELS if backend == self._backend])

    def __len__(self) -> int:
        return sum(backend == self._backend for _, backend in _KERNELS)


class PredicateTable(Mapping):
    """One backend's support predicates as a read-only ``{op name: supports}`` mapping (the former
    ``SUPPORTS`` dicts); ops registered without a predicate are absent."""

    def __init__(self, backend_name: str) -> None:
        self._backend = backend_name

    def __getitem__(self, op_name: str) -> Callable[..., str | None]:
        found = kernel(op_name, self._backend)
        if found is None or found.supports is None:
            raise KeyError(op_name)
        return found.supports

    def __iter__(self) -> Iterator[str]:
        return iter([op for (op, backend), k in _KERNELS.items() if backend == self._backend and k.supports])

    def __len__(self) -> int:
        return sum(1 for _ in self)

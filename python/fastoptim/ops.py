"""The public ops: each declared once, with its checks, its torch.library custom op and its fake.

`define` declares an op (`fastoptim._registry.OpSpec`): the decorated function gives the public
signature and docstring, and its body checks the arguments (raising before any tensor changes)
and returns a `Call`; ``schema`` is the annotated signature of the ``fastoptim::<name>`` custom op
(``backend: str`` last). The public function then picks a backend (`fastoptim.backends`, from the
kernels each backend registers with `fastoptim._registry.register_kernel`) and calls the custom op,
whose implementation runs that backend's kernel. The custom ops have fake implementations (given
for an op that returns a tensor, ``None`` for one that only mutates), so `torch.compile` traces them
without a graph break and `torch.library.opcheck` passes. `check_call` runs an op's checks and
backend choice without running it (optimizers pre-check a bucket with meta stand-ins).

A custom op may not return a tensor that aliases an input; where the math would (the non-Nesterov
momentum returns the buffer itself) or where a result is optional (Sophia's unclipped fraction), the
public function allocates the output and the op writes into it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import List  # torch < 2.7 infers op schemas from typing.List only, not list[...]

import torch
from torch import Tensor

from . import _registry, backends, ns_methods
from . import _validation as check
from ._registry import Call, OpSpec
from .coefficients import Schedule, resolve


def _same(*args: object) -> tuple:
    return args


def _no_output(*args: object, **kwargs: object) -> None:
    return None


def define(
    name: str,
    *,
    schema: Callable,
    device_arg: str,
    mutates: tuple[str, ...] = (),
    fake: Callable | None = None,
    kernel_args: Callable[..., tuple] = _same,
) -> Callable[[Callable[..., Call]], Callable]:
    """Declare the op `name` and build its public function from the decorated one.

    schema: a function whose annotated signature is the custom op's (``backend: str`` last; its body
    is never run). device_arg: the schema argument whose device the call runs on (a list: its first
    tensor). mutates: the schema arguments it writes. fake: the fake implementation, for an op that
    returns a tensor (a mutating op gets one returning None). kernel_args: the custom op's arguments
    (without backend) -> those the implementations and their support predicates take.

    The public function runs the decorated body (the checks; it returns a `Call`), checks
    ``backend``, chooses the backend (`fastoptim.backends.eager_select`) and calls the custom op:
    an in-place op under no_grad (it updates leaves that require grad) returning ``Call.result``;
    an op that returns a tensor as is, so that autograd reports it has no formula.
    """

    def declare(validate: Callable[..., Call]) -> Callable:
        parameters = list(inspect.signature(schema).parameters)
        if parameters[-1:] != ["backend"]:
            raise TypeError(f"the schema of {name} must end with 'backend: str', got {parameters}")
        returns_tensor = fake is not None

        def implementation(*args: object) -> Tensor | None:
            # Runs inside the custom op; "auto" (what a compiled graph carries) is resolved here.
            *op_args, backend = args
            kernel = kernel_args(*op_args)
            out = backends.implementation(name, backend, spec.device(op_args), kernel)(*kernel)
            return out.contiguous() if returns_tensor else None

        op = torch.library.custom_op(
            f"fastoptim::{name}",
            implementation,
            mutates_args=mutates,
            schema=torch.library.infer_schema(schema, mutates_args=mutates),
        )
        op.register_fake(fake if returns_tensor else _no_output)
        spec = _registry.declare(
            OpSpec(name, op, mutates, device_arg, validate, kernel_args, returns_tensor, tuple(parameters[:-1]))
        )

        @functools.wraps(validate)
        def public(*args, **kwargs):
            call = spec.prepare(*args, **kwargs)
            if not call.run:
                return call.result
            backend = backends.eager_select(name, call.backend, spec.device(call.args), kernel_args(*call.args))
            if returns_tensor:
                return op(*call.args, backend)
            with torch.no_grad():
                op(*call.args, backend)
            return call.result

        return public

    return declare


def check_call(op_name: str, *args: object, device: torch.device | None = None, **kwargs: object) -> str:
    """Run exactly the argument checks and backend choice that ``ops.<op_name>(*args, **kwargs)``
    would, without running the op or changing any tensor, and return the chosen backend's name.

    Raises what the call would raise (TypeError/ValueError for bad arguments, BackendUnavailableError
    for a backend that cannot run them). `device` overrides the device the backend is chosen for,
    so that meta stand-ins (``torch.empty(shape, dtype=..., device="meta")`` with the real strides)
    are checked as the tensors they stand for: ``device=torch.device("cuda")`` answers as for CUDA
    tensors of those dtypes and strides. Outputs the op would allocate (muon_momentum_'s Nesterov
    output, sophia_step_'s counter) are allocated here too, on the arguments' device: on meta
    stand-ins they take no memory. A call that would do nothing (empty lists) returns ""."""
    spec = _registry.op_spec(op_name)
    call = spec.prepare(*args, **kwargs)
    if not call.run:
        return ""
    where = spec.device(call.args) if device is None else torch.device(device)
    return backends.select(op_name, call.backend, where, spec.kernel_args(*call.args))


# --------------------------------------------------------------------------------------------------
# Newton–Schulz


def _newton_schulz_schema(
    G: Tensor,
    coefficients: List[float],
    safety: float,
    eps: float,
    compute_dtype: torch.dtype,
    normalized: bool,
    backend: str,
) -> Tensor: ...


def _newton_schulz_fake(G, coefficients, safety, eps, compute_dtype, normalized, backend):
    return G.new_empty(G.shape, dtype=compute_dtype)


def _newton_schulz_kernel_args(G, coefficients, safety, eps, compute_dtype, normalized) -> tuple:
    return (G, Schedule.from_flat(coefficients, safety), eps, compute_dtype, normalized)


@define(
    "newton_schulz",
    schema=_newton_schulz_schema,
    device_arg="G",
    fake=_newton_schulz_fake,
    kernel_args=_newton_schulz_kernel_args,
)
def _standard_newton_schulz(
    G: Tensor,
    steps: int | None = None,
    coefficients: str | Sequence[Sequence[float]] | Schedule = "jordan",
    eps: float = 1e-7,
    compute_dtype: torch.dtype = torch.bfloat16,
    backend: str = "auto",
    normalized: bool = False,
) -> Tensor:
    """`newton_schulz` with method="standard" (the op fastoptim::newton_schulz)."""
    schedule, eps, compute_dtype, normalized = _newton_schulz_arguments(
        G, steps, coefficients, eps, compute_dtype, normalized
    )
    return Call((G, schedule.flat(), schedule.safety, eps, compute_dtype, normalized), backend)


def _newton_schulz_arguments(G, steps, coefficients, eps, compute_dtype, normalized) -> tuple:
    """The checks both Newton–Schulz ops make: (schedule, eps, compute_dtype, normalized), validated."""
    check.tensor("G", G, min_ndim=2)
    schedule = resolve(coefficients, steps)
    eps = check.positive("eps", eps)  # eps = 0 would divide a zero matrix by zero
    compute_dtype = check.compute_dtype("compute_dtype", compute_dtype)
    normalized = check.boolean("normalized", normalized)
    return schedule, eps, compute_dtype, normalized


def _gram_newton_schulz_schema(
    G: Tensor,
    coefficients: List[float],
    safety: float,
    eps: float,
    compute_dtype: torch.dtype,
    normalized: bool,
    restarts: List[int],
    backend: str,
) -> Tensor: ...


def _gram_newton_schulz_fake(G, coefficients, safety, eps, compute_dtype, normalized, restarts, backend):
    return G.new_empty(G.shape, dtype=compute_dtype)


def _gram_newton_schulz_kernel_args(G, coefficients, safety, eps, compute_dtype, normalized, restarts) -> tuple:
    return (G, Schedule.from_flat(coefficients, safety), eps, compute_dtype, normalized, tuple(restarts))


@define(
    "gram_newton_schulz",
    schema=_gram_newton_schulz_schema,
    device_arg="G",
    fake=_gram_newton_schulz_fake,
    kernel_args=_gram_newton_schulz_kernel_args,
)
def gram_newton_schulz(
    G: Tensor,
    steps: int | None = None,
    coefficients: str | Sequence[Sequence[float]] | Schedule = "jordan",
    eps: float = 1e-7,
    compute_dtype: torch.dtype = torch.bfloat16,
    backend: str = "auto",
    normalized: bool = False,
    restarts: Sequence[int] | None = None,
) -> Tensor:
    """Gram Newton–Schulz: `newton_schulz`'s polynomial iterated on the s x s Gram matrix (s = min(m, n)),
    restarting after the iterations in `restarts` (None: `fastoptim.ns_methods.default_restarts`; () for
    none). See `fastoptim.reference.gram_newton_schulz` for the exact computation and
    `fastoptim.ns_methods` for its FLOPs; the other arguments as in `newton_schulz`. Returns a new
    (..., m, n) tensor in compute_dtype."""
    schedule, eps, compute_dtype, normalized = _newton_schulz_arguments(
        G, steps, coefficients, eps, compute_dtype, normalized
    )
    restarts = ns_methods.check_restarts(restarts, len(schedule.triples))
    return Call((G, schedule.flat(), schedule.safety, eps, compute_dtype, normalized, list(restarts)), backend)


def newton_schulz(
    G: Tensor,
    steps: int | None = None,
    coefficients: str | Sequence[Sequence[float]] | Schedule = "jordan",
    eps: float = 1e-7,
    compute_dtype: torch.dtype = torch.bfloat16,
    backend: str = "auto",
    normalized: bool = False,
    method: str = "standard",
    restarts: Sequence[int] | None = None,
) -> Tensor:
    """Orthogonalize each matrix of G (..., m, n) by the quintic Newton–Schulz iteration.

    See `fastoptim.reference.newton_schulz` for the exact computation and
    `fastoptim.coefficients` for the schedules ("jordan", "polar_express", "you", or a list of
    (a, b, c) triples; steps=None runs the schedule's own length). Returns a new (..., m, n) tensor
    in compute_dtype. normalized=True: G is already X₀ = G/(safety·‖G‖_F + eps) (as
    `muon_momentum_stack_(normalize=True)` writes it), so the normalization pass is skipped.

    method: "standard" (the default: the iteration above, results unchanged from earlier versions),
    "gram" (`gram_newton_schulz`: the same polynomial on the Gram matrix, with `restarts`; fewer FLOPs on
    rectangular matrices, 41.5% fewer at 768 x 3072 with 5 steps, rounding differently in 16 bits) or
    "auto" (gram where `fastoptim.ns_methods.choose_method` counts fewer FLOPs for this shape, else
    standard). restarts: for gram only (None: the default restarts).
    """
    method = ns_methods.check_method(method)
    ns_methods.refuse_restarts_with_standard(method, restarts)
    if method == "auto":
        check.tensor("G", G, min_ndim=2)
        count = len(resolve(coefficients, steps).triples)
        method = ns_methods.choose_method(G.shape[-2], G.shape[-1], count, ns_methods.check_restarts(restarts, count))
    if method == "gram":
        return gram_newton_schulz(G, steps, coefficients, eps, compute_dtype, backend, normalized, restarts)
    return _standard_newton_schulz(G, steps, coefficients, eps, compute_dtype, backend, normalized)


# --------------------------------------------------------------------------------------------------
# Muon momentum


def _muon_momentum_schema(buf: Tensor, grad: Tensor, nesterov_out: Tensor | None, beta: float, backend: str) -> None:
    ...


@define("muon_momentum_", schema=_muon_momentum_schema, device_arg="buf", mutates=("buf", "nesterov_out"))
def muon_momentum_(
    buf: Tensor, grad: Tensor, beta: float = 0.95, nesterov: bool = True, backend: str = "auto"
) -> Tensor:
    """buf <- lerp(buf, grad, 1 - beta) in place; returns the Newton–Schulz input:
    lerp(grad, buf, beta) as a new tensor of buf's dtype if nesterov, else buf itself. grad is not changed."""
    check.tensor("buf", buf)
    check.tensor("grad", grad)
    check.same_shape("grad", grad, "buf", buf)
    check.same_device("grad", grad, "buf", buf)
    beta = check.beta("beta", beta)
    nesterov = check.boolean("nesterov", nesterov)
    _check_no_overlap([("buf", buf)], [("grad", grad)])
    nesterov_out = torch.empty_like(buf, memory_format=torch.contiguous_format) if nesterov else None
    return Call((buf, grad, nesterov_out, beta), backend, result=nesterov_out if nesterov else buf)


def _muon_momentum_stack_schema(
    bufs: List[Tensor],
    grads: List[Tensor],
    out: Tensor,
    beta: float,
    nesterov: bool,
    normalize: bool,
    safety: float,
    eps: float,
    backend: str,
) -> None: ...


@define("muon_momentum_stack_", schema=_muon_momentum_stack_schema, device_arg="out", mutates=("bufs", "out"))
def muon_momentum_stack_(
    bufs: Sequence[Tensor],
    grads: Sequence[Tensor],
    out: Tensor,
    beta: float = 0.95,
    nesterov: bool = True,
    backend: str = "auto",
    normalize: bool = False,
    safety: float = 1.0,
    eps: float = 1e-7,
) -> None:
    """`muon_momentum_` for P same-size matrices at once, writing the Newton–Schulz inputs into the
    (P, m, n) stack `out` (any floating dtype: e.g. the compute dtype). Each buf_i/grad_i may have any
    shape with m·n elements (a conv kernel is read as its (out, -1) matrix). With normalize, each
    out[i] is also divided by (safety·‖out[i]‖_F + eps), Newton–Schulz's normalization (then call
    `newton_schulz(..., normalized=True)`); see `fastoptim.reference.muon_momentum_stack_`.
    Mutates bufs and out."""
    bufs = check.tensor_list("bufs", bufs)
    grads = check.tensor_list("grads", grads)
    check.matching_lists(("bufs", "grads"), (bufs, grads))
    check.tensor("out", out, min_ndim=3)
    if out.dim() != 3 or out.shape[0] != len(bufs):
        raise ValueError(f"out must be a ({len(bufs)}, m, n) stack, one matrix per buf, got {tuple(out.shape)}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    size = out.shape[1] * out.shape[2]
    for i, buf in enumerate(bufs):
        if buf.numel() != size:
            raise ValueError(f"bufs[{i}] must have out's m·n = {size} elements, got shape {tuple(buf.shape)}")
        check.same_device(f"bufs[{i}]", buf, "out", out)
    beta = check.beta("beta", beta)
    nesterov = check.boolean("nesterov", nesterov)
    normalize = check.boolean("normalize", normalize)
    safety = check.positive("safety", safety)
    eps = check.positive("eps", eps)  # eps = 0 would divide a zero matrix by zero
    _check_no_overlap(
        [("out", out), *((f"bufs[{i}]", b) for i, b in enumerate(bufs))],
        [(f"grads[{i}]", g) for i, g in enumerate(grads)],
    )
    return Call((bufs, grads, out, beta, nesterov, normalize, safety, eps), backend, run=len(bufs) > 0)


# --------------------------------------------------------------------------------------------------
# Muon and NorMuon steps, one matrix (or a stack (..., m, n)) at a time


def _check_update_pair(param: Tensor, update: Tensor) -> None:
    check.tensor("param", param, min_ndim=2)
    check.tensor("update", update, min_ndim=2)
    check.same_shape("update", update, "param", param)
    check.same_device("update", update, "param", param)


def _muon_apply_schema(
    param: Tensor, update: Tensor, lr: float, weight_decay: float, scale: float, cautious: bool, backend: str
) -> None: ...


@define("muon_apply_", schema=_muon_apply_schema, device_arg="param", mutates=("param",))
def muon_apply_(
    param: Tensor,
    update: Tensor,
    lr: float,
    weight_decay: float = 0.0,
    scale: float = 1.0,
    cautious: bool = False,
    backend: str = "auto",
) -> None:
    """p <- p·(1 - lr·wd) (cautious: only where update·p >= 0); p <- p - lr·scale·update. In place on param."""
    _check_update_pair(param, update)
    lr = check.non_negative("lr", lr)
    weight_decay = check.non_negative("weight_decay", weight_decay)
    scale = check.real("scale", scale)
    cautious = check.boolean("cautious", cautious)
    _check_no_overlap([("param", param)], [("update", update)])
    return Call((param, update, lr, weight_decay, scale, cautious), backend)


def _normuon_step_schema(
    param: Tensor,
    update: Tensor,
    second_moment: Tensor,
    lr: float,
    weight_decay: float,
    beta2: float,
    eps: float,
    scale: float,
    cautious: bool,
    backend: str,
) -> None: ...


@define("normuon_step_", schema=_normuon_step_schema, device_arg="param", mutates=("param", "second_moment"))
def normuon_step_(
    param: Tensor,
    update: Tensor,
    second_moment: Tensor,
    lr: float,
    weight_decay: float = 0.0,
    beta2: float = 0.95,
    eps: float = 1e-10,
    scale: float = 1.0,
    cautious: bool = False,
    backend: str = "auto",
) -> None:
    """NorMuon's row normalization of the orthogonalized update and the step (see
    `fastoptim.reference.normuon_step_`); cautious: weight decay only where the normalized update and
    the parameter agree in sign. Mutates param and second_moment (shape (..., m), one value per row)."""
    _check_update_pair(param, update)
    check.tensor("second_moment", second_moment)
    expected = tuple(param.shape[:-1])
    if tuple(second_moment.shape) != expected:
        raise ValueError(
            f"second_moment must have shape {expected} (one value per row of param), got {tuple(second_moment.shape)}"
        )
    check.same_device("second_moment", second_moment, "param", param)
    lr = check.non_negative("lr", lr)
    weight_decay = check.non_negative("weight_decay", weight_decay)
    beta2 = check.beta("beta2", beta2)
    eps = check.positive("eps", eps)
    scale = check.real("scale", scale)
    cautious = check.boolean("cautious", cautious)
    _check_no_overlap([("param", param), ("second_moment", second_moment)], [("update", update)])
    return Call((param, update, second_moment, lr, weight_decay, beta2, eps, scale, cautious), backend)


# --------------------------------------------------------------------------------------------------
# Muon and NorMuon steps over a shape bucket (multi-tensor)


def _hyper_parameter(name: str, value: object, device: torch.device) -> tuple[float, Tensor | None]:
    """lr or weight_decay: a real number >= 0, returned as (float, None), or a 0-dim real floating
    tensor on `device`, returned as (0.0, tensor) (its value is not read)."""
    if not isinstance(value, Tensor):
        return check.non_negative(name, value), None
    return 0.0, check.scalar_tensor(name, value, device)


def _value(number: float, tensor: Tensor | None) -> float | Tensor:
    """A hyper-parameter as the backends take it: the 0-dim tensor when one was given, else the float."""
    return number if tensor is None else tensor


def _check_stack(params: list[Tensor], updates: object) -> tuple[int, int]:
    """updates is a contiguous (len(params), m, n) stack and each params[i] has m·n elements on its
    device; returns (m, n)."""
    check.tensor("updates", updates, min_ndim=3)
    if updates.dim() != 3 or updates.shape[0] != len(params):
        raise ValueError(
            f"updates must be a ({len(params)}, m, n) stack, one matrix per param, got shape {tuple(updates.shape)}"
        )
    if not updates.is_contiguous():
        raise ValueError(f"updates must be contiguous, got strides {tuple(updates.stride())}")
    m, n = updates.shape[1], updates.shape[2]
    for i, param in enumerate(params):
        if param.numel() != m * n:
            raise ValueError(
                f"params[{i}] must have updates' m·n = {m}·{n} = {m * n} elements, got shape {tuple(param.shape)}"
            )
        check.same_device(f"params[{i}]", param, "updates", updates)
    return m, n


def _check_no_overlap(written: list[tuple[str, Tensor]], read: list[tuple[str, Tensor]]) -> None:
    """Refuse memory written twice in one call (the same tensor twice in params, expert views that
    overlap, an expanded tensor) or written while it is read (a param inside updates): kernels would
    race. As ATen's overlap checks: exact for dense tensors, compared by address range (live
    allocations never share addresses, so no storage lookup is needed); a strided view that is not
    dense (a column slice) is only compared with identical views, overlap beyond that being too costly
    to decide. About a microsecond per tensor."""
    if torch.compiler.is_compiling():
        return  # fake tensors have no addresses
    spans = []  # (first byte, argument order, one past the last byte, is written, name) of the dense tensors
    views: dict[tuple, tuple[str, bool]] = {}  # the others, by (address, shape, strides)
    for is_written, tensors in ((True, written), (False, read)):
        for name, tensor in tensors:
            order = len(spans)
            if tensor.is_meta or tensor.numel() == 0:
                continue
            start = tensor.data_ptr()
            if tensor.is_contiguous():
                spans.append((start, order, start + tensor.numel() * tensor.element_size(), is_written, name))
                continue
            overlap = torch._debug_has_internal_overlap(tensor)  # 0: dense, 1: overlapping, 2: too hard
            if is_written and overlap == 1:
                raise ValueError(f"{name} has elements that share memory (an expanded tensor?): it cannot be "
                                 "written in place")
            if overlap == 0:
                extent = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride())) + 1
                spans.append((start, order, start + extent * tensor.element_size(), is_written, name))
                continue
            key = (start, tuple(tensor.shape), tuple(tensor.stride()))
            earlier = views.setdefault(key, (name, is_written))
            if earlier[0] != name and (is_written or earlier[1]):
                _overlap_error(earlier[0], name)
    spans.sort()
    furthest = None  # the span so far that reaches furthest
    for start, _, end, is_written, name in spans:
        if furthest is not None and start < furthest[0] and (is_written or furthest[1]):
            _overlap_error(furthest[2], name)
        if furthest is None or end > furthest[0]:
            furthest = (end, is_written, name)


def _named(name: str, tensors: Sequence[Tensor]) -> list[tuple[str, Tensor]]:
    return [(f"{name}[{i}]", t) for i, t in enumerate(tensors)]


def _overlap_error(first: str, second: str) -> None:
    raise ValueError(
        f"{first} and {second} overlap in memory: every tensor written by this op must be written once and not be "
        "read as another argument"
    )


def _muon_apply_stack_schema(
    params: List[Tensor],
    updates: Tensor,
    lr: float,
    weight_decay: float,
    lr_tensor: Tensor | None,
    weight_decay_tensor: Tensor | None,
    scale: float,
    cautious: bool,
    backend: str,
) -> None: ...


def _muon_apply_stack_kernel_args(params, updates, lr, weight_decay, lr_tensor, weight_decay_tensor, scale, cautious):
    return (params, updates, _value(lr, lr_tensor), _value(weight_decay, weight_decay_tensor), scale, cautious)


@define(
    "muon_apply_stack_",
    schema=_muon_apply_stack_schema,
    device_arg="updates",
    mutates=("params",),
    kernel_args=_muon_apply_stack_kernel_args,
)
def muon_apply_stack_(
    params: Sequence[Tensor],
    updates: Tensor,
    lr: float | Tensor,
    weight_decay: float | Tensor = 0.0,
    scale: float = 1.0,
    cautious: bool = False,
    backend: str = "auto",
) -> None:
    """`muon_apply_` for every matrix of a shape bucket in one multi-tensor launch (per parameter dtype;
    the cuda backend takes up to 128 matrices a launch): for each i, params[i] (any shape with m·n
    elements, read and written in row-major order as an (m, n) matrix) <- params[i]·(1 - lr·wd)
    (cautious: only where updates[i]·params[i] >= 0) - lr·scale·updates[i], exactly as
    `muon_apply_(params[i].view(m, n), updates[i], ...)` on the same backend. updates is a contiguous
    (P, m, n) stack of any floating dtype. The Triton and cuda kernels take contiguous params; others
    fall back to the torch backend. lr and weight_decay: real numbers, or
    0-dim floating tensors on the params' device, read there by the kernels (no host synchronization, so
    a compiled step does not recompile when a scheduler changes lr, and the step can be captured in a
    CUDA graph); with a tensor, 1 - lr·wd and lr·scale are computed in fp32 on the device and may differ
    in the last bit from the float path, which rounds them once from double. Mutates params."""
    params = check.tensor_list("params", params)
    _check_stack(params, updates)
    lr, lr_tensor = _hyper_parameter("lr", lr, updates.device)
    weight_decay, weight_decay_tensor = _hyper_parameter("weight_decay", weight_decay, updates.device)
    scale = check.real("scale", scale)
    cautious = check.boolean("cautious", cautious)
    _registry.check_backend_name(backend)
    _check_no_overlap([(f"params[{i}]", p) for i, p in enumerate(params)], [("updates", updates)])
    args = (params, updates, lr, weight_decay, lr_tensor, weight_decay_tensor, scale, cautious)
    return Call(args, backend, run=len(params) > 0)


def _normuon_step_stack_schema(
    params: List[Tensor],
    updates: Tensor,
    second_moments: List[Tensor],
    lr: float,
    weight_decay: float,
    lr_tensor: Tensor | None,
    weight_decay_tensor: Tensor | None,
    beta2: float,
    eps: float,
    scale: float,
    cautious: bool,
    backend: str,
) -> None: ...


def _normuon_step_stack_kernel_args(
    params, updates, second_moments, lr, weight_decay, lr_tensor, weight_decay_tensor, beta2, eps, scale, cautious
):
    lr, weight_decay = _value(lr, lr_tensor), _value(weight_decay, weight_decay_tensor)
    return (params, updates, second_moments, lr, weight_decay, beta2, eps, scale, cautious)


@define(
    "normuon_step_stack_",
    schema=_normuon_step_stack_schema,
    device_arg="updates",
    mutates=("params", "second_moments"),
    kernel_args=_normuon_step_stack_kernel_args,
)
def normuon_step_stack_(
    params: Sequence[Tensor],
    updates: Tensor,
    second_moments: Sequence[Tensor],
    lr: float | Tensor,
    weight_decay: float | Tensor = 0.0,
    beta2: float = 0.95,
    eps: float = 1e-10,
    scale: float = 1.0,
    cautious: bool = False,
    backend: str = "auto",
) -> None:
    """`normuon_step_` for every matrix of a shape bucket, in three launches (row statistics, per-matrix
    norms, apply; per parameter dtype and, for the cuda backend, per 128 matrices) whatever the bucket's
    size: for each i, normuon_step_(params[i] read as (m, n), updates[i], second_moments[i] read as
    (m,), ...) — each matrix keeps its own row statistics and Frobenius norms. params, updates, lr and
    weight_decay as in `muon_apply_stack_`; second_moments[i] has m elements (a (m,) state tensor or a
    slice of a larger one). Mutates params and second_moments."""
    params = check.tensor_list("params", params)
    second_moments = check.tensor_list("second_moments", second_moments)
    m, _ = _check_stack(params, updates)
    if len(second_moments) != len(params):
        raise ValueError(
            f"second_moments must have as many tensors as params ({len(params)}), got {len(second_moments)}"
        )
    for i, second_moment in enumerate(second_moments):
        if second_moment.numel() != m:
            raise ValueError(
                f"second_moments[{i}] must have m = {m} elements (one per row of the matrix), got shape "
                f"{tuple(second_moment.shape)}"
            )
        check.same_device(f"second_moments[{i}]", second_moment, "updates", updates)
    lr, lr_tensor = _hyper_parameter("lr", lr, updates.device)
    weight_decay, weight_decay_tensor = _hyper_parameter("weight_decay", weight_decay, updates.device)
    beta2 = check.beta("beta2", beta2)
    eps = check.positive("eps", eps)
    scale = check.real("scale", scale)
    cautious = check.boolean("cautious", cautious)
    _registry.check_backend_name(backend)
    written = [(f"params[{i}]", p) for i, p in enumerate(params)]
    written += [(f"second_moments[{i}]", v) for i, v in enumerate(second_moments)]
    _check_no_overlap(written, [("updates", updates)])
    args = (params, updates, second_moments, lr, weight_decay, lr_tensor, weight_decay_tensor, beta2, eps, scale,
            cautious)
    return Call(args, backend, run=len(params) > 0)


# --------------------------------------------------------------------------------------------------
# Sophia (multi-tensor)


def _sophia_step_schema(
    params: List[Tensor],
    grads: List[Tensor],
    exp_avgs: List[Tensor],
    hessians: List[Tensor],
    unclipped_out: Tensor | None,
    lr: float,
    beta1: float,
    rho: float,
    weight_decay: float,
    eps: float,
    backend: str,
) -> None: ...


@define(
    "sophia_step_", schema=_sophia_step_schema, device_arg="params", mutates=("params", "exp_avgs", "unclipped_out")
)
def sophia_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    hessians: Sequence[Tensor],
    lr: float,
    beta1: float = 0.965,
    rho: float = 0.04,
    weight_decay: float = 0.1,
    eps: float = 1e-15,
    return_unclipped: bool = False,
    backend: str = "auto",
) -> Tensor | None:
    """Sophia's clipped step over lists of tensors (see `fastoptim.reference.sophia_step_`).
    Mutates params and exp_avgs. With return_unclipped, returns the fraction of coordinates not
    clipped as a float32 0-dim tensor on the device (no host synchronization); else None."""
    params = check.tensor_list("params", params)
    grads = check.tensor_list("grads", grads)
    exp_avgs = check.tensor_list("exp_avgs", exp_avgs)
    hessians = check.tensor_list("hessians", hessians)
    check.matching_lists(
        ("params", "grads", "exp_avgs", "hessians"), (params, grads, exp_avgs, hessians)
    )
    lr = check.non_negative("lr", lr)
    beta1 = check.beta("beta1", beta1)
    rho = check.positive("rho", rho)
    weight_decay = check.non_negative("weight_decay", weight_decay)
    eps = check.positive("eps", eps)
    return_unclipped = check.boolean("return_unclipped", return_unclipped)
    _check_no_overlap(
        [*_named("params", params), *_named("exp_avgs", exp_avgs)],
        [*_named("grads", grads), *_named("hessians", hessians)],
    )
    device = params[0].device if params else torch.device("cpu")
    unclipped_out = torch.zeros((), dtype=torch.float32, device=device) if return_unclipped else None
    args = (params, grads, exp_avgs, hessians, unclipped_out, lr, beta1, rho, weight_decay, eps)
    return Call(args, backend, result=unclipped_out, run=len(params) > 0)


def _hessian_ema_schema(hessians: List[Tensor], estimates: List[Tensor], beta2: float, backend: str) -> None: ...


@define("hessian_ema_", schema=_hessian_ema_schema, device_arg="hessians", mutates=("hessians",))
def hessian_ema_(
    hessians: Sequence[Tensor], estimates: Sequence[Tensor], beta2: float = 0.99, backend: str = "auto"
) -> None:
    """h <- lerp(h, ĥ, 1 - beta2) for each pair of the lists, in place on hessians."""
    hessians = check.tensor_list("hessians", hessians)
    estimates = check.tensor_list("estimates", estimates)
    check.matching_lists(("hessians", "estimates"), (hessians, estimates))
    beta2 = check.beta("beta2", beta2)
    _check_no_overlap(_named("hessians", hessians), _named("estimates", estimates))
    return Call((hessians, estimates, beta2), backend, run=len(hessians) > 0)


# The custom ops by name (torch.ops.fastoptim.<name> is the same op): _muon_apply_op, _newton_schulz_op, ...
for _spec in _registry.op_specs().values():
    globals()[f"_{_spec.name.rstrip('_')}_op"] = _spec.op
del _spec

__all__ = [
    "check_call",
    "newton_schulz",
    "gram_newton_schulz",
    "muon_momentum_",
    "muon_momentum_stack_",
    "muon_apply_",
    "muon_apply_stack_",
    "normuon_step_",
    "normuon_step_stack_",
    "sophia_step_",
    "hessian_ema_",
]

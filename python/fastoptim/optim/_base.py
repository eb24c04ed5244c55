"""What Muon and NorMuon share: group resolution and validation, shape buckets, AdamW routing.

Param groups
    A group is either a *matrix* group (``use_muon=True``: momentum, batched Newton–Schulz, the
    optimizer's own apply step) or an *AdamW* group (``use_muon=False``: torch's own foreach/fused
    AdamW, ``torch.optim.adamw.adamw``). In an AdamW group ``lr``, ``betas``, ``eps`` and
    ``weight_decay`` are AdamW's; the ones a group does not give default to the optimizer's
    ``adamw_lr``, ``adamw_betas``, ``adamw_eps`` and ``adamw_weight_decay``.
    A group that does not say (``use_muon`` missing or None) is split when it is added: its
    matrices (ndim >= 2) form a matrix group with the group's settings, everything else an AdamW
    group. So ``Muon(model.parameters())`` yields two groups; an lr scheduler then scales both
    learning rates by the same factor. ``fastoptim.param_groups(model)`` also routes embeddings and
    the output head to AdamW.

Matrices and shape buckets
    A parameter of a matrix group is one or more matrices (`fastoptim._geometry`): a 2-D weight; with
    ``matrix_view="stack"`` (default for 3-D) every (m, n) of an (..., m, n) stack, e.g. each expert of an
    MoE bank; with ``matrix_view="flatten"`` (default for 4-D and up) the (shape[0], -1) matrix of a conv
    kernel; ``split_sizes`` cuts the rows of each into blocks (per-head or split-QKV). Matrices of the
    same (rows, cols), dtype and device form a bucket, stepped by three op calls whatever its size
    (`fastoptim.optim._engine`: how a step flows). Peak transient memory is one bucket (stack +
    Newton–Schulz output and workspace), never a copy of the model.

Distributed
    One engine for every layout: a single process is world size 1. Under torch.distributed, replicated
    (DDP) and row-sharded DTensor (FSDP2) matrices split the Newton–Schulz work between ranks; expert
    banks sharded on the expert dimension step locally (`fastoptim.distributed`).

Capturable steps
    ``lr`` and ``weight_decay`` of a matrix group may be 0-D tensors on the parameters' device (as torch's
    own optimizers accept): the kernels read them on the device, so a scheduler that changes them (in
    place: torch's schedulers ``fill_`` tensor learning rates) neither synchronizes nor recompiles a
    ``torch.compile``d step. Their values are checked once, when the group is added.

Non-finite gradients
    Nothing in ``step()`` looks at tensor values (no host synchronization), so a NaN/Inf gradient
    is not skipped: it makes its own parameter and that parameter's state non-finite. Newton–Schulz
    normalizes and multiplies each matrix of a stack separately, NorMuon's statistics are per row and
    per matrix, and AdamW is elementwise, so no other parameter — not even one in the same bucket —
    is affected. Check ``loss.isfinite()`` (or use a GradScaler-style skip) before calling ``step()``.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim.adamw import adamw
from torch.optim.optimizer import _get_scalar_dtype

from .. import _validation as check
from .. import backends, distributed, ns_methods
from .._geometry import MATRIX_VIEWS, SCALE_MODES, layer_form, matrix_form, reads_as_stack
from ..coefficients import resolve
from . import _engine
from ._checkpoint import CopyableOptimizer, load_checked
from ._nonfinite import NonFiniteGuard

# Group keys that belong to AdamW, and the optimizer default each one falls back to.
_ADAMW_KEYS = {
    "lr": "adamw_lr",
    "betas": "adamw_betas",
    "eps": "adamw_eps",
    "weight_decay": "adamw_weight_decay",
}


# --------------------------------------------------------------------------------------------------
# Validation (pure Python; raises before anything changes)


def check_betas(name: str, value: object) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"{name} must be a pair (beta1, beta2), got {value!r}")
    return (check.beta(f"{name}[0]", value[0]), check.beta(f"{name}[1]", value[1]))


check_backend = backends.check_backend_name  # the one backend-name check (fastoptim._registry)


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_params(name: str, params: Sequence[Tensor]) -> None:
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(p).__name__}")
        if p.is_complex():
            raise TypeError(f"{name}[{i}] is complex ({p.dtype}); fastoptim optimizers take real parameters")
        if not p.is_floating_point():
            raise TypeError(f"{name}[{i}] must be a floating-point tensor, got {p.dtype}")


def check_grads(param_groups: list[dict[str, Any]]) -> None:
    """At step time, before any tensor changes: gradients must be dense and real."""
    for g, group in enumerate(param_groups):
        for i, p in enumerate(group["params"]):
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse or grad.layout != torch.strided:
                raise TypeError(
                    f"param_groups[{g}]['params'][{i}] has a sparse gradient ({grad.layout}); "
                    "fastoptim optimizers need dense gradients"
                )
            if grad.is_complex():
                raise TypeError(
                    f"param_groups[{g}]['params'][{i}] has a complex gradient ({grad.dtype}); "
                    "fastoptim optimizers need real gradients"
                )


def split_named(params: object) -> tuple[list[Tensor], list[str] | None]:
    """Params given as a tensor, an iterable of tensors, or of (name, tensor) pairs."""
    if isinstance(params, Tensor):
        return [params], None
    if isinstance(params, set):
        raise TypeError(
            "params must be an ordered collection (a set's order changes between runs); use a list"
        )
    if not isinstance(params, Iterable):
        raise TypeError(f"params must be a tensor or an iterable of tensors, got {type(params).__name__}")
    items = list(params)
    if items and isinstance(items[0], tuple):
        names = [name for name, _ in items]
        return [p for _, p in items], names
    return items, None


# --------------------------------------------------------------------------------------------------
# The AdamW half: torch's own implementation


# torch.compile: torch's foreach AdamW with host-side `step` tensors does not trace (dynamo fails on
# its CPU scalar lists), so this one call runs eagerly: one graph break, outside fastoptim's ops.
@torch.compiler.disable
def adamw_group_step(state: dict, group: dict[str, Any]) -> None:
    """One AdamW step over a group's parameters that have gradients, with torch.optim.adamw.adamw
    (fused when every parameter is on CUDA, foreach otherwise). State: exp_avg, exp_avg_sq, step.
    Plain tensors and DTensors of each placement go in separate calls (foreach kernels cannot mix them:
    tensor parallelism leaves Shard, Replicate and plain biases in one group)."""
    with_grad = [p for p in group["params"] if p.grad is not None]
    if not with_grad:
        return
    fused = all(p.device.type == "cuda" for p in with_grad)
    kinds: dict[Any, list[Tensor]] = {}
    for p in with_grad:
        key = (p.device_mesh, tuple(p.placements)) if distributed.is_dtensor(p) else None
        kinds.setdefault(key, []).append(p)
    for params in kinds.values():
        _adamw(state, group, params, fused)


def init_adamw_state(state: dict, group: dict[str, Any]) -> None:
    """AdamW state of the group's parameters with gradients that have none yet (zeros, step 0)."""
    with_grad = [p for p in group["params"] if p.grad is not None]
    fused = len(with_grad) > 0 and all(p.device.type == "cuda" for p in with_grad)
    for p in with_grad:
        st = state[p]
        if len(st) == 0:
            # torch's convention: `step` is a float tensor, on the host unless fused.
            step_device = p.device if fused else torch.device("cpu")
            st["step"] = torch.zeros((), dtype=_get_scalar_dtype(is_fused=fused), device=step_device)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _adamw(state: dict, group: dict[str, Any], with_grad: list[Tensor], fused: bool) -> None:
    init_adamw_state(state, {"params": with_grad})
    params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
    for p in with_grad:
        st = state[p]
        step_device = p.device if fused else torch.device("cpu")
        if st["step"].device != step_device:  # after loading a checkpoint saved on another device
            st["step"] = st["step"].to(step_device, torch.float32 if fused else st["step"].dtype)
        params.append(p)
        grads.append(p.grad)
        exp_avgs.append(st["exp_avg"])
        exp_avg_sqs.append(st["exp_avg_sq"])
        steps.append(st["step"])
    beta1, beta2 = group["betas"]
    adamw(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        steps,
        # torch's foreach AdamW refuses a tensor lr unless capturable (CUDA only); the single-tensor one takes it
        foreach=not fused and not isinstance(group["lr"], Tensor),
        fused=fused,
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=group["lr"],
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        maximize=False,
    )


# --------------------------------------------------------------------------------------------------
# The base class of Muon and NorMuon


def expected_state_shape(group: dict, p: Tensor, key: str) -> tuple[int, ...] | None:
    """The shape each state tensor of a Muon-family optimizer has (None: not a state key of ours)."""
    if key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
        return tuple(p.shape)
    if key == "second_moment":
        batch, m, _ = layer_form(p.shape, group.get("matrix_view", "auto"))
        return (*batch, m)
    if key == "step":
        return ()
    return None


class MatrixOptimizer(CopyableOptimizer, torch.optim.Optimizer):
    """Muon-family optimizer: matrix groups through the bucket engine (`fastoptim.optim._engine`), AdamW
    groups through torch's AdamW. A subclass is the engine's rule: ``row_state_keys``,
    ``init_row_state``, ``apply_bucket``, ``direction_bucket`` and ``direction_dtype``."""

    # State tensors kept in float32 whatever the parameter dtype (torch's load_state_dict would cast
    # them to the parameter dtype; `load_state_dict` restores them exactly).
    _float32_state_keys: tuple[str, ...] = ()
    # Per-row state of shape (*batch, m) that `apply_bucket` reads and updates (NorMuon's second_moment):
    # the layouts move these rows together with the matrix rows they belong to.
    row_state_keys: tuple[str, ...] = ()

    def __init__(self, params: Any, defaults: dict[str, Any], process_group: Any = "auto") -> None:
        defaults.setdefault("matrix_view", "auto")
        defaults.setdefault("state_dtype", None)
        defaults.setdefault("ns_method", "standard")
        defaults.setdefault("ns_restarts", None)
        check.boolean("skip_nonfinite", defaults.setdefault("skip_nonfinite", False))
        self._validate_matrix_hyper(defaults, "")
        self._validate_adamw_hyper({key: defaults[src] for key, src in _ADAMW_KEYS.items()}, "adamw_")
        self._process_group = distributed.check_process_group(process_group)
        self._replicated = distributed.ReplicatedLayout()
        self._sharded = distributed.ShardedLayout()
        self._gathered = distributed.GatheredLayout()
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_process_group", "auto")
        self.__dict__.setdefault("_replicated", distributed.ReplicatedLayout())
        self.__dict__.setdefault("_sharded", distributed.ShardedLayout())
        self.__dict__.setdefault("_gathered", distributed.GatheredLayout())

    # -- groups ------------------------------------------------------------------------------------

    def _validate_matrix_hyper(self, group: dict[str, Any], where: str, at_step: bool = False) -> None:
        check.non_negative_or_tensor(f"{where}lr", group["lr"], read_value=not at_step)
        check.beta(f"{where}momentum", group["momentum"])
        check.boolean(f"{where}nesterov", group["nesterov"])
        check.non_negative_or_tensor(f"{where}weight_decay", group["weight_decay"], read_value=not at_step)
        schedule = resolve(group["coefficients"], group["ns_steps"])
        check.compute_dtype(f"{where}ns_dtype", group["ns_dtype"])
        _, restarts = ns_methods.check_options(group.get("ns_method", "standard"), group.get("ns_restarts"),
                                               len(schedule.triples), f"{where}ns_")
        if restarts is not None:
            group["ns_restarts"] = restarts  # a tuple: the checked copy, not the caller's (mutable) list
        if group["scale_mode"] not in SCALE_MODES:
            raise ValueError(f"{where}scale_mode must be one of {SCALE_MODES}, got {group['scale_mode']!r}")
        check.boolean(f"{where}cautious_weight_decay", group["cautious_weight_decay"])
        check_backend(group["backend"])
        if group.get("matrix_view", "auto") not in MATRIX_VIEWS:
            raise ValueError(f"{where}matrix_view must be one of {MATRIX_VIEWS}, got {group['matrix_view']!r}")
        state_dtype = group.get("state_dtype")
        if state_dtype is not None:
            check.compute_dtype(f"{where}state_dtype", state_dtype)
        split_sizes = group.get("split_sizes")
        if split_sizes is not None:
            if (
                isinstance(split_sizes, (str, bytes))
                or not isinstance(split_sizes, Sequence)
                or not split_sizes
            ):
                raise TypeError(
                    f"{where}split_sizes must be None or a non-empty list of row counts, got {split_sizes!r}"
                )
            for size in split_sizes:
                check_positive_int(f"{where}split_sizes", size)

    def _validate_adamw_hyper(self, group: dict[str, Any], prefix: str, at_step: bool = False) -> None:
        check.non_negative_or_tensor(f"{prefix}lr", group["lr"], read_value=not at_step)
        check_betas(f"{prefix}betas", group["betas"])
        check.positive(f"{prefix}eps", group["eps"])
        check.non_negative(f"{prefix}weight_decay", group["weight_decay"])

    def _validate_group(self, group: dict[str, Any], at_step: bool = False) -> None:
        check_params("params", group["params"])
        if group["use_muon"]:
            self._validate_matrix_hyper(group, "", at_step)
            for i, p in enumerate(group["params"]):
                if p.dim() < 2:
                    raise ValueError(
                        f"use_muon=True but params[{i}] has shape {tuple(p.shape)}: Muon/NorMuon "
                        "orthogonalize matrices (ndim >= 2); put vectors and scalars in a "
                        "use_muon=False (AdamW) group"
                    )
                if group["matrix_view"] == "transposed" and (
                    group.get("split_sizes") is not None or distributed.is_dtensor(p)
                ):
                    what = "split_sizes" if group.get("split_sizes") is not None else "DTensor parameters"
                    raise ValueError(
                        f"matrix_view='transposed' does not take {what} (params[{i}], shape {tuple(p.shape)}): "
                        "its weights are stored (in, out), so output-neuron blocks and row shards are columns"
                    )
                if group.get("split_sizes") is not None:
                    _, m, _ = matrix_form(p.shape, group["matrix_view"])
                    if sum(group["split_sizes"]) != m:
                        raise ValueError(
                            f"split_sizes {list(group['split_sizes'])} must sum to the number of rows of every "
                            f"matrix of the group; params[{i}] (shape {tuple(p.shape)}, matrix_view="
                            f"{group['matrix_view']!r}) has matrices of {m} rows"
                        )
                for key in ("lr", "weight_decay"):
                    value = group[key]
                    if isinstance(value, Tensor) and value.device != p.device and not distributed.is_dtensor(p):
                        raise ValueError(
                            f"{key} is a tensor on {value.device} but params[{i}] is on {p.device}; a tensor "
                            f"{key} must be on the parameters' device (the kernels read it there)"
                        )
        else:
            self._validate_adamw_hyper(group, "", at_step)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (see the module docstring: an unlabelled group is split into matrices and the rest)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params, names = split_named(param_group["params"])
        use_muon = param_group.get("use_muon")
        if use_muon is not None and not isinstance(use_muon, bool):
            raise TypeError(f"use_muon must be True, False or None, got {use_muon!r}")
        if use_muon is None:
            is_matrix = [isinstance(p, Tensor) and p.dim() >= 2 for p in params]
            parts = [
                (True, [i for i, mat in enumerate(is_matrix) if mat]),
                (False, [i for i, mat in enumerate(is_matrix) if not mat]),
            ]
            parts = [(flag, idx) for flag, idx in parts if idx] or [(True, [])]
        else:
            parts = [(use_muon, list(range(len(params))))]

        groups = []
        for flag, idx in parts:
            group: dict[str, Any]
            if flag:
                group = {k: v for k, v in param_group.items() if k != "params"}
            elif use_muon is None:  # the AdamW half of a split group takes only its adamw_* settings
                group = {src: param_group[src] for src in _ADAMW_KEYS.values() if src in param_group}
            else:
                group = {k: v for k, v in param_group.items() if k != "params"}
            if not flag:
                for key, src in _ADAMW_KEYS.items():
                    group.setdefault(key, group.get(src, self.defaults[src]))
            group["use_muon"] = flag
            group["params"] = [params[i] for i in idx]
            if names is not None:
                group["params"] = [(names[i], params[i]) for i in idx]
            full = {**self.defaults, **group, "params": [params[i] for i in idx]}
            self._validate_group(full)
            if flag:
                distributed.check_placements(
                    full["params"],
                    None if names is None else [names[i] for i in idx],
                    stack_of=lambda p, view=full["matrix_view"]: reads_as_stack(p.shape, view),
                    split_sizes=full.get("split_sizes"),
                )
            groups.append(group)
        for group in groups:
            super().add_param_group(group)

    # -- step --------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One optimization step. closure (optional) re-evaluates the model and returns the loss.

        Atomic: everything the step can refuse is checked (and every group planned) before the first
        tensor is written; a refused step changes nothing."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._validate_group(group, at_step=True)  # an lr scheduler or a user may have changed a value
        check_grads(self.param_groups)
        plans = {}
        for g, group in enumerate(self.param_groups):
            if group["use_muon"]:
                plans[g] = _engine.plan_group(group, self._process_group)
                _engine.precheck_backends(self, group, plans[g], self.state)
        guard = None
        if self.defaults["skip_nonfinite"]:
            for group in self.param_groups:
                if group["use_muon"]:
                    indices = [i for i, p in enumerate(group["params"]) if p.grad is not None]
                    _engine.init_state(self, group, self.state, indices)
                else:
                    init_adamw_state(self.state, group)
            guard = NonFiniteGuard(self.param_groups, self.state, self._process_group)
        for g, group in enumerate(self.param_groups):
            if group["use_muon"]:
                self._matrix_group_step(group, plans[g])
            else:
                adamw_group_step(self.state, group)
        if guard is not None:
            guard.restore_if_nonfinite()
        return loss

    def _matrix_group_step(self, group: dict[str, Any], plan: _engine.GroupPlan) -> None:
        indices = [i for i, p in enumerate(group["params"]) if p.grad is not None]
        _engine.init_state(self, group, self.state, indices)
        compute = _engine.Compute(self, group, plan.schedule)
        for mesh, buckets in plan.sharded.items():
            self._sharded.run(compute, self.state, buckets, mesh)
        for mesh, buckets in plan.gathered.items():
            self._gathered.run(compute, self.state, buckets, mesh)
        for bucket in plan.local:
            _engine.run_local(compute, self.state, bucket)
        if plan.replicated:
            self._replicated.run(compute, self.state, plan.replicated, plan.process_group)

    # -- the engine's rule (Muon's; NorMuon overrides) ------------------------------------------------

    def init_row_state(self, p: Tensor, batch: tuple[int, ...], m: int) -> dict[str, Tensor]:
        return {}

    def apply_bucket(
        self,
        group: dict,
        params: list[Tensor],
        orthogonal: Tensor,
        row_states: dict[str, list[Tensor]],
        scale: float,
        check_device: torch.device | None = None,
    ) -> None:
        raise NotImplementedError

    def direction_dtype(self, group: dict, param_dtype: torch.dtype) -> torch.dtype:
        """The dtype of `direction_bucket`'s result."""
        return group["ns_dtype"]

    def direction_bucket(self, group: dict, orthogonal: Tensor, row_states: dict[str, list[Tensor]]) -> Tensor:
        return orthogonal

    # -- checkpoints -------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load_state_dict, checked first (every state tensor's shape, kind and finiteness against
        its parameter; a refused checkpoint changes nothing), keeping this optimizer's ``backend``, and
        with float32 statistics (`_float32_state_keys`) of low-precision parameters kept in float32
        instead of being cast to the parameter dtype."""
        load_checked(self, state_dict, expected_state_shape, self._load_unchecked)

    def _load_unchecked(self, state_dict: dict[str, Any]) -> None:
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        id_map = dict(zip(saved_ids, chain.from_iterable(g["params"] for g in self.param_groups)))
        exact = [
            (id_map[k], key, v[key])
            for k, v in state_dict["state"].items()
            if k in id_map
            for key in self._float32_state_keys
            if key in v
        ]
        super().load_state_dict(state_dict)
        for p, key, value in exact:
            self.state[p][key] = value.detach().to(device=p.device, dtype=value.dtype, copy=True)
        for group in self.param_groups:  # torch cast the momentum to the parameter dtype: back to state_dtype
            if group["use_muon"] and group.get("state_dtype") is not None:
                for p in group["params"]:
                    st = self.state.get(p, {})
                    if "momentum_buffer" in st:
                        st["momentum_buffer"] = st["momentum_buffer"].to(group["state_dtype"])

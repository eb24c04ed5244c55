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

Shape buckets
    In a matrix group, parameters whose matrix form (a weight of ndim > 2, e.g. a conv kernel, is
    flattened to (shape[0], -1)) has the same (m, n), dtype and device form a bucket. One bucket at
    a time: each parameter's momentum output is written into one (P, m, n) stack, the stack is
    orthogonalized by one batched ``newton_schulz`` call, and each parameter takes its slice. Peak
    transient memory is one bucket (stack + Newton–Schulz output and workspace), never a copy of the
    model. ``split_sizes`` on a group splits the rows of every matrix into blocks (per-head or
    split-QKV orthogonalization) that are orthogonalized, scaled and (NorMuon) normalized separately.

Distributed
    Under torch.distributed, replicated (DDP) and row-sharded DTensor (FSDP2) matrices split the
    Newton–Schulz work between ranks: see `fastoptim.distributed` (the `_row_state_keys`,
    `_direction_dtype` and `_block_direction` hooks below are what it needs from a subclass).

Non-finite gradients
    Nothing in ``step()`` looks at tensor values (no host synchronization), so a NaN/Inf gradient
    is not skipped: it makes its own parameter and that parameter's state non-finite. Newton–Schulz
    normalizes and multiplies each matrix of a stack separately, NorMuon's statistics are per row and
    per matrix, and AdamW is elementwise, so no other parameter — not even one in the same bucket —
    is affected. Check ``loss.isfinite()`` (or use a GradScaler-style skip) before calling ``step()``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim.adamw import adamw
from torch.optim.optimizer import _get_scalar_dtype

from .. import _validation as check
from .. import backends
from ..coefficients import resolve
from ..ops import muon_momentum_stack_, newton_schulz

SCALE_MODES = ("original", "match_rms_adamw", "spectral")
NS_EPS = 1e-7  # Newton–Schulz's normalization: X = G / (safety·‖G‖_F + NS_EPS), as the reference Muon

# Group keys that belong to AdamW, and the optimizer default each one falls back to.
_ADAMW_KEYS = {
    "lr": "adamw_lr",
    "betas": "adamw_betas",
    "eps": "adamw_eps",
    "weight_decay": "adamw_weight_decay",
}


def shape_scale(mode: str, m: int, n: int) -> float:
    """The learning-rate multiplier of an (m, n) update for a scale mode (see the module docstring)."""
    if mode == "original":
        return max(1.0, m / n) ** 0.5
    if mode == "match_rms_adamw":
        return 0.2 * math.sqrt(max(m, n))
    if mode == "spectral":
        return math.sqrt(m / n)
    raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {mode!r}")


def matrix_shape(p: Tensor) -> tuple[int, int]:
    """(m, n) of the matrix a parameter of ndim >= 2 is orthogonalized as: (shape[0], numel / shape[0])."""
    m = p.shape[0]
    return m, (p.numel() // m if m else math.prod(p.shape[1:]))


def row_blocks(split_sizes: Sequence[int] | None, m: int) -> list[tuple[int, int]]:
    """Row ranges [r0, r1) of the blocks orthogonalized separately."""
    if split_sizes is None:
        return [(0, m)]
    bounds = [0]
    for size in split_sizes:
        bounds.append(bounds[-1] + size)
    return list(zip(bounds[:-1], bounds[1:]))


# --------------------------------------------------------------------------------------------------
# Validation (pure Python; raises before anything changes)


def check_betas(name: str, value: object) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"{name} must be a pair (beta1, beta2), got {value!r}")
    return (check.beta(f"{name}[0]", value[0]), check.beta(f"{name}[1]", value[1]))


def check_backend(value: object) -> str:
    if not isinstance(value, str) or value not in backends.CHOICES:
        raise ValueError(f"backend must be one of {backends.CHOICES}, got {value!r}")
    return value


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
    (fused when every parameter is on CUDA, foreach otherwise). State: exp_avg, exp_avg_sq, step."""
    params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
    with_grad = [p for p in group["params"] if p.grad is not None]
    if not with_grad:
        return
    fused = all(p.device.type == "cuda" for p in with_grad)
    for p in with_grad:
        st = state[p]
        if len(st) == 0:
            # torch's convention: `step` is a float tensor, on the host unless fused.
            step_device = p.device if fused else torch.device("cpu")
            st["step"] = torch.zeros((), dtype=_get_scalar_dtype(is_fused=fused), device=step_device)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
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
        foreach=not fused,
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


class MatrixOptimizer(torch.optim.Optimizer):
    """Muon-family optimizer: matrix groups through momentum + batched Newton–Schulz + `_apply_block`,
    AdamW groups through torch's AdamW. Subclasses set `_extra_keys` validation and `_apply_block`."""

    # State tensors kept in float32 whatever the parameter dtype (torch's load_state_dict would cast
    # them to the parameter dtype; `load_state_dict` restores them exactly).
    _float32_state_keys: tuple[str, ...] = ()
    # Per-row state (shape (m,)) that `_apply_block` reads and updates: the distributed step moves these
    # rows together with the matrix rows they belong to (see `fastoptim.distributed`).
    _row_state_keys: tuple[str, ...] = ()

    def __init__(self, params: Any, defaults: dict[str, Any], process_group: Any = "auto") -> None:
        from .. import distributed  # fastoptim.distributed builds on this module

        self._validate_matrix_hyper(defaults, "")
        self._validate_adamw_hyper({key: defaults[src] for key, src in _ADAMW_KEYS.items()}, "adamw_")
        self._process_group = distributed.check_process_group(process_group)
        super().__init__(params, defaults)

    # -- groups ------------------------------------------------------------------------------------

    def _validate_matrix_hyper(self, group: dict[str, Any], where: str) -> None:
        check.non_negative(f"{where}lr", group["lr"])
        check.beta(f"{where}momentum", group["momentum"])
        check.boolean(f"{where}nesterov", group["nesterov"])
        check.non_negative(f"{where}weight_decay", group["weight_decay"])
        resolve(group["coefficients"], group["ns_steps"])
        check.compute_dtype(f"{where}ns_dtype", group["ns_dtype"])
        if group["scale_mode"] not in SCALE_MODES:
            raise ValueError(f"{where}scale_mode must be one of {SCALE_MODES}, got {group['scale_mode']!r}")
        check.boolean(f"{where}cautious_weight_decay", group["cautious_weight_decay"])
        check_backend(group["backend"])
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

    def _validate_adamw_hyper(self, group: dict[str, Any], prefix: str) -> None:
        check.non_negative(f"{prefix}lr", group["lr"])
        check_betas(f"{prefix}betas", group["betas"])
        check.positive(f"{prefix}eps", group["eps"])
        check.non_negative(f"{prefix}weight_decay", group["weight_decay"])

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_params("params", group["params"])
        if group["use_muon"]:
            self._validate_matrix_hyper(group, "")
            for i, p in enumerate(group["params"]):
                if p.dim() < 2:
                    raise ValueError(
                        f"use_muon=True but params[{i}] has shape {tuple(p.shape)}: Muon/NorMuon "
                        "orthogonalize matrices (ndim >= 2); put vectors and scalars in a "
                        "use_muon=False (AdamW) group"
                    )
                if group.get("split_sizes") is not None and sum(group["split_sizes"]) != p.shape[0]:
                    raise ValueError(
                        f"split_sizes {list(group['split_sizes'])} must sum to the number of rows of every "
                        f"matrix of the group; params[{i}] has {p.shape[0]} rows"
                    )
        else:
            self._validate_adamw_hyper(group, "")

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
                from .. import distributed

                distributed.check_placements(full["params"], None if names is None else [names[i] for i in idx])
            groups.append(group)
        for group in groups:
            super().add_param_group(group)

    # -- step --------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One optimization step. closure (optional) re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._validate_group(group)  # an lr scheduler or a user may have changed a value
        check_grads(self.param_groups)
        for group in self.param_groups:
            if group["use_muon"]:
                self._matrix_group_step(group)
            else:
                adamw_group_step(self.state, group)
        return loss

    def _init_state(self, p: Tensor, state: dict[str, Any], m: int) -> None:
        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _matrix_group_step(self, group: dict[str, Any]) -> None:
        from .. import distributed

        process_group = getattr(self, "_process_group", "auto")
        if distributed.is_distributed(process_group, group["params"]):
            distributed.matrix_group_step(self, group, process_group)
            return
        buckets: dict[tuple, list[Tensor]] = {}
        for p in group["params"]:
            if p.grad is not None:
                buckets.setdefault((*matrix_shape(p), p.dtype, p.device), []).append(p)
        schedule = resolve(group["coefficients"], group["ns_steps"])
        for (m, n, dtype, device), params in buckets.items():
            blocks = row_blocks(group.get("split_sizes"), m)
            # Momentum of the whole bucket in one multi-tensor call, written straight into its stack. With
            # whole matrices (no split_sizes) the same call applies Newton–Schulz's normalization and
            # stores the stack in ns_dtype — the official Muon's order: cast to bf16, then normalize —
            # so no full-precision stack is written and read back; row blocks are normalized by
            # Newton–Schulz itself, one block at a time.
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self._init_state(p, self.state[p], m)
            fused = len(blocks) == 1
            stacked = torch.empty((len(params), m, n), dtype=group["ns_dtype"] if fused else dtype, device=device)
            muon_momentum_stack_(
                [self.state[p]["momentum_buffer"] for p in params],
                [p.grad for p in params],
                stacked,
                group["momentum"],
                group["nesterov"],
                group["backend"],
                normalize=fused,
                safety=schedule.safety,
                eps=NS_EPS,
            )
            orthogonal = self._orthogonalize(stacked, blocks, schedule, group, normalized=fused)
            del stacked
            for i, p in enumerate(params):
                self._apply_matrix(group, p, orthogonal[i], blocks)

    def _apply_matrix(self, group: dict, p: Tensor, orthogonal: Tensor, blocks: list[tuple[int, int]]) -> None:
        """`_apply_block` on every row block of one whole (m, n) matrix."""
        m, n = orthogonal.shape
        if p.dim() == 2 or p.is_contiguous():
            matrix, write_back = p.view(m, n), False
        else:  # e.g. a channels_last conv kernel: no (m, n) view exists
            matrix, write_back = p.reshape(m, n).contiguous(), True
        for r0, r1 in blocks:
            rows = matrix if len(blocks) == 1 else matrix[r0:r1]
            scale = shape_scale(group["scale_mode"], r1 - r0, n)
            self._apply_block(group, self.state[p], rows, orthogonal[r0:r1], r0, r1, scale)
        if write_back:
            p.copy_(matrix.view(p.shape))

    @staticmethod
    def _orthogonalize(
        stacked: Tensor, blocks: list[tuple[int, int]], schedule: Any, group: dict, normalized: bool = False
    ) -> Tensor:
        """Newton–Schulz of every block of every matrix of a (P, m, n) stack, in as few calls as possible.
        normalized: the stack holds whole matrices already normalized (muon_momentum_stack_(normalize=True))."""
        P, m, n = stacked.shape
        sizes = {r1 - r0 for r0, r1 in blocks}
        if len(sizes) == 1:  # whole matrices, or equal blocks: one batched call over (P·k, m/k, n)
            size = sizes.pop()
            out = newton_schulz(
                stacked.view(P * len(blocks), size, n),
                coefficients=schedule,
                eps=NS_EPS,
                compute_dtype=group["ns_dtype"],
                backend=group["backend"],
                normalized=normalized,
            )
            return out.view(P, m, n)
        out = torch.empty((P, m, n), dtype=group["ns_dtype"], device=stacked.device)
        for r0, r1 in blocks:
            out[:, r0:r1] = newton_schulz(
                stacked[:, r0:r1],
                coefficients=schedule,
                eps=NS_EPS,
                compute_dtype=group["ns_dtype"],
                backend=group["backend"],
            )
        return out

    def _apply_block(
        self, group: dict, state: dict, rows: Tensor, update: Tensor, r0: int, r1: int, scale: float
    ) -> None:
        raise NotImplementedError

    def _direction_dtype(self, group: dict, param_dtype: torch.dtype) -> torch.dtype:
        """The dtype of `_block_direction`'s result."""
        return group["ns_dtype"]

    def _block_direction(self, group: dict, row_state: dict[str, Tensor], update: Tensor) -> Tensor:
        """D such that `_apply_block(rows, update)` equals ``muon_apply_(rows, D, lr, wd, scale, cautious)``,
        computed from a whole row block; ``row_state`` holds the block's slice of each `_row_state_keys`
        tensor and is updated in place. The sharded (FSDP2) step computes D where the whole matrix is
        and applies it on each rank's rows. Muon: D = O."""
        return update

    # -- checkpoints -------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load_state_dict, except that float32 statistics (`_float32_state_keys`) of
        low-precision parameters keep their float32 values instead of being cast to the parameter dtype."""
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

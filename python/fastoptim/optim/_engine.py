"""The bucket engine: one step of a matrix group, for every layout.

How a step flows
    1. Plan (`plan_group`), before any tensor changes: each parameter with a gradient becomes its
       matrices (`_geometry`: 2-D weights, expert banks, flattened conv kernels, row blocks); matrices of
       one (rows, cols, dtype, device) form a *bucket*; each parameter is given to a layout. Everything a
       step can refuse (a gradient sharded unlike its parameter, a forced backend that cannot run a
       bucket) raises here, so a refused step changes nothing.
    2. Run the bucket's three ops — the same `Compute` calls in every layout, so every layout rounds
       like one process:
         muon_momentum_stack_   momentum of every matrix of the bucket, its Newton–Schulz input cast to
                                ns_dtype and normalized, written into one (P, rows, cols) stack;
         newton_schulz          one batched call over the stack (normalized=True: no second pass);
         apply                  one multi-tensor launch: `muon_apply_stack_` (Muon) or
                                `normuon_step_stack_` (NorMuon) over the bucket's parameter views.
    3. Layouts only decide who owns which whole matrices and how they reach their owner and come back:
       - local: a single process (world size 1), or expert banks sharded on the expert dimension
         (every rank holds whole experts);
       - replicated (DDP, `fastoptim.distributed.ReplicatedLayout`): every rank runs the momentum of the
         whole bucket, owners run Newton–Schulz and the apply on their share, parameters are broadcast;
       - sharded (FSDP2 Shard(0) rows, `fastoptim.distributed.ShardedLayout`): each rank casts its rows'
         Newton–Schulz input to ns_dtype, an all-to-all brings owners whole matrices, Newton–Schulz
         normalizes them (the same formula as the fused momentum normalization) and the step direction's
         rows go back.

A `rule` (the optimizer: Muon or NorMuon) supplies the per-family pieces: ``row_state_keys``,
``init_row_state``, ``apply_bucket`` and ``direction_bucket`` (see `MatrixRule`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from .. import distributed, ns_methods
from .._geometry import (
    Matrix,
    layer_form,
    matrices,
    matrix_form,
    newton_schulz_flops,
    reads_as_stack,
    shape_scale,
)
from ..coefficients import Schedule, resolve
from ..ops import check_call, muon_apply_stack_, muon_momentum_stack_, newton_schulz

NS_EPS = 1e-7  # Newton–Schulz's normalization: X = G / (safety·‖G‖_F + NS_EPS), as the reference Muon


class MatrixRule(Protocol):
    """What differs between Muon and NorMuon."""

    row_state_keys: tuple[str, ...]

    def init_row_state(self, p: Tensor, batch: tuple[int, ...], m: int) -> dict[str, Tensor]:
        """Per-row state tensors of shape (*batch, m) for a new parameter."""

    def apply_bucket(
        self,
        group: dict,
        params: list[Tensor],
        orthogonal: Tensor,
        row_states: dict[str, list[Tensor]],
        scale: float,
        check_device: torch.device | None = None,
    ) -> None:
        """Step every matrix view of `params` with its slice of `orthogonal`, in one op call; with
        check_device, only `ops.check_call` that op (meta stand-ins, the real device)."""

    def direction_bucket(self, group: dict, orthogonal: Tensor, row_states: dict[str, list[Tensor]]) -> Tensor:
        """D with ``muon_apply_stack_(params, D, ...)`` == ``apply_bucket(params, orthogonal, ...)``; updates
        the row states in place. Muon: D = O."""


class Unit(NamedTuple):
    """A matrix of the parameter group["params"][param]."""

    param: int
    matrix: Matrix


class Bucket(NamedTuple):
    rows: int
    cols: int
    dtype: torch.dtype
    device: torch.device
    scale: float
    flops: int  # Newton–Schulz FLOPs of one matrix
    units: list[Unit]


class GroupPlan(NamedTuple):
    """What one step of a matrix group does; built before anything changes."""

    schedule: Schedule
    local: list[Bucket]  # single process, process_group=None, or sharded expert banks (whole experts)
    replicated: list[Bucket]  # plain tensors replicated over `process_group`
    process_group: Any
    sharded: dict[Any, list[tuple[tuple[int, int, torch.dtype, torch.device], list[int]]]]  # mesh -> buckets
    gathered: dict[Any, list[tuple[tuple, list[int]]]]  # mesh -> buckets keyed (m, n, dtype, device, placements)


local = distributed.local_tensor


def bucket_units(
    group: dict, indices: Sequence[int], schedule: Schedule, use_local: bool = True
) -> list[Bucket]:
    """The buckets of the matrices of group["params"][i] for i in indices, in order of first appearance."""
    found: dict[tuple, list[Unit]] = {}
    for i in indices:
        p = group["params"][i]
        t = local(p) if use_local else p
        cols = matrix_form(t.shape, group["matrix_view"])[2]
        for matrix in matrices(t.shape, group["matrix_view"], group.get("split_sizes")):
            if matrix.rows == 0 or cols == 0:
                continue  # nothing to orthogonalize (and nothing to divide by)
            found.setdefault((matrix.rows, cols, t.dtype, t.device), []).append(Unit(i, matrix))
    steps = len(schedule.triples)
    transposed = group["matrix_view"] == "transposed"  # stored (in, out): the layer's matrix is (cols, rows)
    return [
        Bucket(rows, cols, dtype, device,
               shape_scale(group["scale_mode"], *((cols, rows) if transposed else (rows, cols))),
               newton_schulz_flops(rows, cols, steps, group.get("ns_method", "standard"), group.get("ns_restarts")),
               units)
        for (rows, cols, dtype, device), units in found.items()
    ]


def plan_group(group: dict, process_group: Any) -> GroupPlan:
    """Sort a matrix group's parameters by layout and bucket them; raises before anything changes."""
    schedule = resolve(group["coefficients"], group["ns_steps"])
    plain, banks, rows_sharded, gathered = [], [], {}, {}
    for i, p in enumerate(group["params"]):
        if p.grad is None:
            continue
        if distributed.is_dtensor(p):
            distributed.check_grad_placement(p, i)
            kind = distributed.layout_kind(p, reads_as_stack(p.shape, group["matrix_view"]))
            if kind == "local":
                banks.append(i)  # a stack sharded on its batch dimensions holds whole matrices: no communication
            elif kind == "rows":
                rows_sharded.setdefault(p.device_mesh, []).append(i)
            else:
                _, m, n = matrix_form(p.shape, group["matrix_view"])
                key = (m, n, p.dtype, local(p).device, tuple(p.placements))
                gathered.setdefault(p.device_mesh, {}).setdefault(key, []).append(i)
        else:
            plain.append(i)
    replicate = distributed.replicate_group(process_group)
    local_indices = banks + (plain if replicate is None else [])
    sharded = {}
    for mesh, indices in rows_sharded.items():
        by_shape: dict[tuple, list[int]] = {}
        for i in indices:
            p = group["params"][i]
            _, m, n = matrix_form(p.shape, group["matrix_view"])
            by_shape.setdefault((m, n, p.dtype, local(p).device), []).append(i)
        sharded[mesh] = list(by_shape.items())
    return GroupPlan(
        schedule,
        bucket_units(group, local_indices, schedule),
        bucket_units(group, plain, schedule) if replicate is not None else [],
        replicate,
        sharded,
        {mesh: list(by_key.items()) for mesh, by_key in gathered.items()},
    )


class Compute:
    """The ops of a bucket, with the group's settings: the same calls in every layout."""

    def __init__(self, rule: MatrixRule, group: dict, schedule: Schedule) -> None:
        self.rule, self.group, self.schedule = rule, group, schedule

    def ns_input(self, bufs: list[Tensor], grads: list[Tensor], out: Tensor, normalize: bool) -> None:
        """Momentum of each matrix; its Newton–Schulz input into out[i] (cast to out's dtype, then, with
        normalize, divided by safety·‖·‖_F + eps)."""
        muon_momentum_stack_(
            bufs,
            grads,
            out,
            self.group["momentum"],
            self.group["nesterov"],
            self.group["backend"],
            normalize=normalize,
            safety=self.schedule.safety,
            eps=NS_EPS,
        )

    def orthogonalize(self, stack: Tensor, normalized: bool) -> Tensor:
        return newton_schulz(
            stack,
            coefficients=self.schedule,
            eps=NS_EPS,
            compute_dtype=self.group["ns_dtype"],
            backend=self.group["backend"],
            normalized=normalized,
            method=self.group.get("ns_method", "standard"),
            restarts=self._restarts(),
        )

    def _restarts(self):
        """Gram's restarts for `newton_schulz`: the group's ns_restarts (None: the default ones); always None
        for the standard method, which takes none."""
        return None if self.group.get("ns_method", "standard") == "standard" else self.group.get("ns_restarts")

    def views(self, state: Any, units: Sequence[Unit]) -> BucketViews:
        return views(self.group, state, units, self.rule.row_state_keys)

    def transposes_rows(self) -> bool:
        """Whether the rule's row statistics must read the (out, in) transpose of the stored matrices: a
        "transposed" group (weights stored (in, out)) of a rule with row state (NorMuon). Momentum and
        Newton–Schulz need no transpose (NS(Gᵀ) = NS(G)ᵀ), nor does Muon's apply (its scale is the bucket's)."""
        return self.group["matrix_view"] == "transposed" and len(self.rule.row_state_keys) > 0

    def apply(self, params: list[Tensor], orthogonal: Tensor, row_states: dict[str, list[Tensor]], scale: float):
        if self.transposes_rows():
            # Bucket-sized transients: Oᵀ, the (out, in) direction and its transpose back (contiguous, so the
            # fused kernels run); the parameters are never copied.
            self.apply_direction(params, self.direction(orthogonal, row_states), scale)
            return
        self.rule.apply_bucket(self.group, params, orthogonal, row_states, scale)

    def direction(self, orthogonal: Tensor, row_states: dict[str, list[Tensor]]) -> Tensor:
        if self.transposes_rows():
            transposed = orthogonal.mT.contiguous()
            return self.rule.direction_bucket(self.group, transposed, row_states).mT.contiguous()
        return self.rule.direction_bucket(self.group, orthogonal, row_states)

    def apply_direction(self, params: list[Tensor], direction: Tensor, scale: float) -> None:
        g = self.group
        muon_apply_stack_(
            params, direction, g["lr"], g["weight_decay"], scale, g["cautious_weight_decay"], g["backend"]
        )


class BucketViews(NamedTuple):
    params: list[Tensor]
    grads: list[Tensor]
    bufs: list[Tensor]
    row_states: dict[str, list[Tensor]]


def views(group: dict, state: Any, units: Sequence[Unit], row_state_keys: Sequence[str]) -> BucketViews:
    """Each unit's views of its (local) parameter, gradient, momentum buffer and row states."""
    params, grads, bufs = [], [], []
    row_states: dict[str, list[Tensor]] = {key: [] for key in row_state_keys}
    for param, matrix in units:
        p = group["params"][param]
        st = state[p]
        params.append(matrix.of(local(p)))
        grads.append(matrix.of(local(p.grad)))
        bufs.append(matrix.of(local(st["momentum_buffer"])))
        for key in row_state_keys:
            row_states[key].append(matrix.rows_of(local(st[key])))
    return BucketViews(params, grads, bufs, row_states)


def run_local(compute: Compute, state: Any, bucket: Bucket) -> None:
    """One bucket in one process: momentum into the stack, Newton–Schulz, the apply: three op calls."""
    v = compute.views(state, bucket.units)
    stack = torch.empty(
        (len(bucket.units), bucket.rows, bucket.cols), dtype=compute.group["ns_dtype"], device=bucket.device
    )
    compute.ns_input(v.bufs, v.grads, stack, normalize=True)
    orthogonal = compute.orthogonalize(stack, normalized=True)
    del stack
    compute.apply(v.params, orthogonal, v.row_states, bucket.scale)


def init_state(rule: MatrixRule, group: dict, state: Any, indices: Sequence[int]) -> None:
    """Momentum buffer (state_dtype, or the parameter's) and the rule's row state of new parameters."""
    for i in indices:
        p = group["params"][i]
        st = state[p]
        if "momentum_buffer" in st:
            continue
        dtype = group.get("state_dtype") or p.dtype
        st["momentum_buffer"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        batch, m, _ = layer_form(p.shape, group["matrix_view"])  # one row statistic per output neuron
        for key, full in rule.init_row_state(p, batch, m).items():
            st[key] = distributed.shard_rows_like(p, full, stack=len(batch) > 0)


def _meta(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A stand-in of t's shape, strides and dtype that holds no memory."""
    t = local(t)
    return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=dtype or t.dtype, device="meta")


def precheck_backends(rule: MatrixRule, group: dict, plan: GroupPlan, state: Any) -> None:
    """Every op a bucket will call is checked, with meta stand-ins of its real arguments (the momentum
    buffers may not exist yet), against the backend it will run on: a forced backend (the group's, or
    FASTOPTIM_BACKEND) that cannot run one raises before anything changes. "auto" always finds one."""
    if group["backend"] == "auto" and os.environ.get("FASTOPTIM_BACKEND", "auto").strip().lower() in ("", "auto"):
        return
    state_dtype = group.get("state_dtype")
    for bucket in (*plan.local, *plan.replicated):
        params, bufs, grads = [], [], []
        row_states: dict[str, list[Tensor]] = {key: [] for key in rule.row_state_keys}
        for param, matrix in bucket.units:
            p = group["params"][param]
            st = state.get(p, {})  # not state[p]: a defaultdict would grow an entry
            buf = st.get("momentum_buffer")
            params.append(matrix.of(_meta(p)))
            grads.append(matrix.of(_meta(p.grad)))
            bufs.append(matrix.of(_meta(buf) if buf is not None else _meta(p, state_dtype or p.dtype)))
            batch, m, _ = layer_form(local(p).shape, group["matrix_view"])
            for key in rule.row_state_keys:
                row = st.get(key)
                stand_in = _meta(row) if row is not None else torch.empty((*batch, m), device="meta")
                row_states[key].append(matrix.rows_of(stand_in))
        stack = torch.empty((len(bucket.units), bucket.rows, bucket.cols), dtype=group["ns_dtype"], device="meta")
        device = bucket.device
        check_call("muon_momentum_stack_", bufs, grads, stack, group["momentum"], group["nesterov"],
                   group["backend"], normalize=True, safety=plan.schedule.safety, eps=NS_EPS, device=device)
        restarts = group.get("ns_restarts")
        ns_op = ns_methods.op_name(group.get("ns_method", "standard"), bucket.rows, bucket.cols,
                                   len(plan.schedule.triples), restarts)
        gram = {"restarts": restarts} if ns_op == "gram_newton_schulz" else {}
        check_call(ns_op, stack, coefficients=plan.schedule, eps=NS_EPS, compute_dtype=group["ns_dtype"],
                   backend=group["backend"], normalized=True, device=device, **gram)
        if group["matrix_view"] == "transposed" and len(rule.row_state_keys) > 0:
            # Compute.apply's path: the rule's step on the (P, out, in) transpose into a direction, then
            # muon_apply_stack_ of the direction on the stored (in, out) parameters.
            dtype = rule.direction_dtype(group, params[0].dtype)
            direction = torch.empty((len(params), bucket.cols, bucket.rows), dtype=dtype, device="meta")
            rule.apply_bucket(group, list(direction), stack.mT.contiguous(), row_states, -1.0, check_device=device)
            check_call("muon_apply_stack_", params, direction.mT.contiguous(), group["lr"], group["weight_decay"],
                       bucket.scale, group["cautious_weight_decay"], group["backend"], device=device)
            continue
        rule.apply_bucket(group, params, stack, row_states, bucket.scale, check_device=device)

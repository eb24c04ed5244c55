"""Muon and NorMuon on torch.distributed: the layouts of the bucket engine (replicated, sharded).

Nothing to call: `Muon` and `NorMuon` find out by themselves. A layout only decides who owns which whole
matrices and how they reach their owner and come back; the momentum -> normalize -> Newton–Schulz ->
apply calls are the engine's (`fastoptim.optim._engine.Compute`), the same as one process, so every
layout rounds exactly like one process (bfloat16 ns_dtype included).

Replicated — plain tensors while torch.distributed is initialized with more than one rank (DDP)
    ``process_group="auto"`` (the default) takes the default group; pass a ProcessGroup (e.g. the
    replicate dimension of a hybrid setup) or None (every rank steps every matrix, no communication).
    Every rank holds the full gradients after DDP's all-reduce and runs the momentum of every matrix of a
    bucket into its Newton–Schulz stack (elementwise, bit-identical on every rank because the gradients
    are; the stack is what one process writes). Each bucket's matrices (expert-bank experts and row blocks
    included) are cut into at most W chunks, given greedily to ranks by Newton–Schulz FLOPs
    (ns_steps·(4s²l + 2s³) per s x l matrix, s <= l; largest chunk first, to the least-loaded rank). The
    owner of a chunk orthogonalizes it and applies it to the real parameters with the engine's one
    multi-tensor apply, then broadcasts each matrix (and NorMuon's ``second_moment`` rows)
    asynchronously; the next bucket is computed while they travel, and step() waits at the end. Every
    rank ends the step with bit-identical parameters and state, so any rank's ``state_dict()`` is a
    complete single-process state dict.

Sharded — DTensor parameters (FSDP2 ``fully_shard``, HSDP, tensor parallel, FSDP + TP)
    - Expert banks (read as stacks of matrices, ``matrix_view``): Shard(0) splits the experts, so every
      rank holds whole matrices and steps them locally: no communication.
    - Matrices (2-D, flattened conv kernels): shards follow torch.chunk (ceil(m/W) rows per rank, the last
      ranks fewer, possibly none). State is sharded like the parameter (``momentum_buffer`` a DTensor like
      it, ``second_moment`` a (m,) DTensor ``Shard(0)``), saved and loaded by
      ``torch.distributed.checkpoint``. Each rank runs the momentum of its rows and casts their
      Newton–Schulz input to ns_dtype (one multi-tensor call per bucket); one asynchronous all-to-all
      per bucket brings every owner the rows of its matrices (with NorMuon the ``second_moment`` rows
      too); the owner normalizes and orthogonalizes whole matrices (Newton–Schulz's normalization is the
      formula the fused momentum normalization of one process uses, on the same ns_dtype values) and
      computes the step direction D (Muon D = O; NorMuon D = Ô from whole rows and whole-matrix norms);
      a second all-to-all returns each rank the rows of D (and of the new ``second_moment``), which it
      applies with one multi-tensor ``muon_apply_stack_`` per bucket. The all-to-all of bucket b+1 runs
      while bucket b is orthogonalized.
    - Any other mix of Shard, _StridedShard and Replicate on any mesh (`GatheredLayout`): HSDP
      (Replicate, Shard(0)), ColwiseParallel Shard(0) / RowwiseParallel Shard(1), FSDP + TP; the whole
      matrices are all-gathered in ns_dtype, owners over every rank of the mesh orthogonalize and
      broadcast the direction, every rank applies its shards.
    Partial placements, split_sizes with a gathered layout and a stack sharded inside its matrices are
    refused at construction with a ValueError naming the parameter.

AdamW groups and SophiaG are elementwise and run on each rank's local shard (torch's foreach AdamW
takes DTensors; Sophia's ops get `local_tensor` views): no communication; their gradients are the ones
DDP or FSDP2 reduced in backward(). SophiaH differentiates its closure's loss itself
(torch.autograd.grad, which DDP's and FSDP2's backward hooks never see): with replicated parameters it
averages the gradients and the Hutchinson estimates over ``process_group`` (`all_reduce_mean`, one
asynchronous all-reduce each, the gradients' overlapping the Hessian-vector product); DTensor
(FSDP2) parameters are refused at construction, since autograd.grad cannot reach sharded parameters.

Communication per step, bytes per rank (W ranks; the matrices (m_i, n_i) of the matrix groups; b_p the
parameter's element size; b_d the size of the direction D sent back: ns_dtype's for Muon (2 for bfloat16),
4 for NorMuon (8 with float64); r = 4 for NorMuon's float32 ``second_moment``, 0 for Muon; rows_ir the rows
of matrix i on rank r, ~m_i/W; "owned" by the rank from `assign_work`):

- Replicated (DDP): rank q receives Σ_{i not owned by q} (m_i·n_i·b_p + m_i·r) and (ring/tree broadcast)
  forwards about as much: on average (1 - 1/W)·Σ_i (m_i·n_i·b_p + m_i·r) each way — one all-gather of the
  matrix parameters, half of DDP's own gradient all-reduce for them (2·(1 - 1/W)·Σ_i m_i·n_i·b_grad).
- Sharded (FSDP2, 1-D Shard(0)): rank q sends Σ_{i not owned} rows_iq·n_i·b_ns + Σ_{i owned}
  (m_i - rows_iq)·n_i·b_d and receives Σ_{i owned} (m_i - rows_iq)·n_i·b_ns + Σ_{i not owned} rows_iq·n_i·b_d
  (b_ns: ns_dtype's size; plus the same with n_i·b → r for the ``second_moment`` rows): on average
  (1/W)·(1 - 1/W)·Σ_i m_i·(n_i·(b_ns + b_d) + 2r) each way — about (b_ns + b_d)/(W·b_p) of one FSDP2
  all-gather of the same matrices.
- HSDP / TP / FSDP + TP (`GatheredLayout`): an all-gather of the ns_dtype input over the S ranks holding
  shards of a matrix, (1 - 1/S)·Σ_i m_i·n_i·b_ns received, and the owners' broadcasts of the direction
  and row statistics, (1 - 1/W)·Σ_i (m_i·n_i·b_d + m_i·r), W the ranks of the mesh. Expert banks sharded
  on their expert dimension: 0.
- AdamW and SophiaG parameters: 0 in both modes. SophiaH (replicated): one all-reduce of its gradients
  per step, 2·(1 - 1/W)·Σ numel·b_grad as DDP's, and one of the Hutchinson estimates per refresh.
- Once per new bucket layout (the first step): one all_gather_object of the layout, so that ranks that
  disagree raise instead of hanging.

Memory: the replicated step adds one bucket's stack of owned matrices (as one process does); the
sharded step holds, while its all-to-alls are in flight, the rank's rows of every matrix and the whole
matrices it owns (about 2/W of the matrix parameters) plus one bucket's Newton–Schulz workspace.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from ._geometry import assign_work, newton_schulz_flops, row_blocks, row_bounds, shape_scale
from ._validation import accumulate_dtype

if dist.is_available():
    from torch.distributed.tensor import DTensor, Replicate, Shard

    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:  # older torch: FSDP2 + TP places no strided shards
        _StridedShard = None
else:  # a torch build without torch.distributed: nothing here is ever distributed
    DTensor = Replicate = Shard = _StridedShard = None


def transport_dtype(ns_dtype: torch.dtype) -> torch.dtype:
    """The dtype the sharded layouts cast and move the not yet normalized Newton–Schulz input in: ns_dtype,
    except float16, whose range (65504) a momentum can exceed before Newton–Schulz normalizes it: float32
    then (twice the bytes, for float16 only; Newton–Schulz normalizes in float32 and casts, as the fused
    normalization of one process does for a float16 stack)."""
    return torch.float32 if ns_dtype == torch.float16 else ns_dtype


def _ns_options(group: dict) -> tuple[str, Any]:
    """A matrix group's Newton–Schulz (method, restarts), for the FLOP count that balances the owners."""
    return group.get("ns_method", "standard"), group.get("ns_restarts")


def is_dtensor(t: object) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """A DTensor's local shard (an alias: in-place ops change the DTensor), any other tensor itself."""
    return t.to_local() if is_dtensor(t) else t


# --------------------------------------------------------------------------------------------------
# Construction-time checks


def check_process_group(process_group: Any) -> Any:
    """Validates the optimizers' process_group argument: "auto", None or a ProcessGroup."""
    if process_group is None or (isinstance(process_group, str) and process_group == "auto"):
        return process_group
    if dist.is_available() and isinstance(process_group, dist.ProcessGroup):
        return process_group
    raise TypeError(f'process_group must be "auto", None or a torch.distributed.ProcessGroup, got {process_group!r}')


def sharded_dim(placement: Any) -> int | None:
    """The tensor dimension a placement shards (Shard or _StridedShard), None for Replicate; Partial raises."""
    if _StridedShard is not None and isinstance(placement, _StridedShard):
        return placement.dim
    if isinstance(placement, Shard):
        return placement.dim
    if placement.is_replicate():
        return None
    raise ValueError(f"placement {placement} is neither a shard nor a replicate")


def _shifted(placement: Any, by: int) -> Any:
    """The placement of the same shard pattern on a tensor with `by` more leading dimensions."""
    dim = sharded_dim(placement)
    if dim is None:
        return placement
    if _StridedShard is not None and isinstance(placement, _StridedShard):
        return _StridedShard(dim + by, split_factor=placement.split_factor)
    return Shard(dim + by)


def row_state_placements(p: Tensor, stack: bool) -> tuple:
    """Placements of a (*batch, m) per-row statistic of DTensor p: shards of p's batch dimensions and of
    its rows stay, shards of its columns become Replicate (every column shard holds every row)."""
    keep = p.dim() - 1 if stack else 1  # dims [0, keep) of p are dims of the row statistic
    return tuple(
        placement if (sharded_dim(placement) is None or sharded_dim(placement) < keep) else Replicate()
        for placement in p.placements
    )


def layout_kind(p: Tensor, stack: bool) -> str:
    """How the engine steps DTensor p: "local" (a stack sharded on its batch dimensions only: whole
    matrices everywhere), "rows" (Shard(0) on a 1-D mesh: all-to-all of rows) or "gathered" (any other
    mix of Shard/_StridedShard/Replicate on any mesh: HSDP, tensor parallel, FSDP + TP)."""
    dims = [sharded_dim(placement) for placement in p.placements]
    if stack and all(d is None or d < p.dim() - 2 for d in dims):
        return "local"
    if not stack and p.device_mesh.ndim == 1 and tuple(p.placements) == (Shard(0),):
        return "rows"
    return "gathered"


def check_placements(
    params: Sequence[Tensor], names: Sequence[str] | None = None, stack_of: Callable[[Tensor], bool] | None = None,
    split_sizes: Sequence[int] | None = None,
) -> None:
    """DTensor matrix parameters: Shard / _StridedShard / Replicate placements on any mesh; Partial (an
    unreduced gradient layout) is refused, and so are ``split_sizes`` with a layout other than row shards
    on a 1-D mesh and a stack sharded inside its matrices (not supported yet)."""
    for i, p in enumerate(params):
        if not is_dtensor(p):
            continue
        mesh, placements = p.device_mesh, tuple(p.placements)
        name = f"params[{i}]" if names is None else f"parameter {names[i]!r}"
        where = f"{name} (shape {tuple(p.shape)}) is a DTensor placed {list(placements)} on a {mesh.ndim}-D mesh"
        try:
            [sharded_dim(placement) for placement in placements]
        except ValueError:
            raise ValueError(
                f"{where}; Muon/NorMuon take Shard, _StridedShard or Replicate placements (a Partial parameter "
                "is not a value); put it in a use_muon=False (AdamW) group"
            ) from None
        stack = stack_of(p) if stack_of is not None else False
        kind = layout_kind(p, stack)
        if stack and kind != "local":
            raise ValueError(
                f"{where}; an expert bank (a stack of matrices) is supported sharded on its expert dimensions "
                "(whole experts on every rank), not inside its matrices"
            )
        if split_sizes is not None and kind == "gathered":
            raise ValueError(
                f"{where}; split_sizes is supported for plain tensors and Shard(0) on a 1-D mesh (FSDP2), not "
                "yet for this layout: orthogonalize the blocks as separate parameters"
            )
        if kind == "gathered":
            mesh_group(mesh)  # created now, on every rank at the same point (new_group is collective)


_MESH_GROUPS: dict[tuple[int, ...], Any] = {}


def mesh_group(mesh: Any) -> Any:
    """A process group over every rank of a device mesh (its own group when 1-D)."""
    if mesh.ndim == 1:
        return mesh.get_group()
    ranks = tuple(sorted(mesh.mesh.flatten().tolist()))
    if ranks not in _MESH_GROUPS:
        _MESH_GROUPS[ranks] = dist.new_group(list(ranks))
    return _MESH_GROUPS[ranks]


def replicate_group(process_group: Any) -> Any:
    """The group plain (replicated) parameters are split over, or None when there is nothing to split."""
    if process_group == "auto":
        if not (dist.is_available() and dist.is_initialized()):
            return None
        process_group = dist.group.WORLD
    if process_group is None or dist.get_world_size(process_group) < 2:
        return None
    return process_group


def all_reduce_mean(tensors: Sequence[Tensor], process_group: Any) -> Callable[[], list[Tensor]]:
    """Starts averaging `tensors` over `process_group` (one asynchronous all-reduce per dtype and device
    of a flat copy: the inputs are only read) and returns finish(), which waits and returns the means,
    shaped like the inputs (views of the flat buffers). Sum, then divide: gloo has no ReduceOp.AVG."""
    world = dist.get_world_size(process_group)
    by_kind: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        by_kind.setdefault((t.dtype, t.device), []).append(i)
    pending = []
    for indices in by_kind.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in indices])
        pending.append((indices, flat, dist.all_reduce(flat, group=process_group, async_op=True)))

    def finish() -> list[Tensor]:
        out: list[Tensor] = list(tensors)
        for indices, flat, work in pending:
            work.wait()
            flat.div_(world)
            for i, piece in zip(indices, flat.split([tensors[i].numel() for i in indices])):
                out[i] = piece.view(tensors[i].shape)
        return out

    return finish




def check_grad_placement(p: Tensor, index: int) -> None:
    """A DTensor parameter's gradient must be sharded like it (checked before a step changes anything)."""
    grad = p.grad
    if not is_dtensor(grad) or tuple(grad.placements) != tuple(p.placements):
        placements = list(grad.placements) if is_dtensor(grad) else "a plain tensor"
        raise ValueError(
            f"params[{index}] is placed {list(p.placements)} but its gradient is {placements}; "
            "the sharded step needs the gradient sharded like the parameter"
        )


def shard_rows_like(p: Tensor, full: Tensor, stack: bool = False) -> Tensor:
    """A new per-row state tensor `full` (*batch, m) of p, as a DTensor placed like p's rows
    (`row_state_placements`); `full` itself when p is not a DTensor. Local slicing, no communication."""
    if not is_dtensor(p):
        return full
    mesh = p.device_mesh
    placements = row_state_placements(p, stack)
    replicated = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
    local = replicated.redistribute(mesh, placements).to_local().clone()  # not a view keeping `full` alive
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=full.shape, stride=full.stride())


def _check_layout(layout: tuple, process_group: Any, world: int) -> None:
    """Ranks that disagree on a group's matrices would wait on each other's collectives forever: raise."""
    gathered: list = [None] * world
    dist.all_gather_object(gathered, layout, group=process_group)
    if any(other != layout for other in gathered):
        raise RuntimeError(
            "the ranks disagree on the matrices of a Muon/NorMuon group (shapes, dtypes or which have "
            f"gradients): {gathered}. Plain tensors are taken as replicated over the process group (DDP); "
            "pass process_group=None when they are not"
        )


class _Owners:
    """`assign_work` per bucket layout, cached; a new layout is first compared across ranks."""

    def __init__(self) -> None:
        self._cache: dict = {}

    def __call__(self, layout: tuple, costs: list[tuple[int, int]], process_group: Any, world: int) -> list:
        key = (id(process_group), world, layout)
        if key not in self._cache:
            if world > 1:
                _check_layout(layout, process_group, world)
            self._cache[key] = assign_work(costs, world)
        return self._cache[key]


def _broadcast(t: Tensor, src: int, process_group: Any) -> Callable[[], None]:
    """Start broadcasting t from global rank src; returns the function that finishes it."""
    buffer = t if t.is_contiguous() else t.contiguous()
    work = dist.broadcast(buffer, src, group=process_group, async_op=True)

    def finish() -> None:
        work.wait()
        if buffer is not t:
            t.copy_(buffer)

    return finish


class ReplicatedLayout:
    """Plain tensors replicated over a process group (DDP): owners orthogonalize, everyone receives."""

    def __init__(self) -> None:
        self._owners = _Owners()

    def run(self, compute: Any, state: Any, buckets: Sequence[Any], process_group: Any) -> None:
        world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
        layout = tuple((b.rows, b.cols, str(b.dtype), len(b.units), b.flops) for b in buckets)
        owners = self._owners(layout, [(len(b.units), b.flops) for b in buckets], process_group, world)
        keys = compute.rule.row_state_keys
        pending = []
        for b, bucket in enumerate(buckets):
            order = sorted(range(len(bucket.units)), key=lambda k: owners[b][k])  # stable: owned ones adjacent
            units = [bucket.units[k] for k in order]
            owner_of = [owners[b][k] for k in order]
            mine = [k for k, q in enumerate(owner_of) if q == rank]
            v = compute.views(state, units)
            stack = torch.empty((len(units), bucket.rows, bucket.cols), dtype=compute.group["ns_dtype"],
                                device=bucket.device)
            compute.ns_input(v.bufs, v.grads, stack, normalize=True)  # every rank: every momentum buffer
            if mine:
                lo, hi = mine[0], mine[-1] + 1
                orthogonal = compute.orthogonalize(stack[lo:hi], normalized=True)
                del stack
                compute.apply(v.params[lo:hi], orthogonal, {key: v.row_states[key][lo:hi] for key in keys},
                              bucket.scale)
                del orthogonal
            else:
                del stack
            for k, q in enumerate(owner_of):
                src = dist.get_global_rank(process_group, q)
                for t in (v.params[k], *(v.row_states[key][k] for key in keys)):
                    pending.append(_broadcast(t, src, process_group))
        for finish in pending:
            finish()


class _Exchange(NamedTuple):
    """An all-to-all in flight; holding it keeps its send buffer alive until `wait`."""

    recv: Tensor
    work: Any
    send: Tensor

    def wait(self) -> Tensor:
        self.work.wait()
        return self.recv


def _all_to_all(send: Tensor, recv_sizes: list[int], send_sizes: list[int], process_group: Any) -> _Exchange:
    """Start an all-to-all of a flat buffer: send_sizes[r] elements to rank r, recv_sizes[r] from it."""
    send = send.reshape(-1)
    recv = torch.empty(sum(recv_sizes), dtype=send.dtype, device=send.device)
    work = dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=process_group, async_op=True)
    return _Exchange(recv, work, send)


def _row_state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    # Every rank must size its receive buffers alike, also one whose state is not there yet.
    return accumulate_dtype(param_dtype)


def _assemble(recv: Tensor, bounds: list[tuple[int, int]], shape: tuple, dtype: torch.dtype) -> Tensor:
    """Whole matrices (P, m, ...) from the flat all-to-all output: rank r's rows [start, stop) of each."""
    full = torch.empty(shape, dtype=dtype, device=recv.device)
    offset = 0
    for start, stop in bounds:
        size = shape[0] * (stop - start) * math.prod(shape[2:])
        full[:, start:stop] = recv[offset : offset + size].view(shape[0], stop - start, *shape[2:])
        offset += size
    return full


class ShardedLayout:
    """Row-sharded DTensor matrices (FSDP2 Shard(0) on a 1-D mesh): whole matrices meet at their owner."""

    def __init__(self) -> None:
        self._owners = _Owners()

    def run(self, compute: Any, state: Any, buckets: Sequence[tuple[tuple, list[int]]], mesh: Any) -> None:
        group, rule = compute.group, compute.rule
        process_group, world, rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()
        keys = rule.row_state_keys
        ns_dtype = group["ns_dtype"]
        steps = len(compute.schedule.triples)
        split_sizes = group.get("split_sizes")
        costs = []
        for (m, n, *_), indices in buckets:
            blocks = row_blocks(split_sizes, m)
            flops = sum(newton_schulz_flops(r1 - r0, n, steps, *_ns_options(group)) for r0, r1 in blocks)
            costs.append((len(indices), flops))
        layout = tuple(
            (m, n, str(dtype), count, flops) for ((m, n, dtype, _), _), (count, flops) in zip(buckets, costs)
        )
        owners = self._owners(layout, costs, process_group, world)

        # 1. Momentum of the local rows, cast to ns_dtype; each owner's rows go out in one all-to-all.
        gathers = []
        for b, ((m, n, dtype, device), indices) in enumerate(buckets):
            bounds = row_bounds(m, world)
            rows = [stop - start for start, stop in bounds]
            mine = rows[rank]
            order = sorted(range(len(indices)), key=lambda k: owners[b][k])  # grouped by destination
            params = [group["params"][indices[k]] for k in order]
            counts = [owners[b].count(q) for q in range(world)]
            for p in params:
                if local_tensor(p).shape[:1] != (mine,):
                    raise RuntimeError(
                        f"a {tuple(p.shape)} DTensor holds {local_tensor(p).shape[0]} rows on rank {rank}; "
                        f"Shard(0) of {m} rows over {world} ranks gives {mine} (torch.chunk)"
                    )
            send = torch.empty((len(params), mine, n), dtype=transport_dtype(ns_dtype), device=device)
            compute.ns_input(
                [local_tensor(state[p]["momentum_buffer"]) for p in params],
                [local_tensor(p.grad) for p in params],
                send,
                normalize=False,
            )
            state_dtype = _row_state_dtype(dtype)
            send_state = {
                key: torch.stack([local_tensor(state[p][key]).to(state_dtype) for p in params])
                if params else torch.empty((0, mine), dtype=state_dtype, device=device)
                for key in keys
            }
            owned = counts[rank]
            rows_in = _all_to_all(send, [owned * r * n for r in rows], [c * mine * n for c in counts], process_group)
            state_in = {
                key: _all_to_all(send_state[key], [owned * r for r in rows], [c * mine for c in counts], process_group)
                for key in keys
            }
            del send, send_state
            gathers.append((bounds, params, counts, rows_in, state_in))

        # 2. At each owner: whole matrices, Newton–Schulz, the direction; its rows go back in one all-to-all.
        returns = []
        for b, ((m, n, dtype, device), _) in enumerate(buckets):
            bounds, params, counts, rows_in, state_in = gathers[b]
            rows = [stop - start for start, stop in bounds]
            owned, mine = counts[rank], rows[rank]
            full = _assemble(rows_in.wait(), bounds, (owned, m, n), transport_dtype(ns_dtype))
            state_full = {key: _assemble(x.wait(), bounds, (owned, m), x.recv.dtype) for key, x in state_in.items()}
            del rows_in, state_in
            direction = torch.empty((owned, m, n), dtype=rule.direction_dtype(group, dtype), device=device)
            if owned:
                _owner_direction(compute, full, state_full, direction, row_blocks(split_sizes, m))
            del full
            rows_out = _all_to_all(
                torch.cat([direction[:, start:stop].reshape(-1) for start, stop in bounds]),
                [c * mine * n for c in counts],
                [owned * r * n for r in rows],
                process_group,
            )
            del direction
            state_out = {
                key: _all_to_all(
                    torch.cat([state_full[key][:, start:stop].reshape(-1) for start, stop in bounds]),
                    [c * mine for c in counts],
                    [owned * r for r in rows],
                    process_group,
                )
                for key in keys
            }
            returns.append((rows_out, state_out))

        # 3. Every rank steps its own rows: one muon_apply_stack_ per bucket (per row block with split_sizes).
        for b, ((m, n, *_), _) in enumerate(buckets):
            bounds, params = gathers[b][:2]
            rows_out, state_out = returns[b]
            start, stop = bounds[rank]
            mine = stop - start
            directions = rows_out.wait().view(len(params), mine, n)
            new_state = {key: x.wait().view(len(params), mine) for key, x in state_out.items()}
            if not mine:
                continue
            _apply_local_rows(compute, [local_tensor(p) for p in params], directions, row_blocks(split_sizes, m),
                              start, stop, n)
            for k, p in enumerate(params):
                for key, rows_of_key in new_state.items():
                    local_tensor(state[p][key]).copy_(rows_of_key[k])


def _owner_direction(compute: Any, full: Tensor, state_full: dict[str, Tensor], direction: Tensor,
                     blocks: list[tuple[int, int]]) -> None:
    """Direction of whole (owned, m, n) matrices in ns_dtype, not yet normalized, block by block: the
    blocks of one size in one Newton–Schulz call, as one process buckets them."""
    owned, m, n = full.shape
    sizes = {r1 - r0 for r0, r1 in blocks}
    if len(sizes) == 1:  # whole matrices, or equal blocks: one call over (owned·k, m/k, n)
        size, k = sizes.pop(), len(blocks)
        orthogonal = compute.orthogonalize(full.view(owned * k, size, n), normalized=False)
        row_states = {key: list(t.view(owned * k, size)) for key, t in state_full.items()}
        direction.view(owned * k, size, n).copy_(compute.direction(orthogonal, row_states))
        return
    for r0, r1 in blocks:
        orthogonal = compute.orthogonalize(full[:, r0:r1].contiguous(), normalized=False)
        row_states = {key: [t[j, r0:r1] for j in range(owned)] for key, t in state_full.items()}
        direction[:, r0:r1] = compute.direction(orthogonal, row_states)


def _apply_local_rows(compute: Any, locals_: list[Tensor], directions: Tensor, blocks: list[tuple[int, int]],
                      start: int, stop: int, n: int) -> None:
    """p <- p·(1 - lr·wd) - lr·scale·D on this rank's rows [start, stop), each row block with its scale."""
    mode = compute.group["scale_mode"]
    if len(blocks) == 1:
        compute.apply_direction(locals_, directions, shape_scale(mode, blocks[0][1], n))
        return
    parts: dict[tuple[int, float], list[tuple[int, int, int]]] = {}
    for r0, r1 in blocks:
        lo, hi = max(r0, start), min(r1, stop)
        if lo < hi:
            parts.setdefault((hi - lo, shape_scale(mode, r1 - r0, n)), []).append((lo - start, hi - start))
    for (_, scale), ranges in parts.items():
        views = [t[lo:hi] for t in locals_ for lo, hi in ranges]
        stack = torch.stack([directions[k, lo:hi] for k in range(len(locals_)) for lo, hi in ranges])
        compute.apply_direction(views, stack, scale)


def _gather_stack(local: Tensor, mesh: Any, placements: Sequence[Any], shape: tuple) -> Tensor:
    """The whole (P, *shape) stack on every rank from each rank's (P, *local shape) shards of P tensors
    placed `placements` (one all-gather per sharded mesh dimension, by DTensor)."""
    full_shape = (local.shape[0], *shape)
    stride = tuple(math.prod(full_shape[d + 1 :]) for d in range(len(full_shape)))
    stacked = DTensor.from_local(
        local, mesh, [_shifted(pl, 1) for pl in placements], run_check=False, shape=full_shape, stride=stride
    )
    return stacked.full_tensor()


def _local_of_stack(full: Tensor, mesh: Any, placements: Sequence[Any]) -> Tensor:
    """This rank's shards (P, *local shape) of a whole (P, *shape) stack present on every rank (local slicing)."""
    replicated = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, [_shifted(pl, 1) for pl in placements]).to_local()


class GatheredLayout:
    """DTensor matrices under any mix of Shard, _StridedShard and Replicate on any mesh: HSDP
    (Replicate, Shard(0)), tensor parallel Shard(0) / Shard(1), FSDP + TP on a 2-D mesh.

    Per bucket (same global shape, dtype, mesh and placements): each rank runs the momentum of its
    shards and casts the Newton–Schulz input to ns_dtype (one multi-tensor call); one all-gather per
    sharded mesh dimension gives every rank the whole matrices; the bucket is cut into FLOP-balanced
    chunks over all ranks of the mesh (the replicate dimension too); each owner orthogonalizes its chunk
    (Newton–Schulz normalizes it: the formula of one process's fused normalization) and computes the
    direction (NorMuon: whole rows, whole-matrix norms) and the new row statistics, which it broadcasts;
    every rank then applies its own shards of the direction with one ``muon_apply_stack_``.
    Communication per rank and step: an all-gather of the bucket in ns_dtype (as FSDP's own all-gather of
    the parameters, in 2 bytes) and the directions of every matrix (b_d bytes per element)."""

    def __init__(self) -> None:
        self._owners = _Owners()

    def run(self, compute: Any, state: Any, buckets: Sequence[tuple[tuple, list[int]]], mesh: Any) -> None:
        group, rule = compute.group, compute.rule
        keys = rule.row_state_keys
        process_group = mesh_group(mesh)
        world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
        steps = len(compute.schedule.triples)
        options = _ns_options(group)
        costs = [(len(indices), newton_schulz_flops(m, n, steps, *options)) for (m, n, *_), indices in buckets]
        layout = tuple(
            (m, n, str(dtype), str(placements), count, flops)
            for ((m, n, dtype, _, placements), _), (count, flops) in zip(buckets, costs)
        )
        owners = self._owners(layout, costs, process_group, world)
        pending = []
        for b, ((m, n, dtype, device, placements), indices) in enumerate(buckets):
            order = sorted(range(len(indices)), key=lambda k: owners[b][k])  # owned matrices adjacent
            params = [group["params"][indices[k]] for k in order]
            owner_of = [owners[b][k] for k in order]
            shape = tuple(params[0].shape)
            local_shape = tuple(local_tensor(params[0]).shape)
            local_numel = math.prod(local_shape)
            ns_input = torch.empty((len(params), 1, local_numel), dtype=transport_dtype(group["ns_dtype"]),
                                   device=device)
            compute.ns_input(
                [local_tensor(state[p]["momentum_buffer"]) for p in params],
                [local_tensor(p.grad) for p in params],
                ns_input,
                normalize=False,
            )
            full = _gather_stack(ns_input.view(len(params), *local_shape), mesh, placements, shape)
            del ns_input
            row_placements = row_state_placements(params[0], stack=False)
            rows_full = {
                key: _gather_stack(
                    torch.stack([local_tensor(state[p][key]) for p in params]), mesh, row_placements, (m,)
                )
                for key in keys
            }
            direction = torch.empty((len(params), m, n), dtype=rule.direction_dtype(group, dtype), device=device)
            mine = [k for k, q in enumerate(owner_of) if q == rank]
            if mine:
                lo, hi = mine[0], mine[-1] + 1
                orthogonal = compute.orthogonalize(full.view(len(params), m, n)[lo:hi], normalized=False)
                row_states = {key: list(t[lo:hi]) for key, t in rows_full.items()}
                direction[lo:hi] = compute.direction(orthogonal, row_states)
                del orthogonal
            del full
            for q in sorted(set(owner_of)):
                lo = owner_of.index(q)
                hi = lo + owner_of.count(q)
                src = dist.get_global_rank(process_group, q)
                pending.append(_broadcast(direction[lo:hi], src, process_group))
                for key in keys:
                    pending.append(_broadcast(rows_full[key][lo:hi], src, process_group))
            pending.append(_apply_gathered(compute, state, params, direction, rows_full, mesh, placements,
                                           row_placements, shape_scale(group["scale_mode"], m, n)))
        for finish in pending:
            finish()


def _apply_gathered(compute: Any, state: Any, params: list[Tensor], direction: Tensor, rows_full: dict,
                    mesh: Any, placements: Sequence[Any], row_placements: Sequence[Any],
                    scale: float) -> Callable[[], None]:
    """The step of this rank's shards, once the direction's broadcasts are done (a pending finish)."""

    def finish() -> None:
        shape = tuple(params[0].shape)
        local = _local_of_stack(direction.view(len(params), *shape), mesh, placements)
        if params and local[0].numel():
            compute.apply_direction([local_tensor(p) for p in params],
                                    local.reshape(len(params), 1, -1).contiguous(), scale)
        for key, t in rows_full.items():
            new_rows = _local_of_stack(t, mesh, row_placements)
            for k, p in enumerate(params):
                local_tensor(state[p][key]).copy_(new_rows[k])

    return finish

"""Muon and NorMuon on torch.distributed: replicated (DDP) and sharded (FSDP2 / DTensor) parameters.

Nothing to call: `Muon` and `NorMuon` find out by themselves. Single-process use needs no process
group and runs the single-process code unchanged.

Modes (per matrix group, per shape bucket: the parameters of one (m, n), dtype and device)

Replicated — plain tensors while torch.distributed is initialized with more than one rank (DDP)
    ``process_group="auto"`` (the default) takes the default group; pass a ProcessGroup (e.g. the
    replicate dimension of a hybrid setup) or None (every rank steps every matrix, no communication).
    Every rank holds the full gradients after DDP's all-reduce and updates every momentum buffer
    (elementwise, cheap, bit-identical on every rank because the gradients are). Each bucket's
    matrices are cut into at most W chunks, and the chunks are given to ranks greedily by
    Newton–Schulz FLOPs (ns_steps·(4s²l + 2s³) per s x l block, s <= l; largest chunk first, to the
    least-loaded rank), so a big bucket and many small ones balance by work, not by count. The owner
    of a matrix orthogonalizes it and runs the optimizer's own apply step on the real parameter —
    the very ops of a single process — then broadcasts the parameter (and NorMuon's ``second_moment``,
    whose update needs the orthogonalized matrix) asynchronously, as soon as its bucket is done;
    the next bucket is computed while it travels, and step() waits for all of them at the end.
    Every rank ends the step with bit-identical parameters and state, so any rank's
    ``state_dict()`` is a complete single-process state dict (a single process can load it).

Sharded — DTensor parameters placed ``[Shard(0)]`` on a 1-D mesh (FSDP2 ``fully_shard``)
    Shards follow torch.chunk (ceil(m/W) rows per rank, the last ranks fewer, possibly none), so
    uneven row counts work. State is sharded like the parameter: ``momentum_buffer`` is a DTensor
    like it, ``second_moment`` a (m,) DTensor ``Shard(0)`` on the same mesh; both are saved and loaded
    by ``torch.distributed.checkpoint`` (``get_optimizer_state_dict`` / ``set_optimizer_state_dict``).
    Each rank updates the momentum of its rows. Matrices get owners as above; one asynchronous
    all-to-all per bucket brings every owner the rows of its matrices (with NorMuon the ``second_moment``
    rows too), the owner orthogonalizes whole matrices and computes the step direction D of each row
    block (`MatrixOptimizer._block_direction`: Muon D = O; NorMuon D = Ô, the row-normalized,
    norm-rescaled update, from whole matrices, so its Frobenius norms are those of one process), and
    a second all-to-all returns each rank the rows of D (and of the new ``second_moment``) it holds.
    Each rank then takes p·(1 - lr·wd) - lr·scale·D on its rows: exactly the single-process step.
    The all-to-all of bucket b+1 runs while bucket b is orthogonalized. Any other placement (Shard(1),
    Replicate, Partial, a 2-D mesh) is refused at construction with a ValueError naming the parameter.

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
- Sharded (FSDP2): rank q sends Σ_{i not owned} rows_iq·n_i·b_p + Σ_{i owned} (m_i - rows_iq)·n_i·b_d and
  receives Σ_{i owned} (m_i - rows_iq)·n_i·b_p + Σ_{i not owned} rows_iq·n_i·b_d (plus the same with
  n_i·b → r for the ``second_moment`` rows): on average (1/W)·(1 - 1/W)·Σ_i m_i·(n_i·(b_p + b_d) + 2r)
  each way — about (b_p + b_d)/(W·b_p) of one FSDP2 all-gather of the same matrices.
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

from .coefficients import Schedule, resolve
from .ops import muon_apply_, muon_momentum_
from .optim._base import matrix_shape, row_blocks, shape_scale

if dist.is_available():
    from torch.distributed.tensor import DTensor, Shard
else:  # a torch build without torch.distributed: nothing here is ever distributed
    DTensor = Shard = None


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


def check_placements(params: Sequence[Tensor], names: Sequence[str] | None = None) -> None:
    """Matrix parameters must be plain tensors or DTensors placed [Shard(0)] on a 1-D mesh."""
    for i, p in enumerate(params):
        if not is_dtensor(p):
            continue
        mesh, placements = p.device_mesh, tuple(p.placements)
        if mesh.ndim == 1 and placements == (Shard(0),):
            continue
        name = f"params[{i}]" if names is None else f"parameter {names[i]!r}"
        raise ValueError(
            f"{name} (shape {tuple(p.shape)}) is a DTensor placed {list(placements)} on a {mesh.ndim}-D mesh; "
            "Muon/NorMuon orthogonalize DTensor matrices only when sharded by rows, [Shard(0)] on a 1-D mesh "
            "(FSDP2 fully_shard); put it in a use_muon=False (AdamW) group or shard it along dim 0"
        )


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


def is_distributed(process_group: Any, params: Sequence[Tensor]) -> bool:
    """Whether a matrix group takes the distributed step (else the single-process one)."""
    return replicate_group(process_group) is not None or any(is_dtensor(p) for p in params)


# --------------------------------------------------------------------------------------------------
# Work split


def newton_schulz_flops(n: int, blocks: Sequence[tuple[int, int]], steps: int) -> int:
    """FLOPs of Newton–Schulz on one matrix of n columns cut into row blocks: per s x l block
    (s = min, l = max) and iteration, X·Xᵀ (2s²l), the polynomial in it (2s³) and the product with X (2s²l)."""
    total = 0
    for r0, r1 in blocks:
        s, big = sorted((r1 - r0, n))
        total += steps * (4 * s * s * big + 2 * s**3)
    return total


def assign_work(buckets: Sequence[tuple[int, int]], world: int) -> list[list[int]]:
    """Owner rank of every matrix of every bucket, from (matrix count, FLOPs per matrix) per bucket.

    Each bucket is cut into min(count, world) near-equal chunks (a chunk stays one batched
    Newton–Schulz call); the chunks go, largest first, to the least-loaded rank (ties: the lower
    bucket, chunk and rank), so every rank computes the same answer.
    """
    chunks = []
    for b, (count, flops) in enumerate(buckets):
        parts = min(count, world)
        bounds = [count * c // parts for c in range(parts + 1)] if parts else [0]
        chunks += [(flops * (stop - start), b, start, stop) for start, stop in zip(bounds[:-1], bounds[1:])]
    owners = [[0] * count for count, _ in buckets]
    load = [0] * world
    for cost, b, start, stop in sorted(chunks, key=lambda c: (-c[0], c[1], c[2])):
        rank = min(range(world), key=lambda r: (load[r], r))
        load[rank] += cost
        owners[b][start:stop] = [rank] * (stop - start)
    return owners


def _owners(opt: Any, group: dict, buckets: dict, schedule: Schedule, process_group: Any, world: int) -> list:
    """`assign_work` for a group's buckets, cached per layout; a new layout is first compared across
    ranks (ranks that disagree would otherwise wait on each other's collectives forever)."""
    blocks_of = {m: row_blocks(group.get("split_sizes"), m) for m, *_ in buckets}
    layout = tuple(
        (m, n, str(dtype), len(params), newton_schulz_flops(n, blocks_of[m], len(schedule.triples)))
        for (m, n, dtype, *_), params in buckets.items()
    )
    cache = opt.__dict__.setdefault("_distributed_plans", {})
    key = (id(process_group), world, layout)
    if key not in cache:
        if world > 1:
            gathered: list = [None] * world
            dist.all_gather_object(gathered, layout, group=process_group)
            if any(other != layout for other in gathered):
                raise RuntimeError(
                    "the ranks disagree on the matrices of a Muon/NorMuon group (shapes, dtypes or which "
                    f"have gradients): {gathered}. Plain tensors are taken as replicated over the process "
                    "group (DDP); pass process_group=None when they are not"
                )
        cache[key] = assign_work([(count, flops) for *_, count, flops in layout], world)
    return cache[key]


# --------------------------------------------------------------------------------------------------
# The step


def matrix_group_step(opt: Any, group: dict[str, Any], process_group: Any) -> None:
    """One step of a matrix group whose parameters are DTensors or replicated over a process group."""
    replicated: dict[tuple, list[Tensor]] = {}
    sharded: dict[Any, dict[tuple, list[Tensor]]] = {}
    for i, p in enumerate(group["params"]):
        if p.grad is None:
            continue
        m, n = matrix_shape(p)
        if is_dtensor(p):
            if not is_dtensor(p.grad) or tuple(p.grad.placements) != tuple(p.placements):
                placements = list(p.grad.placements) if is_dtensor(p.grad) else "a plain tensor"
                raise ValueError(
                    f"params[{i}] is placed {list(p.placements)} but its gradient is {placements}; "
                    "the sharded step needs the gradient sharded like the parameter"
                )
            sharded.setdefault(p.device_mesh, {}).setdefault((m, n, p.dtype, p.device), []).append(p)
        else:
            replicated.setdefault((m, n, p.dtype, p.device), []).append(p)
    schedule = resolve(group["coefficients"], group["ns_steps"])
    for mesh, buckets in sharded.items():
        _sharded_step(opt, group, buckets, schedule, mesh)
    if replicated:
        _replicated_step(opt, group, replicated, schedule, replicate_group(process_group))


def _momentum(opt: Any, group: dict, p: Tensor, m: int, mesh: Any = None) -> Tensor | None:
    """The momentum step of one matrix's (local) rows; returns the Newton–Schulz input of those rows
    (None for a rank that holds none of them, which still gets its empty state)."""
    state = opt.state[p]
    if "momentum_buffer" not in state:
        opt._init_state(p, state, m)
        if mesh is not None:  # per-row state becomes a (m,) DTensor sharded like the rows
            start, stop = _row_bounds(m, mesh.size())[mesh.get_local_rank()]
            for key in opt._row_state_keys:
                state[key] = DTensor.from_local(
                    state[key][start:stop].clone(), mesh, [Shard(0)], run_check=False, shape=(m,), stride=(1,)
                )
    if local_tensor(p).numel() == 0:
        return None
    return muon_momentum_(
        local_tensor(state["momentum_buffer"]),
        local_tensor(p.grad),
        group["momentum"],
        group["nesterov"],
        group["backend"],
    )


def _broadcast(t: Tensor, src: int, process_group: Any) -> Callable[[], None]:
    """Start broadcasting t from global rank src; returns the function that finishes it."""
    buffer = t if t.is_contiguous() else t.contiguous()
    work = dist.broadcast(buffer, src, group=process_group, async_op=True)

    def finish() -> None:
        work.wait()
        if buffer is not t:
            t.copy_(buffer)

    return finish


def _replicated_step(opt: Any, group: dict, buckets: dict, schedule: Schedule, process_group: Any) -> None:
    world = 1 if process_group is None else dist.get_world_size(process_group)
    rank = 0 if process_group is None else dist.get_rank(process_group)
    owners = _owners(opt, group, buckets, schedule, process_group, world)
    pending = []
    for b, ((m, n, dtype, device), params) in enumerate(buckets.items()):
        blocks = row_blocks(group.get("split_sizes"), m)
        mine = [i for i in range(len(params)) if owners[b][i] == rank]
        slot = {i: k for k, i in enumerate(mine)}
        stacked = torch.empty((len(mine), m, n), dtype=dtype, device=device)
        for i, p in enumerate(params):  # every rank keeps every momentum buffer
            ns_input = _momentum(opt, group, p, m)
            if i in slot and ns_input is not None:
                stacked[slot[i]].copy_(ns_input.reshape(m, n))
            del ns_input
        if mine:
            orthogonal = opt._orthogonalize(stacked, blocks, schedule, group)
            del stacked
            for k, i in enumerate(mine):
                opt._apply_matrix(group, params[i], orthogonal[k], blocks)
            del orthogonal
        if world > 1:
            for i, p in enumerate(params):
                src = dist.get_global_rank(process_group, owners[b][i])
                for t in (p, *(opt.state[p][key] for key in opt._row_state_keys)):
                    pending.append(_broadcast(t, src, process_group))
    for finish in pending:
        finish()


def _row_bounds(m: int, world: int) -> list[tuple[int, int]]:
    """Rows [start, stop) of each rank under Shard(0): torch.chunk's split (ceil(m/W) rows each)."""
    chunk = -(-m // world) if m else 0
    return [(min(r * chunk, m), min((r + 1) * chunk, m)) for r in range(world)]


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


def _sharded_step(opt: Any, group: dict, buckets: dict, schedule: Schedule, mesh: Any) -> None:
    """Gather each matrix's rows at its owner, orthogonalize, return each rank the step direction of its rows."""
    process_group, world, rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()
    owners = _owners(opt, group, buckets, schedule, process_group, world)
    keys = opt._row_state_keys

    # 1. Momentum of the local rows; the rows of each owner's matrices go out in one all-to-all.
    gathers = []
    for b, ((m, n, dtype, device), params) in enumerate(buckets.items()):
        bounds = _row_bounds(m, world)
        rows = [stop - start for start, stop in bounds]
        mine = rows[rank]
        order = sorted(range(len(params)), key=lambda i: owners[b][i])  # grouped by destination rank
        counts = [owners[b].count(q) for q in range(world)]
        send = torch.empty((len(params), mine, n), dtype=dtype, device=device)
        send_state = {key: torch.empty((len(params), mine), dtype=_state_dtype(dtype), device=device) for key in keys}
        for k, i in enumerate(order):
            p = params[i]
            if local_tensor(p).shape[:1] != (mine,):
                raise RuntimeError(
                    f"a {tuple(p.shape)} DTensor holds {local_tensor(p).shape[0]} rows on rank {rank}; "
                    f"Shard(0) of {m} rows over {world} ranks gives {mine} (torch.chunk)"
                )
            ns_input = _momentum(opt, group, p, m, mesh)
            if ns_input is not None:
                send[k].copy_(ns_input.reshape(mine, n))
                for key in keys:
                    send_state[key][k].copy_(local_tensor(opt.state[p][key]))
            del ns_input
        owned = counts[rank]
        rows_in = _all_to_all(send, [owned * r * n for r in rows], [c * mine * n for c in counts], process_group)
        state_in = {
            key: _all_to_all(send_state[key], [owned * r for r in rows], [c * mine for c in counts], process_group)
            for key in keys
        }
        del send, send_state
        gathers.append((bounds, order, counts, rows_in, state_in))

    # 2. At each owner: whole matrices, Newton–Schulz, the direction; its rows go back in one all-to-all.
    returns = []
    for b, (m, n, dtype, device) in enumerate(buckets):
        bounds, order, counts, rows_in, state_in = gathers[b]
        gathers[b] = (bounds, order)  # the received buffers can go once assembled
        blocks = row_blocks(group.get("split_sizes"), m)
        rows = [stop - start for start, stop in bounds]
        owned = counts[rank]
        direction_dtype = opt._direction_dtype(group, dtype)
        full = _assemble(rows_in.wait(), bounds, (owned, m, n), dtype)
        state_full = {key: _assemble(x.wait(), bounds, (owned, m), x.recv.dtype) for key, x in state_in.items()}
        del rows_in, state_in
        direction = torch.empty((owned, m, n), dtype=direction_dtype, device=device)
        if owned:
            orthogonal = opt._orthogonalize(full, blocks, schedule, group)
            for j in range(owned):
                for r0, r1 in blocks:
                    row_state = {key: state_full[key][j, r0:r1] for key in keys}
                    direction[j, r0:r1] = opt._block_direction(group, row_state, orthogonal[j, r0:r1])
            del orthogonal
        del full
        send_sizes = [owned * r * n for r in rows]
        mine = rows[rank]
        recv_sizes = [c * mine * n for c in counts]
        rows_out = _all_to_all(
            torch.cat([direction[:, start:stop].reshape(-1) for start, stop in bounds]),
            recv_sizes,
            send_sizes,
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

    # 3. Every rank steps its own rows.
    for b, ((m, n, *_), params) in enumerate(buckets.items()):
        bounds, order = gathers[b]
        rows_out, state_out = returns[b]
        start, stop = bounds[rank]
        mine = stop - start
        directions = rows_out.wait().view(len(params), mine, n)
        new_state = {key: x.wait().view(len(params), mine) for key, x in state_out.items()}
        if not mine:
            continue
        blocks = row_blocks(group.get("split_sizes"), m)
        for k, i in enumerate(order):
            p = params[i]
            _apply_rows(group, local_tensor(p), directions[k], blocks, start, stop, n)
            for key, rows_of_key in new_state.items():
                local_tensor(opt.state[p][key]).copy_(rows_of_key[k])


def _state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    # Per-row statistics (NorMuon's second_moment): float64 for float64 parameters, else float32. Every
    # rank must size its receive buffers alike, also one whose state is not there yet.
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def _assemble(recv: Tensor, bounds: list[tuple[int, int]], shape: tuple, dtype: torch.dtype) -> Tensor:
    """Whole matrices (P, m, ...) from the flat all-to-all output: rank r's rows [start, stop) of each."""
    full = torch.empty(shape, dtype=dtype, device=recv.device)
    offset = 0
    for start, stop in bounds:
        size = shape[0] * (stop - start) * math.prod(shape[2:])
        full[:, start:stop] = recv[offset : offset + size].view(shape[0], stop - start, *shape[2:])
        offset += size
    return full


def _apply_rows(
    group: dict, local: Tensor, direction: Tensor, blocks: list[tuple[int, int]], start: int, stop: int, n: int
) -> None:
    """p <- p·(1 - lr·wd) - lr·scale·D on this rank's rows [start, stop), each row block with its scale."""
    if local.dim() == 2 or local.is_contiguous():
        matrix, write_back = local.view(stop - start, n), False
    else:
        matrix, write_back = local.reshape(stop - start, n).contiguous(), True
    for r0, r1 in blocks:
        lo, hi = max(r0, start), min(r1, stop)
        if lo >= hi:
            continue
        muon_apply_(
            matrix[lo - start : hi - start],
            direction[lo - start : hi - start],
            group["lr"],
            group["weight_decay"],
            shape_scale(group["scale_mode"], r1 - r0, n),
            group["cautious_weight_decay"],
            group["backend"],
        )
    if write_back:
        local.copy_(matrix.view(local.shape))

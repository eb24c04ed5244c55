"""Optimizers built on the fused ops: drop-in torch.optim.Optimizer subclasses.

- `Muon`, `NorMuon`: orthogonalized updates for hidden matrices, torch's AdamW for the rest
  (groups, shape buckets and non-finite gradients: see `fastoptim.optim._base`).
- `SophiaG`, `SophiaH`: clipped diagonal-Hessian updates (Gauss–Newton–Bartlett / Hutchinson).
- `param_groups(model)`: routes embeddings, the output head and vectors to AdamW.
- `sophia_sampled_loss(logits)`: the sampled-label loss for `SophiaG.update_hessian()`.

How a Muon/NorMuon step flows (`_engine`): the step first checks every group and plans it — each
parameter with a gradient becomes its matrices (a 2-D weight; each expert of a 3-D bank; a flattened
conv kernel; row blocks with ``split_sizes``), matrices of one (rows, cols, dtype, device) form a bucket,
and each parameter gets a layout (one process; replicated over DDP ranks; row-sharded FSDP2 DTensors;
expert banks sharded by expert stay local). Nothing has changed yet: a refused step raises here. Then
every bucket runs three op calls — `muon_momentum_stack_` (momentum, Newton–Schulz input cast to
ns_dtype and normalized into one stack), one batched `newton_schulz`, one multi-tensor apply
(`muon_apply_stack_` / `normuon_step_stack_`) — the same calls in every layout, which only move whole
matrices to their owner and the results back (`fastoptim.distributed`). AdamW groups run torch's AdamW.
"""

from __future__ import annotations

from .._geometry import MATRIX_VIEWS, SCALE_MODES, shape_scale
from .groups import param_groups, sophia_sampled_loss
from .muon import Muon
from .normuon import NorMuon
from .sophia import SophiaG, SophiaH

__all__ = [
    "MATRIX_VIEWS",
    "SCALE_MODES",
    "Muon",
    "NorMuon",
    "SophiaG",
    "SophiaH",
    "param_groups",
    "shape_scale",
    "sophia_sampled_loss",
]

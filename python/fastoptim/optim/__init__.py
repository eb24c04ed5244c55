"""Optimizers built on the fused ops: drop-in torch.optim.Optimizer subclasses.

- `Muon`, `NorMuon`: orthogonalized updates for hidden matrices, torch's AdamW for the rest
  (groups, shape buckets and non-finite gradients: see `fastoptim.optim._base`).
- `SophiaG`, `SophiaH`: clipped diagonal-Hessian updates (Gauss–Newton–Bartlett / Hutchinson).
- `param_groups(model)`: routes embeddings, the output head and vectors to AdamW.
- `sophia_sampled_loss(logits)`: the sampled-label loss for `SophiaG.update_hessian()`.
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

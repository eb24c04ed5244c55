"""Helpers around the optimizers: routing a model's parameters, and Sophia's sampled-label loss."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def param_groups(
    model: nn.Module,
    head_names: Sequence[str] = ("lm_head", "head", "output"),
    adamw_names: Sequence[str] = (),
    **matrix_options: Any,
) -> list[dict[str, Any]]:
    """Param groups for Muon / NorMuon that follow the papers' routing.

    - AdamW (``use_muon=False``): every parameter with ndim < 2; every nn.Embedding /
      nn.EmbeddingBag weight; the output head: the last nn.Linear whose weight is tied to an
      embedding or whose name (last component of its qualified name) is in ``head_names``; every
      parameter whose qualified name contains one of ``adamw_names``.
    - Muon / NorMuon (``use_muon=True``): all other matrices (hidden linear and conv weights, expert
      banks). A 3-D tensor reads as a stack of matrices by default (an MoE bank (E, m, n)); the 3-D
      kernels of 1-D convolutions (nn.Conv1d, nn.ConvTranspose1d) are matrices (out, in·k) instead, so
      they get a group of their own with ``matrix_view="flatten"`` (unless ``matrix_options`` sets
      ``matrix_view``).

    ``matrix_options`` (e.g. ``lr=0.02, weight_decay=0.01``) go into the matrix groups; the AdamW
    group takes the optimizer's ``adamw_*`` settings. Groups that would be empty are left out.
    Shared (tied) parameters appear once.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    embedding_weights = {
        id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
    }
    adamw_ids = set(embedding_weights)
    head = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            tied = id(module.weight) in embedding_weights
            if tied or name.rsplit(".", 1)[-1] in head_names:
                head = module
    if head is not None:
        adamw_ids.add(id(head.weight))
    conv1d_weights = {
        id(m.weight) for m in model.modules() if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d)) and m.weight.dim() == 3
    }
    matrices, conv1d, others = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or id(p) in adamw_ids or any(s in name for s in adamw_names):
            others.append(p)
        elif id(p) in conv1d_weights and "matrix_view" not in matrix_options:
            conv1d.append(p)
        else:
            matrices.append(p)
    groups = []
    if matrices:
        groups.append({"params": matrices, "use_muon": True, **matrix_options})
    if conv1d:
        groups.append({"params": conv1d, "use_muon": True, "matrix_view": "flatten", **matrix_options})
    if others:
        groups.append({"params": others, "use_muon": False})
    return groups


def sophia_sampled_loss(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Cross-entropy of ``logits`` (..., vocab) against labels sampled from softmax(logits).

    The Gauss–Newton–Bartlett estimator of SophiaG: backpropagate this loss, then call
    ``SophiaG.update_hessian()``. The labels are drawn without gradient (only the cross-entropy is
    differentiated); the mean over all positions matches the official training script (and its
    ``bs`` scaling of rho).
    """
    if not isinstance(logits, Tensor) or logits.dim() < 1 or not logits.is_floating_point():
        raise TypeError("logits must be a floating-point tensor of shape (..., vocab)")
    flat = logits.reshape(-1, logits.shape[-1])
    with torch.no_grad():
        probs = torch.softmax(flat.detach().float(), dim=-1)
        labels = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return F.cross_entropy(flat, labels)

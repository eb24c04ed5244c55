"""Helpers around the optimizers: routing a model's parameters, and Sophia's sampled-label loss."""

from __future__ import annotations

import sys
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
      they get a group of their own with ``matrix_view="flatten"``; the weights of transformers'
      GPT-2-style ``Conv1D`` (``transformers.pytorch_utils.Conv1D``: stored (in, out), y = x W + b) get
      one with ``matrix_view="transposed"``, so that the shape scale reads (out, in) and NorMuon's
      statistics are per output neuron (unless ``matrix_options`` sets ``matrix_view``). transformers is
      never imported here: a model can hold a ``Conv1D`` only once transformers has imported it.
    - Tied weights: a parameter that is an embedding's weight and also another module's (a tied LM head,
      whatever its module or name: nn.Linear, Conv1D) is an embedding weight, so it goes to AdamW, once.

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
    transposed_weights = {id(m.weight) for m in model.modules() if _is_transformers_conv1d(m)}
    matrices, conv1d, transposed, others = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or id(p) in adamw_ids or any(s in name for s in adamw_names):
            others.append(p)
        elif id(p) in conv1d_weights and "matrix_view" not in matrix_options:
            conv1d.append(p)
        elif id(p) in transposed_weights and "matrix_view" not in matrix_options:
            transposed.append(p)
        else:
            matrices.append(p)
    groups = []
    if matrices:
        groups.append({"params": matrices, "use_muon": True, **matrix_options})
    if conv1d:
        groups.append({"params": conv1d, "use_muon": True, "matrix_view": "flatten", **matrix_options})
    if transposed:
        groups.append({"params": transposed, "use_muon": True, "matrix_view": "transposed", **matrix_options})
    if others:
        groups.append({"params": others, "use_muon": False})
    return groups


def _is_transformers_conv1d(module: nn.Module) -> bool:
    """Whether module is a transformers ``Conv1D`` (weight (in, out)), without importing transformers."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(pytorch_utils, "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d) and module.weight.dim() == 2


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

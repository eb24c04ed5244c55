"""QK-clip (MuonClip, Kimi K2): keep every attention head's largest logit at or below a threshold.

Kimi Team, "Kimi K2: Open Agentic Intelligence" (arXiv:2507.20534), MuonClip. For each attention head h,
over the forward passes of a training step,

    S_h = max over the batch and over the unmasked (i, j) of  softmax_scale · q_i,h · k_j,h

and after the optimizer step, for every head with S_h > tau,

    gamma_h = tau / S_h;   W_q,h <- sqrt(gamma_h)·W_q,h;   W_k,h <- sqrt(gamma_h)·W_k,h

(biases of the query and key projections too), so that logits, bilinear in the two projections, shrink by
gamma_h: the head's maximum on the same input becomes tau. Heads with S_h <= tau are multiplied by exactly
1 (their weights keep every bit). The forward and backward passes are not changed; the maxima stay on the
device (no host synchronization on the training path: recording is one extra q·kᵀ per layer, 2·B·H·T²·d
FLOPs, clipping one elementwise pass over the query and key weights).

It assumes what makes logits bilinear in (W_q, W_k): no normalization of q or k after the projection
(QK-norm) and as many key heads as query heads (no grouped-query sharing). Rotary embeddings are linear
and fine.

Use::

    clip = fastoptim.QKClip.for_gpt(model, tau=100.0)   # the compare model; or clip.add_layer(...)
    loss.backward(); optimizer.step(); clip.clip_()     # clip_ also resets the recorded maxima
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn


class _Layer(NamedTuple):
    query: Tensor
    key: Tensor
    query_bias: Tensor | None
    key_bias: Tensor | None
    n_head: int
    head_dim: int
    dim: int
    softmax_scale: float
    causal: bool
    max_logit: Tensor  # (n_head,) float32, on the weights' device


class QKClip:
    """Per-head max-logit recorder and QK-clip for a set of attention layers.

    ``add_layer`` registers one layer's query and key projections and returns the recorder to call from
    the layer's forward with its (batch, n_head, time, head_dim) queries and keys; ``clip_()`` (after
    ``optimizer.step()``) rescales the heads whose recorded maximum exceeds ``tau`` and resets the maxima.
    """

    def __init__(self, tau: float = 100.0) -> None:
        if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not math.isfinite(tau) or tau <= 0:
            raise ValueError(f"tau must be a positive finite number, got {tau!r}")
        self.tau = float(tau)
        self.layers: list[_Layer] = []

    def add_layer(
        self,
        query: Tensor,
        key: Tensor,
        n_head: int,
        *,
        dim: int = 0,
        query_bias: Tensor | None = None,
        key_bias: Tensor | None = None,
        softmax_scale: float | None = None,
        causal: bool = True,
    ) -> Callable[[Tensor, Tensor], None]:
        """Register a layer; returns ``record(q, k)``.

        query, key: the projection weights, or views of them (``qkv.weight[:C]``: basic slicing keeps a view,
        so clipping writes the parameter), whose dimension ``dim`` holds the n_head·head_dim output features,
        head-major: ``dim=0`` for an nn.Linear weight (out, in), ``dim=1`` for a GPT-2 Conv1D weight (in, out).
        query_bias, key_bias: their (n_head·head_dim,) biases, if any. softmax_scale: the factor on q·kᵀ
        (default 1/√head_dim, scaled_dot_product_attention's); causal: only j <= i count.
        """
        for name, t in (("query", query), ("key", key)):
            if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() < 1:
                raise TypeError(f"{name} must be a floating-point weight tensor, got {_describe(t)}")
        if query.shape != key.shape or query.device != key.device:
            raise ValueError(
                f"query and key must have one shape and device, got {tuple(query.shape)} on {query.device} "
                f"and {tuple(key.shape)} on {key.device}"
            )
        if isinstance(dim, bool) or not isinstance(dim, int) or not -query.dim() <= dim < query.dim():
            raise ValueError(f"dim must index a dimension of query (shape {tuple(query.shape)}), got {dim!r}")
        dim %= query.dim()
        features = query.shape[dim]
        if isinstance(n_head, bool) or not isinstance(n_head, int) or n_head < 1 or features % n_head:
            raise ValueError(f"n_head must be a positive divisor of query.shape[{dim}] = {features}, got {n_head!r}")
        for name, bias in (("query_bias", query_bias), ("key_bias", key_bias)):
            if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (features,)):
                raise ValueError(f"{name} must be None or a ({features},) tensor, got {_describe(bias)}")
        head_dim = features // n_head
        if softmax_scale is None:
            softmax_scale = 1.0 / math.sqrt(head_dim)
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real) or softmax_scale <= 0:
            raise ValueError(f"softmax_scale must be a positive number, got {softmax_scale!r}")
        max_logit = torch.full((n_head,), -math.inf, dtype=torch.float32, device=query.device)
        index = len(self.layers)
        self.layers.append(_Layer(query, key, query_bias, key_bias, n_head, head_dim, dim, float(softmax_scale),
                                  bool(causal), max_logit))
        return lambda q, k: self.record(index, q, k)

    @torch.no_grad()
    def record(self, layer: int, q: Tensor, k: Tensor) -> None:
        """max_logits[layer] <- max(max_logits[layer], this batch's per-head maximum logit), on the device."""
        spec = self.layers[layer]
        expected = (spec.n_head, spec.head_dim)
        for name, t in (("q", q), ("k", k)):
            if not isinstance(t, Tensor) or t.dim() != 4 or (t.shape[1], t.shape[3]) != expected:
                raise ValueError(
                    f"{name} must be (batch, {spec.n_head}, time, {spec.head_dim}) for layer {layer}, "
                    f"got {_describe(t)}"
                )
        if q.shape[0] != k.shape[0]:
            raise ValueError(f"q and k must have one batch size, got {q.shape[0]} and {k.shape[0]}")
        logits = torch.matmul(q.float(), k.float().mT) * spec.softmax_scale  # (batch, heads, time_q, time_k)
        if spec.causal:
            t_q, t_k = logits.shape[-2:]
            # queries are the last t_q of t_k positions (a KV cache makes t_k longer), as SDPA's is_causal aligns them
            visible = torch.ones(t_q, t_k, dtype=torch.bool, device=logits.device).tril(diagonal=t_k - t_q)
            logits = logits.masked_fill(~visible, -math.inf)
        if logits.numel() == 0:
            return
        torch.maximum(spec.max_logit, logits.amax(dim=(0, 2, 3)), out=spec.max_logit)

    @property
    def max_logits(self) -> list[Tensor]:
        """The recorded per-head maxima, one (n_head,) float32 device tensor per layer (-inf: nothing recorded)."""
        return [spec.max_logit for spec in self.layers]

    def reset(self) -> None:
        for spec in self.layers:
            spec.max_logit.fill_(-math.inf)

    @torch.no_grad()
    def clip_(self) -> list[Tensor]:
        """Rescale each head with a recorded maximum above tau by sqrt(tau / max) in its query and key weights
        (and biases); others are multiplied by exactly 1. Resets the maxima. Returns each layer's gamma
        (n_head,) on the device, for logging; nothing is read on the host."""
        gammas = []
        for spec in self.layers:
            s = spec.max_logit
            gamma = torch.where(s > self.tau, self.tau / s, torch.ones_like(s))
            root = gamma.sqrt()
            for weight in (spec.query, spec.key):
                _scale_heads_(weight, root, spec.dim, spec.n_head)
            for bias in (spec.query_bias, spec.key_bias):
                if bias is not None:
                    _scale_heads_(bias, root, 0, spec.n_head)
            gammas.append(gamma)
        self.reset()
        return gammas

    @classmethod
    def for_gpt(cls, model: nn.Module, tau: float = 100.0) -> QKClip:
        """QK-clip wired into the compare model (`fastoptim.compare.model.GPT`): each block's fused ``qkv``
        weight (3C, C) holds W_q in rows [0, C) and W_k in rows [C, 2C); the recorder goes into each
        attention's ``logit_hook``."""
        from .compare.model import GPT

        if not isinstance(model, GPT):
            raise TypeError(f"model must be a fastoptim.compare.model.GPT, got {type(model).__name__}")
        clip = cls(tau)
        channels = model.config.n_embd
        for block in model.blocks:
            attn = block.attn
            weight = attn.qkv.weight
            attn.logit_hook = clip.add_layer(weight[:channels], weight[channels : 2 * channels], attn.n_head)
        return clip


def _scale_heads_(t: Tensor, root: Tensor, dim: int, n_head: int) -> None:
    """t's dimension `dim` is n_head head-major blocks: block h times root[h], in place (a view of t)."""
    heads = t.unflatten(dim, (n_head, t.shape[dim] // n_head))
    shape = [1] * heads.dim()
    shape[dim] = n_head
    heads.mul_(root.to(device=t.device).view(shape))


def _describe(t: object) -> str:
    return f"shape {tuple(t.shape)} ({t.dtype})" if isinstance(t, Tensor) else type(t).__name__

"""Muon: momentum, then the orthogonal polar factor of the update by Newton–Schulz.

K. Jordan et al., "Muon: An optimizer for hidden layers in neural networks" (2024),
https://kellerjordan.github.io/posts/muon/ and github.com/KellerJordan/Muon. Per matrix G:

    buf <- lerp(buf, G, 1 - momentum)                        (momentum as an EMA)
    U   =  lerp(G, buf, momentum) if nesterov else buf
    O   =  NewtonSchulz(U)                                   (ns_steps, coefficients, in ns_dtype)
    p   <- p·(1 - lr·wd)                                     (cautious: only where O·p >= 0)
    p   <- p - lr·scale(m, n)·O

scale_mode: "original" max(1, m/n)^½ (the reference code), "match_rms_adamw" 0.2·√max(m, n)
(Moonlight; the update RMS then matches AdamW's so AdamW learning rates carry over), "spectral" √(m/n).
The defaults reproduce the reference Muon. Vectors, scalars and groups with use_muon=False take
torch's AdamW step (see `fastoptim.optim._base` for groups, shape buckets and non-finite gradients).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..ops import check_call, muon_apply_stack_
from ._base import MatrixOptimizer


class Muon(MatrixOptimizer):
    """Muon for matrices, AdamW for the rest, in one torch.optim.Optimizer.

    Group keys of a matrix group: lr, momentum, nesterov, weight_decay, ns_steps, coefficients,
    ns_dtype, scale_mode, cautious_weight_decay, backend, split_sizes (optional row blocks
    orthogonalized separately, e.g. [d, d, d] for a fused QKV weight), matrix_view (how a tensor of
    ndim >= 3 reads as matrices: "auto" — 3-D is a stack of matrices, e.g. an MoE expert bank (E, m, n)
    whose experts are orthogonalized one by one, 4-D and up flatten to (shape[0], -1) like conv
    kernels —, "stack" or "flatten"), state_dtype (the momentum buffer's dtype; None: the parameter's.
    torch.bfloat16 halves the momentum memory of float32 parameters: 2 bytes per element instead of 4).
    lr and weight_decay may be 0-D tensors on the parameters' device (capturable, no recompiles).
    ns_method: "standard" (default), "gram" or "auto", the `fastoptim.newton_schulz` method (Gram
    Newton–Schulz: fewer FLOPs on rectangular matrices; "auto" decides per shape bucket). ns_restarts: Gram's
    restart iterations (None: `fastoptim.ns_methods.default_restarts`; () for none; a ValueError with
    ns_method="standard", which never restarts).
    State per parameter: ``momentum_buffer``; per AdamW parameter: ``exp_avg``, ``exp_avg_sq``, ``step``.

    process_group: "auto" (default) splits the Newton–Schulz work of replicated (DDP) parameters over
    the default process group when torch.distributed is initialized; a ProcessGroup names the group the
    parameters are replicated over; None never splits. DTensor (FSDP2) parameters always use their own
    mesh. See `fastoptim.distributed`.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        coefficients: str | Sequence[Sequence[float]] = "jordan",
        ns_dtype: torch.dtype = torch.bfloat16,
        scale_mode: str = "original",
        cautious_weight_decay: bool = False,
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-10,
        adamw_weight_decay: float = 0.0,
        backend: str = "auto",
        split_sizes: Sequence[int] | None = None,
        matrix_view: str = "auto",
        state_dtype: torch.dtype | None = None,
        skip_nonfinite: bool = False,
        process_group: Any = "auto",
        ns_method: str = "standard",
        ns_restarts: Sequence[int] | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            ns_steps=ns_steps,
            coefficients=coefficients,
            ns_dtype=ns_dtype,
            scale_mode=scale_mode,
            cautious_weight_decay=cautious_weight_decay,
            adamw_lr=adamw_lr,
            adamw_betas=adamw_betas,
            adamw_eps=adamw_eps,
            adamw_weight_decay=adamw_weight_decay,
            backend=backend,
            split_sizes=split_sizes,
            matrix_view=matrix_view,
            state_dtype=state_dtype,
            skip_nonfinite=skip_nonfinite,
            ns_method=ns_method,
            ns_restarts=ns_restarts,
        )
        super().__init__(params, defaults, process_group)

    def apply_bucket(
        self,
        group: dict,
        params: list[Tensor],
        orthogonal: Tensor,
        row_states: dict[str, list[Tensor]],
        scale: float,
        check_device: torch.device | None = None,
    ) -> None:
        args = (params, orthogonal, group["lr"], group["weight_decay"], scale, group["cautious_weight_decay"])
        if check_device is not None:
            check_call("muon_apply_stack_", *args, group["backend"], device=check_device)
            return
        muon_apply_stack_(*args, group["backend"])

"""NorMuon: Muon plus a per-row second moment of the orthogonalized update.

Z. Li et al., "NorMuon: Making Muon more efficient and scalable" (arXiv:2510.05491) and its official
code. Per matrix, after Muon's momentum and Newton–Schulz (O, m x n):

    v <- lerp(v, mean_j(O_ij²), 1 - beta2)        one float32 value per row (``second_moment``, shape (m,))
    Ô =  O / (√v + eps), rescaled so that ‖Ô‖_F = ‖O‖_F
    p <- p·(1 - lr·wd);  p <- p - lr·scale(m, n)·Ô

scale_mode="original" (max(1, m/n)^½) reproduces the official code; "match_rms_adamw"
(0.2·√max(m, n)) is the paper's form, whose update RMS is 0.2. With ``split_sizes`` each row block
is normalized on its own (the row statistics are per row anyway; the norm is kept per block).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _validation as check
from .._validation import accumulate_dtype
from ..ops import check_call, normuon_step_stack_
from ._base import MatrixOptimizer


class NorMuon(MatrixOptimizer):
    """NorMuon for matrices, AdamW for the rest. Muon's arguments plus ``beta2`` and ``eps``
    (the row normalization's). State per matrix: ``momentum_buffer``, ``second_moment``.
    ``process_group``, ``ns_method`` and ``ns_restarts``: as for `Muon` (see `fastoptim.distributed`)."""

    _float32_state_keys = ("second_moment",)
    row_state_keys = ("second_moment",)

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
        beta2: float = 0.95,
        eps: float = 1e-10,
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
            beta2=beta2,
            eps=eps,
            ns_method=ns_method,
            ns_restarts=ns_restarts,
        )
        super().__init__(params, defaults, process_group)

    def _validate_matrix_hyper(self, group: dict[str, Any], where: str, at_step: bool = False) -> None:
        super()._validate_matrix_hyper(group, where, at_step)
        check.beta(f"{where}beta2", group["beta2"])
        check.positive(f"{where}eps", group["eps"])

    def init_row_state(self, p: Tensor, batch: tuple[int, ...], m: int) -> dict[str, Tensor]:
        # float32 statistics (float64 for float64 parameters), whatever the parameter dtype: one per row of
        # every matrix (an expert bank (E, m, n) has (E, m)).
        dtype = accumulate_dtype(p.dtype)
        return {"second_moment": torch.zeros((*batch, m), dtype=dtype, device=p.device)}

    def apply_bucket(
        self,
        group: dict,
        params: list[Tensor],
        orthogonal: Tensor,
        row_states: dict[str, list[Tensor]],
        scale: float,
        check_device: torch.device | None = None,
    ) -> None:
        args = (params, orthogonal, row_states["second_moment"], group["lr"], group["weight_decay"],
                group["beta2"], group["eps"], scale)
        kwargs = dict(cautious=group["cautious_weight_decay"], backend=group["backend"])
        if check_device is not None:
            check_call("normuon_step_stack_", *args, **kwargs, device=check_device)
            return
        normuon_step_stack_(*args, **kwargs)

    def direction_dtype(self, group: dict, param_dtype: torch.dtype) -> torch.dtype:
        # The dtype normuon_step_ computes Ô in (float64 if any of its inputs is float64).
        return accumulate_dtype(param_dtype, group["ns_dtype"])

    def direction_bucket(self, group: dict, orthogonal: Tensor, row_states: dict[str, list[Tensor]]) -> Tensor:
        # normuon_step_ on a zero matrix with lr = 1, no decay and scale = -1 leaves exactly Ô in it
        # (0 - (-1)·Ô); muon_apply_stack_(p, Ô, lr, wd, scale, cautious) then takes NorMuon's own step.
        second_moments = row_states["second_moment"]
        dtype = accumulate_dtype(orthogonal, *second_moments)
        direction = torch.zeros(orthogonal.shape, dtype=dtype, device=orthogonal.device)
        normuon_step_stack_(
            list(direction),
            orthogonal,
            second_moments,
            lr=1.0,
            weight_decay=0.0,
            beta2=group["beta2"],
            eps=group["eps"],
            scale=-1.0,
            backend=group["backend"],
        )
        return direction

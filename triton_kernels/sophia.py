"""Triton kernels: Sophia's clipped step and its Hessian EMA, multi-tensor (one launch per list).

    sophia_step_:  p <- p·(1 - lr·wd);  m <- lerp(m, g, 1 - beta1)
                   p <- p - lr·clip(m / max(rho·h, eps), -1, 1)
    hessian_ema_:  h <- lerp(h, ĥ, 1 - beta2)

H. Liu et al., "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
Pre-training" (arXiv:2305.14342), Algorithm 3. The specification is `fastoptim.reference`.

Multi-tensor mechanism: the chunk table of `_common` (one program per chunk of any tensor of the
lists, addresses cast to typed pointers in the kernel; one launch per dtype combination).

Full blocks load and store without a mask (so loads vectorize although sizes come from memory);
only a tensor's last block is masked. The unclipped count is summed per program and added with
an int64 atomic (exact and order-independent); a one-program kernel then divides it by the
total, on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._registry import register_kernel
from ._common import CHUNK, TL_DTYPES, chunk_tables, device_guard, lerp, table_pointer, unsupported_lists

BLOCK = 1024  # elements per iteration within a chunk
NUM_WARPS = 4


@triton.jit
def _sophia_block(
    param_ptr, grad_ptr, exp_avg_ptr, hessian_ptr, offsets, mask, lr, decay, one_minus_beta1, rho, eps
):
    exp_avg_dtype = exp_avg_ptr.dtype.element_ty
    # The reference casts grad to exp_avg's dtype before the EMA; round the same way.
    grad = tl.load(grad_ptr + offsets, mask=mask).to(exp_avg_dtype).to(tl.float32)
    exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask).to(tl.float32)
    exp_avg = lerp(exp_avg, grad, one_minus_beta1).to(exp_avg_dtype)
    tl.store(exp_avg_ptr + offsets, exp_avg, mask=mask)
    hessian = tl.load(hessian_ptr + offsets, mask=mask).to(tl.float32)
    denominator = tl.maximum(rho * hessian, eps, propagate_nan=tl.PropagateNan.ALL)
    ratio = tl.div_rn(exp_avg.to(tl.float32), denominator)
    clipped = tl.minimum(
        tl.maximum(ratio, -1.0, propagate_nan=tl.PropagateNan.ALL), 1.0, propagate_nan=tl.PropagateNan.ALL
    )
    param = tl.load(param_ptr + offsets, mask=mask).to(tl.float32)
    param = param * decay - lr * clipped
    tl.store(param_ptr + offsets, param.to(param_ptr.dtype.element_ty), mask=mask)
    return tl.sum((mask & (tl.abs(ratio) < 1.0)).to(tl.int32), axis=0)


@triton.jit
def _sophia_kernel(
    table_ptr,
    count_ptr,
    lr,
    decay,
    one_minus_beta1,
    rho,
    eps,
    PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    EXP_AVG_DTYPE: tl.constexpr,
    HESSIAN_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    COUNT: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Bytes per element: reads p, g, m, h; writes p, m: 2·|p| + |g| + 2·|m| + |h|
    (24 in fp32; 18 for bf16 params and grads with fp32 states)."""
    row_ptr = table_ptr + tl.program_id(0).to(tl.int64) * 6
    param_ptr = table_pointer(row_ptr, 0, PARAM_DTYPE, ALIGNED)
    grad_ptr = table_pointer(row_ptr, 1, GRAD_DTYPE, ALIGNED)
    exp_avg_ptr = table_pointer(row_ptr, 2, EXP_AVG_DTYPE, ALIGNED)
    hessian_ptr = table_pointer(row_ptr, 3, HESSIAN_DTYPE, ALIGNED)
    numel = tl.load(row_ptr + 4)
    chunk_start = tl.load(row_ptr + 5) * CHUNK
    count = tl.zeros((), dtype=tl.int32)
    for block in range(0, tl.minimum(numel - chunk_start, CHUNK), BLOCK):
        offsets = chunk_start + block + tl.arange(0, BLOCK)
        if chunk_start + block + BLOCK <= numel:
            count += _sophia_block(
                param_ptr,
                grad_ptr,
                exp_avg_ptr,
                hessian_ptr,
                offsets,
                tl.full((BLOCK,), 1, tl.int1),
                lr,
                decay,
                one_minus_beta1,
                rho,
                eps,
            )
        else:
            count += _sophia_block(
                param_ptr,
                grad_ptr,
                exp_avg_ptr,
                hessian_ptr,
                offsets,
                offsets < numel,
                lr,
                decay,
                one_minus_beta1,
                rho,
                eps,
            )
    if COUNT:
        tl.atomic_add(count_ptr, count.to(tl.int64))


@triton.jit
def _fraction_kernel(count_ptr, out_ptr, total):
    """out = count / total (4 bytes)."""
    tl.store(out_ptr, tl.div_rn(tl.load(count_ptr).to(tl.float32), total))


@triton.jit
def _hessian_ema_block(hessian_ptr, estimate_ptr, offsets, mask, one_minus_beta2):
    hessian_dtype = hessian_ptr.dtype.element_ty
    estimate = tl.load(estimate_ptr + offsets, mask=mask).to(hessian_dtype).to(tl.float32)
    hessian = tl.load(hessian_ptr + offsets, mask=mask).to(tl.float32)
    tl.store(hessian_ptr + offsets, lerp(hessian, estimate, one_minus_beta2).to(hessian_dtype), mask=mask)


@triton.jit
def _hessian_ema_kernel(
    table_ptr,
    one_minus_beta2,
    HESSIAN_DTYPE: tl.constexpr,
    ESTIMATE_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Bytes per element: reads h and ĥ, writes h: 2·|h| + |ĥ| (12 in fp32)."""
    row_ptr = table_ptr + tl.program_id(0).to(tl.int64) * 4
    hessian_ptr = table_pointer(row_ptr, 0, HESSIAN_DTYPE, ALIGNED)
    estimate_ptr = table_pointer(row_ptr, 1, ESTIMATE_DTYPE, ALIGNED)
    numel = tl.load(row_ptr + 2)
    chunk_start = tl.load(row_ptr + 3) * CHUNK
    for block in range(0, tl.minimum(numel - chunk_start, CHUNK), BLOCK):
        offsets = chunk_start + block + tl.arange(0, BLOCK)
        if chunk_start + block + BLOCK <= numel:
            _hessian_ema_block(
                hessian_ptr, estimate_ptr, offsets, tl.full((BLOCK,), 1, tl.int1), one_minus_beta2
            )
        else:
            _hessian_ema_block(hessian_ptr, estimate_ptr, offsets, offsets < numel, one_minus_beta2)


# --------------------------------------------------------------------------------------------------
# Launchers


def _supports_sophia(params, grads, exp_avgs, hessians, unclipped_out, lr, beta1, rho, weight_decay, eps):
    return unsupported_lists(params=params, grads=grads, exp_avgs=exp_avgs, hessians=hessians)


@register_kernel("sophia_step_", "triton", supports=_supports_sophia)
def sophia_step_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    hessians: list[torch.Tensor],
    unclipped_out: torch.Tensor | None,
    lr: float,
    beta1: float,
    rho: float,
    weight_decay: float,
    eps: float,
) -> None:
    if not params:
        return
    device = params[0].device
    with device_guard(params[0]):
        tables = chunk_tables((params, grads, exp_avgs, hessians), device)
        count = torch.zeros((), dtype=torch.int64, device=device) if unclipped_out is not None else None
        for dtypes, aligned, table in tables:
            _sophia_kernel[(table.shape[0],)](
                table,
                count if count is not None else table,
                lr,
                1.0 - lr * weight_decay,
                1.0 - beta1,
                rho,
                eps,
                *(TL_DTYPES[dtype] for dtype in dtypes),
                ALIGNED=aligned,
                COUNT=count is not None,
                CHUNK=CHUNK,
                BLOCK=BLOCK,
                num_warps=NUM_WARPS,
            )
        if unclipped_out is not None:
            total = sum(p.numel() for p in params)
            _fraction_kernel[(1,)](count, unclipped_out, float(max(total, 1)))


def _supports_hessian_ema(hessians, estimates, beta2):
    return unsupported_lists(hessians=hessians, estimates=estimates)


@register_kernel("hessian_ema_", "triton", supports=_supports_hessian_ema)
def hessian_ema_(hessians: list[torch.Tensor], estimates: list[torch.Tensor], beta2: float) -> None:
    if not hessians:
        return
    with device_guard(hessians[0]):
        for dtypes, aligned, table in chunk_tables((hessians, estimates), hessians[0].device):
            _hessian_ema_kernel[(table.shape[0],)](
                table,
                1.0 - beta2,
                *(TL_DTYPES[dtype] for dtype in dtypes),
                ALIGNED=aligned,
                CHUNK=CHUNK,
                BLOCK=BLOCK,
                num_warps=NUM_WARPS,
            )

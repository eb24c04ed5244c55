"""``skip_nonfinite=True``: a step whose gradients hold a NaN or an infinity changes nothing — decided on
the device, without a host synchronization.

Before the step, one flag records whether every gradient is finite (one fused reduction per dtype and
device, then, under torch.distributed, a MIN all-reduce over the optimizer's process group, so that all
ranks agree); everything the step writes (parameters with gradients and their state) is snapshotted. The
step runs as usual; afterwards each written tensor takes ``where(finite, new, old)``, so a skipped step
leaves parameters and state bit for bit as they were (state that did not exist yet exists afterwards,
as zeros, the value a first step starts from). Costs one copy of the parameters and state that step, the
price of deciding on the device; GradScaler users need not set it (torch.amp.GradScaler skips
non-finite steps itself, with a host synchronization).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .. import distributed


class NonFiniteGuard:
    def __init__(self, param_groups: list[dict[str, Any]], state: Any, process_group: Any) -> None:
        params = [p for group in param_groups for p in group["params"] if p.grad is not None]
        grads = [distributed.local_tensor(p.grad) for p in params]
        self.finite = _all_finite(grads, process_group)
        written = [*params, *(t for p in params for t in state[p].values() if isinstance(t, Tensor))]
        self.written = [distributed.local_tensor(t) for t in written]
        self.saved = [t.clone() for t in self.written]

    def restore_if_nonfinite(self) -> None:
        for t, old in zip(self.written, self.saved):
            finite = self.finite if self.finite.device == t.device else self.finite.to(t.device)
            t.copy_(torch.where(finite, t, old))


def _all_finite(grads: list[Tensor], process_group: Any) -> Tensor:
    """A 0-D bool tensor on the gradients' device: every gradient finite (and on every rank)."""
    device = grads[0].device if grads else torch.device("cpu")
    flags = [torch.isfinite(g).all().to(device) for g in grads if g.numel()]
    finite = torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool, device=device)
    # "auto": the default group when initialized (replicated and sharded parameters alike: their ranks must
    # skip together); None: the ranks are independent, each decides for itself.
    replicas = distributed.replicate_group(process_group) if process_group is not None else None
    if replicas is not None:
        as_int = finite.to(torch.int32)
        dist.all_reduce(as_int, op=dist.ReduceOp.MIN, group=replicas)
        finite = as_int.bool()
    return finite

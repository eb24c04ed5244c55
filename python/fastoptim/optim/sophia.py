"""Sophia: clipped diagonal-Hessian preconditioning (SophiaG and SophiaH).

H. Liu et al., "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
Pre-training" (arXiv:2305.14342), Algorithm 3, and the official code (github.com/Liuhong99/Sophia).
Per parameter, every step:

    p <- p·(1 - lr·wd)
    m <- lerp(m, g, 1 - beta1)                                       (``exp_avg``)
    p <- p - lr·clip(m / max(rho·h, eps), -1, 1)                     (fastoptim.ops.sophia_step_)

and, every k steps, the Hessian EMA h <- beta2·h + (1 - beta2)·ĥ (``hessian``):

- SophiaG (Gauss–Newton–Bartlett): ĥ = g ⊙ g for the gradient g of the loss on labels sampled from
  the model's own softmax (`sophia_sampled_loss`). The official code scales rho by the batch size in
  tokens, ``bs``; SophiaG does the same (rho·bs is what reaches the op), so its update equals the
  official ``sign(m)·min(|m| / (rho·bs·h + 1e-15), 1)`` up to the rounding of the eps term.
- SophiaH (Hutchinson): ĥ = u ⊙ (H u) for a Rademacher u, from one Hessian-vector product.

The steps take no host synchronization and do not look at tensor values: a non-finite gradient
makes only its own parameter (and its state) non-finite.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from .. import _validation as check
from .. import distributed
from ..distributed import local_tensor
from ..ops import hessian_ema_, sophia_step_
from ._base import check_backend, check_betas, check_grads, check_params, check_positive_int
from ._checkpoint import CopyableOptimizer, load_checked


def _by_device(items: list[tuple[Tensor, ...]]) -> dict[torch.device, list[tuple[Tensor, ...]]]:
    out: dict[torch.device, list[tuple[Tensor, ...]]] = {}
    for item in items:
        out.setdefault(item[0].device, []).append(item)
    return out


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}" + ("" if value.requires_grad else " without grad")
    return type(value).__name__


def _expected_shape(group: dict, p: Tensor, key: str) -> tuple[int, ...] | None:
    return tuple(p.shape) if key in ("exp_avg", "hessian") else None


class _Sophia(CopyableOptimizer, torch.optim.Optimizer):
    """Shared by SophiaG and SophiaH: validation, state, the clipped step."""

    def _validate_group(self, group: dict[str, Any], where: str = "") -> None:
        check.non_negative(f"{where}lr", group["lr"])
        check_betas(f"{where}betas", group["betas"])
        check.positive(f"{where}rho", group["rho"])
        check.non_negative(f"{where}weight_decay", group["weight_decay"])
        check.positive(f"{where}eps", group["eps"])
        check_backend(group["backend"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else params
        if not isinstance(params, set):
            params = list(params)
            param_group = {**param_group, "params": params}
            plain = [p[1] if isinstance(p, tuple) else p for p in params]
            check_params("params", plain)
            self._check_params(params)
            self._validate_group({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load_state_dict, checked first (state shapes, kinds and finiteness; a refused checkpoint
        changes nothing), keeping this optimizer's ``backend``."""
        load_checked(self, state_dict, _expected_shape, super().load_state_dict)

    def _check_params(self, params: list) -> None:
        """What a subclass refuses beyond check_params (params: tensors or (name, tensor) pairs)."""

    def _state(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if "hessian" not in state:
            state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _clipped_step(self, group: dict[str, Any], rho: float) -> None:
        items = []
        for p in group["params"]:
            if p.grad is not None:
                state = self._state(p)
                # Elementwise: a DTensor (FSDP2) parameter steps its local shard.
                items.append(tuple(local_tensor(t) for t in (p, p.grad, state["exp_avg"], state["hessian"])))
        beta1, _ = group["betas"]
        for batch in _by_device(items).values():
            params, grads, exp_avgs, hessians = (list(x) for x in zip(*batch))
            sophia_step_(
                params,
                grads,
                exp_avgs,
                hessians,
                lr=group["lr"],
                beta1=beta1,
                rho=rho,
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                backend=group["backend"],
            )


class SophiaG(_Sophia):
    """Sophia with the Gauss–Newton–Bartlett estimator, as in the official SophiaG.

    Loop (as the official training script does it, every k = 10 steps for the Hessian)::

        loss = model_loss(x, y); loss.backward(); opt.step(); opt.zero_grad()
        if it % k == k - 1:
            logits = model(x)
            fastoptim.sophia_sampled_loss(logits).backward()
            opt.update_hessian(); opt.zero_grad()

    ``bs`` (tokens per batch, the official code's scaling of rho) is a group key; ``step(bs=...)``
    overrides it for one step. State per parameter: ``exp_avg``, ``hessian``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        eps: float = 1e-15,
        bs: int = 5120,
        backend: str = "auto",
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, eps=eps, bs=bs, backend=backend
        )
        self._validate_group(defaults)
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any], where: str = "") -> None:
        super()._validate_group(group, where)
        check.positive(f"{where}bs", group["bs"])

    @torch.no_grad()
    def update_hessian(self) -> None:
        """h <- beta2·h + (1 - beta2)·g⊙g from the current gradients (those of the sampled-label loss).

        Two foreach passes over h (scale, then fused multiply-add of g with itself): the same
        arithmetic as the official code, bit for bit, and no g⊙g tensor is materialized.
        """
        check_grads(self.param_groups)
        for group in self.param_groups:
            _, beta2 = group["betas"]
            items = [
                (local_tensor(self._state(p)["hessian"]), local_tensor(p.grad))
                for p in group["params"]
                if p.grad is not None
            ]
            for batch in _by_device(items).values():
                hessians, grads = (list(x) for x in zip(*batch))
                torch._foreach_mul_(hessians, beta2)
                torch._foreach_addcmul_(hessians, grads, grads, value=1.0 - beta2)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, bs: int | None = None) -> Any:
        """One Sophia step from the current gradients; closure (optional) recomputes the loss and
        gradients first. bs overrides the groups' ``bs`` for this step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if bs is not None:
            check.positive("bs", bs)
        for group in self.param_groups:
            self._validate_group(group)
        check_grads(self.param_groups)
        # Atomic: every group's effective rho is checked before the first group steps (rho·bs can
        # overflow to inf even when both are finite).
        rhos = []
        for g, group in enumerate(self.param_groups):
            rho = group["rho"] * (group["bs"] if bs is None else bs)
            rhos.append(check.positive(f"param_groups[{g}] rho·bs (the rho the update uses)", rho))
        for group, rho in zip(self.param_groups, rhos):
            self._clipped_step(group, rho)
        return loss


class SophiaH(_Sophia):
    """Sophia with the Hutchinson estimator ĥ = u ⊙ (H u), u Rademacher (±1), refreshed every
    ``update_period`` steps.

    ``step(closure)``: the closure computes and returns the loss (with its autograd graph) and must
    not call ``backward()``. The optimizer takes the gradients itself with ``torch.autograd.grad`` —
    with ``create_graph=True`` on steps where a group's refresh is due (its ``hessian_step`` counter
    is a multiple of its ``update_period``, so the first step refreshes) — writes them into
    ``p.grad`` (replacing what was there), then on those steps computes one Hessian-vector product
    per refresh, folds u ⊙ (H u) into ``hessian`` with ``hessian_ema_``, and takes the clipped step.
    u is drawn from the global RNG of the parameter's device (seed with torch.manual_seed).

    ``step()`` without a closure takes the clipped step from the existing ``p.grad`` and the
    current Hessian estimate, refreshing nothing (the counter still advances).

    A Hutchinson estimate can be negative; max(rho·h, eps) then turns that coordinate's step into
    a clipped sign step, as in the paper. State per parameter: ``exp_avg``, ``hessian``.

    Distributed: torch.autograd.grad bypasses the backward hooks through which DDP all-reduces and
    FSDP2 reduce-scatters gradients, so SophiaH reduces for itself. With replicated parameters
    (``process_group``: "auto" = the default group when torch.distributed is initialized with more
    than one rank, a ProcessGroup, or None = never) ``step(closure)`` averages the gradients and the
    Hutchinson estimates over the group, each rank's closure returning the mean loss of its share of
    the batch: every rank then takes the step of the whole batch (the probes u agree when the ranks
    seed alike; otherwise the average is still an unbiased estimate). The closure may run the
    DDP-wrapped model (its reduction hooks never fire under autograd.grad: nothing is reduced twice).
    A parameter without a gradient on a rank counts as zero there, as in DDP. DTensor (FSDP2)
    parameters are refused at construction: autograd.grad cannot reach sharded parameters; use
    SophiaG there.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        eps: float = 1e-15,
        update_period: int = 10,
        backend: str = "auto",
        process_group: Any = "auto",
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            rho=rho,
            weight_decay=weight_decay,
            eps=eps,
            update_period=update_period,
            hessian_step=0,
            backend=backend,
        )
        self._validate_group(defaults)
        self._process_group = distributed.check_process_group(process_group)
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any], where: str = "") -> None:
        super()._validate_group(group, where)
        check_positive_int(f"{where}update_period", group["update_period"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict):
            param_group = {**param_group, "hessian_step": 0}  # a new group refreshes on its first step
        super().add_param_group(param_group)

    def _check_params(self, params: list) -> None:
        for i, p in enumerate(params):
            name, p = (repr(p[0]), p[1]) if isinstance(p, tuple) else (f"params[{i}]", p)
            if distributed.is_dtensor(p):
                raise ValueError(
                    f"parameter {name} (shape {tuple(p.shape)}) is a DTensor placed {list(p.placements)}: SophiaH "
                    "takes its gradients and Hessian-vector products with torch.autograd.grad, which cannot reach "
                    "sharded (FSDP2) parameters; use SophiaG, whose gradients come from backward()"
                )

    def _hutchinson(self, due: list[dict[str, Any]], graph_grads: dict[Tensor, Tensor]) -> dict[Tensor, Tensor]:
        """u ⊙ (H u) for every parameter of the due groups that has a gradient."""
        pairs = [(p, graph_grads[p]) for group in due for p in group["params"] if p in graph_grads]
        differentiable = [(p, g) for p, g in pairs if g.requires_grad]
        probes = [torch.randint_like(p, 2).mul_(2).sub_(1) for p, _ in differentiable]
        hvps: tuple = ()
        if differentiable:
            hvps = torch.autograd.grad(
                [g for _, g in differentiable],
                [p for p, _ in differentiable],
                grad_outputs=probes,
                allow_unused=True,
            )
        estimates = {
            p: (torch.zeros_like(p) if hv is None else hv.mul_(u))
            for (p, _), u, hv in zip(differentiable, probes, hvps)
        }
        # A gradient that does not depend on the parameters (a linear term) has H = 0 there.
        return {p: estimates.get(p, torch.zeros_like(p)) for group in due for p in group["params"] if p in graph_grads}

    def _fold_estimates(self, due: list[dict[str, Any]], estimates: dict[Tensor, Tensor]) -> None:
        for group in due:
            _, beta2 = group["betas"]
            items = [(self._state(p)["hessian"], estimates[p]) for p in group["params"] if p in estimates]
            for batch in _by_device(items).values():
                hessians, ests = (list(x) for x in zip(*batch))
                hessian_ema_(hessians, ests, beta2, backend=group["backend"])

    def step(self, closure: Callable[[], Tensor] | None = None) -> Any:
        """See the class docstring. Returns the closure's loss (or None)."""
        for group in self.param_groups:
            self._validate_group(group)
        loss = None
        due = [g for g in self.param_groups if g["hessian_step"] % g["update_period"] == 0]
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
                if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
                    raise TypeError(
                        "closure must return the loss as a one-element tensor that requires grad (its autograd "
                        f"graph is differentiated here; do not call backward() in it), got {_describe(loss)}"
                    )
                params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
                grads = torch.autograd.grad(loss, params, create_graph=bool(due), allow_unused=True)
            graph_grads = {p: g for p, g in zip(params, grads) if g is not None}
            if params and not graph_grads:
                raise RuntimeError(
                    "the closure's loss does not depend on any parameter of this SophiaH (every gradient is None)"
                )
            for p, g in zip(params, grads):
                p.grad = None if g is None else g.detach()
            check_grads(self.param_groups)
            replicas = distributed.replicate_group(self._process_group)
            if replicas is not None:
                # Every rank sends every parameter's gradient, zeros where it has none (as DDP does for
                # unused parameters), so the collectives agree without a host synchronization. A flat
                # copy is sent while the Hessian-vector product runs: p.grad aliases the graph's gradients.
                local = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
                mean_grads = distributed.all_reduce_mean(local, replicas)
            estimates = self._hutchinson(due, graph_grads)  # {} when no group is due
            if replicas is not None:
                keys = [p for group in due for p in group["params"] if p.requires_grad]
                local = [estimates.get(p, torch.zeros_like(p)) for p in keys]
                estimates = dict(zip(keys, distributed.all_reduce_mean(local, replicas)()))
            del graph_grads, grads
            if replicas is not None:
                for p, g in zip(params, mean_grads()):
                    p.grad = g
            self._fold_estimates(due, estimates)
        else:
            check_grads(self.param_groups)
        with torch.no_grad():
            for group in self.param_groups:
                self._clipped_step(group, group["rho"])
                group["hessian_step"] += 1
        return loss

"""muP with Muon: width-scaled learning rates and initializations, and the telescoping sweep.

Source: Essential AI, "Practical Efficiency of Muon for Pretraining" (arXiv:2505.02222, 2025), which
combines Muon with the maximal update parameterization (muP; G. Yang, E. Hu et al., "Tensor Programs
V", arXiv:2203.03466) and tunes with a telescoping grid (its Algorithm 1).

Convention implemented here (multipliers relative to the model at `base_width`, r = width/base_width)

    role        optimizer         lr multiplier    init std
    embedding   AdamW             1                embedding_std                    (constant in width)
    hidden      Muon / NorMuon    1                gain/√fan_in                     (x √(1/r) in width)
    output      AdamW             1/r              gain/√fan_in · √(1/r)            (x 1/r in width)
    vector      AdamW             1                left as the model made it (norm gains 1, biases 0)

Why this table:
- hidden matrices: Muon's update is (close to) an orthogonal matrix, all singular values 1. With the
  "spectral" shape scale √(fan_out/fan_in) (`scale_mode="spectral"`, set on the hidden group by
  `mup_param_groups`), the update's spectral norm is lr·√(fan_out/fan_in), which is the spectral
  condition for feature learning (Yang, Simon, Bernstein, "A spectral condition for feature
  learning", arXiv:2310.17813) at any width: the hidden lr stays constant in width. Their init is
  the usual fan-in one, std ∝ 1/√fan_in, whose spectral norm is width-independent for the aspect
  ratios of a transformer.
- output layer (trained by AdamW, an entrywise-normalized update): muP's Adam row for output
  weights, lr ∝ 1/fan_in and init variance ∝ 1/fan_in², so both the lr and the init std scale as
  base_width/width. We realize it through the lr and the init, not a forward-pass multiplier on the
  logits, so no model code changes.
- embeddings (and vectors) with Adam: muP keeps lr and init constant in width.
A head tied to the embedding is one parameter and cannot take both rows of the table: it is treated
as an embedding (constant lr and init); untie it for muP proper.

`telescoping_sweep` is the paper's Algorithm 1: a full grid at the base width, then at each width
doubling a grid shrunk around the previous optimum, so that the optimum may drift with width (muP's
residual errors: finite width, the data and schedule changes) while the cost per width stays small.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from . import _validation as check

ROLES = ("embedding", "hidden", "output", "vector")
DEFAULT_HEAD_NAMES = ("lm_head", "head", "output")


class MupMultipliers(NamedTuple):
    """Multipliers of a role's learning rate and init std relative to their values at the base width."""

    lr: float
    init: float


def _width(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def mup_multipliers(role: str, base_width: int, width: int) -> MupMultipliers:
    """The (lr, init std) multipliers of a role ("embedding", "hidden", "output", "vector") at `width`
    for hyper-parameters tuned at `base_width` (see the module's table)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    ratio = _width("base_width", base_width) / _width("width", width)
    if role == "hidden":
        return MupMultipliers(lr=1.0, init=math.sqrt(ratio))
    if role == "output":
        return MupMultipliers(lr=ratio, init=ratio)
    return MupMultipliers(lr=1.0, init=1.0)


def mup_roles(
    model: nn.Module, head_names: Sequence[str] = DEFAULT_HEAD_NAMES, embedding_names: Sequence[str] = ()
) -> dict[str, str]:
    """The muP role of each trainable parameter of `model`, by qualified name (shared parameters once).

    - embedding: weights of nn.Embedding / nn.EmbeddingBag, and parameters whose name contains one of
      `embedding_names` (e.g. a raw positional-embedding nn.Parameter); a head tied to an embedding.
    - output: the weight of the last nn.Linear whose last name component is in `head_names`.
    - vector: other parameters with ndim < 2 (norm gains, biases, including the head's bias).
    - hidden: all other matrices (linear and conv weights).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    head_id = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in head_names:
            head_id = id(module.weight)
    roles = {}
    for name, p in model.named_parameters():  # named_parameters yields a shared parameter once
        if not p.requires_grad:
            continue
        if id(p) in embedding_ids or any(s in name for s in embedding_names):
            roles[name] = "embedding"
        elif p.dim() < 2:
            roles[name] = "vector"
        elif id(p) == head_id:
            roles[name] = "output"
        else:
            roles[name] = "hidden"
    return roles


def mup_param_groups(
    model: nn.Module,
    base_width: int,
    width: int,
    lr: float,
    adamw_lr: float,
    *,
    head_names: Sequence[str] = DEFAULT_HEAD_NAMES,
    embedding_names: Sequence[str] = (),
    hidden_scale_mode: str | None = "spectral",
    **hidden_options: Any,
) -> list[dict[str, Any]]:
    """Param groups for `fastoptim.Muon` / `fastoptim.NorMuon` with muP multipliers.

    `lr` (the Muon rate of hidden matrices) and `adamw_lr` are the values tuned at `base_width`.
    Groups (empty ones left out), each tagged with ``"mup_role"``:

    - hidden: ``use_muon=True``, ``lr=lr``, ``scale_mode=hidden_scale_mode`` (None: the optimizer's
      default; "spectral" is the convention the constant lr relies on), plus `hidden_options`.
    - embedding: ``use_muon=False``, ``lr=adamw_lr``.
    - output: ``use_muon=False``, ``lr=adamw_lr·base_width/width``.
    - vector: ``use_muon=False``, ``lr=adamw_lr``.
    """
    _width("base_width", base_width)
    _width("width", width)
    lr = check.non_negative("lr", lr)
    adamw_lr = check.non_negative("adamw_lr", adamw_lr)
    roles = mup_roles(model, head_names, embedding_names)
    by_role: dict[str, list[torch.Tensor]] = {role: [] for role in ROLES}
    named = dict(model.named_parameters())
    for name, role in roles.items():
        by_role[role].append(named[name])
    groups = []
    if by_role["hidden"]:
        hidden: dict[str, Any] = {"params": by_role["hidden"], "use_muon": True, "lr": lr, "mup_role": "hidden"}
        if hidden_scale_mode is not None:
            hidden["scale_mode"] = hidden_scale_mode
        hidden.update(hidden_options)
        groups.append(hidden)
    for role in ("embedding", "output", "vector"):
        if by_role[role]:
            multiplier = mup_multipliers(role, base_width, width).lr
            groups.append({"params": by_role[role], "use_muon": False, "lr": adamw_lr * multiplier, "mup_role": role})
    return groups


@torch.no_grad()
def mup_init_(
    model: nn.Module,
    base_width: int,
    width: int,
    *,
    embedding_std: float = 1.0,
    gain: float = 1.0,
    head_names: Sequence[str] = DEFAULT_HEAD_NAMES,
    embedding_names: Sequence[str] = (),
    generator: torch.Generator | None = None,
) -> None:
    """Re-initialize `model`'s matrices in place with the muP init of the module's table.

    Embeddings: N(0, embedding_std²). Hidden matrices: N(0, (gain/√fan_in)²), fan_in = numel/shape[0].
    Output: N(0, (gain/√fan_in · √(base_width/width))²), i.e. std ∝ 1/fan_in, equal to the hidden
    rule at the base width. Vectors (norm gains, biases) are left as they are.
    """
    embedding_std = check.non_negative("embedding_std", embedding_std)
    gain = check.non_negative("gain", gain)
    ratio = _width("base_width", base_width) / _width("width", width)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    named = dict(model.named_parameters())
    for name, role in mup_roles(model, head_names, embedding_names).items():
        p = named[name]
        if role == "vector":
            continue
        if role == "embedding":
            std = embedding_std
        else:
            fan_in = p.numel() // p.shape[0] if p.shape[0] else 1
            std = gain / math.sqrt(max(fan_in, 1))
            if role == "output":
                std *= math.sqrt(ratio)
        sample = torch.randn(p.shape, generator=generator, dtype=torch.float32, device=_generator_device(generator, p))
        p.copy_(sample.mul_(std))


def _generator_device(generator: torch.Generator | None, p: torch.Tensor) -> torch.device:
    return p.device if generator is None else generator.device


# --------------------------------------------------------------------------------------------------
# Telescoping sweep (Algorithm 1)


@dataclass
class SweepRun:
    width: int
    hparams: dict[str, Any]
    loss: float
    cost: float


@dataclass
class SweepResult:
    """What `telescoping_sweep` chose and spent. `full_grid_cost` is what a full grid at every width
    would have cost under the same cost model (from the mean cost of a run at each width)."""

    widths: list[int]
    best: dict[int, dict[str, Any]]
    best_loss: dict[int, float]
    cost: float
    cost_per_width: dict[int, float]
    full_grid_cost: float
    full_grid_cost_per_width: dict[int, float]
    runs: list[SweepRun] = field(default_factory=list)


def _check_grid(grid: object) -> dict[str, list[Any]]:
    if not isinstance(grid, Mapping) or not grid:
        raise TypeError("grid must be a non-empty mapping from hyper-parameter name to a list of values")
    axes = {}
    for name, values in grid.items():
        if not isinstance(name, str):
            raise TypeError(f"grid keys must be hyper-parameter names (str), got {name!r}")
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
            raise ValueError(f"grid[{name!r}] must be a non-empty list of values (in order), got {values!r}")
        axes[name] = list(values)
    return axes


def telescoping_sweep(
    train_fn: Callable[[int, dict[str, Any]], float | tuple[float, float]],
    base_width: int,
    target_width: int,
    grid: Mapping[str, Sequence[Any]],
    *,
    radius: int = 1,
    cost_fn: Callable[[int, dict[str, Any]], float] | None = None,
) -> SweepResult:
    """The telescoping hyper-parameter search of "Practical Efficiency of Muon for Pretraining" (Alg. 1).

    At `base_width`: every point of `grid` (a mapping name -> ordered candidate values; the full
    Cartesian product). Then for width = 2·base_width, 4·base_width, ..., `target_width` (which must be
    base_width·2^k): on each axis only the values within `radius` grid steps of the previous width's
    optimum (at most 2·radius + 1 per axis), so the optimum can move by up to `radius` steps per
    doubling. `train_fn(width, hparams)` returns the loss (lower is better; NaN/inf counts as diverged)
    or (loss, cost). The cost of a run is, in order: what train_fn reports, `cost_fn(width, hparams)`,
    or `width` (a run's compute taken as proportional to width; pass cost_fn for width² models).
    Ties go to the first point in grid order. Returns a `SweepResult`.
    """
    if not callable(train_fn):
        raise TypeError(f"train_fn must be callable, got {type(train_fn).__name__}")
    if cost_fn is not None and not callable(cost_fn):
        raise TypeError(f"cost_fn must be callable or None, got {type(cost_fn).__name__}")
    base_width = _width("base_width", base_width)
    target_width = _width("target_width", target_width)
    doublings = math.log2(target_width / base_width) if target_width >= base_width else -1.0
    if doublings < 0 or base_width << round(doublings) != target_width:
        raise ValueError(f"target_width ({target_width}) must be base_width ({base_width}) times a power of 2")
    radius = _width("radius", radius)
    axes = _check_grid(grid)
    names = list(axes)
    widths = [base_width << k for k in range(round(doublings) + 1)]
    full_size = math.prod(len(v) for v in axes.values())

    result = SweepResult(widths, {}, {}, 0.0, {}, 0.0, {})
    windows = {name: range(len(values)) for name, values in axes.items()}
    for width in widths:
        best_loss, best_index, spent, count = math.inf, None, 0.0, 0
        for index in itertools.product(*(windows[name] for name in names)):
            hparams = {name: axes[name][i] for name, i in zip(names, index)}
            loss, cost = _run(train_fn, cost_fn, width, hparams)
            result.runs.append(SweepRun(width, hparams, loss, cost))
            spent += cost
            count += 1
            if loss < best_loss:
                best_loss, best_index = loss, index
        if best_index is None:
            raise RuntimeError(f"every run at width {width} diverged (non-finite loss); widen or move the grid")
        result.best[width] = {name: axes[name][i] for name, i in zip(names, best_index)}
        result.best_loss[width] = best_loss
        result.cost_per_width[width] = spent
        result.full_grid_cost_per_width[width] = spent / count * full_size
        result.cost += spent
        result.full_grid_cost += result.full_grid_cost_per_width[width]
        windows = {
            name: range(max(0, i - radius), min(len(axes[name]), i + radius + 1))
            for name, i in zip(names, best_index)
        }
    return result


def _run(train_fn: Callable, cost_fn: Callable | None, width: int, hparams: dict[str, Any]) -> tuple[float, float]:
    out = train_fn(width, dict(hparams))
    if isinstance(out, tuple):
        if len(out) != 2:
            raise TypeError(f"train_fn must return a loss or (loss, cost), got a tuple of {len(out)}")
        loss, cost = out
    else:
        loss, cost = out, None
    loss = float(loss)
    if cost is None:
        cost = cost_fn(width, dict(hparams)) if cost_fn is not None else float(width)
    cost = check.non_negative("cost", float(cost))
    return (loss if math.isfinite(loss) else math.inf), cost


__all__ = [
    "ROLES",
    "MupMultipliers",
    "SweepResult",
    "SweepRun",
    "mup_init_",
    "mup_multipliers",
    "mup_param_groups",
    "mup_roles",
    "telescoping_sweep",
]

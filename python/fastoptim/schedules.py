"""Learning-rate and momentum schedules, usable with any torch optimizer.

- `UBA`: the Unified Budget-Aware schedule. A. Tang, Y. Dong, Y. Zeng, X. Zhou, Z. Lin, "Stepsize
  anything: A unified learning rate schedule for budgeted-iteration training", NeurIPS 2025
  (arXiv:2505.24452). After a linear warm-up of W steps, with t counted from the end of the warm-up,
  T = total_steps - W the remaining budget and θ = π·min(t, T)/T:

      η_t = η_min + (η_max - η_min) · 2(1 + cos θ) / (2φ + (2 - φ)(1 + cos θ))

  φ > 0 is the single knob. φ = 2 is exactly cosine annealing, (1 + cos θ)/2. Writing c = 1 + cos θ,
  the factor 2c / (2φ + (2 - φ)c) has derivative 4φ / (2φ + (2 - φ)c)² > 0 in c, so the schedule
  decays monotonically from η_max (θ = 0) to η_min (θ = π) for every φ > 0. Small φ keeps the rate
  near η_max for most of the budget and decays late and fast; large φ decays early and then creeps
  to η_min (at mid-budget the factor is 2/(2 + φ)).
  φ and conditioning: the paper derives UBA from a min-max problem that asks the schedule to be
  robust over a range of local curvatures, and shows that φ is tied to the condition number of
  that range (the ratio of the largest to the smallest curvature it must serve). We state only the
  qualitative reading we can support from the formula and the paper's summary: the better
  conditioned the problem, the smaller the φ that suits it (hold the large rate, decay late); a
  wide curvature range (ill-conditioned) calls for a larger φ, i.e. more of the budget at smaller
  rates. Treat φ as a hyper-parameter to sweep (φ = 2, cosine, is the neutral start); we do not
  ship a formula that maps a measured condition number to φ.
- `WSD`: warm-up, stable, decay. Linear warm-up, the peak rate, then a decay over the last
  `decay_steps` (or `decay_fraction` of the budget) with shape "linear" 1 - q, "cosine"
  (1 + cos πq)/2 or "1-sqrt" 1 - √q (q the decay progress in [0, 1]; K. Wen et al.,
  "Understanding warmup-stable-decay learning rates", 2024; Hägele et al. 2024 for 1-sqrt).
- `MomentumWarmup`: Muon's momentum warm-up (modded-nanogpt: 0.85 -> 0.95 over the first steps),
  written into ``group["momentum"]`` of the groups that have one and are not AdamW groups
  (``use_muon=False``).

Step convention (all three): the value for optimizer step t (0-based) is what the optimizer holds
after the scheduler has been stepped t times, as in torch: build the scheduler, then per step call
``optimizer.step()`` and ``scheduler.step()``. The warm-up factor at step t < W is (t + 1)/W, the
decay progress is (t - W)/T, so the last step of the budget (t = total_steps - 1) runs just above
η_min, which is reached at t = total_steps and held afterwards. `lr_multiplier` gives the same
numbers as a pure function for loops that set rates by hand.

Chaining: `UBA` and `WSD` implement torch's chainable form (each step multiplies the group's current
rate by r(t)/r(t-1)), so `ChainedScheduler` composes them multiplicatively with other schedulers,
and `_get_closed_form_lr` (r(t) times the base rate) serves `SequentialLR`'s restarts.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from . import _validation as check

SCHEDULES = ("constant", "cosine", "uba", "wsd")
WSD_DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


# --------------------------------------------------------------------------------------------------
# Argument checks


def _non_negative_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def _positive_int(name: str, value: object) -> int:
    value = _non_negative_int(name, value)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _fraction(name: str, value: object) -> float:
    value = check.real(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def _decay_shape(value: object) -> str:
    if value not in WSD_DECAY_SHAPES:
        raise ValueError(f"decay must be one of {WSD_DECAY_SHAPES}, got {value!r}")
    return str(value)


# --------------------------------------------------------------------------------------------------
# The shapes, as pure functions of the progress through the decay phase


def cosine_factor(progress: float) -> float:
    """(1 + cos(π·p))/2 for p = progress clamped to [0, 1]: 1 at the start, 0 at the end."""
    p = min(max(progress, 0.0), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * p))


def uba_factor(progress: float, phi: float) -> float:
    """UBA's decay factor 2(1 + cos θ)/(2φ + (2 - φ)(1 + cos θ)), θ = π·progress (clamped to [0, π]).

    1 at progress 0, 0 at progress 1, decreasing in between for every φ > 0; φ = 2 is `cosine_factor`.
    """
    p = min(max(progress, 0.0), 1.0)
    c = 1.0 + math.cos(math.pi * p)
    return 2.0 * c / (2.0 * phi + (2.0 - phi) * c)


def wsd_decay_factor(progress: float, shape: str = "linear") -> float:
    """The decay of WSD at decay progress q in [0, 1] (clamped): 1 - q, (1 + cos πq)/2 or 1 - √q."""
    q = min(max(progress, 0.0), 1.0)
    if shape == "linear":
        return 1.0 - q
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * q))
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(q)
    raise ValueError(f"decay must be one of {WSD_DECAY_SHAPES}, got {shape!r}")


def lr_multiplier(
    schedule: str,
    step: int,
    total_steps: int,
    warmup_steps: int = 0,
    *,
    phi: float = 2.0,
    min_lr_ratio: float = 0.0,
    decay_steps: int | None = None,
    decay_fraction: float = 0.2,
    decay: str = "linear",
) -> float:
    """The multiplier of the peak rate at optimizer step `step` (0-based) for a named schedule.

    schedule: "constant" (after the warm-up), "cosine", "uba" (needs `phi`), "wsd" (decay over the last
    `decay_steps`, default round(decay_fraction·total_steps), with shape `decay`). During the
    warm-up (step < warmup_steps) the multiplier is (step + 1)/warmup_steps; after it,
    min_lr_ratio + (1 - min_lr_ratio)·shape. The same numbers as the `UBA` / `WSD` schedulers.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    step = _non_negative_int("step", step)
    total_steps = _positive_int("total_steps", total_steps)
    warmup_steps = _non_negative_int("warmup_steps", warmup_steps)
    min_lr_ratio = _fraction("min_lr_ratio", min_lr_ratio)
    if schedule == "wsd":
        decay_steps = _wsd_decay_steps(total_steps, warmup_steps, decay_steps, decay_fraction)
        return _wsd_ratio(step, total_steps, warmup_steps, decay_steps, _decay_shape(decay), min_lr_ratio)
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be <= total_steps ({total_steps})")
    phi = check.positive("phi", phi) if schedule == "uba" else 2.0
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = _progress(step, warmup_steps, total_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * uba_factor(progress, phi)


def _progress(step: int, warmup_steps: int, total_steps: int) -> float:
    """(step - W)/T through the decay phase of T = total_steps - W steps (1 past it, or when T = 0)."""
    remaining = total_steps - warmup_steps
    return (step - warmup_steps) / remaining if remaining > 0 else 1.0


def _wsd_decay_steps(total_steps: int, warmup_steps: int, decay_steps: int | None, decay_fraction: float) -> int:
    if decay_steps is None:
        decay_steps = round(_fraction("decay_fraction", decay_fraction) * total_steps)
    decay_steps = _non_negative_int("decay_steps", decay_steps)
    if warmup_steps + decay_steps > total_steps:
        raise ValueError(
            f"warmup_steps + decay_steps ({warmup_steps} + {decay_steps}) must be <= total_steps ({total_steps})"
        )
    return decay_steps


def _wsd_ratio(step: int, total: int, warmup: int, decay_steps: int, shape: str, floor: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    decay_start = total - decay_steps
    if step < decay_start:
        return 1.0
    progress = (step - decay_start) / decay_steps if decay_steps else 1.0
    return floor + (1.0 - floor) * wsd_decay_factor(progress, shape)


# --------------------------------------------------------------------------------------------------
# torch.optim.lr_scheduler subclasses


class _BudgetScheduler(LRScheduler):
    """A schedule r(t) relative to each group's base rate, with a floor min_lr (or min_lr_ratio)."""

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        warmup_steps: int,
        min_lr: float | Sequence[float] | None,
        min_lr_ratio: float | None,
        last_epoch: int,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.total_steps = _positive_int("total_steps", total_steps)
        self.warmup_steps = _non_negative_int("warmup_steps", warmup_steps)
        if isinstance(last_epoch, bool) or not isinstance(last_epoch, numbers.Integral) or last_epoch < -1:
            raise ValueError(f"last_epoch must be an integer >= -1, got {last_epoch!r}")
        peaks = [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
        self.min_lr_ratios = self._floors(peaks, min_lr, min_lr_ratio)
        super().__init__(optimizer, last_epoch)

    @staticmethod
    def _floors(
        peaks: list[float], min_lr: float | Sequence[float] | None, min_lr_ratio: float | None
    ) -> list[float]:
        """Each group's floor as a fraction of its peak rate."""
        if min_lr is not None and min_lr_ratio is not None:
            raise ValueError("give min_lr or min_lr_ratio, not both")
        if min_lr is None:
            ratio = _fraction("min_lr_ratio", 0.0 if min_lr_ratio is None else min_lr_ratio)
            return [ratio] * len(peaks)
        if isinstance(min_lr, Sequence) and not isinstance(min_lr, (str, bytes)):
            if len(min_lr) != len(peaks):
                raise ValueError(f"min_lr must have one value per param group ({len(peaks)}), got {len(min_lr)}")
            values = [check.non_negative(f"min_lr[{i}]", v) for i, v in enumerate(min_lr)]
        else:
            values = [check.non_negative("min_lr", min_lr)] * len(peaks)
        floors = []
        for i, (low, peak) in enumerate(zip(values, peaks)):
            if low > peak:
                raise ValueError(f"min_lr ({low}) must be <= the peak lr of param group {i} ({peak})")
            floors.append(low / peak if peak > 0 else 0.0)
        return floors

    def ratio(self, step: int, group_index: int = 0) -> float:
        """The rate of group `group_index` at optimizer step `step`, as a fraction of its base rate."""
        raise NotImplementedError

    def get_lr(self) -> list[Any]:
        """Chainable form: the current rates times r(t)/r(t-1) (times r(0) at the first step)."""
        warn = getattr(torch.optim.lr_scheduler, "_warn_get_lr_called_within_step", None)
        if warn is not None:  # torch's warning for a direct call (get_last_lr() is the public reader)
            warn(self)
        groups = self.optimizer.param_groups
        t = self.last_epoch
        if getattr(self, "_is_initial", False) and t > 0:  # resuming: the rates are already right
            return [g["lr"] for g in groups]
        new = []
        for i, group in enumerate(groups):
            now = self.ratio(t, i)
            before = self.ratio(t - 1, i) if t > 0 else 1.0
            if before > 0:
                new.append(group["lr"] * (now / before))
            else:  # the rate was exactly 0: no ratio to chain from, restart from the closed form
                new.append(self.base_lrs[i] * now)
        return new

    def _get_closed_form_lr(self) -> list[Any]:
        return [base * self.ratio(self.last_epoch, i) for i, base in enumerate(self.base_lrs)]


class UBA(_BudgetScheduler):
    """The Unified Budget-Aware schedule (Tang et al., NeurIPS 2025): see the module docstring.

    Each group's rate goes linearly from peak/warmup_steps to its peak over the warm-up, then
    follows η_min + (η_max - η_min)·2(1 + cos θ)/(2φ + (2 - φ)(1 + cos θ)), θ = π·t/T, over the
    remaining T = total_steps - warmup_steps steps, and stays at η_min after them. η_max is the
    group's rate when the scheduler is built (``initial_lr``), η_min = min_lr (one value, or one per
    group) or min_lr_ratio·η_max (default 0). phi > 0; phi = 2 is cosine annealing.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        phi: float,
        warmup_steps: int = 0,
        min_lr: float | Sequence[float] | None = None,
        min_lr_ratio: float | None = None,
        last_epoch: int = -1,
    ) -> None:
        self.phi = check.positive("phi", phi)
        if _non_negative_int("warmup_steps", warmup_steps) > _positive_int("total_steps", total_steps):
            raise ValueError(f"warmup_steps ({warmup_steps}) must be <= total_steps ({total_steps})")
        super().__init__(optimizer, total_steps, warmup_steps, min_lr, min_lr_ratio, last_epoch)

    def ratio(self, step: int, group_index: int = 0) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        floor = self.min_lr_ratios[group_index]
        progress = _progress(step, self.warmup_steps, self.total_steps)
        return floor + (1.0 - floor) * uba_factor(progress, self.phi)


class WSD(_BudgetScheduler):
    """Warm-up, stable, decay: (t + 1)/W during the warm-up, the peak rate, then a decay of shape
    `decay` ("linear", "cosine", "1-sqrt") from the peak to η_min over the last `decay_steps` steps
    (default round(decay_fraction·total_steps)); η_min held after total_steps. η_min as in `UBA`."""

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        warmup_steps: int = 0,
        decay_steps: int | None = None,
        decay_fraction: float = 0.2,
        decay: str = "linear",
        min_lr: float | Sequence[float] | None = None,
        min_lr_ratio: float | None = None,
        last_epoch: int = -1,
    ) -> None:
        total = _positive_int("total_steps", total_steps)
        warmup = _non_negative_int("warmup_steps", warmup_steps)
        self.decay_steps = _wsd_decay_steps(total, warmup, decay_steps, decay_fraction)
        self.decay = _decay_shape(decay)
        super().__init__(optimizer, total_steps, warmup_steps, min_lr, min_lr_ratio, last_epoch)

    def ratio(self, step: int, group_index: int = 0) -> float:
        floor = self.min_lr_ratios[group_index]
        return _wsd_ratio(step, self.total_steps, self.warmup_steps, self.decay_steps, self.decay, floor)


# --------------------------------------------------------------------------------------------------
# Momentum warm-up


class MomentumWarmup:
    """Muon's momentum warm-up: ``group["momentum"]`` goes linearly from `start` to `end` over
    `warmup_steps` steps, then stays at `end`.

        momentum(t) = start + (end - start)·min(t / warmup_steps, 1)

    (modded-nanogpt's 0.85 -> 0.95 over the first 300 steps.) Applied to every param group that has
    a `key` entry and is not an AdamW group (``use_muon=False``; fastoptim's Muon gives its AdamW
    groups a `momentum` entry from its defaults, which AdamW never reads). Like an lr scheduler, it
    writes momentum(0) when built; call `step()` after each ``optimizer.step()``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        start: float = 0.85,
        end: float = 0.95,
        key: str = "momentum",
        last_step: int = -1,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, got {type(key).__name__}")
        self.optimizer = optimizer
        self.warmup_steps = _non_negative_int("warmup_steps", warmup_steps)
        self.start = check.beta("start", start)
        self.end = check.beta("end", end)
        self.key = key
        if isinstance(last_step, bool) or not isinstance(last_step, numbers.Integral) or last_step < -1:
            raise ValueError(f"last_step must be an integer >= -1, got {last_step!r}")
        if not self.group_indices():
            raise ValueError(
                f"no param group of the optimizer has a {key!r} entry outside AdamW (use_muon=False) groups"
            )
        self.last_step = int(last_step)
        self.step()

    def group_indices(self) -> list[int]:
        """Indices of the param groups this schedule writes."""
        return [
            i
            for i, group in enumerate(self.optimizer.param_groups)
            if self.key in group and group.get("use_muon", True) is not False
        ]

    def value(self, step: int) -> float:
        """momentum(step) for optimizer step `step` (0-based)."""
        if self.warmup_steps == 0:
            return self.end
        fraction = min(max(step, 0) / self.warmup_steps, 1.0)
        return self.start + (self.end - self.start) * fraction

    def step(self) -> None:
        self.last_step += 1
        momentum = self.value(self.last_step)
        for i in self.group_indices():
            self.optimizer.param_groups[i][self.key] = momentum

    def get_last_momentum(self) -> float:
        return self.value(self.last_step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "warmup_steps": self.warmup_steps,
            "start": self.start,
            "end": self.end,
            "key": self.key,
            "last_step": self.last_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the schedule and write its current value into the groups (as the checkpoint had it)."""
        missing = {"warmup_steps", "start", "end", "key", "last_step"} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict is missing {sorted(missing)}")
        self.warmup_steps = _non_negative_int("warmup_steps", state_dict["warmup_steps"])
        self.start = check.beta("start", state_dict["start"])
        self.end = check.beta("end", state_dict["end"])
        self.key = state_dict["key"]
        self.last_step = int(state_dict["last_step"])
        momentum = self.value(self.last_step)
        for i in self.group_indices():
            self.optimizer.param_groups[i][self.key] = momentum


__all__ = [
    "SCHEDULES",
    "UBA",
    "WSD",
    "WSD_DECAY_SHAPES",
    "MomentumWarmup",
    "cosine_factor",
    "lr_multiplier",
    "uba_factor",
    "wsd_decay_factor",
]

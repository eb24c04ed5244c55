"""Coefficient schedules of the quintic Newton–Schulz iteration.

Each iteration maps X -> a X + b (X Xᵀ) X + c (X Xᵀ)² X, i.e. every singular value s of X
goes through the odd polynomial p(s) = a s + b s³ + c s⁵. A schedule is the list of (a, b, c)
used at each iteration, plus the safety factor applied to the initial normalization
X = G / (safety·‖G‖_F + eps).

- ``"jordan"``: (3.4445, -4.7750, 2.0315) at every step — K. Jordan, "Muon: An optimizer for
  hidden layers in neural networks" (2024). Steep at zero; converges to singular values in
  roughly [0.7, 1.2] rather than to 1.
- ``"you"``: five per-iteration triples tuned by You Jiacheng for modded-nanogpt (2025).
- ``"polar_express"``: the degree-5 schedule of Amsel, Persson, Musco, Gower, "The Polar Express:
  Optimal Matrix Sign Methods and Their Application to the Muon Algorithm" (arXiv:2505.16932),
  Algorithm 1: every triple but the last divided by (1.01, 1.01³, 1.01⁵) for bf16 safety, and the
  normalization divided by 1.01 as well. Steps past the table repeat its last triple
  (the paper: "subsequent coeffs equal this numerically").
- a user sequence of (a, b, c) triples.

For every schedule, asking for more steps than the table holds repeats the last triple; ``steps=None``
runs the table once (5 steps for the named schedules).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

Triple = tuple[float, float, float]

JORDAN: tuple[Triple, ...] = ((3.4445, -4.7750, 2.0315),) * 5

YOU: tuple[Triple, ...] = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)

# Polar Express, degree 5, l = 1e-3 (the paper's Algorithm 1), before the safety factor.
_POLAR_EXPRESS_RAW: tuple[Triple, ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
POLAR_EXPRESS_SAFETY = 1.01
POLAR_EXPRESS: tuple[Triple, ...] = tuple(
    (a / POLAR_EXPRESS_SAFETY, b / POLAR_EXPRESS_SAFETY**3, c / POLAR_EXPRESS_SAFETY**5)
    for a, b, c in _POLAR_EXPRESS_RAW[:-1]
) + (_POLAR_EXPRESS_RAW[-1],)

NAMED: dict[str, tuple[tuple[Triple, ...], float, int]] = {
    # name: (table, normalization safety factor, default number of steps)
    "jordan": (JORDAN, 1.0, 5),
    "you": (YOU, 1.0, 5),
    "polar_express": (POLAR_EXPRESS, POLAR_EXPRESS_SAFETY, 5),
}


@dataclass(frozen=True)
class Schedule:
    """A resolved schedule: the (a, b, c) of each iteration and the normalization safety factor."""

    triples: tuple[Triple, ...]
    safety: float = 1.0

    def flat(self) -> list[float]:
        """[a0, b0, c0, a1, b1, c1, ...]: the form a torch.library op or a kernel takes."""
        return [x for triple in self.triples for x in triple]

    @classmethod
    def from_flat(cls, flat: Sequence[float], safety: float) -> Schedule:
        values = [float(x) for x in flat]
        return cls(tuple(tuple(values[i : i + 3]) for i in range(0, len(values), 3)), float(safety))


def _as_triple(i: int, item: object) -> Triple:
    if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 3:
        raise ValueError(f"coefficients[{i}] must be an (a, b, c) triple, got {item!r}")
    out = []
    for value in item:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"coefficients[{i}] must hold finite real numbers, got {item!r}")
        out.append(float(value))
    return (out[0], out[1], out[2])


def resolve(coefficients: str | Sequence[Sequence[float]] | Schedule = "jordan", steps: int | None = None) -> Schedule:
    """Turn a schedule name or a list of (a, b, c) triples and a step count into a Schedule.

    Raises ValueError naming ``coefficients`` or ``steps`` when either is not usable.
    """
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0):
        raise ValueError(f"steps must be None or an integer >= 0, got {steps!r}")
    if isinstance(coefficients, Schedule):  # validated like the other forms: a Schedule is a plain dataclass
        if isinstance(coefficients.triples, (str, bytes)) or not isinstance(coefficients.triples, Sequence):
            raise ValueError(f"coefficients.triples must be a sequence of (a, b, c), got {coefficients.triples!r}")
        table = tuple(_as_triple(i, item) for i, item in enumerate(coefficients.triples))
        safety = coefficients.safety
        if isinstance(safety, bool) or not isinstance(safety, numbers.Real) or not math.isfinite(safety) or safety <= 0:
            raise ValueError(f"coefficients.safety must be a finite number > 0, got {safety!r}")
        safety = float(safety)
        default_steps = len(table)
    elif isinstance(coefficients, str):
        if coefficients not in NAMED:
            raise ValueError(
                f"coefficients must be one of {sorted(NAMED)} or a list of (a, b, c), got {coefficients!r}"
            )
        table, safety, default_steps = NAMED[coefficients]
    elif isinstance(coefficients, Sequence):
        table = tuple(_as_triple(i, item) for i, item in enumerate(coefficients))
        safety, default_steps = 1.0, len(table)
    else:
        raise ValueError(
            f"coefficients must be a schedule name or a list of (a, b, c) triples, got {type(coefficients).__name__}"
        )
    n = default_steps if steps is None else int(steps)
    if n > 0 and not table:
        raise ValueError(f"coefficients is empty but steps={n} were asked for")
    triples = tuple(table[min(i, len(table) - 1)] for i in range(n))
    return Schedule(triples, safety)

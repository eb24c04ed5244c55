"""fastoptim: fused Triton and CUDA kernels for Muon, NorMuon and Sophia.

The ops (`fastoptim.ops`, re-exported here) are functional and autograd-free; each takes
``backend="auto"|"cuda"|"triton"|"torch"``. `fastoptim.backends.available()` says what can run here.
"""

from __future__ import annotations

from . import backends, coefficients, ns_methods, ops, optim, reference
from .backends import BackendUnavailableError
from .ops import (
    gram_newton_schulz,
    hessian_ema_,
    muon_apply_,
    muon_apply_stack_,
    muon_momentum_,
    muon_momentum_stack_,
    newton_schulz,
    normuon_step_,
    normuon_step_stack_,
    sophia_step_,
)
from .optim import Muon, NorMuon, SophiaG, SophiaH, param_groups, sophia_sampled_loss
from .qk_clip import QKClip

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "Muon",
    "NorMuon",
    "QKClip",
    "SophiaG",
    "SophiaH",
    "backends",
    "coefficients",
    "gram_newton_schulz",
    "hessian_ema_",
    "muon_apply_",
    "muon_apply_stack_",
    "muon_momentum_",
    "muon_momentum_stack_",
    "newton_schulz",
    "normuon_step_",
    "normuon_step_stack_",
    "ns_methods",
    "ops",
    "optim",
    "param_groups",
    "reference",
    "sophia_step_",
    "sophia_sampled_loss",
]

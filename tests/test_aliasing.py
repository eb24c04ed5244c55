"""In-place ops refuse overlapping arguments (a written tensor inside another argument, the same buffer
twice), before anything changes; eps <= 0 is refused where a zero matrix would be divided by it."""

from __future__ import annotations

import pytest
import torch

import fastoptim


def _case(name):
    torch.manual_seed(0)
    a, b, c = (torch.randn(4, 6) for _ in range(3))
    stack = torch.randn(2, 4, 6)
    v = torch.rand(4)
    calls = {
        "momentum: buf is grad": (lambda: fastoptim.muon_momentum_(a, a), [a]),
        "momentum stack: out inside a buf": (
            lambda: fastoptim.muon_momentum_stack_([stack[0], b], [c, c.clone()], stack),
            [stack, b],
        ),
        "momentum stack: the same buf twice": (
            lambda: fastoptim.muon_momentum_stack_([a, a], [b, c], torch.empty(2, 4, 6)),
            [a],
        ),
        "apply: param is the update": (lambda: fastoptim.muon_apply_(a, a, 0.1), [a]),
        "normuon: second moment inside param": (
            lambda: fastoptim.normuon_step_(a, b, a.view(-1)[:4], 0.1),
            [a, b],
        ),
        "sophia: the same param twice": (
            lambda: fastoptim.sophia_step_([a, a], [b, b], [c, c.clone()], [v.new_ones(4, 6)] * 2, 0.1),
            [a, c],
        ),
        "hessian ema: estimate is the hessian": (lambda: fastoptim.hessian_ema_([a], [a]), [a]),
    }
    call, tensors = calls[name]
    return call, tensors


NAMES = [
    "momentum: buf is grad",
    "momentum stack: out inside a buf",
    "momentum stack: the same buf twice",
    "apply: param is the update",
    "normuon: second moment inside param",
    "sophia: the same param twice",
    "hessian ema: estimate is the hessian",
]


@pytest.mark.parametrize("name", NAMES)
def test_overlapping_arguments_are_refused_and_nothing_changes(name):
    call, tensors = _case(name)
    before = [t.clone() for t in tensors]
    with pytest.raises(ValueError, match="memory|overlap|share"):
        call()
    for t, b in zip(tensors, before):
        assert torch.equal(t, b)


def test_eps_zero_is_refused_for_the_normalizations():
    with pytest.raises(ValueError, match="eps"):
        fastoptim.newton_schulz(torch.zeros(3, 4), eps=0.0)
    with pytest.raises(ValueError, match="eps"):
        fastoptim.muon_momentum_stack_([torch.zeros(3, 4)], [torch.zeros(3, 4)], torch.empty(1, 3, 4), eps=0.0)
    X = fastoptim.newton_schulz(torch.zeros(3, 4))  # the default eps: a zero matrix stays zero
    assert torch.equal(X, torch.zeros_like(X))

"""Bad input raises ValueError/TypeError naming the argument, and leaves every tensor unchanged."""

from __future__ import annotations

import math

import pytest
import torch

import fastoptim


def matrices(*shapes, dtype=torch.float32):
    return [torch.randn(s, dtype=dtype) for s in shapes]


def snapshot(*tensors):
    return [t.clone() for t in tensors]


def assert_unchanged(tensors, before):
    for t, b in zip(tensors, before):
        assert torch.equal(t, b) or (t.isnan().any() and torch.equal(t.isnan(), b.isnan()))


def call_op(name, overrides):
    """Run op `name` with valid arguments except for `overrides`; return (tensors it may mutate, callable)."""
    p, u = matrices((4, 6), (4, 6))
    buf, g = matrices((4, 6), (4, 6))
    v = torch.rand(4)
    lists = {k: [torch.randn(3, 2), torch.randn(5)] for k in ("params", "grads", "exp_avgs")}
    lists["hessians"] = [torch.rand(3, 2), torch.rand(5)]
    lists["estimates"] = [torch.rand(3, 2), torch.rand(5)]
    if name == "newton_schulz":
        kwargs = dict(G=p, steps=5, coefficients="jordan", eps=1e-7, compute_dtype=torch.float32)
        fn = fastoptim.newton_schulz
    elif name == "muon_momentum_":
        kwargs = dict(buf=buf, grad=g, beta=0.9, nesterov=True)
        fn = fastoptim.muon_momentum_
    elif name == "muon_apply_":
        kwargs = dict(param=p, update=u, lr=0.1, weight_decay=0.1, scale=1.0, cautious=False)
        fn = fastoptim.muon_apply_
    elif name == "normuon_step_":
        kwargs = dict(param=p, update=u, second_moment=v, lr=0.1, weight_decay=0.1, beta2=0.95, eps=1e-8, scale=1.0)
        fn = fastoptim.normuon_step_
    elif name == "sophia_step_":
        kwargs = dict(params=lists["params"], grads=lists["grads"], exp_avgs=lists["exp_avgs"],
                      hessians=lists["hessians"], lr=0.1, beta1=0.9, rho=0.04, weight_decay=0.1, eps=1e-15)
        fn = fastoptim.sophia_step_
    else:
        kwargs = dict(hessians=lists["hessians"], estimates=lists["estimates"], beta2=0.99)
        fn = fastoptim.hessian_ema_
    kwargs.update(overrides)
    mutable = [t for value in kwargs.values() for t in (value if isinstance(value, list) else [value])
               if isinstance(t, torch.Tensor) and t.layout == torch.strided]
    return mutable, lambda: fn(**kwargs)


NAN = float("nan")
CASES = [
    # (op, overrides, exception, text the message must contain)
    ("newton_schulz", {"G": torch.randn(5)}, ValueError, "G"),
    ("newton_schulz", {"G": torch.randint(0, 3, (4, 4))}, TypeError, "G"),
    ("newton_schulz", {"G": torch.randn(3, 3, dtype=torch.complex64)}, TypeError, "G"),
    ("newton_schulz", {"G": [[1.0, 2.0]]}, TypeError, "G"),
    ("newton_schulz", {"steps": -1}, ValueError, "steps"),
    ("newton_schulz", {"steps": 2.5}, ValueError, "steps"),
    ("newton_schulz", {"coefficients": "newton"}, ValueError, "coefficients"),
    ("newton_schulz", {"coefficients": [(1.0, 2.0)]}, ValueError, "coefficients"),
    ("newton_schulz", {"coefficients": [(1.0, NAN, 2.0)]}, ValueError, "coefficients"),
    ("newton_schulz", {"eps": NAN}, ValueError, "eps"),
    ("newton_schulz", {"eps": -1.0}, ValueError, "eps"),
    ("newton_schulz", {"compute_dtype": torch.int32}, ValueError, "compute_dtype"),
    ("newton_schulz", {"compute_dtype": "bf16"}, TypeError, "compute_dtype"),
    ("newton_schulz", {"backend": "tpu"}, ValueError, "backend"),
    ("muon_momentum_", {"grad": torch.randn(4, 5)}, ValueError, "grad"),
    ("muon_momentum_", {"grad": torch.randn(4, 6, dtype=torch.complex64)}, TypeError, "grad"),
    ("muon_momentum_", {"buf": torch.zeros(4, 6, dtype=torch.int64)}, TypeError, "buf"),
    ("muon_momentum_", {"beta": 1.0}, ValueError, "beta"),
    ("muon_momentum_", {"beta": -0.1}, ValueError, "beta"),
    ("muon_momentum_", {"beta": NAN}, ValueError, "beta"),
    ("muon_momentum_", {"nesterov": 1}, TypeError, "nesterov"),
    ("muon_apply_", {"update": torch.randn(6, 4)}, ValueError, "update"),
    ("muon_apply_", {"param": torch.randn(24)}, ValueError, "param"),
    ("muon_apply_", {"update": torch.randn(4, 6).to_sparse()}, TypeError, "update"),
    ("muon_apply_", {"lr": NAN}, ValueError, "lr"),
    ("muon_apply_", {"lr": math.inf}, ValueError, "lr"),
    ("muon_apply_", {"lr": -0.1}, ValueError, "lr"),
    ("muon_apply_", {"lr": torch.tensor(0.1)}, TypeError, "lr"),
    ("muon_apply_", {"weight_decay": -1.0}, ValueError, "weight_decay"),
    ("muon_apply_", {"scale": NAN}, ValueError, "scale"),
    ("muon_apply_", {"scale": 1 + 2j}, TypeError, "scale"),
    ("muon_apply_", {"cautious": "yes"}, TypeError, "cautious"),
    ("normuon_step_", {"second_moment": torch.rand(4, 1)}, ValueError, "second_moment"),
    ("normuon_step_", {"second_moment": torch.rand(6)}, ValueError, "second_moment"),
    ("normuon_step_", {"update": torch.randn(4, 7)}, ValueError, "update"),
    ("normuon_step_", {"beta2": 1.5}, ValueError, "beta2"),
    ("normuon_step_", {"eps": 0.0}, ValueError, "eps"),
    ("normuon_step_", {"lr": NAN}, ValueError, "lr"),
    ("normuon_step_", {"cautious": None}, TypeError, "cautious"),
    ("sophia_step_", {"grads": [torch.randn(3, 2)]}, ValueError, "grads"),
    ("sophia_step_", {"hessians": [torch.rand(3, 2), torch.rand(4)]}, ValueError, "hessians[1]"),
    ("sophia_step_", {"exp_avgs": [torch.randn(3, 2), torch.randn(5, dtype=torch.complex64)]}, TypeError,
     "exp_avgs[1]"),
    ("sophia_step_", {"params": torch.randn(3)}, TypeError, "params"),
    ("sophia_step_", {"rho": 0.0}, ValueError, "rho"),
    ("sophia_step_", {"beta1": 1.0}, ValueError, "beta1"),
    ("sophia_step_", {"lr": NAN}, ValueError, "lr"),
    ("sophia_step_", {"eps": -1e-15}, ValueError, "eps"),
    ("hessian_ema_", {"estimates": [torch.rand(3, 2)]}, ValueError, "estimates"),
    ("hessian_ema_", {"beta2": 1.0}, ValueError, "beta2"),
    ("hessian_ema_", {"beta2": NAN}, ValueError, "beta2"),
]


CASE_IDS = [f"{c[0]}-{c[3]}-{i}" for i, c in enumerate(CASES)]


@pytest.mark.parametrize("op, overrides, exception, text", CASES, ids=CASE_IDS)
def test_bad_input_raises_and_changes_nothing(op, overrides, exception, text):
    mutable, call = call_op(op, overrides)
    before = snapshot(*mutable)
    with pytest.raises(exception) as info:
        call()
    assert text in str(info.value)
    assert_unchanged(mutable, before)


@pytest.mark.cuda
def test_device_mismatch_cpu_and_cuda():
    p = torch.randn(4, 6)
    u = torch.randn(4, 6, device="cuda")
    with pytest.raises(ValueError, match="update"):
        fastoptim.muon_apply_(p, u, 0.1)


def test_device_mismatch_is_checked_on_meta():
    # A second device without a GPU: the meta device. The check fires before anything runs.
    p = torch.randn(4, 6)
    before = p.clone()
    with pytest.raises(ValueError, match="device"):
        fastoptim.muon_apply_(p, torch.empty(4, 6, device="meta"), 0.1)
    assert torch.equal(p, before)
    with pytest.raises(ValueError, match="second_moment"):
        fastoptim.normuon_step_(p, torch.randn(4, 6), torch.empty(4, device="meta"), 0.1)
    with pytest.raises(ValueError, match="params"):
        fastoptim.sophia_step_([torch.randn(2), torch.empty(2, device="meta")], *[[torch.randn(2)] * 2] * 3, lr=0.1)


STACK_CASES = [
    # (overrides, exception, text)
    ({"out": torch.zeros(2, 4, 6)}, ValueError, "out"),  # one matrix per buf
    ({"out": torch.zeros(3, 4, 5)}, ValueError, "bufs[0]"),  # m·n differs
    ({"out": torch.zeros(3, 6, 4).mT}, ValueError, "contiguous"),
    ({"out": torch.zeros(3, 24)}, ValueError, "out"),
    ({"grads": [torch.randn(4, 6)] * 2}, ValueError, "grads"),
    ({"grads": [torch.randn(4, 6), torch.randn(6, 4), torch.randn(4, 6)]}, ValueError, "grads[1]"),
    ({"bufs": [torch.zeros(4, 6, dtype=torch.int32)] * 3}, TypeError, "bufs[0]"),
    ({"beta": 1.0}, ValueError, "beta"),
    ({"nesterov": "yes"}, TypeError, "nesterov"),
    ({"normalize": 1}, TypeError, "normalize"),
    ({"safety": 0.0}, ValueError, "safety"),
    ({"eps": float("nan")}, ValueError, "eps"),
]


@pytest.mark.parametrize("overrides, exception, text", STACK_CASES)
def test_muon_momentum_stack_bad_input(overrides, exception, text):
    kwargs = dict(bufs=[torch.randn(4, 6) for _ in range(3)], grads=[torch.randn(4, 6) for _ in range(3)],
                  out=torch.zeros(3, 4, 6), beta=0.9, nesterov=True)
    kwargs.update(overrides)
    before = [t.clone() for t in kwargs["bufs"]] + [kwargs["out"].clone()]
    with pytest.raises(exception) as info:
        fastoptim.muon_momentum_stack_(**kwargs)
    assert text in str(info.value)
    for t, b in zip(kwargs["bufs"] + [kwargs["out"]], before):
        assert torch.equal(t, b)


def test_lists_of_unequal_length_in_hessian_ema():
    with pytest.raises(ValueError, match="estimates"):
        fastoptim.hessian_ema_([torch.rand(2)], [], 0.9)

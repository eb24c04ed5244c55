"""fastoptim.schedules: UBA against its formula, WSD's shape, chaining, state_dict, momentum warm-up."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.optim.lr_scheduler import ChainedScheduler, CosineAnnealingLR, ExponentialLR, LinearLR, SequentialLR

import fastoptim
from fastoptim import schedules
from fastoptim.schedules import UBA, WSD, MomentumWarmup


def make_sgd(*lrs: float) -> torch.optim.SGD:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0])


def run(scheduler, optimizer, steps: int) -> list[list[float]]:
    """The rates each optimizer step uses, step 0 included."""
    rates = []
    for _ in range(steps):
        rates.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return rates


def uba_formula(t: int, total: int, warmup: int, phi: float, peak: float, low: float) -> float:
    if t < warmup:
        return peak * (t + 1) / warmup
    theta = math.pi * min((t - warmup) / (total - warmup), 1.0)
    c = 1 + math.cos(theta)
    return low + (peak - low) * 2 * c / (2 * phi + (2 - phi) * c)


@pytest.mark.parametrize("phi", [0.3, 1.0, 2.0, 3.5, 8.0])
@pytest.mark.parametrize("warmup", [0, 7])
def test_uba_matches_formula(phi, warmup):
    total = 53
    optimizer = make_sgd(0.1, 0.02)
    scheduler = UBA(optimizer, total_steps=total, phi=phi, warmup_steps=warmup, min_lr_ratio=0.1)
    rates = run(scheduler, optimizer, total + 5)
    for t, (a, b) in enumerate(rates):
        assert a == pytest.approx(uba_formula(t, total, warmup, phi, 0.1, 0.01), rel=1e-12, abs=1e-15)
        assert b == pytest.approx(uba_formula(t, total, warmup, phi, 0.02, 0.002), rel=1e-12, abs=1e-15)
        assert scheduler.ratio(t, 0) * 0.1 == pytest.approx(a, rel=1e-12)


def test_uba_phi_2_is_cosine():
    total, warmup = 40, 5
    optimizer = make_sgd(0.3)
    scheduler = UBA(optimizer, total_steps=total, phi=2.0, warmup_steps=warmup, min_lr=0.03)
    rates = run(scheduler, optimizer, total + 3)
    for t, (lr,) in enumerate(rates[warmup:], start=warmup):
        p = min((t - warmup) / (total - warmup), 1.0)
        cosine = 0.03 + (0.3 - 0.03) * 0.5 * (1 + math.cos(math.pi * p))
        assert abs(lr - cosine) <= 1e-12
    for p in [0.0, 0.1, 0.37, 0.5, 0.99, 1.0]:
        assert abs(schedules.uba_factor(p, 2.0) - schedules.cosine_factor(p)) <= 1e-12


def test_uba_matches_torch_cosine_annealing():
    optimizer_a, optimizer_b = make_sgd(0.5), make_sgd(0.5)
    uba = UBA(optimizer_a, total_steps=30, phi=2.0, min_lr=0.05)
    cosine = CosineAnnealingLR(optimizer_b, T_max=30, eta_min=0.05)
    for (a,), (b,) in zip(run(uba, optimizer_a, 30), run(cosine, optimizer_b, 30)):
        assert a == pytest.approx(b, rel=1e-9)


@pytest.mark.parametrize("phi", [0.2, 1.0, 2.0, 5.0, 20.0])
def test_uba_warmup_then_monotone_decay(phi):
    total, warmup = 60, 10
    optimizer = make_sgd(1.0)
    rates = [r[0] for r in run(UBA(optimizer, total, phi, warmup_steps=warmup), optimizer, total + 4)]
    assert rates[:warmup] == pytest.approx([(t + 1) / warmup for t in range(warmup)])
    assert rates[warmup] == pytest.approx(1.0)
    decay = rates[warmup:total]
    assert all(b < a for a, b in zip(decay, decay[1:]))
    assert rates[total:] == pytest.approx([0.0] * 4, abs=1e-15)


def test_uba_phi_orders_the_decay():
    """Small phi holds the rate longer: at every interior point the factor decreases with phi."""
    for p in [0.1, 0.3, 0.5, 0.7, 0.9]:
        values = [schedules.uba_factor(p, phi) for phi in (0.25, 1.0, 2.0, 4.0, 16.0)]
        assert all(b < a for a, b in zip(values, values[1:]))
    assert schedules.uba_factor(0.5, 3.0) == pytest.approx(2 / (2 + 3.0))


def test_uba_chains_multiplicatively_with_exponential():
    optimizer = make_sgd(0.2, 0.05)
    uba = UBA(optimizer, total_steps=25, phi=0.7, warmup_steps=4, min_lr_ratio=0.05)
    expo = ExponentialLR(optimizer, gamma=0.97)
    chained = ChainedScheduler([uba, expo])
    rates = run(chained, optimizer, 30)
    for t, (a, b) in enumerate(rates):
        assert a == pytest.approx(0.2 * uba.ratio(t, 0) * 0.97**t, rel=1e-9)
        assert b == pytest.approx(0.05 * uba.ratio(t, 1) * 0.97**t, rel=1e-9)


def test_uba_in_sequential_lr_after_linear_warmup():
    optimizer = make_sgd(0.1)
    warm = LinearLR(optimizer, start_factor=0.25, end_factor=1.0, total_iters=4)
    uba = UBA(optimizer, total_steps=20, phi=4.0)
    sequence = SequentialLR(optimizer, [warm, uba], milestones=[4])
    rates = [r[0] for r in run(sequence, optimizer, 26)]
    assert rates[:4] == pytest.approx([0.1 * (0.25 + 0.75 * t / 4) for t in range(4)])
    for t in range(4, 26):
        assert rates[t] == pytest.approx(uba_formula(t - 4, 20, 0, 4.0, 0.1, 0.0), rel=1e-9, abs=1e-15)


def test_uba_state_dict_resumes():
    optimizer = make_sgd(0.1)
    scheduler = UBA(optimizer, total_steps=30, phi=1.5, warmup_steps=3, min_lr_ratio=0.1)
    run(scheduler, optimizer, 12)
    saved_sched, saved_opt = scheduler.state_dict(), optimizer.state_dict()
    expected = run(scheduler, optimizer, 10)

    fresh = make_sgd(0.1)
    resumed = UBA(fresh, total_steps=30, phi=1.5, warmup_steps=3, min_lr_ratio=0.1)
    fresh.load_state_dict(saved_opt)
    resumed.load_state_dict(saved_sched)
    assert [r[0] for r in run(resumed, fresh, 10)] == pytest.approx([r[0] for r in expected], rel=1e-12)


def test_uba_with_fastoptim_muon_groups():
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    optimizer = fastoptim.Muon(model.parameters(), lr=0.02, adamw_lr=1e-3)
    peaks = [g["lr"] for g in optimizer.param_groups]
    scheduler = UBA(optimizer, total_steps=10, phi=1.0, warmup_steps=2)
    for t in range(10):
        model(torch.randn(4, 6)).square().mean().backward()
        for group, peak in zip(optimizer.param_groups, peaks):
            assert group["lr"] == pytest.approx(peak * scheduler.ratio(t))
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()


@pytest.mark.parametrize("decay", ["linear", "cosine", "1-sqrt"])
def test_wsd_shape(decay):
    total, warmup, decay_steps = 50, 5, 10
    optimizer = make_sgd(2.0)
    scheduler = WSD(optimizer, total, warmup_steps=warmup, decay_steps=decay_steps, decay=decay, min_lr=0.2)
    rates = [r[0] for r in run(scheduler, optimizer, total + 3)]
    shape = {
        "linear": lambda q: 1 - q,
        "cosine": lambda q: 0.5 * (1 + math.cos(math.pi * q)),
        "1-sqrt": lambda q: 1 - q**0.5,
    }
    assert rates[:warmup] == pytest.approx([2.0 * (t + 1) / warmup for t in range(warmup)])
    assert rates[warmup : total - decay_steps] == pytest.approx([2.0] * (total - decay_steps - warmup))
    for t in range(total - decay_steps, total + 3):
        q = min((t - (total - decay_steps)) / decay_steps, 1.0)
        assert rates[t] == pytest.approx(0.2 + 1.8 * shape[decay](q), rel=1e-12)
    tail = rates[total - decay_steps : total + 1]
    assert all(b < a for a, b in zip(tail, tail[1:]))
    assert rates[-1] == pytest.approx(0.2)


def test_wsd_decay_fraction_and_lr_multiplier_agree():
    optimizer = make_sgd(1.0)
    scheduler = WSD(optimizer, 40, warmup_steps=4, decay_fraction=0.25, decay="cosine", min_lr_ratio=0.1)
    assert scheduler.decay_steps == 10
    rates = [r[0] for r in run(scheduler, optimizer, 40)]
    for t, lr in enumerate(rates):
        expected = schedules.lr_multiplier(
            "wsd", t, 40, 4, decay_fraction=0.25, decay="cosine", min_lr_ratio=0.1
        )
        assert lr == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("total", [1, 2, 37, 300])
def test_lr_multiplier_reproduces_compare_cosine(total):
    """`compare`'s current schedule: 5% warm-up, cosine to 10% of the peak."""
    warmup = max(1, int(0.05 * total))
    for step in range(total):
        if step < warmup:
            expected = (step + 1) / warmup
        else:
            progress = (step - warmup) / max(1, total - warmup)
            expected = 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))
        got = schedules.lr_multiplier("cosine", step, total, warmup, min_lr_ratio=0.1)
        assert got == pytest.approx(expected, rel=1e-12)
        assert schedules.lr_multiplier("uba", step, total, warmup, phi=2.0, min_lr_ratio=0.1) == pytest.approx(got)


def test_warmup_as_long_as_the_budget():
    optimizer = make_sgd(1.0)
    rates = [r[0] for r in run(UBA(optimizer, 4, 3.0, warmup_steps=4), optimizer, 6)]
    assert rates == pytest.approx([0.25, 0.5, 0.75, 1.0, 0.0, 0.0])


def test_momentum_warmup_values_and_adamw_untouched():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizer = fastoptim.Muon(model.parameters(), momentum=0.95)
    adamw = [g for g in optimizer.param_groups if not g["use_muon"]]
    before = [dict((k, v) for k, v in g.items() if k != "params") for g in adamw]
    warmup = MomentumWarmup(optimizer, warmup_steps=10, start=0.85, end=0.95)
    seen = []
    for _ in range(15):
        seen.append([g["momentum"] for g in optimizer.param_groups if g["use_muon"]][0])
        warmup.step()
    assert seen == pytest.approx([0.85 + 0.01 * min(t, 10) for t in range(15)])
    assert [dict((k, v) for k, v in g.items() if k != "params") for g in adamw] == before
    assert warmup.group_indices() == [i for i, g in enumerate(optimizer.param_groups) if g["use_muon"]]


def test_momentum_warmup_state_dict():
    model = torch.nn.Linear(4, 8, bias=False)
    optimizer = fastoptim.Muon(model.parameters())
    warmup = MomentumWarmup(optimizer, warmup_steps=20)
    for _ in range(7):
        warmup.step()
    state = warmup.state_dict()
    optimizer2 = fastoptim.Muon(torch.nn.Linear(4, 8, bias=False).parameters())
    warmup2 = MomentumWarmup(optimizer2, warmup_steps=5, start=0.5, end=0.6)
    warmup2.load_state_dict(state)
    assert optimizer2.param_groups[0]["momentum"] == pytest.approx(0.85 + 0.1 * 7 / 20)
    warmup.step()
    warmup2.step()
    assert optimizer2.param_groups[0]["momentum"] == optimizer.param_groups[0]["momentum"]


def test_momentum_warmup_needs_a_momentum_group():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="momentum"):
        MomentumWarmup(optimizer, 10)


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        ({"total_steps": 0, "phi": 1.0}, ValueError, "total_steps"),
        ({"total_steps": 10.5, "phi": 1.0}, TypeError, "total_steps"),
        ({"total_steps": 10, "phi": 0.0}, ValueError, "phi"),
        ({"total_steps": 10, "phi": "2"}, TypeError, "phi"),
        ({"total_steps": 10, "phi": 1.0, "warmup_steps": 11}, ValueError, "warmup_steps"),
        ({"total_steps": 10, "phi": 1.0, "warmup_steps": -1}, ValueError, "warmup_steps"),
        ({"total_steps": 10, "phi": 1.0, "min_lr_ratio": 1.5}, ValueError, "min_lr_ratio"),
        ({"total_steps": 10, "phi": 1.0, "min_lr": 0.5}, ValueError, "min_lr"),
        ({"total_steps": 10, "phi": 1.0, "min_lr": 0.0, "min_lr_ratio": 0.1}, ValueError, "min_lr"),
        ({"total_steps": 10, "phi": 1.0, "min_lr": [0.0, 0.0]}, ValueError, "min_lr"),
    ],
)
def test_uba_bad_arguments(kwargs, error, name):
    optimizer = make_sgd(0.1)
    with pytest.raises(error, match=name):
        UBA(optimizer, **kwargs)
    assert optimizer.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        ({"decay": "exp"}, ValueError, "decay"),
        ({"decay_steps": 11}, ValueError, "decay_steps"),
        ({"decay_fraction": 2.0}, ValueError, "decay_fraction"),
        ({"warmup_steps": 6, "decay_steps": 5}, ValueError, "warmup_steps"),
    ],
)
def test_wsd_bad_arguments(kwargs, error, name):
    with pytest.raises(error, match=name):
        WSD(make_sgd(0.1), 10, **kwargs)


def test_other_bad_arguments():
    with pytest.raises(TypeError, match="optimizer"):
        UBA("sgd", 10, 1.0)
    with pytest.raises(ValueError, match="schedule"):
        schedules.lr_multiplier("step", 0, 10)
    with pytest.raises(ValueError, match="start"):
        MomentumWarmup(make_sgd(0.1), 10, start=1.0)


def test_no_warning_in_normal_use():
    optimizer = make_sgd(0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(UBA(optimizer, 10, 1.0, warmup_steps=2), optimizer, 12)

"""fastoptim.mup: roles and param groups on a toy model, the init multipliers, the telescoping sweep."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import fastoptim
from fastoptim.mup import mup_init_, mup_multipliers, mup_param_groups, mup_roles, telescoping_sweep


class Toy(nn.Module):
    def __init__(self, width: int, vocab: int = 11, tied: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.fc = nn.Linear(width, 4 * width)
        self.proj = nn.Linear(4 * width, width, bias=False)
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        x = x + self.proj(torch.relu(self.fc(x)))
        return self.lm_head(self.norm(x))


def test_roles():
    roles = mup_roles(Toy(16))
    assert roles == {
        "embed.weight": "embedding",
        "fc.weight": "hidden",
        "fc.bias": "vector",
        "proj.weight": "hidden",
        "norm.weight": "vector",
        "norm.bias": "vector",
        "lm_head.weight": "output",
    }


def test_tied_head_is_an_embedding():
    roles = mup_roles(Toy(16, tied=True))
    assert roles["embed.weight"] == "embedding"
    assert "lm_head.weight" not in roles  # the same parameter, listed once


def test_multipliers_table():
    assert mup_multipliers("hidden", 64, 256) == (1.0, 0.5)
    assert mup_multipliers("output", 64, 256) == (0.25, 0.25)
    assert mup_multipliers("embedding", 64, 256) == (1.0, 1.0)
    assert mup_multipliers("vector", 64, 256) == (1.0, 1.0)
    assert mup_multipliers("output", 64, 64) == (1.0, 1.0)


@pytest.mark.parametrize("width", [32, 128])
def test_param_groups_land_where_they_should(width):
    model = Toy(width)
    groups = mup_param_groups(model, base_width=32, width=width, lr=0.02, adamw_lr=3e-3, weight_decay=0.1)
    by_role = {g["mup_role"]: g for g in groups}
    assert set(by_role) == {"hidden", "embedding", "output", "vector"}
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    assert ids(by_role["hidden"]) == {id(model.fc.weight), id(model.proj.weight)}
    assert ids(by_role["embedding"]) == {id(model.embed.weight)}
    assert ids(by_role["output"]) == {id(model.lm_head.weight)}
    assert ids(by_role["vector"]) == {id(model.fc.bias), id(model.norm.weight), id(model.norm.bias)}
    hidden = by_role["hidden"]
    assert hidden["use_muon"] is True and hidden["lr"] == 0.02 and hidden["scale_mode"] == "spectral"
    assert hidden["weight_decay"] == 0.1
    for role in ("embedding", "output", "vector"):
        assert by_role[role]["use_muon"] is False
    assert by_role["embedding"]["lr"] == pytest.approx(3e-3)
    assert by_role["vector"]["lr"] == pytest.approx(3e-3)
    assert by_role["output"]["lr"] == pytest.approx(3e-3 * 32 / width)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.parametrize("cls", [fastoptim.Muon, fastoptim.NorMuon])
def test_groups_train_with_muon_and_normuon(cls):
    torch.manual_seed(0)
    model = Toy(16)
    optimizer = cls(mup_param_groups(model, 8, 16, lr=0.02, adamw_lr=1e-3), ns_dtype=torch.float32)
    lrs = {g["mup_role"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["output"] == pytest.approx(5e-4)
    idx = torch.randint(0, 11, (4, 5))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    optimizer.step()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all()
        if p.grad is not None and p.grad.abs().sum() > 0:
            assert not torch.equal(p, before[name]), name


def test_init_multipliers():
    stds = {}
    for width in (64, 256):
        model = Toy(width, vocab=4096)
        generator = torch.Generator().manual_seed(0)
        norm_before = model.norm.weight.detach().clone()
        mup_init_(model, base_width=64, width=width, embedding_std=0.5, gain=1.0, generator=generator)
        assert torch.equal(model.norm.weight, norm_before)  # vectors untouched
        stds[width] = {
            "embedding": model.embed.weight.std().item(),
            "fc": model.fc.weight.std().item(),
            "proj": model.proj.weight.std().item(),
            "output": model.lm_head.weight.std().item(),
        }
        assert stds[width]["embedding"] == pytest.approx(0.5, rel=0.03)
        assert stds[width]["fc"] == pytest.approx(1 / math.sqrt(width), rel=0.03)
        assert stds[width]["proj"] == pytest.approx(1 / math.sqrt(4 * width), rel=0.03)
        assert stds[width]["output"] == pytest.approx(math.sqrt(64 / width) / math.sqrt(width), rel=0.03)
    # Relative to the base width: hidden x sqrt(base/width), output x base/width, embedding x 1.
    assert stds[256]["fc"] / stds[64]["fc"] == pytest.approx(mup_multipliers("hidden", 64, 256).init, rel=0.05)
    assert stds[256]["output"] / stds[64]["output"] == pytest.approx(mup_multipliers("output", 64, 256).init, rel=0.05)
    assert stds[256]["embedding"] / stds[64]["embedding"] == pytest.approx(1.0, rel=0.05)


# --------------------------------------------------------------------------------------------------
# Telescoping sweep

GRID = {
    "lr": [2.0**-k for k in range(12, 0, -1)],  # 12 values, increasing
    "weight_decay": [0.0, 0.003, 0.01, 0.03, 0.1, 0.3],
}


def synthetic_loss(width: int, hp: dict) -> float:
    """A bowl whose optimum drifts slowly with width: log2(lr*) = -5 - 0.6·log2(width/64),
    log10(wd*) = -1.6 + 0.25·log2(width/64)."""
    doublings = math.log2(width / 64)
    lr_term = (math.log2(hp["lr"]) - (-5.0 - 0.6 * doublings)) ** 2
    wd_term = (math.log10(hp["weight_decay"] + 1e-4) - (-1.6 + 0.25 * doublings)) ** 2
    return 1.0 + lr_term + 3.0 * wd_term


def brute_force(width: int) -> dict:
    points = [dict(zip(GRID, values)) for values in itertools.product(*GRID.values())]
    return min(points, key=lambda hp: synthetic_loss(width, hp))


def test_telescoping_finds_the_drifting_optimum_cheaply():
    calls = []

    def train_fn(width, hp):
        calls.append(width)
        return synthetic_loss(width, hp)

    result = telescoping_sweep(train_fn, base_width=64, target_width=1024, grid=GRID)
    assert result.widths == [64, 128, 256, 512, 1024]
    full = len(GRID["lr"]) * len(GRID["weight_decay"])
    assert calls.count(64) == full
    for width in result.widths:
        assert result.best[width] == brute_force(width), width
        assert result.best_loss[width] == synthetic_loss(width, result.best[width])
    # The optimum moved on the grid, so the telescoping had to follow it.
    assert result.best[1024] != result.best[64]
    # Cost model: width per run. Less than a full grid at every width beyond the base, and in total.
    assert result.cost_per_width[64] == result.full_grid_cost_per_width[64] == 64 * full
    for width in result.widths[1:]:
        assert calls.count(width) <= 9
        assert result.cost_per_width[width] == width * calls.count(width)
        assert result.cost_per_width[width] < result.full_grid_cost_per_width[width]
    assert result.cost == sum(result.cost_per_width.values()) == sum(r.cost for r in result.runs)
    assert result.cost < result.full_grid_cost
    assert len(result.runs) == len(calls)


def test_telescoping_reported_cost_and_cost_fn():
    result = telescoping_sweep(lambda w, hp: (synthetic_loss(w, hp), 2.5), 64, 128, GRID)
    assert result.cost == 2.5 * len(result.runs)
    result = telescoping_sweep(synthetic_loss, 64, 128, GRID, cost_fn=lambda w, hp: (w / 64) ** 2)
    assert result.cost_per_width[128] == 4.0 * sum(1 for r in result.runs if r.width == 128)


def test_telescoping_skips_diverged_runs():
    def train_fn(width, hp):
        return math.nan if hp["lr"] > 2.0**-4 else synthetic_loss(width, hp)

    result = telescoping_sweep(train_fn, 64, 64, GRID)
    assert result.best[64]["lr"] <= 2.0**-4


@pytest.mark.parametrize(
    "args, kwargs, error, name",
    [
        ((64, 96, GRID), {}, ValueError, "target_width"),
        ((64, 32, GRID), {}, ValueError, "target_width"),
        ((0, 64, GRID), {}, ValueError, "base_width"),
        ((64, 128, {}), {}, TypeError, "grid"),
        ((64, 128, {"lr": []}), {}, ValueError, "grid"),
        ((64, 128, GRID), {"radius": 0}, ValueError, "radius"),
    ],
)
def test_telescoping_bad_arguments(args, kwargs, error, name):
    with pytest.raises(error, match=name):
        telescoping_sweep(synthetic_loss, *args, **kwargs)


def test_mup_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        mup_param_groups("model", 32, 64, 0.02, 1e-3)
    with pytest.raises(ValueError, match="width"):
        mup_param_groups(Toy(8), 32, 0, 0.02, 1e-3)
    with pytest.raises(TypeError, match="base_width"):
        mup_multipliers("hidden", 32.0, 64)
    with pytest.raises(ValueError, match="role"):
        mup_multipliers("head", 32, 64)
    with pytest.raises(ValueError, match="lr"):
        mup_param_groups(Toy(8), 32, 64, -1.0, 1e-3)

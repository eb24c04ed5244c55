"""Behaviour shared by the optimizers: checkpoints, schedulers, closures, groups, errors, compile."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import fastoptim
from fastoptim import Muon, NorMuon, SophiaG, SophiaH


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


DATA_X = torch.randn(64, 6, generator=torch.Generator().manual_seed(1))
DATA_Y = torch.randn(64, 3, generator=torch.Generator().manual_seed(2))

FACTORIES = {
    "muon": lambda ps: Muon(ps, lr=0.02, ns_dtype=torch.float32, weight_decay=0.01, adamw_lr=1e-2),
    "normuon": lambda ps: NorMuon(ps, lr=0.02, ns_dtype=torch.float32, weight_decay=0.01, adamw_lr=1e-2),
    "normuon_bf16": lambda ps: NorMuon(ps, lr=0.02, scale_mode="match_rms_adamw", adamw_lr=1e-2),
    "sophiag": lambda ps: SophiaG(ps, lr=1e-2, rho=0.05, bs=64),
    "sophiah": lambda ps: SophiaH(ps, lr=1e-2, rho=0.05, update_period=2),
}


def _loss(model):
    return ((model(DATA_X) - DATA_Y) ** 2).mean()


def _train(model, opt, steps, name, start=0):
    losses = []
    for it in range(start, start + steps):
        if name == "sophiah":
            losses.append(opt.step(lambda: _loss(model)).item())
            continue
        opt.zero_grad(set_to_none=it % 2 == 0)
        loss = _loss(model)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if name == "sophiag" and it % 3 == 2:
            opt.zero_grad()
            fastoptim.sophia_sampled_loss(torch.stack([model(DATA_X)] * 2, -1)).backward()
            opt.update_hessian()
    return losses


@pytest.mark.parametrize("name", list(FACTORIES))
def test_loss_goes_down_on_a_small_mlp(name):
    model = _mlp()
    losses = _train(model, FACTORIES[name](model.parameters()), 60, name)
    assert losses[-1] < 0.7 * losses[0], losses[::10]


@pytest.mark.parametrize("name", list(FACTORIES))
def test_state_dict_round_trip_is_bit_identical(name):
    k = 4
    model_a = _mlp()
    opt_a = FACTORIES[name](model_a.parameters())
    _train(model_a, opt_a, 2 * k, name)

    model_b = _mlp()
    opt_b = FACTORIES[name](model_b.parameters())
    _train(model_b, opt_b, k, name)
    buffer = io.BytesIO()
    # SophiaH draws its probes from the global RNG: a checkpoint that resumes bit-exactly keeps it too.
    checkpoint = {"model": model_b.state_dict(), "opt": opt_b.state_dict(), "rng": torch.get_rng_state()}
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    model_c = _mlp(seed=123)
    model_c.load_state_dict(saved["model"])
    opt_c = FACTORIES[name](model_c.parameters())
    opt_c.load_state_dict(saved["opt"])
    torch.set_rng_state(saved["rng"])
    _train(model_c, opt_c, k, name, start=k)
    for pa, pc in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(pa, pc)
    for pa, pc in zip(model_a.parameters(), model_c.parameters()):
        for key, value in opt_a.state[pa].items():
            assert value.dtype == opt_c.state[pc][key].dtype and torch.equal(value, opt_c.state[pc][key]), key


def test_float32_statistics_survive_a_bf16_checkpoint():
    p = torch.randn(8, 4, dtype=torch.bfloat16, requires_grad=True)
    opt = NorMuon([p])
    p.grad = torch.randn_like(p)
    opt.step()
    fresh = NorMuon([p.detach().clone().requires_grad_()])
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    (q,) = fresh.param_groups[0]["params"]
    assert fresh.state[q]["second_moment"].dtype == torch.float32
    assert torch.equal(fresh.state[q]["second_moment"], opt.state[p]["second_moment"])
    assert fresh.state[q]["momentum_buffer"].dtype == torch.bfloat16


def test_lr_scheduler_scales_both_halves():
    model = _mlp()
    opt = Muon(model.parameters(), lr=0.02, adamw_lr=1e-3)
    assert len(opt.param_groups) == 2
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    for _ in range(3):
        opt.zero_grad()
        _loss(model).backward()
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02 / 8)
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-3 / 8)


def test_closure_grad_none_and_add_param_group():
    a = torch.randn(4, 6, requires_grad=True)
    b = torch.randn(4, 6, requires_grad=True)  # never gets a gradient: skipped
    opt = Muon([a, b], ns_dtype=torch.float32)
    b_before = b.detach().clone()
    a_before = a.detach().clone()

    def closure():
        opt.zero_grad()
        loss = (a**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.equal(loss.detach(), (a_before**2).sum()) and not torch.equal(a, a_before)
    assert torch.equal(b, b_before) and b not in opt.state
    c = torch.randn(3, 3, requires_grad=True)
    bias = torch.randn(3, requires_grad=True)
    opt.add_param_group({"params": [c, bias], "lr": 0.1})
    assert [g["use_muon"] for g in opt.param_groups] == [True, True, False]
    assert opt.param_groups[1]["lr"] == 0.1 and opt.param_groups[2]["lr"] == 3e-4
    c.grad, bias.grad = torch.randn_like(c), torch.randn_like(bias)
    opt.step()
    assert set(opt.state[c]) == {"momentum_buffer"} and set(opt.state[bias]) == {
        "exp_avg",
        "exp_avg_sq",
        "step",
    }
    with pytest.raises(ValueError, match="more than one"):
        opt.add_param_group({"params": [a]})


def test_named_parameters_are_accepted():
    model = _mlp()
    opt = Muon(model.named_parameters())
    assert opt.param_groups[0]["param_names"] == ["0.weight", "2.weight", "4.weight"]
    assert opt.param_groups[1]["param_names"] == ["0.bias", "2.bias", "4.bias"]


class TinyLM(nn.Module):
    def __init__(self, tie: bool):
        super().__init__()
        self.wte = nn.Embedding(11, 8)
        self.block = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8), nn.LayerNorm(8))
        self.conv = nn.Conv1d(8, 8, 3)
        self.proj = nn.Linear(8, 11, bias=False)
        if tie:
            self.proj.weight = self.wte.weight


@pytest.mark.parametrize("tie", [False, True])
def test_param_groups_routing(tie):
    model = TinyLM(tie)
    groups = fastoptim.param_groups(model, head_names=("proj",), lr=0.05)
    muon_ids = {id(p) for p in groups[0]["params"]}
    adamw_ids = {id(p) for p in groups[2]["params"]}
    assert groups[0]["use_muon"] and not groups[2]["use_muon"] and groups[0]["lr"] == 0.05
    assert muon_ids == {id(model.block[0].weight), id(model.block[2].weight)}
    # The Conv1d kernel (8, 8, 3) is one (8, 24) matrix, not a stack of 8 (8, 3) matrices.
    assert groups[1] == {"params": [model.conv.weight], "use_muon": True, "matrix_view": "flatten", "lr": 0.05}
    assert id(model.wte.weight) in adamw_ids and id(model.proj.weight) in adamw_ids
    assert id(model.block[3].weight) in adamw_ids and id(model.conv.bias) in adamw_ids
    opt = NorMuon(groups)
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.05, 3e-4]
    # Default head names do not match "proj": untied, it is a hidden matrix unless named.
    default = fastoptim.param_groups(model)
    assert (id(model.proj.weight) in {id(p) for p in default[0]["params"]}) is not tie


BAD_CONSTRUCTION = [
    (Muon, {"lr": float("nan")}, ValueError, "lr"),
    (Muon, {"lr": -1.0}, ValueError, "lr"),
    (Muon, {"momentum": 1.0}, ValueError, "momentum"),
    (Muon, {"scale_mode": "rms"}, ValueError, "scale_mode"),
    (Muon, {"coefficients": "newton"}, ValueError, "coefficients"),
    (Muon, {"backend": "tpu"}, ValueError, "backend"),
    (Muon, {"ns_dtype": torch.int32}, ValueError, "ns_dtype"),
    (Muon, {"adamw_betas": (0.9, 1.0)}, ValueError, "adamw_betas"),
    (Muon, {"adamw_eps": 0.0}, ValueError, "adamw_eps"),
    (Muon, {"split_sizes": [2, 2]}, ValueError, "split_sizes"),
    (NorMuon, {"beta2": -0.1}, ValueError, "beta2"),
    (NorMuon, {"eps": 0.0}, ValueError, "eps"),
    (SophiaG, {"rho": 0.0}, ValueError, "rho"),
    (SophiaG, {"betas": (1.0, 0.99)}, ValueError, "betas"),
    (SophiaG, {"eps": -1.0}, ValueError, "eps"),
    (SophiaG, {"lr": float("inf")}, ValueError, "lr"),
    (SophiaG, {"backend": "gpu"}, ValueError, "backend"),
    (SophiaH, {"update_period": 0}, ValueError, "update_period"),
    (SophiaH, {"rho": -1}, ValueError, "rho"),
]


@pytest.mark.parametrize(("cls", "kwargs", "error", "name"), BAD_CONSTRUCTION)
def test_bad_hyperparameters_are_refused(cls, kwargs, error, name):
    with pytest.raises(error, match=name):
        cls([torch.randn(5, 5, requires_grad=True)], **kwargs)


def test_bad_groups_are_refused_at_add_param_group():
    opt = Muon([torch.randn(4, 4, requires_grad=True)])
    with pytest.raises(ValueError, match="use_muon"):
        opt.add_param_group({"params": [torch.randn(4, requires_grad=True)], "use_muon": True})
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [torch.randn(4, 4, requires_grad=True)], "lr": float("nan")})
    with pytest.raises(ValueError, match="betas"):
        opt.add_param_group(
            {"params": [torch.randn(4, requires_grad=True)], "use_muon": False, "betas": (1, 0)}
        )
    with pytest.raises(TypeError, match="complex"):
        opt.add_param_group({"params": [torch.randn(4, 4, dtype=torch.complex64, requires_grad=True)]})
    assert len(opt.param_groups) == 1
    sophia = SophiaG([torch.randn(3, requires_grad=True)])
    with pytest.raises(ValueError, match="rho"):
        sophia.add_param_group({"params": [torch.randn(3, requires_grad=True)], "rho": -1.0})
    assert len(sophia.param_groups) == 1


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("kind", ["sparse", "complex"])
def test_bad_gradients_raise_before_anything_changes(name, kind):
    model = _mlp()
    opt = FACTORIES[name](model.parameters())
    _train(model, opt, 2, name)  # state exists
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy(opt.state_dict())
    for p in params:
        p.grad = torch.randn_like(p)
    bad = params[-1]  # the last parameter: every other one would be updated first
    if kind == "complex":
        if not hasattr(bad, "grad_dtype"):
            pytest.skip(f"torch {torch.__version__} refuses a complex .grad on a real parameter: no user gets here")
        bad.grad_dtype = None  # recent torch refuses a complex .grad on a real tensor unless told
    bad.grad = (
        torch.randn_like(bad).to_sparse()
        if kind == "sparse"
        else torch.randn_like(bad, dtype=torch.complex64)
    )
    with pytest.raises(TypeError, match=kind):
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    state_after = opt.state_dict()
    for key, value in state_before["state"].items():
        for k, v in value.items():
            assert torch.equal(v, state_after["state"][key][k])


def test_scheduler_setting_a_bad_lr_is_caught_at_step():
    p = torch.randn(4, 4, requires_grad=True)
    opt = Muon([p])
    opt.param_groups[0]["lr"] = float("nan")
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    assert torch.equal(p, before)


def test_step_does_not_read_tensor_values(monkeypatch):
    """No .item()/bool()/float() in the matrix and Sophia paths (no host synchronization)."""
    mats = [torch.randn(6, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True)]
    opts = [Muon(mats, ns_dtype=torch.float32), NorMuon(mats), SophiaG(mats)]
    for p in mats:
        p.grad = torch.randn_like(p)

    def forbidden(*args, **kwargs):
        raise AssertionError("host read of a tensor value inside step()")

    for method in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, method, forbidden)
    for opt in opts:
        opt.step()
    opts[2].update_hessian()


def test_torch_compile_traces_the_matrix_step_in_one_graph():
    """fastoptim's ops are torch.library custom ops: the whole matrix/Sophia step is one graph."""
    from torch._dynamo.testing import CompileCounter

    for cls, kwargs in (
        (Muon, {"ns_dtype": torch.float32}),
        (NorMuon, {"split_sizes": [3, 3]}),
        (SophiaG, {}),
    ):
        torch._dynamo.reset()
        params = [torch.randn(s, requires_grad=True) for s in [(6, 10), (6, 10), (6, 4)]]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = cls(params, **kwargs)
        counter = CompileCounter()
        torch.compile(opt.step, backend=counter)()
        assert counter.frame_count == 1, cls.__name__


@pytest.mark.parametrize("cls", [Muon, NorMuon, SophiaG])
def test_torch_compile_of_a_step_matches_eager(cls):
    """With AdamW parameters too (torch's foreach AdamW runs eagerly inside the compiled step)."""
    torch._dynamo.reset()
    kwargs = {"ns_dtype": torch.float32} if cls is not SophiaG else {}
    shapes = [(6, 10), (6, 10), (8, 4), (5,)]
    eager = [torch.randn(s, requires_grad=True) for s in shapes]
    compiled = [p.detach().clone().requires_grad_() for p in eager]
    opt_e, opt_c = cls(eager, **kwargs), cls(compiled, **kwargs)
    step = torch.compile(opt_c.step, backend="eager")
    for _ in range(3):
        for p, q in zip(eager, compiled):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt_e.step()
        step()
    for p, q in zip(eager, compiled):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)

"""The bucket engine: expert banks, matrix views, op calls per bucket, atomic steps, capturable lr, state dtype."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastoptim
from fastoptim import Muon, NorMuon, backends, ops
from fastoptim.optim import shape_scale


def _grads(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


# --------------------------------------------------------------------------------------------------
# 3-D parameters are stacks of matrices


@pytest.mark.parametrize("shape", [(4, 16, 8), (3, 8, 16), (2, 3, 5, 7)])
def test_expert_bank_orthogonalizes_each_expert_alone(shape):
    """With momentum 0, no decay and lr 1 the step is -scale·NS(G_e) for each expert e: the expert's own
    Newton–Schulz (not a slice of the flattened bank's) with its own shape scale."""
    bank = torch.randn(shape, requires_grad=True)
    start = bank.detach().clone()
    matrix_view = "stack" if len(shape) > 3 else "auto"
    opt = Muon([bank], lr=1.0, momentum=0.0, nesterov=False, ns_dtype=torch.float32, matrix_view=matrix_view)
    _grads([bank])
    opt.step()
    m, n = shape[-2:]
    scale = shape_scale("original", m, n)
    grads = bank.grad.reshape(-1, m, n)
    steps = (start - bank.detach()).reshape(-1, m, n)
    for e in range(grads.shape[0]):
        alone = ops.newton_schulz(grads[e : e + 1], compute_dtype=torch.float32)[0]
        torch.testing.assert_close(steps[e], scale * alone, rtol=1e-5, atol=1e-6)
        # Orthogonalized: the singular values sit in the jordan schedule's band.
        singular = torch.linalg.svdvals((steps[e] / scale).double())
        assert singular.min() > 0.5 and singular.max() < 1.25, singular


def test_normuon_expert_bank_equals_each_expert_as_its_own_matrix():
    bank = torch.randn(3, 6, 10, dtype=torch.float64, requires_grad=True)
    experts = [bank.detach()[e].clone().requires_grad_() for e in range(3)]
    opt = NorMuon([bank], ns_dtype=torch.float64, scale_mode="match_rms_adamw", weight_decay=0.1)
    alone = NorMuon(experts, ns_dtype=torch.float64, scale_mode="match_rms_adamw", weight_decay=0.1)
    for step in range(3):
        _grads([bank], seed=step)
        for e, p in enumerate(experts):
            p.grad = bank.grad[e].clone()
        opt.step()
        alone.step()
    assert opt.state[bank]["second_moment"].shape == (3, 6)
    for e, p in enumerate(experts):
        torch.testing.assert_close(bank.detach()[e], p.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(opt.state[bank]["second_moment"][e], alone.state[p]["second_moment"])


def test_matrix_view_flatten_and_conv1d_routing():
    """matrix_view="flatten" reads a 3-D tensor (a Conv1d kernel) as (out, in·k), like the 2-D matrix."""
    kernel = torch.randn(5, 3, 4, requires_grad=True)
    flat = kernel.detach().reshape(5, 12).clone().requires_grad_()
    a = Muon([kernel], ns_dtype=torch.float32, matrix_view="flatten")
    b = Muon([flat], ns_dtype=torch.float32)
    _grads([kernel])
    flat.grad = kernel.grad.reshape(5, 12).clone()
    a.step()
    b.step()
    torch.testing.assert_close(kernel.detach().reshape(5, 12), flat.detach(), rtol=0, atol=0)

    model = nn.Sequential(nn.Conv1d(3, 5, 4), nn.Flatten(), nn.Linear(5, 6), nn.Linear(6, 2))
    groups = fastoptim.param_groups(model, lr=0.01)
    conv = [g for g in groups if g.get("matrix_view") == "flatten"]
    assert len(conv) == 1 and conv[0]["params"] == [model[0].weight] and conv[0]["lr"] == 0.01
    with pytest.raises(ValueError, match="matrix_view"):
        Muon([kernel], matrix_view="rows")


def test_split_sizes_apply_to_each_expert():
    bank = torch.randn(2, 6, 4, requires_grad=True)
    opt = NorMuon([bank], split_sizes=[2, 4], ns_dtype=torch.float32, lr=1.0, momentum=0.0, nesterov=False)
    _grads([bank])
    start = bank.detach().clone()
    opt.step()
    assert torch.isfinite(bank).all() and not torch.equal(bank.detach(), start)
    with pytest.raises(ValueError, match="split_sizes"):
        Muon([torch.randn(2, 6, 4, requires_grad=True)], split_sizes=[3, 4])


# --------------------------------------------------------------------------------------------------
# One apply launch per bucket


def _gpt2_like(d: int = 8, layers: int = 12) -> list[torch.Tensor]:
    """GPT-2 small's 48 hidden matrices in 4 shape buckets (qkv (3d, d), proj (d, d), fc (4d, d), out (d, 4d))."""
    shapes = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)] * layers
    return [torch.randn(s, requires_grad=True) for s in shapes]


@pytest.mark.parametrize("cls", [Muon, NorMuon])
def test_op_calls_per_bucket(monkeypatch, cls):
    calls = []
    original = backends.implementation

    def counting(op, *args, **kwargs):
        calls.append(op)
        return original(op, *args, **kwargs)

    monkeypatch.setattr(backends, "implementation", counting)
    params = _gpt2_like()
    opt = cls(params, ns_dtype=torch.float32)
    _grads(params)
    opt.step()
    apply = "muon_apply_stack_" if cls is Muon else "normuon_step_stack_"
    assert sorted(calls) == sorted(["muon_momentum_stack_", "newton_schulz", apply] * 4)


# --------------------------------------------------------------------------------------------------
# Atomic steps and zero-size matrices


def test_a_refused_step_changes_nothing():
    adamw = torch.randn(5, requires_grad=True)
    first = torch.randn(6, 4, requires_grad=True)
    second = torch.randn(6, 4, requires_grad=True)
    opt = Muon(
        [
            {"params": [adamw], "use_muon": False},
            {"params": [first], "use_muon": True},
            {"params": [second], "use_muon": True, "backend": "cuda"},  # cannot run on CPU tensors
        ]
    )
    _grads([adamw, first, second])
    before = [p.detach().clone() for p in (adamw, first, second)]
    with pytest.raises(backends.BackendUnavailableError, match="cuda"):
        opt.step()
    for p, b in zip((adamw, first, second), before):
        assert torch.equal(p.detach(), b)
    assert len(opt.state) == 0


def test_sophia_refuses_an_overflowing_rho_before_any_group_steps():
    a, b = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    opt = fastoptim.SophiaG([{"params": [a]}, {"params": [b], "rho": 1e300, "bs": 1e300}])
    _grads([a, b])
    before = [a.detach().clone(), b.detach().clone()]
    with pytest.raises(ValueError, match="rho"):
        opt.step()
    assert torch.equal(a.detach(), before[0]) and torch.equal(b.detach(), before[1])


@pytest.mark.parametrize("cls", [Muon, NorMuon])
def test_zero_size_matrices_are_skipped(cls):
    empty = [torch.randn(s, requires_grad=True) for s in [(0, 5), (5, 0), (0, 3, 3), (2, 0, 3), (2, 3, 0)]]
    real = torch.randn(6, 4, requires_grad=True)
    opt = cls([*empty, real], ns_dtype=torch.float32)
    _grads([*empty, real])
    before = real.detach().clone()
    opt.step()
    assert not torch.equal(real.detach(), before) and torch.isfinite(real).all()
    for p in empty:
        assert all(torch.isfinite(v).all() for v in opt.state[p].values())


# --------------------------------------------------------------------------------------------------
# Capturable: tensor lr and weight decay


@pytest.mark.parametrize("cls", [Muon, NorMuon])
def test_tensor_lr_with_a_scheduler_does_not_recompile(cls):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    params = [torch.randn(s, requires_grad=True) for s in [(6, 10), (6, 10), (8, 4)]]
    eager = [p.detach().clone().requires_grad_() for p in params]
    opt = cls(params, lr=torch.tensor(0.02), weight_decay=torch.tensor(0.1), ns_dtype=torch.float32)
    ref = cls(eager, lr=0.02, weight_decay=0.1, ns_dtype=torch.float32)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)) for o in (opt, ref)]
    counter = CompileCounter()
    step = torch.compile(opt.step, backend=counter)
    frames = []
    for i in range(12):
        _grads(params, seed=i)
        _grads(eager, seed=i)
        step()
        ref.step()
        for s in schedules:
            s.step()
        frames.append(counter.frame_count)
    assert opt.param_groups[0]["lr"].item() == pytest.approx(0.02 / 13)
    assert frames[0] >= 1 and frames[1] == frames[-1], frames  # lr changed 10 times after step 2: no recompile
    for p, q in zip(params, eager):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


def test_a_float_lr_recompiles():
    """The control: with a Python float lr every scheduler change recompiles the step (why tensor lr matters)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    params = [torch.randn(6, 10, requires_grad=True)]
    opt = Muon(params, lr=0.02, ns_dtype=torch.float32)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    counter = CompileCounter()
    step = torch.compile(opt.step, backend=counter)
    frames = []
    for i in range(4):
        _grads(params, seed=i)
        step()
        schedule.step()
        frames.append(counter.frame_count)
    assert frames[-1] > frames[1], frames


def test_tensor_lr_is_checked():
    p = torch.randn(4, 4, requires_grad=True)
    with pytest.raises(TypeError, match="lr"):
        Muon([p], lr=torch.tensor([0.1]))
    with pytest.raises(ValueError, match="lr"):
        Muon([p], lr=torch.tensor(-0.1))
    with pytest.raises(ValueError, match="device"):
        Muon([p], lr=torch.tensor(0.1, device="meta"))


# --------------------------------------------------------------------------------------------------
# bfloat16 momentum


def test_state_dtype_bfloat16_momentum():
    params = [torch.randn(s, requires_grad=True) for s in [(16, 8), (16, 8), (3, 4, 4)]]
    wide = [p.detach().clone().requires_grad_() for p in params]
    opt = NorMuon(params, state_dtype=torch.bfloat16)
    ref = NorMuon(wide)
    for i in range(3):
        _grads(params, seed=i)
        _grads(wide, seed=i)
        opt.step()
        ref.step()
    assert all(opt.state[p]["momentum_buffer"].dtype == torch.bfloat16 for p in params)
    assert all(opt.state[p]["second_moment"].dtype == torch.float32 for p in params)
    for p, q in zip(params, wide):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0.05, atol=0.02)
    saved = copy.deepcopy(opt.state_dict())
    clone = NorMuon([p.detach().clone().requires_grad_() for p in params], state_dtype=torch.bfloat16)
    clone.load_state_dict(saved)
    for a, b in zip(clone.state_dict()["state"].values(), saved["state"].values()):
        for key in b:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    with pytest.raises(TypeError, match="state_dtype"):
        Muon(params, state_dtype="bf16")


def _skip_unless_available(backend: str) -> None:
    if not backends.available()[backend].available:
        pytest.skip(backends.available()[backend].reason)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("cls", [Muon, NorMuon])
def test_a_step_with_tensor_lr_is_captured_in_a_cuda_graph(cls, backend):
    """The whole matrix step (momentum stack, Newton–Schulz, apply stack) replays from a CUDA graph with a
    new learning rate written into the lr tensor, and matches eager steps. Triton: the capture reuses the
    warm-up's chunk tables (built on another stream; the stack is allocated again in the graph's pool)."""
    _skip_unless_available(backend)
    device = torch.device("cuda")
    shapes = [(64, 128), (64, 128), (128, 64), (4, 32, 48)]
    params = [torch.randn(s, device=device, requires_grad=True) for s in shapes]
    eager = [p.detach().clone().requires_grad_() for p in params]
    lr = torch.tensor(0.02, device=device)
    opt = cls(params, lr=lr, weight_decay=0.01, backend=backend)
    ref = cls(eager, lr=0.02, weight_decay=0.01, backend=backend)
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph: state, tables, cuBLAS workspaces
        opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    for p, g in zip(eager, grads):
        p.grad = g.clone()
    ref.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for value in (0.01, 0.005, 0.0025):
        for g in grads:
            g.copy_(torch.randn_like(g))
        lr.fill_(value)
        graph.replay()
        for p, g in zip(eager, grads):
            p.grad = g.clone()
        ref.param_groups[0]["lr"] = value
        ref.step()
    torch.cuda.synchronize()
    for p, q in zip(params, eager):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-3, atol=2e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_a_whole_training_step_is_captured_in_a_cuda_graph(backend):
    """Forward, backward and Muon's step in one graph (PyTorch's whole-network capture): the gradients
    are allocated in the graph's pool, so the Triton backend builds their chunk tables during the capture
    and keeps them. Replays match eager training step for step."""
    _skip_unless_available(backend)
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = nn.Sequential(nn.Linear(96, 128, bias=False), nn.Tanh(), nn.Linear(128, 64, bias=False)).to(device)
    eager = copy.deepcopy(model)
    lr = torch.tensor(0.02, device=device)
    opt = Muon(model.parameters(), lr=lr, weight_decay=0.01, backend=backend)
    ref = Muon(eager.parameters(), lr=0.02, weight_decay=0.01, backend=backend)
    inputs = torch.randn(32, 96, device=device)
    targets = torch.randn(32, 64, device=device)

    def train_step(net, optimizer):
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(net(inputs), targets).backward()
        optimizer.step()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            train_step(model, opt)
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(3):
        train_step(eager, ref)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        opt.step()
    for _ in range(4):
        inputs.copy_(torch.randn_like(inputs))
        graph.replay()
        ref.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(eager(inputs), targets).backward()
        ref.step()
    torch.cuda.synchronize()
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-3, atol=2e-4)


def test_a_forced_backend_that_cannot_run_a_bucket_is_refused_before_any_write():
    """backend="triton" in the interpreter takes float32 but not float64 storage: the float64 group's
    momentum stack is refused while planning, before the float32 group (listed first) has stepped."""
    if not backends.available()["triton"].available:
        pytest.skip(backends.available()["triton"].reason)
    first = torch.randn(6, 4, requires_grad=True)
    wide = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    opt = Muon(
        [
            {"params": [first], "use_muon": True, "backend": "triton", "ns_dtype": torch.float32},
            {"params": [wide], "use_muon": True, "backend": "triton", "ns_dtype": torch.float32},
        ]
    )
    _grads([first, wide])
    before = [first.detach().clone(), wide.detach().clone()]
    with pytest.raises(backends.BackendUnavailableError, match="triton"):
        opt.step()
    assert torch.equal(first.detach(), before[0]) and torch.equal(wide.detach(), before[1])
    assert all(len(entry) == 0 for entry in opt.state.values())

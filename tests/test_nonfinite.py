"""skip_nonfinite=True: a step with a non-finite gradient changes nothing, decided on the device."""

from __future__ import annotations

import copy

import pytest
import torch

from fastoptim import Muon, NorMuon

SHAPES = [(6, 10), (6, 10), (3, 4, 5), (7,)]


def _grads(params, seed, poison=None):
    g = torch.Generator().manual_seed(seed)
    for i, p in enumerate(params):
        p.grad = torch.randn(p.shape, generator=g)
        if i == poison:
            p.grad.view(-1)[1] = float("nan")


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()["state"])


@pytest.mark.parametrize("cls", [Muon, NorMuon])
@pytest.mark.parametrize("poison", [0, 2, 3])  # a matrix, an expert bank, an AdamW vector
def test_a_nonfinite_step_changes_nothing_and_training_goes_on(cls, poison):
    params = [torch.randn(s, requires_grad=True) for s in SHAPES]
    clean = [p.detach().clone().requires_grad_() for p in params]
    opt = cls(params, ns_dtype=torch.float32, skip_nonfinite=True, weight_decay=0.1)
    ref = cls(clean, ns_dtype=torch.float32, weight_decay=0.1)
    _grads(params, 0)
    _grads(clean, 0)
    opt.step()
    ref.step()
    before, state = _snapshot(opt, params)
    _grads(params, 1, poison=poison)
    opt.step()  # skipped
    after, state_after = _snapshot(opt, params)
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    for i, entry in state.items():
        for key, value in entry.items():
            assert torch.equal(value, state_after[i][key]), (i, key)
    _grads(params, 2)
    _grads(clean, 2)
    opt.step()
    ref.step()
    for p, q in zip(params, clean):
        assert torch.equal(p.detach(), q.detach())  # as if the bad step had never come


def test_a_first_step_that_is_skipped_leaves_zero_state():
    params = [torch.randn(s, requires_grad=True) for s in SHAPES]
    start = [p.detach().clone() for p in params]
    opt = NorMuon(params, skip_nonfinite=True)
    _grads(params, 0, poison=1)
    opt.step()
    assert all(torch.equal(p.detach(), s) for p, s in zip(params, start))
    for entry in opt.state.values():
        assert all(not torch.count_nonzero(v) for v in entry.values())


def test_skip_nonfinite_reads_no_tensor_value_on_the_host(monkeypatch):
    # Matrices only: torch's CPU AdamW reads its (host) step counters itself.
    params = [torch.randn(s, requires_grad=True) for s in SHAPES[:3]]
    opt = Muon(params, skip_nonfinite=True)
    _grads(params, 0, poison=0)

    def forbidden(*args, **kwargs):
        raise AssertionError("host read of a tensor value inside step()")

    for method in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, method, forbidden)
    opt.step()


def test_works_beside_torch_grad_scaler():
    """GradScaler skips non-finite steps itself; with skip_nonfinite as well nothing breaks."""
    params = [torch.randn(s, requires_grad=True) for s in SHAPES]
    opt = Muon(params, skip_nonfinite=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    start = [p.detach().clone() for p in params]
    loss = sum((p**2).sum() for p in params) * float("inf")
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p.detach(), s) for p, s in zip(params, start))
    opt.zero_grad()
    scaler.scale(sum((p**2).sum() for p in params)).backward()
    scaler.step(opt)
    scaler.update()
    assert not all(torch.equal(p.detach(), s) for p, s in zip(params, start))


def test_skip_nonfinite_must_be_a_bool():
    with pytest.raises(TypeError, match="skip_nonfinite"):
        Muon([torch.randn(3, 3, requires_grad=True)], skip_nonfinite=1)

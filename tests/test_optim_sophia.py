"""SophiaG and SophiaH against the official formulas, in float64."""

from __future__ import annotations

import pytest
import torch

from fastoptim import SophiaG, SophiaH, sophia_sampled_loss


class OfficialSophiaG:
    """The update of the official sophia.py (Liu et al.), one parameter at a time."""

    def __init__(self, params, lr, betas, rho, wd, bs):
        self.params, self.lr, self.betas, self.rho, self.wd, self.bs = params, lr, betas, rho, wd, bs
        self.m = [torch.zeros_like(p) for p in params]
        self.h = [torch.zeros_like(p) for p in params]

    def update_hessian(self, grads):
        for h, g in zip(self.h, grads):
            h.mul_(self.betas[1]).addcmul_(g, g, value=1 - self.betas[1])

    def step(self, grads, bs=None):
        bs = self.bs if bs is None else bs
        for p, g, m, h in zip(self.params, grads, self.m, self.h):
            p.mul_(1 - self.lr * self.wd)
            m.mul_(self.betas[0]).add_(g, alpha=1 - self.betas[0])
            ratio = (m.abs() / (self.rho * bs * h + 1e-15)).clamp(None, 1)
            p.addcmul_(m.sign(), ratio, value=-self.lr)


SHAPES = [(7, 5), (13,), (2, 3, 4), ()]


def test_sophia_g_matches_official():
    params = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in SHAPES]
    ref = OfficialSophiaG([p.detach().clone() for p in params], 0.01, (0.9, 0.95), 0.05, 0.1, 64)
    opt = SophiaG(params, lr=0.01, betas=(0.9, 0.95), rho=0.05, weight_decay=0.1, bs=64)
    for step in range(6):
        if step % 2 == 0:
            hgrads = [torch.randn_like(p) for p in params]
            for p, g in zip(params, hgrads):
                p.grad = g.clone()
            opt.update_hessian()
            ref.update_hessian(hgrads)
            for p, h in zip(params, ref.h):
                assert torch.equal(opt.state[p]["hessian"], h)  # same arithmetic, bit for bit
        grads = [torch.randn_like(p) * 0.05 for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        bs = 32 if step == 5 else None
        opt.step(bs=bs)
        ref.step(grads, bs=bs)
    for p, r in zip(params, ref.params):
        torch.testing.assert_close(p.detach(), r, atol=1e-12, rtol=1e-12)
    assert set(opt.state[params[0]]) == {"exp_avg", "hessian"}


def test_sophia_h_hutchinson_is_exact_on_a_diagonal_quadratic():
    # loss = ½ Σ a·p², so H = diag(a) and u ⊙ (H u) = a for every Rademacher u.
    a = torch.rand(5, 4, dtype=torch.float64) + 0.5
    p = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    opt = SophiaH([p], lr=0.01, betas=(0.9, 0.8), rho=0.5, weight_decay=0.0, update_period=3)
    m = torch.zeros_like(a)
    h = torch.zeros_like(a)
    expected = p.detach().clone()
    for step in range(5):
        loss = opt.step(lambda: 0.5 * (a * p * p).sum())
        torch.testing.assert_close(loss.detach(), 0.5 * (a * expected * expected).sum())
        g = a * expected
        if step % 3 == 0:  # refresh at steps 0 and 3
            h = 0.8 * h + 0.2 * a
        m = 0.9 * m + 0.1 * g
        expected = expected - 0.01 * (m / torch.clamp(0.5 * h, min=1e-15)).clamp(-1, 1)
        torch.testing.assert_close(opt.state[p]["hessian"], h, atol=1e-14, rtol=1e-14)
        torch.testing.assert_close(p.grad, g, atol=1e-14, rtol=1e-14)
    torch.testing.assert_close(p.detach(), expected, atol=1e-12, rtol=1e-12)
    assert opt.param_groups[0]["hessian_step"] == 5


def test_sophia_h_off_diagonal_hessian_is_unbiased():
    # loss = ½ pᵀ A p with a dense symmetric A: E[u ⊙ (A u)] = diag(A).
    n = 6
    B = torch.randn(n, n, dtype=torch.float64)
    A = B @ B.T
    p = torch.randn(n, dtype=torch.float64, requires_grad=True)
    total = torch.zeros(n, dtype=torch.float64)
    trials = 400
    for _ in range(trials):
        opt = SophiaH([p], lr=0.0, betas=(0.9, 0.0), update_period=1)
        opt.step(lambda: 0.5 * p @ A @ p)
        total += opt.state[p]["hessian"]
    mean = total / trials
    assert (mean - A.diagonal()).abs().max() < 0.25 * A.abs().max()


def test_sophia_h_without_closure_and_linear_terms():
    w = torch.randn(3, 3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)  # enters linearly: its gradient has no graph, H = 0
    unused = torch.randn(2, requires_grad=True)
    opt = SophiaH([w, b, unused], lr=0.1)
    x = torch.randn(8, 3)
    opt.step(lambda: ((x @ w) ** 2).sum() + b.sum())
    assert unused.grad is None and "hessian" not in opt.state[unused]
    assert torch.equal(opt.state[b]["hessian"], torch.zeros(3))
    assert (opt.state[w]["hessian"] != 0).any()
    before = w.detach().clone()
    opt.step()  # existing grads, no refresh
    assert not torch.equal(before, w)



@pytest.mark.parametrize(
    "closure, error, match",
    [
        (lambda w: None, TypeError, "closure must return the loss.*got NoneType"),
        (lambda w: (w.detach() ** 2).sum(), TypeError, "without grad"),
        (lambda w: (w**2).sum(0), TypeError, r"shape \(3,\)"),
        (lambda w: torch.ones((), requires_grad=True) * 2, RuntimeError, "does not depend on any parameter"),
    ],
)
def test_sophia_h_bad_closure_is_refused_before_anything_changes(closure, error, match):
    w = torch.randn(3, 3, requires_grad=True)
    opt = SophiaH([w], lr=0.1)
    opt.step(lambda: (w**2).sum())  # state exists
    before, state = w.detach().clone(), {k: v.clone() for k, v in opt.state[w].items()}
    grad = w.grad.clone()
    with pytest.raises(error, match=match):
        opt.step(lambda: closure(w))
    assert torch.equal(w, before) and torch.equal(w.grad, grad)
    assert all(torch.equal(opt.state[w][k], v) for k, v in state.items())
    assert opt.param_groups[0]["hessian_step"] == 1

def test_sampled_loss_gradient_and_labels():
    torch.manual_seed(1)
    logits = torch.randn(4, 7, 11, requires_grad=True)
    loss = sophia_sampled_loss(logits)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    # d loss / d logits = (softmax - onehot(label)) / N: each row sums to 0.
    torch.testing.assert_close(logits.grad.sum(-1), torch.zeros(4, 7), atol=1e-6, rtol=0)
    # Labels follow the model's distribution: a peaked softmax almost always yields its mode.
    peaked = torch.full((2000, 3), -20.0)
    peaked[:, 1] = 20.0
    peaked.requires_grad_()
    sophia_sampled_loss(peaked).backward()
    assert (peaked.grad[:, 1].abs() < 1e-6).all()
    with pytest.raises(TypeError, match="logits"):
        sophia_sampled_loss(torch.ones(3, dtype=torch.long))


def test_sophia_g_with_sampled_loss_trains_a_classifier():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    x = torch.randn(256, 10)
    y = (x[:, :4]).argmax(-1)
    opt = SophiaG(model.parameters(), lr=3e-3, rho=0.05, weight_decay=0.0, bs=256)
    first = None
    for it in range(150):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it % 10 == 9:
            opt.zero_grad()
            sophia_sampled_loss(model(x)).backward()
            opt.update_hessian()
    assert loss.item() < 0.5 * first

"""QK-clip (MuonClip) on the compare model, against a float64 hand computation of every head's max logit."""

from __future__ import annotations

import math

import pytest
import torch

import fastoptim
from fastoptim import QKClip
from fastoptim.compare.model import GPT, GPTConfig, language_model_loss

C, H = 32, 4
D = C // H


def _model(n_layer: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=n_layer, n_head=H, n_embd=C))
    with torch.no_grad():  # large query/key weights: logits well above a small tau in some heads
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * C].mul_(torch.linspace(2.0, 30.0, 2 * C)[:, None])
    return model


def _attention_inputs(model: GPT, idx: torch.Tensor) -> list[torch.Tensor]:
    """Each attention layer's input x (after its norm), captured by a forward pre-hook."""
    inputs: list[torch.Tensor] = []
    handles = [b.attn.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone()))
               for b in model.blocks]
    with torch.no_grad():
        model(idx)
    for h in handles:
        h.remove()
    return inputs


def _hand_max_logits(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per head: max over batch and j <= i of (x_i W_q,hᵀ)·(x_j W_k,hᵀ)/√d, in float64 with explicit loops."""
    w = weight.detach().double()
    x = x.double()
    out = torch.full((H,), -math.inf, dtype=torch.float64)
    for h in range(H):
        q = x @ w[h * D : (h + 1) * D].T
        k = x @ w[C + h * D : C + (h + 1) * D].T
        for b in range(x.shape[0]):
            for i in range(x.shape[1]):
                for j in range(i + 1):
                    out[h] = max(out[h], float(q[b, i] @ k[b, j]) / math.sqrt(D))
    return out


def test_recorded_max_logits_match_the_hand_computation():
    model = _model(n_layer=2)
    idx = torch.randint(0, 50, (3, 9))
    inputs = _attention_inputs(model, idx)
    clip = QKClip.for_gpt(model, tau=1e9)
    assert all(torch.isneginf(m).all() for m in clip.max_logits)
    with torch.no_grad():
        model(idx)
    for block, x, recorded in zip(model.blocks, inputs, clip.max_logits):
        assert recorded.device == block.attn.qkv.weight.device and recorded.dtype == torch.float32
        torch.testing.assert_close(recorded.double(), _hand_max_logits(block.attn.qkv.weight, x), rtol=1e-5, atol=1e-4)


def test_clip_caps_every_head_at_tau_and_leaves_the_others_bit_for_bit():
    model = _model(n_layer=2)
    idx = torch.randint(0, 50, (2, 12))
    inputs = _attention_inputs(model, idx)
    before = [_hand_max_logits(b.attn.qkv.weight, x) for b, x in zip(model.blocks, inputs)]
    everything = sorted(torch.cat(before).tolist())
    tau = everything[len(everything) // 2]  # half the heads above tau, half at or below
    weights_before = [b.attn.qkv.weight.detach().clone() for b in model.blocks]
    others_before = {n: p.detach().clone() for n, p in model.named_parameters() if "qkv" not in n}
    clip = QKClip.for_gpt(model, tau=tau)
    with torch.no_grad():
        model(idx)
    gammas = clip.clip_()
    assert all(torch.isneginf(m).all() for m in clip.max_logits)  # reset
    clipped_heads = 0
    for block, x, old_max, w0, gamma in zip(model.blocks, inputs, before, weights_before, gammas):
        w = block.attn.qkv.weight.detach()
        after = _hand_max_logits(w, x)  # the same layer input, the clipped weights
        assert (after <= tau * (1 + 1e-5)).all()
        for h in range(H):
            rows = [slice(h * D, (h + 1) * D), slice(C + h * D, C + (h + 1) * D)]
            if old_max[h] > tau * (1 + 1e-6):
                clipped_heads += 1
                assert after[h] == pytest.approx(tau, rel=1e-5)
                torch.testing.assert_close(gamma[h].double(), tau / old_max[h], rtol=1e-5, atol=0)
                for r in rows:
                    torch.testing.assert_close(w[r], w0[r] * math.sqrt(tau / old_max[h]), rtol=1e-5, atol=0)
            elif old_max[h] <= tau * (1 - 1e-6):
                assert gamma[h] == 1.0
                for r in rows:
                    assert torch.equal(w[r], w0[r])  # untouched, bit for bit
        assert torch.equal(w[2 * C :], w0[2 * C :])  # values are never touched
    assert clipped_heads >= 2
    for n, p in model.named_parameters():
        if "qkv" not in n:
            assert torch.equal(p.detach(), others_before[n])


def test_one_layer_model_forward_after_clipping_stays_below_tau():
    """End to end through the hook: after clip_, the next forward on the same batch records maxima <= tau."""
    model = _model(n_layer=1)
    clip = QKClip.for_gpt(model, tau=5.0)
    idx = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        model(idx)
    first = clip.max_logits[0].clone()
    assert (first > 5.0).any()
    clip.clip_()
    with torch.no_grad():
        model(idx)
    second = clip.max_logits[0]
    assert (second <= 5.0 * (1 + 1e-5)).all()
    below = first <= 5.0
    torch.testing.assert_close(second[below], first[below], rtol=0, atol=0)


def test_training_with_muon_then_clip():
    """The helper's place in a training step: forward (records, also across micro-batches), backward,
    optimizer.step(), clip_(); the recorded maximum of two micro-batches is the larger of the two."""
    model = _model(n_layer=2)
    clip = QKClip.for_gpt(model, tau=8.0)
    optimizer = fastoptim.Muon(fastoptim.param_groups(model), lr=0.02)
    idx = torch.randint(0, 50, (4, 16))
    singles = []
    for micro in (idx[:2], idx[2:]):
        with torch.no_grad():
            model(micro)
        singles.append(torch.stack(clip.max_logits))
        clip.reset()
    assert not torch.equal(singles[0], singles[1])
    for micro in (idx[:2], idx[2:]):
        logits = model(micro)
        language_model_loss(logits[:, :-1], micro[:, 1:]).backward()
    torch.testing.assert_close(torch.stack(clip.max_logits), torch.maximum(*singles), rtol=0, atol=0)
    optimizer.step()
    clip.clip_()
    with torch.no_grad():
        model(idx[:, :1])  # one token: the logit is q_0·k_0, well defined
    assert all(torch.isfinite(m).all() for m in clip.max_logits)


def test_conv1d_orientation_and_biases():
    """A GPT-2-style fused (in, 3C) weight with biases (dim=1): clipping scales the head's columns and bias
    entries, and the logits of that head on the same input shrink by gamma exactly."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(C, 3 * C, generator=g) * 3
    bias = torch.randn(3 * C, generator=g)
    clip = QKClip(tau=4.0)
    record = clip.add_layer(weight[:, :C], weight[:, C : 2 * C], H, dim=1, query_bias=bias[:C],
                            key_bias=bias[C : 2 * C], causal=False)
    x = torch.randn(2, 5, C, generator=g)

    def qk(w, b):
        out = x @ w + b
        q, k = out[..., :C], out[..., C : 2 * C]
        return (t.view(2, 5, H, D).transpose(1, 2) for t in (q, k))

    q, k = qk(weight, bias)
    record(q, k)
    logits_before = (q @ k.mT) / math.sqrt(D)
    torch.testing.assert_close(clip.max_logits[0], logits_before.amax(dim=(0, 2, 3)))
    w0, b0 = weight.clone(), bias.clone()
    (gamma,) = clip.clip_()
    q, k = qk(weight, bias)
    logits_after = (q @ k.mT) / math.sqrt(D)
    torch.testing.assert_close(logits_after, logits_before * gamma.view(1, H, 1, 1), rtol=1e-5, atol=1e-5)
    assert (logits_after.amax(dim=(0, 2, 3)) <= 4.0 * (1 + 1e-5)).all()
    assert (gamma < 1).any()
    assert torch.equal(weight[:, 2 * C :], w0[:, 2 * C :]) and torch.equal(bias[2 * C :], b0[2 * C :])


def test_bad_input_is_refused_naming_the_argument():
    weight = torch.randn(3 * C, C)
    for tau in (0.0, -1.0, math.inf, math.nan, True, "1"):
        with pytest.raises(ValueError, match="tau"):
            QKClip(tau)
    clip = QKClip(1.0)
    with pytest.raises(ValueError, match="n_head"):
        clip.add_layer(weight[:C], weight[C : 2 * C], 5)
    with pytest.raises(ValueError, match="query and key"):
        clip.add_layer(weight[:C], weight[C : 2 * C - 1], H)
    with pytest.raises(ValueError, match="query_bias"):
        clip.add_layer(weight[:C], weight[C : 2 * C], H, query_bias=torch.zeros(C + 1))
    with pytest.raises(TypeError, match="query"):
        clip.add_layer(torch.zeros(C, C, dtype=torch.int64), weight[:C], H)
    with pytest.raises(TypeError, match="GPT"):
        QKClip.for_gpt(torch.nn.Linear(2, 2))
    assert clip.layers == []
    record = clip.add_layer(weight[:C], weight[C : 2 * C], H)
    with pytest.raises(ValueError, match=r"q must be \(batch, 4, time, 8\)"):
        record(torch.zeros(2, 3, 5, D), torch.zeros(2, H, 5, D))
    assert torch.isneginf(clip.max_logits[0]).all()

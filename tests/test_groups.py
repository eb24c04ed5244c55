"""param_groups on transformers models (GPT-2's Conv1D, tied heads) and the engine's "transposed" matrix view.

A weight stored (in, out) — transformers' Conv1D, y = x W + b — is the layer matrix Wᵀ. Its step must be the
step of an nn.Linear holding Wᵀ, transposed back: the shape scale reads (out, in) and NorMuon's row
statistics are per output neuron. Checked against the Linear path (same optimizer), against float64 math
written out here, and on a real (tiny, offline) transformers GPT-2.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import fastoptim
from fastoptim import Muon, NorMuon, reference
from fastoptim.optim import shape_scale

transformers = pytest.importorskip("transformers", reason="the [test] extra installs transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB = 64


def tiny_gpt2(tie: bool = True) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=24, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
        tie_word_embeddings=tie,
    )
    return GPT2LMHeadModel(config)


def _names(model: nn.Module, params) -> set[str]:
    by_id = {id(p): name for name, p in model.named_parameters()}
    return {by_id[id(p)] for p in params}


# --------------------------------------------------------------------------------------------------
# Routing


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_gpt2_routing(tie):
    model = tiny_gpt2(tie)
    assert (model.lm_head.weight is model.transformer.wte.weight) == tie
    groups = fastoptim.param_groups(model, lr=0.03)
    by_view = {g.get("matrix_view"): g for g in groups}
    assert set(by_view) == {"transposed", None}
    transposed, adamw = by_view["transposed"], by_view[None]
    assert transposed["use_muon"] and transposed["lr"] == 0.03 and not adamw["use_muon"]
    conv1d_weights = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, Conv1D)}
    assert len(conv1d_weights) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    assert _names(model, transposed["params"]) == conv1d_weights
    everything = {name for name, _ in model.named_parameters()}  # a tied head is listed once, as wte.weight
    assert _names(model, adamw["params"]) == everything - conv1d_weights
    assert ("lm_head.weight" in everything) == (not tie)
    listed = [id(p) for g in groups for p in g["params"]]
    assert len(listed) == len(set(listed)) == len(list(model.parameters()))


def test_matrix_view_option_wins_over_conv1d():
    groups = fastoptim.param_groups(tiny_gpt2(), matrix_view="stack")
    assert [g.get("matrix_view") for g in groups] == ["stack", None]


def test_tied_head_of_a_custom_model_goes_to_adamw():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 6)
            self.hidden = nn.Linear(6, 6)
            self.unembed = nn.Linear(6, 10, bias=False)  # not a head name: found by the tie
            self.unembed.weight = self.embed.weight

    model = Tied()
    groups = fastoptim.param_groups(model)
    assert _names(model, groups[0]["params"]) == {"hidden.weight"}
    assert _names(model, groups[1]["params"]) == {"embed.weight", "hidden.bias"}


def test_param_groups_does_not_import_transformers():
    code = (
        "import sys, torch, fastoptim\n"
        "fastoptim.param_groups(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Conv1d(2, 2, 3)))\n"
        "assert not any(name.startswith('transformers') for name in sys.modules), 'transformers imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------------------------------
# The transposed view: the same step as an nn.Linear holding Wᵀ


def _pair(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    stored = torch.randn(shape, generator=g)
    return nn.Parameter(stored.clone()), nn.Parameter(stored.mT.contiguous())


@pytest.mark.parametrize("cls", [Muon, NorMuon])
@pytest.mark.parametrize("shape", [(8, 24), (24, 8), (13, 13), (3, 8, 24)], ids=["wide", "tall", "square", "bank"])
@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_transposed_steps_like_the_linear_of_the_transpose(cls, shape, ns_dtype):
    stored, linear = _pair(shape)
    # "spectral" √(m/n) changes when m and n swap: a step scaled by the stored shape fails here
    kwargs = dict(lr=0.05, weight_decay=0.1, ns_dtype=ns_dtype, scale_mode="spectral")
    opt_t = cls([{"params": [stored], "use_muon": True, "matrix_view": "transposed"}], **kwargs)
    opt_l = cls([{"params": [linear], "use_muon": True}], **kwargs)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        grad = torch.randn(shape, generator=g)
        stored.grad, linear.grad = grad.clone(), grad.mT.contiguous()
        opt_t.step()
        opt_l.step()
    # A non-square matrix takes the same Gram form both ways (the short side's), so bf16 rounds identically and
    # fp32 differs by a matmul's order of sums; a square one takes XXᵀ for W and for Wᵀ, two different products:
    # bf16 then rounds them apart by ~1% of the step (NS(Gᵀ) = NS(G)ᵀ holds in exact arithmetic).
    if ns_dtype == torch.float32:
        atol = 1e-6
    else:
        atol = 0.0 if shape[-1] != shape[-2] else 4e-3
    torch.testing.assert_close(stored.detach(), linear.detach().mT, atol=atol, rtol=0)
    torch.testing.assert_close(opt_t.state[stored]["momentum_buffer"], opt_l.state[linear]["momentum_buffer"].mT)
    if cls is NorMuon:
        moments = opt_t.state[stored]["second_moment"]
        assert moments.shape == (*shape[:-2], shape[-1])  # one per output neuron
        torch.testing.assert_close(moments, opt_l.state[linear]["second_moment"], atol=0, rtol=atol * 10)


def _float64_direction(cls, grad, beta2=0.95, eps=1e-10):
    """The first step's direction (momentum 0.95, Nesterov) of a weight stored (in, out), in float64 from the
    formulas, on the layer matrix (out, in): buf = (1 - β)·Gᵀ, U = lerp(Gᵀ, buf, β), O = NS(U); NorMuon:
    v = (1 - β2)·mean_row(O²), Ô = O/(√v + eps)·‖O‖_F/‖O/(√v + eps)‖_F. Returned in the stored orientation."""
    beta = 0.95
    layer_grad = grad.double().mT
    buf = (1 - beta) * layer_grad
    update = layer_grad + beta * (buf - layer_grad)
    O = reference.newton_schulz(update, compute_dtype=torch.float64)
    if cls is NorMuon:
        v = (1 - beta2) * (O * O).mean(dim=1, keepdim=True)
        normalized = O / (v.sqrt() + eps)
        O = normalized * (torch.linalg.norm(O) / torch.linalg.norm(normalized))
    return O.mT


@pytest.mark.parametrize("cls", [Muon, NorMuon])
@pytest.mark.parametrize("scale_mode", ["original", "match_rms_adamw", "spectral"])
def test_transposed_step_against_float64_math(cls, scale_mode):
    """A (6, 20) stored weight is a (20, 6) layer: its step is -lr·shape_scale(mode, 20, 6)·direction — for
    "original" √(20/6), where the stored shape would give 1."""
    stored, _ = _pair((6, 20))
    start = stored.detach().double()
    opt = cls([{"params": [stored], "use_muon": True, "matrix_view": "transposed"}], lr=0.1,
              ns_dtype=torch.float64, scale_mode=scale_mode)
    stored.grad = torch.randn(6, 20)
    opt.step()
    direction = _float64_direction(cls, stored.grad)
    step = stored.detach().double() - start
    torch.testing.assert_close(step, -0.1 * shape_scale(scale_mode, 20, 6) * direction, atol=1e-6, rtol=0)
    if scale_mode != "match_rms_adamw":  # 0.2·√max(m, n) is the same both ways; the others are not
        stored_shape_step = -0.1 * shape_scale(scale_mode, 6, 20) * direction
        assert (step - stored_shape_step).abs().max() > 1e-3


@pytest.mark.parametrize("cls", [Muon, NorMuon])
def test_gpt2_conv1d_steps_like_linear_holding_the_transpose(cls):
    """Every Conv1D of a real GPT-2 stepped through param_groups equals nn.Linear modules holding Wᵀ stepped
    by the same optimizer (default matrix view), transposed back."""
    model = tiny_gpt2()
    convs = [m for m in model.modules() if isinstance(m, Conv1D)]
    linears = []
    for conv in convs:
        linear = nn.Linear(conv.weight.shape[0], conv.weight.shape[1], bias=False)
        linear.weight.data.copy_(conv.weight.detach().mT)
        linears.append(linear)
    kwargs = dict(lr=0.02, weight_decay=0.01, scale_mode="match_rms_adamw", ns_dtype=torch.float32)
    opt = cls(fastoptim.param_groups(model, **kwargs))
    opt_linear = cls(fastoptim.param_groups(nn.ModuleList(linears), **kwargs))
    idx = torch.randint(0, VOCAB, (2, 12))
    for _ in range(2):
        model(idx, labels=idx).loss.backward()
        for conv, linear in zip(convs, linears):
            linear.weight.grad = conv.weight.grad.mT.contiguous()
        opt.step()
        opt_linear.step()
        opt.zero_grad()
    for conv, linear in zip(convs, linears):
        torch.testing.assert_close(conv.weight.detach(), linear.weight.detach().mT, atol=1e-6, rtol=0)
        if cls is NorMuon:
            assert opt.state[conv.weight]["second_moment"].shape == (conv.nf,)


def test_transposed_forced_backend_and_checkpoint_round_trip():
    """A forced backend goes through the step's precheck of the transposed apply path; state_dict loads back,
    and a second_moment of the stored (in) length is refused, naming the key."""
    stored, _ = _pair((5, 9))
    opt = NorMuon([{"params": [stored], "use_muon": True, "matrix_view": "transposed"}], backend="torch")
    stored.grad = torch.randn(5, 9)
    opt.step()
    saved = opt.state_dict()
    fresh = NorMuon([{"params": [stored], "use_muon": True, "matrix_view": "transposed"}], backend="torch")
    fresh.load_state_dict(saved)
    torch.testing.assert_close(fresh.state[stored]["second_moment"], opt.state[stored]["second_moment"])
    bad = opt.state_dict()
    bad["state"][0]["second_moment"] = torch.zeros(5)
    with pytest.raises(ValueError, match="second_moment"):
        fresh.load_state_dict(bad)


@pytest.mark.triton
def test_transposed_on_the_triton_backend(triton_device):
    """The transposed NorMuon path on Triton kernels (momentum, NS, direction, apply) equals the torch one."""
    results = []
    for backend in ("torch", "triton"):
        stored = nn.Parameter(torch.randn(7, 12, generator=torch.Generator().manual_seed(3), device="cpu")
                              .to(triton_device))
        opt = NorMuon([{"params": [stored], "use_muon": True, "matrix_view": "transposed"}], backend=backend,
                      ns_dtype=torch.float32)
        stored.grad = torch.randn(7, 12, generator=torch.Generator().manual_seed(4)).to(triton_device)
        opt.step()
        results.append((stored.detach().cpu(), opt.state[stored]["second_moment"].cpu()))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-6, rtol=1e-4)


def test_transposed_refuses_split_sizes_before_anything_changes():
    stored, _ = _pair((6, 12))
    with pytest.raises(ValueError, match="matrix_view='transposed' does not take split_sizes"):
        Muon([{"params": [stored], "use_muon": True, "matrix_view": "transposed", "split_sizes": [6, 6]}])
    with pytest.raises(ValueError, match="matrix_view must be one of"):
        Muon([stored], matrix_view="sideways")

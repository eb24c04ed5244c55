"""A whole optimizer step over a GPT-2-small (124M) parameter set: fastoptim's optimizers (auto backend,
and the plain-PyTorch torch backend as the baseline) beside torch.optim.Muon (with AdamW for what it
cannot take) and torch's fused AdamW — the cost everyone already pays.

Hidden matrices (48) go to Muon/NorMuon; embeddings, layer norms and biases to AdamW, as the papers do.
On a CPU-only machine the same structure is built at a tiny width.
"""

from __future__ import annotations

import pytest
import torch

import fastoptim

from benchutil import DEVICE, HAS_CUDA, ns_flops, record, timed

if HAS_CUDA:
    VOCAB, CONTEXT, WIDTH, LAYERS = 50257, 1024, 768, 12
else:
    VOCAB, CONTEXT, WIDTH, LAYERS = 256, 64, 32, 2
# Per layer: attention QKV and output projection, MLP up and down.
LAYER_MATRICES = ((3 * WIDTH, WIDTH), (WIDTH, WIDTH), (4 * WIDTH, WIDTH), (WIDTH, 4 * WIDTH))


def gpt2_parameters() -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(hidden matrices, everything else) with random gradients attached."""
    d = WIDTH
    matrices, others = [], [torch.nn.Parameter(torch.randn(VOCAB, d) * 0.02),
                            torch.nn.Parameter(torch.randn(CONTEXT, d) * 0.01)]
    for _ in range(LAYERS):
        matrices += [torch.nn.Parameter(torch.randn(shape) * 0.02) for shape in LAYER_MATRICES]
        others += [torch.nn.Parameter(torch.ones(d)) for _ in range(4)]  # two layer norms, weight and bias
        others += [torch.nn.Parameter(torch.zeros(n)) for n in (3 * d, d, 4 * d, d)]  # linear biases
    others += [torch.nn.Parameter(torch.ones(d)), torch.nn.Parameter(torch.zeros(d))]  # final layer norm
    for p in matrices + others:
        p.data = p.data.to(DEVICE)
        p.grad = torch.randn_like(p) * 1e-3
    return matrices, others


def build(name: str):
    matrices, others = gpt2_parameters()
    groups = [{"params": matrices}, {"params": others, "use_muon": False}]
    ns_dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    if name == "fastoptim.Muon":
        return [fastoptim.Muon(groups, ns_dtype=ns_dtype)]
    if name == "fastoptim.Muon[torch backend]":
        return [fastoptim.Muon(groups, ns_dtype=ns_dtype, backend="torch")]
    if name == "fastoptim.NorMuon":
        return [fastoptim.NorMuon(groups, ns_dtype=ns_dtype)]
    if name == "fastoptim.SophiaG":
        return [fastoptim.SophiaG(matrices + others)]
    if name == "torch.optim.Muon+AdamW":
        return [torch.optim.Muon(matrices, lr=0.02), torch.optim.AdamW(others, lr=3e-4, fused=HAS_CUDA)]
    return [torch.optim.AdamW(matrices + others, lr=3e-4, fused=HAS_CUDA, foreach=not HAS_CUDA)]


IMPLEMENTATIONS = ["fastoptim.Muon", "fastoptim.Muon[torch backend]", "fastoptim.NorMuon", "fastoptim.SophiaG",
                   "torch.optim.AdamW"]
if hasattr(torch.optim, "Muon"):
    IMPLEMENTATIONS.append("torch.optim.Muon+AdamW")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_optimizer_step_gpt2_small(benchmark, ceilings, impl):
    optimizers = build(impl)

    def step():
        for optimizer in optimizers:
            optimizer.step()

    step()  # state allocated outside the timed region
    benchmark.group = f"optimizer step gpt2-small ({LAYERS} layers, width {WIDTH})"
    benchmark(timed(step))
    state_bytes = sum(t.numel() * t.element_size() for o in optimizers for s in o.state.values()
                      for t in s.values() if isinstance(t, torch.Tensor))
    record(benchmark, ceilings, impl="fastoptim-torch" if impl.endswith("[torch backend]") else impl,
           state_mib=state_bytes / 2**20, **step_work(impl, optimizers))


def step_work(impl: str, optimizers) -> dict:
    """What a row's throughput counts. Muon-family steps: the dense Newton–Schulz FLOPs of the hidden matrices
    (5 steps each; the AdamW part and the elementwise work are left out, so the TFLOP/s is a lower bound).
    AdamW and SophiaG (no Hessian refresh in this step): the fewest fp32 bytes the step must move, AdamW reading
    p, g, m, v and writing p, m, v (7 per element), SophiaG reading p, g, m, h and writing p, m (6)."""
    if "Muon" in impl:
        return {"flops": LAYERS * sum(ns_flops(1, m, n) for m, n in LAYER_MATRICES), "work": "Newton–Schulz FLOPs"}
    numel = sum(p.numel() for o in optimizers for group in o.param_groups for p in group["params"])
    per_element = 6 if impl == "fastoptim.SophiaG" else 7
    return {"bytes_moved": numel * 4 * per_element, "work": f"{per_element} fp32 accesses per element"}

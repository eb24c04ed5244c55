"""The command line: ``python -m fastoptim {info,demo,compare,sweep}``."""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Sequence

import torch

import fastoptim
from fastoptim import backends
from fastoptim.compare import cli as compare
from fastoptim.compare import sweep


def _versions() -> list[tuple[str, str]]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    cuda = torch.version.cuda or "none (CPU-only torch build)"
    if torch.cuda.is_available():
        capability = ".".join(map(str, torch.cuda.get_device_capability()))
        device = f"cuda: {torch.cuda.get_device_name()} (compute capability {capability})"
    else:
        cpu = platform.processor() or platform.machine()
        device = f"cpu: {cpu}, {torch.get_num_threads()} threads (no CUDA GPU visible)"
    return [
        ("fastoptim", fastoptim.__version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("triton", triton_version),
        ("CUDA (torch build)", cuda),
        ("device", device),
    ]


def info(_: argparse.Namespace) -> int:
    print("fastoptim environment")
    for key, value in _versions():
        print(f"  {key:<20} {value}")
    print("backends")
    for status in backends.available().values():
        mark = "yes" if status.available else "no "
        print(f"  {status.name:<8} {mark}  {status.reason}")
    return 0


def demo(args: argparse.Namespace) -> int:
    """Orthogonalize a random Gaussian matrix with each schedule and print how orthogonal it came out."""
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    m, n = args.rows, args.cols
    G = torch.randn(m, n, device=device)
    print(f"Newton–Schulz on a {m}x{n} Gaussian matrix ({device}, compute dtype float32)")
    print(f"  {'schedule':<14} {'backend':<8} {'steps':>5} {'min σ':>8} {'max σ':>8} {'‖XXᵀ−I‖_F/√m':>14} {'ms':>8}")
    for schedule in ("jordan", "you", "polar_express"):
        backend = backends.select("newton_schulz", "auto", device)
        start = time.perf_counter()
        X = fastoptim.newton_schulz(G, coefficients=schedule, compute_dtype=torch.float32)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = (time.perf_counter() - start) * 1e3
        sigma = torch.linalg.svdvals(X.double())
        gram = X.double() @ X.double().mT
        error = torch.linalg.matrix_norm(gram - torch.eye(m, dtype=torch.float64, device=device)) / m**0.5
        steps = len(fastoptim.coefficients.resolve(schedule).triples)
        print(
            f"  {schedule:<14} {backend:<8} {steps:>5} {sigma.min().item():>8.3f} {sigma.max().item():>8.3f} "
            f"{error.item():>14.4f} {elapsed:>8.1f}"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastoptim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, and which backends can run here (and why not)").set_defaults(
        func=info
    )
    p_demo = sub.add_parser("demo", help="Newton–Schulz on a random matrix: orthogonality of each schedule")
    p_demo.add_argument("--rows", type=int, default=256)
    p_demo.add_argument("--cols", type=int, default=512)
    p_demo.add_argument("--device", default="cpu")
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.set_defaults(func=demo)
    p_compare = sub.add_parser(
        "compare",
        help="train a small GPT on the bundled corpus with AdamW, Muon, NorMuon and SophiaG",
        description="Train the same byte-level GPT (same init, data order and token budget) on Jane "
        "Austen's novels once per optimizer; print final losses, steps to reach AdamW's validation "
        "loss, tokens/s, ms per optimizer step and optimizer-state memory; write a loss-curve PNG, "
        "JSON and CSV to --out.",
    )
    compare.add_arguments(p_compare)
    p_compare.set_defaults(func=lambda args: compare.run(args, p_compare))
    p_sweep = sub.add_parser(
        "sweep",
        help="tune each optimizer's own knobs for compare on a small grid (coordinate-wise)",
        description="Coordinate-wise search per optimizer over its own knobs (AdamW: lr, beta2, warm-up; "
        "Muon/NorMuon: lr and their AdamW part's lr; SophiaG: lr, rho; all: gradient clipping), on compare's "
        "model and budget; writes sweep.md, sweep.csv and sweep.json to --out. compare's presets come from it.",
    )
    sweep.add_sweep_arguments(p_sweep)
    p_sweep.set_defaults(func=lambda args: compare.run(args, p_sweep, sweep.sweep))
    args = parser.parse_args(argv)
    return args.func(args)

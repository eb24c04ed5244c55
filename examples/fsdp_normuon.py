"""Train a small GPT-style byte model with FSDP2 (``fully_shard``) and NorMuon, under torchrun.

    torchrun --nproc_per_node=2 examples/fsdp_normuon.py --steps 100          # CPU: gloo
    torchrun --nproc_per_node=8 examples/fsdp_normuon.py --n-embd 768 ...     # GPUs: NCCL, one per rank

Nothing distributed is asked of the optimizer: NorMuon sees DTensor parameters sharded by rows and
gathers each matrix at one owner rank for Newton–Schulz (see `fastoptim.distributed`). Hidden matrices
take NorMuon, embeddings, the head and norms AdamW (`fastoptim.param_groups`). The data is synthetic
(each sequence repeats a random byte pattern, which the model learns to continue), so the script needs
no files. Rank 0 prints the loss and the median step time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard

import fastoptim
from fastoptim.compare.model import GPT, GPTConfig


def build_model(args: argparse.Namespace) -> GPT:
    """The byte-level GPT of `python -m fastoptim compare`."""
    config = GPTConfig(
        vocab_size=256, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd
    )
    return GPT(config)


def batch(step: int, rank: int, args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the global batch: sequences that repeat a random pattern of 3..16 bytes."""
    g = torch.Generator().manual_seed(step * 1_000_003 + rank)
    rows = []
    for _ in range(args.batch_size):
        period = int(torch.randint(3, 17, (1,), generator=g))
        pattern = torch.randint(0, 256, (period,), generator=g)
        rows.append(pattern.repeat(args.block_size // period + 2)[: args.block_size + 1])
    tokens = torch.stack(rows).to(device)
    return tokens[:, :-1], tokens[:, 1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per rank")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--adamw-lr", type=float, default=3e-3)
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    torch.manual_seed(0)  # the same initial weights on every rank before sharding
    model = build_model(args).to(device)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    optimizer = fastoptim.NorMuon(
        fastoptim.param_groups(model),
        lr=args.lr,
        adamw_lr=args.adamw_lr,
        ns_dtype=torch.bfloat16 if use_cuda else torch.float32,
    )

    step_times = []
    for step in range(args.steps):
        x, y = batch(step, rank, args, device)
        start = time.perf_counter()
        logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if use_cuda:
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - start)
        if step % 10 == 0 or step == args.steps - 1:
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            if rank == 0:
                print(f"step {step:4d}  loss {mean_loss.item() / world:.4f}", flush=True)

    if rank == 0:
        timed = step_times[min(5, len(step_times) - 1) :]  # past warm-up
        name = torch.cuda.get_device_name(device) if use_cuda else "CPU"
        parameters = sum(p.numel() for p in model.parameters())
        print(
            f"fastoptim.compare.model.GPT, {parameters:,} parameters, {world} rank(s) on {name} "
            f"({dist.get_backend()}), torch {torch.__version__}: median step {statistics.median(timed) * 1e3:.1f} ms",
            flush=True,
        )
    dist.barrier()  # no rank tears down gloo while another still has a collective in flight
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

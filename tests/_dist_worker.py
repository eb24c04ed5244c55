"""One rank of the distributed tests (tests/test_distributed.py starts it as a subprocess).

    python tests/_dist_worker.py RANK WORLD PORT OUT_DIR

Runs every scenario on gloo (CPU) and writes what the tests compare — final full parameters,
optimizer states, error messages — to OUT_DIR/rank{RANK}.pt. The model, data, param groups and
training loop live here so that the single-process reference in the tests runs the same code.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
from torch import nn

import fastoptim
from fastoptim import Muon, NorMuon, SophiaG, SophiaH

STEPS = 4
GLOBAL_BATCH = 8

# FSDP2 on CPU (gloo): torch 2.6 cannot run it at all (its FSDP2 records CUDA stream events), and
# torch 2.7-2.8 sum the gradients over gloo instead of averaging them (measured: exactly 2x on 2 ranks;
# Muon, NorMuon and AdamW do not notice, being scale-invariant; SophiaG does). Fine from 2.9 on.
FSDP2_ON_GLOO = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 9)
FSDP2_ON_GLOO_REASON = (
    f"torch {torch.__version__}'s FSDP2 cannot run on CPU/gloo (2.6) or sums its gradients there instead of "
    "averaging them (2.7-2.8): the FSDP2 scenarios need torch >= 2.9"
)


class Net(nn.Module):
    """Matrices of odd shapes: a conv kernel (5, 3, 3) -> (5, 9), two (16, 16) in one bucket, a 7-row head
    (4 + 3 rows on two ranks), a 1-row gate (no rows at all on the second rank) and an expert bank of 3
    (4, 4) matrices (FSDP2 shards the experts: 2 + 1 on two ranks, 1 + 1 + 1 + 0 on four)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv1d(3, 5, 3, padding=1)
        self.fc1 = nn.Linear(15, 16)
        self.fc2 = nn.Linear(16, 16)
        self.fc3 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 7)
        self.gate = nn.Linear(16, 1)
        self.experts = nn.Parameter(torch.randn(3, 4, 4) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).flatten(1)
        for layer in (self.fc1, self.fc2, self.fc3):
            h = torch.tanh(layer(h))
        moe = torch.einsum("bei,eoi->beo", h.view(-1, 4, 4)[:, :3], self.experts).flatten(1)
        return self.head(h) + self.gate(h) + moe[:, :7]


class MLP(nn.Module):
    """For tensor parallelism: fc1 column-parallel (weight Shard(0)), fc2 row-parallel (weight Shard(1))."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(9, 16)
        self.fc2 = nn.Linear(16, 12)
        self.head = nn.Linear(12, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x.flatten(1))))))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 3, 3, generator=g), torch.randn(GLOBAL_BATCH, 7, generator=g)


def groups(model: nn.Module, split_head: bool = True) -> list[dict]:
    """Split-head blocks are supported with plain tensors and 1-D Shard(0); HSDP runs without them."""
    named = dict(model.named_parameters())
    if not isinstance(model, Net):  # the tensor-parallel MLP
        matrices = [(k, v) for k, v in named.items() if v.dim() >= 2]
        return [
            {"params": matrices, "use_muon": True},
            {"params": [(k, v) for k, v in named.items() if v.dim() < 2], "use_muon": False},
        ]
    matrices = ["fc1.weight", "fc2.weight", "fc3.weight", "gate.weight", "experts"]
    return [
        {"params": [("conv.weight", named["conv.weight"])], "use_muon": True, "matrix_view": "flatten"},
        {"params": [(k, named[k]) for k in matrices], "use_muon": True},
        {"params": [("head.weight", named["head.weight"])], "use_muon": True,
         "split_sizes": [3, 4] if split_head else None},
        {"params": [(k, v) for k, v in named.items() if k.endswith("bias")], "use_muon": False},
    ]


def make_optimizer(name: str, model: nn.Module, split_head: bool = True) -> torch.optim.Optimizer:
    """muon, normuon: float32 Newton–Schulz; muon_bf16, normuon_bf16: the default bfloat16 ns_dtype."""
    base, _, precision = name.partition("_")
    ns_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    common = dict(lr=0.02, ns_dtype=ns_dtype, weight_decay=0.1, adamw_lr=1e-2, adamw_weight_decay=0.01)
    if base == "muon":
        return Muon(groups(model, split_head), cautious_weight_decay=True, **common)
    if base == "normuon":
        return NorMuon(groups(model, split_head), **common)
    if name == "sophia":
        return SophiaG(model.parameters(), lr=1e-2, rho=0.05, bs=GLOBAL_BATCH)
    if name == "sophiah":  # refreshes on steps 0 and 2
        return SophiaH(model.parameters(), lr=1e-2, rho=0.05, update_period=2)
    raise ValueError(name)


def train(model: nn.Module, opt, name: str, steps: int, start: int = 0, rank: int = 0, world: int = 1) -> None:
    """The same global batch every run; each rank takes its contiguous share."""
    per_rank = GLOBAL_BATCH // world
    for step in range(start, start + steps):
        x, y = batch(step)
        x, y = x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]
        opt.zero_grad()
        if name == "sophiah":  # differentiates the closure's loss itself (twice on refresh steps)
            opt.step(lambda x=x, y=y: ((model(x) - y) ** 2).mean())
            continue
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        if name == "sophia" and step % 2 == 0:  # a Hessian refresh from the same loss's g⊙g
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.update_hessian()


# --------------------------------------------------------------------------------------------------
# Scenarios (rank side)


def _full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in model.named_parameters()}


def _fsdp_net(seed: int = 0) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    net = Net(seed)
    for module in (net.conv, net.fc1, net.fc2, net.fc3, net.head, net.gate):  # experts: the root's
        fully_shard(module)
    fully_shard(net)
    return net


def run_ddp(name: str, rank: int, world: int, results: dict) -> None:
    from torch.nn.parallel import DistributedDataParallel

    net = Net()
    model = DistributedDataParallel(net)
    opt = make_optimizer(name, net)
    train(model, opt, name, STEPS, rank=rank, world=world)
    results[f"ddp_{name}"] = _full_params(net)
    results[f"ddp_{name}_state"] = opt.state_dict()


def run_fsdp(name: str, rank: int, world: int, results: dict) -> None:
    model = _fsdp_net()
    opt = make_optimizer(name, model)
    train(model, opt, name, STEPS, rank=rank, world=world)
    results[f"fsdp_{name}"] = _full_params(model)
    if name == "normuon":
        named = dict(model.named_parameters())
        second_moment = opt.state[named["head.weight"]]["second_moment"]
        results["fsdp_normuon_head_second_moment"] = second_moment.full_tensor()
        results["fsdp_normuon_head_second_moment_placements"] = list(second_moment.placements)
        results["fsdp_normuon_experts_second_moment"] = opt.state[named["experts"]]["second_moment"].full_tensor()


def run_checkpoint(name: str, rank: int, world: int, out_dir: str, results: dict) -> None:
    """Save after 2 steps with torch.distributed.checkpoint, resume in a fresh model and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = os.path.join(out_dir, f"checkpoint_{name}")
    model = _fsdp_net()
    opt = make_optimizer(name, model)
    train(model, opt, name, 2, rank=rank, world=world)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
    del model, opt

    model = _fsdp_net(seed=1)  # different weights: the checkpoint must bring everything back
    opt = make_optimizer(name, model)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    train(model, opt, name, STEPS - 2, start=2, rank=rank, world=world)
    results[f"checkpoint_{name}"] = _full_params(model)


class Bf16Linear(nn.Module):
    """A bfloat16 weight in a float32 model (FSDP2 unshards it inside this module's forward)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter((torch.randn(features, features) / features**0.5).to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.float())


class ReshardNet(nn.Module):
    """For resharded resume: a bfloat16 matrix, an expert bank, and a layer that gets no gradient before
    the checkpoint (`late`, used from step 2 on)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(9, 16)
        self.low = Bf16Linear(16)
        self.late = nn.Linear(16, 7, bias=False)
        self.head = nn.Linear(16, 7)
        self.experts = nn.Parameter(torch.randn(4, 4, 4) * 0.5)
        self.use_late = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(x.flatten(1)))
        h = torch.tanh(self.low(h))
        out = self.head(h) + torch.einsum("bei,eoi->beo", h.view(-1, 4, 4), self.experts).flatten(1)[:, :7]
        return out + self.late(h) if self.use_late else out


RESHARD_SAVE_AT = 2


def reshard_model(fsdp: bool, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    net = ReshardNet(seed)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for module in (net.fc1, net.low, net.late, net.head):
            fully_shard(module)
        fully_shard(net)
    named = dict(net.named_parameters())
    opt = NorMuon(
        [
            {"params": [(k, v) for k, v in named.items() if v.dim() >= 2], "use_muon": True},
            {"params": [(k, v) for k, v in named.items() if v.dim() < 2], "use_muon": False},
        ],
        lr=0.02,
        weight_decay=0.1,
        adamw_lr=1e-2,
    )
    return net, opt


def train_reshard(model: nn.Module, opt, start: int, stop: int) -> None:
    """Every rank takes the whole batch: FSDP2 then averages identical gradients, which is exact (also in
    bfloat16, where splitting the batch would round the reduced gradient of the bf16 matrix differently
    from one process), so resumed runs must equal one process to optimizer rounding alone."""
    for step in range(start, stop):
        model.use_late = step >= RESHARD_SAVE_AT
        x, y = batch(step)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def save_checkpoint(model: nn.Module, opt, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)


def load_checkpoint(model: nn.Module, opt, path: str) -> None:
    """Into any layout (the state is keyed by parameter name); the `late` layer has no state saved."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])


def run_reshard(rank: int, world: int, shared: str, results: dict) -> None:
    """Resume at this world size from checkpoints saved in one process and (at 4 ranks) at 2 ranks; at 2
    and 4 ranks, save one for the others."""
    for source in ("from1", "from2") if world == 4 else ("from1",):
        model, opt = reshard_model(fsdp=True, seed=1)  # other weights: the checkpoint brings everything back
        load_checkpoint(model, opt, os.path.join(shared, source))
        train_reshard(model, opt, RESHARD_SAVE_AT, STEPS)
        results[f"reshard_{source}"] = _full_params(model)
    model, opt = reshard_model(fsdp=True)
    train_reshard(model, opt, 0, RESHARD_SAVE_AT)
    save_checkpoint(model, opt, os.path.join(shared, f"from{world}"))
    train_reshard(model, opt, RESHARD_SAVE_AT, STEPS)
    results["reshard_uninterrupted"] = _full_params(model)


def run_placements(world: int, results: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    by_columns = nn.Parameter(distribute_tensor(torch.randn(6, 4), mesh, [Shard(1)]))
    partial = nn.Parameter(DTensor.from_local(torch.randn(6, 4), mesh, [Partial()], run_check=False))
    bank_inside = nn.Parameter(distribute_tensor(torch.randn(2, 6, 4), mesh, [Shard(1)]))
    for key, make in {
        "error_named_partial": lambda: Muon([("blocks.0.attn.weight", partial)]),
        "error_split_columns": lambda: NorMuon([{"params": [by_columns], "split_sizes": [3, 3]}]),
        "error_bank_inside": lambda: Muon([bank_inside]),
    }.items():
        try:
            make()
            results[key] = None
        except ValueError as e:
            results[key] = str(e)
    try:
        SophiaH(_fsdp_net().named_parameters())
        results["error_sophiah_fsdp2"] = None
    except ValueError as e:
        results["error_sophiah_fsdp2"] = str(e)
    NorMuon([{"params": [partial], "use_muon": False}])  # elementwise AdamW takes any placement
    results["adamw_partial_accepted"] = True


def run_skip_nonfinite(rank: int, world: int, results: dict) -> None:
    """FSDP2: a NaN in rank 0's gradient shard only; with skip_nonfinite every rank skips the step."""
    model = _fsdp_net()
    opt = NorMuon(groups(model), ns_dtype=torch.float32, skip_nonfinite=True)
    train(model, opt, "normuon", 1, rank=rank, world=world)
    before = _full_params(model)
    x, y = batch(1)
    share = slice(rank * (GLOBAL_BATCH // world), (rank + 1) * (GLOBAL_BATCH // world))
    opt.zero_grad()
    ((model(x[share]) - y[share]) ** 2).mean().backward()
    if rank == 0:
        dict(model.named_parameters())["fc2.weight"].grad.to_local().view(-1)[0] = float("nan")
    opt.step()
    after = _full_params(model)
    results["skip_nonfinite_unchanged"] = all(torch.equal(before[k], after[k]) for k in before)


MATRIX_OPTIMIZERS = ("muon", "normuon", "muon_bf16", "normuon_bf16")


def run_hsdp(name: str, rank: int, world: int, results: dict) -> None:
    """FSDP2 on a 2-D (replicate, shard) mesh: parameters placed (Replicate(), Shard(0))."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    net = Net()
    for module in (net.conv, net.fc1, net.fc2, net.fc3, net.head, net.gate):
        fully_shard(module, mesh=mesh)
    fully_shard(net, mesh=mesh)
    opt = make_optimizer(name, net, split_head=False)
    train(net, opt, name, STEPS, rank=rank, world=world)
    results[f"hsdp_{name}"] = _full_params(net)
    results["hsdp_placements"] = [str(p.placements) for p in net.parameters()]


def _tp_plan() -> dict:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()}


def run_tp(name: str, rank: int, world: int, results: dict) -> None:
    """Tensor parallel over all ranks: every rank sees the whole batch; fc1 Shard(0), fc2 Shard(1); the
    head is a plain (replicated) tensor."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh("cpu", (world,))
    model = parallelize_module(MLP(), mesh, _tp_plan())
    opt = make_optimizer(name, model)
    train(model, opt, name, STEPS)  # no data split
    results[f"tp_{name}"] = _full_params(model)
    results["tp_placements"] = {k: str(v.placements) for k, v in model.named_parameters() if hasattr(v, "placements")}


def run_fsdp_tp(name: str, rank: int, world: int, results: dict) -> None:
    """FSDP2 over dp x tensor parallel over tp on a (dp, world/dp) mesh (2 x 2 at 4 ranks, 1 x 2 at 2);
    data split over dp."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    dp = 2 if world >= 4 else 1
    mesh = init_device_mesh("cpu", (dp, world // dp), mesh_dim_names=("dp", "tp"))
    model = parallelize_module(MLP(), mesh["tp"], _tp_plan())
    for module in (model.fc1, model.fc2, model.head):
        fully_shard(module, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    opt = make_optimizer(name, model)
    train(model, opt, name, STEPS, rank=mesh.get_local_rank("dp"), world=dp)
    results[f"fsdp_tp_{name}"] = _full_params(model)
    results["fsdp_tp_placements"] = {k: str(v.placements) for k, v in model.named_parameters()}


def main() -> None:
    rank, world, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    shared = sys.argv[5] if len(sys.argv) > 5 else None
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    results: dict = {"fastoptim": fastoptim.__file__}
    try:
        for name in ("muon", "normuon", "muon_bf16", "normuon_bf16", "sophiah"):
            run_ddp(name, rank, world, results)
        if FSDP2_ON_GLOO:
            for name in ("muon", "normuon", "muon_bf16", "normuon_bf16", "sophia"):
                run_fsdp(name, rank, world, results)
            for name in ("normuon", "muon"):
                run_checkpoint(name, rank, world, out_dir, results)
            run_placements(world, results)
            run_skip_nonfinite(rank, world, results)
            if shared is not None:
                run_reshard(rank, world, shared, results)
            for name in MATRIX_OPTIMIZERS:
                run_hsdp(name, rank, world, results)
                run_tp(name, rank, world, results)
                run_fsdp_tp(name, rank, world, results)
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

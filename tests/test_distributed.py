"""Distributed Muon / NorMuon (fastoptim.distributed) on 2 and 4 CPU ranks with gloo.

One module-scoped run of tests/_dist_worker.py per rank and world size (subprocesses on a free port,
killed after a timeout so a hung rank fails instead of hanging CI) trains the same model with DDP and
FSDP2; the tests compare what the ranks wrote against one process on the same global batch.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fastoptim
from fastoptim.distributed import assign_work, newton_schulz_flops

sys.path.insert(0, str(Path(__file__).parent))
import _dist_worker as worker  # noqa: E402

pytestmark = pytest.mark.timeout(300)  # a backstop: the fixture kills the ranks after TIMEOUT_S

TIMEOUT_S = 150
TOL = 1e-5
needs_fsdp2_on_gloo = pytest.mark.skipif(not worker.FSDP2_ON_GLOO, reason=worker.FSDP2_ON_GLOO_REASON)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reshard_dir(tmp_path_factory) -> Path:
    """Checkpoints shared by the world sizes (world 2 runs before world 4): one saved in one process here."""
    shared = tmp_path_factory.getbasetemp() / "reshard"
    if not (shared / "from1").exists() and worker.FSDP2_ON_GLOO:
        shared.mkdir(exist_ok=True)
        model, opt = worker.reshard_model(fsdp=False)
        worker.train_reshard(model, opt, 0, worker.RESHARD_SAVE_AT)
        worker.save_checkpoint(model, opt, str(shared / "from1"))
    return shared


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def ranks(request, tmp_path_factory) -> list[dict]:
    """What each rank wrote (a list indexed by rank)."""
    world = request.param
    out = tmp_path_factory.mktemp(f"dist{world}")
    shared = _reshard_dir(tmp_path_factory)
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, worker.__file__, str(rank), str(world), str(port), str(out), str(shared)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        for rank in range(world)
    ]
    logs = []
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for proc in procs:
            remaining = max(1.0, deadline - time.monotonic())
            logs.append(proc.communicate(timeout=remaining)[0].decode(errors="replace"))
    except subprocess.TimeoutExpired:
        pytest.fail(f"a rank did not finish within {TIMEOUT_S} s (hung collective?)")
    finally:
        for proc in procs:  # always reaped, also after a failure
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank} exited with {proc.returncode}:\n{log[-6000:]}"
    results = [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(world)]
    assert results[0]["fastoptim"] == fastoptim.__file__  # the workers ran this checkout
    return results


def _single(name: str) -> tuple[dict, torch.optim.Optimizer]:
    """One process, the whole global batch: the reference."""
    model = worker.Net()
    opt = worker.make_optimizer(name, model)
    worker.train(model, opt, name, worker.STEPS)
    return {k: v.detach().clone() for k, v in model.named_parameters()}, opt


def _assert_close(got: dict, want: dict, tol: float = TOL) -> None:
    assert got.keys() == want.keys()
    for k in want:
        err = (got[k].double() - want[k].double()).abs().max().item()
        assert err <= tol, f"{k}: max |difference| {err:.3g} > {tol}"


def _moved(want: dict) -> None:
    # The comparison cannot pass by accident: training changed every parameter.
    start = dict(worker.Net().named_parameters())
    for k, v in want.items():
        assert (v - start[k]).abs().max() > 1e-4, k


@pytest.mark.parametrize("name", ["muon", "normuon", "muon_bf16", "normuon_bf16", "sophiah"])
def test_ddp_matches_one_process_and_ranks_are_bit_identical(ranks, name):
    """SophiaH: its closure runs through DDP, whose all-reduce autograd.grad bypasses; SophiaH averages
    the gradients and the Hutchinson estimates itself."""
    want, _ = _single(name)
    _moved(want)
    _assert_close(ranks[0][f"ddp_{name}"], want)
    for other in ranks[1:]:
        for k, v in ranks[0][f"ddp_{name}"].items():
            assert torch.equal(v, other[f"ddp_{name}"][k]), k


@pytest.mark.parametrize("name", ["muon", "normuon", "sophiah"])
def test_ddp_state_is_replicated_and_loads_in_one_process(ranks, name):
    state0 = ranks[0][f"ddp_{name}_state"]
    for other in ranks[1:]:
        state = other[f"ddp_{name}_state"]
        assert state0["state"].keys() == state["state"].keys()
        for i, entry in state0["state"].items():
            for key, value in entry.items():
                assert torch.equal(value, state["state"][i][key]), (i, key)
    _, reference = _single(name)
    model = worker.Net()
    opt = worker.make_optimizer(name, model)
    opt.load_state_dict(state0)  # a single process resumes from a DDP rank's state dict
    want = reference.state_dict()["state"]
    for i, entry in opt.state_dict()["state"].items():
        for key, value in entry.items():
            err = (value.double() - want[i][key].double()).abs().max().item()
            assert err <= TOL, (i, key, err)
    if name == "normuon":
        assert any("second_moment" in entry for entry in want.values())


@needs_fsdp2_on_gloo
@pytest.mark.parametrize("name", ["muon", "normuon", "muon_bf16", "normuon_bf16", "sophia"])
def test_fsdp2_matches_one_process(ranks, name):
    """Uneven Shard(0) included: the head has 7 rows (4 + 3 on 2 ranks, 2 + 2 + 2 + 1 on 4), the gate 1
    (ranks without rows), the conv kernel 5, the expert bank 3 experts (whole experts on each rank).
    The default bfloat16 ns_dtype rounds exactly like one process (the same ops on the same values)."""
    want, _ = _single(name)
    _moved(want)
    for result in ranks:
        _assert_close(result[f"fsdp_{name}"], want)


@needs_fsdp2_on_gloo
def test_fsdp2_normuon_second_moment_is_sharded_like_the_rows(ranks):
    from torch.distributed.tensor import Shard

    _, reference = _single("normuon")
    head = reference.param_groups[2]["params"][0]  # the 7-row head with split_sizes [3, 4]
    want = reference.state[head]["second_moment"]
    for result in ranks:
        got = result["fsdp_normuon_head_second_moment"]
        assert got.shape == want.shape == (7,)
        assert (got - want).abs().max().item() <= TOL
        assert result["fsdp_normuon_head_second_moment_placements"] == [Shard(0)]
        experts = reference.state[reference.param_groups[1]["params"][-1]]["second_moment"]
        assert experts.shape == result["fsdp_normuon_experts_second_moment"].shape == (3, 4)
        assert (result["fsdp_normuon_experts_second_moment"] - experts).abs().max().item() <= TOL


@needs_fsdp2_on_gloo
@pytest.mark.parametrize("name", ["normuon", "muon"])
def test_fsdp2_checkpoint_round_trip_continues_exactly(ranks, name):
    for result in ranks:
        resumed, uninterrupted = result[f"checkpoint_{name}"], result[f"fsdp_{name}"]
        for k, v in uninterrupted.items():
            assert torch.equal(resumed[k], v), k


@needs_fsdp2_on_gloo
def test_unsupported_placement_is_refused_at_construction(ranks):
    message = ranks[0]["error_named_partial"]
    assert message is not None and "blocks.0.attn.weight" in message and "Partial" in message
    message = ranks[0]["error_split_columns"]
    assert message is not None and "params[0]" in message and "Shard(dim=1)" in message and "split_sizes" in message
    message = ranks[0]["error_bank_inside"]
    assert message is not None and "Shard(dim=1)" in message and "expert" in message
    assert ranks[0]["adamw_partial_accepted"]
    # SophiaH cannot reach sharded parameters with autograd.grad: refused, not silently skipped.
    message = ranks[0]["error_sophiah_fsdp2"]
    assert message is not None and "'experts'" in message and "SophiaG" in message  # the first sharded one


def _single_mlp(name: str) -> dict:
    model = worker.MLP()
    opt = worker.make_optimizer(name, model)
    worker.train(model, opt, name, worker.STEPS)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@needs_fsdp2_on_gloo
@pytest.mark.parametrize("name", worker.MATRIX_OPTIMIZERS)
def test_hsdp_matches_one_process(ranks, name):
    """FSDP2 on a 2-D (replicate, shard) mesh: (Replicate(), Shard(0)); the Newton–Schulz work is split over
    every rank of the mesh; the expert bank stays local (whole experts)."""
    model = worker.Net()
    opt = worker.make_optimizer(name, model, split_head=False)
    worker.train(model, opt, name, worker.STEPS)
    want = {k: v.detach().clone() for k, v in model.named_parameters()}
    _moved(want)
    assert "Replicate(), Shard(dim=0)" in ranks[0]["hsdp_placements"][1]
    for result in ranks:
        _assert_close(result[f"hsdp_{name}"], want)
    for other in ranks[1:]:
        for k, v in ranks[0][f"hsdp_{name}"].items():
            assert torch.equal(v, other[f"hsdp_{name}"][k]), k


@needs_fsdp2_on_gloo
@pytest.mark.parametrize("name", worker.MATRIX_OPTIMIZERS)
def test_tensor_parallel_matches_one_process(ranks, name):
    """ColwiseParallel (Shard(0)) and RowwiseParallel (Shard(1)) weights: whole matrices are orthogonalized,
    never a shard on its own (that would change the update); NorMuon's row statistics use whole rows."""
    want = _single_mlp(name)
    assert ranks[0]["tp_placements"]["fc1.weight"] == "(Shard(dim=0),)"
    assert ranks[0]["tp_placements"]["fc2.weight"] == "(Shard(dim=1),)"
    for result in ranks:
        _assert_close(result[f"tp_{name}"], want)
    for other in ranks[1:]:
        for k, v in ranks[0][f"tp_{name}"].items():
            assert torch.equal(v, other[f"tp_{name}"][k]), k


@needs_fsdp2_on_gloo
@pytest.mark.parametrize("name", worker.MATRIX_OPTIMIZERS)
def test_fsdp_plus_tensor_parallel_matches_one_process(ranks, name):
    """A 2-D (dp, tp) mesh: fc1 (_StridedShard or Shard(0) over dp, Shard(0) over tp), fc2 (Shard(0),
    Shard(1)), the head Shard(0) over dp only."""
    want = _single_mlp(name)
    placements = ranks[0]["fsdp_tp_placements"]
    assert placements["fc2.weight"].endswith("Shard(dim=1))") and placements["fc1.weight"].endswith("Shard(dim=0))")
    for result in ranks:
        _assert_close(result[f"fsdp_tp_{name}"], want)
    for other in ranks[1:]:
        for k, v in ranks[0][f"fsdp_tp_{name}"].items():
            assert torch.equal(v, other[f"fsdp_tp_{name}"][k]), k


def test_work_is_balanced_by_flops_not_by_count():
    big = newton_schulz_flops(512, 512, 5)
    small = newton_schulz_flops(64, 64, 5)
    assert big == 5 * (4 * 512**3 + 2 * 512**3)
    # One big matrix and eight small ones: the big one alone on one rank, all the small ones on the other.
    owners = assign_work([(1, big), (8, small)], 2)
    assert owners[0] == [0]
    assert owners[1] == [1] * 8
    # A bucket larger than the world is split into equal chunks.
    assert assign_work([(4, 10)], 2) == [[0, 0, 1, 1]]
    assert assign_work([(3, 10), (0, 5)], 4) == [[0, 1, 2], []]


def test_gram_groups_are_balanced_by_gram_flops():
    """The owners of a gram (or auto) group are balanced by the FLOPs that group runs: Gram's, as full
    GEMMs, with its restarts; a square bucket under "auto" keeps the standard count."""
    from fastoptim import ns_methods

    assert newton_schulz_flops(768, 3072, 5, "gram") == ns_methods.flops(768, 3072, 5, "gram", symmetric=False)
    assert newton_schulz_flops(768, 3072, 5, "gram") == 60 * 768**3 < newton_schulz_flops(768, 3072, 5) == 90 * 768**3
    assert newton_schulz_flops(768, 3072, 5, "gram", ()) < newton_schulz_flops(768, 3072, 5, "gram", (1, 2, 3, 4))
    assert newton_schulz_flops(512, 512, 5, "auto") == newton_schulz_flops(512, 512, 5, "standard")
    assert newton_schulz_flops(768, 3072, 5, "auto") == newton_schulz_flops(768, 3072, 5, "gram")


def test_single_process_needs_no_process_group():
    assert not torch.distributed.is_initialized()
    model = worker.Net()
    opt = worker.make_optimizer("normuon", model)
    worker.train(model, opt, "normuon", 1)
    with pytest.raises(TypeError, match="process_group"):
        fastoptim.Muon(model.parameters(), process_group="world")
    with pytest.raises(TypeError, match="process_group"):
        fastoptim.SophiaH(model.parameters(), process_group=2)


def _reshard_reference() -> dict:
    model, opt = worker.reshard_model(fsdp=False)
    worker.train_reshard(model, opt, 0, worker.STEPS)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@needs_fsdp2_on_gloo
def test_resharded_resume_continues_like_an_uninterrupted_run(ranks, tmp_path_factory):
    """DCP checkpoints saved in one process, at 2 and at 4 ranks load at every other world size (and in one
    process) and the next steps equal an uninterrupted single-process run: a bfloat16 matrix, an expert
    bank, and a layer with no state at the save included."""
    want = _reshard_reference()
    assert want["low.weight"].dtype == torch.bfloat16
    _moved_from(want, worker.ReshardNet())
    world = len(ranks)
    for result in ranks:
        _assert_close(result["reshard_uninterrupted"], want)
        _assert_close(result["reshard_from1"], want)
        if world == 4:
            _assert_close(result["reshard_from2"], want)
    model, opt = worker.reshard_model(fsdp=False, seed=1)
    worker.load_checkpoint(model, opt, str(_reshard_dir(tmp_path_factory) / f"from{world}"))
    worker.train_reshard(model, opt, worker.RESHARD_SAVE_AT, worker.STEPS)
    _assert_close({k: v.detach() for k, v in model.named_parameters()}, want)


def _moved_from(want: dict, start: torch.nn.Module) -> None:
    for k, v in start.named_parameters():
        assert (want[k].float() - v.float()).abs().max() > 1e-4, k


@needs_fsdp2_on_gloo
def test_skip_nonfinite_agrees_on_every_rank(ranks):
    """A NaN in one rank's gradient shard: every rank skips (a MIN all-reduce of the finite flag)."""
    assert all(result["skip_nonfinite_unchanged"] for result in ranks)

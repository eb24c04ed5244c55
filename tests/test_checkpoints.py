"""Checked checkpoints, the backend across a load, and copies (deepcopy, pickle) of every optimizer."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from fastoptim import Muon, NorMuon, SophiaG, SophiaH

OPTIMIZERS = [
    (Muon, {}),
    (NorMuon, {}),
    (SophiaG, {}),
    (SophiaH, {"update_period": 1}),
]


def _params():
    torch.manual_seed(0)
    return [torch.randn(s, requires_grad=True) for s in [(6, 4), (3, 5, 4), (4,)]]


def _step(opt, params, seed=0):
    g = torch.Generator().manual_seed(seed)
    targets = [torch.randn(p.shape, generator=g) for p in params]
    if isinstance(opt, SophiaH):
        opt.step(lambda: sum(((p - t) ** 2 * (1 + p**2)).sum() for p, t in zip(params, targets)))
        return
    for p, t in zip(params, targets):
        p.grad = 2 * (p.detach() - t)
    opt.step()


@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS)
def test_a_state_tensor_of_the_wrong_shape_or_value_is_refused(cls, kwargs):
    params = _params()
    opt = cls(params, **kwargs)
    _step(opt, params)
    saved = copy.deepcopy(opt.state_dict())
    key = {Muon: "momentum_buffer", NorMuon: "second_moment"}.get(cls, "exp_avg")
    bad_shape = copy.deepcopy(saved)
    entry = bad_shape["state"][1]
    entry[key] = torch.cat([entry[key].reshape(-1), torch.zeros(1)])  # one too long: was silently sliced
    bad_value = copy.deepcopy(saved)
    bad_value["state"][0][key] = torch.full_like(bad_value["state"][0][key], float("nan"))
    fresh_params = _params()
    fresh = cls(fresh_params, **kwargs)
    _step(fresh, fresh_params, seed=1)
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match=rf"{key}.*params'\]\[1\].*shape"):
        fresh.load_state_dict(bad_shape)
    with pytest.raises(ValueError, match=rf"{key}.*NaN"):
        fresh.load_state_dict(bad_value)
    after = fresh.state_dict()  # nothing changed
    for i, entry in before["state"].items():
        for k, v in entry.items():
            assert torch.equal(after["state"][i][k], v), (i, k)
    fresh.load_state_dict(saved)  # the good one still loads
    _step(fresh, fresh_params, seed=2)


@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS)
def test_the_backend_chosen_here_survives_a_checkpoint(cls, kwargs):
    params = _params()
    writer = cls(params, backend="triton", **kwargs)  # as on a GPU machine
    state = writer.state_dict()
    reader = cls(_params(), backend="torch", **kwargs)
    reader.load_state_dict(state)
    assert all(group["backend"] == "torch" for group in reader.param_groups)


@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS)
def test_deepcopy_and_pickle_step_on(cls, kwargs):
    params = _params()
    opt = cls(params, **kwargs)
    _step(opt, params)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        clone_params = [p for group in clone.param_groups for p in group["params"]]
        _step(clone, clone_params, seed=3)
        assert clone._process_group == opt._process_group
    _step(opt, params, seed=3)


def test_deepcopy_shares_an_explicit_process_group_and_pickle_refuses_it(tmp_path):
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        for cls, kwargs in OPTIMIZERS:
            if cls is SophiaG:
                continue  # SophiaG takes no process group (its gradients come from backward())
            opt = cls(_params(), process_group=group, **kwargs)
            assert copy.deepcopy(opt)._process_group is group
            with pytest.raises(TypeError, match="process_group"):
                pickle.dumps(opt)
    finally:
        dist.destroy_process_group()

"""Checked checkpoints and copies, shared by every fastoptim optimizer.

`load_checked` refuses a state dict whose state tensors do not fit their parameters (shape, kind,
finiteness), naming the parameter and the key, before anything changes; and it keeps what belongs to
this machine rather than to the checkpoint: the backend chosen at construction (a checkpoint written
where the Triton backend ran resumes where only torch can).

`CopyableOptimizer` makes ``copy.deepcopy`` keep the process group (shared, not copied: a
ProcessGroup is a handle to the running job) and pickling refuse an explicit ProcessGroup with an
error instead of silently falling back to the default.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import distributed

# What this machine decides, kept from the live optimizer when a checkpoint is loaded.
LOCAL_GROUP_KEYS = ("backend",)


def load_checked(
    optimizer: torch.optim.Optimizer,
    state_dict: dict[str, Any],
    expected_shape: Callable[[dict, Tensor, str], tuple[int, ...] | None],
    load: Callable[[dict[str, Any]], None],
) -> None:
    """Check `state_dict` against the optimizer's parameters, then `load` it (torch's own loader), then put
    back each group's `LOCAL_GROUP_KEYS`. expected_shape(group, param, key) gives the shape a state tensor
    must have (None: any)."""
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise TypeError("state_dict must be a dict with 'state' and 'param_groups', as state_dict() returns")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"the state dict has {len(saved_groups)} param groups, this optimizer has {len(optimizer.param_groups)}"
        )
    for g, (saved, group) in enumerate(zip(saved_groups, optimizer.param_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"param group {g} of the state dict has {len(saved['params'])} parameters, this optimizer's "
                f"has {len(group['params'])}"
            )
    owner = {}
    for saved, group in zip(saved_groups, optimizer.param_groups):
        for k, (saved_id, p) in enumerate(zip(saved["params"], group["params"])):
            owner[saved_id] = (group, p, k)
    names = _param_names(optimizer)
    for saved_id, entry in state_dict["state"].items():
        if saved_id not in owner:
            raise ValueError(f"the state dict has state for parameter id {saved_id!r}, which no param group lists")
        group, p, _ = owner[saved_id]
        where = names.get(id(p), f"parameter {saved_id!r}")
        for key, value in entry.items():
            if not isinstance(value, Tensor):
                continue
            shape = expected_shape(group, p, key)
            if shape is not None and tuple(value.shape) != tuple(shape):
                raise ValueError(
                    f"state {key!r} of {where} (shape {tuple(p.shape)}) has shape {tuple(value.shape)}; "
                    f"expected {tuple(shape)}"
                )
            if key != "step" and not value.is_floating_point():
                raise TypeError(f"state {key!r} of {where} must be floating point, got {value.dtype}")
            local = distributed.local_tensor(value)
            if local.numel() and not bool(torch.isfinite(local).all()):
                raise ValueError(f"state {key!r} of {where} holds NaN or infinite values")
    kept = [{key: group[key] for key in LOCAL_GROUP_KEYS if key in group} for group in optimizer.param_groups]
    load(state_dict)
    for group, values in zip(optimizer.param_groups, kept):
        group.update(values)


def _param_names(optimizer: torch.optim.Optimizer) -> dict[int, str]:
    """id(param) -> "parameter 'name'" where the groups were given names, else "params[g][k]"."""
    out = {}
    for g, group in enumerate(optimizer.param_groups):
        names = group.get("param_names")
        for k, p in enumerate(group["params"]):
            out[id(p)] = f"parameter {names[k]!r}" if names else f"param_groups[{g}]['params'][{k}]"
    return out


class CopyableOptimizer:
    """Mixin: deepcopy shares the process group; pickling keeps "auto"/None and refuses a ProcessGroup."""

    _process_group: Any = "auto"

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # defaults, state, param_groups (torch.optim.Optimizer)
        process_group = self.__dict__.get("_process_group", "auto")
        if process_group is not None and not isinstance(process_group, str):
            raise TypeError(
                "this optimizer was given an explicit process_group, which cannot be pickled (a handle to the "
                "running job); save its state_dict() instead, or construct it with process_group='auto'"
            )
        return {**state, "_process_group": process_group}

    def __setstate__(self, state: dict[str, Any]) -> None:
        process_group = state.pop("_process_group", "auto")
        super().__setstate__(state)
        self._process_group = process_group

    def __deepcopy__(self, memo: dict) -> Any:
        process_group = self.__dict__.get("_process_group", "auto")
        if process_group is not None and not isinstance(process_group, str):
            memo[id(process_group)] = process_group  # shared, never copied
        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            setattr(new, key, copy.deepcopy(value, memo))
        return new

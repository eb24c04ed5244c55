"""Checks of user input at the public boundary, and the dtype rules the backends share.

Every check raises before any tensor is touched, with a message that names the argument and says
what was expected: TypeError for a wrong kind of thing (not a tensor, an integer or complex dtype,
a hyper-parameter that is not a real number), ValueError for a wrong value (shape, device, a
non-finite or out-of-range number).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # what the ops take
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the Triton and CUDA kernels take


def accumulate_dtype(*dtypes_or_tensors: torch.dtype | torch.Tensor | None) -> torch.dtype:
    """The dtype the ops compute in: float64 if any operand (a dtype or a tensor; None is skipped)
    is float64, else float32, whatever the storage dtypes. Also the dtype of per-row statistics
    (NorMuon's second_moment) and of a NorMuon direction, so that state sized before a step matches."""
    for item in dtypes_or_tensors:
        dtype = item.dtype if isinstance(item, torch.Tensor) else item
        if dtype == torch.float64:
            return torch.float64
    return torch.float32


def tensor(name: str, value: object, *, min_ndim: int = 0) -> torch.Tensor:
    """A real floating-point tensor with at least `min_ndim` dimensions."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.is_complex():
        raise TypeError(f"{name} must be a real floating-point tensor, got complex dtype {value.dtype}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float32, bfloat16, float16 or float64), got {value.dtype}"
        )
    if value.is_sparse or value.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {value.layout}")
    if value.dim() < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimensions (..., m, n), got shape {tuple(value.shape)}"
        )
    return value


def scalar_tensor(name: str, value: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A 0-dim real floating tensor on `device` (a hyper-parameter read on the device). Its value is
    not checked: reading it would synchronize with the device (and break CUDA-graph capture)."""
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a real number or a 0-dim tensor of a floating dtype (float32, bfloat16, float16 or "
            f"float64), got dtype {value.dtype}"
        )
    if value.dim() != 0:
        raise ValueError(f"{name} must be a real number or a 0-dim tensor, got a tensor of shape {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} must be on the device of the parameters ({device}), got {value.device}")
    return value


def same_shape(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if value.shape != ref.shape:
        raise ValueError(
            f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(value.shape)}"
        )


def same_device(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if value.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {value.device}")


def real(name: str, value: object) -> float:
    """A finite real number (bool and complex are refused); returns it as a Python float."""
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a Python number, got a tensor (pass float({name}))")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def non_negative(name: str, value: object) -> float:
    value = real(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def positive(name: str, value: object) -> float:
    value = real(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def beta(name: str, value: object) -> float:
    """An EMA coefficient in [0, 1)."""
    value = real(name, value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def boolean(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def compute_dtype(name: str, value: object) -> torch.dtype:
    if not isinstance(value, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype, got {type(value).__name__} {value!r}")
    if value not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be one of float32, bfloat16, float16, float64; got {value}")
    return value


def tensor_list(name: str, values: object) -> list[torch.Tensor]:
    """A list (or tuple) of real floating-point tensors."""
    if isinstance(values, torch.Tensor) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list of tensors, got {type(values).__name__}")
    return [tensor(f"{name}[{i}]", v) for i, v in enumerate(values)]


def matching_lists(names: Sequence[str], lists: Sequence[list[torch.Tensor]]) -> None:
    """Lists of equal length whose i-th tensors share shape and device with the first list's."""
    first_name, first = names[0], lists[0]
    for name, values in zip(names[1:], lists[1:]):
        if len(values) != len(first):
            raise ValueError(
                f"{name} must have as many tensors as {first_name} ({len(first)}), got {len(values)}"
            )
        for i, (v, ref) in enumerate(zip(values, first)):
            same_shape(f"{name}[{i}]", v, f"{first_name}[{i}]", ref)
            same_device(f"{name}[{i}]", v, f"{first_name}[{i}]", ref)
    devices = {t.device for t in first}
    if len(devices) > 1:
        raise ValueError(f"{first_name} must all be on one device, got {sorted(map(str, devices))}")


def non_negative_or_tensor(name: str, value: object, *, read_value: bool = True) -> float | torch.Tensor:
    """A finite number >= 0, or a 0-D real floating tensor (a capturable learning rate or weight decay).
    A tensor's value is read (a host synchronization) only with read_value, e.g. once when a group is
    added; at step time only its kind is checked."""
    if not isinstance(value, torch.Tensor):
        return non_negative(name, value)
    if value.dim() != 0 or value.is_complex() or not value.is_floating_point():
        raise TypeError(
            f"{name} must be a number or a 0-D floating-point tensor, got a tensor of shape "
            f"{tuple(value.shape)} and dtype {value.dtype}"
        )
    if value.requires_grad:
        raise ValueError(f"{name} must not require grad")
    if read_value and value.device.type != "meta":
        number = float(value)
        if not math.isfinite(number) or number < 0:
            raise ValueError(f"{name} must be finite and >= 0, got {number}")
    return value

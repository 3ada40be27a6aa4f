"""Input checks shared by the ops: clear TypeError/ValueError naming the argument, expected and actual."""

from __future__ import annotations

import torch

from vidtok._backend import FLOAT_DTYPES


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, t, *, rank: int, layout: str, dtypes=FLOAT_DTYPES) -> None:
    """t must be a tensor of the given rank (layout names its dims, e.g. "[B, T, N, C]") and dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must be {layout} (rank {rank}), got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be one of {_dtype_names(dtypes)}, got {str(t.dtype).replace('torch.', '')}")


def check_int(name: str, value, *, low: int, high: int, why: str = "") -> None:
    """value must be an int in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}]{why}, got {value}")


def check_same_device(**tensors: torch.Tensor) -> None:
    """Every tensor argument must live on the same device."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listed}")

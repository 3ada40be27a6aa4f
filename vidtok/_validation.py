"""Argument checks every op shares: a clear TypeError/ValueError naming the argument, what was
expected and what was given. Sits beside ``_numerics`` at the bottom of vidtok's layers."""

from __future__ import annotations

import math

import torch

from vidtok._numerics import FLOAT_DTYPES, dtype_name

INT32_MAX = 2**31 - 1


def check_tensor(name: str, t, *, rank: int, layout: str, dtypes=FLOAT_DTYPES) -> None:
    """t must be a tensor of the given rank (layout names its dims, e.g. "[B, T, N, C]") and dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must be {layout} (rank {rank}), got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be one of {', '.join(map(dtype_name, dtypes))}, got {dtype_name(t.dtype)}")


def check_int(name: str, value, *, low: int, high: int = 2**62, why: str = "") -> int:
    """value must be an int (not a bool) in [low, high]; returns it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        bound = f">= {low}" if high >= 2**62 else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}{why}, got {value}")
    return value


def check_optional_count(name: str, value) -> int:
    """None (returned as 0: "never") or an int >= 1."""
    if value is None:
        return 0
    return check_int(name, value, low=1, high=INT32_MAX)


def check_float(name: str, value, *, low: float | None = None, finite: bool = False) -> float:
    """value must be a real number (int or float, not a bool), not NaN, >= low when given, finite when
    asked; returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if value != value:  # NaN (math.isnan breaks dynamo on some versions)
        raise ValueError(f"{name} must not be NaN")
    if finite and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Every tensor argument must live on the same device."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listed}")

"""Argument checks every op shares: a clear TypeError/ValueError naming the argument, what was
expected and what was given. Sits beside ``_numerics`` at the bottom of vidtok's layers."""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

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


# ---------------------------------------------------------------------------------------------------
# Checks of tensor values. They read the data: on CPU tensors the answer is read at once (a clear
# ValueError); on GPU tensors, and under torch.compile, they become a device-side assert
# (torch._assert_async: no host sync; a failure stops the CUDA stream, as an out-of-bounds index would).

_nan_allowed: list[bool] = []


@contextlib.contextmanager
def allow_nan() -> Iterator[None]:
    """Inside the block, NaN inputs are not an error for the ops that refuse them by default (the
    ops that decide which tokens or frames to keep: a NaN would silently change the decision); each
    such op documents what NaN does then (e.g. a NaN token never matches, a NaN frame is never picked)."""
    _nan_allowed.append(True)
    try:
        yield
    finally:
        _nan_allowed.pop()


def require(ok: torch.Tensor, message: str) -> None:
    """Raise ValueError(message) unless the 0-d bool tensor ``ok`` is True (see above)."""
    if ok.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok):
            raise ValueError(message)
    else:
        torch._assert_async(ok, message)


def check_no_nan(op: str, name: str, t: torch.Tensor | None, where: torch.Tensor | None = None) -> None:
    """``t`` (optionally only where ``where``) must hold no NaN, unless inside ``allow_nan()``."""
    if t is None or not t.is_floating_point() or _nan_allowed or t.numel() == 0:
        return
    if where is None and t.device.type == "cpu" and not torch.compiler.is_compiling():
        # one sum is ~7x cheaper than isnan().any() on CPUs; it is NaN if t holds a NaN (or both
        # infinities): only then is the exact test run
        if not bool(torch.isnan(t.sum())):
            return
    nan = torch.isnan(t) if where is None else torch.isnan(t) & where
    require(~nan.any(), f"vidtok.{op}: {name} contains NaN, which would silently change what is kept "
                         f"(wrap the call in vidtok.allow_nan() for the documented NaN behaviour)")


def check_positive(name: str, t: torch.Tensor | None) -> None:
    """Every value of ``t`` must be > 0 (token sizes: how many tokens each stands for)."""
    if t is None or t.numel() == 0:
        return
    require((t > 0).all(), f"{name} must be positive (how many tokens each stands for), got values <= 0")


def check_unit_range(name: str, t: torch.Tensor, why: str) -> None:
    """Every value of the float tensor ``t`` must lie in [0, 1]; NaN too is refused, unless inside
    ``allow_nan()``. ``why`` ends the message (what to do instead)."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    if _nan_allowed:
        inside = ~((t < 0) | (t > 1)).any()
    else:  # one pass: a NaN makes both extremes NaN, which compare False
        lo, hi = torch.aminmax(t)
        inside = (lo >= 0) & (hi <= 1)
    require(inside, f"{name} must hold values in [0, 1]{'' if _nan_allowed else ', without NaN'}: {why}")

"""Helpers shared by the Triton kernel modules."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

# Triton signature type of each dtype the kernels take, for ahead-of-time compiles.
TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class AotCase:
    """One kernel configuration a launcher can choose, described well enough to compile it offline.

    signature maps every argument name to a Triton type ("*bf16", "i32", "constexpr", ...);
    constexprs gives the values of the constexpr ones. An integer argument that the launch specialises
    to the constant 1 (a unit stride) appears as a constexpr equal to 1.
    """

    name: str
    kernel: object
    signature: dict
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3


def on_tensor_device(launcher):
    """Run a launcher under the CUDA device of its first tensor argument: Triton launches on the
    current device and its current stream, not on the tensors' device (tensors on cuda:1 with cuda:0
    current would be read from the wrong device). CPU tensors (the interpreter) need no guard."""

    @functools.wraps(launcher)
    def launch(*args, **kwargs):
        first = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        if not first.is_cuda:
            return launcher(*args, **kwargs)
        with torch.cuda.device(first.device):
            return launcher(*args, **kwargs)

    return launch

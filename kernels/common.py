"""Helpers shared by the Triton kernel modules."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

# Triton's short name of each dtype the kernels take (as in its signatures), for AOT case names.
TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class AotCase:
    """One realistic call of a kernel launcher, for ahead-of-time compiles (``python -m vidtok aot``).

    ``launch()`` calls a launcher of this package on meta tensors: the shapes, strides and addresses
    (16-byte aligned, as every fresh allocation) of a real input, without memory or a GPU. Every
    Triton kernel it launches is compiled with exactly what that launch hands Triton: the launcher's
    constexprs and num_warps, and Triton's own specialisation of the argument values (pointers and
    integers divisible by 16 marked so, integers equal to 1 made constants).
    """

    name: str
    launch: Callable[[], object]


def meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor without memory, for ``AotCase.launch``: real shape, strides and alignment."""
    return torch.empty(shape, dtype=dtype, device="meta")


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

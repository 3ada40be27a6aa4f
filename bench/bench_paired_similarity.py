"""paired_similarity vs the one-liner users write today, F.cosine_similarity(x[:, lag:], x[:, :-lag]).

The floor: one read of x and one fp32 write of [B, T - lag, N]; 4 FLOPs per element of each of the
two compared tokens (dot and two squared norms: 3 multiply-adds per channel pair).
"""

import os

import pytest
import torch
import torch.nn.functional as F

import vidtok
from vidtok.testing import runnable_backends, video_tokens

# (B, T, N, C): a video LLM's SigLIP tokens over 64 frames, and a video ViT batch;
# VIDTOK_BENCH_QUICK=1 (python -m vidtok bench --quick) runs one small shape as a smoke test.
SHAPES = [(1, 64, 576, 1152), (8, 16, 196, 768)]
if os.environ.get("VIDTOK_BENCH_QUICK") == "1":
    SHAPES = [(1, 8, 64, 256)]
LAG = 1


def _implementations(device: torch.device, dtype: torch.dtype):
    impls = {"eager F.cosine_similarity": lambda x: F.cosine_similarity(x[:, LAG:], x[:, :-LAG], dim=-1)}
    for backend in runnable_backends("paired_similarity", device, dtype):
        impls[f"vidtok {backend}"] = lambda x, b=backend: vidtok.paired_similarity(x, LAG, backend=b)
    return impls


def _cases():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for shape in SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            for name in _implementations(device, dtype):
                yield pytest.param(shape, dtype, name, id=f"{'x'.join(map(str, shape))}-{str(dtype)[6:]}-{name}")


@pytest.mark.parametrize("shape,dtype,impl", list(_cases()))
def bench_paired_similarity(shape, dtype, impl, device, measure, benchmark):
    B, T, N, C = shape
    benchmark.group = f"paired_similarity B={B} T={T} N={N} C={C} {str(dtype)[6:]}"
    x = video_tokens(B, T, N, C, dtype=dtype, device=device, seed=0)
    fn = _implementations(device, dtype)[impl]
    bytes_moved = x.numel() * x.element_size() + B * (T - LAG) * N * 4
    flops = 6 * B * (T - LAG) * N * C
    measure(lambda: fn(x), bytes_moved=bytes_moved, flops=flops)

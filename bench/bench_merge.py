"""bipartite_merge vs the eager ToMe users copy; temporal_merge against the one-pass floor.

Baseline: ToMe's bipartite soft matching as published (Bolya et al., ICLR 2023;
facebookresearch/ToMe, tome/merge.py), written here in eager PyTorch: normalise, A @ B^T, max,
argsort, gathers, scatter_reduce(sum) of x*size and of size, cat (ToMe's merge_wavg, "tome" order).
The floor of a merge: one read of x (and the metric), one write of the merged tokens.

Workloads: video ViT (B=8, N=1568, C=1024, D=64, r=784), image ViT (B=64, N=197, C=768,
r=16), video LLM (B=1, T=64, N=169, C=3584, bf16; radius 0 and the whole frame). On the CPU the
batch / frame counts are cut so the file runs in about a minute; VIDTOK_BENCH_QUICK=1 runs tiny shapes.
"""

import os

import pytest
import torch

import vidtok
from vidtok.testing import runnable_backends, video_tokens

ON_GPU = torch.cuda.is_available()
QUICK = os.environ.get("VIDTOK_BENCH_QUICK") == "1"
# (name, B, N, C, D, r)
BIPARTITE = [("video-ViT", 8, 1568, 1024, 64, 784), ("image-ViT", 64, 197, 768, 64, 16)]
# (name, B, T, N, C, radius)
TEMPORAL = [("video-LLM radius 0", 1, 64, 169, 3584, 0), ("video-LLM whole frame", 1, 64, 169, 3584, None)]
if QUICK:
    BIPARTITE = [("tiny", 2, 196, 64, 16, 64)]
    TEMPORAL = [("tiny", 1, 4, 49, 64, 0)]
elif not ON_GPU:
    BIPARTITE = [("video-ViT (B=2)", 2, 1568, 1024, 64, 784), ("image-ViT (B=16)", 16, 197, 768, 64, 16)]
    TEMPORAL = [("video-LLM radius 0 (T=32)", 1, 32, 169, 3584, 0), ("video-LLM whole frame (T=32)", 1, 32, 169, 3584, None)]


def eager_tome(x: torch.Tensor, metric: torch.Tensor, r: int, size: torch.Tensor):
    """ToMe's bipartite matching + size-weighted merge, step by step in eager PyTorch (no protected tokens)."""
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)
        scores = unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)  # [B, N_A, N_B], materialised
        best, partner = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        kept, merged = order[:, r:, None], order[:, :r, None]
        target = partner[..., None].gather(1, merged)

    def reduce(t):
        even, odd = t[:, ::2], t[:, 1::2]
        c = t.shape[-1]
        stay = even.gather(1, kept.expand(-1, -1, c))
        moving = even.gather(1, merged.expand(-1, -1, c))
        odd = odd.scatter_reduce(1, target.expand(-1, -1, c), moving, reduce="sum")
        return torch.cat([stay, odd], dim=1)

    total = reduce(size)
    return reduce(x * size) / total, total


def _bipartite_impls(device, dtype):
    impls = {"eager ToMe": lambda x, m, r, s: eager_tome(x, m, r, s[..., None])}
    for backend in runnable_backends("bipartite_merge", device, dtype):
        impls[f"vidtok {backend}"] = lambda x, m, r, s, b=backend: vidtok.bipartite_merge(
            x, r, metric=m, size=s, order="tome", backend=b
        )
    return impls


def _temporal_impls(device, dtype):
    return {
        f"vidtok {backend}": (lambda x, radius, b=backend: vidtok.temporal_merge(x, r=x.shape[1] * x.shape[2] // 2, radius=radius, backend=b))
        for backend in runnable_backends("temporal_merge", device, dtype)
    }


def _device():
    return torch.device("cuda" if ON_GPU else "cpu")


def _bipartite_cases():
    for workload in BIPARTITE:
        for dtype in (torch.bfloat16, torch.float32) if ON_GPU else (torch.float32,):
            for name in _bipartite_impls(_device(), dtype):
                yield pytest.param(workload, dtype, name, id=f"{workload[0]}-{str(dtype)[6:]}-{name}")


def _temporal_cases():
    for workload in TEMPORAL:
        for name in _temporal_impls(_device(), torch.bfloat16):
            yield pytest.param(workload, name, id=f"{workload[0]}-{name}")


@pytest.mark.parametrize("workload,dtype,impl", list(_bipartite_cases()))
def bench_bipartite_merge(workload, dtype, impl, device, measure, benchmark):
    label, B, N, C, D, r = workload
    benchmark.group = f"bipartite_merge {label}: B={B} N={N} C={C} D={D} r={r} {str(dtype)[6:]}"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, C, generator=g).to(device=device, dtype=dtype)
    metric = torch.randn(B, N, D, generator=g).to(device=device, dtype=dtype)
    size = torch.ones(B, N, device=device)
    fn = _bipartite_impls(device, dtype)[impl]
    elt = x.element_size()
    bytes_moved = B * N * (C + D) * elt + B * (N - r) * C * elt
    flops = 2 * B * ((N + 1) // 2) * (N // 2) * D
    measure(lambda: fn(x, metric, r, size), bytes_moved=bytes_moved, flops=flops)


@pytest.mark.parametrize("workload,impl", list(_temporal_cases()))
def bench_temporal_merge(workload, impl, device, measure, benchmark):
    label, B, T, N, C, radius = workload
    dtype = torch.bfloat16
    benchmark.group = f"temporal_merge {label}: B={B} T={T} N={N} C={C} bf16 r=T*N/2"
    x = video_tokens(B, T, N, C, dtype=dtype, device=device, seed=0)
    fn = _temporal_impls(device, dtype)[impl]
    bytes_moved = x.numel() * x.element_size() * 3 // 2  # read every token, write half of them
    measure(lambda: fn(x, radius), bytes_moved=bytes_moved)

"""Frame selection: vidtok against the eager PyTorch loops the paper repos write.

- frame_scores: the fused scan vs eager F.normalize + matmul + adjacent cosine. Floor: one read of
  x [B, T, C] (queries are tiny) and fp32 writes of relevance [B, Q, T], adjacent and norms.
- greedy_select (MMR, lam = 0.5) and dpp_select: vidtok's vectorised incremental reference and the
  persistent CUDA kernel (GPU only) vs one Python iteration per step per query, recomputing the max
  similarity to the chosen set (MMR) or solving against the chosen block (DPP) every step, as
  MMR/MDP3 code does. Bytes: one read of x per step (the streaming regime; the
  kernel's pool mode reads x about T / 128 times for its Gram matrix instead, bench/NOTES.md).
"""

import os

import pytest
import numpy as np
import torch
import torch.nn.functional as F

import vidtok
from vidtok.testing import runnable_backends

QUICK = os.environ.get("VIDTOK_BENCH_QUICK") == "1"
# (B, T, C, Q): long-video workloads (T = 10,000 frames of SigLIP so400m embeddings, Q = 1 and 16)
SCAN_SHAPES = [(1, 2000, 256, 4)] if QUICK else [(1, 10000, 1152, 1), (1, 10000, 1152, 16)]
if torch.cuda.is_available() and not QUICK:  # T = 100,000 (0.23 GB in bf16): GPU only
    SCAN_SHAPES += [(1, 100000, 1152, 1), (1, 100000, 1152, 16)]
# (T, C, Q, k): a 4096-frame pool, k = 64; on a GPU also the full-size target, k = 256 for Q = 16 queries
# (the eager loop takes minutes on a CPU)
SELECT_SHAPES = [(1000, 128, 1, 16)] if QUICK else [(4096, 1152, 1, 64)] + ([(4096, 1152, 16, 256)] if torch.cuda.is_available() else [])


def _scan_impls(device, dtype):
    def eager(x, q):
        xn, qn = F.normalize(x.float(), dim=-1), F.normalize(q.float(), dim=-1)
        return qn @ xn.transpose(1, 2), (xn[:, 1:] * xn[:, :-1]).sum(-1), x.float().norm(dim=-1)

    impls = {"eager normalize+matmul": eager}
    for backend in runnable_backends("frame_scores", device, dtype):
        impls[f"vidtok {backend}"] = lambda x, q, b=backend: vidtok.frame_scores(x, q, backend=b)
    return impls


def _scan_cases():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for shape in SCAN_SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            for name in _scan_impls(device, dtype):
                yield pytest.param(shape, dtype, name, id=f"{'x'.join(map(str, shape))}-{str(dtype)[6:]}-{name}")


@pytest.mark.parametrize("shape,dtype,impl", list(_scan_cases()))
def bench_frame_scores(shape, dtype, impl, device, measure, benchmark):
    B, T, C, Q = shape
    benchmark.group = f"frame_scores B={B} T={T} C={C} Q={Q} {str(dtype)[6:]}"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, C, generator=g).to(device=device, dtype=dtype)
    q = torch.randn(B, Q, C, generator=g).to(device=device, dtype=dtype)
    fn = _scan_impls(device, dtype)[impl]
    bytes_moved = x.numel() * x.element_size() + 4 * B * (Q * T + 2 * T - 1)
    measure(lambda: fn(x, q), bytes_moved=bytes_moved, flops=2 * B * T * C * (Q + 2))


def eager_mmr(rel, x, k, lam):
    """One Python step per pick and per query, max similarity recomputed from the chosen set."""
    xn = F.normalize(x[0].float(), dim=-1)
    out = []
    for q in range(rel.shape[1]):
        chosen = []
        for _ in range(k):
            gain = rel[0, q].clone()
            if chosen:
                gain -= lam * (xn @ xn[chosen].T).max(-1).values
                gain[chosen] = float("-inf")
            chosen.append(int(gain.argmax()))
        out.append(sorted(chosen))
    return out


def eager_dpp(x, quality, k):
    """Greedy DPP MAP as MDP3 codes it: per step, the log det of every candidate set via the Cholesky
    factor of the chosen block and a triangular solve (vectorised over candidates, not incremental)."""
    xn = F.normalize(x[0].float(), dim=-1)
    q = quality[0].float()
    chosen = []
    for _ in range(k):
        if not chosen:
            j = int((q * q).argmax())
        else:
            L_s = q[chosen, None] * (xn[chosen] @ xn[chosen].T) * q[None, chosen]
            chol = torch.linalg.cholesky(L_s)
            b = q[chosen, None] * (xn[chosen] @ xn.T) * q[None, :]  # [s, T]
            v = torch.linalg.solve_triangular(chol, b, upper=False)
            d2 = q * q - (v * v).sum(0)
            d2[chosen] = float("-inf")
            j = int(d2.argmax())
        chosen.append(j)
    return sorted(chosen)


def _select_impls(device):
    """The eager loop and every vidtok backend that runs here (the persistent CUDA kernel on a GPU)."""
    return ["eager loop"] + [f"vidtok {b}" for b in runnable_backends("greedy_select", device, torch.float32)]


def _select_cases():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for shape in SELECT_SHAPES:
        for op in ("mmr", "dpp"):
            for impl in _select_impls(device):
                yield pytest.param(shape, op, impl, id=f"{'x'.join(map(str, shape))}-{op}-{impl}")


@pytest.mark.parametrize("shape,op,impl", list(_select_cases()))
def bench_selection(shape, op, impl, device, measure, benchmark):
    T, C, Q, k = shape
    benchmark.group = f"{op} T={T} C={C} Q={Q} k={k} fp32"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, T, C, generator=g).to(device)
    rel = torch.rand(1, Q, T, generator=g).to(device)
    backend = impl.split()[-1]
    if op == "mmr":
        fn = (lambda: eager_mmr(rel, x, k, 0.5)) if impl == "eager loop" else (lambda: vidtok.greedy_select(rel, k, x=x, lam=0.5, backend=backend))
    else:
        quality = torch.exp(rel[:, 0] / 0.1)
        fn = (lambda: eager_dpp(x, quality, k)) if impl == "eager loop" else (lambda: vidtok.dpp_select(x, k, quality=quality, backend=backend))
    measure(fn, bytes_moved=k * x.numel() * 4, rounds=3, iterations=1)  # the eager loops take ~0.5 s a call on a GPU


# ---------------------------------------------------------------------------------------------------
# scene cuts on a real clip: vidtok (thumbnail embeddings -> frame_scores -> scene_boundaries) beside
# PySceneDetect's ContentDetector on the decoded frames, both on the CPU (PySceneDetect has no GPU path).
# The clip and the thumbnails are bench/select_quality.py's (its F1 table is the quality side).


def _select_quality():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_vidtok_bench_select_quality", Path(__file__).with_name("select_quality.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def real_clip():
    pytest.importorskip("av")
    quality = _select_quality()
    try:
        frames, cuts, _ = quality.build_clip()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return quality, frames, cuts


SCENE_IMPLS = ["vidtok on cached embeddings", "vidtok incl. thumbnails from frames", "PySceneDetect ContentDetector"]


@pytest.mark.parametrize("impl", SCENE_IMPLS)
def bench_scene_cuts(impl, real_clip, measure, benchmark):
    """vidtok's own work is frame_scores + scene_boundaries on embeddings a video LLM has cached anyway;
    "incl. thumbnails" adds making grey 16x16 thumbnails from the frames (the stand-in embedding of
    bench/select_quality.py), which is what PySceneDetect's frame-level detector competes with."""
    quality, frames, cuts = real_clip
    T, H, W, _ = frames.shape
    benchmark.group = f"scene cuts, real clip T={T} {H}x{W} (CPU)"
    emb = quality.thumbnails(frames, "grey16")

    def vidtok_cuts(x):
        adjacent = vidtok.frame_scores(x, backend="reference").adjacent
        return vidtok.scene_boundaries(adjacent, method="threshold", threshold=0.5)

    if impl.startswith("PySceneDetect"):
        ContentDetector = pytest.importorskip("scenedetect").ContentDetector
        bgr = np.ascontiguousarray(frames[..., ::-1])
        fn, bytes_moved = (lambda: quality.pyscenedetect_cuts(bgr, ContentDetector())), frames.size
    elif impl == "vidtok on cached embeddings":
        fn, bytes_moved = (lambda: vidtok_cuts(emb)), emb.numel() * 4
    else:
        fn, bytes_moved = (lambda: vidtok_cuts(quality.thumbnails(frames, "grey16"))), frames.size
    measure(fn, bytes_moved=bytes_moved, rounds=3, iterations=1)

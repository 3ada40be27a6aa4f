"""Importance-aware merging: vidtok against the eager PyTorch the papers' code runs, side by side.

Groups (each one shape, every implementation; the eager ones, named "eager ...", are rewritten here
from the papers and the way their repositories compute, not copied):
- ``attention_received``: vidtok.attention_received (one pass over the keys from the forward's LSE,
  or two passes without it) vs the eager form of FastV / VisionZip / HoliTom: the attention matrix
  materialised (``softmax(q k^T * scale)``, what ``output_attentions=True`` returns), then summed over
  the query rows and averaged over heads. The "[CLS] row" group takes one query row (VisionZip).
- ``dpc_knn_merge``: vs TCFormer-style DPC-kNN as PruneVid and HoliTom run it: ``torch.cdist`` / sqrt(C),
  ``topk`` of the smallest distances, density with a 1e-6 random tie-break, a [N, N] float mask of
  denser tokens, the masked minimum, ``topk`` centres, ``argmin`` assignment, then the cluster mean by
  a one-hot ``bmm`` (PruneVid) divided by the counts.
- ``connected_components_merge``: vs the dense cosine matrix thresholded on the device, then a
  union-find over the edge list on the host (``nonzero`` + a Python loop, the form graph code in
  token-merging repositories takes), then the component means with ``index_add_``.
- ``merge_by_assignment``: vs the one-hot ``bmm`` mean (PruneVid, HoliTom) and an ``index_add_``.

Shapes: attention over the visual tokens of a video LLM prompt (B = 1, H = 16, D = 128, bf16, N = 32
frames x 196 = 6,272 on GPUs; on CPUs H = 8, D = 64, fp32, N = 2,048); clustering per frame as
HoliTom and PruneVid do (B = 32 frames, N = 196 tokens, C = 1152 (SigLIP), k = 7, 20 clusters; on
CPUs B = 8) and over a whole clip (B = 1, N = 8 x 196 = 1,568); tokens from vidtok.testing.video_tokens
made to cluster (centres + noise). VIDTOK_BENCH_QUICK=1 runs tiny shapes.

Work recorded in extra_info: ``bytes_moved`` is the floor (inputs read once, outputs written once);
``flops`` the Q K^T or distance GEMM every implementation must do.
"""

import os

import pytest
import torch

import vidtok
from vidtok.testing import runnable_backends

ON_GPU = torch.cuda.is_available()
QUICK = os.environ.get("VIDTOK_BENCH_QUICK") == "1"
# (label, B, H, N, D, dtype)
ATTENTION = [("video-LLM 32x196 tokens", 1, 16, 6272, 128, torch.bfloat16)]
# (label, B, N, C, k, clusters)
CLUSTERS = [("per frame 32x196", 32, 196, 1152, 7, 20), ("whole clip 8x196", 1, 1568, 1152, 7, 160)]
if QUICK:
    ATTENTION = [("tiny", 1, 2, 128, 32, torch.float32)]
    CLUSTERS = [("tiny", 2, 64, 32, 5, 8)]
elif not ON_GPU:
    ATTENTION = [("video-LLM 8x256 tokens (CPU)", 1, 8, 2048, 64, torch.float32)]
    CLUSTERS = [("per frame 8x196 (CPU)", 8, 196, 1152, 7, 20), ("whole clip 8x196", 1, 1568, 1152, 7, 160)]


def _device():
    return torch.device("cuda" if ON_GPU else "cpu")


def clustered_tokens(B, N, C, *, centres=12, noise=0.35, device="cpu", dtype=torch.float32, seed=0):
    """Tokens [B, N, C] around ``centres`` directions per sequence (objects), unit-scale noise ``noise``."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, centres, C, generator=g)
    pick = torch.randint(0, centres, (B, N), generator=g)
    x = base[torch.arange(B)[:, None], pick] + noise * torch.randn(B, N, C, generator=g)
    return x.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------
# eager baselines


def eager_attention_received(q, k, rows=None):
    """FastV / VisionZip: the attention matrix, then its column sums over the query rows, mean over heads."""
    attn = torch.softmax((q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5, dim=-1)  # [B, H, M, N]
    if rows is not None:
        attn = attn[:, :, rows]
    return attn.sum(2).mean(1)


def eager_dpc_knn_merge(x, k, clusters):
    """DPC-kNN (TCFormer's form, as PruneVid and HoliTom run it) and the one-hot cluster mean."""
    B, N, C = x.shape
    xf = x.float()
    dist = torch.cdist(xf, xf) / C**0.5
    nearest = torch.topk(dist, k=k, dim=-1, largest=False).values
    density = (-(nearest**2).mean(-1)).exp()
    density = density + torch.rand(density.shape, device=x.device) * 1e-6  # the papers' tie-break
    mask = (density[:, None, :] > density[:, :, None]).float()
    dist_max = dist.flatten(1).max(-1).values[:, None, None]
    parent_dist = (dist * mask + dist_max * (1 - mask)).min(-1).values
    score = parent_dist * density
    centres = score.topk(clusters, dim=-1).indices
    to_centres = dist.gather(1, centres[..., None].expand(B, clusters, N))  # [B, clusters, N]
    assign = to_centres.argmin(1)
    assign.scatter_(1, centres, torch.arange(clusters, device=x.device).expand(B, clusters))
    one_hot = torch.nn.functional.one_hot(assign, clusters).float()  # [B, N, clusters]
    sums = one_hot.transpose(1, 2) @ xf
    return (sums / one_hot.sum(1)[..., None]).to(x.dtype)


def eager_components_merge(x, threshold):
    """Dense cosine graph on the device, union-find over its edges on the host, component means."""
    B, N, C = x.shape
    unit = torch.nn.functional.normalize(x.float(), dim=-1)
    edges = (unit @ unit.transpose(1, 2) >= threshold).nonzero().tolist()
    parent = [list(range(N)) for _ in range(B)]

    def find(p, i):
        while p[i] != i:
            p[i] = p[p[i]]
            i = p[i]
        return i

    for b, i, j in edges:
        ri, rj = find(parent[b], i), find(parent[b], j)
        if ri != rj:
            parent[b][max(ri, rj)] = min(ri, rj)
    outs = []
    for b in range(B):
        roots = torch.tensor([find(parent[b], i) for i in range(N)], device=x.device)
        ids = torch.unique(roots, return_inverse=True)[1]
        L = int(ids.max()) + 1
        sums = torch.zeros(L, C, device=x.device).index_add_(0, ids, x[b].float())
        counts = torch.zeros(L, device=x.device).index_add_(0, ids, torch.ones(N, device=x.device))
        outs.append(sums / counts[:, None])
    return outs


def eager_merge_one_hot(x, assign, groups):
    one_hot = torch.nn.functional.one_hot(assign, groups).float()
    return (one_hot.transpose(1, 2) @ x.float()) / one_hot.sum(1).clamp_min(1)[..., None]


# ---------------------------------------------------------------------------------------------------
# benchmarks


def _attention_impls(device, dtype):
    impls = {"eager softmax matrix": lambda q, k, lse, rows: eager_attention_received(q, k, rows)}
    for backend in runnable_backends("attention_received", device, dtype):
        impls[f"vidtok {backend} (lse given)"] = lambda q, k, lse, rows, b=backend: vidtok.attention_received(
            q, k, lse, reduce="sum" if rows is None else "cls", backend=b)
        impls[f"vidtok {backend} (two passes)"] = lambda q, k, lse, rows, b=backend: vidtok.attention_received(
            q, k, reduce="sum" if rows is None else "cls", backend=b)
    return impls


def _attention_cases():
    for workload in ATTENTION:
        for rows in ("all rows", "[CLS] row"):
            for name in _attention_impls(_device(), workload[-1]):
                yield pytest.param(workload, rows, name, id=f"{workload[0]}-{rows}-{name}")


@pytest.mark.parametrize("workload,rows,impl", list(_attention_cases()))
def bench_attention_received(workload, rows, impl, device, measure, benchmark):
    label, B, H, N, D, dtype = workload
    benchmark.group = f"attention_received {label} {rows}: B={B} H={H} N={N} D={D} {str(dtype)[6:]}"
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, N, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, H, N, D, generator=g).to(device=device, dtype=dtype)
    lse = torch.logsumexp((q @ k.transpose(-1, -2)).float() * D**-0.5, -1)  # what the forward returns
    sel = None if rows == "all rows" else slice(0, 1)
    fn = _attention_impls(device, dtype)[impl]
    M = N if sel is None else 1
    measure(lambda: fn(q, k, lse, sel), bytes_moved=(B * H * (M + N) * D) * q.element_size() + B * N * 4,
            flops=2 * B * H * M * N * D)


def _cluster_impls(device):
    impls = {"eager DPC-kNN (TCFormer form)": lambda x, k, c: eager_dpc_knn_merge(x, k, c)}
    impls["vidtok dpc_knn_merge"] = lambda x, k, c: vidtok.dpc_knn_merge(x, k, c)
    return impls


def _cluster_cases():
    for workload in CLUSTERS:
        for name in _cluster_impls(_device()):
            yield pytest.param(workload, name, id=f"{workload[0]}-{name}")


@pytest.mark.parametrize("workload,impl", list(_cluster_cases()))
def bench_dpc_knn_merge(workload, impl, device, measure, benchmark):
    label, B, N, C, k, clusters = workload
    benchmark.group = f"dpc_knn_merge {label}: B={B} N={N} C={C} k={k} clusters={clusters} fp32"
    x = clustered_tokens(B, N, C, device=device)
    fn = _cluster_impls(device)[impl]
    measure(lambda: fn(x, k, clusters), bytes_moved=x.numel() * 4 + B * clusters * C * 4, flops=2 * B * N * N * C)


def _component_impls():
    return {"eager dense graph + host union-find": eager_components_merge,
            "vidtok connected_components_merge": lambda x, t: vidtok.connected_components_merge(x, t)}


def _component_cases():
    for workload in CLUSTERS:
        for name in _component_impls():
            yield pytest.param(workload, name, id=f"{workload[0]}-{name}")


@pytest.mark.parametrize("workload,impl", list(_component_cases()))
def bench_connected_components_merge(workload, impl, device, measure, benchmark):
    label, B, N, C, _, _ = workload
    benchmark.group = f"connected_components_merge {label}: B={B} N={N} C={C} threshold 0.8 fp32"
    x = clustered_tokens(B, N, C, device=device)
    fn = _component_impls()[impl]
    measure(lambda: fn(x, 0.8), bytes_moved=x.numel() * 4 * 2, flops=2 * B * N * N * C)


def _assignment_impls(device):
    impls = {"eager one-hot bmm": eager_merge_one_hot}
    for backend in runnable_backends("merge_by_assignment", device, torch.float32):
        impls[f"vidtok {backend}"] = lambda x, a, L, b=backend: vidtok.merge_by_assignment(x, a, groups=L, mode="mean", backend=b)
    return impls


def _assignment_cases():
    for workload in CLUSTERS:
        for name in _assignment_impls(_device()):
            yield pytest.param(workload, name, id=f"{workload[0]}-{name}")


@pytest.mark.parametrize("workload,impl", list(_assignment_cases()))
def bench_merge_by_assignment(workload, impl, device, measure, benchmark):
    label, B, N, C, _, clusters = workload
    benchmark.group = f"merge_by_assignment {label}: B={B} N={N} C={C} groups={clusters} fp32"
    x = clustered_tokens(B, N, C, device=device)
    assign = torch.randint(0, clusters, (B, N), generator=torch.Generator().manual_seed(1)).to(device)
    fn = _assignment_impls(device)[impl]
    measure(lambda: fn(x, assign, clusters), bytes_moved=x.numel() * 4 + B * clusters * C * 4)

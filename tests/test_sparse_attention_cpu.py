"""vidtok's cpu backend of sparse_attention (vidtok.cpu.sparse): ATen's fused CPU kernels over groups
of query tiles picked by a cost model. Every grouping against the float64 oracle; the fused kernel
call (with the caller's fix-up of rows that have no key) against explicit softmax math."""

import pytest
import torch

import vidtok
from vidtok import masks as M
from vidtok.cpu import sparse as cpu_sparse
from vidtok.testing import check_sparse_attention_float64


def _explicit(q, k, v, bias, scale, grad_out):
    """In float64: softmax(scale q k^T + bias) v, its LSE (rows with no allowed key give 0 and -inf),
    and (dq, dk, dv) for ``grad_out`` by FlashAttention-2's formulas: P = exp(S - LSE), dV = P^T dO,
    dS = P * (dO V^T - rowsum(dO * O)), dQ = scale dS K, dK = scale dS^T Q."""
    q, k, v, g = q.double(), k.double(), v.double(), grad_out.double()
    s = (q @ k.transpose(-1, -2)) * scale + bias.double()
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])  # such a row: exp(-inf) = 0
    out = p @ v
    ds = p * (g @ v.transpose(-1, -2) - (g * out).sum(-1, keepdim=True))
    return out, lse, (ds @ k * scale, ds.transpose(-1, -2) @ q * scale, p.transpose(-1, -2) @ g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(3))
def test_fused_kernel_matches_explicit_math(dtype, seed):
    """The fused CPU kernel and its backward, with a bias that has -inf pairs, a row with no allowed
    key (fixed up by the caller) and broadcast over heads, on odd sizes: output, LSE and gradients."""
    g = torch.Generator().manual_seed(seed)
    R, H, M_, L, D = 3, 2, 16, 37, 9
    q, k, v = (torch.randn(R, H, n, D, generator=g, dtype=dtype) for n in (M_, L, L))
    bias = torch.randn(R, 1, M_, L, generator=g, dtype=dtype)
    bias[torch.rand(R, 1, M_, L, generator=g) < 0.6] = float("-inf")
    bias[1, :, 3] = float("-inf")  # a row with no allowed key
    empty = torch.isinf(bias).all(-1)
    out, lse = cpu_sparse._attend(q, k, v, bias, 0.3)
    out, lse = out.masked_fill(empty[..., None], 0), lse.masked_fill(empty, float("-inf"))
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    e_out, e_lse, expected = _explicit(q, k, v, bias, 0.3, grad_out)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(out.double(), e_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), e_lse, atol=tol, rtol=tol)
    grads = cpu_sparse._attend_backward(grad_out, q, k, v, out, torch.where(torch.isinf(lse), 0.0, lse), bias, 0.3)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("grouping", ["tiles_compacted", "ranges", "model"])
def test_query_groupings_match_oracle(monkeypatch, grouping, seed):
    """The cpu backend computes consecutive query tiles together against one key set: a range of key
    tiles (a view) or just the runs of keys its queries attend to (a copy), as its cost model picks.
    Forced to one tile per group with compacted keys, to ranges of up to 12 tiles, and left to the
    model: output, LSE and gradients (GQA, log sizes, dLSE) equal the float64 oracle each way, on
    pruned layouts of many tiles (N not a multiple of the block)."""
    if grouping == "tiles_compacted":
        monkeypatch.setattr(cpu_sparse, "_MAX_GROUP_TILES", 1)
        monkeypatch.setattr(cpu_sparse, "_GATHER_BYTES", float("inf"))  # copies cost nothing: always compact
    elif grouping == "ranges":
        monkeypatch.setattr(cpu_sparse, "_GATHER_BYTES", 1e-9)  # copies cost everything: always a range
        monkeypatch.setattr(cpu_sparse, "_CALL_SECONDS", 1.0)  # and as few calls as the score budget allows
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(2, 5, 6, 7, generator=g) < 0.6
    layout = vidtok.VideoLayout.from_keep(keep, num_global=1)
    spec = [M.causal_in_time() & M.spatial_window(3, 3), M.neighborhood((3, 3, 3)), M.temporal_window(1, 0) | M.global_tokens()][seed]
    plan = vidtok.build_plan(layout, spec, block=(16, 16))
    B, N = layout.batch, layout.num_tokens
    groups = cpu_sparse._TileMasks(plan.tile_map[:, 0], plan.bits, 16, 16, N, torch.float64).groups(4, 8)
    compacted = [grp.key_bytes is not None for grp in groups]
    sizes = [grp.i1 - grp.i0 for grp in groups]
    if grouping == "tiles_compacted":
        assert any(compacted) and max(sizes) == 1  # a range stays where compaction drops no key
    elif grouping == "ranges":
        assert not any(compacted) and max(sizes) > 1
    q, k, v = (torch.randn(B, n, N, 8, generator=g, dtype=torch.float64).requires_grad_() for n in (4, 2, 2))
    ls = (torch.rand(B, N, generator=g, dtype=torch.float64) * 2).log().requires_grad_()
    check_sparse_attention_float64("cpu", layout, spec, plan, q, k, v, ls)
    check_sparse_attention_float64("cpu", layout, spec, plan, q, k, v, None, use_lse=False)  # no extra head channel


def test_auto_picks_cpu_on_cpu_tensors_and_never_on_gpus():
    assert vidtok._backend.choose("sparse_attention", torch.device("cpu"), torch.float32) == "cpu"
    why = vidtok._backend.reasons("sparse_attention", "cpu", torch.device("cuda"), torch.float16)
    assert why == ["the cpu backend runs on CPU tensors, got cuda"]

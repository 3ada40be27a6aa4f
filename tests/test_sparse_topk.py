"""Data-dependent plans: per-head plans (per_head_plan), build_plan_topk against a brute-force
selection, classify_heads on heads with known structure, and every sparse_attention backend on
per-head plans against the float64 oracle (forward and gradients)."""

import math

import pytest
import torch

import vidtok
from vidtok import masks as M
from vidtok.testing import (
    runnable_backends, sparse_attention_oracle as oracle, sparse_random_layout, sparse_random_spec, sparse_truth_mask,
)


def _csr_rebuild(plan):
    """tile_map rebuilt from the CSR and from its transpose."""
    B, Hp, nQ, nK = plan.tile_map.shape
    lengths = (plan.row_ptr[1:] - plan.row_ptr[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(B * Hp * nQ), lengths)
    n = int(plan.row_ptr[-1])
    by_row = torch.zeros(B * Hp * nQ, nK, dtype=torch.int32)
    by_row[rows, plan.col_idx[:n].long()] = plan.entry_bits[:n]
    lengths = (plan.col_ptr[1:] - plan.col_ptr[:-1]).long()
    cols = torch.repeat_interleave(torch.arange(B * Hp * nK), lengths)
    by_col = torch.zeros(B * Hp * nK, nQ, dtype=torch.int32)
    by_col[cols, plan.row_idx[:n].long()] = plan.entry_bits_t[:n]
    # rows list their tiles in ascending order
    for ptr, idx in ((plan.row_ptr, plan.col_idx), (plan.col_ptr, plan.row_idx)):
        for r in range(ptr.shape[0] - 1):
            seg = idx[ptr[r] : ptr[r + 1]]
            assert (seg[1:] > seg[:-1]).all()
    return by_row.view(B, Hp, nQ, nK), by_col.view(B, Hp, nK, nQ).transpose(-1, -2)


def _inputs(B, H, Hk, N, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, N, D, generator=g).to(dtype) for h in (H, Hk, Hk))


@pytest.mark.parametrize("seed", range(4))
def test_per_head_plan_selects_each_heads_spec(seed):
    layout, rng = sparse_random_layout(500 + seed, max_grid=(3, 4, 5))
    specs = [sparse_random_spec(rng, layout.grid) for _ in range(3)]
    plans = [vidtok.build_plan(layout, s, block=(16, 16)) for s in specs]
    H = 4
    heads = torch.tensor([rng.randrange(3) for _ in range(layout.batch * H)]).view(layout.batch, H)
    plan = vidtok.per_head_plan(plans, heads if seed % 2 else heads[0])
    heads = heads if seed % 2 else heads[:1].expand(layout.batch, -1)
    assert plan.heads == H
    dense = plan.to_dense()
    for b in range(layout.batch):
        for h in range(H):
            assert torch.equal(dense[b, h], sparse_truth_mask(layout, specs[heads[b, h]])[b]), (b, h)
    by_row, by_col = _csr_rebuild(plan)
    assert torch.equal(by_row, plan.tile_map) and torch.equal(by_col, plan.tile_map)
    assert plan.allowed_pairs == int(dense.sum())


def _coarse_truth(q, k, layout, block, group, scale):
    """float64 tile scores [B, H, nQ, nK] computed one tile pair at a time from their tokens."""
    B, H, N, D = q.shape
    G = H // k.shape[1]
    valid = layout.kind != 0
    BQ, BK = block
    nQ, nK = -(-N // BQ), -(-N // BK)

    def pooled(x, b, h, start, size):
        idx = [i for i in range(start, min(start + size, N)) if valid[b, i]]
        return (x[b, h, idx].double().mean(0) if idx else None), len(idx)

    out = torch.full((B, H, nQ, nK), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(nQ):
                for j in range(nK):
                    best = float("-inf")
                    for qs in range(i * BQ, (i + 1) * BQ, group):
                        pq, cq = pooled(q, b, h, qs, group)
                        if not cq:
                            continue
                        terms = []
                        for ks in range(j * BK, (j + 1) * BK, group):
                            pk, ck = pooled(k, b, h // G, ks, group)
                            if ck:
                                terms.append(scale * float(pq @ pk) + math.log(ck))
                        if terms:
                            best = max(best, float(torch.logsumexp(torch.tensor(terms, dtype=torch.float64), 0)))
                    out[b, h, i, j] = best
    return out


def _chosen(scores, topk, top_p):
    """bool [..., nK]: the brute-force choice, row by row (ties: lower index)."""
    chosen = torch.zeros(scores.shape, dtype=torch.bool)
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in scores.shape[:-1])):
        row = scores[tuple(idx)]
        order = sorted(range(row.shape[0]), key=lambda j: (-row[j].item(), j))
        order = [j for j in order if row[j] > float("-inf")]
        if top_p is not None:
            probs = torch.softmax(row[order], 0) if order else row[:0]
            kept, mass = [], 0.0
            for j, p in zip(order, probs.tolist()):
                if mass >= top_p:
                    break
                kept.append(j)
                mass += p
            order = kept
        if topk is not None:
            order = order[:topk]
        chosen[tuple(idx)][order] = True
    return chosen


@pytest.mark.parametrize("case", [
    dict(grid=(3, 4, 4), cube=(1, 4, 4), G=3, at=0, topk=2, top_p=None, pool=None, always=None),
    dict(grid=(4, 4, 4), cube=(2, 2, 4), G=0, at=0, topk=1, top_p=None, pool=(1, 2, 4), always="diag"),
    dict(grid=(3, 5, 3), cube=None, G=2, at=45, topk=None, top_p=0.6, pool=None, always="global"),
    dict(grid=(2, 4, 8), cube=(2, 4, 4), G=5, at=64, topk=3, top_p=0.9, pool=(1, 4, 4), always="global"),
], ids=["topk", "pool-diag", "top_p-rowmajor", "both"])
def test_topk_matches_brute_force(case):
    """The chosen tiles equal a brute-force selection from float64 pooled scores; chosen tiles allow
    every valid pair, the others keep the always spec's mask; the CSR has a fixed capacity."""
    grid, cube = case["grid"], case["cube"]
    layout = vidtok.VideoLayout.from_grid(*grid, num_global=case["G"], global_at=case["at"], cube=cube)
    always = {None: None, "diag": M.cube_window(cube or (1, 1, 1)), "global": M.global_tokens()}[case["always"]]
    H, Hk, D = 4, 2, 8
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, H, layout.num_tokens, D, generator=g), torch.randn(1, Hk, layout.num_tokens, D, generator=g)
    block = (16, 16) if case["pool"] is None else (32, 32)
    plan = vidtok.build_plan_topk(q, k, layout, topk=case["topk"], top_p=case["top_p"], pool=case["pool"], always=always, block=block)
    group = block[0] if case["pool"] is None else math.prod(case["pool"])
    scores = _coarse_truth(q, k, layout, block, group, D**-0.5)
    chosen = _chosen(scores, case["topk"], case["top_p"])
    valid = (layout.kind[0] != 0)
    nQ, nK = scores.shape[2:]
    pad = torch.zeros(nQ * block[0], dtype=torch.bool)
    pad[: layout.num_tokens] = valid
    every_valid = pad.view(nQ, block[0], 1, 1) & pad.view(1, 1, nK, block[1])  # [nQ, BQ, nK, BK]
    base = torch.zeros(1, layout.num_tokens, layout.num_tokens, dtype=torch.bool) if always is None else sparse_truth_mask(layout, always)
    dense = plan.to_dense()  # [1, H, N, N]
    for h in range(H):
        want = torch.zeros(nQ * block[0], nK * block[1], dtype=torch.bool)
        want[: layout.num_tokens, : layout.num_tokens] = base[0]
        tiles = want.view(nQ, block[0], nK, block[1])
        tiles |= every_valid & chosen[0, h][:, None, :, None]
        assert torch.equal(dense[0, h], want[: layout.num_tokens, : layout.num_tokens]), h
    width = nK if case["topk"] is None else case["topk"]
    assert plan.row_capacity <= nK and plan.col_idx.shape[0] == H * nQ * plan.row_capacity
    assert (plan.tile_map != 0).sum(-1).max() <= plan.row_capacity <= width + (0 if always is None else nK)
    by_row, by_col = _csr_rebuild(plan)
    assert torch.equal(by_row, plan.tile_map) and torch.equal(by_col, plan.tile_map)


def test_plan_from_tiles_allows_every_valid_pair_of_the_selected_tiles():
    layout = vidtok.VideoLayout.from_grid(2, 3, 5, num_global=2, global_at=30, cube=(1, 2, 4))
    g = torch.Generator().manual_seed(4)
    nQ = -(-layout.num_tokens // 16)
    valid = torch.zeros(nQ * 16, dtype=torch.bool)
    valid[: layout.num_tokens] = layout.kind[0] != 0
    for shape in ((1, nQ, nQ), (1, 3, nQ, nQ)):
        tiles = torch.rand(shape, generator=g) < 0.4
        plan = vidtok.plan_from_tiles(layout, tiles, always=M.global_tokens(), block=(16, 16))
        per_head = tiles if tiles.dim() == 4 else tiles[:, None]
        want = (per_head[0][:, :, None, :, None] & valid.view(nQ, 16)[None, :, :, None, None] & valid.view(nQ, 16)[None, None, None])
        want = want.reshape(per_head.shape[1], nQ * 16, nQ * 16)[:, : layout.num_tokens, : layout.num_tokens]
        want = want | sparse_truth_mask(layout, M.global_tokens())
        dense = plan.to_dense()
        assert torch.equal(dense[0] if tiles.dim() == 4 else dense[0][None], want)
    with pytest.raises(ValueError, match=r"tiles must be \[B, \(H,\) nQ, nK\]"):
        vidtok.plan_from_tiles(layout, torch.ones(1, nQ, nQ + 1, dtype=torch.bool), block=(16, 16))
    with pytest.raises(TypeError, match="tiles must be a bool tensor"):
        vidtok.plan_from_tiles(layout, torch.ones(1, nQ, nQ), block=(16, 16))


def test_topk_at_full_density_is_dense_attention():
    """topk = every key tile: the plan is every valid pair, and the attention equals dense SDPA."""
    layout = vidtok.VideoLayout.from_grid(3, 4, 4, num_global=4, global_at=48, cube=(1, 2, 4))
    q, k, v = _inputs(2, 4, 2, layout.num_tokens, 16, torch.float32, 0)
    layout = layout.expand(2)
    plan = vidtok.build_plan_topk(q, k, layout, topk=100, block=(16, 16))
    assert plan.density == 1.0
    src = [layout.unpermute(x) for x in (q, k, v)]
    dense = torch.nn.functional.scaled_dot_product_attention(src[0], *(x.repeat_interleave(2, 1) for x in src[1:]))
    torch.testing.assert_close(layout.unpermute(vidtok.sparse_attention(q, k, v, plan)), dense, atol=1e-5, rtol=1e-5)


def test_topk_static_shapes_and_no_host_sync():
    """Under torch.compile(fullgraph=True) -- which fails on a host sync or a data-dependent shape --
    the plan builds from q and k and its attention runs; equal to the eager result."""
    torch._dynamo.reset()
    layout = vidtok.VideoLayout.from_grid(2, 4, 8, num_global=3, cube=(1, 4, 4))
    always = vidtok.build_plan(layout, M.cube_window((1, 4, 4)) | M.global_tokens(), block=(16, 16))
    q, k, v = _inputs(1, 2, 2, layout.num_tokens, 8, torch.float32, 3)

    def f(q, k, v):
        plan = vidtok.build_plan_topk(q, k, layout, topk=2, top_p=0.8, always=always)
        return vidtok.sparse_attention(q, k, v, plan), plan.tile_map

    out, tiles = torch.compile(f, fullgraph=True)(q, k, v)
    want, want_tiles = f(q, k, v)
    assert torch.equal(tiles, want_tiles)
    torch.testing.assert_close(out, want)


def test_classify_heads_finds_spatial_and_temporal_heads():
    """Head 0's queries and keys encode the frame (it attends within its frame: a spatial head),
    head 1's the position in the frame (it attends to its position in every frame: a temporal
    head); with and without v; padding among the sampled queries is skipped."""
    keep = torch.ones(2, 4, 6, 6, dtype=torch.bool)
    keep[1, 2:] = False  # the second video: 2 frames, then padding
    layout = vidtok.VideoLayout.from_keep(keep, num_global=1)
    c = layout.coords.long().clamp_min(0)
    D = 36

    def code(x):  # a one-hot code of the integer x, scaled for sharp attention
        return torch.nn.functional.one_hot(x, D).float() * 6.0

    q = torch.stack([code(c[..., 0]), code(c[..., 1] * 6 + c[..., 2])], 1)
    specs = [M.frame_local() | M.global_tokens(), M.spatial_window(1, 1) | M.global_tokens()]
    for v in (None, torch.randn(2, 2, layout.num_tokens, 8, generator=torch.Generator().manual_seed(0))):
        choice = vidtok.classify_heads(q, q, layout, specs, sample=40, v=v)
        assert choice.dtype == torch.int64 and choice.tolist() == [[0, 1], [0, 1]]
    default = vidtok.default_head_specs(layout.grid)
    assert len(default) == 2 and vidtok.classify_heads(q, q, layout, sample=16).shape == (2, 2)
    plan = vidtok.per_head_plan([vidtok.build_plan(layout, s, block=(16, 16)) for s in specs], choice)
    assert torch.equal(plan.to_dense()[:, 1], sparse_truth_mask(layout, specs[1]))


def _cases():
    for dtype in (torch.float32, torch.float16):
        for backend in runnable_backends("sparse_attention", "cpu", dtype):
            yield pytest.param(dtype, backend, id=f"{str(dtype)[6:]}-{backend}")


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype,backend", list(_cases()))
def test_per_head_plans_match_oracle_with_gradients(seed, dtype, backend):
    """Per-head plans (top-k tiles unioned with a random spec) on random layouts -- padding, global
    tokens anywhere, cube order, N not a multiple of the block, query tiles with no key, GQA, log
    sizes, a loss on the LSE (dLSE) -- forward and gradients against the float64 oracle."""
    layout, rng = sparse_random_layout(700 + seed, max_grid=(3, 4, 5))
    spec = sparse_random_spec(rng, layout.grid) & ~M.frame_local()  # leaves some queries without keys
    B, N = layout.batch, layout.num_tokens
    H, Hk, D = 4, 2, 8
    inputs = (*_inputs(B, H, Hk, N, D, torch.float32, seed), torch.randn(B, N, generator=torch.Generator().manual_seed(seed)))
    plan = vidtok.build_plan_topk(inputs[0], inputs[1], layout, topk=1, always=spec, block=rng.choice([(16, 16), (32, 32)]))
    mask = plan.to_dense()
    q, k, v, ls = (x.to(dtype if x.dim() == 4 else torch.float32).requires_grad_() for x in inputs)
    out, lse = vidtok.sparse_attention(q, k, v, plan, kv_log_size=ls, return_lse=True, backend=backend)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, ls)]
    e_out, e_lse = oracle(*leaves[:3], mask, D**-0.5, leaves[3])
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.double(), e_out, atol=tol, rtol=tol)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(e_lse))
    g = torch.Generator().manual_seed(seed + 1)
    w_out, w_lse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    loss = (out.float() * w_out).sum() + (torch.where(torch.isfinite(lse), lse, 0) * w_lse).sum()
    e_loss = (e_out * w_out.double()).sum() + (torch.where(torch.isfinite(e_lse), e_lse, 0) * w_lse.double()).sum()
    for got, exp, name in zip(torch.autograd.grad(loss, (q, k, v, ls)), torch.autograd.grad(e_loss, leaves), "q k v ls".split()):
        atol = 1e-4 if dtype == torch.float32 else 16 * tol * exp.abs().max().item()
        torch.testing.assert_close(got.double(), exp, atol=atol, rtol=1e-4 if dtype == torch.float32 else 0, msg=name)


@pytest.mark.parametrize("backend", runnable_backends("sparse_attention", "cpu", torch.float32))
def test_opcheck_on_a_per_head_plan(backend):
    layout = vidtok.VideoLayout.from_grid(2, 4, 4, num_global=2, cube=(1, 2, 4))
    q, k, v = (x.requires_grad_() for x in _inputs(1, 2, 1, layout.num_tokens, 8, torch.float32, 5))
    plan = vidtok.build_plan_topk(q.detach(), k.detach(), layout, topk=1, always=M.global_tokens(), block=(16, 16))
    ls = torch.zeros(1, layout.num_tokens, requires_grad=True)
    args = (q, k, v, ls, list(plan.tensors), 16, 16, 0.3, backend)
    torch.library.opcheck(torch.ops.vidtok.sparse_attention.default, args)
    out, lse = torch.ops.vidtok.sparse_attention.default(*args)
    bargs = (torch.randn_like(out), torch.randn_like(lse), q.detach(), k.detach(), v.detach(), ls.detach(),
             out.detach(), lse.detach(), list(plan.tensors), 16, 16, 0.3, backend)
    torch.library.opcheck(torch.ops.vidtok.sparse_attention_backward.default, bargs)


@pytest.mark.parametrize("call,error,match", [
    (lambda q, k, L, P: vidtok.build_plan_topk(q, k, L), ValueError, "needs topk=... or top_p="),
    (lambda q, k, L, P: vidtok.build_plan_topk(q, k, L, topk=0), ValueError, "topk must be >= 1"),
    (lambda q, k, L, P: vidtok.build_plan_topk(q, k, L, top_p=1.5), ValueError, r"top_p must be a float in \(0, 1\]"),
    (lambda q, k, L, P: vidtok.build_plan_topk(q[:, :, 1:], k, L, topk=1), ValueError, "k must be"),
    (lambda q, k, L, P: vidtok.build_plan_topk(q, k, L, topk=1, pool=(1, 2, 2)), ValueError, "needs a cube-ordered layout"),
    (lambda q, k, L, P: vidtok.build_plan_topk(q, k, L, topk=1, block=(16, 32)), ValueError, "BQ and BK must be equal"),
    (lambda q, k, L, P: vidtok.build_plan_topk(q, k, L, topk=1, always=P, block=(32, 32)), ValueError, "differs from the always plan"),
    (lambda q, k, L, P: vidtok.build_plan_topk(q, k, vidtok.VideoLayout.from_grid(2, 4, 4), topk=1, always=P), ValueError,
     "the layout holds"),
    (lambda q, k, L, P: vidtok.build_plan_topk(q, k, L, topk=1, always="diag"), TypeError, "always must be"),
    (lambda q, k, L, P: vidtok.per_head_plan([P, vidtok.build_plan(L, M.frame_local(), block=(32, 32))], torch.zeros(2, dtype=torch.long)),
     ValueError, "another layout or block"),
    (lambda q, k, L, P: vidtok.per_head_plan([P], torch.zeros(2)), TypeError, "heads must be an int32/int64 tensor"),
    (lambda q, k, L, P: vidtok.classify_heads(q, k, L, [M.frame_local()], sample=0), ValueError, "sample must be >= 1"),
])
def test_bad_input(call, error, match):
    layout = vidtok.VideoLayout.from_grid(2, 4, 4, num_global=1)
    q, k = _inputs(1, 2, 2, layout.num_tokens, 8, torch.float32, 0)[:2]
    with pytest.raises(error, match=match):
        call(q, k, layout, vidtok.build_plan(layout, M.frame_local(), block=(16, 16)))

"""vidtok.VideoLayout and vidtok.build_plan: layouts, tile classification and CSR against brute force,
block-size invariance, exporters (dense, SDPA, FlexAttention)."""

import pytest
import torch

import vidtok
from vidtok import masks as M

from vidtok.testing import sparse_random_layout as random_layout
from vidtok.testing import sparse_random_spec as _random_spec
from vidtok.testing import sparse_truth_mask as truth_mask


def test_from_grid():
    layout = vidtok.VideoLayout.from_grid(2, 3, 4, num_global=2, batch=3)
    assert layout.num_tokens == 26 and layout.batch == 3 and layout.grid == (2, 3, 4)
    assert layout.lengths.tolist() == [26] * 3
    assert layout.kind[0].tolist() == [2, 2] + [1] * 24
    assert layout.coords[1, 2].tolist() == [0, 0, 0] and layout.coords[1, 2 + 4 * 3 + 5].tolist() == [1, 1, 1]
    assert layout.coords[2, -1].tolist() == [1, 2, 3]


def test_to_and_expand():
    layout = vidtok.VideoLayout.from_grid(2, 3, 4, num_global=1)
    assert layout.to("cpu") is layout
    three = layout.expand(3)
    want = vidtok.VideoLayout.from_grid(2, 3, 4, num_global=1, batch=3)
    for name in ("coords", "kind", "lengths"):
        assert torch.equal(getattr(three, name), getattr(want, name))
    assert three.kv_log_size is None and (three.grid, three.num_global) == (want.grid, want.num_global)
    spec = M.neighborhood((1, 3, 3)) | M.global_tokens()
    assert torch.equal(vidtok.build_plan(three, spec, block=(16, 16)).tile_map, vidtok.build_plan(want, spec, block=(16, 16)).tile_map)
    assert three.order is None and want.order is None
    sized = vidtok.VideoLayout(layout.coords, layout.kind, layout.lengths, layout.grid, 1, torch.rand(1, layout.num_tokens))
    assert torch.equal(sized.expand(2).kv_log_size, sized.kv_log_size.expand(2, -1))
    with pytest.raises(ValueError, match="only a layout of one sequence"):
        three.expand(6)
    with pytest.raises(ValueError, match="batch must be >= 1"):
        layout.expand(0)


@pytest.mark.parametrize("grid,cube,G,at", [
    ((4, 4, 8), (2, 2, 4), 3, 0), ((3, 5, 6), (2, 2, 4), 2, 90), ((3, 5, 6), (1, 4, 4), 5, 17), ((2, 3, 3), None, 2, 7),
], ids=str)
def test_from_grid_orders_tokens_in_cubes_with_global_tokens_anywhere(grid, cube, G, at):
    """Source order: video tokens row-major with the global tokens before video token ``at``. In
    cube order every run of ct * ch * cw positions (after the global tokens when they come first,
    padded) is one cube's tokens in (t, h, w) order, padding where the cube leaves the grid;
    permute / unpermute move between the orders and are inverse to each other."""
    T, h, w = grid
    layout = vidtok.VideoLayout.from_grid(*grid, num_global=G, global_at=at, cube=cube, batch=2)
    n = T * h * w
    source_coords = torch.stack(torch.meshgrid(*(torch.arange(x) for x in grid), indexing="ij"), -1).reshape(-1, 3)
    source_coords = torch.cat([source_coords[:at], torch.full((G, 3), -1), source_coords[at:]])
    source_kind = torch.tensor([1] * at + [2] * G + [1] * (n - at), dtype=torch.int8)
    assert layout.num_source_tokens == n + G and layout.lengths.tolist() == [n + G] * 2
    # the layout's positions hold the source tokens that ``order`` names
    x = torch.cat([source_coords, source_kind[:, None].long()], 1)[None].expand(2, -1, -1)
    placed = layout.permute(x, dim=1)
    assert torch.equal(placed[..., :3], layout.coords.long().masked_fill(layout.kind[..., None] == 0, 0))
    assert torch.equal(placed[..., 3], layout.kind.long())
    assert torch.equal(layout.unpermute(placed, dim=1), x)
    if cube is None:
        assert layout.order is None and torch.equal(layout.coords[0].long(), source_coords)
        return
    V = cube[0] * cube[1] * cube[2]
    kind, coords = layout.kind[0], layout.coords[0].long()
    offset = -(-G // V) * V if at == 0 else 0
    assert (kind[:G] == 2).all() if at == 0 else (kind[-G:] == 2).all()
    video = coords[offset : offset + (layout.num_tokens - offset - (0 if at == 0 else G))].view(-1, V, 3)
    video_kind = kind[offset : offset + video.shape[0] * V].view(-1, V)
    counts = [-(-a // c) for a, c in zip(grid, cube)]
    for c in range(video.shape[0]):
        corner = torch.tensor([c // (counts[1] * counts[2]), c // counts[2] % counts[1], c % counts[2]]) * torch.tensor(cube)
        inside = [(t, y, z) for t in range(cube[0]) for y in range(cube[1]) for z in range(cube[2])]
        for slot, d in enumerate(inside):
            pos = corner + torch.tensor(d)
            if (pos < torch.tensor(grid)).all():
                assert video_kind[c, slot] == 1 and torch.equal(video[c, slot], pos), (c, slot)
            else:
                assert video_kind[c, slot] == 0


def test_permute_is_differentiable_and_checks_its_input():
    layout = vidtok.VideoLayout.from_grid(3, 3, 5, num_global=2, cube=(2, 2, 2))
    x = torch.randn(1, 2, layout.num_source_tokens, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layout.permute(t), (x,))
    y = torch.randn(1, 2, layout.num_tokens, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layout.unpermute(t), (y,))
    with pytest.raises(ValueError, match="must hold the layout's 47 S source tokens"):
        layout.permute(torch.randn(1, 2, 46, 4))
    with pytest.raises(ValueError, match="dim must be an int in"):
        layout.unpermute(y, dim=4)
    with pytest.raises(ValueError, match=r"global_at must be in \[0, T \* h \* w = 45\]"):
        vidtok.VideoLayout.from_grid(3, 3, 5, num_global=2, global_at=46)
    with pytest.raises(ValueError, match="cube h must be >= 1"):
        vidtok.VideoLayout.from_grid(3, 3, 5, cube=(1, 0, 2))


def test_a_cube_is_a_tile():
    """Cube order with tiles of one cube: the diagonal (cube_window) and every cube window is a set
    of full tile pairs, and attention in cube order equals attention in row-major order."""
    grid, cube = (4, 8, 8), (2, 4, 2)
    cubed = vidtok.VideoLayout.from_grid(*grid, cube=cube, num_global=16)
    rows = vidtok.VideoLayout.from_grid(*grid, num_global=16)
    spec = M.cube_window(cube, radius=(1, 0, 1)) | M.global_tokens()
    plan = vidtok.build_plan(cubed, spec, block=(16, 16))
    assert plan.num_partial == 0 and plan.num_full > 0
    assert torch.equal(plan.to_dense(), truth_mask(cubed, spec))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, rows.num_tokens, 8, generator=g) for _ in range(3))
    expected = vidtok.sparse_attention(q, k, v, vidtok.build_plan(rows, spec, block=(16, 16)))
    out = vidtok.sparse_attention(*(cubed.permute(x) for x in (q, k, v)), plan)
    torch.testing.assert_close(cubed.unpermute(out), expected, atol=1e-6, rtol=1e-5)


def test_from_keep_packs_kept_tokens_in_order():
    keep = torch.rand(3, 3, 4, 5, generator=torch.Generator().manual_seed(0)) < 0.5
    keep[2] = False  # a video with no kept token: only its global token remains
    layout = vidtok.VideoLayout.from_keep(keep, num_global=1)
    assert layout.num_tokens == 1 + int(keep.flatten(1).sum(1).max())
    for b in range(3):
        kept = keep[b].nonzero().tolist()  # (t, h, w) row-major, the order tokens are packed in
        n = len(kept)
        assert layout.lengths[b] == 1 + n
        assert layout.coords[b, 1 : 1 + n].tolist() == kept
        assert layout.kind[b].tolist() == [2] + [1] * n + [0] * (layout.num_tokens - 1 - n)


def test_from_merge_places_each_output_at_its_representative():
    """A static clip merges to one token per position at t = 0 standing for all T frames; the layout
    follows merged.x's order, carries log(size), and its plan matches brute force."""
    g = torch.Generator().manual_seed(3)
    T, h, w, C = 4, 3, 5, 8
    frame = torch.randn(1, 1, h * w, C, generator=g)
    x = torch.cat([frame.expand(1, T - 1, h * w, C), torch.randn(1, 1, h * w, C, generator=g)], 1)
    merged = vidtok.temporal_merge(x, threshold=0.99, grid=(h, w))
    layout = vidtok.VideoLayout.from_merge(merged, num_global=1)
    n = h * w
    assert merged.x.shape[1] == 2 * n and layout.num_tokens == 1 + 2 * n and layout.grid == (T, h, w)
    assert layout.coords[0, 1 : 1 + n].tolist() == [[0, i // w, i % w] for i in range(n)]
    assert layout.coords[0, 1 + n :].tolist() == [[T - 1, i // w, i % w] for i in range(n)]
    assert layout.kind[0].tolist() == [2] + [1] * 2 * n
    expected = torch.cat([torch.zeros(1), torch.full((n,), float(T - 1)).log(), torch.zeros(n)])
    assert torch.allclose(layout.kv_log_size[0], expected)
    spec = M.temporal_window(1, 0) | M.global_tokens()
    assert torch.equal(vidtok.build_plan(layout, spec, block=(16, 16)).to_dense(), truth_mask(layout, spec))


def test_from_merge_padding_bipartite_grid_and_errors():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 4, 8, generator=g)
    x[0, 1:] = x[0, :1]  # video 0 collapses, video 1 keeps its tokens: padded outputs for video 0
    merged = vidtok.temporal_merge(x, threshold=0.999, grid=(2, 2))
    layout = vidtok.VideoLayout.from_merge(merged)
    assert layout.lengths.tolist() == merged.lengths.tolist() == [4, 12]
    assert layout.kind[0].tolist() == [1] * 4 + [0] * 8 and (layout.coords[0, 4:] == -1).all()
    assert (layout.kv_log_size[0, 4:] == 0).all()
    flat = vidtok.bipartite_merge(x.reshape(2, 12, 8), 3)
    with pytest.raises(ValueError, match="pass grid"):
        vidtok.VideoLayout.from_merge(flat)
    layout = vidtok.VideoLayout.from_merge(flat, (3, 2, 2))
    o = flat.origin[1].long()
    assert layout.coords[1].tolist() == torch.stack([o // 4, (o // 2) % 2, o % 2], -1).tolist()
    with pytest.raises(ValueError, match="holds 8 positions"):
        vidtok.VideoLayout.from_merge(flat, (2, 2, 2))
    with pytest.raises(TypeError, match="vidtok.Merged"):
        vidtok.VideoLayout.from_merge(flat.x)


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("block", [(16, 16), (32, 16), (16, 32)], ids=str)
def test_tiles_match_brute_force(seed, block):
    """Full tile pairs have every pair allowed, empty ones none; partial tiles' bits are the exact
    token masks; the CSR lists exactly the non-empty tiles, and its transpose the same ones."""
    layout, rng = random_layout(seed)
    spec = _random_spec(rng, layout.grid)
    plan = vidtok.build_plan(layout, spec, block=block)
    truth = truth_mask(layout, spec)
    BQ, BK = block
    B, N = layout.batch, layout.num_tokens
    assert plan.heads == 1
    nQ, nK = plan.tile_map.shape[2:]
    padded = torch.zeros(B, nQ * BQ, nK * BK, dtype=torch.bool)
    padded[:, :N, :N] = truth
    tiles = padded.view(B, nQ, BQ, nK, BK).permute(0, 1, 3, 2, 4)
    valid = torch.zeros(B, nQ * BQ, dtype=torch.bool)
    valid[:, :N] = layout.kind != 0
    kvalid = torch.zeros(B, nK * BK, dtype=torch.bool)
    kvalid[:, :N] = layout.kind != 0
    full_valid = valid.view(B, nQ, BQ).all(-1)[:, :, None] & kvalid.view(B, nK, BK).all(-1)[:, None, :]
    tm = plan.tile_map[:, 0]
    assert not tiles[tm == 0].any()
    assert tiles[tm == 1].all() and full_valid[tm == 1].all()
    # partial tiles: the stored bits are the truth
    assert torch.equal(plan.to_dense(), truth)
    assert plan.num_full == int((tm == 1).sum()) and plan.num_partial == int((tm >= 2).sum())
    # CSR and transpose
    rows = torch.repeat_interleave(torch.arange(B * nQ), (plan.row_ptr[1:] - plan.row_ptr[:-1]).long())
    rebuilt = torch.zeros(B * nQ, nK, dtype=torch.int32)
    rebuilt[rows, plan.col_idx.long()] = plan.entry_bits
    assert torch.equal(rebuilt.view(B, nQ, nK), tm)
    assert (plan.entry_bits != 0).all()
    cols = torch.repeat_interleave(torch.arange(B * nK), (plan.col_ptr[1:] - plan.col_ptr[:-1]).long())
    rebuilt_t = torch.zeros(B * nK, nQ, dtype=torch.int32)
    rebuilt_t[cols, plan.row_idx.long()] = plan.entry_bits_t
    assert torch.equal(rebuilt_t.view(B, nK, nQ), tm.transpose(1, 2))
    # density: allowed pairs over pairs of valid tokens
    n_valid = (layout.kind != 0).sum(1)
    assert plan.allowed_pairs == int(truth.sum())
    assert plan.density == pytest.approx(int(truth.sum()) / max(1, int((n_valid**2).sum())))


@pytest.mark.parametrize("seed", range(4))
def test_same_token_mask_at_every_block_size(seed):
    layout, rng = random_layout(100 + seed)
    spec = _random_spec(rng, layout.grid)
    dense = [vidtok.build_plan(layout, spec, block=b).to_dense() for b in [(16, 16), (32, 32), (64, 64), (64, 16), (128, 32)]]
    for d in dense[1:]:
        assert torch.equal(d, dense[0])


def test_frame_aligned_masks_need_no_token_evaluation():
    """At 64-token tiles on 8x8 frames every frame-granular tile pair is full or empty: the token
    predicate is never evaluated, and nothing near N^2 is ever materialised."""
    calls = []  # token pairs evaluated, by either form of the predicate
    spec = M.temporal_window(1, 0)
    base = type(spec)

    class Counting(base):
        def pred(self, q, k, grid):
            out = base.pred(self, q, k, grid)
            calls.append(out.numel())
            return out

        def pred_words(self, tiles, grid):
            calls.append(tiles.q.t.numel() * tiles.k.t.shape[1])
            return base.pred_words(self, tiles, grid)

    counting = Counting(1, 0, "temporal_window")
    layout = vidtok.VideoLayout.from_grid(16, 8, 8)
    plan = vidtok.build_plan(layout, counting, block=(64, 64))
    assert calls == [] and plan.num_partial == 0
    assert plan.num_full == 16 + 15  # frame t attends frames t - 1 and t
    assert plan.density == pytest.approx(31 / 256)
    # with global tokens the tiles straddle frames: only the partial tiles' pairs are evaluated
    layout = vidtok.VideoLayout.from_grid(16, 8, 8, num_global=4)
    plan = vidtok.build_plan(layout, counting | M.global_tokens(), block=(64, 64))
    assert 0 < sum(calls) <= plan.num_partial * 64 * 64 < layout.num_tokens**2 / 2
    assert torch.equal(plan.to_dense(), truth_mask(layout, spec | M.global_tokens()))


def test_to_sdpa_mask_runs_through_sdpa():
    layout = vidtok.VideoLayout.from_grid(3, 4, 4, num_global=1, batch=2)
    spec = M.neighborhood((3, 3, 3)) | M.global_tokens()
    plan = vidtok.build_plan(layout, spec, block=(16, 16))
    mask = plan.to_sdpa_mask()
    assert mask.shape == (2, 1, 49, 49) and mask.dtype == torch.bool
    q, k, v = (torch.randn(2, 2, 49, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(vidtok.sparse_attention(q, k, v, plan, backend="reference"), expected)


@pytest.mark.parametrize("seed", range(3))
def test_flex_block_mask_matches_plan_and_attention(seed):
    from torch.nn.attention.flex_attention import flex_attention

    layout, rng = random_layout(200 + seed)
    spec = _random_spec(rng, layout.grid)
    plan = vidtok.build_plan(layout, spec, block=(16, 32))
    bm = plan.to_flex_block_mask()
    assert bm.BLOCK_SIZE == (16, 32)
    assert torch.equal(bm.to_dense().bool(), plan.tile_map != 0)
    B, N = layout.batch, layout.num_tokens
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, 2, N, 16, generator=g) for _ in range(3))
    expected = vidtok.sparse_attention(q, k, v, plan, backend="reference")
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=bm), expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("block", [(16, 16), (32, 16), (16, 32), (16, 64), (64, 16), (128, 128)], ids=str)
def test_flex_block_mask_token_mask_equals_to_dense_for_every_block(block):
    """The exported mask_mod, evaluated on every token pair, is exactly ``plan.to_dense()`` for every
    block size the plan accepts (a key block of 16 tokens once read its bits at the wrong offset)."""
    from torch.nn.attention.flex_attention import create_mask

    layout, rng = random_layout(321)
    plan = vidtok.build_plan(layout, _random_spec(rng, layout.grid), block=block)
    B, N = layout.batch, layout.num_tokens
    token_mask = create_mask(plan.to_flex_block_mask().mask_mod, B, 1, N, N, device="cpu")[:, 0]
    assert torch.equal(token_mask, plan.to_dense())


@pytest.mark.parametrize("args,kwargs,error,match", [
    ((None, M.frame_local()), {}, TypeError, "layout must be a vidtok.VideoLayout"),
    (("layout", "frame"), {}, TypeError, "spec must be a vidtok.masks spec"),
    (("layout", M.frame_local()), {"block": (48, 64)}, ValueError, "block BQ must be a power of two >= 16"),
    (("layout", M.frame_local()), {"block": (64, 8)}, ValueError, r"block BK must be a power of two >= 16 .*got 8"),
    (("layout", M.frame_local()), {"block": 64}, TypeError, r"block must be a pair \(BQ, BK\)"),
    (("layout", M.neighborhood((2, 7, 3))), {}, ValueError, r"larger than the video grid \(2, 5, 6\) along h"),
])
def test_bad_input(args, kwargs, error, match):
    layout = vidtok.VideoLayout.from_grid(2, 5, 6)
    args = tuple(layout if a == "layout" else a for a in args)
    with pytest.raises(error, match=match):
        vidtok.build_plan(*args, **kwargs)


@pytest.mark.parametrize("make,error,match", [
    (lambda: vidtok.VideoLayout.from_grid(0, 2, 2), ValueError, "T must be >= 1, got 0"),
    (lambda: vidtok.VideoLayout.from_grid(2, 2, 2, num_global=-1), ValueError, "num_global must be >= 0"),
    (lambda: vidtok.VideoLayout.from_keep(torch.ones(2, 3, 4)), ValueError, r"keep must be \[B, T, h, w\]"),
    (lambda: vidtok.VideoLayout.from_keep(torch.ones(1, 2, 3, 4)), TypeError, "keep must be one of bool, got float32"),
])
def test_bad_layouts(make, error, match):
    with pytest.raises(error, match=match):
        make()

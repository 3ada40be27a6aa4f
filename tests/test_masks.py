"""vidtok.masks: token predicates against hand-written rules, tile classification against brute force."""

import itertools
import random

import pytest
import torch

import vidtok
from vidtok import masks as M
from vidtok.testing import sparse_random_spec as _random_spec


def _pairs(layout):
    """Coords of every (query, key) pair of sequence 0: broadcast [N, 1] x [1, N]."""
    c = layout.token_coords()
    return M.Coords(*(x[0, :, None] for x in c)), M.Coords(*(x[0, None, :] for x in c))


def _natten_window(q, K, L, causal):
    """NATTEN's 1-D window written as its docs state it, one query at a time: K keys starting at
    q - K // 2, shifted inside [0, L) (even K: one more key before than after); causal: the K keys
    ending at q, cut at 0."""
    if causal:
        return set(range(max(q - K + 1, 0), q + 1))
    start = q - K // 2
    start = min(max(start, 0), L - K)
    return set(range(start, start + K))


@pytest.mark.parametrize("grid,kernel,causal", [
    ((3, 5, 6), (3, 3, 3), (False, False, False)),
    ((4, 6, 5), (2, 4, 5), (False, False, False)),
    ((5, 4, 4), (3, 1, 4), (True, False, False)),
    ((3, 3, 7), (3, 3, 7), (False, True, True)),
], ids=str)
def test_neighborhood_follows_natten_rules(grid, kernel, causal):
    layout = vidtok.VideoLayout.from_grid(*grid)
    q, k = _pairs(layout)
    got = M.neighborhood(kernel, is_causal=causal).pred(q, k, grid)
    coords = layout.coords[0].tolist()
    for i, qc in enumerate(coords):
        windows = [_natten_window(qc[d], kernel[d], grid[d], causal[d]) for d in range(3)]
        expected = [all(kc[d] in windows[d] for d in range(3)) for kc in coords]
        assert got[i].tolist() == expected, (i, qc)
        if not any(causal):
            assert sum(expected) == kernel[0] * kernel[1] * kernel[2]  # border queries keep K keys


def test_video_specs_follow_their_definitions():
    grid = (4, 3, 5)
    layout = vidtok.VideoLayout.from_grid(*grid, num_global=2)
    q, k = _pairs(layout)
    dt, dh, dw = k.t - q.t, k.h - q.h, k.w - q.w
    video = ~q.g & ~k.g
    cases = {
        "frame_local": (M.frame_local(), dt == 0),
        "temporal_window": (M.temporal_window(2, 1), (dt >= -2) & (dt <= 1)),
        "causal": (M.causal_in_time(), dt <= 0),
        "spatial": (M.spatial_window(3, 5), (dh.abs() <= 1) & (dw.abs() <= 2)),
    }
    for name, (spec, rule) in cases.items():
        assert torch.equal(spec.pred(q, k, grid), rule & video), name
    assert torch.equal(M.global_tokens().pred(q, k, grid), q.g | k.g)
    # the documented composition: frame-local plus registers that see and are seen by everything
    fl_g = (M.frame_local() | M.global_tokens()).pred(q, k, grid)
    assert fl_g[:2].all() and fl_g[:, :2].all()
    assert torch.equal(fl_g[2:, 2:], (dt == 0)[2:, 2:])


def test_cube_window_and_all_pairs_follow_their_definitions():
    grid = (5, 6, 7)
    layout = vidtok.VideoLayout.from_grid(*grid, num_global=2, global_at=40)
    q, k = _pairs(layout)
    video = ~q.g & ~k.g
    for cube, radius in [((2, 3, 4), (0, 0, 0)), ((1, 2, 2), (1, 0, 1)), ((4, 4, 4), (0, 1, 0))]:
        near = [((k[d] // cube[d]) - (q[d] // cube[d])).abs() <= radius[d] for d in range(3)]
        assert torch.equal(M.cube_window(cube, radius=radius).pred(q, k, grid), near[0] & near[1] & near[2] & video)
    assert M.all_pairs().pred(q, k, grid).all()
    assert not (~M.all_pairs()).pred(q, k, grid).any()
    with pytest.raises(ValueError, match="cube h must be >= 1"):
        M.cube_window((2, 0, 2))
    with pytest.raises(ValueError, match="radius w must be >= 0"):
        M.cube_window((2, 2, 2), radius=(0, 0, -1))
    with pytest.raises(TypeError, match=r"radius must be a tuple \(t, h, w\)"):
        M.cube_window((2, 2, 2), radius=1)


def test_composition_is_pointwise():
    grid = (3, 4, 4)
    layout = vidtok.VideoLayout.from_grid(*grid, num_global=1)
    q, k = _pairs(layout)
    a, b = M.temporal_window(1, 0), M.spatial_window(3, 3)
    pa, pb = a.pred(q, k, grid), b.pred(q, k, grid)
    assert torch.equal((a & b).pred(q, k, grid), pa & pb)
    assert torch.equal((a | b).pred(q, k, grid), pa | pb)
    assert torch.equal((~a).pred(q, k, grid), ~pa)
    assert torch.equal((~(a & ~b)).pred(q, k, grid), ~(pa & ~pb))


def _bounds(coords: torch.Tensor, kind: torch.Tensor) -> M.Bounds:
    video = kind == 1
    c = coords.long()
    lo = tuple(torch.tensor(int(c[video, d].min()) if video.any() else 0) for d in range(3))
    hi = tuple(torch.tensor(int(c[video, d].max()) if video.any() else 0) for d in range(3))
    return M.Bounds(lo, hi, video.any(), (kind == 2).any())


@pytest.mark.parametrize("seed", range(6))
def test_classify_is_conservative_on_random_token_groups(seed):
    """For random specs and random groups of tokens (not only contiguous tiles): "empty" means no pair
    of the groups is allowed, "full" means every pair is."""
    rng = random.Random(seed)
    grid = (rng.randint(1, 4), rng.randint(1, 5), rng.randint(1, 5))
    keep = torch.rand(1, *grid, generator=torch.Generator().manual_seed(seed)) < 0.7
    keep[0, 0, 0, 0] = True
    layout = vidtok.VideoLayout.from_keep(keep, num_global=rng.randint(0, 2))
    n = int(layout.lengths[0])
    q_all, k_all = _pairs(layout)
    seen = {"empty": 0, "full": 0, "mixed": 0}
    for _ in range(12):
        spec = _random_spec(rng, grid)
        truth = spec.pred(q_all, k_all, grid)
        for _ in range(15):
            qi = torch.tensor(sorted(rng.sample(range(n), rng.randint(1, min(n, 6)))))
            ki = torch.tensor(sorted(rng.sample(range(n), rng.randint(1, min(n, 6)))))
            any_, all_ = spec.classify(_bounds(layout.coords[0, qi], layout.kind[0, qi]),
                                       _bounds(layout.coords[0, ki], layout.kind[0, ki]), grid)
            block = truth[qi][:, ki]
            if not any_:
                assert not block.any(), (spec, qi, ki)
                seen["empty"] += 1
            elif all_:
                assert block.all(), (spec, qi, ki)
                seen["full"] += 1
            else:
                seen["mixed"] += 1
    assert seen["empty"] and seen["full"]  # the test exercised both claims


def test_classify_is_exact_for_single_tokens():
    """With one token per side the bounds are the token itself: every window spec is classified exactly."""
    grid = (3, 4, 4)
    layout = vidtok.VideoLayout.from_grid(*grid, num_global=1)
    q_all, k_all = _pairs(layout)
    for spec in [M.frame_local(), M.temporal_window(1, 2), M.causal_in_time() & M.spatial_window(3, 3),
                 M.neighborhood((2, 3, 3)), M.global_tokens() | M.frame_local(), M.cube_window((2, 2, 3), radius=(0, 1, 0)),
                 M.all_pairs(), ~M.all_pairs()]:
        truth = spec.pred(q_all, k_all, grid)
        for i, j in itertools.product(range(0, layout.num_tokens, 5), range(0, layout.num_tokens, 3)):
            b_q = _bounds(layout.coords[0, i : i + 1], layout.kind[0, i : i + 1])
            b_k = _bounds(layout.coords[0, j : j + 1], layout.kind[0, j : j + 1])
            any_, all_ = spec.classify(b_q, b_k, grid)
            assert bool(any_) == bool(all_) == bool(truth[i, j]), (spec, i, j)


@pytest.mark.parametrize("make,error,match", [
    (lambda: M.temporal_window(-1, 0), ValueError, "before must be >= 0, got -1"),
    (lambda: M.temporal_window(1, 0.5), TypeError, "after must be an int, got float"),
    (lambda: M.spatial_window(4, 3), ValueError, "kh must be odd"),
    (lambda: M.neighborhood((3, 3)), TypeError, r"kernel must be a tuple \(kt, kh, kw\)"),
    (lambda: M.neighborhood((3, 0, 3)), ValueError, "kernel kh must be >= 1"),
    (lambda: M.neighborhood((3, 3, 3), is_causal=(1, 0, 0)), TypeError, "is_causal must be a tuple of 3 bools"),
    (lambda: M.frame_local() & 3, TypeError, "combined with another mask spec by &"),
])
def test_bad_specs(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("seed", range(4))
def test_frame_pairs_spec(seed):
    """A [T, T] frame table: the predicate reads it, and tile classification from frame ranges (a
    summed-area table) is conservative on random token groups, also inside compositions."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    grid = (rng.randint(2, 5), rng.randint(1, 4), rng.randint(1, 4))
    table = torch.rand(grid[0], grid[0], generator=g) < 0.5
    layout = vidtok.VideoLayout.from_grid(*grid, num_global=1)
    q_all, k_all = _pairs(layout)
    spec = M.frame_pairs(table)
    truth = spec.pred(q_all, k_all, grid)
    video = ~q_all.g & ~k_all.g
    assert torch.equal(truth, video & table[q_all.t.clamp_min(0), k_all.t.clamp_min(0)])
    n = layout.num_tokens
    for s in (spec, spec | M.global_tokens(), spec & M.spatial_window(3, 3), ~spec):
        t = s.pred(q_all, k_all, grid)
        for _ in range(40):
            lo_q, lo_k = rng.randrange(n), rng.randrange(n)
            qi = torch.arange(lo_q, min(n, lo_q + rng.randint(1, 8)))
            ki = torch.arange(lo_k, min(n, lo_k + rng.randint(1, 8)))
            any_, all_ = s.classify(_bounds(layout.coords[0, qi], layout.kind[0, qi]),
                                    _bounds(layout.coords[0, ki], layout.kind[0, ki]), grid)
            block = t[qi][:, ki]
            assert bool(any_) or not block.any()
            assert not bool(all_) or block.all()
    plan = vidtok.build_plan(layout, spec | M.global_tokens(), block=(16, 16))
    assert torch.equal(plan.to_dense()[0], spec.pred(q_all, k_all, grid) | q_all.g | k_all.g)
    with pytest.raises(ValueError, match=r"frame_pairs table must be \[T, T\]"):
        vidtok.build_plan(vidtok.VideoLayout.from_grid(grid[0] + 1, 2, 2), spec)
    with pytest.raises(TypeError, match="allowed must be a square bool tensor"):
        M.frame_pairs(table.float())

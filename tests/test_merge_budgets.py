"""Merges with exact per-video budgets and boundaries: bipartite_merge(a_mask=) (the A/B sets chosen by
the caller, TempMe's clip i into clip i + 1), temporal_merge(r=) with one count per video and
temporal_merge(segment_id=) (no chain crosses a segment boundary). Hand-computed cases, loop oracles,
property tests (counts exact, boundaries never crossed) and bad input."""

import math

import pytest
import torch

import vidtok
from vidtok import reference as ref
from vidtok.testing import backend_cases

FP32_BIPARTITE = [c for c in backend_cases("bipartite_merge") if c.values[1] == torch.float32]
FP32_TEMPORAL = [c for c in backend_cases("temporal_merge") if c.values[1] == torch.float32]


def _cos(u, v):
    nu, nv = math.sqrt(sum(t * t for t in u)), math.sqrt(sum(t * t for t in v))
    return sum(p * q for p, q in zip(u, v)) / (max(nu, 1e-8) * max(nv, 1e-8))


# ---------------------------------------------------------------------------------------------------
# bipartite_merge(a_mask=)


def masked_loop(metric, a_mask, r, protect, order):
    """(index, origin) of one video as lists: A = unprotected tokens with a_mask True, B = unprotected
    tokens with a_mask False; each A token's best B partner (ties: lower position), the r best A tokens
    (ties: lower position) merge; outputs in position order ("keep") or ToMe's order ("tome")."""
    N = len(metric)
    if r == 0:
        return list(range(N)), list(range(N))
    A = [n for n in range(protect, N) if a_mask[n]]
    Bs = [n for n in range(protect, N) if not a_mask[n]]
    best = {}
    for a in A:
        top, arg = -math.inf, None
        for b in Bs:
            s = _cos(metric[a], metric[b])
            if s > top:
                top, arg = s, b
        best[a] = (top, arg)
    ranked = sorted(A, key=lambda a: (-best[a][0], a))
    src, unm = ranked[:r], ranked[r:]
    members = {n: [n] for n in range(N) if n not in src}
    for a in src:
        members[best[a][1]].append(a)
    if order == "keep":
        reps = sorted(members)
    else:
        unm = sorted(unm) if protect > 0 else unm
        reps = list(range(protect)) + unm + Bs
    index = [None] * N
    for slot, rep in enumerate(reps):
        for n in members[rep]:
            index[n] = slot
    return index, reps


def test_a_mask_hand_computed_clip_into_next_clip():
    """Clip 0 = tokens 0-2 (A), clip 1 = tokens 3-5 (B); token 0 ~ 4, 1 ~ 3, 2 ~ 5, with 1 ~ 3 closest."""
    e = torch.eye(3)
    metric = torch.stack([e[0], e[1] + 0.01 * e[2], e[2], e[1], e[0] + 0.2 * e[1], e[2] + 0.3 * e[0]])[None]
    x = torch.arange(6.0).repeat_interleave(2).view(1, 6, 2)
    a_mask = torch.tensor([True, True, True, False, False, False])
    merged = vidtok.bipartite_merge(x, 2, metric=metric, a_mask=a_mask, mode="mean")
    # cos(1, 3) = 0.99995, cos(0, 4) = 0.981, cos(2, 5) = 0.958: tokens 1 and 0 merge into 3 and 4
    assert merged.index[0].tolist() == [2, 1, 0, 1, 2, 3]
    assert merged.origin[0].tolist() == [2, 3, 4, 5]
    assert merged.x[0, :, 0].tolist() == [2.0, 2.0, 2.0, 5.0]  # (1 + 3) / 2, (0 + 4) / 2
    assert merged.size[0].tolist() == [1.0, 2.0, 2.0, 1.0]


@pytest.mark.parametrize("protect", [0, 1, 2, 3])
@pytest.mark.parametrize("order", ["keep", "tome"])
@pytest.mark.parametrize("device,dtype,backend", FP32_BIPARTITE)
def test_alternating_a_mask_is_the_default(protect, order, device, dtype, backend):
    g = torch.Generator().manual_seed(protect)
    x = torch.randn(2, 13, 6, generator=g).to(device)
    alternating = torch.arange(13, device=device) % 2 == 0
    cap = ref.max_merge(13, protect)
    for r in sorted({0, 1, cap // 2, cap}):
        plain = vidtok.bipartite_merge(x, r, protect=protect, order=order, backend=backend)
        masked = vidtok.bipartite_merge(x, r, protect=protect, order=order, a_mask=alternating, backend=backend)
        assert torch.equal(plain.index, masked.index) and torch.equal(plain.origin, masked.origin), r
        torch.testing.assert_close(plain.x, masked.x)


@pytest.mark.parametrize("protect", [0, 1, 2])
@pytest.mark.parametrize("order", ["keep", "tome"])
@pytest.mark.parametrize("device,dtype,backend", FP32_BIPARTITE)
def test_random_a_mask_equals_loop(protect, order, device, dtype, backend):
    seed = torch.seed() % 2**31
    g = torch.Generator().manual_seed(seed)
    B, N = 3, 17
    x = torch.randn(B, N, 5, generator=g, dtype=torch.float64)
    a_mask = torch.rand(B, N, generator=g) < 0.5
    a_mask[:, protect] = True  # at least one A and one B token after the protected ones
    a_mask[:, protect + 1] = False
    n_a = int(a_mask[:, protect:].sum(1).min())
    x_dev = x.to(device=device, dtype=dtype)
    for r in sorted({0, 1, n_a // 2, n_a}):
        merged = vidtok.bipartite_merge(x_dev, r, protect=protect, order=order, a_mask=a_mask.to(device), backend=backend)
        assert merged.x.shape == (B, N - r, 5)
        for b in range(B):
            index, origin = masked_loop(x[b].tolist(), a_mask[b].tolist(), r, protect, order)
            assert merged.index[b].tolist() == index, (seed, r, b)
            assert merged.origin[b].tolist() == origin, (seed, r, b)
        # a B token or a protected token never leaves its own slot
        stays = ~a_mask.to(device) | (torch.arange(N, device=device) < protect)
        own = merged.origin.long().gather(1, merged.index.long()) == torch.arange(N, device=device)
        assert bool(own[stays].all())
        torch.testing.assert_close(merged.size.sum(1).cpu(), torch.full((B,), float(N)))


def test_a_mask_bad_input():
    x = torch.randn(2, 8, 4)
    with pytest.raises(TypeError, match="a_mask must be a bool tensor"):
        vidtok.bipartite_merge(x, 1, a_mask=torch.ones(8))
    with pytest.raises(ValueError, match=r"a_mask must be \[N\] = \[8\] or \[B, N\] = \[2, 8\]"):
        vidtok.bipartite_merge(x, 1, a_mask=torch.ones(2, 7, dtype=torch.bool))
    few = torch.tensor([True, True] + [False] * 6)
    with pytest.raises(ValueError, match="at least r = 3 unprotected A tokens"):
        vidtok.bipartite_merge(x, 3, a_mask=few)
    with pytest.raises(ValueError, match="one unprotected B token"):
        vidtok.bipartite_merge(x, 1, a_mask=torch.ones(8, dtype=torch.bool))
    with pytest.raises(ValueError, match="r must be in"):
        vidtok.bipartite_merge(x, 8, protect=1, a_mask=few)
    # the protected tokens do not count, whatever the mask says
    with pytest.raises(ValueError, match="at least r = 2"):
        vidtok.bipartite_merge(x, 2, protect=2, a_mask=few)


# ---------------------------------------------------------------------------------------------------
# temporal_merge(r=per video, segment_id=)


def temporal_loop(metric, r, lag, segment):
    """index of one video (radius 0) as a list: links (t, n) -> (t - lag, n) scored by cosine, allowed
    within one segment (ids >= 0); the r best allowed links kept (ties: lower position); trees numbered
    by their root's position."""
    T, N = len(metric), len(metric[0])
    links = []
    for t in range(lag, T):
        if segment[t] >= 0 and segment[t] == segment[t - lag]:
            for n in range(N):
                links.append((-_cos(metric[t][n], metric[t - lag][n]), t * N + n))
    chosen = {p for _, p in sorted(links)[:r]}
    root = list(range(T * N))
    for p in sorted(chosen):  # parents come earlier: their root is final
        root[p] = root[p - lag * N]
    roots = sorted(set(root))
    return [roots.index(root[p]) for p in range(T * N)]


def test_per_video_r_hand_computed():
    """Two videos of 3 frames x 1 token: video 0 merges its best link, video 1 both of its links."""
    x = torch.tensor([[[[1.0, 0.0]], [[1.0, 0.1]], [[0.0, 1.0]]],
                      [[[1.0, 0.0]], [[1.0, 0.0]], [[1.0, 0.0]]]])
    merged = vidtok.temporal_merge(x, r=[1, 2], grid=(1, 1), mode="mean")
    assert merged.index.tolist() == [[0, 0, 1], [0, 0, 0]]
    assert merged.origin.tolist() == [[0, 2], [0, -1]]
    assert merged.lengths.tolist() == [2, 1]
    assert merged.size.tolist() == [[2.0, 1.0], [3.0, 0.0]]
    torch.testing.assert_close(merged.x[0, 0], torch.tensor([1.0, 0.05]))
    assert merged.x[1, 1].tolist() == [0.0, 0.0]  # padding


def test_segment_id_hand_computed():
    """One token per frame, all equal: without segments one tree; with a cut after frame 1, two."""
    x = torch.ones(1, 4, 1, 3)
    assert vidtok.temporal_merge(x, threshold=0.5, grid=(1, 1)).index.tolist() == [[0, 0, 0, 0]]
    seg = torch.tensor([[0, 0, 1, 1]])
    merged = vidtok.temporal_merge(x, threshold=0.5, grid=(1, 1), segment_id=seg)
    assert merged.index.tolist() == [[0, 0, 1, 1]] and merged.origin.tolist() == [[0, 2]]
    merged = vidtok.temporal_merge(x, r=2, grid=(1, 1), segment_id=seg)
    assert merged.index.tolist() == [[0, 0, 1, 1]]
    # padding frames (segment -1) link to nothing
    merged = vidtok.temporal_merge(x, threshold=0.5, grid=(1, 1), segment_id=torch.tensor([[0, 0, 0, -1]]))
    assert merged.index.tolist() == [[0, 0, 0, 1]]


@pytest.mark.parametrize("lag", [1, 2])
@pytest.mark.parametrize("device,dtype,backend", FP32_TEMPORAL)
def test_per_video_r_and_segments_equal_loop(lag, device, dtype, backend):
    seed = torch.seed() % 2**31
    g = torch.Generator().manual_seed(seed)
    B, T, h, w = 3, 6, 2, 3
    N = h * w
    x = torch.randn(B, T, N, 4, generator=g, dtype=torch.float64)
    seg = torch.randint(0, 2, (B, T), generator=g).cumsum(1)  # non-decreasing, as scene_boundaries gives
    seg[2, -1] = -1  # a padding frame
    left = [N * sum(int(seg[b, t] >= 0 and seg[b, t] == seg[b, t - lag]) for t in range(lag, T)) for b in range(B)]
    r = [int(torch.randint(0, left[b] + 1, (1,), generator=g)) for b in range(B)]
    merged = vidtok.temporal_merge(x.to(device=device, dtype=dtype), r=r, lag=lag, grid=(h, w),
                                   segment_id=seg.to(device), backend=backend)
    assert merged.x.shape == (B, T * N - min(r), 4)
    assert merged.lengths.tolist() == [T * N - r_b for r_b in r]
    for b in range(B):
        assert merged.index[b].tolist() == temporal_loop(x[b].tolist(), r[b], lag, seg[b].tolist()), (seed, b)
        assert bool((merged.origin[b, T * N - r[b]:] == -1).all())
        assert bool((merged.size[b, T * N - r[b]:] == 0).all())


@pytest.mark.parametrize("radius", [0, 1, None])
@pytest.mark.parametrize("device,dtype,backend", FP32_TEMPORAL)
def test_no_chain_crosses_a_segment_boundary(radius, device, dtype, backend):
    seed = torch.seed() % 2**31
    g = torch.Generator().manual_seed(seed)
    B, T, h, w = 2, 7, 3, 3
    N = h * w
    base = torch.randn(B, 1, N, 8, generator=g)
    x = (base + 0.3 * torch.randn(B, T, N, 8, generator=g)).to(device)  # persistent tokens: long chains
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 3]], device=device)
    frame = torch.arange(T * N, device=device) // N
    options = [dict(threshold=0.5), dict(r=[10, 20]), dict(r=torch.tensor([0, 25], device=device))]
    if backend != "reference":  # the kernels' links are compared with the reference's elsewhere: one case here
        options = options[1:2]
    for opts in options:
        merged = vidtok.temporal_merge(x, radius=radius, grid=(h, w), segment_id=seg, backend=backend, **opts)
        root = merged.origin.long().gather(1, merged.index.long())
        assert bool((seg.gather(1, frame.expand(B, -1)) == seg.gather(1, (root // N))).all()), (seed, opts)
        if "r" in opts:
            r = torch.as_tensor(opts["r"]).tolist()
            assert merged.lengths.tolist() == [T * N - r_b for r_b in r]


def test_per_video_r_equals_one_call_per_video():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 9, 6, generator=g)
    r = [0, 7, 27]
    merged = vidtok.temporal_merge(x, r=r, radius=None)
    as_tensor = vidtok.temporal_merge(x, r=torch.tensor(r), radius=None)
    assert torch.equal(merged.index, as_tensor.index) and torch.equal(merged.x, as_tensor.x)
    for b, r_b in enumerate(r):
        one = vidtok.temporal_merge(x[b : b + 1], r=r_b, radius=None)
        assert torch.equal(one.index[0], merged.index[b])
        torch.testing.assert_close(one.x[0], merged.x[b, : 36 - r_b])


def test_per_video_r_and_segment_id_bad_input():
    x = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match="must hold B = 2 counts"):
        vidtok.temporal_merge(x, r=[1])
    with pytest.raises(ValueError, match=r"r\[1\] must be in \[0, 8\]"):
        vidtok.temporal_merge(x, r=[1, 9])
    with pytest.raises(TypeError, match=r"r\[0\] must be an int"):
        vidtok.temporal_merge(x, r=[1.0, 2])
    with pytest.raises(TypeError, match="r must be one of"):
        vidtok.temporal_merge(x, r=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"must be \[B\] = \[2\]"):
        vidtok.temporal_merge(x, r=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"per-video counts in \[0, 8\]"):
        vidtok.temporal_merge(x, r=torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match=r"segment_id must be \[B, T\] = \[2, 3\]"):
        vidtok.temporal_merge(x, r=1, segment_id=torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="segment_id must be one of"):
        vidtok.temporal_merge(x, r=1, segment_id=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="more links than segment_id leaves"):
        vidtok.temporal_merge(x, r=[4, 5], segment_id=torch.tensor([[0, 0, 1], [0, 1, 2]]))


def test_budgets_compile_fullgraph():
    torch._dynamo.reset()

    def f(x, tokens, a_mask, seg):
        merged = vidtok.temporal_merge(x * 2, r=[3, 5], grid=(2, 2), segment_id=seg)
        paired = vidtok.bipartite_merge(tokens * 2, 3, a_mask=a_mask)
        return merged.x.sum() + paired.x.sum()

    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 4, 4, 8, generator=g), torch.randn(2, 10, 4, generator=g), torch.arange(10) < 5,
            torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]]))
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(*args), f(*args))

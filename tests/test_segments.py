"""Segment ops (segment_reduce, segment_pool, clip_select, segment_topk's static size) against slow loop
oracles written independently, with the padding and empty-segment conventions and clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vidtok


def _segments(B, T, seed, pad=True):
    """Non-decreasing segment ids as scene_boundaries gives them, -1 padding at the end of some videos."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.rand(B, T, generator=g) < 0.3
    cuts[:, 0] = False
    seg = cuts.long().cumsum(1)
    if pad:
        seg[0, T - 2:] = -1
    return seg.to(torch.int32)


@pytest.mark.parametrize("reduce", ["mean", "max", "sum"])
@pytest.mark.parametrize("shape", [(3, 9, 5), (2, 7, 3, 4)])
def test_segment_reduce_matches_loop(reduce, shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    B, T = shape[:2]
    seg = _segments(B, T, seed=2)
    seg[1, 3] = 5  # any order is fine for reduce; id 5 leaves ids between empty
    S = int(seg.max()) + 1
    out = vidtok.segment_reduce(x, seg, reduce)
    assert out.shape == (B, S, *shape[2:])
    for b in range(B):
        for s in range(S):
            rows = [x[b, t] for t in range(T) if int(seg[b, t]) == s]
            if not rows:
                expected = torch.zeros(shape[2:], dtype=x.dtype)
            elif reduce == "mean":
                expected = sum(rows) / len(rows)
            elif reduce == "sum":
                expected = sum(rows)
            else:
                expected = torch.stack(rows).max(0).values
            torch.testing.assert_close(out[b, s], expected)
    bigger = vidtok.segment_reduce(x, seg, reduce, num_segments=S + 2)
    assert torch.equal(bigger[:, :S], out) and (bigger[:, S:] == 0).all()
    assert vidtok.segment_reduce(x, seg, reduce, num_segments=2).shape[1] == 2  # ids >= 2 ignored


def test_segment_reduce_dtypes_and_grad():
    x = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    seg = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 2, -1, -1]])
    for reduce in ("mean", "sum", "max"):
        torch.autograd.gradcheck(lambda x: vidtok.segment_reduce(x, seg, reduce), (x,))
    half = vidtok.segment_reduce(x.detach().half(), seg, "mean")
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.double(), vidtok.segment_reduce(x.detach(), seg, "mean"), atol=2e-3, rtol=2e-3)


def _pool_oracle(x, seg, m, S):
    B, T = seg.shape
    out = torch.zeros(B, S, m, *x.shape[2:], dtype=x.dtype)
    for b in range(B):
        for s in range(S):
            frames = [t for t in range(T) if int(seg[b, t]) == s]
            if frames:
                clip = x[b, frames]  # [L, ...]
                pooled = F.adaptive_avg_pool1d(clip.reshape(len(frames), -1).T[None], m)[0].T  # [m, D]
                out[b, s] = pooled.reshape(m, *x.shape[2:])
    return out


@pytest.mark.parametrize("m", [1, 3, 8])
def test_segment_pool_is_adaptive_avg_pool_per_segment(m):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 11, 2, 3, generator=g, dtype=torch.float64)
    seg = _segments(3, 11, seed=4)
    S = int(seg.max()) + 1
    out = vidtok.segment_pool(x, seg, m)
    assert out.shape == (3, S, m, 2, 3)
    torch.testing.assert_close(out, _pool_oracle(x, seg, m, S))
    empty = vidtok.segment_pool(x, seg, m, num_segments=S + 1)
    assert (empty[:, S] == 0).all()
    torch.autograd.gradcheck(lambda x: vidtok.segment_pool(x, seg, m), (x.requires_grad_(),))


def test_segment_pool_rejects_non_contiguous_segments():
    x = torch.randn(1, 5, 4)
    with pytest.raises(ValueError, match="segment_id must be non-decreasing"):
        vidtok.segment_pool(x, torch.tensor([[0, 1, 0, 1, 1]]), 2)
    with pytest.raises(ValueError, match="segment_id must be non-decreasing"):
        vidtok.segment_pool(x, torch.tensor([[0, -1, 0, 1, 1]]), 2)
    with pytest.raises(ValueError, match=r"m must be in \[1, "):
        vidtok.segment_pool(x, torch.tensor([[0, 0, 1, 1, 1]]), 0)


def test_segment_errors_name_the_argument():
    x = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match=r"segment_id must be \[B, T\] = \[2, 5\]"):
        vidtok.segment_reduce(x, torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="segment_id must be one of int32, int64"):
        vidtok.segment_reduce(x, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="reduce must be one of"):
        vidtok.segment_reduce(x, torch.zeros(2, 5, dtype=torch.int64), "median")
    with pytest.raises(ValueError, match=r"num_segments must be in \[0, "):
        vidtok.segment_reduce(x, torch.zeros(2, 5, dtype=torch.int64), num_segments=-1)
    with pytest.raises(ValueError, match=r"x must be \[B, T, ...\]"):
        vidtok.segment_reduce(x[0, 0], torch.zeros(2, 5, dtype=torch.int64))


def test_segment_reduce_compiles_with_num_segments():
    torch._dynamo.reset()
    x = torch.randn(2, 8, 3)
    seg = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 2], [0, 1, 1, 1, 1, 1, -1, -1]])

    def f(x, seg):
        return vidtok.segment_reduce(x, seg, "mean", num_segments=3)

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, seg), f(x, seg))


def _clip_oracle(rel, num_clips, clip_len):
    """Greedy by relevance over anchors whose centred (clamped) clip overlaps no chosen clip."""
    T = len(rel)
    start = [min(max(t - (clip_len - 1) // 2, 0), max(T - clip_len, 0)) for t in range(T)]
    chosen = []
    for t in sorted(range(T), key=lambda t: (-rel[t], t)):
        if len(chosen) == num_clips or rel[t] == float("-inf"):
            break
        if all(abs(start[t] - s) >= clip_len for s in chosen):
            chosen.append(start[t])
    clips = [[s + i if s + i < T else -1 for i in range(clip_len)] for s in sorted(chosen)]
    return clips + [[-1] * clip_len] * (num_clips - len(clips))


@pytest.mark.parametrize("T,num_clips,clip_len", [(20, 3, 4), (9, 4, 3), (5, 2, 8), (12, 1, 1), (30, 5, 6)])
def test_clip_select_matches_greedy_oracle(T, num_clips, clip_len):
    g = torch.Generator().manual_seed(T + clip_len)
    rel = torch.randint(0, 6, (2, 2, T), generator=g).float()  # ties
    rel[1, 0, :3] = float("-inf")
    out = vidtok.clip_select(rel, num_clips, clip_len)
    assert out.shape == (2, 2, num_clips, clip_len) and out.dtype == torch.int32
    for b in range(2):
        for q in range(2):
            assert out[b, q].tolist() == _clip_oracle(rel[b, q].tolist(), num_clips, clip_len), (b, q)
    assert torch.equal(vidtok.clip_select(rel[:, 0], num_clips, clip_len), out[:, 0])


def test_clip_select_errors():
    with pytest.raises(ValueError, match="num_clips must be in"):
        vidtok.clip_select(torch.rand(1, 10), 0, 2)
    with pytest.raises(ValueError, match="contains NaN"):
        vidtok.clip_select(torch.tensor([[0.1, float("nan"), 0.3]]), 1, 2)


def test_segment_topk_static_size():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.8, 0.2]])
    seg = torch.tensor([[0, 0, 1, 1, 1, -1]], dtype=torch.int32)
    assert vidtok.segment_topk(scores, seg, 1).tolist() == [[1, 4]]
    assert vidtok.segment_topk(scores, seg, 1, num_segments=3).tolist() == [[1, 4, -1]]
    torch._dynamo.reset()
    f = torch.compile(lambda s, g: vidtok.segment_topk(s, g, 2, num_segments=2), fullgraph=True)
    assert f(scores, seg).tolist() == vidtok.segment_topk(scores, seg, 2).tolist() == [[0, 1, 2, 4]]

"""One documented behaviour per op for NaN and other values a compressor must not silently accept:
the ops that decide what to keep refuse NaN (a ValueError naming the argument; vidtok.allow_nan()
restores their documented NaN handling), the ops that compute values let NaN propagate; unit
mix-ups, sizes <= 0, mismatched frame counts and out-of-range arguments are errors."""

import math

import pytest
import torch

import vidtok
from vidtok import masks as M


def _nan(*shape, where=(0,)):
    t = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    t.view(-1)[list(where)] = float("nan")
    return t


# (op, call with a NaN in the named argument, argument name in the error)
REFUSE = [
    ("match", lambda: vidtok.match(_nan(1, 4, 3), torch.rand(1, 5, 3)), "a"),
    ("match", lambda: vidtok.match(torch.rand(1, 4, 3), _nan(1, 5, 3)), "b"),
    ("bipartite_merge", lambda: vidtok.bipartite_merge(_nan(1, 8, 3), 2), "x"),
    ("bipartite_merge", lambda: vidtok.bipartite_merge(torch.rand(1, 8, 3), 2, metric=_nan(1, 8, 2)), "metric"),
    ("temporal_merge", lambda: vidtok.temporal_merge(_nan(1, 3, 4, 3), r=2), "x"),
    ("motion_gate", lambda: vidtok.motion_gate(_nan(1, 2, 1, 4, 4), 2, 0.1), "float video"),
    ("block_match", lambda: vidtok.block_match(_nan(1, 8, 8), torch.rand(1, 8, 8), block=4, radius=1), "cur"),
    ("greedy_select", lambda: vidtok.greedy_select(_nan(1, 1, 6), 2), "relevance"),
    ("greedy_select", lambda: vidtok.greedy_select(torch.rand(1, 1, 6), 2, x=_nan(1, 6, 3), lam=0.5), "x"),
    ("dpp_select", lambda: vidtok.dpp_select(_nan(1, 6, 3), 2), "x"),
    ("scene_boundaries", lambda: vidtok.scene_boundaries(_nan(1, 5), threshold=0.5), "adjacent"),
    ("segment_topk", lambda: vidtok.segment_topk(_nan(1, 6), torch.zeros(1, 6, dtype=torch.int64), 1), "scores"),
]


@pytest.mark.parametrize("op,call,name", REFUSE, ids=[f"{op}-{name}" for op, _, name in REFUSE])
def test_decisions_refuse_nan_unless_allowed(op, call, name):
    with pytest.raises(ValueError, match=rf"{name} (contains NaN|must hold values in \[0, 1\], without NaN)"):
        call()
    with vidtok.allow_nan():
        call()  # the documented NaN behaviour (each op's docstring), no error
    with pytest.raises(ValueError):
        call()  # the block ended: refused again


def test_allowed_nan_keeps_the_documented_decisions():
    with vidtok.allow_nan():
        score, idx = vidtok.match(_nan(1, 4, 3), torch.rand(1, 5, 3))
        assert idx[0, 0] == -1 and score[0, 0] == float("-inf")  # a NaN token never matches
        picks = vidtok.greedy_select(_nan(1, 1, 6, where=(2,)), 5)
        assert 2 not in picks.tolist()[0][0]  # a NaN frame is never picked
        seg = vidtok.scene_boundaries(torch.tensor([[0.9, float("nan"), 0.9]]), threshold=0.5)
        assert seg.tolist() == [[0, 0, 0, 0]]  # a NaN pair never cuts


def test_padding_pairs_of_frame_scores_are_not_nan_errors():
    """frame_scores gives NaN adjacency for pairs touching padding frames by design; with the same
    lengths scene_boundaries reads only the real pairs."""
    x = torch.randn(2, 6, 4)
    lengths = torch.tensor([6, 3])
    scores = vidtok.frame_scores(x, lengths=lengths)
    assert torch.isnan(scores.adjacent[1, 2:]).all()
    seg = vidtok.scene_boundaries(scores.adjacent, threshold=0.0, lengths=lengths)
    assert (seg[1, 3:] == -1).all()
    real = scores.adjacent.clone()
    real[1, 0] = float("nan")  # a real pair
    with pytest.raises(ValueError, match="adjacent contains NaN"):
        vidtok.scene_boundaries(real, threshold=0.0, lengths=lengths)


def test_value_ops_propagate_nan():
    x = _nan(1, 3, 2, 4, where=(0,))
    assert torch.isnan(vidtok.paired_similarity(x)[0, 0, 0])  # frame 1 vs the NaN token of frame 0
    assert not torch.isnan(vidtok.paired_similarity(x)[0, 1]).any()
    assert torch.isnan(vidtok.frame_scores(_nan(1, 3, 4)).norms[0, 0])
    video = torch.rand(1, 2, 1, 4, 4)
    video[0, 1, 0, 0, 0] = float("nan")
    assert torch.isnan(vidtok.patch_delta(video, 2)[0, 1, 0, 0])
    plan = vidtok.build_plan(vidtok.VideoLayout.from_grid(1, 2, 2), M.frame_local(), block=(16, 16))
    q = torch.rand(1, 1, 4, 8)
    k = q.clone()
    k[0, 0, 1, 0] = float("nan")
    assert torch.isnan(vidtok.sparse_attention(q, k, q, plan)).all()  # every query reads key 1


def test_float_video_contract():
    """Float video is read in [0, 1]; a threshold in grey levels with float video (which would keep
    only frame 0) and values outside [0, 1] are errors, not silent decisions."""
    video = torch.rand(1, 4, 3, 8, 8)
    with pytest.raises(ValueError, match=r"threshold = 8 can never be exceeded: float video is read in \[0, 1\]"):
        vidtok.motion_gate(video, 4, 8.0)
    gate = vidtok.motion_gate(video, 4, 8.0 / 255)
    assert gate.keep[:, 1:].any()
    assert vidtok.motion_gate(video, 4, math.inf).keep[:, 1:].sum() == 0  # +inf keeps only the forced
    with pytest.raises(ValueError, match=r"threshold = 7 can never be exceeded"):
        vidtok.motion_gate(video, 4, 7.0, reduce="l2")  # l2 of 48 elements in [0, 1]: at most sqrt(48)
    vidtok.motion_gate(video, 4, 6.0, reduce="l2")
    with pytest.raises(ValueError, match=r"float video must hold values in \[0, 1\]"):
        vidtok.motion_gate(video * 255, 4, 0.1)
    assert vidtok.motion_gate((video * 255).to(torch.uint8), 4, 8.0).keep[:, 1:].any()  # grey levels: uint8


def test_merge_sizes_must_be_positive():
    x = torch.randn(1, 2, 4, 3)
    for bad in (0.0, -1.0):
        size = torch.ones(1, 2, 4)
        size[0, 1, 2] = bad
        with pytest.raises(ValueError, match="size must be positive"):
            vidtok.temporal_merge(x, r=2, size=size)
        with pytest.raises(ValueError, match="size must be positive"):
            vidtok.bipartite_merge(x.view(1, 8, 3), 2, size=size.view(1, 8))


def test_unmerge_checks_what_it_is_given():
    x = torch.randn(1, 8, 4, 3)
    merged = vidtok.temporal_merge(x, r=5)
    assert vidtok.unmerge(merged.x, merged, frames=8).shape == (1, 8, 4, 3)
    with pytest.raises(ValueError, match=r"frames = 4, but merged comes from a merge of T = 8 frames"):
        vidtok.unmerge(merged.x, merged, frames=4)
    with pytest.raises(TypeError, match="merged must be a vidtok.Merged"):
        vidtok.unmerge(merged.x, merged.index)


def test_sparse_attention_head_dimension_zero_and_uniform_indices_range():
    plan = vidtok.build_plan(vidtok.VideoLayout.from_grid(1, 2, 2), M.frame_local(), block=(16, 16))
    empty = torch.zeros(1, 1, 4, 0)
    with pytest.raises(ValueError, match="head dimension D >= 1"):
        vidtok.sparse_attention(empty, empty, empty, plan)
    with pytest.raises(ValueError, match=r"T must be in \[0, 2147483647\] \(the indices are int32\)"):
        vidtok.uniform_indices(2**31, 4)
    last = vidtok.uniform_indices(2**31 - 1, 3)
    assert last.tolist() == [0, 2**30 - 1, 2**31 - 2]

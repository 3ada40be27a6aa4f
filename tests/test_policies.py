"""The ready-made integration policies on plain tensors: what they keep, where it stands, bad input."""

import pytest
import torch

from vidtok.integrations import MergeTemporal, SelectFrames
from vidtok.integrations.policies import check_output


def _video(T, h, w, C, seed=0, static=False):
    g = torch.Generator().manual_seed(seed)
    if static:
        return torch.randn(1, h * w, C, generator=g).expand(T, h * w, C).reshape(T * h * w, C).clone()
    return torch.randn(T * h * w, C, generator=g)


def test_merge_temporal_collapses_a_static_video_and_keeps_a_changing_one():
    T, h, w, C = 5, 3, 4, 16
    out, origin = MergeTemporal(0.99)(_video(T, h, w, C, static=True), (T, h, w))
    check_output((out, origin), _video(T, h, w, C), (T, h, w))
    assert torch.equal(origin, torch.arange(h * w))
    torch.testing.assert_close(out, _video(T, h, w, C, static=True)[: h * w])
    feats = _video(T, h, w, C, seed=1)
    out, origin = MergeTemporal(0.99)(feats, (T, h, w))
    assert torch.equal(origin, torch.arange(T * h * w)) and torch.equal(out, feats)


def test_merge_temporal_with_r_removes_r_tokens():
    T, h, w, C = 4, 2, 3, 8
    feats = _video(T, h, w, C, seed=2)
    out, origin = MergeTemporal(r=5, radius=None)(feats, (T, h, w))
    assert out.shape == (T * h * w - 5, C) and bool((origin[1:] > origin[:-1]).all())
    out, _ = MergeTemporal(r=10**9)(feats, (T, h, w))  # clamped to the (T - 1) * h * w links
    assert out.shape == (h * w, C)


@pytest.mark.parametrize("method", SelectFrames.METHODS)
def test_select_frames_keeps_whole_frames_in_time_order(method):
    T, h, w, C = 9, 2, 2, 8
    feats = _video(T, h, w, C, seed=3)
    policy = SelectFrames(3, method=method)
    frames = policy.frames(feats, (T, h, w))
    assert frames.shape == (3,) and bool((frames[1:] > frames[:-1]).all())
    out, origin = policy(feats, (T, h, w))
    check_output((out, origin), feats, (T, h, w))
    assert torch.equal(origin, (frames[:, None] * 4 + torch.arange(4)).reshape(-1))
    assert torch.equal(out, feats[origin])
    short = SelectFrames(20, method=method)(feats, (T, h, w))  # at most k frames: kept whole
    assert torch.equal(short[1], torch.arange(T * h * w))


def test_select_frames_dpp_skips_a_duplicate_frame():
    T, h, w, C = 4, 1, 2, 8
    feats = _video(T, h, w, C, seed=4).reshape(T, h * w, C)
    feats[1] = feats[0]  # frame 1 repeats frame 0: a diverse pick of 3 never takes both
    frames = SelectFrames(3).frames(feats.reshape(-1, C), (T, h, w)).tolist()
    assert not {0, 1} <= set(frames)


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: MergeTemporal(), ValueError, "exactly one of threshold= and r="),
        (lambda: MergeTemporal(0.9, r=3), ValueError, "exactly one"),
        (lambda: MergeTemporal(r=-1), ValueError, "r must be an int >= 0"),
        (lambda: SelectFrames(0), ValueError, "k must be an int >= 1"),
        (lambda: SelectFrames(2, method="best"), ValueError, "method must be one of"),
    ],
)
def test_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_features():
    with pytest.raises(ValueError, match="T\\*h\\*w"):
        SelectFrames(2)(torch.randn(10, 4), (2, 2, 2))

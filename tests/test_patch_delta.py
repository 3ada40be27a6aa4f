"""vidtok.patch_delta: every backend against a float64 oracle written from the definition, bit-identical
across backends on uint8, RLT's published scoring rule, strided views, bad input, opcheck, compile."""

import zlib

import pytest
import torch

import vidtok
from vidtok.testing import devices, real_clip, runnable_backends, video_cases

# uint8 video runs wherever float32 does (the kernels take both)
BACKENDS = runnable_backends("patch_delta", "cpu", torch.uint8)
CASES = video_cases("patch_delta")
REDUCES = ["mean_abs", "l2", "max_abs", "rlt"]


def _video(B, T, C, H, W, *, dtype=torch.uint8, seed=0, static=0.5):
    """Random uint8-valued video in which a ``static`` fraction of 4x4 cells repeat across frames."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (B, T, C, H, W), generator=g)
    still = torch.rand(B, 1, 1, (H + 3) // 4, (W + 3) // 4, generator=g) < static
    still = still.repeat_interleave(4, 3).repeat_interleave(4, 4)[..., :H, :W]
    x = torch.where(still, x[:, :1], x)
    return x.to(dtype)


def _oracle(video, ph, pw, ts, reduce):
    """float64, straight from the definition: slice k against slice k - 1 (RLT: the last frame of
    tubelet k against the first frame of tubelet k - 1), one patch at a time."""
    B, T, C, H, W = video.shape
    x = video.double()
    Tq, h, w = T // ts, H // ph, W // pw
    out = torch.full((B, Tq, h, w), float("inf"), dtype=torch.float64)
    for k in range(1, Tq):
        if reduce == "rlt":
            cur, prev = x[:, k * ts + ts - 1 : k * ts + ts], x[:, (k - 1) * ts : (k - 1) * ts + 1]
        else:
            cur, prev = x[:, k * ts : (k + 1) * ts], x[:, (k - 1) * ts : k * ts]
        for i in range(h):
            for j in range(w):
                d = (cur - prev)[..., i * ph : (i + 1) * ph, j * pw : (j + 1) * pw].reshape(B, -1)
                if reduce == "l2":
                    out[:, k, i, j] = d.square().sum(1).sqrt()
                elif reduce == "max_abs":
                    out[:, k, i, j] = d.abs().amax(1)
                else:
                    out[:, k, i, j] = d.abs().mean(1)
    return out


# (B, T, C, H, W, patch, tubelet): one slice, odd patch counts, rectangular patches, tubelet 2 and 3
SHAPES = [
    (1, 1, 3, 4, 4, 4, 1),
    (2, 4, 3, 8, 12, 4, 1),
    (1, 6, 1, 6, 10, (3, 5), 2),
    (1, 6, 3, 8, 8, (8, 4), 3),
]


@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("device,backend", CASES)
def test_matches_float64_oracle(device, backend, dtype, shape, reduce):
    B, T, C, H, W, patch, ts = shape
    video = _video(B, T, C, H, W, dtype=dtype, seed=zlib.crc32(str((shape, reduce)).encode()))
    if dtype != torch.uint8:
        video = video / 255  # non-integer values: float sums round
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    out = vidtok.patch_delta(video.to(device), patch, tubelet=ts, reduce=reduce, backend=backend).cpu()
    assert out.dtype == torch.float32 and out.shape == (B, T // ts, H // ph, W // pw)
    expected = _oracle(video, ph, pw, ts, reduce)
    assert torch.isinf(out[:, 0]).all()
    # uint8: exact integer sums, one fp32 rounding (the oracle rounds twice: allow 1 ulp)
    rtol = 2e-7 if dtype == torch.uint8 else 2e-6
    torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("device", devices())
def test_uint8_bit_identical_across_backends(device, reduce):
    video = _video(2, 6, 3, 8, 8, seed=3)
    expected = vidtok.patch_delta(video, 4, tubelet=2, reduce=reduce, backend="reference")
    for backend in runnable_backends("patch_delta", device, torch.uint8):
        assert torch.equal(vidtok.patch_delta(video.to(device), 4, tubelet=2, reduce=reduce, backend=backend).cpu(), expected)


def test_rlt_rule_from_the_paper():
    """RLT (Choudhury et al., NeurIPS 2024, sec. 3): with tubelets of ts frames, the score of tubelet
    k >= 1 at patch (i, j) is the mean absolute difference, over the patch's pixels and channels,
    between the last frame of tubelet k and the first frame of tubelet k - 1. Written here for ts = 2
    frame by frame: frames 2k + 1 and 2k - 2."""
    video = _video(1, 8, 3, 8, 8, seed=4, static=0.3)
    p = 4
    for backend in BACKENDS:
        out = vidtok.patch_delta(video, p, tubelet=2, reduce="rlt", backend=backend)
        for k in range(1, 4):
            a, b = video[0, 2 * k + 1].long(), video[0, 2 * k - 2].long()
            for i in range(2):
                for j in range(2):
                    total = (a - b)[:, i * p : (i + 1) * p, j * p : (j + 1) * p].abs().sum()
                    assert out[0, k, i, j] == torch.tensor(total.item() / (3 * p * p), dtype=torch.float32)
        # with one-frame tubelets RLT's rule is plain mean_abs against the previous frame
        single = vidtok.patch_delta(video, p, tubelet=1, reduce="rlt", backend=backend)
        assert torch.equal(single, vidtok.patch_delta(video, p, tubelet=1, reduce="mean_abs", backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views(backend):
    base = _video(1, 4, 3, 12, 16, seed=5)
    expected = vidtok.patch_delta(base[..., 2:10, 4:12].contiguous(), 4, backend="reference")
    channels_last = base.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    for view in (base[..., 2:10, 4:12], channels_last[..., 2:10, 4:12], base.flip(-1).flip(-1)[..., 2:10, 4:12]):
        assert torch.equal(vidtok.patch_delta(view, 4, backend=backend), expected)
    time_strided = base[:, ::2]  # every other frame
    assert torch.equal(
        vidtok.patch_delta(time_strided, 4, backend=backend),
        vidtok.patch_delta(time_strided.contiguous(), 4, backend="reference"),
    )


# (C, H, W, patch, tubelet): the kernels' tiles are rows (ts x C x ph, rounded up to a power of two)
# by the patch width (a compile-time constant, rounded up): widths off the powers of two (14, 6, 33),
# 1x1 patches, wide-short and tall-narrow ones, and the largest tile (99 x 33 pixels in 128 x 64).
TILES = [
    (3, 28, 28, 14, 1),
    (3, 14, 28, 14, 2),
    (1, 6, 12, (3, 6), 3),
    (3, 2, 3, 1, 1),
    (1, 4, 32, (2, 16), 2),
    (1, 32, 2, (16, 1), 1),
    (3, 33, 33, 33, 1),
]


@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("tile", TILES, ids=str)
def test_every_tile_shape_is_bit_identical_on_uint8_and_close_on_float(tile, reduce):
    C, H, W, patch, ts = tile
    video = _video(1, 3 * ts, C, H, W, seed=zlib.crc32(str((tile, reduce)).encode()))
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    oracle = _oracle(video, ph, pw, ts, reduce)
    for backend in BACKENDS:
        out = vidtok.patch_delta(video, patch, tubelet=ts, reduce=reduce, backend=backend)
        assert torch.equal(out, vidtok.patch_delta(video, patch, tubelet=ts, reduce=reduce, backend="reference"))
        torch.testing.assert_close(out.double(), oracle, rtol=2e-7, atol=1e-7)
        scaled = vidtok.patch_delta(video.float() / 255, patch, tubelet=ts, reduce=reduce, backend=backend)
        torch.testing.assert_close(scaled.double(), oracle / 255, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views_of_odd_patch_widths(backend):
    """Width-14 patches (unaligned rows) read through views: channels-last frames (column stride C), a
    crop, transposed frames (row stride 1) and every other frame."""
    base = _video(1, 6, 3, 28, 42, seed=8)
    channels_last = base.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    views = [channels_last[..., 14:], base[..., 14:], base.transpose(-1, -2)[..., :28], base[:, ::2]]
    for view in views:
        for ts, reduce in ((1, "mean_abs"), (2, "rlt"), (1, "l2")):
            if view.shape[1] % ts:
                continue
            expected = vidtok.patch_delta(view.contiguous(), 14, tubelet=ts, reduce=reduce, backend="reference")
            assert torch.equal(vidtok.patch_delta(view, 14, tubelet=ts, reduce=reduce, backend=backend), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_static_video_is_zero_and_nan_propagates(backend):
    video = torch.full((1, 3, 3, 8, 8), 0.25)
    video[0, 2, 1, 0, 0] = float("nan")
    out = vidtok.patch_delta(video, 4, backend=backend)
    assert torch.equal(out[0, 1], torch.zeros(2, 2))
    assert torch.isnan(out[0, 2, 0, 0]) and torch.equal(out[0, 2].flatten()[1:], torch.zeros(3))


def test_real_clip_agrees_across_backends():
    frames = real_clip("bikes.mp4", max_frames=4)[:, :, :32, :48]  # [T, 3, H, W] uint8, a small crop
    video = frames.unsqueeze(0)
    outs = [vidtok.patch_delta(video, 16, backend=b) for b in BACKENDS]
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    expected = _oracle(video, 16, 16, 1, "mean_abs")
    torch.testing.assert_close(outs[0].double(), expected, rtol=2e-7, atol=0)
    assert (outs[0][0, 1:] < 255).all()


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((torch.zeros(3, 3, 8, 8, dtype=torch.uint8), 4), {}, ValueError, r"video must be \[B, T, C, H, W\] \(rank 5\)"),
        ((torch.zeros(1, 2, 3, 8, 8, dtype=torch.int32), 4), {}, TypeError, "video must be one of uint8, float32"),
        ((torch.zeros(1, 2, 2, 8, 8), 4), {}, ValueError, r"1 \(luma\) or 3 \(RGB\) channels.*got C = 2"),
        ((torch.zeros(1, 2, 3, 8, 10), 4), {}, ValueError, r"multiples of the patch \(4, 4\), got H = 8, W = 10"),
        ((torch.zeros(1, 2, 3, 8, 8), (4, 3)), {}, ValueError, "multiples of the patch"),
        ((torch.zeros(1, 3, 3, 8, 8), 4), {"tubelet": 2}, ValueError, "T must be a multiple of the tubelet 2, got T = 3"),
        ((torch.zeros(1, 2, 3, 8, 8), 0), {}, ValueError, r"patch height must be in \[1, 8\]"),
        ((torch.zeros(1, 2, 3, 8, 8), 4.0), {}, TypeError, "patch must be an int or a pair"),
        ((torch.zeros(1, 2, 3, 8, 8), 4), {"reduce": "sad"}, ValueError, "reduce must be one of"),
        ((torch.zeros(1, 2, 3, 8, 8), 4), {"backend": "cuda"}, vidtok.BackendUnavailableError, "patch_delta has no cuda kernel"),
    ],
)
def test_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        vidtok.patch_delta(*args, **kwargs)


def test_patch_too_large_for_triton_falls_to_reason():
    video = torch.zeros(1, 2, 3, 64, 64, dtype=torch.uint8)
    if "triton" in BACKENDS:
        with pytest.raises(vidtok.BackendUnavailableError, match="at most 4096 elements"):
            vidtok.patch_delta(video, 64, backend="triton")
    assert vidtok.patch_delta(video, 64).shape == (1, 2, 1, 1)  # auto takes the reference


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    video = _video(1, 4, 3, 8, 8, seed=6)
    torch.library.opcheck(torch.ops.vidtok.patch_delta.default, (video, 4, 4, 2, "rlt", backend))
    torch.library.opcheck(torch.ops.vidtok.patch_delta.default, (video.float(), 4, 4, 1, "l2", backend))


def test_compiles_fullgraph():
    torch._dynamo.reset()

    def f(v):
        return (vidtok.patch_delta(v, 4, tubelet=2)[:, 1:] > 10).sum()

    compiled = torch.compile(f, fullgraph=True)
    video = _video(2, 6, 3, 8, 12, seed=7)
    assert torch.equal(compiled(video), f(video))


@pytest.mark.parametrize("backend", BACKENDS)
def test_l2_is_correctly_rounded(backend):
    """sum d^2 = 622682, whose fp32 square root torch's CPU sqrt rounds the wrong way (789.10199):
    every backend must give the correctly rounded 789.10205 (numpy's IEEE sqrt)."""
    import numpy as np

    video = torch.zeros(1, 2, 1, 4, 4, dtype=torch.uint8)
    video[0, 1, 0].view(-1)[:12] = torch.tensor([255] * 9 + [193, 12, 8], dtype=torch.uint8)
    out = vidtok.patch_delta(video, 4, reduce="l2", backend=backend)
    assert out[0, 1, 0, 0].item() == float(np.sqrt(np.float32(622682)))

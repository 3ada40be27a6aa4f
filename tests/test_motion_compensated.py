"""vidtok.motion_gate(search_radius > 0): a panning texture is followed with near-zero compensated
change, the motion agrees with vidtok.block_match, compensation never increases the change, dropped
patches are within the threshold of the displaced block they are rebuilt from, bad input, opcheck."""

import pytest
import torch

import vidtok
from vidtok.reference.motion import patchify, rebuild, reduce_diff
from vidtok.testing import runnable_backends, to_cpu, video_cases

BACKENDS = runnable_backends("motion_gate", "cpu", torch.uint8)
CASES = video_cases("motion_gate")


def _pan(T, H, W, step, *, C=3, seed=0):
    """Frames of a textured plane seen through a window moving ``step`` = (dy, dx) pixels per frame,
    so that frame k at (y, x) equals frame k - 1 at (y + dy, x + dx)."""
    dy, dx = step
    g = torch.Generator().manual_seed(seed)
    big_h, big_w = H + abs(dy) * T, W + abs(dx) * T
    coarse = torch.rand(1, C, big_h // 4 + 1, big_w // 4 + 1, generator=g)
    plane = torch.nn.functional.interpolate(coarse, size=(big_h, big_w), mode="bilinear", align_corners=False)[0]
    plane = (200 * plane + 55 * torch.rand(C, big_h, big_w, generator=g)).to(torch.uint8)
    y0 = 0 if dy >= 0 else big_h - H
    x0 = 0 if dx >= 0 else big_w - W
    frames = [plane[:, y0 + k * dy : y0 + k * dy + H, x0 + k * dx : x0 + k * dx + W] for k in range(T)]
    return torch.stack(frames).unsqueeze(0)


@pytest.mark.parametrize("device,backend", CASES)
def test_panning_texture_is_followed(device, backend):
    video = _pan(4, 24, 32, (1, -2)).to(device)
    plain = vidtok.motion_gate(video, 8, 1.0, compare_to="prev", backend=backend)
    mc = vidtok.motion_gate(video, 8, 1.0, compare_to="prev", search_radius=2, backend=backend)
    plain, mc = to_cpu(plain), to_cpu(mc)
    assert plain.motion is None and mc.motion.dtype == torch.int16 and mc.motion.shape == (1, 4, 3, 4, 2)
    assert plain.keep.all()  # every patch changes when the camera pans
    # patches whose displaced block stays inside the frame: exact match, motion (1, -2), dropped
    interior = mc.delta[0, 1:, :2, 1:]  # rows 0-1 (dy = +1 stays inside), columns 1-3 (dx = -2 stays inside)
    assert torch.equal(interior, torch.zeros_like(interior))
    assert (mc.motion[0, 1:, :2, 1:] == torch.tensor([1, -2], dtype=torch.int16)).all()
    assert not mc.keep[0, 1:, :2, 1:].any()
    assert (mc.motion[0, 0] == 0).all() and torch.isinf(mc.delta[0, 0]).all()


@pytest.mark.parametrize("radius", [1, 3])
def test_motion_agrees_with_block_match(radius):
    """One luma channel, mean_abs, reference "prev", square patches: the gate's motion is
    block_match's between consecutive frames and its delta is the SAD over the patch area."""
    g = torch.Generator().manual_seed(radius)
    video = _pan(5, 16, 24, (1, 1), C=1)
    video = (video.int() + torch.randint(-9, 10, video.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    gate = vidtok.motion_gate(video, 8, 4.0, compare_to="prev", search_radius=radius)
    for k in range(1, 5):
        motion, cost = vidtok.block_match(video[:, k, 0], video[:, k - 1, 0], block=8, radius=radius)
        assert torch.equal(gate.motion[:, k], motion)
        assert torch.equal(gate.delta[:, k], (cost.double() / 64).float())


@pytest.mark.parametrize("reduce", ["mean_abs", "l2", "max_abs"])
def test_compensation_never_increases_the_change(reduce):
    video = _pan(4, 16, 16, (2, 0), seed=3)
    video[:, 2, :, 4:12, 4:12] = 0  # an occluding object
    plain = vidtok.patch_delta(video, 8, reduce=reduce)
    mc = vidtok.motion_gate(video, 8, -1.0, compare_to="prev", reduce=reduce, search_radius=2)
    assert mc.keep.all()
    assert (mc.delta[:, 1:] <= plain[:, 1:]).all() and (mc.delta[:, 1:] < plain[:, 1:]).any()


@pytest.mark.parametrize("tubelet", [1, 2])
def test_dropped_patches_are_within_threshold_of_their_displaced_source(tubelet):
    video = _pan(8, 16, 24, (0, 1), seed=4)
    video[:, 5:, :, 8:, 8:16] //= 2  # a change that must be sent
    tau = 3.0
    gate = vidtok.motion_gate(video, 8, tau, tubelet=tubelet, search_radius=2)
    assert 0 < gate.keep[:, 1:].float().mean() < 1
    rebuilt = rebuild(video, gate.keep, gate.carry, gate.motion)
    cur = patchify(video, 8, 8, tubelet).float()
    err = reduce_diff(cur - patchify(rebuilt, 8, 8, tubelet), "mean_abs")
    dropped = ~gate.keep
    assert (err[dropped] <= tau).all() and torch.equal(err[dropped], gate.delta[dropped])
    assert (err[gate.keep] == 0).all()  # kept patches are rebuilt exactly


def test_bad_input_and_backend_reasons():
    video = torch.zeros(1, 2, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"search_radius must be in \[0,"):
        vidtok.motion_gate(video, 4, 1.0, search_radius=-1)
    with pytest.raises(TypeError, match="search_radius must be an int"):
        vidtok.motion_gate(video, 4, 1.0, search_radius=1.5)
    with pytest.raises(vidtok.BackendUnavailableError, match="motion_gate has no cuda kernel"):
        vidtok.motion_gate(video, 4, 1.0, search_radius=1, backend="cuda")


@pytest.mark.parametrize(
    "config",
    [
        dict(compare_to="last_kept", reduce="mean_abs"),
        dict(compare_to="prev", reduce="l2", max_run=2),
        dict(compare_to="last_kept", reduce="rlt", tubelet=2),
        dict(compare_to="last_kept", reduce="max_abs", tubelet=2, refresh_every=2),
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_uint8_bit_identical_across_backends(config):
    g = torch.Generator().manual_seed(8)
    video = _pan(8, 8, 16, (1, -1), seed=5)
    video = (video.int() + torch.randint(-5, 6, video.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    video[:, 4, :, :, 8:] //= 2
    # a threshold that splits: the median change when everything is kept
    everything = vidtok.motion_gate(video, 4, -1.0, search_radius=1, backend="reference", **config)
    threshold = everything.delta[:, 1:].median().item()
    gates = [vidtok.motion_gate(video, 4, threshold, search_radius=1, backend=b, **config) for b in BACKENDS]
    assert 0 < gates[0].keep[:, 1:].float().mean() < 1
    for gate in gates[1:]:
        for name, x, y in zip(gate._fields, gate, gates[0]):
            assert x.dtype == y.dtype and torch.equal(x, y), name


@pytest.mark.parametrize("patch,tubelet,reduce,H,W", [((3, 5), 2, "mean_abs", 9, 15), (6, 1, "l2", 12, 12), ((2, 7), 2, "rlt", 8, 14)],
                         ids=str)
def test_odd_patch_widths_bit_identical_across_backends(patch, tubelet, reduce, H, W):
    """Patch widths off the powers of two (a masked tile), candidate blocks at the frame edges."""
    g = torch.Generator().manual_seed(9)
    video = _pan(4, H, W, (1, -1), seed=6)
    video = (video.int() + torch.randint(-5, 6, video.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    channels_last = video.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    expected = vidtok.motion_gate(video, patch, 4.0, tubelet=tubelet, reduce=reduce, search_radius=1, backend="reference")
    assert expected.motion.any()
    for backend in BACKENDS:
        for view in (video, channels_last):
            gate = vidtok.motion_gate(view, patch, 4.0, tubelet=tubelet, reduce=reduce, search_radius=1, backend=backend)
            for name, x, y in zip(gate._fields, gate, expected):
                assert torch.equal(x, y), (backend, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_and_compile(backend):
    video = _pan(3, 8, 8, (1, 0))
    torch.library.opcheck(
        torch.ops.vidtok.motion_gate_compensated.default, (video, 4, 4, 2.0, "last_kept", 1, "mean_abs", 0, 0, 1, backend)
    )
    if backend != "reference":
        return
    torch._dynamo.reset()

    def f(v):
        g = vidtok.motion_gate(v, 4, 2.0, search_radius=1)
        return g.keep, g.motion

    for a, b in zip(torch.compile(f, fullgraph=True)(video), f(video)):
        assert torch.equal(a, b)

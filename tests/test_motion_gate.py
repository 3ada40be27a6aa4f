"""vidtok.motion_gate: bit-identical masks across backends on uint8, RLT's gate written from the paper,
keep-all / keep-first limits, forced refreshes and run caps, run lengths and carry, drift (a slow fade
caught by "last_kept" and missed by "prev"), real video, bad input, opcheck, compile."""

import zlib

import pytest
import torch

import vidtok
from vidtok.reference.motion import patchify, reduce_diff
from vidtok.testing import devices, real_clip, runnable_backends, to_cpu

BACKENDS = runnable_backends("motion_gate", "cpu", torch.uint8)


def _video(B, T, C, H, W, *, seed=0, static=0.5, step=24):
    """uint8 video in which a ``static`` fraction of 4x4 cells drift by small random steps per frame
    (so thresholds near ``step`` split them), the rest change at random."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (B, T, C, H, W), generator=g)
    walk = torch.randint(-step, step + 1, (B, T, 1, (H + 3) // 4, (W + 3) // 4), generator=g).cumsum(1)
    walk = walk.repeat_interleave(4, 3).repeat_interleave(4, 4)[..., :H, :W]
    still = torch.rand(B, 1, 1, (H + 3) // 4, (W + 3) // 4, generator=g) < static
    still = still.repeat_interleave(4, 3).repeat_interleave(4, 4)[..., :H, :W]
    x = torch.where(still, (x[:, :1] + walk).clamp(0, 255), x)
    return x.to(torch.uint8)


def _gate(video, patch, threshold, backend, **kw):
    return vidtok.motion_gate(video, patch, threshold, backend=backend, **kw)


def _assert_same(a, b):
    assert a.motion is None and b.motion is None
    for name, x, y in zip(a._fields[:4], a[:4], b[:4]):
        assert x.dtype == y.dtype and torch.equal(x, y), name


CONFIGS = [
    dict(compare_to="last_kept"),
    dict(compare_to="prev"),
    dict(compare_to="last_kept", reduce="l2", refresh_every=3),
    dict(compare_to="prev", reduce="max_abs", max_run=2),
    dict(compare_to="last_kept", reduce="rlt", tubelet=2, max_run=2),
    dict(compare_to="prev", reduce="rlt", tubelet=2),
    dict(compare_to="last_kept", tubelet=2, refresh_every=2, max_run=3),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("device", devices())
def test_uint8_bit_identical_across_backends(device, config):
    """Every backend on ``device`` gives the CPU reference's gate, bit for bit."""
    video = _video(2, 8, 3, 8, 12, seed=zlib.crc32(str(config).encode()))
    threshold = {"l2": 400.0, "max_abs": 60.0}.get(config.get("reduce"), 20.0)
    expected = _gate(video, 4, threshold, "reference", **config)
    keep = expected.keep
    assert keep.dtype == torch.bool and keep.shape == (2, 8 // config.get("tubelet", 1), 2, 3)
    assert 0 < keep[:, 1:].float().mean() < 1, "the threshold should split the patches"
    for backend in runnable_backends("motion_gate", device, torch.uint8):
        _assert_same(to_cpu(_gate(video.to(device), 4, threshold, backend, **config)), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_video_of_grey_levels_over_256_gives_the_uint8_masks(backend):
    """uint8 / 256 in float (an exact scaling: every sum and mean is the integer one over 256) with the
    threshold over 256 decides exactly as the uint8 gate."""
    video = _video(1, 6, 3, 8, 8, seed=1)
    expected = _gate(video, 4, 20.0, "reference")
    for dtype in (torch.float32, torch.float16):
        got = _gate(video.to(dtype) / 256, 4, 20.0 / 256, backend)
        _assert_same(got._replace(delta=got.delta * 256), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rlt_gate_from_the_paper(backend):
    """RLT (Choudhury et al., NeurIPS 2024): the first tubelet is always kept; tubelet k >= 1 is kept
    iff the mean |difference| between its last frame and the first frame of tubelet k - 1, over the
    patch's pixels and channels, exceeds tau (strictly). Written here with explicit loops."""
    ts, p, tau = 2, 4, 20.0
    video = _video(1, 8, 3, 8, 8, seed=2)
    gate = _gate(video, p, tau, backend, compare_to="prev", reduce="rlt", tubelet=ts)
    x = video[0].long()
    for k in range(4):
        for i in range(2):
            for j in range(2):
                if k == 0:
                    expected = True
                else:
                    d = x[k * ts + ts - 1] - x[(k - 1) * ts]
                    score = d[:, i * p : (i + 1) * p, j * p : (j + 1) * p].abs().sum().item() / (3 * p * p)
                    expected = score > tau
                assert gate.keep[0, k, i, j].item() == expected, (k, i, j)
    assert 0 < gate.keep[:, 1:].float().mean() < 1


@pytest.mark.parametrize("compare_to", ["prev", "last_kept"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_threshold_keeps_all_and_inf_keeps_first_and_forced(backend, compare_to):
    video = _video(1, 9, 3, 8, 8, seed=3)
    every = _gate(video, 4, -1.0, backend, compare_to=compare_to)
    assert every.keep.all() and (every.run_length == 1).all()
    flat = torch.arange(9 * 4, dtype=torch.int32).view(1, 9, 2, 2)
    assert torch.equal(every.carry, flat)

    first = _gate(video, 4, float("inf"), backend, compare_to=compare_to)
    assert first.keep[:, 0].all() and not first.keep[:, 1:].any()
    assert (first.run_length[:, 0] == 9).all() and torch.equal(first.carry, flat[:, :1].expand(1, 9, 2, 2))
    assert torch.isinf(first.delta[:, 0]).all() and torch.isfinite(first.delta[:, 1:]).all()

    refreshed = _gate(video, 4, float("inf"), backend, compare_to=compare_to, refresh_every=4)
    assert torch.equal(refreshed.keep[0, :, 0, 0], torch.tensor([k % 4 == 0 for k in range(9)]))
    capped = _gate(video, 4, float("inf"), backend, compare_to=compare_to, max_run=2)
    assert torch.equal(capped.keep[0, :, 1, 1], torch.tensor([k % 2 == 0 for k in range(9)]))
    assert capped.run_length.max() == 2


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_equal_frames_keep_only_the_forced_slices(backend, dtype):
    """A clip of one repeated frame: every delta after slice 0 is exactly 0 for every reduction, with
    and without motion compensation (motion 0: the undisplaced block ties with any other at 0 and
    wins on |m|), so only slice 0 and the refreshes are kept."""
    frame = _video(1, 1, 3, 14, 28, seed=9)
    video = frame.repeat(1, 8, 1, 1, 1)
    video = video if dtype == torch.uint8 else video.to(dtype) / 255
    for reduce, ts in (("mean_abs", 1), ("l2", 2), ("max_abs", 1), ("rlt", 2)):
        for radius in (0, 1):
            g = _gate(video, 14, 0.0, backend, tubelet=ts, reduce=reduce, refresh_every=3, search_radius=radius)
            Tq = 8 // ts
            assert torch.equal(g.delta[:, 1:], torch.zeros(1, Tq - 1, 1, 2)), (reduce, radius)
            assert torch.equal(g.keep[0, :, 0, 0], torch.tensor([k % 3 == 0 for k in range(Tq)])), (reduce, radius)
            if radius:
                assert not g.motion.any()


@pytest.mark.parametrize("config", CONFIGS[:4], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("backend", BACKENDS)
def test_run_lengths_and_carry_agree_with_keep(backend, config):
    video = _video(2, 8, 1, 8, 8, seed=4)
    threshold = {"l2": 150.0, "max_abs": 30.0}.get(config.get("reduce"), 10.0)
    g = _gate(video, 4, threshold, backend, **config)
    Tq = g.keep.shape[1]
    assert torch.equal(g.run_length.sum(1), torch.full((2, 2, 2), Tq, dtype=torch.int32))
    assert torch.equal(g.run_length > 0, g.keep)
    hw = 4
    spatial = torch.arange(hw).view(2, 2)
    for b in range(2):
        for t in range(Tq):
            src = g.carry[b, t]
            assert torch.equal(src % hw, spatial)  # carried from the same location
            src_t = src // hw
            assert (src_t <= t).all() and g.keep[b].flatten()[src].all()
            # no kept slice between the carried one and t
            for i in range(2):
                for j in range(2):
                    assert not g.keep[b, src_t[i, j] + 1 : t + 1, i, j].any()
    # every kept patch stands for exactly run_length slots
    counts = torch.zeros(2, Tq * hw, dtype=torch.int32)
    counts.scatter_add_(1, g.carry.view(2, -1).long(), torch.ones(2, Tq * hw, dtype=torch.int32))
    assert torch.equal(counts, g.run_length.view(2, -1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_slow_fade_caught_by_last_kept_missed_by_prev(backend):
    """A static frame in which one patch brightens by one grey level every other frame (0.5 per frame):
    the previous-frame rule never sees more than 1 grey level of change, so it never sends the patch;
    the last-kept rule resends it each time the accumulated change passes the threshold."""
    T, tau = 24, 3.0
    video = _video(1, 1, 3, 8, 8, seed=5).repeat(1, T, 1, 1, 1).clone()
    fade = (torch.arange(T) // 2).view(T, 1, 1, 1).to(torch.uint8)
    video[0, :, :, :4, 4:] = (video[0, :, :, :4, 4:].clamp(0, 200) + fade)
    prev = _gate(video, 4, tau, backend, compare_to="prev")
    kept = _gate(video, 4, tau, backend, compare_to="last_kept")
    assert prev.keep[0, 1:].sum() == 0  # drift: the fade is never sent
    assert torch.equal(kept.keep[0, 1:, 0, 1], torch.tensor([t % 8 == 0 for t in range(1, T)]))
    assert kept.keep[0, 1:].sum() == kept.keep[0, 1:, 0, 1].sum()  # and nothing else
    # the copy-forward error stays within the threshold under last_kept, grows without bound under prev
    cur = patchify(video, 4, 4, 1)
    stale_prev = reduce_diff(cur[0, :, 0, 1] - cur[0, 0, 0, 1], "mean_abs")
    assert stale_prev[-1] == T // 2 - 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropped_patches_are_within_threshold_of_their_carry_on_real_video(backend):
    """The defining property on a real clip: under "last_kept" every dropped patch is within the
    threshold of the kept patch that stands for it; under "prev" within the threshold of the previous
    frame, while its distance to the carried patch may exceed it."""
    frames = real_clip("carphone_pristine.mp4", max_frames=6)[:, :, 32:64, 48:96]  # small crop
    video = frames.unsqueeze(0)
    cur = patchify(video, 16, 16, 1).view(1, -1, 3 * 16 * 16)
    tau = 6.0
    for compare_to in ("last_kept", "prev"):
        g = _gate(video, 16, tau, backend, compare_to=compare_to)
        assert torch.equal(g.keep, _gate(video, 16, tau, "reference", compare_to=compare_to).keep)
        dropped = ~g.keep.view(1, -1)
        carried = cur.gather(1, g.carry.view(1, -1, 1).long().expand_as(cur))
        to_carry = reduce_diff(cur - carried, "mean_abs")
        if compare_to == "last_kept":
            assert (to_carry[dropped] <= tau).all()
            assert torch.equal(g.delta.view(1, -1)[dropped], to_carry[dropped])
        else:
            assert (g.delta.view(1, -1)[dropped] <= tau).all()
    assert 0 < g.keep[:, 1:].float().mean() < 1


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((torch.zeros(1, 2, 3, 8, 8), 4, 1.0), {"compare_to": "first"}, ValueError, "compare_to must be one of"),
        ((torch.zeros(1, 2, 3, 8, 8), 4, float("nan")), {}, ValueError, "threshold must not be NaN"),
        ((torch.zeros(1, 2, 3, 8, 8), 4, True), {}, TypeError, "threshold must be a real number"),
        ((torch.zeros(1, 2, 3, 8, 8), 4, 1.0), {"refresh_every": 0}, ValueError, r"refresh_every must be in \[1,"),
        ((torch.zeros(1, 2, 3, 8, 8), 4, 1.0), {"max_run": 1.5}, TypeError, "max_run must be an int"),
        ((torch.zeros(1, 2, 3, 8, 6), 4, 1.0), {}, ValueError, "multiples of the patch"),
        ((torch.zeros(1, 3, 3, 8, 8), 4, 1.0), {"tubelet": 2}, ValueError, "multiple of the tubelet"),
        ((torch.zeros(1, 2, 4, 8, 8), 4, 1.0), {}, ValueError, "got C = 4"),
        ((torch.zeros(2, 3, 8, 8), 4, 1.0), {}, ValueError, "rank 5"),
    ],
)
def test_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        vidtok.motion_gate(*args, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    video = _video(1, 4, 3, 8, 8, seed=6)
    torch.library.opcheck(torch.ops.vidtok.motion_gate.default, (video, 4, 4, 20.0, "last_kept", 1, "mean_abs", 2, 0, backend))
    torch.library.opcheck(torch.ops.vidtok.motion_gate.default, (video.float(), 4, 4, 20.0, "prev", 2, "rlt", 0, 1, backend))


def test_compiles_fullgraph():
    torch._dynamo.reset()

    def f(v):
        g = vidtok.motion_gate(v, 4, 20.0, refresh_every=3)
        return g.keep.sum(), g.run_length * g.keep, g.carry

    compiled = torch.compile(f, fullgraph=True)
    video = _video(2, 6, 3, 8, 12, seed=7)
    for a, b in zip(compiled(video), f(video)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(0, 2, 3, 8, 8), (1, 0, 3, 8, 8)], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_dimensions(shape, backend):
    video = torch.zeros(shape, dtype=torch.uint8)
    B, T = shape[:2]
    gate = _gate(video, 4, 1.0, backend)
    for field in gate[:4]:
        assert field.shape == (B, T, 2, 2)
    assert vidtok.patch_delta(video, 4, backend=backend).shape == (B, T, 2, 2)
    if backend == "reference":
        assert _gate(video, 4, 1.0, backend, search_radius=1).motion.shape == (B, T, 2, 2, 2)

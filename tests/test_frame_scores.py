"""vidtok.frame_scores: every backend against a float64 oracle built from F.cosine_similarity."""

import pytest
import torch
import torch.nn.functional as F

import vidtok
from vidtok.testing import assert_close, backend_cases, integer_norm_tokens, runnable_backends

# (B, T, Q, C): one frame, Q = 0 / 1 / past one 16-query block, T past one 64-frame block, C past 64.
SHAPES = [(1, 1, 1, 3), (2, 5, 3, 17), (1, 70, 1, 130), (2, 9, 18, 64), (3, 66, 2, 33)]


def _oracle(x, query, scale, bias, lengths):
    """Per-pair F.cosine_similarity in float64, padding filled as documented."""
    xd = x.double()
    B, T, _ = x.shape
    adjacent = F.cosine_similarity(xd[:, 1:], xd[:, :-1], dim=-1)
    norms = xd.norm(dim=-1)
    relevance = xd.new_empty(B, 0, T)
    if query is not None:
        relevance = scale * F.cosine_similarity(query.double()[:, :, None, :], xd[:, None, :, :], dim=-1) + bias
    if lengths is not None:
        for b, n in enumerate(lengths.tolist()):
            relevance[b, :, n:] = float("-inf")
            adjacent[b, max(n - 1, 0):] = float("nan")
            norms[b, n:] = 0
    return relevance, adjacent, norms


def _cases():
    return backend_cases("frame_scores")


def _inputs(B, T, Q, C, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=g).to(device=device, dtype=dtype)
    query = torch.randn(B, Q, C, generator=g).to(device=device, dtype=dtype)
    return x, query


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("device,dtype,backend", list(_cases()))
def test_matches_float64_oracle(shape, device, dtype, backend):
    B, T, Q, C = shape
    x, query = _inputs(B, T, Q, C, dtype, device, seed=torch.seed() % 2**31)
    lengths = torch.randint(0, T + 1, (B,), device=device) if B > 1 else None
    out = vidtok.frame_scores(x, query, scale=2.5, bias=-0.5, lengths=lengths, backend=backend)
    expected = _oracle(x, query, 2.5, -0.5, lengths)
    assert [t.shape for t in out] == [(B, Q, T), (B, T - 1), (B, T)]
    assert all(t.dtype == torch.float32 for t in out)
    for name, got, want in zip(out._fields, out, expected):
        # 16-bit inputs are exact in the oracle too: only the fp32 accumulation differs (x2.5 for scale)
        assert_close(got / 2.5 if name == "relevance" else got, want / 2.5 if name == "relevance" else want,
                     dtype=torch.float32, reduce_dim=C, msg=f"{name} {backend}")


@pytest.mark.parametrize("device,dtype,backend", list(_cases()))
def test_without_query_strided_and_zero_nan_frames(device, dtype, backend):
    g = torch.Generator().manual_seed(4)
    wide = torch.randn(2, 7, 2 * 40, generator=g).to(device=device, dtype=dtype)
    x = wide[..., ::2]  # channel stride 2
    x[0, 2] = 0  # zero frame: cosines 0, not NaN
    x[1, 4, 3] = float("nan")  # NaN frame: its relevance and both of its pairs are NaN
    query = torch.randn(2, 40, 1, generator=g).to(device=device, dtype=dtype).transpose(1, 2)  # [2, 1, 40] strided
    for q in (None, query):
        out = vidtok.frame_scores(x, q, backend=backend)
        rel, adj, norms = (t.cpu() for t in out)
        assert rel.shape == (2, 0 if q is None else 1, 7)
        assert torch.equal(adj[0, 1:3], torch.zeros(2)) and norms[0, 2] == 0
        assert torch.isnan(adj[1, 3:5]).all() and torch.isnan(norms[1, 4])
        ok = torch.ones_like(adj, dtype=torch.bool)
        ok[1, 3:5] = False
        expected = _oracle(x.cpu(), None if q is None else q.cpu(), 1.0, 0.0, None)
        assert_close(adj[ok], expected[1][ok], dtype=torch.float32, reduce_dim=40)
        if q is not None:
            assert torch.isnan(rel[1, 0, 4]) and rel[0, 0, 2] == 0
            rel[1, 0, 4] = expected[0][1, 0, 4] = 0
            assert_close(rel, expected[0], dtype=torch.float32, reduce_dim=40)


@pytest.mark.parametrize("device,dtype,backend", list(_cases()))
def test_integer_norm_frames_give_correctly_rounded_scores(device, dtype, backend):
    """Exact dot products and norms leave one rounding, the division (and for relevance an exact
    scaling by 2): norms, adjacent cosines and relevance are the correctly rounded fp32 values bit for
    bit, past one 64-frame block."""
    x, query = integer_norm_tokens(2, 70, 10, seed=8), integer_norm_tokens(2, 3, 10, seed=9)
    out = vidtok.frame_scores(x.to(device=device, dtype=dtype), query.to(device=device, dtype=dtype), scale=2.0,
                              bias=-1.0, backend=backend)
    xd, qd = x.double(), query.double()
    norms = x.norm(dim=-1)
    adjacent = (xd[:, 1:] * xd[:, :-1]).sum(-1).float() / (norms[:, 1:] * norms[:, :-1])
    relevance = 2.0 * ((qd @ xd.transpose(1, 2)).float() / (query.norm(dim=-1)[:, :, None] * norms[:, None, :])) - 1.0
    for name, got, want in zip(out._fields, out, (relevance, adjacent, norms)):
        assert torch.equal(got.cpu(), want), name


@pytest.mark.parametrize("device,dtype,backend", list(_cases()))
def test_deterministic_and_independent_of_batch(device, dtype, backend):
    x, query = _inputs(3, 20, 5, 48, dtype, device, seed=9)
    a = vidtok.frame_scores(x, query, backend=backend)
    b = vidtok.frame_scores(x, query, backend=backend)
    alone = vidtok.frame_scores(x[1:2], query[1:2], backend=backend)
    for ta, tb, tc in zip(a, b, alone):
        assert torch.equal(ta, tb)
        if device == "cuda" and backend == "reference":  # cuBLAS may pick another kernel for another batch size
            torch.testing.assert_close(ta[1:2], tc)
        else:
            assert torch.equal(ta[1:2], tc)


def test_rotation_invariance_float64():
    g = torch.Generator().manual_seed(2)
    x, q = torch.randn(2, 11, 16, generator=g, dtype=torch.float64), torch.randn(2, 3, 16, generator=g, dtype=torch.float64)
    rot, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    a, b = vidtok.frame_scores(x, q), vidtok.frame_scores(x @ rot, q @ rot)
    for ta, tb in zip(a, b):
        torch.testing.assert_close(ta, tb)


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((torch.randn(2, 3),), {}, ValueError, r"x must be \[B, T, C\] \(rank 3\)"),
        ((torch.ones(1, 3, 2, dtype=torch.int64),), {}, TypeError, "x must be one of"),
        ((torch.randn(1, 0, 4),), {}, ValueError, "at least 1 frame"),
        ((torch.randn(1, 3, 4), torch.randn(1, 2, 5)), {}, ValueError, r"query must be \[B, Q, C\] = \[1, Q, 4\]"),
        ((torch.randn(1, 3, 4), torch.randn(1, 2, 4, dtype=torch.float64)), {}, TypeError, "query must have x's dtype"),
        ((torch.randn(2, 3, 4),), {"lengths": torch.tensor([3, 4])}, ValueError, r"lengths must be in \[0, T = 3\]"),
        ((torch.randn(2, 3, 4),), {"lengths": torch.tensor([3])}, ValueError, "lengths must have B = 2 entries"),
        ((torch.randn(2, 3, 4),), {"lengths": torch.tensor([3.0, 1.0])}, TypeError, "lengths must be one of int32, int64"),
        ((torch.randn(1, 3, 4),), {"scale": "2"}, TypeError, "scale must be a real number"),
        ((torch.randn(1, 3, 4),), {"backend": "cuda"}, vidtok.BackendUnavailableError, "no cuda kernel"),
    ],
)
def test_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        vidtok.frame_scores(*args, **kwargs)


@pytest.mark.parametrize("backend", runnable_backends("frame_scores", "cpu", torch.float32))
def test_opcheck(backend):
    x, q = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    torch.library.opcheck(torch.ops.vidtok.frame_scores.default, (x, q, 2.0, 0.5, torch.tensor([5, 5]), backend))
    torch.library.opcheck(torch.ops.vidtok.frame_scores.default, (x, None, 1.0, 0.0, None, backend))


def test_compiles_fullgraph():
    torch._dynamo.reset()

    def f(x, q, lengths):
        s = vidtok.frame_scores(x * 2, q, lengths=lengths)
        return s.relevance.clamp_min(-9).sum() + s.adjacent.nan_to_num().sum()

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for shape in [(1, 4, 8), (2, 6, 16)]:
        x, q = torch.randn(*shape), torch.randn(shape[0], 3, shape[2])
        lengths = torch.full((shape[0],), shape[1] - 1)
        torch.testing.assert_close(compiled(x, q, lengths), f(x, q, lengths))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="realistic sizes run on a GPU only")
@pytest.mark.parametrize("shape", [(1, 10000, 1, 1152), (2, 4097, 16, 1152), (3, 999, 5, 768)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_backends_at_realistic_sizes(shape, dtype):
    B, T, Q, C = shape
    x, query = _inputs(B, T, Q, C, dtype, "cuda", seed=1)
    lengths = torch.randint(1, T + 1, (B,), device="cuda")
    expected = vidtok.frame_scores(x, query, scale=100.0, lengths=lengths, backend="reference")
    out = vidtok.frame_scores(x, query, scale=100.0, lengths=lengths, backend="triton")
    for name, got, want in zip(out._fields, out, expected):
        s = 100.0 if name == "relevance" else 1.0
        assert_close(got / s, want / s, dtype=torch.float32, reduce_dim=C, msg=name)

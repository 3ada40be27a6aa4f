"""vidtok.match: every backend against a float64 brute-force oracle; ties, groups, NaN, bad input."""

import zlib

import pytest
import torch
import torch.nn.functional as F

import vidtok
from vidtok import reference as ref
from vidtok.testing import assert_close, backend_cases, integer_norm_tokens, make_strided, runnable_backends

# (B, M, K, D): single rows, odd sizes, several 64-row/64-column tiles and a D past one 64-wide chunk.
SHAPES = [(1, 1, 1, 1), (2, 5, 7, 3), (1, 70, 130, 33), (2, 19, 66, 80)]


def _oracle_sims(a, b, a_group=None, b_group=None):
    """[B, M, K] float64 cosine matrix with disallowed pairs (other group, NaN) at -inf."""
    sim = F.cosine_similarity(a.double()[:, :, None], b.double()[:, None], dim=-1)
    allowed = ~torch.isnan(sim)
    if a_group is not None:
        allowed &= a_group.cpu()[:, :, None] == b_group.cpu()[:, None, :]
    return sim.masked_fill(~allowed, float("-inf"))


def _oracle(a, b, a_group=None, b_group=None):
    """Brute force in float64: the full cosine matrix, disallowed pairs -inf, first maximum."""
    sim = _oracle_sims(a, b, a_group, b_group)
    allowed = sim > float("-inf")
    B, M, K = sim.shape
    score = torch.full((B, M), float("-inf"), dtype=torch.float64)
    idx = torch.full((B, M), -1, dtype=torch.int32)
    for bb in range(B):
        for m in range(M):
            for k in range(K):  # strictly better only: the lowest index keeps a tie
                if allowed[bb, m, k] and sim[bb, m, k] > score[bb, m]:
                    score[bb, m], idx[bb, m] = sim[bb, m, k], k
    return score, idx


def _cases():
    return backend_cases("match")


CASES = list(_cases())


def _inputs(B, M, K, D, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, M, D, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(B, K, D, generator=g).to(device=device, dtype=dtype)
    return a, b


def _check(score, idx, a, b, a_group=None, b_group=None, D=1):
    exp_score, exp_idx = _oracle(a.cpu(), b.cpu(), None if a_group is None else a_group.cpu(), None if b_group is None else b_group.cpu())
    assert score.dtype == torch.float32 and idx.dtype == torch.int32
    idx = idx.cpu()
    # Indices equal the oracle's, except on a near tie (the chosen partner's exact score within float
    # rounding of the best one), where fp32 and fp64 may legitimately rank the two the other way.
    exp_full = _oracle_sims(a.cpu(), b.cpu(), a_group, b_group)
    chosen = exp_full.gather(2, idx.long().clamp_min(0)[..., None])[..., 0]
    near_tie = (idx >= 0) & (exp_idx >= 0) & ((exp_score - chosen).abs() <= 1e-6)
    differs = idx != exp_idx
    assert not (differs & ~near_tie).any(), f"indices differ from the oracle's at {differs.nonzero().tolist()}"
    assert differs.float().mean() <= 0.05, "too many near ties for the test to mean anything"
    assert_close(score.cpu(), exp_score, dtype=torch.float32, reduce_dim=D)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("device,dtype,backend", CASES)
def test_matches_oracle(shape, device, dtype, backend):
    B, M, K, D = shape
    a, b = _inputs(B, M, K, D, dtype, device, seed=zlib.crc32(repr((shape, str(dtype))).encode()))
    score, idx = vidtok.match(a, b, backend=backend)
    assert score.shape == idx.shape == (B, M)
    _check(score, idx, a, b, D=D)


@pytest.mark.parametrize("sorted_groups", [False, True], ids=["random-groups", "sorted-groups"])
@pytest.mark.parametrize("device,dtype,backend", CASES)
def test_groups_restrict_pairs(sorted_groups, device, dtype, backend):
    B, M, K, D = 2, 70, 150, 16
    a, b = _inputs(B, M, K, D, dtype, device, seed=4)
    g = torch.Generator().manual_seed(5)
    a_group = torch.randint(0, 5, (B, M), generator=g)
    b_group = torch.randint(1, 4, (B, K), generator=g)  # groups 0 and 4 of a have no partner
    if sorted_groups:  # per-frame style ids: whole tiles of b are skipped by the kernel
        a_group, b_group = a_group.sort(dim=1).values, b_group.sort(dim=1).values
    a_group, b_group = a_group.to(device), b_group.to(device=device, dtype=torch.int32)
    score, idx = vidtok.match(a, b, a_group=a_group, b_group=b_group, backend=backend)
    _check(score, idx, a, b, a_group, b_group, D=D)
    lonely = (a_group == 0) | (a_group == 4)
    assert lonely.any() and (idx[lonely] == -1).all() and torch.isneginf(score[lonely]).all()
    got = idx.long().clamp_min(0)
    assert torch.equal(b_group.long().gather(1, got)[~lonely], a_group.long()[~lonely])


@pytest.mark.parametrize("device,dtype,backend", CASES)
def test_ties_go_to_the_lowest_index(device, dtype, backend):
    a, b = _inputs(1, 3, 140, 8, dtype, device, seed=9)
    b[0, 3] = a[0, 0] * 2  # a[0]'s best at columns 3, 70 and 139 (other tiles), equal scores
    b[0, 70] = a[0, 0] * 2
    b[0, 139] = a[0, 0] * 2
    b[0, 100] = a[0, 1]  # a[1]'s best at 100 and 101: ties inside one tile
    b[0, 101] = a[0, 1]
    score, idx = vidtok.match(a, b, backend=backend)
    assert idx[0, 0] == 3 and idx[0, 1] == 100
    # an all-zero a row is equally (0) similar to everything: index 0
    a[0, 2] = 0
    score, idx = vidtok.match(a, b, backend=backend)
    assert idx[0, 2] == 0 and score[0, 2] == 0


@pytest.mark.usefixtures("nan_allowed")  # the documented NaN behaviour
@pytest.mark.parametrize("device,dtype,backend", CASES)
def test_nan_tokens_never_match(device, dtype, backend):
    a, b = _inputs(1, 4, 6, 8, dtype, device, seed=2)
    b[0, 0] = a[0, 0]  # would be a[0]'s match
    b[0, 0, 3] = float("nan")
    a[0, 1, 2] = float("nan")
    score, idx = vidtok.match(a, b, backend=backend)
    assert idx[0, 1] == -1 and torch.isneginf(score[0, 1])
    assert (idx[0] != 0).all()  # the NaN row of b is nobody's match
    assert not torch.isnan(score).any()


@pytest.mark.parametrize("device,dtype,backend", CASES)
def test_empty(device, dtype, backend):
    a, b = _inputs(2, 5, 0, 4, dtype, device, seed=1)
    score, idx = vidtok.match(a, b, backend=backend)
    assert (idx == -1).all() and torch.isneginf(score).all()
    a, b = _inputs(2, 0, 5, 4, dtype, device, seed=1)
    score, idx = vidtok.match(a, b, backend=backend)
    assert score.shape == idx.shape == (2, 0)


@pytest.mark.parametrize("layout", ["channels_strided", "permuted"])
@pytest.mark.parametrize("device,dtype,backend", CASES)
def test_strided_views(layout, device, dtype, backend):
    a, b = _inputs(2, 9, 21, 12, dtype, device, seed=3)
    a, b = make_strided(a, layout), make_strided(b, layout)
    score, idx = vidtok.match(a, b, backend=backend)
    _check(score, idx, a, b, D=12)


@pytest.mark.parametrize("device,dtype,backend", CASES)
def test_integer_norm_tokens_give_correctly_rounded_scores(device, dtype, backend):
    """Exact dot products and norms leave one rounding, the division: the scores are the correctly
    rounded fp32 cosines bit for bit, and ties between equal cosines (frequent with small integer
    tokens) go to the lowest index across 64-column tiles."""
    a, b = integer_norm_tokens(2, 70, 6, seed=5), integer_norm_tokens(2, 67, 6, seed=6)
    score, idx = vidtok.match(a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype), backend=backend)
    cos = (a.double() @ b.double().transpose(1, 2)).float() / (a.norm(dim=-1)[:, :, None] * b.norm(dim=-1)[:, None, :])
    best = cos.max(-1).values
    assert torch.equal(score.cpu(), best)
    assert torch.equal(idx.cpu().long(), (cos == best[..., None]).int().argmax(-1))  # the first maximum
    assert (cos == best[..., None]).sum(-1).max() > 1, "the test needs ties"


@pytest.mark.parametrize("device,dtype,backend", CASES)
def test_deterministic(device, dtype, backend):
    a, b = _inputs(2, 33, 70, 16, dtype, device, seed=8)
    first = vidtok.match(a, b, backend=backend)
    second = vidtok.match(a, b, backend=backend)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_reference_chunks_agree():
    a, b = _inputs(2, 37, 20, 8, torch.float32, "cpu", seed=6)
    whole = ref.match(a, b, chunk=1024)
    pieces = ref.match(a, b, chunk=5)
    assert torch.equal(whole[1], pieces[1])  # matmul blocking may change the last bit of a score
    torch.testing.assert_close(whole[0], pieces[0], atol=1e-6, rtol=0)


def test_float64_runs_on_the_reference():
    a, b = _inputs(1, 4, 5, 3, torch.float64, "cpu", seed=0)
    score, idx = vidtok.match(a, b)
    assert score.dtype == torch.float64
    _check(score.float(), idx, a, b)


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((torch.randn(2, 3), torch.randn(2, 3, 4)), {}, ValueError, r"a must be \[B, M, D\] \(rank 3\), got shape \(2, 3\)"),
        ((torch.randn(2, 3, 4), torch.randn(3, 3, 4)), {}, ValueError, "must agree on B and D"),
        ((torch.randn(2, 3, 4), torch.randn(2, 3, 5)), {}, ValueError, "must agree on B and D"),
        ((torch.randn(1, 3, 4), torch.randn(1, 3, 4, dtype=torch.float16)), {}, TypeError, "one dtype"),
        ((torch.ones(1, 3, 4, dtype=torch.int32), torch.ones(1, 3, 4, dtype=torch.int32)), {}, TypeError, "a must be one of float32"),
        ((torch.randn(1, 3, 4), torch.randn(1, 3, 4)), {"a_group": torch.zeros(1, 3, dtype=torch.int32)}, ValueError, "both a_group and b_group"),
        ((torch.randn(1, 3, 4), torch.randn(1, 5, 4)), {"a_group": torch.zeros(1, 3, dtype=torch.int32), "b_group": torch.zeros(1, 3, dtype=torch.int32)}, ValueError, r"b_group must be \[B, K\] = \(1, 5\), got \(1, 3\)"),
        ((torch.randn(1, 3, 4), torch.randn(1, 3, 4)), {"a_group": torch.zeros(1, 3), "b_group": torch.zeros(1, 3)}, TypeError, "a_group must be one of int32"),
        ((torch.randn(1, 3, 4), torch.randn(1, 3, 4)), {"backend": "cuda"}, vidtok.BackendUnavailableError, "match has no cuda kernel"),
    ],
)
def test_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        vidtok.match(*args, **kwargs)


@pytest.mark.parametrize("backend", runnable_backends("match", "cpu", torch.float32))
def test_opcheck(backend):
    a, b = _inputs(2, 5, 7, 8, torch.float32, "cpu", seed=0)
    torch.library.opcheck(torch.ops.vidtok.match.default, (a, b, None, None, backend))
    groups = torch.tensor([[0, 1, 1, 0, 2], [1, 1, 1, 1, 1]], dtype=torch.int32)
    b_groups = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [1] * 7], dtype=torch.int32)
    torch.library.opcheck(torch.ops.vidtok.match.default, (a, b, groups, b_groups, backend))


def test_compiles_fullgraph():
    torch._dynamo.reset()

    def f(a, b):
        score, idx = vidtok.match(a * 2, b)
        return score + 1, idx

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for M, K in [(4, 6), (9, 5)]:
        a, b = _inputs(2, M, K, 8, torch.float32, "cpu", seed=M)
        got, expected = compiled(a, b), f(a, b)
        torch.testing.assert_close(got[0], expected[0])
        assert torch.equal(got[1], expected[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="realistic sizes run on a GPU only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_realistic_sizes(dtype):
    a, b = _inputs(8, 784, 784, 64, dtype, "cuda", seed=1)
    exp_score, exp_idx = ref.match(a, b)
    score, idx = vidtok.match(a, b, backend="triton")
    assert_close(score, exp_score, dtype=torch.float32, reduce_dim=64)
    # a different index is allowed only where two candidates are within rounding of each other
    differ = idx != exp_idx
    sim = ref.cosine_matrix(a, b)
    alt = sim.gather(2, idx.long().unsqueeze(-1)).squeeze(-1)
    assert_close(alt[differ], exp_score[differ], dtype=torch.float32, reduce_dim=64)

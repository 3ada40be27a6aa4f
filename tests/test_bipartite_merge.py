"""vidtok.bipartite_merge / unmerge against a slow, loop-based ToMe written from the paper.

The loop implementation follows Bolya et al., "Token Merging: Your ViT But Faster" (ICLR 2023,
arXiv 2210.09461, Sec. 3 "Bipartite Soft Matching") and the output order of the authors' merge.py
(facebookresearch/ToMe, tome/merge.py): the protected tokens (class, distillation) in position order,
the unmerged A tokens (by descending score, re-sorted by position when a class token exists), then
the unprotected B tokens; r = 0 returns the input. tests/test_tome_order.py checks the same order
against a step-by-step re-derivation of ToMe's bipartite_soft_matching.
"""

import math

import pytest
import torch

import vidtok
from vidtok import reference as ref
from vidtok.testing import assert_close, backend_cases, make_strided, runnable_backends


def _cos(u, v):
    nu, nv = math.sqrt(sum(t * t for t in u)), math.sqrt(sum(t * t for t in v))
    return sum(p * q for p, q in zip(u, v)) / (max(nu, 1e-8) * max(nv, 1e-8))


def tome_loop(x, metric, size, r, protect, mode, order):
    """One video at a time, one token at a time, in float64 Python numbers.

    Returns (out [L][C], sizes [L], index [N], origin [L]) as lists.
    """
    N = len(x)
    if r == 0:
        return [list(t) for t in x], list(size), list(range(N)), list(range(N))
    A, Bset = list(range(0, N, 2)), list(range(1, N, 2))
    # 1. every A token's best B partner; protected A rows and protected B columns score -inf
    best, partner = [], []
    for i, p in enumerate(A):
        top, arg = -math.inf, -1
        for j, q in enumerate(Bset):
            s = -math.inf if (p < protect or q < protect) else _cos(metric[p], metric[q])
            if s > top:
                top, arg = s, j
        best.append(top)
        partner.append(arg)
    # 2. rank the A tokens by score, highest first (equal scores: lower position first)
    ranked = sorted(range(len(A)), key=lambda i: (-best[i], i))
    src, unm = ranked[:r], ranked[r:]
    if protect > 0:
        unm = sorted(unm)
    # 3. groups: each B token with the A tokens merged into it
    members = {j: [Bset[j]] for j in range(len(Bset))}
    for i in src:
        members[partner[i]].append(A[i])
    # ToMe's output: protected tokens in position order, unmerged A, then the unprotected B tokens
    groups = [(n, members[n // 2] if n % 2 else [n]) for n in range(protect)]
    groups += [(A[i], [A[i]]) for i in unm if A[i] >= protect]
    groups += [(Bset[j], members[j]) for j in range(len(Bset)) if Bset[j] >= protect]
    if order == "keep":
        groups.sort(key=lambda g: g[0])
    out, sizes, origin = [], [], []
    index = [None] * N
    for slot, (rep, mem) in enumerate(groups):
        total = sum(size[n] for n in mem)
        C = len(x[0])
        if mode == "wmean":
            row = [sum(x[n][c] * size[n] for n in mem) / total for c in range(C)]
        elif mode == "mean":
            row = [sum(x[n][c] for n in mem) / len(mem) for c in range(C)]
        elif mode == "sum":
            row = [sum(x[n][c] for n in mem) for c in range(C)]
        else:  # replace: the destination keeps its value
            row = list(x[rep])
        out.append(row)
        sizes.append(total)
        origin.append(rep)
        for n in mem:
            index[n] = slot
    return out, sizes, index, origin


def _cases():
    return backend_cases("bipartite_merge")


CASES = list(_cases())
FP32_CASES = [c for c in CASES if c.values[1] == torch.float32]


def _tokens(B, N, C, *, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, C, generator=g).to(device=device, dtype=dtype)


@pytest.mark.parametrize("N,protect", [(2, 0), (2, 1), (2, 2), (9, 0), (9, 1), (9, 2), (9, 3), (12, 0), (12, 1), (12, 2), (12, 3)], ids=str)
@pytest.mark.parametrize("order", ["keep", "tome"])
@pytest.mark.parametrize("device,dtype,backend", FP32_CASES)
def test_equals_loop_tome_for_every_r(N, protect, order, device, dtype, backend):
    B, C, D = 2, 5, 4
    x = _tokens(B, N, C, device=device, seed=N * 10 + protect)
    metric = _tokens(B, N, D, device=device, seed=N * 10 + protect + 1)
    size = (torch.rand(B, N, generator=torch.Generator().manual_seed(3)) * 3 + 0.5).to(device)
    cap = ref.max_merge(N, protect)
    assert cap == max(0, (N + 1) // 2 - (protect + 1) // 2) * (N // 2 > protect // 2)
    for r in range(cap + 1):
        for mode in ref.MERGE_MODES:
            merged = vidtok.bipartite_merge(x, r, metric=metric, size=size, protect=protect, mode=mode, order=order, backend=backend)
            assert merged.x.shape == (B, N - r, C) and merged.size.shape == merged.origin.shape == (B, N - r)
            for b in range(B):
                out, sizes, index, origin = tome_loop(
                    x[b].cpu().double().tolist(), metric[b].cpu().double().tolist(), size[b].cpu().double().tolist(), r, protect, mode, order
                )
                msg = f"r={r} mode={mode} b={b}"
                assert merged.index[b].tolist() == index, msg
                assert merged.origin[b].tolist() == origin, msg
                assert_close(merged.x[b], torch.tensor(out, dtype=torch.float64).reshape(N - r, C), dtype=dtype, reduce_dim=N, msg=msg)
                assert_close(merged.size[b], torch.tensor(sizes, dtype=torch.float64), dtype=dtype, reduce_dim=N, msg=msg)


@pytest.mark.parametrize("device,dtype,backend", CASES)
def test_low_precision_and_larger_inputs(device, dtype, backend):
    """Many tiles of the match kernel, 16-bit tokens: the plan equals the loop ToMe's, values within tolerance."""
    B, N, C = 2, 151, 24
    x = _tokens(B, N, C, dtype=dtype, device=device, seed=21)
    for order, protect, r in [("tome", 1, 40), ("keep", 0, 76), ("keep", 2, 1)]:
        merged = vidtok.bipartite_merge(x, r, protect=protect, order=order, backend=backend)
        for b in range(B):
            xb = x[b].cpu().double().tolist()
            out, sizes, index, origin = tome_loop(xb, xb, [1.0] * N, r, protect, "wmean", order)
            assert merged.index[b].tolist() == index and merged.origin[b].tolist() == origin
            assert_close(merged.x[b].cpu(), torch.tensor(out), dtype=dtype, reduce_dim=4)
        assert merged.x.dtype == dtype and merged.size.dtype == torch.float32


@pytest.mark.parametrize("mode", ["wmean", "sum"])
@pytest.mark.parametrize("device,dtype,backend", FP32_CASES)
def test_size_weighted_sum_is_conserved(mode, device, dtype, backend):
    x = _tokens(3, 40, 16, device=device, seed=5)
    size = torch.rand(3, 40, generator=torch.Generator().manual_seed(1)).to(device) + 0.5
    merged = vidtok.bipartite_merge(x, 17, size=size, protect=1, mode=mode, backend=backend)
    weight = merged.size[..., None] if mode == "wmean" else 1
    before = (x * size[..., None]).sum(1) if mode == "wmean" else x.sum(1)
    torch.testing.assert_close((merged.x * weight).sum(1), before, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(merged.size.sum(1), size.sum(1), atol=1e-4, rtol=1e-6)


@pytest.mark.parametrize("order", ["keep", "tome"])
@pytest.mark.parametrize("device,dtype,backend", CASES)
def test_r0_is_the_identity(order, device, dtype, backend):
    x = _tokens(2, 11, 6, dtype=dtype, device=device, seed=2)
    merged = vidtok.bipartite_merge(x, 0, order=order, protect=1, backend=backend)
    assert torch.equal(merged.x, x)
    assert torch.equal(merged.index.cpu(), torch.arange(11, dtype=torch.int32).expand(2, 11))
    assert torch.equal(merged.origin.cpu(), torch.arange(11, dtype=torch.int32).expand(2, 11))
    assert torch.equal(merged.size.cpu(), torch.ones(2, 11))


@pytest.mark.parametrize("order", ["keep", "tome"])
@pytest.mark.parametrize("device,dtype,backend", FP32_CASES)
def test_unmerge_gives_each_group_mean_at_every_member(order, device, dtype, backend):
    x = _tokens(2, 30, 8, device=device, seed=4)
    merged = vidtok.bipartite_merge(x, 12, mode="mean", order=order, backend=backend)
    restored = vidtok.unmerge(merged.x, merged)
    assert restored.shape == x.shape
    for b in range(2):
        for n in range(30):
            members = (merged.index[b] == merged.index[b, n]).nonzero().flatten()
            torch.testing.assert_close(restored[b, n], x[b, members].mean(0), atol=1e-6, rtol=1e-6)
        # every group's representative is one of its members, and the members count as its size
        assert torch.equal(merged.index[b].long()[merged.origin[b].long()], torch.arange(18, device=device))
        assert torch.equal(torch.bincount(merged.index[b].long(), minlength=18).float(), merged.size[b])


@pytest.mark.parametrize("mode", ["wmean", "mean", "sum", "replace"])
def test_gradcheck_float64(mode):
    x = _tokens(2, 9, 3, dtype=torch.float64, seed=7).requires_grad_()
    metric = _tokens(2, 9, 4, dtype=torch.float64, seed=8)
    size = torch.rand(2, 9, dtype=torch.float64) + 0.5
    fn = lambda t: vidtok.bipartite_merge(t, 3, metric=metric, size=size, protect=1, mode=mode).x  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    # through unmerge too
    assert torch.autograd.gradcheck(lambda t: vidtok.unmerge(fn(t), vidtok.bipartite_merge(t.detach(), 3, metric=metric, protect=1)), (x,))


@pytest.mark.parametrize("device,dtype,backend", CASES)
def test_gradient_matches_reference(device, dtype, backend):
    x = _tokens(2, 21, 12, dtype=dtype, device=device, seed=9)
    xr = x.detach().clone().requires_grad_()
    x = make_strided(x, "permuted").requires_grad_()
    grad = _tokens(2, 13, 12, dtype=dtype, device=device, seed=10)
    out = vidtok.bipartite_merge(x, 8, protect=1, backend=backend)
    expected = vidtok.bipartite_merge(xr, 8, protect=1, backend="reference")
    (gx,) = torch.autograd.grad(out.x, x, grad)
    (ge,) = torch.autograd.grad(expected.x, xr, grad)
    assert gx.dtype == dtype
    assert_close(gx, ge, dtype=dtype)


@pytest.mark.usefixtures("nan_allowed")  # the documented NaN behaviour
@pytest.mark.parametrize("device,dtype,backend", FP32_CASES)
def test_nan_tokens_do_not_merge_or_poison(device, dtype, backend):
    x = _tokens(1, 20, 6, device=device, seed=12)
    x[0, 4, 2] = float("nan")  # an A token
    x[0, 7, 0] = float("nan")  # a B token
    merged = vidtok.bipartite_merge(x, 8, backend=backend)
    index = merged.index[0].long()
    assert (index == index[4]).sum() == 1 and (index == index[7]).sum() == 1  # both alone
    nan_rows = torch.isnan(merged.x[0]).any(-1)
    assert nan_rows.sum() == 2 and nan_rows[index[4]] and nan_rows[index[7]]


@pytest.mark.parametrize("mode", ["wmean", "mean", "sum", "replace"])
@pytest.mark.parametrize("device,dtype,backend", CASES)
def test_merge_kernel_against_reference_with_large_groups(mode, device, dtype, backend):
    """Every A token matches the same B token (one group of N/2 + 1 members), channels over one block."""
    B, N, C = 2, 37, 130
    x = make_strided(_tokens(B, N, C, dtype=dtype, device=device, seed=14), "channels_strided")
    metric = _tokens(B, N, 4, device=device, seed=15).to(dtype)
    metric[:, 5] = 3 * metric[:, 0]  # B token 5 is everyone's favourite partner...
    metric[:, 0::2] = metric[:, 0:1] + 0.01 * metric[:, 0::2]  # ...because every A token is close to it
    size = torch.rand(B, N, generator=torch.Generator().manual_seed(2)).to(device) + 0.5
    merged = vidtok.bipartite_merge(x, 15, metric=metric, size=size, mode=mode, backend=backend)
    expected = vidtok.bipartite_merge(x, 15, metric=metric, size=size, mode=mode, backend="reference")
    assert torch.equal(merged.index, expected.index) and torch.equal(merged.origin, expected.origin)
    assert torch.bincount(merged.index[0].long()).max() == 16
    assert_close(merged.x, expected.x, dtype=dtype, reduce_dim=16)
    assert_close(merged.size, expected.size, dtype=torch.float32, reduce_dim=16)
    if not (device == "cuda" and backend == "reference"):  # the reference's index_add_ uses float atomics on CUDA
        again = vidtok.bipartite_merge(x, 15, metric=metric, size=size, mode=mode, backend=backend)
        assert torch.equal(again.x, merged.x) and torch.equal(again.size, merged.size)


@pytest.mark.parametrize("mode", ["wmean", "mean", "sum"])
@pytest.mark.parametrize("device,dtype,backend", CASES)
def test_integer_tokens_merge_to_the_references_bits(mode, device, dtype, backend):
    """Integer tokens and sizes make every group sum exact in any order, leaving one correctly rounded
    division (IEEE in both): the merged tokens equal the reference's bit for bit, in one group of 16."""
    B, N, C = 2, 31, 20
    g = torch.Generator().manual_seed(16)
    x = torch.randint(-9, 10, (B, N, C), generator=g).to(device=device, dtype=dtype)
    metric = _tokens(B, N, 4, device=device, seed=15).to(dtype)
    metric[:, 5] = 3 * metric[:, 0]  # every A token's partner is B token 5 (as in the test above)
    metric[:, 0::2] = metric[:, 0:1] + 0.01 * metric[:, 0::2]
    size = torch.randint(1, 5, (B, N), generator=g).to(device=device, dtype=torch.float32)
    merged = vidtok.bipartite_merge(x, 15, metric=metric, size=size, mode=mode, backend=backend)
    expected = vidtok.bipartite_merge(x, 15, metric=metric, size=size, mode=mode, backend="reference")
    assert torch.equal(merged.index, expected.index) and torch.bincount(merged.index[0].long()).max() == 16
    assert torch.equal(merged.x, expected.x) and torch.equal(merged.size, expected.size)


@pytest.mark.parametrize("device,dtype,backend", FP32_CASES)
def test_deterministic_and_metric_default(device, dtype, backend):
    x = _tokens(2, 33, 8, device=device, seed=13)
    a = vidtok.bipartite_merge(x, 10, backend=backend)
    b = vidtok.bipartite_merge(x, 10, metric=x.clone(), backend=backend)
    atomics = device == "cuda" and backend == "reference"  # the reference's index_add_ on CUDA: float atomics
    for u, v in zip(a[:4], b[:4]):
        assert torch.equal(u, v) or (atomics and u.is_floating_point() and torch.allclose(u, v, rtol=1e-6, atol=1e-6))
    assert a.lengths is None


def test_log_size_is_the_proportional_attention_bias():
    merged = vidtok.bipartite_merge(_tokens(1, 10, 4, seed=1), 4)
    assert torch.equal(merged.log_size, merged.size.log())
    assert merged.log_size.min() == 0 and merged.log_size.max() > 0


def test_merged_is_a_named_tuple():
    x_out, size, index, origin, lengths, grid = vidtok.bipartite_merge(_tokens(1, 6, 2), 2)
    assert x_out.shape == (1, 4, 2) and index.dtype == origin.dtype == torch.int32 and lengths is None and grid is None


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((torch.randn(2, 5), 1), {}, ValueError, r"x must be \[B, N, C\] \(rank 3\), got shape \(2, 5\)"),
        ((torch.ones(1, 4, 2, dtype=torch.int64), 1), {}, TypeError, "x must be one of float32"),
        ((torch.randn(1, 6, 2), -1), {}, ValueError, r"r must be in \[0, 3\]"),
        ((torch.randn(1, 6, 2), 4), {}, ValueError, r"r must be in \[0, 3\]"),
        ((torch.randn(1, 6, 2), 3), {"protect": 1}, ValueError, r"r must be in \[0, 2\] .*protect = 1"),
        ((torch.randn(1, 6, 2), 2.0), {}, TypeError, "r must be an int, got float"),
        ((torch.randn(1, 6, 2), 1), {"metric": torch.randn(1, 5, 2)}, ValueError, r"metric \[B, N, D\] must match x"),
        ((torch.randn(1, 6, 2), 1), {"metric": torch.randn(6, 2)}, ValueError, r"metric must be \[B, N, D\]"),
        ((torch.randn(1, 6, 2), 1), {"size": torch.ones(2, 6)}, ValueError, r"size \[B, N\] must match x"),
        ((torch.randn(1, 6, 2), 1), {"size": torch.ones(1, 6, dtype=torch.int32)}, TypeError, "size must be one of float32"),
        ((torch.randn(1, 6, 2), 1), {"protect": 7}, ValueError, r"protect must be in \[0, 6\]"),
        ((torch.randn(1, 6, 2), 1), {"mode": "max"}, ValueError, "mode must be one of"),
        ((torch.randn(1, 6, 2), 1), {"order": "sorted"}, ValueError, "order must be one of"),
        ((torch.randn(1, 6, 2), 1), {"backend": "cuda"}, vidtok.BackendUnavailableError, "bipartite_merge has no cuda kernel"),
    ],
)
def test_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        vidtok.bipartite_merge(*args, **kwargs)


def test_unmerge_bad_input():
    merged = vidtok.bipartite_merge(torch.randn(1, 6, 2), 2)
    with pytest.raises(ValueError, match="does not fit merged"):
        vidtok.unmerge(torch.randn(1, 5, 2), merged)


@pytest.mark.parametrize("backend", runnable_backends("bipartite_merge", "cpu", torch.float32))
def test_opcheck(backend):
    x = _tokens(2, 9, 4, seed=3).requires_grad_()
    op = torch.ops.vidtok.bipartite_assignment.default  # (metric, r, protect, order, a_mask, backend)
    torch.library.opcheck(op, (x.detach(), 3, 1, "tome", None, backend))
    torch.library.opcheck(op, (x.detach(), 3, 1, "tome", (torch.arange(9) >= 5).expand(2, 9), backend))
    index, origin = op(x.detach(), 3, 1, "keep", None, backend)
    size = torch.rand(2, 9) + 0.5
    for mode in ref.MERGE_MODES:
        torch.library.opcheck(torch.ops.vidtok.merge_tokens.default, (x, size, index, origin, mode, backend))
        _, size_out = torch.ops.vidtok.merge_tokens.default(x.detach(), size, index, origin, mode, backend)
        grad = torch.randn(2, 6, 4)
        torch.library.opcheck(torch.ops.vidtok.merge_tokens_backward.default, (grad, size, size_out, index, origin, mode))


def test_compiles_fullgraph():
    torch._dynamo.reset()

    def f(x, metric):
        merged = vidtok.bipartite_merge(x * 2, 3, metric=metric, protect=1)
        return vidtok.unmerge(merged.x + merged.log_size[..., None], merged).sum()

    compiled = torch.compile(f, fullgraph=True)
    for N in (9, 12):
        x = _tokens(2, N, 4, seed=N).requires_grad_()
        metric = _tokens(2, N, 3, seed=N + 1)
        y = compiled(x, metric)
        y.backward()
        xe = x.detach().requires_grad_()
        f(xe, metric).backward()
        torch.testing.assert_close(y, f(x.detach(), metric))
        torch.testing.assert_close(x.grad, xe.grad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="realistic sizes run on a GPU only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_video_vit_workload(dtype):
    x = _tokens(8, 1568, 1024, dtype=dtype, device="cuda", seed=1)
    metric = _tokens(8, 1568, 64, dtype=dtype, device="cuda", seed=2)
    got = vidtok.bipartite_merge(x, 784, metric=metric, backend="triton")
    expected = vidtok.bipartite_merge(x, 784, metric=metric, backend="reference")
    agree = (got.index == expected.index).float().mean()
    assert agree > 0.99  # near-ties may rank differently in 16-bit
    same = (got.index == expected.index).all(dim=1)
    assert_close(got.x[same], expected.x[same], dtype=dtype, reduce_dim=4)


@pytest.mark.parametrize("order", ["keep", "tome"])
@pytest.mark.parametrize("device,dtype,backend", CASES)
def test_equal_scores_merge_the_lower_position_first(order, device, dtype, backend):
    x = _tokens(1, 12, 8, dtype=dtype, device=device, seed=16)
    x[0, [2, 6, 10]] = x[0, 4].clone()  # four identical A tokens: equal best scores
    x[0, 7] = x[0, 4] * 3  # and one B token they all match perfectly
    for r, merged_positions in [(1, [2]), (2, [2, 4]), (3, [2, 4, 6])]:
        merged = vidtok.bipartite_merge(x, r, order=order, backend=backend)
        index = merged.index[0].long()
        partners = [p for p in (2, 4, 6, 10) if index[p] == index[7]]
        assert partners == merged_positions

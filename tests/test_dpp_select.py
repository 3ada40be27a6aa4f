"""vidtok.dpp_select: greedy DPP MAP (Chen et al. 2018) against a slow slogdet-per-candidate greedy,
the exhaustive optimum on tiny inputs, log-det bookkeeping, duplicates and invariances; the cuda
backend against the same oracles, up to certified near-ties."""

import itertools

import pytest
import torch

import vidtok
import vidtok.select as select_module
from vidtok.reference import select as ref_select
from vidtok.testing import gpu_backend_cases


def _kernel(x, q):
    """L = diag(q) S diag(q) in float64, S the cosine similarity (zero rows stay zero)."""
    xn = x.double() / x.double().norm(dim=-1, keepdim=True).clamp_min(1e-8)
    S = xn @ xn.T
    S.diagonal().copy_((xn != 0).any(-1).double())  # S_ii = 1 exactly for a nonzero frame, as documented
    return q.double()[:, None] * S * q.double()[None, :]


def _logdet(L, idx):
    if not idx:
        return 0.0
    sign, val = torch.linalg.slogdet(L[idx][:, idx])
    return float(val) if sign > 0 else float("-inf")


def slow_dpp(x, q, k, eps):
    """Greedy MAP by brute force: every step recomputes log det L_{S+i} for every candidate with slogdet.
    A candidate must keep a residual det(L_{S+i}) / det(L_S) > eps * L_ii, as documented."""
    L = _kernel(x, q)
    T = L.shape[0]
    chosen, gains = [], []
    base = 0.0
    for _ in range(k):
        best, best_val = None, None
        for i in range(T):
            if i in chosen or not L[i, i] > 0:
                continue
            val = _logdet(L, chosen + [i])
            if not val - base > torch.log(eps * L[i, i]).item():
                continue
            if best is None or val > best_val:
                best, best_val = i, val
        if best is None:
            break
        chosen.append(best)
        gains.append(best_val - base)
        base = best_val
    return chosen, gains


@pytest.mark.parametrize("k", [1, 3, 9])
@pytest.mark.parametrize("with_quality", [False, True])
def test_equals_slow_greedy_and_gains_sum_to_logdet(k, with_quality):
    seed = torch.seed() % 2**31
    g = torch.Generator().manual_seed(seed)
    B, Q, T, C = 2, 2, 14, 6  # C < k: the kernel has rank <= 6, so k = 9 must stop early
    x = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    quality = 0.5 + torch.rand(B, Q, T, generator=g, dtype=torch.float64) if with_quality else None
    if with_quality:
        quality[1, :, 9:] = 0  # a shorter video in the padded batch: zero quality frames are never chosen
    idx, gains = vidtok.dpp_select(x, k, quality=quality)
    if quality is None:
        idx, gains = idx[:, None], gains[:, None]
    assert idx.dtype == torch.int32 and idx.shape == (B, idx.shape[1], k) and gains.dtype == torch.float64
    for b in range(B):
        for qi in range(idx.shape[1]):
            q = quality[b, qi] if quality is not None else torch.ones(T, dtype=torch.float64)
            chosen, slow_gains = slow_dpp(x[b], q, k, 1e-4)
            assert idx[b, qi].tolist() == sorted(chosen) + [-1] * (k - len(chosen)), seed
            assert len(chosen) <= C
            # gains are listed in time order: compare as sets of (frame, gain)
            got = {int(i): float(v) for i, v in zip(idx[b, qi], gains[b, qi]) if i >= 0}
            for i, v in zip(chosen, slow_gains):
                assert abs(got[i] - v) < 1e-8 * max(1.0, abs(v)), (seed, i)
            assert bool((gains[b, qi][idx[b, qi] < 0] == 0).all())
            L = _kernel(x[b], q)
            assert abs(float(gains[b, qi].sum()) - _logdet(L, chosen)) < 1e-8 * max(1.0, abs(_logdet(L, chosen)))


def test_float32_logdet_matches_slogdet():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 200, 64, generator=g)
    quality = torch.rand(3, 200, generator=g) + 0.5
    idx, gains = vidtok.dpp_select(x, 24, quality=quality)
    assert gains.dtype == torch.float32 and bool((idx >= 0).all())
    for b in range(3):
        ld = _logdet(_kernel(x[b], quality[b]), idx[b].tolist())
        assert abs(float(gains[b].double().sum()) - ld) < 1e-4 * abs(ld) + 1e-4


def test_against_exhaustive_optimum(record_property):
    """Greedy log det versus the best k-subset (T = 12, k = 4: 495 subsets) with planted near-duplicates."""
    ratios, gaps = [], []
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1, 12, 5, generator=g, dtype=torch.float64)
        x[0, 6:] = x[0, :6] + 0.3 * torch.randn(6, 5, generator=g, dtype=torch.float64)
        q = 1 + torch.rand(1, 12, generator=g, dtype=torch.float64)
        idx, gains = vidtok.dpp_select(x, 4, quality=q)
        L = _kernel(x[0], q[0])
        best = max(_logdet(L, list(s)) for s in itertools.combinations(range(12), 4))
        value = float(gains.sum())
        assert value <= best + 1e-9
        gaps.append(best - value)
        ratios.append(torch.exp(torch.tensor(value - best)).item())  # det ratio
    record_property("dpp_greedy_det_ratio", f"mean {sum(ratios) / 20:.4f}, worst {min(ratios):.4f}; optimal "
                    f"{sum(gap < 1e-9 for gap in gaps)}/20, mean log-det gap {sum(gaps) / 20:.4f}")
    assert sum(gap < 1e-9 for gap in gaps) >= 10


@pytest.mark.usefixtures("nan_allowed")  # the documented NaN behaviour
def test_duplicates_never_chosen_twice_and_bad_frames_skipped():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(1, 6, 16, generator=g)
    x = torch.cat([base, base, 3 * base, base[:, :2]], 1)  # every frame appears 3-4 times (scaled copies too)
    quality = torch.rand(1, x.shape[1], generator=g) * 10  # big qualities: rounding must not revive a duplicate
    idx, gains = vidtok.dpp_select(x, 10, quality=quality)
    chosen = [int(i) for i in idx[0] if i >= 0]
    assert len(chosen) == 6 and len({i % 6 if i < 18 else i - 18 for i in chosen}) == 6
    assert idx[0, 6:].tolist() == [-1] * 4
    x2 = torch.randn(1, 5, 8, generator=g)
    x2[0, 1, 2] = float("nan")
    x2[0, 3] = 0
    q2 = torch.tensor([[1.0, 1.0, float("inf"), 1.0, 0.0]])
    assert vidtok.dpp_select(x2, 5, quality=q2)[0][0].tolist() == [0, -1, -1, -1, -1]


def test_invariances_and_batch_independence():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 40, 12, generator=g, dtype=torch.float64)
    quality = torch.rand(3, 2, 40, generator=g, dtype=torch.float64) + 0.2
    idx, gains = vidtok.dpp_select(x, 8, quality=quality)
    rot, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    idx_r, gains_r = vidtok.dpp_select(x @ rot, 8, quality=quality)
    assert torch.equal(idx, idx_r)
    torch.testing.assert_close(gains, gains_r)
    xf, qf = x.float(), quality.float()
    full = vidtok.dpp_select(xf, 8, quality=qf)
    for b in range(3):
        alone = vidtok.dpp_select(xf[b : b + 1], 8, quality=qf[b : b + 1])
        assert torch.equal(alone[0], full[0][b : b + 1]) and torch.equal(alone[1], full[1][b : b + 1])
    # [B, T] quality is the Q = 1 case of [B, Q, T]
    one = vidtok.dpp_select(x, 8, quality=quality[:, 0])
    assert torch.equal(one[0], idx[:, 0])


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((torch.randn(1, 5, 3), 0), {}, ValueError, r"k must be in \[1, "),
        ((torch.randn(5, 3), 2), {}, ValueError, r"x must be \[B, T, C\] \(rank 3\)"),
        ((torch.randn(1, 5, 3), 2), {"quality": torch.rand(1, 4)}, ValueError, "quality must be .* T = 5"),
        ((torch.randn(1, 5, 3), 2), {"quality": torch.rand(1, 1, 1, 5)}, ValueError, r"quality must be \[B, T\] or \[B, Q, T\], got shape \(1, 1, 1, 5\)"),
        ((torch.randn(1, 5, 3), 2), {"quality": [1.0] * 5}, TypeError, "quality must be a torch.Tensor"),
        ((torch.randn(1, 5, 3), 2), {"quality": torch.ones(1, 5, dtype=torch.int64)}, TypeError, "quality must be one of"),
        ((torch.randn(1, 5, 3), 2), {"eps": -1.0}, ValueError, "eps must be >= 0"),
        ((torch.randn(1, 5, 3), 2), {"backend": "cuda"}, vidtok.BackendUnavailableError, "cannot run"),
    ],
)
def test_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        vidtok.dpp_select(*args, **kwargs)


def test_opcheck_and_compile():
    x, q = torch.randn(2, 9, 4), torch.rand(2, 3, 9) + 0.1
    torch.library.opcheck(torch.ops.vidtok.dpp_select.default, (x, 3, q, 1e-4, "reference"))
    torch.library.opcheck(torch.ops.vidtok.dpp_select.default, (x, 12, None, 1e-4, "reference"))
    torch._dynamo.reset()

    def f(x, q):
        return vidtok.dpp_select(x * 2, 3, quality=q)

    out, expected = torch.compile(f, fullgraph=True)(x, q), f(x, q)
    assert torch.equal(out[0], expected[0])
    torch.testing.assert_close(out[1], expected[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="realistic sizes run on a GPU only")
def test_cuda_equals_cpu_at_realistic_sizes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4096, 1152, generator=g, dtype=torch.float64)
    quality = torch.rand(2, 4, 4096, generator=g, dtype=torch.float64) + 0.5
    cpu = vidtok.dpp_select(x, 256, quality=quality)
    gpu = vidtok.dpp_select(x.cuda(), 256, quality=quality.cuda())
    assert torch.equal(gpu[0].cpu(), cpu[0])
    torch.testing.assert_close(gpu[1].cpu(), cpu[1])


# ---------------------------------------------------------------------------------------------------
# The cuda backend (csrc/select.cu). Without a GPU the parameter list is empty and pytest skips these.

GPU_BACKENDS = gpu_backend_cases("dpp_select", "cuda")


def certify_dpp(idx, x, quality, k, eps=1e-4, rtol=1e-5):
    """Checks that ``idx`` ([B, Q, k], sorted by time, -1 padded) is the float64 greedy DPP MAP up to
    near-ties: Chen et al.'s update is replayed in float64 along idx's frames, each step taking the one
    of largest residual d2, which must be within rtol * max L_ii of the best residual of any candidate;
    a frame whose residual is within that of eps * L_ii may be a candidate or not. Any device.
    Returns int [B, Q]: the steps decided by a near-tie."""
    B, T, _ = x.shape
    dev = x.device
    xd = x.double()
    norms = torch.linalg.vector_norm(xd, dim=-1)
    finite = torch.isfinite(norms)
    xn = (xd / norms.clamp_min(1e-8)[..., None]).nan_to_num(0.0, 0.0, 0.0)
    q = torch.ones(B, 1, T, dtype=torch.float64, device=dev) if quality is None else quality.double()
    q = q[:, None] if q.dim() == 2 else q
    q = torch.where(torch.isfinite(q), q, torch.zeros_like(q))
    Q = q.shape[1]
    diag = q.square() * (finite & (norms > 0)).double()[:, None, :]
    tol = rtol * diag.amax(-1, keepdim=True)
    thr = eps * diag
    idx = idx.reshape(B, Q, -1).long().to(dev)
    count = (idx >= 0).sum(-1)
    in_got = torch.zeros(B, Q, T + 1, dtype=torch.bool, device=dev).scatter_(-1, torch.where(idx >= 0, idx, T), True)[..., :T]
    taken = torch.zeros(B, Q, T, dtype=torch.bool, device=dev)
    d2 = diag.clone()
    cf = torch.zeros(B, Q, k, T, dtype=torch.float64, device=dev)
    near = torch.zeros(B, Q, dtype=torch.long, device=dev)
    neg = torch.full_like(d2, float("-inf"))
    for step in range(k):
        active = step < count
        if not bool(active.any()):
            break
        best = torch.where((d2 > thr + tol) & ~taken, d2, neg).max(-1).values
        cval = torch.where(in_got & (d2 > thr - tol) & ~taken, d2, neg)
        c = cval.argmax(-1, keepdim=True)
        chosen = cval.gather(-1, c)[..., 0]
        assert bool((torch.isfinite(chosen) | ~active).all()), f"step {step}: idx holds a frame that is surely no candidate"
        assert bool(((chosen >= best - tol[..., 0]) | ~active).all()), f"step {step}: residual short of the best"
        near += (active & (chosen < best)).long()
        taken = taken | (active[..., None] & torch.zeros_like(taken).scatter_(-1, c, True))
        l_row = q.gather(-1, c) * q * ref_select.sims_to(xn, c)
        c_c = cf[..., :step, :].gather(-1, c[..., None, :].expand(B, Q, step, 1))
        e = (l_row - (c_c * cf[..., :step, :]).sum(-2)) / chosen.clamp_min(1e-300).sqrt()[..., None]
        e = torch.where(active[..., None], e, torch.zeros_like(e))
        cf[..., step, :] = e
        d2 = d2 - e.square()
    assert bool((taken == in_got).all()), "idx holds frames the replay could not take"
    left = ((d2 > thr + tol) & ~taken).any(-1)
    assert not bool((left & (count < k)).any()), "the backend stopped while a candidate was surely left"
    return near


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("k", [1, 3, 9])
@pytest.mark.parametrize("with_quality", [False, True])
def test_cuda_matches_slow_greedy_and_reference(backend, k, with_quality):
    seed = torch.seed() % 2**31
    g = torch.Generator().manual_seed(seed)
    B, Q, T, C = 2, 2, 14, 6  # k = 9 > C: the residuals left after 6 picks are rounding noise, far below eps
    x = torch.randn(B, T, C, generator=g)
    quality = 0.5 + torch.rand(B, Q, T, generator=g) if with_quality else None
    if with_quality:
        quality[1, :, 9:] = 0
    xc, qc = x.cuda(), None if quality is None else quality.cuda()
    idx, gains = vidtok.dpp_select(xc, k, quality=qc, backend=backend)
    assert idx.dtype == torch.int32 and gains.dtype == torch.float32 and idx.device.type == "cuda"
    near = certify_dpp(idx, xc, qc, k)
    certify_dpp(vidtok.dpp_select(xc, k, quality=qc, backend="reference")[0], xc, qc, k)
    idx, gains = (idx, gains) if with_quality else (idx[:, None], gains[:, None])
    for b in range(B):
        for qi in range(idx.shape[1]):
            if near[b, qi]:
                continue
            q = quality[b, qi].double() if with_quality else torch.ones(T, dtype=torch.float64)
            chosen, slow_gains = slow_dpp(x[b].double(), q, k, 1e-4)
            assert idx[b, qi].tolist() == sorted(chosen) + [-1] * (k - len(chosen)), seed
            got = {int(i): float(v) for i, v in zip(idx[b, qi], gains[b, qi]) if i >= 0}
            for i, v in zip(chosen, slow_gains):
                assert abs(got[i] - v) < 1e-4 * max(1.0, abs(v)), (seed, i)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("T", [300, 9000])
def test_cuda_similarity_sources_and_state_regimes_agree(backend, T, monkeypatch):
    """Gram matrix or per-step pass over x, shared-memory or global state: bit-identical picks and
    gains (T = 9000 spans two candidate tiles)."""
    B, Q, C, k = (2, 3, 40, 30) if T == 300 else (1, 2, 16, 12)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, T, C, generator=g).cuda()
    quality = (0.5 + torch.rand(B, Q, T, generator=g)).cuda()
    outs = []
    for path in ("gram", "stream"):
        for force_global in (False, True):
            monkeypatch.setattr(select_module, "_SIMS_PATH", path)
            monkeypatch.setattr(select_module, "_FORCE_GLOBAL_STATE", force_global)
            outs.append(vidtok.dpp_select(x, k, quality=quality, backend=backend))
    for idx, gains in outs[1:]:
        assert torch.equal(idx, outs[0][0]) and torch.equal(gains, outs[0][1])
    certify_dpp(outs[0][0], x, quality, k)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_duplicates_bad_frames_and_batch_independence(backend):
    g = torch.Generator().manual_seed(4)
    base = torch.randn(1, 6, 16, generator=g)
    x = torch.cat([base, base, 3 * base, base[:, :2]], 1).cuda()
    quality = (torch.rand(1, x.shape[1], generator=g) * 10).cuda()
    idx, _ = vidtok.dpp_select(x, 10, quality=quality, backend=backend)
    chosen = [int(i) for i in idx[0] if i >= 0]
    assert len(chosen) == 6 and len({i % 6 if i < 18 else i - 18 for i in chosen}) == 6
    x2 = torch.randn(1, 5, 8, generator=g)
    x2[0, 1, 2] = float("nan")
    x2[0, 3] = 0
    q2 = torch.tensor([[1.0, 1.0, float("inf"), 1.0, 0.0]])
    idx2, gains2 = vidtok.dpp_select(x2.cuda(), 5, quality=q2.cuda(), backend=backend)
    assert idx2[0].tolist() == [0, -1, -1, -1, -1] and gains2[0].tolist() == [0.0] * 5  # log L_00 = log 1
    x3 = torch.randn(3, 40, 12, generator=g).cuda()
    q3 = (torch.rand(3, 2, 40, generator=g) + 0.2).cuda()
    full = vidtok.dpp_select(x3, 8, quality=q3, backend=backend)
    for b in range(3):
        alone = vidtok.dpp_select(x3[b : b + 1], 8, quality=q3[b : b + 1], backend=backend)
        assert torch.equal(alone[0], full[0][b : b + 1]) and torch.equal(alone[1], full[1][b : b + 1])
    assert vidtok.dpp_select(x3[:, :0], 4, backend=backend)[0].tolist() == [[-1] * 4] * 3


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_opcheck(backend):
    x, q = torch.randn(2, 9, 4).cuda(), (torch.rand(2, 3, 9) + 0.1).cuda()
    torch.library.opcheck(torch.ops.vidtok.dpp_select.default, (x, 3, q, 1e-4, backend))
    torch.library.opcheck(torch.ops.vidtok.dpp_select.default, (x, 12, None, 1e-4, backend))


def test_cuda_backend_explains_what_it_cannot_run():
    with pytest.raises(vidtok.BackendUnavailableError, match="float64 quality makes the reference compute in float64"):
        vidtok.dpp_select(torch.randn(1, 5, 3), 2, quality=torch.rand(1, 5, dtype=torch.float64), backend="cuda")
    with pytest.raises(vidtok.BackendUnavailableError, match="cuda backend of vidtok.dpp_select takes float32, float16, bfloat16, got float64"):
        vidtok.dpp_select(torch.randn(1, 5, 3, dtype=torch.float64), 2, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="realistic sizes run on a GPU only")
def test_cuda_at_realistic_sizes(backend, record_property):
    """T = 4096 frames, C = 1152, Q = 16 quality rows, k = 256, float32: certified against float64 up to
    near-ties, and the gains add up to the float64 log-determinant of the chosen set."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4096, 1152, generator=g).cuda()
    quality = (torch.rand(2, 16, 4096, generator=g) + 0.5).cuda()
    idx, gains = vidtok.dpp_select(x, 256, quality=quality, backend=backend)
    want = vidtok.dpp_select(x, 256, quality=quality, backend="reference")
    near = certify_dpp(idx, x, quality, 256, rtol=1e-4)
    assert bool((idx >= 0).all())
    for b, qi in [(0, 0), (1, 15)]:
        ld = _logdet(_kernel(x[b], quality[b, qi]), idx[b, qi].tolist())
        assert abs(float(gains[b, qi].double().sum()) - ld) < 1e-4 * abs(ld) + 1e-2
    record_property("cuda dpp vs reference", f"{int((idx != want[0]).any(-1).sum())}/32 problems differ, "
                                             f"{int(near.sum())} near-tie steps")


@pytest.mark.parametrize("shape", [(0, 5, 8), (1, 0, 8)], ids=str)
def test_empty_inputs_give_padding(shape):
    """No video or no frame: nothing can be chosen; indices are -1 and gains 0."""
    idx, gains = vidtok.dpp_select(torch.randn(shape), 3)
    assert idx.shape == gains.shape and idx.shape[-1] == 3
    assert (idx == -1).all() and (gains == 0).all()

"""vidtok.dpp_select: greedy DPP MAP (Chen et al. 2018) against a slow slogdet-per-candidate greedy,
the exhaustive optimum on tiny inputs, log-det bookkeeping, duplicates and invariances."""

import itertools

import pytest
import torch

import vidtok


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


def test_against_exhaustive_optimum(capsys):
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
    with capsys.disabled():
        print(f"\nDPP greedy det/optimum det: mean {sum(ratios) / 20:.4f}, worst {min(ratios):.4f}; "
              f"optimal {sum(gap < 1e-9 for gap in gaps)}/20, mean log-det gap {sum(gaps) / 20:.4f}")
    assert sum(gap < 1e-9 for gap in gaps) >= 10


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
        ((torch.randn(1, 5, 3), 2), {"eps": -1.0}, ValueError, "eps must be a number >= 0"),
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

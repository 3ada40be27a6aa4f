"""vidtok.greedy_select against a slow step-by-step implementation, the exhaustive optimum on tiny
inputs, invariances, ties and bad input; the cuda backend against the same oracles, up to certified
near-ties."""

import itertools
import math

import pytest
import torch

import vidtok
import vidtok.select as select_module
from vidtok.reference import select as ref_select
from vidtok.testing import devices, gpu_backend_cases, runnable_backends


def _cos(a, b):
    return float(torch.dot(a, b) / (max(float(a.norm()), 1e-8) * max(float(b.norm()), 1e-8)))


def slow_greedy(rel, k, x=None, lam=0.0, min_gap=0.0, sim_thresh=None, pool="all", timestamps=None):
    """One (video, query) problem, one frame at a time, in plain Python: the spec spelled out."""
    T = rel.shape[0]
    ok = [math.isfinite(float(rel[t])) and (x is None or bool(torch.isfinite(x[t]).all())) for t in range(T)]
    if pool == "above_mean":
        vals = [float(rel[t]) for t in range(T) if ok[t]]
        mean = sum(vals) / max(len(vals), 1)
        ok = [ok[t] and float(rel[t]) > mean for t in range(T)]
    elif isinstance(pool, int):
        ranked = sorted((t for t in range(T) if ok[t]), key=lambda t: (-float(rel[t]), t))
        top = set(ranked[:pool])
        ok = [t in top for t in range(T)]
    pos = [float(timestamps[t]) if timestamps is not None else float(t) for t in range(T)]
    chosen = []
    for _ in range(k):
        best, best_gain = None, None
        for t in range(T):
            if not ok[t] or t in chosen:
                continue
            if any(abs(pos[t] - pos[j]) < min_gap for j in chosen):
                continue
            if sim_thresh is not None and any(_cos(x[t], x[j]) > sim_thresh for j in chosen):
                continue
            gain = float(rel[t])
            if lam and chosen:
                gain -= lam * max(_cos(x[t], x[j]) for j in chosen)
            if best is None or gain > best_gain:  # strict: the lower index keeps a tie
                best, best_gain = t, gain
        if best is None:
            break
        chosen.append(best)
    return sorted(chosen) + [-1] * (k - len(chosen))


OPTIONS = [
    dict(),
    dict(lam=0.7),
    dict(lam=0.3, min_gap=3),
    dict(min_gap=2.5, use_timestamps=True),
    dict(sim_thresh=0.2),
    dict(lam=0.5, sim_thresh=0.4, pool="above_mean"),
    dict(pool=7, min_gap=2),
    dict(pool="above_mean", min_gap=4),
    dict(lam=-0.5),  # a negative weight rewards similarity: allowed, same rule
]


def _problem(B, Q, T, C, seed, ragged=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    x[:, 1::3] = x[:, ::3][:, : x[:, 1::3].shape[1]] + 0.3 * torch.randn_like(x[:, 1::3])  # near-duplicates
    rel = torch.rand(B, Q, T, generator=g, dtype=torch.float64)
    if ragged:
        for b in range(B):
            n = int(torch.randint(1, T + 1, (1,), generator=g))
            rel[b, :, n:] = float("-inf")
    timestamps = torch.cumsum(torch.rand(B, T, generator=g, dtype=torch.float64) * 2, -1)
    return rel, x, timestamps


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
@pytest.mark.parametrize("k", [1, 4, 30])
def test_equals_slow_step_by_step(opts, k):
    seed = torch.seed() % 2**31
    rel, x, ts = _problem(3, 2, 23, 6, seed)
    opts = dict(opts)
    timestamps = ts if opts.pop("use_timestamps", False) else None
    out = vidtok.greedy_select(rel, k, x=x, timestamps=timestamps, **opts)
    assert out.dtype == torch.int32 and out.shape == (3, 2, k)
    for b in range(3):
        for q in range(2):
            expected = slow_greedy(rel[b, q], k, x[b], timestamps=None if timestamps is None else timestamps[b], **opts)
            assert out[b, q].tolist() == expected, (seed, b, q)


def test_float32_matches_float64_selection():
    rel, x, _ = _problem(2, 3, 40, 8, seed=5)
    a = vidtok.greedy_select(rel.float(), 6, x=x.float(), lam=0.5, min_gap=2)
    b = vidtok.greedy_select(rel, 6, x=x, lam=0.5, min_gap=2)
    assert torch.equal(a, b)


def test_exact_ties_go_to_the_lower_index():
    # quantised relevance and one-hot embeddings: every gain is exact in binary, ties are real ties
    rel = torch.tensor([[[0.5, 1.0, 1.0, 0.25, 1.0, 0.5, 0.75, 1.0]]])
    basis = torch.eye(4)
    x = basis[torch.tensor([0, 1, 1, 2, 3, 3, 2, 0])][None]
    assert vidtok.greedy_select(rel, 3)[0, 0].tolist() == [1, 2, 4]
    # MMR: after frame 1, frame 2 (a duplicate) loses 0.5, frames 4 and 7 tie at 1.0 -> 4; then 7 at 1.0
    assert vidtok.greedy_select(rel, 3, x=x, lam=0.5)[0, 0].tolist() == [1, 4, 7]
    for opts in [dict(), dict(x=x, lam=0.5), dict(x=x, sim_thresh=0.5), dict(min_gap=2)]:
        got = vidtok.greedy_select(rel, 5, **opts)[0, 0].tolist()
        assert got == slow_greedy(rel[0, 0], 5, x[0] if "x" in opts else None,
                                  **{k: v for k, v in opts.items() if k != "x"})


def _sequence_value(seq, rel, S, lam):
    return sum(rel[t] - (lam * max(S[t][j] for j in seq[:i]) if i and lam else 0.0) for i, t in enumerate(seq))


def _feasible(seq, S, min_gap, sim_thresh):
    for a, b in itertools.combinations(seq, 2):
        if abs(a - b) < min_gap or (sim_thresh is not None and S[a][b] > sim_thresh):
            return False
    return True


@pytest.mark.parametrize("opts", [dict(), dict(lam=0.5), dict(lam=1.0), dict(min_gap=3), dict(sim_thresh=0.3), dict(lam=0.5, min_gap=2)], ids=str)
def test_against_exhaustive_optimum(opts, record_property):
    """Greedy versus the best ordered sequence of k frames under the same gains and constraints
    (T = 10, k = 4: 5040 sequences). Without diversity or constraints greedy is optimal; otherwise
    the ratio is reported and must stay above a bound it comfortably meets on these fixed seeds."""
    lam, min_gap, sim_thresh = opts.get("lam", 0.0), opts.get("min_gap", 0), opts.get("sim_thresh")
    T, k, ratios = 10, 4, []
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1, T, 5, generator=g, dtype=torch.float64)
        rel = 1 + torch.rand(1, 1, T, generator=g, dtype=torch.float64)
        xn = x[0] / x[0].norm(dim=-1, keepdim=True)
        S = (xn @ xn.T).tolist()
        r = rel[0, 0].tolist()
        pick = vidtok.greedy_select(rel, k, x=x, **opts)[0, 0]
        # the greedy value is that of its own pick order: recompute it from the slow implementation's order
        order = []
        for _ in range(k):
            cands = [t for t in range(T) if t not in order and _feasible(order + [t], S, min_gap, sim_thresh)]
            if not cands:
                break
            order.append(max(cands, key=lambda t: (_sequence_value(order + [t], r, S, lam), -t)))
        assert sorted(order) + [-1] * (k - len(order)) == pick.tolist()
        best = max(
            _sequence_value(seq, r, S, lam)
            for seq in itertools.permutations(range(T), len(order))
            if _feasible(seq, S, min_gap, sim_thresh)
        )
        value = _sequence_value(order, r, S, lam)
        assert value <= best + 1e-12
        ratios.append(value / best)
    if not opts:
        assert all(abs(ratio - 1) < 1e-12 for ratio in ratios)
    record_property(f"greedy_over_optimum {opts}", f"mean {sum(ratios) / len(ratios):.4f}, worst {min(ratios):.4f}")
    assert min(ratios) > 0.8


def test_invariances():
    rel, x, ts = _problem(2, 3, 30, 7, seed=3, ragged=False)
    base = vidtok.greedy_select(rel, 5, x=x, lam=0.6, min_gap=2)
    # a random orthogonal rotation of the embeddings changes no cosine
    rot, _ = torch.linalg.qr(torch.randn(7, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    assert torch.equal(vidtok.greedy_select(rel, 5, x=x @ rot, lam=0.6, min_gap=2), base)
    # rescaling the embeddings changes no cosine (powers of two: exact)
    assert torch.equal(vidtok.greedy_select(rel, 5, x=x * 8, lam=0.6, min_gap=2), base)
    # the batch does not matter: each problem alone gives its row
    for b in range(2):
        assert torch.equal(vidtok.greedy_select(rel[b : b + 1], 5, x=x[b : b + 1], lam=0.6, min_gap=2), base[b : b + 1])
    # raising the relevance of a chosen frame keeps it chosen (lam = 0)
    top = vidtok.greedy_select(rel, 5)
    t = int(top[0, 0, 2])
    bumped = rel.clone()
    bumped[0, 0, t] += 1
    assert t in vidtok.greedy_select(bumped, 5)[0, 0].tolist()
    # min_gap in seconds: doubling the frame rate (every frame twice as close) with the same gap in
    # seconds keeps the chosen times when the extra frames are never better
    ts1 = torch.arange(30, dtype=torch.float64)[None].expand(2, 30)
    r1 = vidtok.greedy_select(rel, 4, min_gap=3.0, timestamps=ts1)
    rel2 = torch.full((2, 3, 60), -1.0, dtype=torch.float64)
    rel2[..., ::2] = rel
    ts2 = torch.arange(60, dtype=torch.float64)[None].expand(2, 60) / 2
    r2 = vidtok.greedy_select(rel2, 4, min_gap=3.0, timestamps=ts2)
    assert torch.equal(r2 // 2, r1) and bool((r2 % 2 == 0).all())


@pytest.mark.usefixtures("nan_allowed")  # the documented NaN behaviour
def test_padding_nan_and_too_large_k():
    rel = torch.tensor([[[0.3, float("nan"), 0.9, float("-inf"), 0.1]]])
    x = torch.randn(1, 5, 4)
    x[0, 4, 0] = float("nan")  # a NaN embedding: never selected when x is used
    assert vidtok.greedy_select(rel, 6)[0, 0].tolist() == [0, 2, 4, -1, -1, -1]
    assert vidtok.greedy_select(rel, 6, x=x, lam=0.1)[0, 0].tolist() == [0, 2, -1, -1, -1, -1]
    assert vidtok.greedy_select(rel, 2, pool="above_mean")[0, 0].tolist() == [2, -1]  # mean of 0.3, 0.9, 0.1
    assert vidtok.greedy_select(rel, 3, pool=2)[0, 0].tolist() == [0, 2, -1]
    # relevance straight from frame_scores with lengths: padding is -inf
    s = vidtok.frame_scores(torch.randn(2, 6, 8), torch.randn(2, 1, 8), lengths=torch.tensor([6, 2]))
    out = vidtok.greedy_select(s.relevance, 4)
    assert out[1, 0].tolist() == [0, 1, -1, -1] and bool((out[0] >= 0).all())


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((torch.rand(1, 1, 5), 0), {}, ValueError, r"k must be in \[1, "),
        ((torch.rand(1, 1, 5), 2.0), {}, TypeError, "k must be an int"),
        ((torch.rand(1, 5), 2), {}, ValueError, r"relevance must be \[B, Q, T\] \(rank 3\)"),
        ((torch.rand(1, 1, 5), 2), {"lam": 0.5}, ValueError, "x .* is required when lam != 0"),
        ((torch.rand(1, 1, 5), 2), {"sim_thresh": 0.5}, ValueError, "is required when lam != 0 or sim_thresh"),
        ((torch.rand(1, 1, 5), 2), {"x": torch.randn(1, 4, 3), "lam": 1.0}, ValueError, r"x must be \[B, T, C\] with B = 1, T = 5"),
        ((torch.rand(1, 1, 5), 2), {"min_gap": -1}, ValueError, "min_gap must be >= 0, got -1"),
        ((torch.rand(1, 1, 5), 2), {"pool": "best"}, ValueError, "pool must be 'all', 'above_mean' or an int"),
        ((torch.rand(1, 1, 5), 2), {"pool": 0}, ValueError, "pool must be an int >= 1"),
        ((torch.rand(1, 1, 5), 2), {"timestamps": torch.rand(1, 4)}, ValueError, r"timestamps must be \[B, T\] = \[1, 5\]"),
        ((torch.rand(1, 1, 5), 2), {"backend": "triton"}, vidtok.BackendUnavailableError, "no triton kernel"),
    ],
)
def test_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        vidtok.greedy_select(*args, **kwargs)


def test_opcheck():
    rel, x, ts = _problem(2, 2, 9, 4, seed=1)
    rel, x, ts = rel.float(), x.float(), ts.float()
    for args in [(rel, 3, None, 0.0, 0.0, None, "all", 0, None), (rel, 4, x, 0.5, 2.0, 0.9, "top", 5, ts),
                 (rel, 2, x, 0.0, 0.0, 0.5, "above_mean", 0, None)]:
        torch.library.opcheck(torch.ops.vidtok.greedy_select.default, (*args, "reference"))


def test_compiles_fullgraph():
    torch._dynamo.reset()

    def f(rel, x):
        return vidtok.greedy_select(rel * 2, 3, x=x, lam=0.5, min_gap=2)

    compiled = torch.compile(f, fullgraph=True)
    rel, x, _ = _problem(2, 2, 9, 4, seed=1)
    assert torch.equal(compiled(rel.float(), x.float()), f(rel.float(), x.float()))


@pytest.mark.parametrize("device", devices())
def test_reference_equals_the_eager_loop(device):
    """The vectorised incremental reference picks what the per-problem Python loop of the paper repos
    picks (recomputing the max similarity to the chosen set every step). Their speeds are compared in
    bench/bench_select.py, not here."""
    g = torch.Generator().manual_seed(0)
    B, Q, T, C, k = 1, 4, 2000, 64, 32
    x = torch.randn(B, T, C, generator=g).to(device)
    rel = torch.rand(B, Q, T, generator=g).to(device)

    xn = x / x.norm(dim=-1, keepdim=True)
    slow = []
    for q in range(Q):
        chosen = []
        for _ in range(k):
            gain = rel[0, q].clone()
            if chosen:
                gain -= 0.5 * (xn[0] @ xn[0, chosen].T).max(-1).values
                gain[chosen] = float("-inf")
            chosen.append(int(gain.argmax()))
        slow.append(sorted(chosen))
    assert vidtok.greedy_select(rel, k, x=x, lam=0.5)[0].tolist() == slow


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="realistic sizes run on a GPU only")
def test_cuda_equals_cpu_at_realistic_sizes():
    """A realistic pool size (4096 frames, C = 1152, Q = 16, k = 256): the same picks on the GPU as on
    the CPU (float64, so the comparison is not decided by rounding at near-ties)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4096, 1152, generator=g, dtype=torch.float64)
    rel = torch.rand(2, 16, 4096, generator=g, dtype=torch.float64)
    for opts in [dict(lam=0.5), dict(min_gap=8, pool="above_mean"), dict(sim_thresh=0.05, pool=1024)]:
        cpu = vidtok.greedy_select(rel, 256, x=x, **opts)
        gpu = vidtok.greedy_select(rel.cuda(), 256, x=x.cuda(), **opts)
        assert torch.equal(gpu.cpu(), cpu), opts


# ---------------------------------------------------------------------------------------------------
# The cuda backend (csrc/select.cu). Parametrised over the GPU backends that can run here: without a
# GPU the parameter list is empty and pytest skips these tests.

GPU_BACKENDS = gpu_backend_cases("greedy_select", "cuda")


def certify_greedy(got, rel, k, x=None, lam=0.0, min_gap=0.0, sim_thresh=None, pool="all", timestamps=None, tol=None):
    """Checks that ``got`` ([B, Q, k], sorted by time, -1 padded) is the float64 greedy up to near-ties.

    The greedy is replayed in float64 along got's frames: each step takes, of got's frames not yet
    taken, the one of highest float64 gain, and asserts that its gain is within ``tol`` of the best
    float64 gain over every candidate (backends agree except at certified near-ties). A cosine
    within tol of sim_thresh may exclude a frame or not. Vectorised over problems, any device. Returns int [B, Q]: the steps of each problem decided by a near-tie.
    """
    B, Q, T = rel.shape
    dev = rel.device
    r = rel.double()
    eligible = torch.isfinite(r)
    need_x = lam != 0.0 or sim_thresh is not None
    C = x.shape[-1] if need_x else 1
    if need_x:
        xd = x.double()
        norms = torch.linalg.vector_norm(xd, dim=-1)
        eligible = eligible & torch.isfinite(norms)[:, None, :]
        xn = (xd / norms.clamp_min(1e-8)[..., None]).nan_to_num(0.0, 0.0, 0.0)
    if pool == "above_mean":
        mean = torch.where(eligible, r, torch.zeros_like(r)).sum(-1, keepdim=True) / eligible.sum(-1, keepdim=True).clamp_min(1)
        eligible = eligible & (r > mean)
    elif isinstance(pool, int):
        order = torch.sort(torch.where(eligible, r, torch.full_like(r, float("-inf"))), dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(T, device=dev).expand_as(order))
        eligible = eligible & (rank < pool)
    if tol is None:
        tol = 1e-6 + 1e-6 * math.sqrt(C) * (1 + abs(lam))
    pos = timestamps.double() if timestamps is not None else torch.arange(T, device=dev, dtype=torch.float64).expand(B, T)
    pos = pos[:, None, :].expand(B, Q, T)
    got = got.long().to(dev)
    count = (got >= 0).sum(-1)
    in_got = torch.zeros(B, Q, T + 1, dtype=torch.bool, device=dev).scatter_(-1, torch.where(got >= 0, got, T), True)[..., :T]
    taken = torch.zeros(B, Q, T, dtype=torch.bool, device=dev)
    sure_out, maybe_out = ~eligible, ~eligible  # surely / possibly removed
    ms = torch.zeros_like(r)
    near = torch.zeros(B, Q, dtype=torch.long, device=dev)
    neg = torch.full_like(r, float("-inf"))
    for step in range(k):
        active = step < count  # [B, Q]
        if not bool(active.any()):
            break
        gain = r - lam * ms if (step and lam) else r
        best = torch.where(~maybe_out & ~taken, gain, neg).max(-1).values
        cval = torch.where(in_got & ~sure_out & ~taken, gain, neg)
        c = cval.argmax(-1, keepdim=True)
        chosen = cval.gather(-1, c)[..., 0]
        assert bool((torch.isfinite(chosen) | ~active).all()), f"step {step}: got holds a frame the spec removed for sure"
        assert bool(((chosen >= best - tol) | ~active).all()), f"step {step}: gain short of the best by {float((best - chosen)[active].max())}"
        near += (active & (chosen < best)).long()
        taken = taken | (active[..., None] & torch.zeros_like(taken).scatter_(-1, c, True))
        if need_x:
            sims = ref_select.sims_to(xn, c)
            ms = torch.where(active[..., None], sims if step == 0 else torch.maximum(ms, sims), ms)
            if sim_thresh is not None:
                sure_out = sure_out | (active[..., None] & (sims > sim_thresh + tol))
                maybe_out = maybe_out | (active[..., None] & (sims > sim_thresh - tol))
        if min_gap > 0:
            close = active[..., None] & ((pos - pos.gather(-1, c)).abs() < min_gap)
            sure_out, maybe_out = sure_out | close, maybe_out | close
    assert bool((taken == in_got).all()), "got holds frames the replay could not take"
    left = (~maybe_out & ~taken).any(-1)
    assert not bool((left & (count < k)).any()), "the backend stopped while a candidate was surely left"
    return near


def _quantised_problem(B, Q, T, C, seed, device):
    """Relevance on a 2^-16 grid and times on a 1/8 grid: exact in float32, so float32 and float64 agree
    on pools and gaps and only cosines carry rounding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=g)
    x[:, 1::3] = x[:, ::3][:, : x[:, 1::3].shape[1]] + 0.3 * torch.randn_like(x[:, 1::3])  # near-duplicates
    rel = torch.randint(0, 2**16, (B, Q, T), generator=g).float() / 2**16
    for b in range(B):
        rel[b, :, int(torch.randint(1, T + 1, (1,), generator=g)):] = float("-inf")
    timestamps = torch.cumsum(torch.randint(1, 17, (B, T), generator=g).float() / 8, -1)
    return rel.to(device), x.to(device), timestamps.to(device)


def _clear_threshold(x, thresh, margin=1e-4):
    """thresh nudged up until no cosine of two frames of a video lies within margin of it."""
    xn = x.double() / x.double().norm(dim=-1, keepdim=True).clamp_min(1e-8)
    cos = (xn @ xn.transpose(1, 2)).nan_to_num(0.0)
    while bool(((cos - thresh).abs() < margin).any()):
        thresh += 3 * margin
    return thresh


def _options(opts, timestamps, x):
    opts = dict(opts)
    ts = timestamps if opts.pop("use_timestamps", False) else None
    if opts.get("sim_thresh") is not None:
        opts["sim_thresh"] = _clear_threshold(x, opts["sim_thresh"])
    return opts, ts


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("opts", OPTIONS, ids=str)
@pytest.mark.parametrize("k", [1, 4, 30])
def test_cuda_matches_spec_and_reference(backend, opts, k):
    """float32 on the GPU against the float64 step-by-step oracle and the reference on the same GPU:
    certified up to near-ties, and equal to the oracle wherever no step was a near-tie."""
    seed = torch.seed() % 2**31
    rel, x, ts = _quantised_problem(3, 2, 23, 6, seed, "cuda")
    opts, timestamps = _options(opts, ts, x)
    got = vidtok.greedy_select(rel, k, x=x, timestamps=timestamps, backend=backend, **opts)
    assert got.dtype == torch.int32 and got.shape == (3, 2, k) and got.device.type == "cuda"
    spec = dict(opts)
    near = certify_greedy(got, rel, k, x, timestamps=timestamps, **spec)
    reference = vidtok.greedy_select(rel, k, x=x, timestamps=timestamps, backend="reference", **opts)
    certify_greedy(reference, rel, k, x, timestamps=timestamps, **spec)
    for b in range(3):
        for q in range(2):
            if near[b, q] == 0:
                expected = slow_greedy(rel[b, q].cpu().double(), k, x[b].cpu().double(),
                                       timestamps=None if timestamps is None else timestamps[b].cpu().double(), **opts)
                assert got[b, q].tolist() == expected, (seed, b, q)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("T", [300, 9000])
def test_cuda_similarity_sources_and_state_regimes_agree(backend, T, monkeypatch):
    """The Gram matrix and the per-step pass over x give the same similarities (the same fmaf chain),
    and shared-memory and global-scratch state the same picks: all four runs are bit-identical. T = 9000
    spans two candidate tiles of the kernel."""
    B, Q, C, k = (2, 3, 40, 60) if T == 300 else (1, 2, 16, 40)
    rel, x, ts = _quantised_problem(B, Q, T, C, 11, "cuda")
    for opts in [dict(lam=0.6, min_gap=2.0, sim_thresh=0.5), dict(lam=0.3, pool="above_mean", timestamps=ts, min_gap=3.0)]:
        outs = []
        for path in ("gram", "stream"):
            for force_global in (False, True):
                monkeypatch.setattr(select_module, "_SIMS_PATH", path)
                monkeypatch.setattr(select_module, "_FORCE_GLOBAL_STATE", force_global)
                outs.append(vidtok.greedy_select(rel, k, x=x, backend=backend, **opts))
        assert all(torch.equal(o, outs[0]) for o in outs[1:]), opts
        certify_greedy(outs[0], rel, k, x, **opts)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_without_similarities_is_exact(backend, monkeypatch):
    """lam = 0 and no sim_thresh: no float operation differs from the reference's, so the picks are
    identical to the reference's on the same GPU for any float32 input (and any dtype of relevance)."""
    g = torch.Generator().manual_seed(2)
    for T, force_global in [(37, False), (37, True), (5000, False), (10000, False)]:
        monkeypatch.setattr(select_module, "_FORCE_GLOBAL_STATE", force_global)
        rel = torch.randn(2, 3, T, generator=g).cuda()
        rel[0, 1, T // 2:] = float("-inf")
        rel[1, 0, 3] = float("nan")
        ts = torch.cumsum(torch.rand(2, T, generator=g) * 3, -1).cuda()
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for opts in [dict(), dict(min_gap=2), dict(min_gap=4.5, timestamps=ts), dict(pool="above_mean", min_gap=3),
                         dict(pool=T // 3, min_gap=1.5, timestamps=ts), dict(pool=1)]:
                got = vidtok.greedy_select(rel.to(dtype), 64, backend=backend, **opts)
                want = vidtok.greedy_select(rel.to(dtype), 64, backend="reference", **opts)
                assert torch.equal(got, want), (T, dtype, opts)


@pytest.mark.usefixtures("nan_allowed")  # the documented NaN behaviour
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_exact_ties_padding_and_nan(backend):
    rel = torch.tensor([[[0.5, 1.0, 1.0, 0.25, 1.0, 0.5, 0.75, 1.0]]], device="cuda")
    x = torch.eye(4)[torch.tensor([0, 1, 1, 2, 3, 3, 2, 0])][None].cuda()  # one-hot: every cosine exact
    assert vidtok.greedy_select(rel, 3, backend=backend)[0, 0].tolist() == [1, 2, 4]
    assert vidtok.greedy_select(rel, 3, x=x, lam=0.5, backend=backend)[0, 0].tolist() == [1, 4, 7]
    for opts in [dict(x=x, lam=0.5), dict(x=x, sim_thresh=0.5), dict(min_gap=2), dict(x=x, lam=-0.5, min_gap=2)]:
        assert torch.equal(vidtok.greedy_select(rel, 5, backend=backend, **opts),
                           vidtok.greedy_select(rel, 5, backend="reference", **opts)), opts
    rel = torch.tensor([[[0.3, float("nan"), 0.9, float("-inf"), 0.1]]], device="cuda")
    x = torch.randn(1, 5, 4, device="cuda")
    x[0, 4, 0] = float("nan")
    assert vidtok.greedy_select(rel, 6, backend=backend)[0, 0].tolist() == [0, 2, 4, -1, -1, -1]
    assert vidtok.greedy_select(rel, 6, x=x, lam=0.1, backend=backend)[0, 0].tolist() == [0, 2, -1, -1, -1, -1]
    assert vidtok.greedy_select(rel, 2, pool="above_mean", backend=backend)[0, 0].tolist() == [2, -1]
    assert vidtok.greedy_select(rel, 3, pool=2, backend=backend)[0, 0].tolist() == [0, 2, -1]
    assert vidtok.greedy_select(rel[:, :0], 3, backend=backend).shape == (1, 0, 3)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_batch_independence_and_gram_chunks(backend, monkeypatch):
    rel, x, _ = _quantised_problem(3, 2, 200, 24, 5, "cuda")
    monkeypatch.setattr(select_module, "_SIMS_PATH", "gram")
    full = vidtok.greedy_select(rel, 20, x=x, lam=0.5, min_gap=2, backend=backend)
    for b in range(3):
        alone = vidtok.greedy_select(rel[b : b + 1], 20, x=x[b : b + 1], lam=0.5, min_gap=2, backend=backend)
        assert torch.equal(alone, full[b : b + 1])
    monkeypatch.setattr(select_module, "GRAM_BUDGET_BYTES", 200 * 200 * 4)  # one video per Gram chunk
    assert torch.equal(vidtok.greedy_select(rel, 20, x=x, lam=0.5, min_gap=2, backend=backend), full)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_opcheck(backend):
    rel, x, ts = _quantised_problem(2, 2, 9, 4, 1, "cuda")
    for args in [(rel, 3, None, 0.0, 0.0, None, "all", 0, None), (rel, 4, x, 0.5, 2.0, 0.9, "top", 5, ts),
                 (rel, 2, x, 0.0, 0.0, 0.5, "above_mean", 0, None)]:
        torch.library.opcheck(torch.ops.vidtok.greedy_select.default, (*args, backend))


def test_cuda_backend_explains_what_it_cannot_run():
    rel = torch.rand(1, 1, 5)
    with pytest.raises(vidtok.BackendUnavailableError, match="float64 x or timestamps make the reference compute in float64"):
        vidtok.greedy_select(rel, 2, x=torch.randn(1, 5, 3, dtype=torch.float64), lam=0.5, backend="cuda")
    with pytest.raises(vidtok.BackendUnavailableError, match="needs lam finite in float32, got 1e\\+39"):
        vidtok.greedy_select(rel, 2, x=torch.randn(1, 5, 3), lam=1e39, backend="cuda")
    with pytest.raises(vidtok.BackendUnavailableError, match="cuda backend of vidtok.greedy_select takes float32, float16, bfloat16, got float64"):
        vidtok.greedy_select(rel.double(), 2, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="realistic sizes run on a GPU only")
def test_cuda_at_realistic_sizes(backend, record_property):
    """A realistic workload (T = 4096 frames, C = 1152, Q = 16, k = 256), float32: without similarities
    identical to the reference on the GPU; with them certified against float64 up to near-ties."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4096, 1152, generator=g).cuda()
    rel = (torch.randint(0, 2**16, (2, 16, 4096), generator=g).float() / 2**16).cuda()
    ts = torch.cumsum(torch.randint(1, 17, (2, 4096), generator=g).float() / 8, -1).cuda()
    for opts in [dict(min_gap=8, pool="above_mean"), dict(min_gap=2.5, timestamps=ts, pool=1024)]:
        assert torch.equal(vidtok.greedy_select(rel, 256, backend=backend, **opts),
                           vidtok.greedy_select(rel, 256, backend="reference", **opts)), opts
    for opts in [dict(lam=0.5), dict(sim_thresh=0.05, pool=1024), dict(lam=0.5, min_gap=4, sim_thresh=0.1)]:
        got = vidtok.greedy_select(rel, 256, x=x, backend=backend, **opts)
        want = vidtok.greedy_select(rel, 256, x=x, backend="reference", **opts)
        near = certify_greedy(got, rel, 256, x, **opts)
        record_property(f"cuda greedy vs reference {opts}", f"{int((got != want).any(-1).sum())}/32 problems differ, "
                                                             f"{int(near.sum())} near-tie steps")


@pytest.mark.parametrize("shape", [(1, 2, 0), (0, 2, 5), (2, 0, 5)], ids=str)
def test_empty_inputs_give_padding(shape):
    """No frame, no query or no video: nothing can be chosen, so the result is all -1 padding."""
    rel = torch.rand(shape)
    x = torch.randn(shape[0], shape[2], 4)
    for opts in [dict(), dict(x=x, lam=0.5), dict(x=x, sim_thresh=0.5, min_gap=2)]:
        idx = vidtok.greedy_select(rel, 3, **opts)
        assert idx.shape == (*shape[:2], 3) and idx.dtype == torch.int32 and (idx == -1).all()

"""vidtok.greedy_select against a slow step-by-step implementation, the exhaustive optimum on tiny
inputs, invariances, ties and bad input."""

import itertools
import math

import pytest
import torch

import vidtok
from vidtok.testing import devices


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
def test_against_exhaustive_optimum(opts, capsys):
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
    with capsys.disabled():
        print(f"\ngreedy/optimum {opts}: mean {sum(ratios) / len(ratios):.4f}, worst {min(ratios):.4f}")
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
def test_reference_speed_versus_eager_loop(device):
    """The vectorised incremental reference against the per-problem Python loop the paper repos
    write (recomputing max similarity to the chosen set every step): same picks, and faster."""
    import time

    g = torch.Generator().manual_seed(0)
    B, Q, T, C, k = 1, 4, 2000, 64, 32
    x = torch.randn(B, T, C, generator=g).to(device)
    rel = torch.rand(B, Q, T, generator=g).to(device)

    def eager():
        xn = x / x.norm(dim=-1, keepdim=True)
        out = []
        for q in range(Q):
            chosen = []
            for _ in range(k):
                gain = rel[0, q].clone()
                if chosen:
                    gain -= 0.5 * (xn[0] @ xn[0, chosen].T).max(-1).values
                    gain[chosen] = float("-inf")
                chosen.append(int(gain.argmax()))
            out.append(sorted(chosen))
        return out

    def best_of_3(fn):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - t0)
        return result, min(times)

    # one thread: compares the algorithms; a multi-threaded GEMV stalls when other processes share the cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fast, t_fast = best_of_3(lambda: vidtok.greedy_select(rel, k, x=x, lam=0.5))
        slow, t_slow = best_of_3(eager)
    finally:
        torch.set_num_threads(threads)
    assert fast[0].tolist() == slow
    # measured here (1 thread of a shared Xeon): ~3-6 ms versus ~170 ms; the issue asks for >= 3x
    assert 3 * t_fast < t_slow, (t_fast, t_slow)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="realistic sizes run on a GPU only")
def test_cuda_equals_cpu_at_realistic_sizes():
    """The issue's pool size (4096 frames, C = 1152, Q = 16, k = 256): the same picks on the GPU as on
    the CPU (float64, so the comparison is not decided by rounding at near-ties)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4096, 1152, generator=g, dtype=torch.float64)
    rel = torch.rand(2, 16, 4096, generator=g, dtype=torch.float64)
    for opts in [dict(lam=0.5), dict(min_gap=8, pool="above_mean"), dict(sim_thresh=0.05, pool=1024)]:
        cpu = vidtok.greedy_select(rel, 256, x=x, **opts)
        gpu = vidtok.greedy_select(rel.cuda(), 256, x=x.cuda(), **opts)
        assert torch.equal(gpu.cpu(), cpu), opts

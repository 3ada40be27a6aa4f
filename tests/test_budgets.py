"""Exact token budgets: the serving engines' counts (evs_count, vidcom2_count), allocate_budget,
topk_per_frame (reference and Triton kernel) and motion_gate's exact-count mode, against hand-computed
tables, slow loop oracles written independently, and hypothesis properties (sums exact, bounds kept)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vidtok
from vidtok import _backend
from vidtok.testing import backend_cases

# ---------------------------------------------------------------------------------------------------
# the engines' counts


def _engine_evs(tpf, frames, q):
    """vLLM's compute_retained_tokens_count, transcribed."""
    total_tokens = tpf * frames
    evs_num_tokens = int(total_tokens * (1 - q))
    return max(tpf, evs_num_tokens)


# (tokens_per_frame, frames, q, evs, vidcom2): worked out by hand, float rounding included
COUNT_TABLE = [
    (256, 16, 0.75, 1024, 1024),    # 4096 * 0.25
    (64, 8, 0.0, 512, 512),         # nothing pruned
    (4, 3, 0.7, 4, 3),              # 12 * 0.30000000000000004 = 3.6 -> 3: EVS keeps frame 0 (4), VidCom2 3
    (100, 100, 0.9, 999, 999),      # 10000 * 0.09999999999999998 = 999.99... -> 999, not 1000
    (16, 10, 0.9, 16, 15),          # 160 * 0.0999... = 15.99 -> 15: below one frame for EVS
    (1, 5, 0.5, 2, 5),              # VidCom2 floors at one token per frame
    (144, 1, 0.99, 144, 1),         # one frame: EVS keeps it whole, VidCom2 one token
    (196, 32, 0.5, 3136, 3136),
]


@pytest.mark.parametrize("tpf,frames,q,evs,vidcom2", COUNT_TABLE)
def test_count_table(tpf, frames, q, evs, vidcom2):
    assert vidtok.evs_count(tpf, frames, q) == evs
    assert vidtok.vidcom2_count(tpf, frames, q) == vidcom2


@given(tpf=st.integers(1, 2000), frames=st.integers(1, 500), q=st.floats(0.0, 1.0, exclude_max=True))
@settings(max_examples=200, deadline=None)
def test_count_properties(tpf, frames, q):
    evs = vidtok.evs_count(tpf, frames, q)
    assert evs == _engine_evs(tpf, frames, q)
    assert tpf <= evs <= tpf * frames
    vc = vidtok.vidcom2_count(tpf, frames, q)
    assert frames <= vc <= tpf * frames and vc >= min(evs, int(tpf * frames * (1 - q)))


def test_count_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"q \(the pruning rate\) must be in \[0, 1\)"):
        vidtok.evs_count(4, 4, 1.0)
    with pytest.raises(ValueError, match="q"):
        vidtok.vidcom2_count(4, 4, -0.1)
    with pytest.raises(ValueError, match="tokens_per_frame must be >= 1"):
        vidtok.evs_count(0, 4, 0.5)
    with pytest.raises(TypeError, match="frames must be an int"):
        vidtok.evs_count(4, 4.0, 0.5)
    with pytest.raises(ValueError, match="q must not be NaN"):
        vidtok.evs_count(4, 4, float("nan"))


# ---------------------------------------------------------------------------------------------------
# allocate_budget


def _allocate_oracle(scores, total, lo, hi, mode, temperature=1.0):
    """One video, in plain Python: weights, lam by bisection, then the largest remainder."""
    T = len(scores)
    if mode == "uniform":
        w = [1.0] * T
    elif mode == "softmax":
        top = max(scores)
        e = [math.exp((s - top) / temperature) for s in scores]
        w = [x / sum(e) for x in e]
    else:
        w = list(scores)
    if total > sum(h if wt > 0 else l for wt, l, h in zip(w, lo, hi)):  # the positive weights saturate
        lo = [h if wt > 0 else l for wt, l, h in zip(w, lo, hi)]
        w = [0.0 if wt > 0 else 1.0 for wt in w]

    def alloc(lam):
        return [min(max(lam * wt, l), h) for wt, l, h in zip(w, lo, hi)]

    a_lam, b_lam = 0.0, 1.0
    while sum(alloc(b_lam)) < total and b_lam < 1e300:
        b_lam *= 2
    for _ in range(200):
        mid = (a_lam + b_lam) / 2
        a_lam, b_lam = (mid, b_lam) if sum(alloc(mid)) < total else (a_lam, mid)
    a = alloc(b_lam)
    base = [min(max(math.floor(x), l), h) for x, l, h in zip(a, lo, hi)]
    d = total - sum(base)
    order = sorted((i for i in range(T) if base[i] < hi[i]), key=lambda i: (-(a[i] - base[i]), i))
    for i in order[:d]:
        base[i] += 1
    return base, a


ALLOCATION_TABLE = [
    # scores, total, min, max, mode, expected (worked out by hand)
    ([1, 2, 3, 4], 10, 0, 4, "proportional", [1, 2, 3, 4]),
    ([1, 2, 3, 4], 7, 0, 100, "proportional", [1, 1, 2, 3]),   # 0.7 1.4 2.1 2.8: remainders .8 and .7 win
    ([1, 2, 3, 4], 13, 0, 4, "proportional", [2, 3, 4, 4]),    # lam = 5/3: 1.67 3.33 4 4
    ([0, 0, 5, 0], 7, 0, 100, "proportional", [0, 0, 7, 0]),
    ([0, 0, 5, 0], 10, 0, 4, "proportional", [2, 2, 4, 2]),    # frame 2 saturates; the rest spread evenly
    ([0, 0, 0, 0], 10, 0, 4, "proportional", [3, 3, 2, 2]),    # no weight at all: uniform, lower index first
    ([9, 1, 5, 7], 10, 1, 4, "uniform", [3, 3, 2, 2]),
    ([9, 1, 5, 7], 5, 1, 4, "uniform", [2, 1, 1, 1]),
    ([1, 1, 1], 7, 0, 7, "softmax", [3, 2, 2]),                # equal scores: ties to the lower index
    ([0, 0, 100], 6, 1, 6, "softmax", [1, 1, 4]),              # softmax ~ one-hot: the minimum elsewhere
    ([3, 3], 0, 0, 4, "proportional", [0, 0]),
    ([2, 6], 8, 0, None, "proportional", [2, 6]),              # no upper limit
]


@pytest.mark.parametrize("scores,total,lo,hi,mode,expected", ALLOCATION_TABLE)
def test_allocate_budget_table(scores, total, lo, hi, mode, expected):
    s = torch.tensor([scores], dtype=torch.float32)
    out = vidtok.allocate_budget(s, total, min_per_frame=lo, max_per_frame=hi, mode=mode)
    assert out.dtype == torch.int64 and out.tolist() == [expected]
    T = len(scores)
    oracle, _ = _allocate_oracle([float(x) for x in scores], total, [lo] * T, [total if hi is None else hi] * T, mode)
    assert oracle == expected


@pytest.mark.parametrize("mode", ["proportional", "softmax", "uniform"])
def test_allocate_budget_matches_oracle_per_row(mode):
    """Random batches, per-frame bounds and per-video totals: every row equals the loop oracle."""
    g = torch.Generator().manual_seed(7)
    B, T = 6, 11
    scores = torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    scores[1, 3:7] = 0.0
    scores[2] = 0.0
    lo = torch.randint(0, 3, (B, T), generator=g)
    hi = lo + torch.randint(0, 9, (B, T), generator=g)
    hi[3, ::2] = 0
    lo[3, ::2] = 0  # padding frames
    total = torch.stack([torch.randint(int(l), int(h) + 1, (), generator=g) for l, h in zip(lo.sum(1), hi.sum(1))])
    out = vidtok.allocate_budget(scores, total, min_per_frame=lo, max_per_frame=hi, mode=mode, temperature=0.7)
    for b in range(B):
        expected, _ = _allocate_oracle(scores[b].tolist(), int(total[b]), lo[b].tolist(), hi[b].tolist(), mode, 0.7)
        assert out[b].tolist() == expected, b
    assert torch.equal(out.sum(1), total)


@given(
    data=st.data(),
    T=st.integers(1, 24),
    mode=st.sampled_from(["proportional", "softmax", "uniform"]),
)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_allocate_budget_properties(data, T, mode):
    """Sum exact, bounds honoured, within one token of the real allocation, and ordered: a frame never
    gets fewer tokens than a frame of lower score, nor than an equal-score frame after it."""
    scores = data.draw(st.lists(st.integers(0, 20), min_size=T, max_size=T))
    lo = data.draw(st.integers(0, 5))
    hi = data.draw(st.integers(lo, 40))
    total = data.draw(st.integers(lo * T, hi * T))
    temperature = data.draw(st.sampled_from([0.1, 1.0, 10.0]))
    out = vidtok.allocate_budget(torch.tensor([scores], dtype=torch.float64), total, min_per_frame=lo,
                                 max_per_frame=hi, mode=mode, temperature=temperature)[0].tolist()
    assert sum(out) == total
    assert all(lo <= x <= hi for x in out)
    _, real = _allocate_oracle([float(s) for s in scores], total, [lo] * T, [hi] * T, mode, temperature)
    assert all(abs(x - a) < 1 + 1e-9 for x, a in zip(out, real))
    key = scores if mode != "uniform" else [0] * T
    for i in range(T):
        for j in range(T):
            if key[i] > key[j] or (key[i] == key[j] and i < j):
                assert out[i] >= out[j], (i, j, out)


def test_allocate_budget_is_deterministic_and_batch_independent():
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(5, 64, generator=g)
    full = vidtok.allocate_budget(scores, 300, min_per_frame=1, max_per_frame=16)
    assert torch.equal(full, vidtok.allocate_budget(scores, 300, min_per_frame=1, max_per_frame=16))
    for b in range(5):
        assert torch.equal(full[b : b + 1], vidtok.allocate_budget(scores[b : b + 1], 300, min_per_frame=1, max_per_frame=16))
    half = vidtok.allocate_budget(scores.half(), 300, min_per_frame=1, max_per_frame=16)
    assert torch.equal(half.sum(1), torch.full((5,), 300))


def test_allocate_budget_errors_name_the_argument():
    s = torch.rand(2, 4)
    with pytest.raises(ValueError, match="total must be at most the sum of max_per_frame"):
        vidtok.allocate_budget(s, 17, max_per_frame=4)
    with pytest.raises(ValueError, match="total must be at least the sum of min_per_frame"):
        vidtok.allocate_budget(s, 7, min_per_frame=2)
    with pytest.raises(ValueError, match="total must be >= 0"):
        vidtok.allocate_budget(s, -1)
    with pytest.raises(ValueError, match="total must be >= 0, got -3 at \\[1\\]"):
        vidtok.allocate_budget(s, torch.tensor([4, -3]))
    with pytest.raises(TypeError, match="total must be an int"):
        vidtok.allocate_budget(s, 7.5)
    with pytest.raises(TypeError, match="total must be an int or an int32/int64 tensor"):
        vidtok.allocate_budget(s, torch.tensor([4.0, 4.0]))
    with pytest.raises(ValueError, match=r"min_per_frame must be an int or a tensor of shape \[2, 4\], got shape \[4\]"):
        vidtok.allocate_budget(s, 8, min_per_frame=torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="min_per_frame must be >= 0"):
        vidtok.allocate_budget(s, 8, min_per_frame=-1)
    with pytest.raises(ValueError, match="max_per_frame must be >= min_per_frame"):
        vidtok.allocate_budget(s, 8, min_per_frame=2, max_per_frame=1)
    with pytest.raises(ValueError, match="scores must be >= 0 for mode='proportional'"):
        vidtok.allocate_budget(s - 1, 8)
    with pytest.raises(ValueError, match="scores must be finite"):
        vidtok.allocate_budget(s.masked_fill(s > 0.5, float("inf")), 8, mode="softmax")
    with pytest.raises(ValueError, match="contains NaN"):
        vidtok.allocate_budget(s.masked_fill(s > 0.5, float("nan")), 8)
    with pytest.raises(ValueError, match="mode must be one of"):
        vidtok.allocate_budget(s, 8, mode="linear")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        vidtok.allocate_budget(s, 8, mode="softmax", temperature=0.0)
    with pytest.raises(ValueError, match=r"scores must be \[B, T\]"):
        vidtok.allocate_budget(torch.rand(4), 8)


def test_allocate_budget_nan_allowed_weighs_zero(nan_allowed):
    s = torch.tensor([[1.0, float("nan"), 3.0, 0.0]])
    assert vidtok.allocate_budget(s, 8).tolist() == [[2, 0, 6, 0]]
    assert vidtok.allocate_budget(s, 8, mode="softmax", temperature=100.0)[0, 1] == 0


def test_allocate_budget_opcheck_and_compile():
    s = torch.rand(3, 7)
    total = torch.tensor([10, 20, 7])
    lo, hi = torch.ones(3, 7, dtype=torch.int64), torch.full((3, 7), 5, dtype=torch.int64)
    for mode in ("proportional", "softmax", "uniform"):
        torch.library.opcheck(torch.ops.vidtok.allocate_budget.default, (s, total, lo, hi, mode, 0.5, "reference"))
    torch._dynamo.reset()

    def f(s):
        return vidtok.allocate_budget(s, 20, min_per_frame=1, max_per_frame=5, mode="softmax")

    assert torch.equal(torch.compile(f, fullgraph=True)(s), f(s))


# ---------------------------------------------------------------------------------------------------
# topk_per_frame


def _topk_oracle(scores, budgets):
    """Token by token: sort each frame by (higher score, lower index), NaN as -inf; keep the first k."""
    B, T, N = scores.shape
    keep = torch.zeros(B, T, N, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            row = [float("-inf") if math.isnan(v) else v for v in scores[b, t].double().tolist()]
            order = sorted(range(N), key=lambda n: (-row[n], n))
            keep[b, t, order[: int(budgets[b, t])]] = True
    index = []
    for b in range(B):
        index.append([t * N + n for t in range(T) for n in range(N) if keep[b, t, n]])
    return keep, index


def _tied_scores(B, T, N, seed, dtype=torch.float32):
    """Scores with many exact ties, -inf, -0.0 and 0.0."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(-3, 4, (B, T, N), generator=g).float() / 2
    s[torch.rand(B, T, N, generator=g) < 0.1] = float("-inf")
    s[torch.rand(B, T, N, generator=g) < 0.1] = -0.0
    return s.to(dtype)


def _check_against_oracle(scores, budgets, capacity, backend):
    out = vidtok.topk_per_frame(scores, budgets, capacity=capacity, backend=backend)
    keep, index = _topk_oracle(scores.cpu(), budgets.cpu())
    assert out.keep.dtype == torch.bool and out.index.dtype == torch.int32
    assert torch.equal(out.keep.cpu(), keep)
    assert torch.equal(out.keep.sum(-1).cpu(), budgets.cpu().long())
    for b, row in enumerate(index):
        assert out.index[b, : len(row)].tolist() == row
        assert (out.index[b, len(row):] == -1).all()
    return out


@pytest.mark.parametrize("device,dtype,backend", backend_cases("topk_per_frame"))
def test_topk_per_frame_matches_oracle(device, dtype, backend):
    scores = _tied_scores(2, 3, 37, seed=1, dtype=dtype).to(device)
    budgets = torch.tensor([[0, 37, 5], [12, 1, 36]], device=device)
    out = _check_against_oracle(scores, budgets, 60, backend)
    assert out.index.shape == (2, 60)


@pytest.mark.parametrize("device,dtype,backend", backend_cases("topk_per_frame", dtypes=(torch.float32,)))
def test_topk_per_frame_edges(device, dtype, backend):
    one = torch.tensor([[[2.0]]], device=device)
    assert vidtok.topk_per_frame(one, torch.tensor([[1]], device=device), backend=backend).index.tolist() == [[0]]
    assert vidtok.topk_per_frame(one, torch.tensor([[0]], device=device), backend=backend).index.shape == (1, 0)
    same = torch.zeros(1, 2, 9, device=device)  # all equal: the lowest indices
    out = vidtok.topk_per_frame(same, torch.tensor([[4, 9]], dtype=torch.int32, device=device), backend=backend)
    assert out.index.tolist() == [[0, 1, 2, 3] + list(range(9, 18))]
    # non-contiguous views: frames and videos swapped in memory, and a token stride of 2
    base = _tied_scores(3, 2, 9, seed=4).to(device)
    budgets = torch.tensor([[3, 0, 9], [1, 8, 4]], device=device)
    _check_against_oracle(base.transpose(0, 1), budgets, 14, backend)
    _check_against_oracle(base.transpose(0, 1), budgets, 600, backend)  # padding longer than a block of tokens
    wide = torch.zeros(1, 2, 18, device=device)
    wide[..., ::2] = base[:1]
    _check_against_oracle(wide[..., ::2], budgets[1:, :2], None, backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_per_frame_cpu_backend_padded_selection(dtype, seed, nan_allowed):
    """The cpu backend's thresholds from one padded top-k: budgets from 0 to N in one call, long and
    short frames, ties, +inf, -inf and NaN."""
    from vidtok.cpu.select import SHORT_FRAME

    g = torch.Generator().manual_seed(seed)
    B, T = 2, 3
    N = int(torch.randint(SHORT_FRAME, 700, (1,), generator=g))  # shorter frames take the reference's sort
    scores = _tied_scores(B, T, N, seed=seed + 8, dtype=dtype)
    scores[0, -1, ::7] = float("nan")
    scores[1, 0, ::5] = float("inf")
    budgets = torch.randint(0, N + 1, (B, T), generator=g)
    budgets[0, 0], budgets[1, 1] = 0, N
    _check_against_oracle(scores, budgets, None, "cpu")
    _check_against_oracle(scores, torch.full((B, T), N // 2), None, "cpu")  # equal budgets: no padding
    _check_against_oracle(scores, torch.zeros(B, T, dtype=torch.long), None, "cpu")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_topk_per_frame_and_allocate_budget_empty_batches(backend):
    for B, T, N in ((0, 3, 40), (2, 0, 40), (0, 0, 1)):
        out = vidtok.topk_per_frame(torch.zeros(B, T, N), torch.zeros(B, T, dtype=torch.long), backend=backend)
        assert out.keep.shape == (B, T, N) and out.index.shape == (B, 0)
    assert vidtok.allocate_budget(torch.zeros(2, 0), torch.zeros(2, dtype=torch.long)).shape == (2, 0)
    assert vidtok.allocate_budget(torch.zeros(0, 5), 0).shape == (0, 5)


def test_topk_per_frame_random_float64_reference():
    g = torch.Generator().manual_seed(11)
    scores = torch.randn(3, 4, 50, generator=g, dtype=torch.float64)
    budgets = torch.randint(0, 51, (3, 4), generator=g)
    _check_against_oracle(scores, budgets, None, "reference")


@pytest.mark.parametrize("device,dtype,backend", backend_cases("topk_per_frame", dtypes=(torch.float32,)))
def test_topk_per_frame_nan_ranks_as_minus_inf(device, dtype, backend, nan_allowed):
    s = torch.tensor([[[float("nan"), float("-inf"), 1.0, float("nan"), 0.5, -5.0]]], device=device)
    out = vidtok.topk_per_frame(s, torch.tensor([[4]], device=device), backend=backend)
    assert out.index.tolist() == [[0, 2, 4, 5]]  # the finite ones, then the first of the -inf tier (a NaN)
    out = vidtok.topk_per_frame(s, torch.tensor([[5]], device=device), backend=backend)
    assert out.index.tolist() == [[0, 1, 2, 4, 5]]


@given(data=st.data(), B=st.integers(1, 3), T=st.integers(1, 5), N=st.integers(1, 40))
@settings(max_examples=60, deadline=None)
def test_topk_per_frame_properties(data, B, T, N):
    """Exactly the budgeted count per frame; every kept token outranks every dropped one of its frame."""
    seed = data.draw(st.integers(0, 2**16))
    scores = _tied_scores(B, T, N, seed)
    budgets = torch.tensor(data.draw(st.lists(st.integers(0, N), min_size=B * T, max_size=B * T))).view(B, T)
    out = vidtok.topk_per_frame(scores, budgets, backend="reference")
    assert torch.equal(out.keep.sum(-1), budgets)
    n = torch.arange(N)
    for b in range(B):
        for t in range(T):
            kept, dropped = scores[b, t][out.keep[b, t]], scores[b, t][~out.keep[b, t]]
            if kept.numel() and dropped.numel():
                assert kept.min() >= dropped.max()
                tie = kept.min()
                assert n[out.keep[b, t] & (scores[b, t] == tie)].max() < n[~out.keep[b, t] & (scores[b, t] == tie)].min() \
                    if (~out.keep[b, t] & (scores[b, t] == tie)).any() else True
    assert torch.equal(out.index[:, : int(budgets.sum(1).max())].ge(0).sum(1), budgets.sum(1).int())


def test_topk_per_frame_bad_budgets_name_the_argument():
    s = torch.rand(2, 3, 5)
    ok = torch.ones(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="budgets must be >= 0, got -1 at \\[0, 1\\]"):
        vidtok.topk_per_frame(s, torch.tensor([[1, -1, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="budgets must be <= N = 5"):
        vidtok.topk_per_frame(s, ok * 6)
    with pytest.raises(TypeError, match="budgets must be int32 or int64"):
        vidtok.topk_per_frame(s, ok.float())
    with pytest.raises(TypeError, match="budgets must be an int32/int64 torch.Tensor"):
        vidtok.topk_per_frame(s, [[1, 1, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match=r"budgets must be \[B, T\] = \[2, 3\]"):
        vidtok.topk_per_frame(s, ok[:, :2])
    with pytest.raises(ValueError, match="capacity must be at least every video's total budget"):
        vidtok.topk_per_frame(s, ok, capacity=2)
    with pytest.raises(ValueError, match="contains NaN"):
        vidtok.topk_per_frame(s.masked_fill(s > 0.5, float("nan")), ok)
    with pytest.raises(ValueError, match=r"scores must be \[B, T, N\]"):
        vidtok.topk_per_frame(s[0], ok)


def test_topk_per_frame_kernel_limit_is_explained():
    s, k = torch.zeros(1, 1, 4097), torch.ones(1, 1, dtype=torch.int64)
    reasons = _backend.reasons("topk_per_frame", "triton", s.device, s.dtype, (s, k, 1))
    assert any("N <= 4096" in r for r in reasons)
    assert vidtok.topk_per_frame(s, k).index.tolist() == [[0]]  # auto: the reference takes it


def test_topk_per_frame_opcheck_and_compile():
    s = _tied_scores(2, 3, 7, seed=2)
    k = torch.tensor([[1, 0, 7], [3, 3, 3]])
    torch.library.opcheck(torch.ops.vidtok.topk_per_frame.default, (s, k, 12, "reference"))
    torch._dynamo.reset()

    def f(s, k):
        return vidtok.topk_per_frame(s, k, capacity=12)

    got, want = torch.compile(f, fullgraph=True)(s, k), f(s, k)
    assert torch.equal(got.keep, want.keep) and torch.equal(got.index, want.index)


def test_budget_then_topk_keeps_the_total():
    """allocate_budget -> topk_per_frame: exactly the total, every frame its own budget."""
    g = torch.Generator().manual_seed(5)
    tokens = torch.randn(2, 6, 16, 8, generator=g)
    frame = tokens.mean(2)
    distinct = 1 - torch.nn.functional.cosine_similarity(frame, frame.mean(1, keepdim=True), dim=-1)
    budgets = vidtok.allocate_budget(distinct.clamp_min(0), 40, min_per_frame=1, max_per_frame=16)
    score = 1 - torch.nn.functional.cosine_similarity(tokens, frame[:, :, None], dim=-1)
    out = vidtok.topk_per_frame(score, budgets, capacity=40)
    assert out.keep.sum((1, 2)).tolist() == [40, 40] and (out.index >= 0).all()


# ---------------------------------------------------------------------------------------------------
# motion_gate's exact-count mode


def _evs_pixels_oracle(delta, K, forced):
    """Slot by slot: forced slices first, then the largest delta, ties to the lower flat position."""
    B, Tq, h, w = delta.shape
    keep = torch.zeros(B, Tq * h * w, dtype=torch.bool)
    for b in range(B):
        d = delta[b].reshape(-1).tolist()
        order = sorted(range(len(d)), key=lambda n: (not forced[n // (h * w)], -d[n], n))
        keep[b, order[:K]] = True
    return keep.view(B, Tq, h, w)


@pytest.mark.parametrize("search_radius", [0, 1])
def test_motion_gate_keep_exact_count(search_radius):
    g = torch.Generator().manual_seed(2)
    video = torch.randint(0, 256, (2, 5, 1, 12, 12), dtype=torch.uint8, generator=g)
    video[:, 2] = video[:, 1]  # a static slice: its deltas are 0 (ties, to the lower position)
    gate = vidtok.motion_gate(video, 4, keep=20, search_radius=search_radius)
    assert gate.keep.sum((1, 2, 3)).tolist() == [20, 20]
    forced = [True] + [False] * 4
    assert torch.equal(gate.keep, _evs_pixels_oracle(gate.delta, 20, forced))
    if search_radius == 0:
        assert torch.equal(gate.delta, vidtok.patch_delta(video, 4))
    else:
        ref = vidtok.motion_gate(video, 4, float("inf"), compare_to="prev", search_radius=1)
        assert torch.equal(gate.delta, ref.delta) and torch.equal(gate.motion, ref.motion)
    carry, run = vidtok.reference.motion.carry_and_run_length(gate.keep)
    assert torch.equal(gate.carry, carry) and torch.equal(gate.run_length, run)
    assert (gate.run_length.sum(1) == 5).all()


def test_motion_gate_keep_ratio_and_refresh():
    g = torch.Generator().manual_seed(3)
    video = torch.rand(1, 6, 3, 8, 8, generator=g)
    N = 6 * 4
    gate = vidtok.motion_gate(video, 4, keep_ratio=0.5)
    assert int(gate.keep.sum()) == max(4, int(N * 0.5)) and gate.keep[:, 0].all()
    gate = vidtok.motion_gate(video, 4, keep_ratio=0.1)
    assert int(gate.keep.sum()) == 4 and gate.keep[:, 0].all()  # the floor: slice 0 whole
    gate = vidtok.motion_gate(video, 4, keep=10, refresh_every=3)
    assert int(gate.keep.sum()) == 10 and gate.keep[:, 0].all() and gate.keep[:, 3].all()
    forced = [t % 3 == 0 for t in range(6)]
    assert torch.equal(gate.keep, _evs_pixels_oracle(gate.delta, 10, forced))
    # the threshold mode is unchanged: positional threshold, last_kept by default
    assert torch.equal(vidtok.motion_gate(video, 4, 0.1).keep, vidtok.motion_gate(video, 4, threshold=0.1, compare_to="last_kept").keep)


def test_motion_gate_keep_errors():
    video = torch.zeros(1, 4, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="exactly one of threshold"):
        vidtok.motion_gate(video, 4, 5.0, keep=8)
    with pytest.raises(ValueError, match="exactly one of threshold"):
        vidtok.motion_gate(video, 4)
    with pytest.raises(ValueError, match="compare_to='prev'"):
        vidtok.motion_gate(video, 4, keep=8, compare_to="last_kept")
    with pytest.raises(ValueError, match="max_run"):
        vidtok.motion_gate(video, 4, keep=8, max_run=2)
    with pytest.raises(ValueError, match="cannot cover the slices kept whole"):
        vidtok.motion_gate(video, 4, keep=3)
    with pytest.raises(ValueError, match="keep must be in \\[0, 16\\]"):
        vidtok.motion_gate(video, 4, keep=17)
    with pytest.raises(ValueError, match="keep_ratio must be in \\(0, 1\\]"):
        vidtok.motion_gate(video, 4, keep_ratio=1.5)
    with pytest.raises(TypeError, match="keep must be an int"):
        vidtok.motion_gate(video, 4, keep=8.0)


def test_motion_gate_keep_compiles_with_static_shapes():
    torch._dynamo.reset()
    video = torch.randint(0, 256, (2, 4, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def f(v):
        return vidtok.motion_gate(v, 4, keep=9).keep

    assert torch.equal(torch.compile(f, fullgraph=True)(video), f(video))

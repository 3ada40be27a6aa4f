"""vidtok.temporal_merge against a slow loop implementation of the frame-to-frame forest merge."""

import math

import pytest
import torch

import vidtok
from vidtok import reference as ref
from vidtok.testing import assert_close, backend_cases, make_strided, runnable_backends


def _cos(u, v):
    nu, nv = math.sqrt(sum(t * t for t in u)), math.sqrt(sum(t * t for t in v))
    return sum(p * q for p, q in zip(u, v)) / (max(nu, 1e-8) * max(nv, 1e-8))


def temporal_loop(x, metric, size, threshold, r, lag, radius, h, w, mode):
    """One video: x, metric [T][N][*] lists, size [T][N]. Returns (out, sizes, index, origin)."""
    T, N = len(x), h * w
    links = {}  # position -> (score, parent position)
    for t in range(lag, T):
        for n in range(N):
            y, xx = divmod(n, w)
            best, arg = -math.inf, None
            for m in range(N):  # candidates in increasing position: strictly better keeps the lowest
                y2, x2 = divmod(m, w)
                if radius is not None and max(abs(y - y2), abs(xx - x2)) > radius:
                    continue
                s = _cos(metric[t][n], metric[t - lag][m])
                if s > best:
                    best, arg = s, m
            links[t * N + n] = (best, (t - lag) * N + arg)
    if r is not None:
        kept = sorted(links, key=lambda p: (-links[p][0], p))[:r]
    else:
        kept = [p for p in links if links[p][0] >= threshold]
    parent = {p: links[p][1] for p in kept}

    def root(p):
        while p in parent:
            p = parent[p]
        return p

    roots = sorted({root(p) for p in range(T * N)})
    slot = {p: j for j, p in enumerate(roots)}
    index = [slot[root(p)] for p in range(T * N)]
    flat_x = [row for frame in x for row in frame]
    flat_s = [s for frame in size for s in frame]
    out, sizes = [], []
    for j, rt in enumerate(roots):
        mem = [p for p in range(T * N) if index[p] == j]
        total = sum(flat_s[p] for p in mem)
        C = len(flat_x[0])
        if mode == "wmean":
            row = [sum(flat_x[p][c] * flat_s[p] for p in mem) / total for c in range(C)]
        elif mode == "mean":
            row = [sum(flat_x[p][c] for p in mem) / len(mem) for c in range(C)]
        elif mode == "sum":
            row = [sum(flat_x[p][c] for p in mem) for c in range(C)]
        else:
            row = list(flat_x[rt])
        out.append(row)
        sizes.append(total)
    return out, sizes, index, roots


def _cases():
    return backend_cases("temporal_merge")


CASES = list(_cases())
FP32_CASES = [c for c in CASES if c.values[1] == torch.float32]


def _video(B, T, N, C, *, static=0.5, seed=0, dtype=torch.float32, device="cpu"):
    """Half the positions drift slowly (links with high similarity), the rest are fresh every frame."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, 1, N, C, generator=g)
    x = base + 0.3 * torch.randn(B, T, N, C, generator=g).cumsum(1)
    moving = torch.rand(B, 1, N, 1, generator=g) > static
    x = torch.where(moving, torch.randn(B, T, N, C, generator=g), x)
    return x.to(device=device, dtype=dtype)


def _check_against_loop(merged, x, metric, size, threshold, r, lag, radius, grid, mode, dtype=torch.float32):
    B, T, N, C = x.shape
    for b in range(B):
        out, sizes, index, origin = temporal_loop(
            x[b].cpu().double().tolist(), metric[b].cpu().double().tolist(), size[b].cpu().double().tolist(),
            threshold, r, lag, radius, grid[0], grid[1], mode,
        )
        n_out = len(origin)
        msg = f"b={b} threshold={threshold} r={r} lag={lag} radius={radius} mode={mode}"
        assert merged.lengths[b] == n_out, msg
        assert merged.index[b].tolist() == index, msg
        assert merged.origin[b, :n_out].tolist() == origin, msg
        assert (merged.origin[b, n_out:] == -1).all() and (merged.size[b, n_out:] == 0).all()
        assert (merged.x[b, n_out:] == 0).all()
        assert_close(merged.x[b, :n_out].cpu(), torch.tensor(out, dtype=torch.float64).view(n_out, C), dtype=dtype, reduce_dim=T, msg=msg)
        assert_close(merged.size[b, :n_out].cpu(), torch.tensor(sizes, dtype=torch.float64), dtype=torch.float32, reduce_dim=T, msg=msg)


@pytest.mark.parametrize("lag,radius", [(1, 0), (1, 1), (2, None), (1, None), (2, 1)], ids=str)
@pytest.mark.parametrize("device,dtype,backend", FP32_CASES)
def test_equals_loop_implementation(lag, radius, device, dtype, backend):
    B, T, h, w, C, D = 2, 5, 2, 3, 4, 6
    N = h * w
    x = _video(B, T, N, C, seed=lag * 10 + (radius or 7), device=device)
    metric = _video(B, T, N, D, seed=lag * 10 + (radius or 7) + 1, device=device)
    size = (torch.rand(B, T, N, generator=torch.Generator().manual_seed(4)) + 0.5).to(device)
    for mode in ref.MERGE_MODES:
        for threshold, r in [(0.6, None), (-1.0, None), (None, 0), (None, 7), (None, (T - lag) * N)]:
            merged = vidtok.temporal_merge(
                x, threshold=threshold, r=r, lag=lag, radius=radius, metric=metric, size=size, mode=mode, grid=(h, w), backend=backend
            )
            if r is not None:
                assert merged.x.shape == (B, T * N - r, C)
            _check_against_loop(merged, x, metric, size, threshold, r, lag, radius, (h, w), mode)


@pytest.mark.parametrize("device,dtype,backend", CASES)
def test_low_precision(device, dtype, backend):
    x = _video(2, 4, 9, 16, seed=3, dtype=dtype, device=device)
    ones = torch.ones(2, 4, 9)
    for radius in (0, None):
        merged = vidtok.temporal_merge(x, r=10, radius=radius, backend=backend)
        _check_against_loop(merged, x, x, ones, None, 10, 1, radius, (3, 3), "wmean", dtype=dtype)


@pytest.mark.parametrize("device,dtype,backend", CASES)
def test_identical_frames_collapse_to_one_frame(device, dtype, backend):
    B, T, N, C = 2, 6, 9, 8
    x = torch.randn(B, 1, N, C, generator=torch.Generator().manual_seed(1)).expand(B, T, N, C).to(device=device, dtype=dtype)
    for kwargs in [dict(threshold=0.99), dict(r=(T - 1) * N), dict(threshold=0.99, radius=None), dict(threshold=0.99, radius=1)]:
        merged = vidtok.temporal_merge(x, backend=backend, **kwargs)
        assert merged.x.shape == (B, N, C) and merged.lengths.tolist() == [N] * B
        assert torch.equal(merged.size.cpu(), torch.full((B, N), float(T)))
        assert torch.equal(merged.origin.cpu(), torch.arange(N, dtype=torch.int32).expand(B, N))
        assert torch.equal(merged.index.cpu(), torch.arange(N, dtype=torch.int32).repeat(T).expand(B, T * N))
        assert_close(merged.x, x[:, 0], dtype=dtype)


@pytest.mark.parametrize("device,dtype,backend", FP32_CASES)
def test_fresh_content_keeps_every_token(device, dtype, backend):
    B, T, N, C = 2, 4, 16, 64
    x = torch.randn(B, T, N, C, generator=torch.Generator().manual_seed(2)).to(device)
    merged = vidtok.temporal_merge(x, threshold=0.9, radius=None, backend=backend)
    assert merged.lengths.tolist() == [T * N] * B
    assert torch.equal(merged.x, x.reshape(B, T * N, C))
    assert torch.equal(merged.origin.cpu(), torch.arange(T * N, dtype=torch.int32).expand(B, T * N))


@pytest.mark.parametrize("device,dtype,backend", FP32_CASES)
def test_long_chain_and_branching_tree(device, dtype, backend):
    T, h, w, C = 20, 2, 2, 16
    N = h * w
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, T, N, C, generator=g)  # fresh content everywhere...
    x[0, :, 0] = x[0, 0, 0] + 1e-3 * torch.randn(T, C, generator=g)  # ...but position 0 persists: a 20-link chain
    x[0, 3, 1] = x[0, 2, 2]  # position 1 at t=3 and position 2 at t=3 both match (t=2, n=2): a branch
    x[0, 3, 2] = x[0, 2, 2]
    x[0, 4, 3] = x[0, 3, 1]  # and (t=4, n=3) continues the first branch
    x = x.to(device)
    merged = vidtok.temporal_merge(x, threshold=0.95, radius=1, backend=backend)
    index = merged.index[0].long().view(T, N)
    assert (index[:, 0] == index[0, 0]).all() and merged.size[0, index[0, 0]] == T
    tree = index[2, 2]
    assert index[3, 1] == tree and index[3, 2] == tree and index[4, 3] == tree
    assert merged.size[0, tree] == 4 and merged.origin[0, tree] == 2 * N + 2
    assert merged.lengths[0] == T * N - (T - 1) - 3
    _check_against_loop(merged, x, x, torch.ones(1, T, N), 0.95, None, 1, 1, (h, w), "wmean")


@pytest.mark.parametrize("device,dtype,backend", FP32_CASES)
def test_threshold_and_r_agree(device, dtype, backend):
    x = _video(1, 6, 9, 8, seed=6, device=device)
    by_threshold = vidtok.temporal_merge(x, threshold=0.7, radius=1, backend=backend)
    kept = 6 * 9 - int(by_threshold.lengths[0])
    assert 0 < kept < 5 * 9
    by_r = vidtok.temporal_merge(x, r=kept, radius=1, backend=backend)
    for a, b in zip(by_threshold[:4], by_r[:4]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device,dtype,backend", FP32_CASES)
def test_padding_and_conservation(device, dtype, backend):
    x = _video(3, 5, 9, 8, seed=7, device=device)
    x[1] = x[1, :1]  # one static video: far fewer outputs than the others
    size = torch.rand(3, 5, 9, generator=torch.Generator().manual_seed(3)).to(device) + 0.5
    merged = vidtok.temporal_merge(x, threshold=0.8, size=size, backend=backend)
    lengths = merged.lengths
    assert merged.x.shape[1] == lengths.max() and lengths[1] == 9 and lengths[1] < lengths[0]
    pad = torch.arange(merged.x.shape[1], device=device)[None] >= lengths[:, None]
    assert torch.isneginf(merged.log_size[pad]).all() and torch.isfinite(merged.log_size[~pad]).all()
    torch.testing.assert_close((merged.x * merged.size[..., None]).sum(1), (x * size[..., None]).sum((1, 2)), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(merged.size.sum(1), size.sum((1, 2)))
    restored = vidtok.unmerge(merged.x, merged, frames=5)
    assert restored.shape == x.shape
    assert_close(restored[1], merged.x[1, :9].expand(5, 9, 8), dtype=torch.float32, reduce_dim=5)


@pytest.mark.parametrize("mode", ["wmean", "mean", "sum", "replace"])
def test_gradcheck_float64(mode):
    x = _video(2, 4, 4, 3, seed=8, dtype=torch.float64).requires_grad_()
    size = torch.rand(2, 4, 4, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(lambda t: vidtok.temporal_merge(t, r=5, size=size, mode=mode, radius=1).x, (x,))
    assert torch.autograd.gradcheck(lambda t: vidtok.temporal_merge(t, threshold=0.5, size=size, mode=mode).x, (x,))


@pytest.mark.usefixtures("nan_allowed")  # the documented NaN behaviour
def test_single_frame_and_nan_tokens():
    x = torch.randn(1, 1, 4, 3)
    merged = vidtok.temporal_merge(x, threshold=0.5)
    assert torch.equal(merged.x, x[:, 0]) and merged.lengths.tolist() == [4]
    x = torch.randn(1, 3, 4, 3).expand(1, 3, 4, 3).clone()
    x[:, 1:] = x[:, :1]
    x[0, 1, 2, 0] = float("nan")
    merged = vidtok.temporal_merge(x, threshold=0.5)
    nan_rows = torch.isnan(merged.x[0]).any(-1)
    assert nan_rows.sum() == 1 and merged.size[0][nan_rows].item() == 1  # alone, and it poisons nobody


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(x=torch.randn(2, 3, 4), r=1), ValueError, r"x must be \[B, T, N, C\]"),
        (dict(x=torch.ones(1, 2, 4, 3, dtype=torch.int32), r=1), TypeError, "x must be one of float32"),
        (dict(x=torch.randn(1, 2, 4, 3)), ValueError, "exactly one of threshold= and r="),
        (dict(x=torch.randn(1, 2, 4, 3), r=1, threshold=0.5), ValueError, "exactly one"),
        (dict(x=torch.randn(1, 2, 4, 3), r=5), ValueError, r"r must be in \[0, 4\]"),
        (dict(x=torch.randn(1, 2, 4, 3), r=-1), ValueError, r"r must be in \[0, 4\]"),
        (dict(x=torch.randn(1, 2, 4, 3), threshold=1.5), ValueError, r"threshold must be in \[-1, 1\]"),
        (dict(x=torch.randn(1, 2, 4, 3), threshold="high"), TypeError, "threshold must be a float"),
        (dict(x=torch.randn(1, 3, 4, 3), r=1, lag=3), ValueError, r"lag must be in \[1, 2\]"),
        (dict(x=torch.randn(1, 2, 6, 3), r=1), ValueError, "not a square grid"),
        (dict(x=torch.randn(1, 2, 6, 3), r=1, grid=(2, 2)), ValueError, r"grid \(h, w\) = \(2, 2\) does not match N = 6"),
        (dict(x=torch.randn(1, 2, 6, 3), r=1, grid=(2.0, 3)), TypeError, "grid must be a pair of positive ints"),
        (dict(x=torch.randn(1, 2, 4, 3), r=1, radius=-1), ValueError, r"radius must be in \[0, "),
        (dict(x=torch.randn(1, 2, 4, 3), r=1, metric=torch.randn(1, 2, 5, 3)), ValueError, r"metric \[B, T, N, D\] must match x"),
        (dict(x=torch.randn(1, 2, 4, 3), r=1, size=torch.ones(1, 8)), ValueError, r"size must be \[B, T, N\]"),
        (dict(x=torch.randn(1, 2, 4, 3), r=1, mode="max"), ValueError, "mode must be one of"),
        (dict(x=torch.randn(1, 2, 4, 3), r=1, backend="cuda"), vidtok.BackendUnavailableError, "temporal_merge has no cuda kernel"),
    ],
)
def test_bad_input(kwargs, error, match):
    x = kwargs.pop("x")
    with pytest.raises(error, match=match):
        vidtok.temporal_merge(x, **kwargs)


@pytest.mark.parametrize("backend", runnable_backends("temporal_merge", "cpu", torch.float32))
def test_opcheck(backend):
    x = _video(2, 3, 4, 5, seed=1)
    op = torch.ops.vidtok.temporal_assignment.default
    # (metric, threshold, r, r_video, out_len, lag, radius, h, w, segment_id, backend)
    torch.library.opcheck(op, (x, None, 3, None, None, 1, 1, 2, 2, None, backend))
    torch.library.opcheck(op, (x, None, 2, None, None, 1, None, 2, 2, None, backend))
    segments = torch.tensor([[0, 0, 1], [0, 1, 1]])
    torch.library.opcheck(op, (x, None, None, torch.tensor([1, 3]), 11, 1, 0, 2, 2, segments, backend))


def test_compiles_fullgraph_with_r():
    torch._dynamo.reset()

    def f(x):
        merged = vidtok.temporal_merge(x * 2, r=6, radius=1)
        return vidtok.unmerge(merged.x, merged, frames=x.shape[1]).sum() + merged.log_size.sum()

    compiled = torch.compile(f, fullgraph=True)
    x = _video(2, 4, 9, 8, seed=2).requires_grad_()
    y = compiled(x)
    y.backward()
    xe = x.detach().requires_grad_()
    f(xe).backward()
    torch.testing.assert_close(y, f(x.detach()))
    torch.testing.assert_close(x.grad, xe.grad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="realistic sizes run on a GPU only")
@pytest.mark.parametrize("radius", [0, None])
def test_gpu_video_llm_workload(radius):
    x = _video(1, 64, 169, 3584, seed=1, dtype=torch.bfloat16, device="cuda")
    got = vidtok.temporal_merge(x, r=64 * 169 // 2, radius=radius, backend="triton")
    expected = vidtok.temporal_merge(x, r=64 * 169 // 2, radius=radius, backend="reference")
    assert (got.index == expected.index).float().mean() > 0.99


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="realistic sizes run on a GPU only")
def test_gpu_long_video_keeps_more_slots_than_one_grid_axis_holds():
    """1,000 frames x 576 tokens with r = 1 keep 575,999 slots: 72,000 merge programs of 8 slots, past
    the 65,535 a CUDA grid's axes 1 and 2 allow (merge_tokens puts them on axis 0)."""
    x = _video(1, 1000, 576, 16, seed=4, device="cuda")
    got = vidtok.temporal_merge(x, r=1, backend="triton")
    expected = vidtok.temporal_merge(x, r=1, backend="reference")
    assert got.x.shape[1] == 1000 * 576 - 1
    assert torch.equal(got.index, expected.index)
    torch.testing.assert_close(got.x, expected.x)


def test_compiles_fullgraph_with_threshold():
    """The data-dependent output length becomes an unbacked size under torch.compile."""
    torch._dynamo.reset()

    def f(x):
        merged = vidtok.temporal_merge(x * 2, threshold=0.8)
        return (merged.x * merged.size[..., None]).sum(1), merged.lengths

    compiled = torch.compile(f, fullgraph=True)
    x = _video(2, 4, 9, 8, seed=3)
    x[0] = x[0, :1]
    x = x.requires_grad_()
    got, expected = compiled(x), f(x)
    torch.testing.assert_close(got[0], expected[0])
    assert torch.equal(got[1], expected[1]) and got[1][0] == 9
    (g1,) = torch.autograd.grad(got[0].sum(), x)
    (g2,) = torch.autograd.grad(expected[0].sum(), x)
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("radius", [1, None])
@pytest.mark.parametrize("device,dtype,backend", CASES)
def test_ties_go_to_the_lowest_candidate(radius, device, dtype, backend):
    h = w = 4
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1, 2, h * w, 8, generator=g)
    x[0, 0, [5, 6, 9, 10]] = x[0, 1, 5]  # four equal candidates around (1, 1), one of them at (1, 1) itself
    x = x.to(device=device, dtype=dtype)
    merged = vidtok.temporal_merge(x, r=1, radius=radius, backend=backend)
    assert merged.index[0, 16 + 5] == merged.index[0, 5]  # linked to position 5, the lowest
    _, parent = ref.temporal_links(x, 1, radius, (h, w))
    assert parent[0, 1, 5] == 5


@pytest.mark.parametrize("radius", [0, 2, None])
@pytest.mark.parametrize("device,dtype,backend", FP32_CASES)
def test_strided_views(radius, device, dtype, backend):
    x = _video(2, 4, 9, 20, seed=11, device=device)
    for layout in ("channels_strided", "permuted"):
        merged = vidtok.temporal_merge(make_strided(x, layout), r=12, radius=radius, backend=backend)
        expected = vidtok.temporal_merge(x, r=12, radius=radius, backend="reference")
        assert torch.equal(merged.index, expected.index) and torch.equal(merged.origin, expected.origin)
        assert_close(merged.x, expected.x, dtype=dtype, reduce_dim=4)

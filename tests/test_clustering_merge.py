"""merge_by_assignment, connected_components_merge and dpc_knn_merge against independent oracles:
group sums written as loops, scipy.sparse.csgraph.connected_components, and DPC-kNN spelled out from
the papers (Rodriguez and Laio 2014; Du et al. 2016; the token form of TCFormer, Zeng et al. 2022)
with Python loops in float64. Exact counts, ties, padding, NaN, bad input, autograd, compile."""

import math

import pytest
import torch

import vidtok
from vidtok import reference as ref
from vidtok.testing import backend_cases

FP32_CASES = [c for c in backend_cases("merge_by_assignment") if c.values[1] == torch.float32]


# ---------------------------------------------------------------------------------------------------
# merge_by_assignment


def groups_loop(x, assign, size, L, mode):
    """(out [L][C], sizes [L], origin [L]) of one video, a group at a time."""
    out, sizes, origin = [], [], []
    C = len(x[0])
    for j in range(L):
        mem = [n for n in range(len(x)) if assign[n] == j]
        if not mem:
            out.append([0.0] * C), sizes.append(0.0), origin.append(-1)
            continue
        total = sum(size[n] for n in mem)
        if mode == "wmean":
            row = [sum(x[n][c] * size[n] for n in mem) / total for c in range(C)]
        elif mode == "mean":
            row = [sum(x[n][c] for n in mem) / len(mem) for c in range(C)]
        elif mode == "sum":
            row = [sum(x[n][c] for n in mem) for c in range(C)]
        else:
            row = list(x[mem[0]])
        out.append(row), sizes.append(total), origin.append(mem[0])
    return out, sizes, origin


@pytest.mark.parametrize("mode", ref.MERGE_MODES)
@pytest.mark.parametrize("device,dtype,backend", FP32_CASES)
def test_merge_by_assignment_equals_loop(mode, device, dtype, backend):
    g = torch.Generator().manual_seed(11)
    B, N, C, L = 2, 19, 5, 7
    x = torch.randn(B, N, C, generator=g)
    assign = torch.randint(0, L - 1, (B, N), generator=g)  # group L - 1 stays empty: padding
    size = torch.rand(B, N, generator=g) + 0.5
    merged = vidtok.merge_by_assignment(x.to(device), assign.to(device), groups=L, size=size.to(device), mode=mode, backend=backend)
    assert merged.x.shape == (B, L, C) and merged.index.dtype == torch.int32
    for b in range(B):
        out, sizes, origin = groups_loop(x[b].tolist(), assign[b].tolist(), size[b].tolist(), L, mode)
        assert merged.origin[b].tolist() == origin
        torch.testing.assert_close(merged.x[b].cpu(), torch.tensor(out), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged.size[b].cpu(), torch.tensor(sizes), atol=1e-5, rtol=1e-5)


def test_merge_by_assignment_infers_groups_and_is_differentiable():
    x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    assign = torch.tensor([[0, 0, 1, 1, 2, 2], [2, 1, 0, 0, 1, 2]])
    merged = vidtok.merge_by_assignment(x, assign)
    assert merged.x.shape == (2, 3, 3) and merged.origin.tolist() == [[0, 2, 4], [2, 1, 0]]
    for mode in ref.MERGE_MODES:
        torch.autograd.gradcheck(lambda t: vidtok.merge_by_assignment(t, assign, mode=mode).x, (x,))


def test_merge_by_assignment_compiles():
    torch._dynamo.reset()

    def f(x, assign):
        return vidtok.merge_by_assignment(x * 2, assign, groups=4).x.sum()

    x, assign = torch.randn(2, 9, 4), torch.randint(0, 4, (2, 9))
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, assign), f(x, assign))


def test_merge_by_assignment_bad_input():
    x = torch.randn(2, 5, 3)
    with pytest.raises(TypeError, match="assign must be one of"):
        vidtok.merge_by_assignment(x, torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"assign must be \[B, N\] = \[2, 5\]"):
        vidtok.merge_by_assignment(x, torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"group ids in \[0, 2\)"):
        vidtok.merge_by_assignment(x, torch.tensor([[0, 1, 2, 0, 0], [0] * 5]), groups=2)
    with pytest.raises(ValueError, match=r"group ids in \[0, 3\)"):
        vidtok.merge_by_assignment(x, torch.tensor([[0, 1, 2, 0, -1], [0] * 5]))
    with pytest.raises(ValueError, match="mode must be one of"):
        vidtok.merge_by_assignment(x, torch.zeros(2, 5, dtype=torch.int64), mode="max")


# ---------------------------------------------------------------------------------------------------
# connected_components_merge


def scipy_components(metric, threshold):
    """(index, origin) of one video from scipy's connected_components on the thresholded cosine graph."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    m = metric.double()
    unit = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    graph = (unit @ unit.T >= threshold).numpy()
    _, labels = connected_components(csr_matrix(graph), directed=False)
    first = {}
    for n, lab in enumerate(labels):
        first.setdefault(int(lab), n)
    roots = sorted(first.values())
    return [roots.index(first[int(lab)]) for lab in labels], roots


@pytest.mark.parametrize("threshold", [-1.0, 0.2, 0.6, 0.9, 1.0])
def test_components_equal_scipy(threshold):
    pytest.importorskip("scipy")
    seed = torch.seed() % 2**31
    g = torch.Generator().manual_seed(seed)
    B, N = 3, 41
    centres = torch.randn(B, 6, 4, generator=g, dtype=torch.float64)
    x = centres[torch.arange(B)[:, None], torch.randint(0, 6, (B, N), generator=g)] + 0.4 * torch.randn(B, N, 4, generator=g, dtype=torch.float64)
    merged = vidtok.connected_components_merge(x, threshold)
    counts = []
    for b in range(B):
        index, origin = scipy_components(x[b], threshold)
        counts.append(len(origin))
        assert merged.index[b].tolist() == index, (seed, b)
        assert merged.origin[b, : len(origin)].tolist() == origin, (seed, b)
        assert bool((merged.origin[b, len(origin):] == -1).all())
    assert merged.lengths.tolist() == counts and merged.x.shape[1] == max(counts)
    torch.testing.assert_close(merged.size.sum(1), torch.full((B,), float(N), dtype=torch.float64))


def test_components_of_a_long_chain_and_of_two_interleaved_chains():
    """A path graph needs labels to travel the whole chain: points 0.02 rad apart on an arc of 1.26
    rad, each linked only to its neighbours; the opposite arc, interleaved by position, stays apart."""
    N = 64
    angle = torch.arange(N, dtype=torch.float64) * 0.02
    chain = torch.stack([angle.cos(), angle.sin()], -1)[None]
    threshold = math.cos(0.03)  # neighbours (0.02 apart) link, second neighbours (0.04) do not
    assert vidtok.connected_components_merge(chain, threshold).index.tolist() == [[0] * N]
    two = torch.cat([chain, -chain], 1)[:, torch.arange(2 * N).view(2, N).T.reshape(-1)]  # a, b, a, b, ...
    merged = vidtok.connected_components_merge(two, threshold)
    assert merged.index.tolist() == [[0, 1] * N] and merged.origin.tolist() == [[0, 1]]


@pytest.mark.usefixtures("nan_allowed")
def test_components_nan_token_stays_alone():
    x = torch.ones(1, 5, 3)
    x[0, 2, 0] = float("nan")
    merged = vidtok.connected_components_merge(x, 0.5)
    assert merged.index.tolist() == [[0, 0, 1, 0, 0]] and merged.origin.tolist() == [[0, 2]]


def test_components_merge_values_and_bad_input():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 0.1], [0.1, 3.0]]])
    merged = vidtok.connected_components_merge(x, 0.9, mode="mean")
    assert merged.index.tolist() == [[0, 1, 0, 1]]
    torch.testing.assert_close(merged.x, torch.tensor([[[1.5, 0.05], [0.05, 2.0]]]))
    with pytest.raises(ValueError, match=r"threshold must be in \[-1, 1\]"):
        vidtok.connected_components_merge(x, 1.5)
    with pytest.raises(TypeError, match="threshold must be a real number"):
        vidtok.connected_components_merge(x, None)
    bad = x.clone()
    bad[0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="contains NaN"):
        vidtok.connected_components_merge(bad, 0.5)


# ---------------------------------------------------------------------------------------------------
# dpc_knn_merge


def dpc_knn_loop(points, k, clusters):
    """(index, centres) of one video: DPC-kNN spelled out with loops in float64."""
    N, D = len(points), len(points[0])
    dist = [[math.sqrt(sum((a - b) ** 2 for a, b in zip(p, q))) / math.sqrt(D) for q in points] for p in points]
    # density: exp(-mean squared distance to the k nearest tokens, the token itself among them)
    rho = [math.exp(-sum(v * v for v in sorted(dist[i])[:k]) / k) for i in range(N)]

    def denser(j, i):
        return rho[j] > rho[i] or (rho[j] == rho[i] and j < i)

    farthest = max(max(row) for row in dist)
    delta = [min((dist[i][j] for j in range(N) if denser(j, i)), default=farthest) for i in range(N)]
    score = [rho[i] * delta[i] for i in range(N)]
    centres = sorted(sorted(range(N), key=lambda i: (-score[i], i))[:clusters])
    index = [centres.index(i) if i in centres else min(range(clusters), key=lambda c: (dist[i][centres[c]], c))
             for i in range(N)]
    return index, centres


@pytest.mark.parametrize("k,clusters", [(1, 1), (3, 5), (5, 12), (7, 30), (30, 30)])
def test_dpc_knn_equals_loop(k, clusters):
    seed = torch.seed() % 2**31
    g = torch.Generator().manual_seed(seed)
    B, N, D = 2, 30, 6
    centres = torch.randn(B, 4, D, generator=g, dtype=torch.float64) * 2
    x = centres[torch.arange(B)[:, None], torch.randint(0, 4, (B, N), generator=g)] + torch.randn(B, N, D, generator=g, dtype=torch.float64)
    merged = vidtok.dpc_knn_merge(x, k, clusters)
    assert merged.x.shape == (B, clusters, D)
    for b in range(B):
        index, origin = dpc_knn_loop(x[b].tolist(), k, clusters)
        assert merged.origin[b].tolist() == origin, (seed, b)
        assert merged.index[b].tolist() == index, (seed, b)
    torch.testing.assert_close(merged.size.sum(1), torch.full((B,), float(N), dtype=torch.float64))


def test_dpc_knn_ties_follow_the_documented_rule():
    """k = 1 makes every density exp(0) = 1: denser means lower position; duplicated integer points
    make distance ties exact, so the centre ranking and the nearest-centre choice tie too."""
    pts = torch.tensor([[0, 0], [3, 0], [0, 0], [3, 0], [0, 4], [1, 0], [3, 0], [0, 4]], dtype=torch.float64)[None]
    for clusters in range(1, 9):
        merged = vidtok.dpc_knn_merge(pts, 1, clusters)
        index, origin = dpc_knn_loop(pts[0].tolist(), 1, clusters)
        assert merged.origin[0].tolist() == origin and merged.index[0].tolist() == index, clusters
    for k in (2, 3, 4):
        merged = vidtok.dpc_knn_merge(pts, k, 3)
        index, origin = dpc_knn_loop(pts[0].tolist(), k, 3)
        assert merged.origin[0].tolist() == origin and merged.index[0].tolist() == index, k


@pytest.mark.parametrize("device,dtype,backend", FP32_CASES)
def test_dpc_knn_merge_values_on_every_merge_backend(device, dtype, backend):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 25, 8, generator=g).to(device)
    merged = vidtok.dpc_knn_merge(x, 4, 6, mode="mean")
    # exact counts, centres in ascending order, every centre in its own cluster
    assert merged.x.shape == (2, 6, 8)
    assert bool((merged.origin[:, 1:] > merged.origin[:, :-1]).all())
    assert torch.equal(merged.index.gather(1, merged.origin.long()), torch.arange(6, device=device, dtype=torch.int32).expand(2, 6))
    out = vidtok.merge_by_assignment(x, merged.index, groups=6, mode="mean", backend=backend)
    torch.testing.assert_close(out.x, merged.x)


def test_dpc_knn_opcheck():
    x = torch.randn(2, 10, 4, generator=torch.Generator().manual_seed(8))
    torch.library.opcheck(torch.ops.vidtok.dpc_knn_assignment.default, (x, 3, 4, "reference"))


def test_dpc_knn_gradient_and_compile():
    x = torch.randn(1, 12, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: vidtok.dpc_knn_merge(t, 3, 4).x, (x,))
    torch._dynamo.reset()

    def f(x):
        return vidtok.dpc_knn_merge(x * 2, 3, 4).x.sum()

    x = torch.randn(2, 12, 5)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


@pytest.mark.usefixtures("nan_allowed")
def test_dpc_knn_nan_token_is_never_a_centre_before_the_others():
    x = torch.randn(1, 10, 4, generator=torch.Generator().manual_seed(2))
    x[0, 3, 1] = float("nan")
    merged = vidtok.dpc_knn_merge(x, 3, 4)
    assert 3 not in merged.origin[0].tolist() and merged.index[0, 3] == 0
    assert 3 in vidtok.dpc_knn_merge(x, 3, 10).origin[0].tolist()


def test_dpc_knn_bad_input():
    x = torch.randn(2, 6, 3)
    with pytest.raises(ValueError, match=r"k must be in \[1, 6\]"):
        vidtok.dpc_knn_merge(x, 0, 2)
    with pytest.raises(ValueError, match=r"clusters must be in \[1, 6\]"):
        vidtok.dpc_knn_merge(x, 2, 7)
    with pytest.raises(TypeError, match="clusters must be an int"):
        vidtok.dpc_knn_merge(x, 2, 2.0)
    with pytest.raises(ValueError, match=r"metric \[B, N, D\] must match"):
        vidtok.dpc_knn_merge(x, 2, 2, metric=torch.randn(2, 5, 3))
    bad = x.clone()
    bad[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="contains NaN"):
        vidtok.dpc_knn_merge(bad, 2, 2)

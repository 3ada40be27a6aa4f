"""The importance-aware policies: KeepAttended (attention received), MergeClusters (DPC-kNN) and
MergeComponents (connected components): exact counts known from the grid and what they keep. Their
counts through generate() on every model family: tests/test_integrations_transformers.py (COUNTED)."""

import pytest
import torch

from vidtok.integrations import KeepAttended, MergeClusters, MergeComponents
from vidtok.integrations.policies import check_output


def _features(T, h, w, C=16, seed=0):
    return torch.randn(T * h * w, C, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("grid", [(1, 1, 1), (2, 3, 4), (5, 2, 2)])
@pytest.mark.parametrize("budget", [1, 3, 7, 100])
@pytest.mark.parametrize("per_frame", [False, True])
def test_counts_are_known_from_the_grid(grid, budget, per_frame):
    features = _features(*grid, seed=budget)
    for policy in (KeepAttended(budget, per_frame=per_frame), MergeClusters(budget, k=3, per_frame=per_frame)):
        out, origin = check_output(policy(features, grid), features, grid)
        assert out.shape[0] == policy.num_tokens(grid), policy
        if per_frame:  # the same number of tokens in every frame
            frames = torch.bincount(origin // (grid[1] * grid[2]), minlength=grid[0])
            assert torch.all(frames == policy.num_tokens(grid) // grid[0])


def test_keep_attended_keeps_the_most_attended_tokens():
    T, h, w = 2, 3, 3
    x = _features(T, h, w, seed=4)
    attention = torch.softmax(x @ x.T / x.shape[1] ** 0.5, -1).sum(0)  # dense oracle: column sums
    out, origin = KeepAttended(5)(x, (T, h, w))
    assert origin.tolist() == sorted(attention.argsort(descending=True)[:5].tolist())
    assert torch.equal(out, x[origin])
    # per frame: each frame's own attention
    out, origin = KeepAttended(2, per_frame=True)(x, (T, h, w))
    want = []
    for t in range(T):
        xf = x[t * 9 : (t + 1) * 9]
        a = torch.softmax(xf @ xf.T / 4, -1).sum(0)
        want += sorted((a.argsort(descending=True)[:2] + 9 * t).tolist())
    assert origin.tolist() == want


def test_ties_keep_the_lower_positions():
    x = torch.ones(12, 8)
    assert KeepAttended(4)(x, (3, 2, 2))[1].tolist() == [0, 1, 2, 3]
    out, origin = MergeClusters(2, k=2)(x, (3, 2, 2))
    assert origin.tolist() == [0, 1] and out.shape == (2, 8)


def test_merge_components_joins_each_object():
    """Two objects, each a block of tokens with its own direction, over three frames."""
    T, h, w, C = 3, 2, 4, 8
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(C, generator=g), torch.randn(C, generator=g)
    left = torch.arange(h * w) % w < 2
    frame = torch.where(left[:, None], a, b)
    x = (frame[None] + 0.01 * torch.randn(T, h * w, C, generator=g)).reshape(-1, C)
    out, origin = check_output(MergeComponents(0.9)(x, (T, h, w)), x, (T, h, w))
    assert origin.tolist() == [0, 2]
    torch.testing.assert_close(out[0], x.view(T, h * w, C)[:, left].reshape(-1, C).mean(0))
    out, origin = MergeComponents(0.9, per_frame=True)(x, (T, h, w))
    assert origin.tolist() == [0, 2, 8, 10, 16, 18]


@pytest.mark.parametrize("make,match", [
    (lambda: KeepAttended(0), "tokens must be an int >= 1"),
    (lambda: KeepAttended(2.5), "tokens must be an int >= 1"),
    (lambda: MergeClusters(0), "clusters must be an int >= 1"),
    (lambda: MergeClusters(3, k=0), "k must be an int >= 1"),
    (lambda: MergeComponents(2.0), r"threshold must be a cosine in \[-1, 1\]"),
])
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()

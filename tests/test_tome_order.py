"""bipartite_merge(order="tome") against ToMe's bipartite soft matching re-derived step by step.

The oracle follows the semantics of facebookresearch/ToMe, tome/merge.py (bipartite_soft_matching with
class_token / distill_token, then merge_wavg and merge_source), written here from the paper (Bolya et
al., "Token Merging: Your ViT But Faster", ICLR 2023, Sec. 3) and that function's documented
behaviour, as tensor steps:

1. normalise the metric; A = tokens 0, 2, 4, ..., B = tokens 1, 3, 5, ...; scores = A B^T;
2. the class token (A[0]) scores -inf as a source, the distillation token (B[0]) -inf as a destination;
3. every A token's best B partner (node_max, node_idx); A tokens ranked by node_max, highest first;
   the first r merge (src), the others stay (unm), re-sorted by position when there is a class token;
4. merge_wavg: sum x * size and size into the destinations, divide;
5. output [unm[:1], dst[:1], unm[1:], dst[1:]] with a distillation token, else [unm, dst].

ToMe knows two protected tokens (class and distillation); vidtok's ``protect`` takes any number. The
oracle extends step 2 and 5 the one way that keeps ToMe's layout: the first protect tokens score
-inf (A ones as sources, B ones as destinations) and lead the output in position order. ToMe's
argsort and max do not fix an order for ties; vidtok's rule (ties to the lower position) is the one
the oracle spells out, and tied inputs are tested on purpose.
"""

import math

import pytest
import torch

import vidtok
from vidtok import reference as ref
from vidtok.testing import runnable_backends


def _first_argmax(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row max and the first column that reaches it (-inf rows: column 0, as ToMe's max would give)."""
    node_max = scores.max(dim=-1).values
    hit = scores == node_max[..., None]
    col = torch.arange(scores.shape[-1]).expand_as(scores)
    node_idx = torch.where(hit, col, scores.shape[-1]).min(dim=-1).values
    return node_max, node_idx.clamp_max(scores.shape[-1] - 1)


def tome_oracle(x, metric, size, r, protect):
    """ToMe's merge of x [B, N, C] (sizes [B, N]) with r merges and ``protect`` leading tokens.

    Returns (merged x [B, N - r, C], merged size [B, N - r], source [B, N - r, N]): source[j, n] = 1 when
    input token n is part of output j (ToMe's merge_source, which tracks exactly this).
    """
    B, N, C = x.shape
    eye = torch.eye(N, dtype=torch.float64).expand(B, N, N)
    if r <= 0:  # ToMe's do_nothing
        return x.double(), size.double(), eye.clone()
    n_pa, n_pb = (protect + 1) // 2, protect // 2  # protected tokens in A and in B
    # 1. cosine scores of A against B
    m = metric.double()
    m = m / m.norm(dim=-1, keepdim=True)
    a, b = m[:, ::2], m[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    # 2. protected tokens: never a source (A rows), never a destination (B columns)
    scores[:, :n_pa, :] = -math.inf
    scores[:, :, :n_pb] = -math.inf
    # 3. best partner of every A token; rank A by it, highest first (ties: lower position first)
    node_max, node_idx = _first_argmax(scores)
    edge_idx = torch.sort(node_max, dim=-1, descending=True, stable=True).indices
    unm_idx = edge_idx[:, r:]
    src_idx = edge_idx[:, :r]
    dst_idx = node_idx.gather(1, src_idx)
    if protect > 0:
        unm_idx = unm_idx.sort(dim=1).values

    def merge(t):  # ToMe's merge with mode "sum" on a [B, N, c] tensor
        src, dst = t[:, ::2], t[:, 1::2]
        c = t.shape[-1]
        unm = src.gather(1, unm_idx[..., None].expand(B, unm_idx.shape[1], c))
        moved = src.gather(1, src_idx[..., None].expand(B, r, c))
        dst = dst.scatter_reduce(1, dst_idx[..., None].expand(B, r, c), moved, reduce="sum")
        # 5. protected tokens first, in position order (ToMe: [unm[:1], dst[:1], unm[1:], dst[1:]])
        lead = [unm[:, i // 2 : i // 2 + 1] if i % 2 == 0 else dst[:, i // 2 : i // 2 + 1] for i in range(protect)]
        return torch.cat(lead + [unm[:, n_pa:], dst[:, n_pb:]], dim=1)

    # 4. merge_wavg: weights are the sizes
    s = size.double()[..., None]
    total = merge(s)
    out = merge(x.double() * s) / total
    return out, total[..., 0], merge(eye)


def _check(x, metric, size, r, protect, backend="reference"):
    merged = vidtok.bipartite_merge(x, r, metric=metric, size=size, protect=protect, order="tome", backend=backend)
    out, total, source = tome_oracle(x, metric, size, r, protect)
    B, N, _ = x.shape
    L = N - r
    membership = torch.zeros(B, L, N, dtype=torch.float64)
    membership.scatter_(1, merged.index.long()[:, None, :], 1.0)
    assert torch.equal(membership, source), f"r={r} protect={protect}: token order differs from ToMe's"
    torch.testing.assert_close(merged.x.double(), out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged.size.double(), total, atol=1e-6, rtol=1e-6)


def _caps(N, protect):
    """r values both ToMe (r <= (N - protect) // 2) and vidtok (max_merge) take."""
    return min((N - protect) // 2, ref.max_merge(N, protect))


@pytest.mark.parametrize("protect", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("N", [9, 12, 17])
def test_tome_order_for_every_protect_and_r(N, protect):
    g = torch.Generator().manual_seed(100 * N + protect)
    B, C, D = 3, 6, 5
    x = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    metric = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    size = torch.rand(B, N, generator=g, dtype=torch.float64) * 3 + 0.5
    for r in range(_caps(N, protect) + 1):
        _check(x, metric, size, r, protect)


@pytest.mark.parametrize("protect", [0, 1, 2, 3, 4])
def test_tome_order_with_ties(protect):
    """Repeated tokens: equal scores across A rows (ranking ties) and across B columns (partner ties)."""
    g = torch.Generator().manual_seed(7 + protect)
    B, N, D = 2, 15, 4
    # unit basis vectors (and one negated): every cosine is exactly 0, 1 or -1 however it is computed,
    # so the ties are exact for the oracle and for vidtok alike
    basis = torch.cat([torch.eye(D, dtype=torch.float64), -torch.eye(D, dtype=torch.float64)[:1]])
    metric = basis[torch.randint(0, D + 1, (B, N), generator=g)]
    x = torch.randn(B, N, 5, generator=g, dtype=torch.float64)
    size = torch.ones(B, N, dtype=torch.float64)
    for r in range(_caps(N, protect) + 1):
        _check(x, metric, size, r, protect)


def test_distillation_token_leads_the_unmerged_tokens():
    """The case the order is about: with class and distillation tokens, outputs 0 and 1 are those two."""
    x = torch.randn(1, 11, 4, generator=torch.Generator().manual_seed(0))
    merged = vidtok.bipartite_merge(x, 3, protect=2, order="tome")
    assert merged.origin[0, :2].tolist() == [0, 1]
    assert torch.equal(merged.x[0, :2], x[0, :2])
    assert merged.index[0, :2].tolist() == [0, 1]


@pytest.mark.parametrize("protect", [0, 2, 3])
def test_triton_follows_the_same_order(protect):
    backends = runnable_backends("bipartite_merge", "cpu", torch.float32)
    if "triton" not in backends:
        pytest.skip("the Triton backend cannot run here (no interpreter or GPU)")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 13, 8, generator=g)
    for r in (1, 3, _caps(13, protect)):
        ref_m = vidtok.bipartite_merge(x, r, protect=protect, order="tome", backend="reference")
        tri_m = vidtok.bipartite_merge(x, r, protect=protect, order="tome", backend="triton")
        assert torch.equal(ref_m.index, tri_m.index) and torch.equal(ref_m.origin, tri_m.origin)
        torch.testing.assert_close(tri_m.x, ref_m.x)

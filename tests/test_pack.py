"""vidtok.pack / vidtok.unpack: against boolean-indexing oracles, cu_seqlens layout, capacity (static
shapes, padding, too small is an error), keep-all identity through a gate, copy-forward fill,
gradients, bad input, opcheck of the row op, compile."""

import pytest
import torch

import vidtok
from vidtok.testing import real_clip


def _keep(shape, p=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < p


def _tokens(shape, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, D, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64], ids=str)
@pytest.mark.parametrize("shape", [(3, 10), (2, 3, 2, 4), (1, 1)], ids=str)
def test_matches_boolean_indexing(shape, dtype):
    keep = _keep(shape, seed=1)
    keep.view(shape[0], -1)[0, 0] = False
    tokens = _tokens(shape, 5, seed=2).mul(10).to(dtype)
    packed = vidtok.pack(tokens, keep)
    B = shape[0]
    flat_keep, flat_tok = keep.reshape(B, -1), tokens.reshape(B, -1, 5)
    assert torch.equal(packed.values, tokens[keep])  # (b, t, h, w) order
    counts = flat_keep.sum(1)
    assert packed.cu_seqlens.dtype == torch.int32
    assert torch.equal(packed.cu_seqlens, torch.cat([torch.zeros(1), counts.cumsum(0)]).int())
    assert packed.index.dtype == torch.int32
    assert torch.equal(packed.index.long(), flat_keep.nonzero()[:, 1])
    assert packed.max_seqlen >= int(counts.max()) and packed.shape == tuple(shape)
    for b in range(B):  # what flash-attn varlen reads: rows [cu[b], cu[b + 1]) are clip b's kept tokens
        rows = packed.values[packed.cu_seqlens[b] : packed.cu_seqlens[b + 1]]
        assert torch.equal(rows, flat_tok[b][flat_keep[b]])


def test_capacity_pads_and_too_small_is_an_error():
    keep = _keep((2, 12), seed=3)
    tokens = _tokens((2, 12), 4, seed=4)
    K = int(keep.sum())
    exact = vidtok.pack(tokens, keep)
    for capacity in (K, K + 5):
        padded = vidtok.pack(tokens, keep, capacity=capacity)
        assert padded.values.shape == (capacity, 4) and padded.index.shape == (capacity,)
        assert torch.equal(padded.values[:K], exact.values) and torch.equal(padded.index[:K], exact.index)
        assert torch.equal(padded.values[K:], torch.zeros(capacity - K, 4))
        assert (padded.index[K:] == -1).all()
        assert torch.equal(padded.cu_seqlens, exact.cu_seqlens)
        assert padded.max_seqlen == min(12, capacity)
        assert torch.equal(vidtok.unpack(padded, fill="zero"), vidtok.unpack(exact, fill="zero"))
    with pytest.raises(ValueError, match=f"capacity = {K - 1} is smaller than the kept count {K}"):
        vidtok.pack(tokens, keep, capacity=K - 1)


def test_unpack_zero_and_carry_fill():
    shape = (2, 5, 2, 3)
    keep = _keep(shape, p=0.4, seed=5)
    keep[:, 0] = True
    tokens = _tokens(shape, 3, seed=6)
    packed = vidtok.pack(tokens, keep)
    zero = vidtok.unpack(packed, fill="zero")
    assert torch.equal(zero, torch.where(keep[..., None], tokens, 0))
    carry = vidtok.unpack(packed)
    # copy-forward, written as a loop over time
    expected = tokens.clone()
    for t in range(1, shape[1]):
        expected[:, t] = torch.where(keep[:, t, ..., None], tokens[:, t], expected[:, t - 1])
    assert torch.equal(carry, expected)
    # a location with no kept token yet gets zeros under "carry"
    keep2 = keep.clone()
    keep2[0, :2, 0, 0] = False
    out = vidtok.unpack(vidtok.pack(tokens, keep2))
    assert torch.equal(out[0, :2, 0, 0], torch.zeros(2, 3))


def test_flat_tokens_carry_through_a_gate_and_keep_all_is_identity():
    video = real_clip("bigbuckbunny.mp4", max_frames=4)[:, :, :32, :32].unsqueeze(0)  # small crop
    tokens = _tokens((1, 4 * 2 * 2), 6, seed=7)
    everything = vidtok.motion_gate(video, 16, -1.0)
    packed = vidtok.pack(tokens, everything.keep.view(1, -1))
    assert torch.equal(packed.values, tokens[0])
    assert torch.equal(vidtok.unpack(packed, gate=everything), tokens)
    assert torch.equal(vidtok.unpack(packed, fill="zero"), tokens)

    gate = vidtok.motion_gate(video, 16, float("inf"))
    packed = vidtok.pack(tokens, gate.keep.view(1, -1))
    out = vidtok.unpack(packed, gate=gate)
    first = tokens.view(1, 4, 4, 6)[:, :1]
    assert torch.equal(out.view(1, 4, 4, 6), first.expand(1, 4, 4, 6))
    with pytest.raises(ValueError, match="needs the \\(t, h, w\\) structure"):
        vidtok.unpack(packed)


def test_gradients_flow_through_pack_and_unpack():
    shape = (2, 4, 2, 2)
    keep = _keep(shape, seed=8)
    keep[:, 0] = True
    tokens = _tokens(shape, 3, seed=9).double().requires_grad_()
    packed = vidtok.pack(tokens, keep)
    (g,) = torch.autograd.grad(packed.values.sum(), tokens)
    assert torch.equal(g, keep[..., None].double().expand_as(g))  # dropped tokens get no gradient

    def round_trip(t):
        return vidtok.unpack(vidtok.pack(t, keep, capacity=32))

    assert torch.autograd.gradcheck(round_trip, (tokens,))
    (g,) = torch.autograd.grad(round_trip(tokens).sum(), tokens)
    # a kept token's gradient counts the slots it stands for: its run length
    gate_runs = torch.zeros(shape, dtype=torch.float64)
    for b in range(2):
        for i in range(2):
            for j in range(2):
                kept_t = keep[b, :, i, j].nonzero().flatten().tolist() + [4]
                for a, z in zip(kept_t, kept_t[1:]):
                    gate_runs[b, a, i, j] = z - a
    assert torch.equal(g[..., 0], gate_runs)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: vidtok.pack(torch.zeros(2, 5, 3), torch.ones(2, 4, dtype=torch.bool)), ValueError, r"keep must have the tokens' leading shape \(2, 5\), got \(2, 4\)"),
        (lambda: vidtok.pack(torch.zeros(2, 5, 3), torch.ones(2, 5)), TypeError, "keep must be bool, got float32"),
        (lambda: vidtok.pack(torch.zeros(2, 5), torch.ones(2, dtype=torch.bool)), ValueError, r"tokens must be \[B, N, D\] or \[B, T', h, w, D\]"),
        (lambda: vidtok.pack(torch.zeros(2, 5, 3), torch.ones(2, 5, dtype=torch.bool), capacity=-1), ValueError, "capacity must be >= 0"),
        (lambda: vidtok.pack([1], torch.ones(2, 5, dtype=torch.bool)), TypeError, "tokens must be a torch.Tensor"),
        (lambda: vidtok.unpack((1, 2)), TypeError, "packed must be a vidtok.Packed"),
        (lambda: vidtok.unpack(vidtok.pack(torch.zeros(1, 2, 3), torch.ones(1, 2, dtype=torch.bool)), fill="mean"), ValueError, "fill must be"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_unpack_rejects_a_gate_of_another_shape():
    video = torch.zeros(1, 2, 1, 8, 8, dtype=torch.uint8)
    gate = vidtok.motion_gate(video, 4, 1.0)
    packed = vidtok.pack(torch.zeros(1, 6, 2), torch.ones(1, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="gate is for"):
        vidtok.unpack(packed, gate=gate)


def test_opcheck():
    keep = _keep((3, 7), seed=10)
    torch.library.opcheck(torch.ops.vidtok.pack_rows.default, (keep, 16))
    torch.library.opcheck(torch.ops.vidtok.pack_rows.default, (keep, -1))


def test_compiles_fullgraph_with_capacity_and_dynamic_count():
    torch._dynamo.reset()
    keep = _keep((2, 3, 2, 2), seed=11)
    keep[:, 0] = True
    tokens = _tokens((2, 3, 2, 2), 4, seed=12)

    def f(t, k):
        p = vidtok.pack(t * 2, k, capacity=24)
        return vidtok.unpack(p._replace(values=p.values + 1)), p.cu_seqlens

    compiled = torch.compile(f, fullgraph=True)
    for a, b in zip(compiled(tokens, keep), f(tokens, keep)):
        assert torch.equal(a, b)

    def g(t, k):
        return vidtok.pack(t, k).values.sum(0)

    torch.testing.assert_close(torch.compile(g, fullgraph=True)(tokens, keep), g(tokens, keep))


# ---------------------------------------------------------------------------------------------------
# the bridges to attention: Packed.padded / unpad and VideoLayout.from_packed


@pytest.mark.parametrize("capacity", [None, 40])
@pytest.mark.parametrize("seed", range(3))
def test_padded_lines_up_with_the_layouts_of_pack_and_keep(seed, capacity):
    """``packed.padded()`` puts clip b's kept tokens first in (t, h, w) order, then zeros, and
    ``VideoLayout.from_packed`` / ``from_keep`` place exactly those tokens at the same columns (one
    rank rule: vidtok._numerics.kept_rank); ``unpad`` brings a per-token result back row for row."""
    shape = (3, 2, 3, 4)
    keep = _keep(shape, p=0.4, seed=seed)
    keep[1] = False  # a clip that kept nothing
    tokens = _tokens(shape, 6, seed=seed)
    packed = vidtok.pack(tokens, keep, capacity=capacity)
    padded = packed.padded()
    counts = keep.reshape(3, -1).sum(1)
    assert padded.shape == (3, int(counts.max()), 6)
    for layout in (vidtok.VideoLayout.from_packed(packed, num_global=2), vidtok.VideoLayout.from_keep(keep, num_global=2)):
        assert torch.equal(layout.lengths, counts.int() + 2) and layout.num_tokens == padded.shape[1] + 2
        assert layout.grid == (2, 3, 4)
        for b in range(3):
            t, i, j = keep[b].nonzero().unbind(1)
            coords = layout.coords[b, 2 : 2 + int(counts[b])].long()
            assert torch.equal(coords, torch.stack([t, i, j], 1))
            assert torch.equal(padded[b, : int(counts[b])], tokens[b][keep[b]])
            assert not padded[b, int(counts[b]):].any()
            assert (layout.kind[b, 2 + int(counts[b]):] == 0).all()
    doubled = packed.unpad(padded * 2)
    assert torch.equal(doubled.values, packed.values * 2) and torch.equal(doubled.index, packed.index)
    assert torch.equal(vidtok.unpack(doubled, fill="zero"), vidtok.unpack(packed, fill="zero") * 2)


def test_padded_and_unpad_are_differentiable_and_check_their_input():
    keep = _keep((2, 7), seed=4)
    tokens = _tokens((2, 7), 3, seed=4).requires_grad_()
    packed = vidtok.pack(tokens, keep)
    y = packed.padded(length=9)
    assert y.shape == (2, 9, 3)
    vidtok.unpack(packed.unpad(y * 3), fill="zero").sum().backward()
    assert torch.equal(tokens.grad, 3 * keep[..., None].float().expand(2, 7, 3))
    with pytest.raises(ValueError, match="length = 1 is smaller than the largest kept count"):
        packed.padded(length=1)
    with pytest.raises(ValueError, match="must hold B = 2 clips"):
        packed.unpad(torch.zeros(3, 9, 3))
    with pytest.raises(TypeError, match="y must be a torch.Tensor"):
        packed.unpad(torch.zeros(2, 9))
    with pytest.raises(ValueError, match="flat"):
        vidtok.VideoLayout.from_packed(packed)
    assert vidtok.VideoLayout.from_packed(packed, grid=(1, 1, 7)).grid == (1, 1, 7)
    with pytest.raises(TypeError, match="packed must be a vidtok.Packed"):
        vidtok.VideoLayout.from_packed(keep)

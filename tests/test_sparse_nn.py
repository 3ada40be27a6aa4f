"""vidtok.nn.LearnableSparseMask: soft gate, sparsity loss, training path, hardening into a SparsePlan."""

import pytest
import torch

import vidtok
from vidtok import masks as M
from vidtok.nn import LearnableSparseMask
from vidtok.testing import sparse_truth_mask


def test_gate_bias_and_loss():
    mask = LearnableSparseMask(3, init=0.0)
    with torch.no_grad():
        mask.logits.copy_(torch.tensor([[5.0, -1.0, 0.0], [2.0, -9.0, 1.0], [0.5, 0.0, -3.0]]))
    m = torch.sigmoid(mask.logits.detach())
    expected = torch.where(torch.eye(3, dtype=torch.bool), 1.0, m)
    torch.testing.assert_close(mask.gate(), expected)
    torch.testing.assert_close(mask.log_gate(), expected.log())
    off = ~torch.eye(3, dtype=torch.bool)
    torch.testing.assert_close(mask.sparsity_loss(), m[off].mean())
    layout = vidtok.VideoLayout.from_keep(torch.tensor([[[[1, 0]], [[1, 1]], [[0, 1]]]], dtype=torch.bool), num_global=1)
    bias = mask.attention_bias(layout)[0, 0]  # tokens: global, (t0), (t1), (t1), (t2)
    t = torch.tensor([0, 0, 1, 1, 2])
    torch.testing.assert_close(bias[1:, 1:], expected.log()[t[1:, None], t[None, 1:]])
    assert torch.equal(bias[0], torch.zeros(5)) and torch.equal(bias[:, 0], torch.zeros(5))


def test_soft_gate_weighs_a_frame_as_its_gate():
    """bias = log m: a key frame gated by m counts as m times its weight (m = 1 is plain attention)."""
    layout = vidtok.VideoLayout.from_grid(2, 1, 3)
    mask = LearnableSparseMask(2, init=0.0)  # m = 0.5 between frames
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=g) for _ in range(3))
    out = mask(q, k, v, layout)
    s = q @ k.transpose(-1, -2) / 8**0.5
    gate = torch.tensor([[1.0, 0.5], [0.5, 1.0]]).repeat_interleave(3, 0).repeat_interleave(3, 1)
    w = torch.exp(s) * gate
    expected = (w / w.sum(-1, keepdim=True)) @ v
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_training_moves_gates_and_padding_gives_zero():
    torch.manual_seed(0)
    keep = torch.ones(2, 3, 2, 2, dtype=torch.bool)
    keep[1, 2] = False
    layout = vidtok.VideoLayout.from_keep(keep)
    mask = LearnableSparseMask(3)
    q, k, v = (torch.randn(2, 2, layout.num_tokens, 8) for _ in range(3))
    out = mask(q, k, v, layout)
    assert torch.equal(out[1, :, 8:], torch.zeros_like(out[1, :, 8:]))
    loss = out.square().mean() + 0.5 * mask.sparsity_loss()
    loss.backward()
    assert mask.logits.grad is not None and mask.logits.grad.abs().sum() > 0
    assert torch.equal(torch.diagonal(mask.logits.grad), torch.zeros(3))  # the diagonal is fixed


def test_harden_threshold_and_topk():
    mask = LearnableSparseMask(4)
    with torch.no_grad():
        mask.logits.copy_(torch.tensor([
            [0.0, 3.0, -3.0, 1.0],
            [1.0, 0.0, 1.0, -2.0],  # a tie between frames 0 and 2: the lower index wins
            [-5.0, -5.0, 0.0, -5.0],
            [2.0, 2.5, 0.1, 0.0],
        ]))
    keep = mask.keep(threshold=0.5)
    assert keep.tolist() == [[True, True, False, True], [True, True, True, False], [False, False, True, False], [True, True, True, True]]
    top2 = mask.keep(topk=2)
    assert top2.tolist() == [[True, True, False, False], [True, True, False, False], [True, False, True, False], [False, True, False, True]]
    layout = vidtok.VideoLayout.from_grid(4, 2, 4, num_global=2, batch=2)
    plan = mask.harden(layout, topk=2, block=(16, 16))
    spec = M.frame_pairs(top2) | M.global_tokens()
    assert torch.equal(plan.to_dense(), sparse_truth_mask(layout, spec))
    assert plan.density < 0.7
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, layout.num_tokens, 8, generator=g) for _ in range(3))
    out = vidtok.sparse_attention(q, k, v, plan)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=plan.to_sdpa_mask())
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("call,error,match", [
    (lambda m, lay: m.keep(), ValueError, "exactly one of threshold"),
    (lambda m, lay: m.keep(threshold=0.5, topk=1), ValueError, "exactly one of threshold"),
    (lambda m, lay: m.keep(topk=4), ValueError, r"topk must be an int in \[1, 3\]"),
    (lambda m, lay: m.keep(threshold=1.5), ValueError, r"threshold must be in \[0, 1\]"),
    (lambda m, lay: m.harden(vidtok.VideoLayout.from_grid(2, 2, 2), topk=1), ValueError, "T = 2 frames but the mask was made for num_frames = 3"),
    (lambda m, lay: m.attention_bias("layout"), TypeError, "layout must be a vidtok.VideoLayout"),
    (lambda m, lay: LearnableSparseMask(0), ValueError, "num_frames must be an int >= 1"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(LearnableSparseMask(3), vidtok.VideoLayout.from_grid(3, 2, 2))

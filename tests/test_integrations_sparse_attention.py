"""vidtok.integrations.transformers.apply_sparse_attention on tiny random-weight VideoMAE and ViViT
models (offline).

VideoMAE's attention layers dispatch through transformers' AttentionInterface, and its tokens are a
video's tubelets in (t, h, w) order, so ``VideoLayout.from_grid`` describes them. The oracle is dense
SDPA with the plan's mask (and log sizes), registered as another attention implementation.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import vidtok  # noqa: E402
from vidtok import masks  # noqa: E402
from vidtok.integrations import transformers as vt  # noqa: E402

FRAMES, SIZE, PATCH, TUBELET = 4, 32, 8, 2
GRID = (FRAMES // TUBELET, SIZE // PATCH, SIZE // PATCH)  # 2 x 4 x 4 = 32 tokens
BLOCK = (16, 16)


def _model(**overrides):
    torch.manual_seed(0)
    config = transformers.VideoMAEConfig(
        image_size=SIZE, patch_size=PATCH, num_frames=FRAMES, tubelet_size=TUBELET, hidden_size=32,
        num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **overrides,
    )
    return transformers.VideoMAEModel(config).eval()


def _video(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, FRAMES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _run_with_oracle(model, plan, video):
    """The model's output with dense SDPA under the plan's mask (+ kv_log_size) as its attention."""

    def oracle(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        B = query.shape[0]
        mask = plan.to_dense()[:, None].expand(B, -1, -1, -1)
        bias = torch.zeros(mask.shape, dtype=query.dtype)
        if plan.layout.kv_log_size is not None:
            bias = bias + plan.layout.kv_log_size[:, None, None, :]
        bias = bias.masked_fill(~mask, float("-inf"))
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scaling)
        return out.transpose(1, 2), None

    saved = model.config._attn_implementation
    transformers.AttentionInterface.register("vidtok_test_oracle", oracle)
    model.config._attn_implementation = "vidtok_test_oracle"
    try:
        return model(video).last_hidden_state
    finally:
        model.config._attn_implementation = saved
        transformers.AttentionInterface._global_mapping.pop("vidtok_test_oracle")


def test_all_pairs_spec_equals_the_dense_model():
    model, video = _model(), _video()
    dense = model(video).last_hidden_state
    layout = vidtok.VideoLayout.from_grid(*GRID)
    vt.apply_sparse_attention(model, layout, masks.temporal_window(GRID[0], GRID[0]), block=BLOCK)
    torch.testing.assert_close(model(video).last_hidden_state, dense, atol=2e-5, rtol=1e-5)


def test_sparse_spec_equals_masked_sdpa_output_and_gradients():
    model = _model()
    model.train()  # no dropout configured: the gradients of a fine-tuning step
    for module in model.modules():
        if hasattr(module, "scaling"):
            module.scaling = 0.3  # not the default head_dim ** -0.5: the layer's own scale must be passed on
    layout = vidtok.VideoLayout.from_grid(*GRID)
    spec = masks.frame_local() & masks.spatial_window(3, 3)
    plan = vidtok.build_plan(layout, spec, block=BLOCK)
    assert 0 < plan.density < 0.5
    video = _video().requires_grad_()
    want = _run_with_oracle(model, plan, video)
    want_grads = torch.autograd.grad(want.square().sum(), [video, *model.parameters()])
    vt.apply_sparse_attention(model, layout, spec, block=BLOCK)
    got = model(video).last_hidden_state
    got_grads = torch.autograd.grad(got.square().sum(), [video, *model.parameters()])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    dense = _model()(video.detach()).last_hidden_state
    assert (got - dense).abs().max() > 1e-2  # the mask matters


def test_a_cls_token_is_a_global_token():
    """ViViT: [CLS] then the tubelets in (t, h, w) order, i.e. from_grid(..., num_global=1)."""
    torch.manual_seed(0)
    config = transformers.VivitConfig(
        image_size=SIZE, num_frames=FRAMES, tubelet_size=[TUBELET, PATCH, PATCH], hidden_size=32,
        num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    )
    model, video = transformers.VivitModel(config).eval(), _video()
    layout = vidtok.VideoLayout.from_grid(*GRID, num_global=1)
    spec = masks.frame_local() & masks.spatial_window(3, 3) | masks.global_tokens()
    want = _run_with_oracle(model, vidtok.build_plan(layout, spec, block=BLOCK), video)
    vt.apply_sparse_attention(model, layout, spec, block=BLOCK)
    torch.testing.assert_close(model(video).last_hidden_state, want, atol=2e-5, rtol=1e-5)


def test_key_log_sizes_are_added_to_the_logits():
    model, video = _model(), _video()
    layout = vidtok.VideoLayout.from_grid(*GRID)
    sizes = torch.randint(1, 5, (1, layout.num_tokens), generator=torch.Generator().manual_seed(3)).float()
    layout = dataclasses.replace(layout, kv_log_size=sizes.log())
    spec = masks.temporal_window(1, 0)
    want = _run_with_oracle(model, vidtok.build_plan(layout.expand(2), spec, block=BLOCK), video)
    vt.apply_sparse_attention(model, layout, spec, block=BLOCK)
    torch.testing.assert_close(model(video).last_hidden_state, want, atol=2e-5, rtol=1e-5)


def test_a_one_sequence_layout_serves_any_batch():
    model, video = _model(), _video(batch=3)
    vt.apply_sparse_attention(model, vidtok.VideoLayout.from_grid(*GRID), masks.neighborhood((1, 3, 3)), block=BLOCK)
    batched = model(video).last_hidden_state
    for b in range(3):
        torch.testing.assert_close(model(video[b : b + 1]).last_hidden_state, batched[b : b + 1], atol=2e-5, rtol=1e-5)


def test_compiles_fullgraph_once_the_plan_is_built():
    model, video = _model(), _video()
    vt.apply_sparse_attention(model, vidtok.VideoLayout.from_grid(*GRID), masks.frame_local(), block=BLOCK)
    eager = model(video).last_hidden_state  # builds the plan for this batch size
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(video).last_hidden_state, eager, atol=1e-5, rtol=1e-5)


def test_remove_restores_the_model_and_reapplying_replaces():
    model, video = _model(), _video()
    dense = model(video).last_hidden_state
    before = model.config._attn_implementation
    layout = vidtok.VideoLayout.from_grid(*GRID)
    vt.apply_sparse_attention(model, layout, masks.frame_local(), block=BLOCK)
    vt.apply_sparse_attention(model, layout, masks.temporal_window(1, 1), block=BLOCK)  # replaces
    name = model.config._attn_implementation
    assert name != before and name in transformers.AttentionInterface._global_mapping
    assert vt.remove_sparse_attention(model) is model
    assert model.config._attn_implementation == before
    assert name not in transformers.AttentionInterface._global_mapping
    torch.testing.assert_close(model(video).last_hidden_state, dense)
    assert vt.remove_sparse_attention(model) is model  # not applied: unchanged


def test_bad_input():
    model = _model()
    layout = vidtok.VideoLayout.from_grid(*GRID)
    with pytest.raises(TypeError, match="transformers model"):
        vt.apply_sparse_attention(torch.nn.Linear(2, 2), layout, masks.frame_local())
    with pytest.raises(TypeError, match="layout must be a vidtok.VideoLayout"):
        vt.apply_sparse_attention(model, GRID, masks.frame_local())
    with pytest.raises(TypeError, match="spec must be a vidtok.masks spec"):
        vt.apply_sparse_attention(model, layout, "frame_local")
    assert not hasattr(model, vt._SPARSE_STATE)  # a refused call changes nothing
    # the layout must be the layers' token sequence
    vt.apply_sparse_attention(model, vidtok.VideoLayout.from_grid(GRID[0] + 1, *GRID[1:]), masks.frame_local(), block=BLOCK)
    with pytest.raises(ValueError, match="plan was built for a layout"):
        model(_video())
    vt.apply_sparse_attention(model, vidtok.VideoLayout.from_grid(*GRID, batch=2), masks.frame_local(), block=BLOCK)
    with pytest.raises(ValueError, match="holds 2 sequences"):
        model(_video(batch=3))
    # options the op lacks are refused, not approximated
    vt.apply_sparse_attention(model, layout, masks.frame_local(), block=BLOCK)
    attention = transformers.AttentionInterface._global_mapping[model.config._attn_implementation]
    q = torch.randn(1, 4, layout.num_tokens, 8)
    with pytest.raises(ValueError, match="attention_mask"):
        attention(model, q, q, q, torch.ones(1, 1, layout.num_tokens, layout.num_tokens, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\['sliding_window'\]"):
        attention(model, q, q, q, None, sliding_window=4, is_causal=False)
    assert attention(model, q, q, q, None, sliding_window=None, is_causal=False)[0].shape == (1, layout.num_tokens, 4, 8)
    # attention dropout would be silently dropped: refused
    dropping = _model(attention_probs_dropout_prob=0.1).train()
    vt.apply_sparse_attention(dropping, layout, masks.frame_local(), block=BLOCK)
    with pytest.raises(ValueError, match="no attention dropout"):
        dropping(_video())
    dropping.eval()(_video())  # fine at inference

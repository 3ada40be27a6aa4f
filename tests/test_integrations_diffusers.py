"""vidtok.integrations.diffusers on tiny random-weight Wan, CogVideoX and HunyuanVideo transformers
built from configs (no downloads): at full density the output equals the model's own (dense SDPA),
a sparse plan changes exactly the attention, removing restores the model."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import vidtok  # noqa: E402
from vidtok import masks as M  # noqa: E402
from vidtok.integrations import diffusers as vd  # noqa: E402

# latents: Wan and HunyuanVideo [B, C, F, H, W], CogVideoX [B, F, C, H, W]; 3 x 8 x 8 latents with
# 2 x 2 patches: a 3 x 4 x 4 token grid
GRID = (3, 8, 8)


def _tiny(family, batch=1):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    common = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4)
    if family == "wan":
        model = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), text_dim=32, freq_dim=16, ffn_dim=64, num_layers=2,
                                                rope_max_seq_len=32, **common)
        args = dict(hidden_states=torch.randn(batch, 4, *GRID, generator=g), encoder_hidden_states=torch.randn(batch, 5, 32, generator=g))
        layout = vd.video_layout(model, GRID, cube=(1, 2, 4))
    elif family == "cogvideox":
        model = diffusers.CogVideoXTransformer3DModel(time_embed_dim=16, text_embed_dim=32, num_layers=2, sample_width=8,
                                                      sample_height=8, sample_frames=9, patch_size=2, max_text_seq_length=7, **common)
        args = dict(hidden_states=torch.randn(batch, 3, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(batch, 7, 32, generator=g))
        layout = vd.video_layout(model, GRID)
    else:
        model = diffusers.HunyuanVideoTransformer3DModel(num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2,
                                                         patch_size_t=1, text_embed_dim=32, pooled_projection_dim=16,
                                                         rope_axes_dim=(4, 6, 6), **common)
        mask = torch.ones(batch, 6, dtype=torch.long)
        mask[:, 4:] = 0  # two padded text tokens: the model masks them as keys
        args = dict(hidden_states=torch.randn(batch, 4, *GRID, generator=g), encoder_hidden_states=torch.randn(batch, 6, 32, generator=g),
                    encoder_attention_mask=mask, pooled_projections=torch.randn(batch, 16, generator=g), guidance=torch.tensor([3.0] * batch))
        layout = vd.video_layout(model, GRID, text_tokens=6, cube=(1, 4, 4))
    return model.eval(), dict(args, timestep=torch.tensor([10] * batch)), layout


def _run(model, args):
    with torch.no_grad():
        return model(**args).sample


FAMILIES = ["wan", "cogvideox", "hunyuan_video"]


@pytest.mark.parametrize("family", FAMILIES)
def test_full_density_equals_the_model_and_remove_restores_it(family):
    model, args, layout = _tiny(family, batch=2)
    want = _run(model, args)
    processors = {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}
    for settings in (dict(spec=M.all_pairs()), dict(topk=64, block=(16, 16)), dict(top_p=1.0, block=(16, 16)),
                     dict(head_specs=[M.all_pairs(), M.all_pairs()], block=(16, 16))):
        vd.apply_sparse_attention(model, layout, **settings)
        wrapped = [m for m in model.modules() if type(getattr(m, "processor", None)).__name__.startswith("VidtokSparse")]
        assert len(wrapped) == {"wan": 2, "cogvideox": 2, "hunyuan_video": 2}[family]
        torch.testing.assert_close(_run(model, args), want, atol=2e-5, rtol=1e-4, msg=str(settings))
    vd.remove_sparse_attention(model)
    assert {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")} == processors
    assert torch.equal(_run(model, args), want)
    vd.remove_sparse_attention(model)  # a second remove changes nothing


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_plan_runs_the_masked_attention(family, monkeypatch):
    """A sparse spec: the model equals the same model whose attention is dense SDPA with the plan's
    mask in the model's token order (text padding as the model masks it); top-k plans differ from
    dense attention and run."""
    model, args, layout = _tiny(family)
    spec = M.neighborhood((1, 3, 3)) | M.global_tokens()
    vd.apply_sparse_attention(model, layout, spec, block=(16, 16))
    got = _run(model, args)

    def masked_sdpa(q, k, v, plan, *, scale=None, kv_log_size=None):
        mask = plan.layout.unpermute(plan.layout.unpermute(plan.to_sdpa_mask(), dim=-1), dim=-2)
        bias = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float("-inf"))
        if kv_log_size is not None:
            bias = bias + plan.layout.unpermute(kv_log_size, dim=-1)[:, None, None, :]
        src = [plan.layout.unpermute(x) for x in (q, k, v)]
        return plan.layout.permute(torch.nn.functional.scaled_dot_product_attention(*src, attn_mask=bias, scale=scale))

    monkeypatch.setattr(vd._sparse, "sparse_attention", masked_sdpa)
    torch.testing.assert_close(got, _run(model, args), atol=2e-5, rtol=1e-4)
    monkeypatch.undo()
    dense = _run(vd.remove_sparse_attention(model), args)
    assert not torch.allclose(got, dense, atol=1e-4)
    vd.apply_sparse_attention(model, layout, topk=1, always=M.global_tokens(), block=(16, 16))
    sparse = _run(model, args)
    assert torch.isfinite(sparse).all() and not torch.allclose(sparse, dense, atol=1e-4)


def test_video_layout_places_text_and_counts_patches():
    wan, _, _ = _tiny("wan")
    cog, _, _ = _tiny("cogvideox")
    hy, _, _ = _tiny("hunyuan_video")
    assert vd.video_layout(wan, (3, 8, 8)).grid == (3, 4, 4) and vd.video_layout(wan, (3, 8, 8)).num_global == 0
    layout = vd.video_layout(cog, (3, 8, 8))
    assert layout.num_global == 7 and (layout.kind[0, :7] == 2).all()
    layout = vd.video_layout(hy, (3, 8, 8), text_tokens=6)
    assert (layout.kind[0, -6:] == 2).all() and layout.num_tokens == 54
    with pytest.raises(ValueError, match="pass text_tokens"):
        vd.video_layout(hy, (3, 8, 8))
    with pytest.raises(ValueError, match="multiple of the patch size 2"):
        vd.video_layout(cog, (3, 7, 8))
    with pytest.raises(TypeError, match="WanTransformer3DModel, CogVideoXTransformer3DModel or HunyuanVideoTransformer3DModel"):
        vd.video_layout(torch.nn.Linear(2, 2), (3, 8, 8))


def test_bad_settings_and_wrong_token_counts():
    model, args, layout = _tiny("wan")
    with pytest.raises(ValueError, match="exactly one of spec"):
        vd.apply_sparse_attention(model, layout)
    with pytest.raises(ValueError, match="exactly one of spec"):
        vd.apply_sparse_attention(model, layout, M.all_pairs(), topk=2)
    with pytest.raises(TypeError, match="layout must be a vidtok.VideoLayout"):
        vd.apply_sparse_attention(model, (3, 4, 4), M.all_pairs())
    vd.apply_sparse_attention(model, vd.video_layout(model, (2, 8, 8)), M.all_pairs(), block=(16, 16))
    with pytest.raises(ValueError, match="the layout holds 32 tokens: build it for these latents"):
        _run(model, args)
    vd.remove_sparse_attention(model)

"""vidtok.integrations.timm: ToMe (Bolya et al., ICLR 2023) inside timm VisionTransformers.

Models are built from configs with random weights (no downloads). Every test but the first needs an
importable timm and skips cleanly otherwise: timm imports torchvision, which fails to import beside
the CPU build torch 2.13.0 (PyPI's torchvision is a CUDA build: "operator torchvision::nms does not
exist"); a torch/torchvision pair such as 2.14.1/0.29.1 runs them.
"""

from __future__ import annotations

import copy
import statistics
import subprocess
import sys
import textwrap
import time

import pytest
import torch


@pytest.fixture(scope="module")
def tt():
    try:
        pytest.importorskip("timm")
    except RuntimeError as e:  # timm is installed but its torchvision does not match torch
        pytest.skip(f"timm cannot be imported here: {e}")
    from vidtok.integrations import timm as tt

    return tt


def _vit(depth=4, embed_dim=64, num_heads=4, img_size=64, patch_size=8, num_classes=10, **kw):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                             num_heads=num_heads, num_classes=num_classes, **kw).eval()


def _images(batch=2, size=64):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _token_counts(model, fn):
    """Tokens entering each block, and leaving the last one, during fn()."""
    counts = []
    hooks = [b.register_forward_pre_hook(lambda m, a: counts.append(a[0].shape[1])) for b in model.blocks]
    hooks.append(model.blocks[-1].register_forward_hook(lambda m, a, out: counts.append(out.shape[1])))
    try:
        fn()
    finally:
        for h in hooks:
            h.remove()
    return counts


def test_import_without_timm_is_lazy_and_says_what_to_install():
    # A fresh interpreter where "import timm" fails: vidtok.integrations still imports.
    code = textwrap.dedent("""
        import sys
        sys.modules["timm"] = None  # makes "import timm" raise ImportError
        import vidtok.integrations as integrations
        try:
            integrations.timm
        except ImportError as e:
            assert "pip install timm" in str(e), e
            print("ok")
        else:
            raise SystemExit("no ImportError")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_r0_is_the_identity_and_remove_restores(tt):
    model, x = _vit(), _images()
    with torch.no_grad():
        ref = model(x)
        tt.apply_tome(model, 0)
        assert tt.is_applied(model)
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-6)
        assert tt.token_sizes(model) is None  # nothing merged
        tt.apply_tome(model, 8)
        assert not torch.allclose(model(x), ref, atol=1e-4)
        tt.remove(model)
        assert not tt.is_applied(model)
        assert torch.equal(model(x), ref)
    # the instances have no leftover attributes: the class methods are back
    for block in model.blocks:
        assert "forward" not in block.__dict__ and "forward" not in block.attn.qkv.__dict__
    assert "pool" not in model.__dict__ and "set_grad_checkpointing" not in model.__dict__
    tt.remove(model)  # removing twice is a no-op


def test_fewer_tokens_per_block_and_sizes(tt):
    model, x = _vit(), _images()
    tt.apply_tome(model, 8)
    with torch.no_grad():
        counts = _token_counts(model, lambda: model(x))
    assert counts == [65, 57, 49, 41, 33]  # 1 class token + 8x8 patches, 8 fewer after every block
    sizes = tt.token_sizes(model)
    assert sizes.shape == (2, 33)
    torch.testing.assert_close(sizes.sum(1), torch.full((2,), 65.0))
    assert torch.all(sizes[:, 0] == 1)  # the class token never merges

    # a per-block schedule, and the most each block can merge
    tt.apply_tome(model, [0, 4, 0, 2])
    with torch.no_grad():
        assert _token_counts(model, lambda: model(x)) == [65, 65, 61, 61, 59]
    # 65 tokens: A = 33 even positions minus the class token -> at most 32 merge (ToMe: (65-1)//2)
    tt.apply_tome(model, [32, 16, 8, 4])
    with torch.no_grad():
        assert _token_counts(model, lambda: model(x)) == [65, 33, 17, 9, 5]


def test_r_larger_than_a_block_can_merge_is_an_error_not_a_clamp(tt):
    """ToMe clamps r silently per block; vidtok names the block, its N and its cap: at apply_tome for
    a fixed input size, else at the forward that would clamp (a model with dynamic image sizes)."""
    model, x = _vit(), _images()
    with pytest.raises(ValueError, match=r"block 0 gets N = 65 tokens \(1 protected\) and can merge at most 32, but r = 200"):
        tt.apply_tome(model, 200)
    with pytest.raises(ValueError, match=r"block 1 gets N = 33 tokens .* at most 16, but r = 17"):
        tt.apply_tome(model, [32, 17, 0, 0])
    assert not tt.is_applied(model)  # a refused schedule patches nothing
    tt.apply_tome(model, 8)
    model.patch_embed.dynamic_img_size = True  # the count is only known at the forward
    tt.apply_tome(model, 40)
    with pytest.raises(ValueError, match="block 0 gets N = 65 tokens"):
        with torch.no_grad():
            model(x)


def test_distillation_token_is_protected(tt):
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(0)
    model = VisionTransformerDistilled(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                                       num_classes=10).eval()
    assert model.num_prefix_tokens == 2
    tt.apply_tome(model, [32, 16])
    with torch.no_grad():
        counts = _token_counts(model, lambda: model(_images()))
        out = model(_images())
    # 66 tokens: A = 33 even positions minus the class token, B[0] (distillation) receives nothing
    assert counts == [66, 34, 18]
    assert out.shape == (2, 10)
    assert torch.all(tt.token_sizes(model)[:, :2] == 1)


def test_video_tokens_through_the_blocks(tt):
    # A video ViT flattening T*N tokens: [B, 1 + T*N, C] goes through model.blocks as one sequence.
    model = _vit(depth=3)
    T, N, C = 4, 16, 64
    tokens = torch.randn(2, 1 + T * N, C, generator=torch.Generator().manual_seed(2))
    tt.apply_tome(model, 12)
    with torch.no_grad():
        out = model.blocks(tokens)
    assert out.shape == (2, 1 + T * N - 3 * 12, C)
    torch.testing.assert_close(tt.token_sizes(model).sum(1), torch.full((2,), 1.0 + T * N))


@pytest.mark.parametrize("proportional", [True, False])
def test_proportional_attention_is_attention_over_duplicated_keys(tt, proportional):
    # Block 0 merges, block 1 does not: block 1 with proportional attention must equal the plain timm
    # block run on a sequence where every token is repeated size times (ToMe Sec. 3), read at the
    # first copy of each token. Without proportional attention it is the plain block on the tokens.
    from timm.models.vision_transformer import Block

    model = _vit(depth=2, embed_dim=32, num_heads=2, img_size=32).double()
    seen = {}
    model.blocks[1].register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0]))
    model.blocks[1].register_forward_hook(lambda m, a, out: seen.__setitem__("out", out))
    tt.apply_tome(model, [6, 0], proportional_attention=proportional)
    with torch.no_grad():
        model(_images(batch=1, size=32).double())
        x_in, out = seen["in"], seen["out"]
        size = tt.token_sizes(model)[0].long()
        assert x_in.shape[1] == 17 - 6 and int(size.max()) > 1
        if proportional:
            x_dup = x_in.repeat_interleave(size, dim=1)
            first = torch.cumsum(size, 0) - size
            expected = Block.forward(model.blocks[1], x_dup)[:, first]
        else:
            expected = Block.forward(model.blocks[1], x_in)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_avg_pool_is_size_weighted(tt):
    model, x = _vit(global_pool="avg", class_token=False), _images()
    tt.apply_tome(model, 8)
    with torch.no_grad():
        feats = model.forward_features(x)
        s = tt.token_sizes(model)[..., None]
        expected = model.head(model.fc_norm((feats * s).sum(1) / s.sum(1)))
        torch.testing.assert_close(model.forward_head(feats), expected)
        assert model(x).shape == (2, 10)


def test_autograd_and_deepcopy(tt):
    model, x = _vit(), _images()
    tt.apply_tome(model, 8)
    model.train()
    model(x).logsumexp(-1).sum().backward()
    for name in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.3.mlp.fc1.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    model.eval()
    clone = copy.deepcopy(model)  # the patches are bound methods: the clone is patched on its own
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x))
        assert clone.blocks[0].forward.__self__ is clone.blocks[0]
        tt.remove(clone)
        assert tt.is_applied(model) and not tt.is_applied(clone)
    with torch.inference_mode():
        assert model(x).shape == (2, 10)


def test_bad_input(tt):
    from timm.models.vision_transformer import ResPostBlock

    model = _vit()
    with pytest.raises(ValueError, match="r must be >= 0"):
        tt.apply_tome(model, -1)
    with pytest.raises(ValueError, match=r"r\[1\] must be >= 0"):
        tt.apply_tome(model, [0, -2, 0, 0])
    with pytest.raises(ValueError, match="one int per block"):
        tt.apply_tome(model, [1, 2])
    with pytest.raises(TypeError, match="r must be an int"):
        tt.apply_tome(model, 2.5)
    with pytest.raises(TypeError, match="proportional_attention"):
        tt.apply_tome(model, 2, proportional_attention=None)
    with pytest.raises(TypeError, match="VisionTransformer"):
        tt.apply_tome(torch.nn.Sequential(torch.nn.Linear(4, 4)), 2)
    with pytest.raises(TypeError, match="ResPostBlock"):
        tt.apply_tome(_vit(block_fn=ResPostBlock), 2)
    with pytest.raises(ValueError, match="token_sizes"):
        tt.token_sizes(model)
    assert not tt.is_applied(model)

    tt.apply_tome(model, 4)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="attn_mask"):
        with torch.no_grad():
            model(_images(), attn_mask=torch.ones(65, 65, dtype=torch.bool))
    tt.remove(model)
    model.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        tt.apply_tome(model, 4)


def test_merging_makes_the_forward_faster(tt):
    # ViT-S width (384, 6 heads) at depth 4, 224x224, batch 2, r = 32 per block: 197 -> 69 tokens.
    # One thread and per-thread CPU time, interleaved, median of 5: robust to other processes on a
    # shared 2-core machine. Measured here (torch 2.14.1, x86 CPU, 1 thread): 89 -> 65 ms (1.37x);
    # r = 16: 86 -> 75 ms (1.15x). Expected from token counts alone ~1.55x and ~1.19x.
    model = _vit(depth=4, embed_dim=384, num_heads=6, img_size=224, patch_size=16)
    x = _images(batch=2, size=224)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = {0: [], 32: []}
        with torch.inference_mode():
            for r in times:  # warm-up
                tt.apply_tome(model, r)
                model(x)
            for _ in range(5):
                for r in times:
                    tt.apply_tome(model, r)
                    start = time.thread_time()
                    model(x)
                    times[r].append(time.thread_time() - start)
    finally:
        torch.set_num_threads(threads)
    base, merged = statistics.median(times[0]), statistics.median(times[32])
    assert base / merged > 1.15, f"r=0 {base * 1e3:.1f} ms, r=32 {merged * 1e3:.1f} ms"

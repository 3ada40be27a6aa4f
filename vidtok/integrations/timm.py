"""timm: ToMe token merging inside a ``timm`` VisionTransformer, on vidtok's ``bipartite_merge``.

Follows Bolya et al., "Token Merging: Your ViT But Faster" (ICLR 2023), re-derived from the paper
(ToMe's own code is CC-BY-NC and is not used). In every block of the model:

1. attention runs on the block's tokens; with proportional attention every key j's logits get
   ``+ log s_j`` (s_j = how many input patches token j stands for), i.e. softmax(QK^T / sqrt(d) + log s),
   which is exactly attention over a sequence where token j appears s_j times (paper Sec. 3);
2. after the attention residual and before the MLP, ``r`` tokens merge by bipartite soft matching
   (``vidtok.bipartite_merge``) on the attention keys averaged over heads, as a size-weighted mean
   (``mode="wmean"``), and the sizes are carried to the next block;
3. the prefix tokens (class token, DeiT's distillation token, register tokens:
   ``model.num_prefix_tokens``) never merge and stay first. The other tokens stay in their input
   order (``order="keep"``): a merged token sits at the position of its destination token.

Usage::

    import timm
    from vidtok.integrations.timm import apply_tome, remove, token_sizes

    model = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    apply_tome(model, 16)            # 16 tokens fewer after every block (or a list, one r per block)
    logits = model(images)           # [B, num_classes], as before
    token_sizes(model)               # [B, L] sizes of the tokens the last block returned
    remove(model)                    # back to the original forward methods

No clamping: a block can remove at most ``vidtok.reference.max_merge(N, num_prefix_tokens)`` tokens,
where N is the number of tokens entering it (the unprotected tokens at even positions, set A,
provided an unprotected odd-position token can receive them). ToMe clamps a larger r silently per
block; vidtok raises a ValueError naming the block, its N and its cap instead: at ``apply_tome`` for
a model with a fixed input size (the schedule is checked block by block), else at the forward that
would clamp. The cap depends only on shapes: no host sync is added.

Video ViTs: merging is global over whatever sequence the blocks see, which is how the ToMe paper
ran Spatiotemporal-MAE ViT-L on video (16 frames, 2x16x16 tubes: 8 x 196 = 1568 tokens, merged across
space and time; 2.2x faster at a 0.2-0.3 % accuracy drop). A video model built from timm's
VisionTransformer that embeds a clip into ``[B, prefix + T*N, C]`` tokens (a tubelet patch embedding
and a T*N positional embedding) and runs ``model.blocks`` on them gets the same treatment: call
``apply_tome`` on the model and either call the model or feed the flattened tokens to
``model.blocks(tokens)`` yourself. Tokens of all frames may merge with one another; the kept
tokens remain in (t, h, w) order, and ``token_sizes`` tells how many patches each represents.
Choose r for the T*N sequence (a user of ToMe's code reports 2x inference on ViT-L video at r = 65
per block: facebookresearch/ToMe issue #35).

What is patched, on this instance only (no timm class is modified): ``forward`` of every
``model.blocks[i]`` (a timm ``Block``), ``forward`` of its ``attn.qkv`` (to read the keys the
attention computes: no extra matmul), and ``model.pool`` for ``global_pool`` "avg"/"avgmax", which
becomes the size-weighted mean (the mean over the original patches; "max" and "token" pooling need no
weights), and ``model.set_grad_checkpointing``, which refuses to turn checkpointing on. ``remove``
deletes these instance attributes, restoring the exact original behaviour. The patches are bound
methods, so ``copy.deepcopy`` of a patched model yields an independent patched model.

Limits: the blocks must run in order starting from ``model.blocks[0]`` (the first block resets the
sizes); ``attn_mask``/``is_causal`` cannot be combined with merging (a ValueError says so);
gradient checkpointing (``set_grad_checkpointing``) is refused, since the recomputation would
see the sizes of a later block; ``global_pool="map"`` (attention pooling) and
``forward_intermediates``' grid layouts see merged tokens without size weights / cannot be reshaped.
Autograd: the merge is differentiable in the tokens (the matching is not, as in ToMe), so
training with merging works (ToMe fine-tunes MAE models this way).
"""

from __future__ import annotations

import types
from typing import Sequence

import torch

try:  # timm is an optional dependency; importing this module without it must say what to install.
    from timm.models.vision_transformer import Attention as _Attention
    from timm.models.vision_transformer import Block as _Block
    from timm.models.vision_transformer import VisionTransformer as _VisionTransformer
except ImportError as e:
    if (e.name or "").split(".")[0] == "timm":
        raise ImportError("vidtok.integrations.timm needs timm: pip install timm") from e
    raise ImportError(f"vidtok.integrations.timm: timm is installed but failed to import ({e}); "
                      "pip install timm with what it needs (torchvision built for this torch)") from e
except RuntimeError as e:
    # Seen with torch 2.13.0+cpu and PyPI's torchvision 0.28.0 (a CUDA build): timm imports
    # torchvision at import time, and torchvision fails with "operator torchvision::nms does not exist".
    raise ImportError(
        "vidtok.integrations.timm: timm is installed but failed to import, most likely because its "
        f"torchvision does not match the installed torch build ({e}); pip install a torch/torchvision "
        "pair built together (e.g. torch==2.14.1 torchvision==0.29.1) and timm"
    ) from e

from vidtok.merge import bipartite_merge
from vidtok.reference import max_merge

__all__ = ["apply_tome", "is_applied", "remove", "token_sizes"]

_STATE = "_vidtok_tome"


class _State:
    """What one forward shares between the blocks: sizes of the current tokens and the keys metric."""

    def __init__(self, proportional_attention: bool, protect: int):
        self.proportional_attention = proportional_attention
        self.protect = protect
        self.size: torch.Tensor | None = None  # [B, L] (fp32), None while nothing has merged
        self.metric: torch.Tensor | None = None  # [B, L, head_dim]: the keys averaged over heads


class _BlockPatch:
    """One block's settings. A plain object (not an nn.Module), so no submodule or parameter is added."""

    def __init__(self, state: _State, r: int, index: int, attn):
        self.state = state
        self.r = r
        self.index = index
        self.first = index == 0
        self.attn = attn
        self.capture = False  # set by the block just before its attention: store the metric?
        self.saved: dict = {}


class _ModelPatch:
    def __init__(self, state: _State, r: list[int]):
        self.state = state
        self.r = r
        self.saved: dict = {}
        self.patched: list[str] = []  # the model's methods overridden on the instance


# ---------------------------------------------------------------------------------------------------
# public API


def apply_tome(model, r: int | Sequence[int], *, proportional_attention: bool = True):
    """Merge tokens inside ``model``'s blocks (ToMe, Bolya et al., ICLR 2023); returns ``model``.

    Args:
        model: a ``timm.models.vision_transformer.VisionTransformer`` (or a subclass such as DeiT's
            ``VisionTransformerDistilled``) whose blocks are timm ``Block`` with timm ``Attention``.
        r: tokens each block removes: an int (the same for every block) or a sequence with one int
            per block (``len(model.blocks)``). Never clamped: an r larger than what a block can
            merge is a ValueError (module docstring). r = 0 everywhere leaves the outputs unchanged.
        proportional_attention: add ``log(size)`` of every key to the attention logits (ToMe's
            default for supervised ViTs; ToMe turns it off for MAE models).

    Shapes: the model's inputs and outputs keep their shapes (``[B, 3, H, W]`` -> ``[B, classes]``);
    inside, block i maps ``[B, N_i, C]`` to ``[B, N_i - r_i, C]``. Applying to a patched model
    replaces its settings. Raises TypeError for another model or block type, ValueError for a
    negative r, a schedule of the wrong length or one that a block cannot merge (checked here when
    the model's input size is fixed), or a model using gradient checkpointing.
    """
    blocks = _check_model(model)
    schedule = _parse_r(r, len(blocks))
    if not isinstance(proportional_attention, bool):
        raise TypeError(f"proportional_attention must be a bool, got {type(proportional_attention).__name__}")
    if getattr(model, "grad_checkpointing", False):
        raise ValueError("apply_tome: gradient checkpointing is on (model.set_grad_checkpointing(False) first): "
                         "the recomputed blocks would see the token sizes of a later block")
    _check_schedule(model, schedule)
    remove(model)
    state = _State(proportional_attention, int(model.num_prefix_tokens))
    patch = _ModelPatch(state, schedule)
    for i, (block, r_i) in enumerate(zip(blocks, schedule)):
        bp = _BlockPatch(state, r_i, i, block.attn)
        _override(block, "forward", _block_forward, bp.saved)
        _override(block.attn.qkv, "forward", _qkv_forward, bp.saved, key="qkv.forward")
        object.__setattr__(block, _STATE, bp)
        object.__setattr__(block.attn.qkv, _STATE, bp)
    if callable(getattr(type(model), "pool", None)):  # timm >= 1.0 pools in VisionTransformer.pool
        patch.patched.append("pool")
        _override(model, "pool", _pool, patch.saved)
    patch.patched.append("set_grad_checkpointing")
    _override(model, "set_grad_checkpointing", _set_grad_checkpointing, patch.saved)
    object.__setattr__(model, _STATE, patch)
    return model


def remove(model):
    """Undo ``apply_tome``: every patched ``forward``/``pool``/``set_grad_checkpointing`` is the one the instance had before
    (the class's method unless the instance already overrode it); returns ``model``. A model that is
    not patched is returned unchanged."""
    patch = model.__dict__.get(_STATE)
    if patch is None:
        return model
    for block in model.blocks:
        bp = block.__dict__.get(_STATE)
        if bp is None:
            continue
        _restore(block, "forward", bp.saved)
        _restore(block.attn.qkv, "forward", bp.saved, key="qkv.forward")
        del block.__dict__[_STATE]
        block.attn.qkv.__dict__.pop(_STATE, None)
    for name in patch.patched:
        _restore(model, name, patch.saved)
    del model.__dict__[_STATE]
    return model


def is_applied(model) -> bool:
    """Whether ``apply_tome`` patched this instance (and ``remove`` has not undone it)."""
    return _STATE in model.__dict__


def token_sizes(model) -> torch.Tensor | None:
    """Sizes ``[B, L]`` (float32) of the tokens the last block returned in the latest forward: how
    many input tokens (patches; 1 for each prefix token) each stands for; they sum to the input
    count. None when nothing has merged yet (all sizes 1). ToMe's size tracking, Bolya et al. 2023."""
    patch = model.__dict__.get(_STATE)
    if patch is None:
        raise ValueError("token_sizes: apply_tome has not been applied to this model")
    return patch.state.size


# ---------------------------------------------------------------------------------------------------
# checks


def _check_model(model):
    if not isinstance(model, _VisionTransformer):
        raise TypeError(
            "apply_tome needs a timm.models.vision_transformer.VisionTransformer, got "
            f"{type(model).__module__}.{type(model).__qualname__}"
        )
    blocks = list(model.blocks)
    for i, block in enumerate(blocks):
        # Exact forwards, not isinstance: a subclass overriding forward would lose its own behaviour.
        if not isinstance(block, _Block) or type(block).forward is not _Block.forward:
            raise TypeError(f"apply_tome supports timm's vision_transformer.Block, model.blocks[{i}] is "
                            f"{type(block).__module__}.{type(block).__qualname__}")
        attn = block.attn
        if not isinstance(attn, _Attention) or type(attn).forward is not _Attention.forward:
            raise TypeError(f"apply_tome supports timm's Attention, model.blocks[{i}].attn is "
                            f"{type(attn).__module__}.{type(attn).__qualname__}")
    return blocks


def _too_many(index: int, N: int, protect: int, r: int) -> str | None:
    """Why block ``index`` cannot remove r of N tokens (None: it can)."""
    cap = max_merge(N, protect)
    if r <= cap:
        return None
    return (f"apply_tome: block {index} gets N = {N} tokens ({protect} protected) and can merge at most {cap}, "
            f"but r = {r}; ToMe would clamp silently, vidtok does not: pass a smaller r or a per-block list")


def _check_schedule(model, schedule: list[int]) -> None:
    """For a model with a fixed input size, the token count entering every block is known: check r."""
    embed = getattr(model, "patch_embed", None)
    num_patches = getattr(embed, "num_patches", None)
    if not isinstance(num_patches, int) or getattr(embed, "dynamic_img_size", False) or getattr(model, "dynamic_img_size", False):
        return
    N = num_patches + int(model.num_prefix_tokens)
    for i, r_i in enumerate(schedule):
        if (why := _too_many(i, N, int(model.num_prefix_tokens), r_i)) is not None:
            raise ValueError(why)
        N -= r_i


def _parse_r(r, depth: int) -> list[int]:
    def one(value, name):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0 (tokens removed per block), got {value}")
        return value

    if isinstance(r, (list, tuple)):
        if len(r) != depth:
            raise ValueError(f"r as a schedule needs one int per block ({depth} blocks), got {len(r)} values")
        return [one(v, f"r[{i}]") for i, v in enumerate(r)]
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r must be an int or a list of {depth} ints, got {type(r).__name__}")
    return [one(r, "r")] * depth


def _override(module, name, fn, saved, key=None):
    # Only an instance-level override that existed before is saved; no entry means "the class's
    # method" (no sentinel object: it would not survive copy.deepcopy).
    if name in module.__dict__:
        saved[key or name] = module.__dict__[name]
    object.__setattr__(module, name, types.MethodType(fn, module))


def _restore(module, name, saved, key=None):
    if (key or name) in saved:
        object.__setattr__(module, name, saved[key or name])
    else:
        module.__dict__.pop(name, None)


def _call_saved(module, name, saved, key, *args, **kwargs):
    if key in saved:
        return saved[key](*args, **kwargs)
    return getattr(type(module), name)(module, *args, **kwargs)


# ---------------------------------------------------------------------------------------------------
# patched methods (bound to the instance with MethodType)


def _block_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
    """timm Block.forward with ToMe: attention (proportional), merge r tokens, MLP. [B, N, C] -> [B, N - r, C]."""
    bp = self.__dict__[_STATE]
    st = bp.state
    if bp.first:
        st.size = None  # a new forward: every token stands for itself
    B, N, _ = x.shape
    size = st.size
    if size is not None and tuple(size.shape) != (B, N):
        size = None  # the block was called outside the model's sequence: treat tokens as unmerged
    if (why := _too_many(bp.index, N, st.protect, bp.r)) is not None:
        raise ValueError(why)
    r = bp.r
    if attn_mask is not None or is_causal:
        if size is not None or r > 0:
            raise ValueError("apply_tome: attn_mask/is_causal cannot be combined with token merging "
                             "(the merged sequence no longer matches the mask); use r=0 or remove()")
    elif size is not None and st.proportional_attention:
        # Proportional attention (ToMe Sec. 3): + log s_j on every key, broadcast over heads and queries.
        attn_mask = torch.log(size).to(x.dtype)[:, None, None, :]
    bp.capture = r > 0
    try:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
    finally:
        bp.capture = False
    if r > 0:
        metric, st.metric = st.metric, None
        merged = bipartite_merge(x, r, metric=metric, size=size, protect=st.protect, mode="wmean", order="keep")
        x, size = merged.x, merged.size.detach()  # sizes are counts: no gradient (as in ToMe)
    x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
    st.size = size
    return x


def _qkv_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The attention's qkv Linear, unchanged, also keeping the keys averaged over heads: ToMe's
    matching metric ``[B, N, head_dim]`` (after ``k_norm``, as the attention uses them)."""
    bp = self.__dict__[_STATE]
    out = _call_saved(self, "forward", bp.saved, "qkv.forward", x)
    if bp.capture:
        attn = bp.attn
        with torch.no_grad():
            B, N, _ = out.shape
            k = out.reshape(B, N, 3, attn.num_heads, attn.head_dim)[:, :, 1]  # [B, N, H, head_dim]
            # k_norm normalises the last dim, so it gives the same on [B, N, H, d] as timm's [B, H, N, d].
            bp.state.metric = attn.k_norm(k).mean(2)
    return out


def _pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
    """VisionTransformer.pool with "avg"/"avgmax" weighted by token size (the mean over the original
    patches, as ToMe's MAE pooling); other pool types are the original. [B, L, C] -> [B, C]."""
    patch = self.__dict__[_STATE]
    size = patch.state.size
    kind = self.global_pool if pool_type is None else pool_type
    if (size is not None and getattr(self, "attn_pool", None) is None and kind in ("avg", "avgmax")
            and tuple(size.shape) == tuple(x.shape[:2])):
        start = 0 if getattr(self, "pool_include_prefix", False) else self.num_prefix_tokens
        t = x[:, start:]
        s = size[:, start:, None].to(x.dtype)
        avg = (t * s).sum(1) / s.sum(1)
        return avg if kind == "avg" else 0.5 * (t.amax(1) + avg)
    return _call_saved(self, "pool", patch.saved, "pool", x, pool_type)


def _set_grad_checkpointing(self, enable: bool = True):
    """VisionTransformer.set_grad_checkpointing, refusing to turn it on while merging is applied."""
    if enable:
        raise ValueError("apply_tome: gradient checkpointing cannot be turned on while tokens merge (the "
                         "recomputed blocks would see the token sizes of a later block); remove() first")
    return _call_saved(self, "set_grad_checkpointing", self.__dict__[_STATE].saved, "set_grad_checkpointing", enable)

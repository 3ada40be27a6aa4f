"""vidtok's sparse attention inside diffusers' video diffusion transformers (Wan 2.1, CogVideoX,
HunyuanVideo), without editing their code.

- ``video_layout(transformer, latent_grid, ...)``: the ``VideoLayout`` of a transformer's joint
  self-attention sequence for latents of a given size: its video tokens (the latent grid divided by
  the patch sizes) and, for CogVideoX (text first) and HunyuanVideo (text last), its text tokens as
  global tokens; optionally ordered cube by cube.
- ``apply_sparse_attention(transformer, layout, ...)`` / ``remove_sparse_attention(transformer)``:
  the self-attention layers run ``vidtok.sparse_attention`` on a static mask spec, on tiles chosen
  per head from the data (``vidtok.build_plan_topk``), or on a per-head choice between mask specs
  (``vidtok.classify_heads``).

How: each self-attention layer's processor is wrapped. The wrapper runs the model's own processor
(projections, QK norms, rotary embeddings, output projection: all unchanged) and replaces its one
``scaled_dot_product_attention`` call on the joint sequence with vidtok's: q, k and v are moved to
the layout's order (``layout.permute``), attended on the plan and moved back. diffusers' processors
reach that call through its attention dispatcher's "native" backend (the default) or call it
directly (CogVideoX); a layer on another backend (flash-attn, sage, ...) makes no such call and
raises. Cross-attention (Wan's text and image attention, HunyuanVideo's text token refiner) is left
alone.

Tested offline on tiny random-weight models built from configs (tests/test_integrations_diffusers.py):
with a plan that allows every pair the outputs equal the model's own, and removing restores it.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from vidtok import masks as _masks
from vidtok import sparse as _sparse

__all__ = ["apply_sparse_attention", "remove_sparse_attention", "video_layout"]

_STATE = "_vidtok_sparse_attention"


# The self-attention layers of each supported transformer, and where its text tokens sit.
def _family(transformer) -> str:
    name = type(transformer).__name__
    for family, cls in (("wan", "WanTransformer3DModel"), ("cogvideox", "CogVideoXTransformer3DModel"),
                        ("hunyuan_video", "HunyuanVideoTransformer3DModel")):
        if name == cls:
            return family
    raise TypeError(
        f"transformer must be a diffusers WanTransformer3DModel, CogVideoXTransformer3DModel or "
        f"HunyuanVideoTransformer3DModel, got {name}"
    )


def _self_attention_layers(transformer, family: str) -> list:
    if family == "wan":
        return [block.attn1 for block in transformer.blocks]
    if family == "cogvideox":
        return [block.attn1 for block in transformer.transformer_blocks]
    return [block.attn for block in transformer.transformer_blocks] + [block.attn for block in transformer.single_transformer_blocks]


def video_layout(transformer, latent_grid: tuple[int, int, int], *, text_tokens: int | None = None,
                 cube: tuple[int, int, int] | None = None) -> _sparse.VideoLayout:
    """The VideoLayout of ``transformer``'s self-attention sequence for latents of ``latent_grid`` =
    (F, H, W) latent frames, height and width (the transformer's input, after the VAE).

    The token grid is (F / patch_t, H / patch, W / patch). Text tokens, global tokens of the
    layout: none for Wan (its text is cross-attention); CogVideoX puts them first (``text_tokens``
    default: the config's ``max_text_seq_length``, what its pipelines pad to); HunyuanVideo last
    (``text_tokens`` required: the prompt embedding length, 256 in its pipeline; padded text tokens
    are masked out through the model's attention mask). ``cube``: order the video tokens cube by
    cube (``VideoLayout.from_grid``), so that 64-token tiles hold 4 x 4 x 4 cubes, as VSA does.
    """
    family = _family(transformer)
    config = transformer.config
    if not (isinstance(latent_grid, (tuple, list)) and len(latent_grid) == 3):
        raise TypeError(f"latent_grid must be (frames, height, width) of the latents, got {latent_grid!r}")
    if family == "wan":
        patch = tuple(config.patch_size)
    else:
        patch = (config.patch_size_t or 1, config.patch_size, config.patch_size)
    grid = []
    for name, size, p in zip(("frames", "height", "width"), latent_grid, patch):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % p:
            raise ValueError(f"latent {name} must be a positive multiple of the patch size {p}, got {size!r}")
        grid.append(size // p)
    if family == "wan":
        if text_tokens:
            raise ValueError("Wan's self-attention holds no text tokens (its text is cross-attention): leave text_tokens unset")
        return _sparse.VideoLayout.from_grid(*grid, cube=cube)
    if family == "cogvideox":
        text = config.max_text_seq_length if text_tokens is None else text_tokens
        return _sparse.VideoLayout.from_grid(*grid, num_global=text, global_at=0, cube=cube)
    if text_tokens is None:
        raise ValueError("HunyuanVideo's sequence ends with its text tokens: pass text_tokens (the prompt embedding length)")
    return _sparse.VideoLayout.from_grid(*grid, num_global=text_tokens, global_at=math.prod(grid), cube=cube)


@dataclass
class _Sparse:
    layout: _sparse.VideoLayout
    spec: _masks.MaskSpec | None
    topk: int | None
    top_p: float | None
    pool: tuple | None
    always: _masks.MaskSpec | None
    head_specs: list | None
    sample: int
    block: tuple
    layers: list = field(default_factory=list)  # (module, the processor it had)
    plans: dict = field(default_factory=dict)  # (device, batch, what) -> SparsePlan, built on first use

    def layout_for(self, device, batch: int) -> _sparse.VideoLayout:
        key = (device, batch, "layout")
        if key not in self.plans:
            layout = self.layout.to(device)
            self.plans[key] = layout if layout.batch == batch else layout.expand(batch)
        return self.plans[key]

    def static(self, layout: _sparse.VideoLayout, spec: _masks.MaskSpec, what) -> _sparse.SparsePlan:
        key = (layout.device, layout.batch, what)
        if key not in self.plans:
            self.plans[key] = _sparse.build_plan(layout, spec, block=self.block)
        return self.plans[key]

    def plan(self, q: torch.Tensor, k: torch.Tensor, layout: _sparse.VideoLayout) -> _sparse.SparsePlan:
        if self.spec is not None:
            return self.static(layout, self.spec, "spec")
        if self.head_specs is not None:
            plans = [self.static(layout, s, ("head", i)) for i, s in enumerate(self.head_specs)]
            choice = _sparse.classify_heads(q, k, layout, self.head_specs, sample=self.sample)
            return _sparse.per_head_plan(plans, choice)
        always = self.static(layout, ~_masks.all_pairs() if self.always is None else self.always, "always")
        return _sparse.build_plan_topk(q, k, layout, topk=self.topk, top_p=self.top_p, pool=self.pool, always=always)

    def attention(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        """scaled_dot_product_attention's arguments -> vidtok.sparse_attention on the layout's plan."""
        if dropout_p or is_causal:
            raise ValueError(f"vidtok sparse attention takes no dropout and no causal mask, got dropout_p={dropout_p}, is_causal={is_causal}")
        B, H, S, D = query.shape
        if S != self.layout.num_source_tokens or key.shape[-2] != S:
            raise ValueError(
                f"a self-attention layer attends {S} queries to {key.shape[-2]} keys, but the layout holds "
                f"{self.layout.num_source_tokens} tokens: build it for these latents (video_layout) and re-apply"
            )
        layout = self.layout_for(query.device, B)
        log_size = None if attn_mask is None else _key_bias(attn_mask, B, S, query.dtype)
        q, k, v = (layout.permute(x) for x in (query, key, value))
        if log_size is not None:
            log_size = layout.permute(log_size, dim=-1)
        out = _sparse.sparse_attention(q, k, v, self.plan(q, k, layout), scale=scale, kv_log_size=log_size)
        return layout.unpermute(out)


def _key_bias(mask: torch.Tensor, B: int, S: int, dtype) -> torch.Tensor:
    """float [B, S]: a key-padding mask ([B or 1, 1, 1, S], bool or additive, as HunyuanVideo passes its
    text padding) as one additive bias per key (-inf: masked). Other masks cannot be a plan's bias."""
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 or mask.shape[3] != S or mask.shape[0] not in (1, B):
        raise ValueError(
            f"vidtok sparse attention takes a key-padding attention mask [B, 1, 1, {S}] only, got shape {tuple(mask.shape)}"
        )
    mask = mask[:, 0, 0].expand(B, S)
    if mask.dtype == torch.bool:
        return torch.zeros(B, S, dtype=torch.float32, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.float()


class _Intercept(TorchFunctionMode):
    """Routes ``scaled_dot_product_attention`` calls to vidtok; every other torch call runs as is."""

    def __init__(self, state: _Sparse):
        super().__init__()
        self.state, self.calls = state, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls += 1
            return self.state.attention(*args, **kwargs)
        return func(*args, **kwargs)


class _SparseProcessor:
    """Runs the wrapped processor with its attention call routed to vidtok (a subclass per wrapped
    processor class carries that class's call signature, which diffusers reads to pass arguments)."""

    def __init__(self, inner, state: _Sparse):
        self.inner, self.state = inner, state

    def _call(self, attn, *args, **kwargs):
        mode = _Intercept(self.state)
        with mode:
            out = self.inner(attn, *args, **kwargs)
        if mode.calls != 1:
            raise RuntimeError(
                f"{type(self.inner).__name__} made {mode.calls} scaled_dot_product_attention calls, vidtok expects one: "
                "run the model on diffusers' native attention backend (the default) to use vidtok sparse attention"
            )
        return out

    def __getattr__(self, name):  # the wrapped processor's settings (its attention backend, ...)
        if name in ("inner", "state"):
            raise AttributeError(name)
        return getattr(self.inner, name)


_WRAPPERS: dict = {}


def _wrap(processor, state: _Sparse) -> _SparseProcessor:
    cls = type(processor)
    if cls not in _WRAPPERS:
        def __call__(self, attn, *args, **kwargs):
            return self._call(attn, *args, **kwargs)

        __call__.__signature__ = inspect.signature(cls.__call__)
        _WRAPPERS[cls] = type(f"VidtokSparse{cls.__name__}", (_SparseProcessor,), {"__call__": __call__})
    return _WRAPPERS[cls](processor, state)


def apply_sparse_attention(
    transformer,
    layout: _sparse.VideoLayout,
    spec: _masks.MaskSpec | None = None,
    *,
    topk: int | None = None,
    top_p: float | None = None,
    pool: tuple[int, int, int] | None = None,
    always: _masks.MaskSpec | None = None,
    head_specs=None,
    sample: int = 64,
    block: tuple[int, int] = (64, 64),
):
    """Run the self-attention layers of a diffusers video transformer as ``vidtok.sparse_attention``;
    returns ``transformer`` (changed in place).

    Args:
        transformer: a diffusers ``WanTransformer3DModel``, ``CogVideoXTransformer3DModel`` or
            ``HunyuanVideoTransformer3DModel`` (the family's self-attention layers: Wan's ``attn1``,
            CogVideoX's ``attn1``, HunyuanVideo's dual- and single-stream ``attn``).
        layout: the VideoLayout of their token sequence, from ``video_layout(transformer,
            latent_grid, ...)`` (one sequence serves any batch). Its token count must match the
            latents the model then runs on.
        Exactly one way to choose the attended pairs:
        spec: a static mask spec (e.g. ``masks.neighborhood((3, 7, 7)) | masks.global_tokens()``),
            one plan per device and batch size, built on first use.
        topk / top_p (+ pool, always): per layer call, per head, the key tiles of highest coarse
            attention (``vidtok.build_plan_topk``; ``always`` e.g. ``masks.cube_window(cube) |
            masks.global_tokens()``, the diagonal and the text tokens, planned once).
        head_specs: a list of specs, one chosen per head and call from ``sample`` of its queries
            (``vidtok.classify_heads``, Sparse VideoGen's online profiling), e.g.
            ``vidtok.default_head_specs(layout.grid)``.
        block: the plan's (BQ, BK) tiles (a cube-ordered layout's cube volume, for whole cubes).

    HunyuanVideo's text-padding mask becomes a per-key bias (-inf on padded text tokens), the
    model's other layers and arguments are untouched. Applying again replaces the settings.
    Dynamic plans (topk, top_p, head_specs) are built on the device without host syncs; static
    plans are built once with host syncs. Attention dropout and causal masks raise.
    """
    family = _family(transformer)
    if not isinstance(layout, _sparse.VideoLayout):
        raise TypeError(f"layout must be a vidtok.VideoLayout (video_layout(transformer, latent_grid)), got {type(layout).__name__}")
    if layout.batch != 1:
        raise ValueError(f"layout must hold one sequence (it serves every batch), got {layout.batch}")
    ways = [spec is not None, topk is not None or top_p is not None, head_specs is not None]
    if sum(ways) != 1:
        raise ValueError("apply_sparse_attention takes exactly one of spec=..., topk=/top_p=... or head_specs=...")
    if spec is not None and not isinstance(spec, _masks.MaskSpec):
        raise TypeError(f"spec must be a vidtok.masks spec, got {type(spec).__name__}")
    head_specs = None if head_specs is None else list(head_specs)
    state = _Sparse(layout, spec, topk, top_p, pool, always, head_specs, sample, tuple(block))
    # fail now, not in the first denoising step: the static plans and a dynamic plan on zeros
    if spec is not None:
        state.static(layout, spec, "spec")
    else:
        zeros = torch.zeros(1, 1, layout.num_tokens, 16, device=layout.device)
        state.plan(zeros, zeros, layout)
    remove_sparse_attention(transformer)
    for module in _self_attention_layers(transformer, family):
        state.layers.append((module, module.processor))
        module.processor = _wrap(module.processor, state)
    object.__setattr__(transformer, _STATE, state)
    return transformer


def remove_sparse_attention(transformer):
    """Undo ``apply_sparse_attention``: every wrapped layer gets back the processor it had; returns
    ``transformer``. Unchanged if it was not applied."""
    state = transformer.__dict__.get(_STATE)
    if state is None:
        return transformer
    for module, processor in state.layers:
        module.processor = processor
    del transformer.__dict__[_STATE]
    return transformer

"""Plug vidtok into the models people already run, without editing those models' code.

- ``vidtok.integrations.policies``: the policy contract (what happens to one video's tokens) and the
  ready-made policies ``KeepAll``, ``DropStatic`` (threshold EVS / DyCoke-style), ``MergeTemporal``
  (``vidtok.temporal_merge``), ``SelectFrames`` (DPP / MMR / uniform frame selection), the exact-count
  ``EVS(q)`` (the serving engines' rule) and ``Budget(total)`` (``allocate_budget`` + ``topk_per_frame``),
  whose token counts are known from the grid before any encoder runs, and the importance-aware
  ``KeepAttended`` (attention received), ``MergeClusters`` (DPC-kNN) and ``MergeComponents``
  (LLaVA-Scissor's connected components).
- ``vidtok.integrations.transformers``: ``apply(model, policy)`` / ``remove(model)`` for Hugging Face
  Qwen2-VL, Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision (``video_token_counts``: the prompt tokens of each
  video from the config alone); ``apply_sparse_attention(model, layout, spec)`` /
  ``remove_sparse_attention(model)``: ``vidtok.sparse_attention`` in the attention layers of any model
  that dispatches through transformers' AttentionInterface (VideoMAE, ViViT, V-JEPA 2, ViT, ...).
- ``vidtok.integrations.timm``: ``apply_tome(model, r)`` / ``remove(model)``, ToMe token merging
  inside a timm VisionTransformer (Bolya et al., ICLR 2023) on ``vidtok.bipartite_merge``.
- ``vidtok.integrations.diffusers``: ``video_layout(transformer, latent_grid)``,
  ``apply_sparse_attention(transformer, layout, ...)`` / ``remove_sparse_attention(transformer)``:
  static, top-k or per-head sparse attention in diffusers' Wan, CogVideoX and HunyuanVideo
  transformers, through their attention processors.

They are imported on first access, so ``import vidtok`` never imports transformers, timm or diffusers; without
the library, accessing the submodule raises an ImportError saying what to ``pip install``.
"""

from __future__ import annotations

import importlib

from vidtok.integrations.policies import (
    EVS, Budget, DropStatic, KeepAll, KeepAttended, MergeClusters, MergeComponents, MergeTemporal, Policy, SelectFrames,
)

__all__ = ["Budget", "DropStatic", "EVS", "KeepAll", "KeepAttended", "MergeClusters", "MergeComponents", "MergeTemporal",
           "Policy", "SelectFrames", "diffusers", "policies", "timm", "transformers"]


def __getattr__(name: str):
    if name in ("diffusers", "timm", "transformers"):
        return importlib.import_module(f"vidtok.integrations.{name}")
    raise AttributeError(f"module 'vidtok.integrations' has no attribute {name!r}")

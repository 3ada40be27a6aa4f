"""Plug vidtok into the models people already run, without editing those models' code.

- ``vidtok.integrations.policies``: the policy contract (what happens to one video's tokens) and the
  ready-made policies ``KeepAll`` and ``DropStatic``.
- ``vidtok.integrations.transformers``: ``apply(model, policy)`` / ``remove(model)`` for Hugging Face
  Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision. Imported on first access, so ``import vidtok`` never
  imports transformers.
"""

from __future__ import annotations

import importlib

from vidtok.integrations.policies import DropStatic, KeepAll, Policy

__all__ = ["DropStatic", "KeepAll", "Policy", "policies", "transformers"]


def __getattr__(name: str):
    if name == "transformers":
        return importlib.import_module("vidtok.integrations.transformers")
    raise AttributeError(f"module 'vidtok.integrations' has no attribute {name!r}")

"""Numerics every layer shares: dtypes, accumulation, the cosine's eps, and the rank of kept tokens.

The bottom of vidtok's layers: it imports torch only, and every other module may import it.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# float64 is taken by the references (for gradcheck and fp64 oracles); kernels compute in fp32.
REFERENCE_DTYPES = FLOAT_DTYPES + (torch.float64,)

# torch.nn.functional.cosine_similarity's default eps: every cosine in vidtok is
# dot / (max(|a|, EPS) * max(|b|, EPS)), so a zero vector gives 0, never NaN.
EPS = 1e-8


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16- and 32-bit inputs; float64 stays float64 (for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """"float32" for torch.float32: how error messages name dtypes."""
    return str(dtype).replace("torch.", "")


def kept_rank(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one rule that orders kept tokens, shared by ``pack`` and ``VideoLayout``.

    keep: bool [B, N]. Returns (rank int64 [B, N], counts int64 [B]): a kept token's rank is the number
    of kept tokens before it in its row (an inclusive prefix sum minus one, never ``nonzero``, so
    there is no host sync); a dropped token's rank is -1. Kept tokens keep their (t, h, w) order.
    """
    rank = torch.where(keep, keep.long().cumsum(1) - 1, -1)
    return rank, keep.sum(1)

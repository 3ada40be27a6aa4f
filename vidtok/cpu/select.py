"""topk_per_frame tuned for CPUs: the ``cpu`` backend of vidtok.topk_per_frame.

The rule is the reference's (vidtok.reference.select.topk_per_frame: the higher score, then the lower
index; NaN as -inf). The reference sorts all frames at once, which is the faster way for short frames
(many frames of few tokens: no per-frame call). For long frames a sort does more work than needed:
there each frame's budgets[b, t]-th largest score comes from one ``torch.kthvalue`` call (a
linear-time selection), and the keep mask follows from these thresholds in one vectorised pass
(scores above the threshold, then the ties at it in index order), so ties never depend on the
library's order. Reading the budgets on the host is free on CPUs.
"""

from __future__ import annotations

import torch

from vidtok.reference import select as reference

# Frames of at least this many tokens take one kthvalue call each. Single-thread minima on CI's
# shared 2-core Xeon (bench/NOTES.md, topk_per_frame): a stable sort of 256 tokens ~40 us per frame,
# of 4096 tokens ~540 us; a kthvalue call ~17 us + ~25 ns per token: they cross between 256 and 576.
LOOP_FROM_N = 512


def topk_per_frame(scores: torch.Tensor, budgets: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep bool ``[B, T, N]``, index int32 ``[B, capacity]``), as the reference."""
    B, T, N = scores.shape
    if N < LOOP_FROM_N or B * T == 0:
        return reference.topk_per_frame(scores, budgets, capacity)
    s = scores.to(torch.float64 if scores.dtype == torch.float64 else torch.float32)
    s = torch.where(torch.isnan(s), float("-inf"), s)
    k = budgets.to(torch.int64)[..., None]
    # the k-th largest score of every frame is its (N - k + 1)-th smallest; +inf for k = 0 (nothing
    # is above it and no tie is taken)
    none = s.new_full((), float("inf"))
    rows = s.reshape(B * T, N)
    tops = [torch.kthvalue(row, N - kk + 1).values if kk else none for row, kk in zip(rows, k.reshape(-1).tolist())]
    threshold = torch.stack(tops).view(B, T, 1)
    above = s > threshold
    tied = s == threshold
    keep = above | (tied & (tied.cumsum(-1) <= k - above.sum(-1, keepdim=True)))
    return keep, reference.kept_index(keep, capacity)

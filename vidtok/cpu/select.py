"""topk_per_frame tuned for CPUs: the ``cpu`` backend of vidtok.topk_per_frame.

The rule is the reference's (vidtok.reference.select.topk_per_frame: the higher score, then the lower
index; NaN as -inf). The reference sorts every frame, O(N log N); picking a frame's budgets[b, t]-th
largest score with ``torch.kthvalue`` is a linear-time selection, but costs a call per frame. A
small cost model picks: frames of at least ``LOOP_FROM_N`` tokens take one ``kthvalue`` call each for
their threshold, shorter ones are sorted together. Either way the keep mask follows from the thresholds in
one vectorised pass (scores above it, then the ties at it in index order), so ties never depend on
``topk``'s order. Reading the budgets on the host is free on CPUs.
"""

from __future__ import annotations

import torch

from vidtok._numerics import accumulation_dtype
from vidtok.reference import select as reference

# Measured on CI's CPU, one thread (bench/NOTES.md, topk_per_frame): a kthvalue call costs ~10 us
# plus ~3 ns per token, the vectorised stable sort ~3 ns per token per log2 N: they cross near N = 512.
LOOP_FROM_N = 512


def topk_per_frame(scores: torch.Tensor, budgets: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep bool ``[B, T, N]``, index int32 ``[B, capacity]``), as the reference."""
    B, T, N = scores.shape
    if N < LOOP_FROM_N or B * T == 0:
        return reference.topk_per_frame(scores, budgets, capacity)
    s = scores.to(accumulation_dtype(scores.dtype))
    s = torch.where(torch.isnan(s), float("-inf"), s)
    rows = s.reshape(B * T, N)
    ks = budgets.reshape(-1).tolist()
    # the k-th largest score of every frame (the (N - k + 1)-th smallest: a quickselect, cheaper than
    # topk's partial sort); +inf (nothing above it, no tie to take) for k = 0
    none = s.new_full((), float("inf"))
    tops = [torch.kthvalue(row, N - k + 1).values if k else none for row, k in zip(rows, ks)]
    threshold = torch.stack(tops).view(B, T, 1)
    k = budgets.to(torch.int64)[..., None]
    above = s > threshold
    tied = s == threshold
    keep = above | (tied & (tied.cumsum(-1) <= k - above.sum(-1, keepdim=True)))
    return keep, reference.kept_index(keep, capacity)

"""topk_per_frame tuned for CPUs: the ``cpu`` backend of vidtok.topk_per_frame.

The rule is the reference's (vidtok.reference.select.topk_per_frame: the higher score, then the lower
index; NaN as -inf). The reference sorts every frame, which costs a full sort per frame. Here each
frame's threshold, its budgets[b, t]-th largest score, comes from one batched selection instead: every
frame is padded with kmax - k copies of +inf and k - kmin copies of -inf (kmax, kmin: the largest and
smallest budget), so that the kmax-th largest score of every padded frame is the k-th largest of the
frame, and one unsorted ``torch.topk(kmax)`` and a minimum give all thresholds (a linear-time
selection per frame, no sort). The keep mask follows in one vectorised pass: scores above the
threshold, then the ties at it in index order, so ties never depend on the library's order. Reading
the budgets' extremes on the host is free on CPUs. Frames shorter than SHORT_FRAME tokens take the
reference's sort, which is faster there.
"""

from __future__ import annotations

import torch

from vidtok.reference import select as reference

# Below this many tokens per frame the reference's one sort of all frames is faster than the padding
# and the selection (one thread, 8 x 4096 frames: 3.7 vs 4.2 ms at N = 4, 38 vs 37 ms at N = 32).
SHORT_FRAME = 32


def topk_per_frame(scores: torch.Tensor, budgets: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep bool ``[B, T, N]``, index int32 ``[B, capacity]``), as the reference."""
    B, T, N = scores.shape
    if N < SHORT_FRAME:
        return reference.topk_per_frame(scores, budgets, capacity)
    s = scores.to(torch.float64 if scores.dtype == torch.float64 else torch.float32)
    s = s.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    k = budgets.to(torch.int32).reshape(B * T, 1)
    kmax = int(k.max()) if k.numel() else 0
    if kmax == 0:
        keep = torch.zeros(B, T, N, dtype=torch.bool)
        return keep, reference.kept_index(keep, capacity)
    kmin = int(k.min())
    rows = s.reshape(B * T, N)
    if kmax > kmin:
        slot = torch.arange(kmax - kmin)
        rows = torch.cat([rows, torch.where(slot < kmax - k, float("inf"), float("-inf")).to(s.dtype)], dim=1)
    # a frame with k = 0 holds kmax copies of +inf: its threshold is +inf, above which nothing lies
    threshold = rows.topk(kmax, dim=1, sorted=False).values.amin(1).view(B, T, 1)
    k = k.view(B, T, 1)
    above = s > threshold
    tied = s == threshold
    need = k - above.sum(-1, keepdim=True, dtype=torch.int32)
    keep = above | (tied & (tied.cumsum(-1, dtype=torch.int32) <= need))
    return keep, reference.kept_index(keep, capacity)

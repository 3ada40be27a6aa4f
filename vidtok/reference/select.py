"""Reference implementations for similarity-based frame selection over cached frame embeddings.

Shapes: x ``[B, T, C]`` frame embeddings (B videos, T frames, C channels), queries ``[B, Q, C]``,
relevance ``[B, Q, T]``, adjacent similarity ``[B, T - 1]``. Cosines are computed as
``F.cosine_similarity`` does: dot / (max(|a|, eps) * max(|b|, eps)), eps = 1e-8, accumulated in fp32
(fp64 for fp64 inputs). Selection outputs are int32 frame indices sorted by time and padded with -1.

Every greedy loop below runs over the k selection steps only, vectorised over all (video, query)
problems and all frames; ties go to the higher gain, then the lower frame index (``torch.argmax``
returns the first maximum).
"""

from __future__ import annotations

import torch

from vidtok._numerics import EPS, accumulation_dtype


def _acc(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def valid_frames(lengths: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor:
    """bool [B, T]: frame t of video b is real (t < lengths[b]); all True without lengths."""
    if lengths is None:
        return torch.ones(B, T, dtype=torch.bool, device=device)
    return torch.arange(T, device=device) < lengths.to(device=device).reshape(B, 1)


def frame_scores(
    x: torch.Tensor,
    query: torch.Tensor | None = None,
    scale: float = 1.0,
    bias: float = 0.0,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(relevance, adjacent, norms): relevance[b, q, t] = scale * cos(x[b, t], query[b, q]) + bias; adjacent[b, t] = cos(x[b, t], x[b, t + 1]);
    norms[b, t] = |x[b, t]|. Frames at t >= lengths[b] are padding: relevance -inf, adjacent NaN for
    every pair that touches one, norms 0. Without a query, relevance is [B, 0, T]."""
    B, T, C = x.shape
    acc = accumulation_dtype(x.dtype)
    xf = x.to(acc)
    norms = torch.linalg.vector_norm(xf, dim=-1)
    clamped = norms.clamp_min(EPS)
    adjacent = torch.linalg.vecdot(xf[:, 1:], xf[:, :-1]) / (clamped[:, 1:] * clamped[:, :-1])
    if query is None:
        relevance = xf.new_empty(B, 0, T)
    else:
        qf = query.to(acc)
        qn = torch.linalg.vector_norm(qf, dim=-1).clamp_min(EPS)
        # One GEMM per video: a batched GEMM may block differently for different B, and a video's
        # scores must not depend on what else is in the batch.
        dots = torch.stack([qf[b] @ xf[b].T for b in range(B)]) if B else xf.new_empty(0, qf.shape[1], T)
        relevance = scale * (dots / (qn[:, :, None] * clamped[:, None, :])) + bias
    if lengths is not None:
        valid = valid_frames(lengths, B, T, x.device)
        relevance = relevance.masked_fill(~valid[:, None, :], float("-inf"))
        adjacent = adjacent.masked_fill(~valid[:, 1:], float("nan"))
        norms = norms.masked_fill(~valid, 0.0)
    return relevance, adjacent, norms


def unit_rows(x: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x / max(|x|, eps) [B, T, C], finite [B, T], norms [B, T]); rows with a NaN or inf become zero vectors."""
    xf = x.to(acc)
    norms = torch.linalg.vector_norm(xf, dim=-1)
    finite = torch.isfinite(norms)
    inv = torch.where(finite, norms.clamp_min(EPS).reciprocal(), torch.zeros_like(norms))
    return (xf * inv[..., None]).nan_to_num_(0.0, 0.0, 0.0), finite, norms  # dropped rows: inf * 0 = NaN -> 0


def sims_to(xn: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """[B, Q, T]: dot of every row of xn [B, T, C] with row j [B, Q, 1] of the same video (one batched
    GEMV per step; row-major x, so the pass over x is contiguous)."""
    B, _, C = xn.shape
    chosen = xn.gather(1, j.reshape(B, -1, 1).expand(B, j.shape[1], C))  # [B, Q, C]
    return torch.bmm(xn, chosen.transpose(1, 2)).transpose(1, 2)


def sort_by_time(picks: torch.Tensor, T: int, *extra: torch.Tensor):
    """Sort picks (-1 = none) ascending with the -1 padding last; permute ``extra`` alike."""
    key = torch.where(picks < 0, torch.full_like(picks, T), picks)
    key, order = torch.sort(key, dim=-1, stable=True)
    out = torch.where(key == T, torch.full_like(key, -1), key).to(torch.int32)
    return (out, *(e.gather(-1, order) for e in extra))


def candidate_pool(rel: torch.Tensor, eligible: torch.Tensor, pool: str, pool_top: int) -> torch.Tensor:
    """bool [B, Q, T]: the eligible frames left by ``pool``: all of them ("all"), those with relevance
    strictly above the eligible frames' mean ("above_mean", TASS), or the ``pool_top`` most relevant
    ("top", ties to the lower index)."""
    T = rel.shape[-1]
    if pool == "above_mean":
        count = eligible.sum(-1, keepdim=True).clamp_min(1)
        mean = torch.where(eligible, rel, torch.zeros_like(rel)).sum(-1, keepdim=True) / count
        eligible = eligible & (rel > mean)
    elif pool == "top":
        masked = torch.where(eligible, rel, torch.full_like(rel, float("-inf")))
        order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(T, device=rel.device).expand_as(order))
        eligible = eligible & (rank < pool_top)
    return eligible


def greedy_select(
    relevance: torch.Tensor,
    k: int,
    x: torch.Tensor | None = None,
    lam: float = 0.0,
    min_gap: float = 0.0,
    sim_thresh: float | None = None,
    pool: str = "all",
    pool_top: int = 0,
    timestamps: torch.Tensor | None = None,
) -> torch.Tensor:
    """k frames per (video, query) by greedy marginal gain; int32 [B, Q, k] sorted by time, -1 padded.

    Candidates are frames with finite relevance (and a finite embedding when x is given). The pool
    then keeps all of them ("all"), those with relevance strictly above the candidates' mean
    ("above_mean", TASS), or the ``pool_top`` most relevant ("top"). Step s picks the candidate with
    the highest gain = relevance - lam * max_{j chosen} cos(x_i, x_j) (MMR, Carbonell & Goldstein
    1998; the penalty is 0 at the first step), ties to the lower index. A pick then removes every
    candidate closer than min_gap to it (|t_i - t_j| < min_gap, in frames or in ``timestamps`` units)
    and, with sim_thresh, every candidate with cos > sim_thresh to it (ViLaMP-style NMS).
    """
    B, Q, T = relevance.shape
    if relevance.numel() == 0:  # no video, query or frame: nothing to choose, all padding
        return torch.full((B, Q, k), -1, dtype=torch.int32, device=relevance.device)
    acc = _acc(relevance, x, timestamps)
    rel = relevance.to(acc)
    eligible = torch.isfinite(rel)
    need_x = lam != 0.0 or sim_thresh is not None
    if need_x:
        xn, finite, _ = unit_rows(x, acc)
        eligible = eligible & finite[:, None, :]
    eligible = candidate_pool(rel, eligible, pool, pool_top)
    if min_gap > 0:
        pos = (timestamps.to(acc) if timestamps is not None else torch.arange(T, device=rel.device, dtype=acc).expand(B, T))
        pos = pos[:, None, :].expand(B, Q, T)
    max_sim = torch.zeros_like(rel)  # max cosine to the chosen frames; unused at step 0
    neg_inf = torch.full_like(rel, float("-inf"))
    picks = torch.full((B, Q, k), -1, dtype=torch.int64, device=rel.device)
    for step in range(k):
        gain = rel if (step == 0 or lam == 0.0) else rel - lam * max_sim
        j = torch.argmax(torch.where(eligible, gain, neg_inf), dim=-1, keepdim=True)  # [B, Q, 1]
        ok = eligible.gather(-1, j)
        picks[..., step : step + 1] = torch.where(ok, j, torch.full_like(j, -1))
        eligible = eligible.scatter(-1, j, False)
        if need_x:
            sims = sims_to(xn, j)  # [B, Q, T]: cosine of every frame to the pick
            max_sim = sims if step == 0 else torch.maximum(max_sim, sims)
            if sim_thresh is not None:
                eligible = eligible & ~(sims > sim_thresh)
        if min_gap > 0:
            eligible = eligible & ~((pos - pos.gather(-1, j)).abs() < min_gap)
    return sort_by_time(picks, T)[0]


def dpp_select(
    x: torch.Tensor, k: int, quality: torch.Tensor | None = None, eps: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy MAP of the DPP with kernel L = diag(q) S diag(q), S[i, j] = cos(x_i, x_j).

    Fast greedy MAP inference of Chen, Zhang & Zhou (NeurIPS 2018, Algorithm 1): every frame keeps
    d2_i = det(L_{S+i}) / det(L_S), the squared residual of its feature vector after projecting out
    the chosen ones, and a row c_i of the incremental Cholesky factor. Each step picks
    j = argmax d2 and updates e_i = (L_ji - <c_j, c_i>) / sqrt(d2_j), c_i <- [c_i, e_i],
    d2_i -= e_i^2: O(T * k) per step, L is never formed. A frame is a candidate while
    d2_i > eps * L_ii (its vector is not, to relative precision eps, in the span of the chosen ones);
    the selection stops early when no candidate is left, so an exact duplicate is never chosen twice.

    x [B, T, C]; quality [B, Q, T] (None: all ones, Q = 1). Frames with a non-finite embedding or
    quality, or zero quality or norm, are never chosen. Returns idx int32 [B, Q, k] sorted by time and
    padded with -1, and gains [B, Q, k] (fp32, fp64 for fp64 inputs): log d2 of each pick when it was
    made, 0 beside padding, so gains.sum(-1) is the log-determinant of L restricted to the chosen set.
    """
    B, T, _ = x.shape
    acc = _acc(x, quality)
    Q = 1 if quality is None else quality.shape[1]
    if B * Q * T == 0:  # no video, query or frame: nothing to choose, all padding
        return (torch.full((B, Q, k), -1, dtype=torch.int32, device=x.device),
                torch.zeros(B, Q, k, dtype=acc, device=x.device))
    xn, finite, norms = unit_rows(x, acc)
    q = torch.ones(B, 1, T, dtype=acc, device=x.device) if quality is None else quality.to(acc)
    q = torch.where(torch.isfinite(q), q, torch.zeros_like(q))
    # L_ii = q_i^2 exactly (S_ii = 1 for a nonzero frame, 0 for a zero or non-finite one), so equal
    # qualities tie exactly at the first step and go to the lower index
    diag = q.square() * (finite & (norms > 0)).to(acc)[:, None, :]  # [B, Q, T]
    d2 = diag.clone()
    eligible = d2 > eps * diag
    cf = torch.zeros(B, Q, k, T, dtype=acc, device=x.device)  # cf[..., s, i] = c_i[s]
    picks = torch.full((B, Q, k), -1, dtype=torch.int64, device=x.device)
    gains = torch.zeros(B, Q, k, dtype=acc, device=x.device)
    neg_inf = torch.full_like(d2, float("-inf"))
    for step in range(k):
        j = torch.argmax(torch.where(eligible, d2, neg_inf), dim=-1, keepdim=True)  # [B, Q, 1]
        ok = eligible.gather(-1, j)
        dj = d2.gather(-1, j)
        picks[..., step : step + 1] = torch.where(ok, j, torch.full_like(j, -1))
        gains[..., step : step + 1] = torch.where(ok, dj.clamp_min(torch.finfo(acc).tiny).log(), torch.zeros_like(dj))
        l_row = q.gather(-1, j) * q * sims_to(xn, j)  # L[j, :]
        c_j = cf[..., :step, :].gather(-1, j[..., None, :].expand(B, Q, step, 1))  # [B, Q, step, 1]
        proj = (c_j * cf[..., :step, :]).sum(-2)  # <c_j, c_i> for every i
        e = torch.where(ok, (l_row - proj) / dj.clamp_min(torch.finfo(acc).tiny).sqrt(), torch.zeros_like(l_row))
        cf[..., step, :] = e
        d2 = d2 - e.square()
        eligible = eligible.scatter(-1, j, False) & (d2 > eps * diag)
    idx, gains = sort_by_time(picks, T, gains)
    return idx, gains


# ---------------------------------------------------------------------------------------------------
# Scene boundaries


def depth_scores(adjacent: torch.Tensor) -> torch.Tensor:
    """TextTiling depth of every adjacent-similarity value (VideoLLaMB SceneTilling):
    depth_t = lpeak_t + rpeak_t - 2 a_t, where lpeak climbs left from t while the values do not
    decrease and rpeak climbs right likewise. The climb is a segmented copy: lpeak_t = a_{s(t)} with
    s(t) the last index <= t at which a strictly increases (or 0), found with cummax: O(T)."""
    a = adjacent
    n = a.shape[-1]
    idx = torch.arange(n, device=a.device).expand_as(a)

    def peak(v):
        start = torch.ones_like(v, dtype=torch.bool)
        start[..., 1:] = v[..., :-1] < v[..., 1:]
        s = torch.where(start, idx, torch.zeros_like(idx)).cummax(-1).values
        return v.gather(-1, s)

    left = peak(a)
    right = peak(a.flip(-1)).flip(-1)
    return left + right - 2 * a


# The least mean change the adaptive rule divides by, in units of 1 - cos (a cosine of 0.98). Where
# the neighbours of a pair barely change (a freeze, a frame shown several times in slow motion, a
# still shot), their mean change is near zero and any small motion would give a huge ratio: a false
# cut. Flooring the mean means a cut out of a still neighbourhood needs a change of at least
# threshold * ADAPTIVE_MIN_CONTEXT (0.06, cos 0.94 at the default 3.0), the role PySceneDetect's
# AdaptiveDetector gives its min_content_val. Measured in bench/select_quality.py.
ADAPTIVE_MIN_CONTEXT = 0.02


def adaptive_ratio(change: torch.Tensor, window: int = 2, min_context: float = ADAPTIVE_MIN_CONTEXT) -> torch.Tensor:
    """change_t / max(mean(change over the up-to-``window`` neighbours on each side, excluding t),
    min_context): PySceneDetect's AdaptiveDetector ratio (content_val over its neighbours' mean) with
    the mean floored at ``min_context`` (see ADAPTIVE_MIN_CONTEXT). Near the ends the mean is over the
    neighbours that exist; a pair without any finite neighbour gets 0 (no context, no cut). NaN
    changes are not neighbours and give NaN."""
    n = change.shape[-1]
    finite = torch.isfinite(change)
    v = torch.where(finite, change, torch.zeros_like(change))
    csum = torch.nn.functional.pad(v.cumsum(-1), (1, 0))
    ccount = torch.nn.functional.pad(finite.to(v.dtype).cumsum(-1), (1, 0))
    t = torch.arange(n, device=change.device)
    lo = (t - window).clamp_min(0)
    hi = (t + window + 1).clamp_max(n)
    total = csum[..., hi] - csum[..., lo] - v
    count = ccount[..., hi] - ccount[..., lo] - finite.to(v.dtype)
    mean = total / count.clamp_min(1)
    ratio = change / mean.clamp_min(min_context)
    return torch.where(count > 0, ratio, torch.zeros_like(ratio))


def _enforce_min_len(cut: torch.Tensor, min_len: int) -> torch.Tensor:
    """Keep cuts in time order only when the segment they close has >= min_len frames (PySceneDetect's
    min_scene_len). Loops over the kept cuts (at most T / min_len), vectorised over the batch; reads
    one bool per iteration on the host to stop."""
    B, n = cut.shape
    pos = torch.arange(n, device=cut.device)
    # nxt[b, p] = first cut position >= p in row b (n if none); one extra column for p = n
    cand = torch.where(cut, pos.expand(B, n), torch.full_like(cut, n, dtype=torch.long))
    nxt = torch.cat([cand, torch.full((B, 1), n, device=cut.device, dtype=torch.long)], -1)
    nxt = nxt.flip(-1).cummin(-1).values.flip(-1)
    keep = torch.zeros(B, n + 1, dtype=torch.bool, device=cut.device)
    start = torch.zeros(B, 1, dtype=torch.long, device=cut.device)  # first frame of the open segment
    while True:
        # a cut at pair p starts a segment at frame p + 1: needs p + 1 - start >= min_len
        p = nxt.gather(-1, (start + min_len - 1).clamp_max(n))
        if not bool((p < n).any()):
            break
        keep.scatter_(-1, p, p < n)
        start = torch.where(p < n, p + 1, torch.full_like(p, n + min_len))
    return keep[:, :n]


def scene_boundaries(
    adjacent: torch.Tensor,
    method: str = "threshold",
    threshold: float | None = None,
    k: int | None = None,
    min_len: int = 1,
    window: int = 2,
    min_change: float = 0.0,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Segment id (int32 [B, T]) of every frame from the adjacent similarities [B, T - 1].

    A cut at pair t starts a new segment at frame t + 1. Pairs with a NaN similarity, or touching a
    frame at t >= lengths[b], never cut; padded frames get segment id -1. Methods (strength of a cut
    in brackets): "threshold" a_t < threshold [threshold - a_t]; "lowest_k" the k lowest a_t, TDC
    [-a_t]; "mean_std" depth_t > mean + threshold * std over the video (threshold = alpha, default 0.5),
    VideoLLaMB SceneTilling [depth_t]; "adaptive" ratio_t >= threshold (default 3.0) and change_t >=
    min_change with change = 1 - a and ratio = change over its neighbours' mean change floored at
    ADAPTIVE_MIN_CONTEXT, PySceneDetect AdaptiveDetector [ratio_t]. For methods other
    than lowest_k, k caps the number of cuts (the strongest kept, ties to the lower index). Then
    min_len drops, in time order, every cut that would close a segment shorter than min_len frames
    (so a short segment merges into the next; the last segment may be shorter).
    """
    B, n = adjacent.shape
    T = n + 1
    acc = _acc(adjacent)
    a = adjacent.to(acc)
    valid = torch.isfinite(a) & valid_frames(lengths, B, T, a.device)[:, 1:]
    a_safe = torch.where(valid, a, torch.ones_like(a))
    if method == "threshold":
        strength, cut = threshold - a_safe, valid & (a_safe < threshold)
    elif method == "lowest_k":
        strength, cut = -a_safe, valid
    elif method == "mean_std":
        alpha = 0.5 if threshold is None else threshold
        depth = depth_scores(torch.where(valid, a, torch.ones_like(a)))
        count = valid.sum(-1, keepdim=True).clamp_min(1)
        mean = torch.where(valid, depth, torch.zeros_like(depth)).sum(-1, keepdim=True) / count
        var = torch.where(valid, (depth - mean).square(), torch.zeros_like(depth)).sum(-1, keepdim=True) / count
        strength, cut = depth, valid & (depth > mean + alpha * var.sqrt())
    elif method == "adaptive":
        ratio_thr = 3.0 if threshold is None else threshold
        change = torch.where(valid, 1 - a, torch.full_like(a, float("nan")))
        ratio = adaptive_ratio(change, window)
        strength, cut = ratio, valid & (ratio >= ratio_thr) & (change >= min_change)
    else:
        raise ValueError(f"unknown method {method!r}")
    if k is not None and n > 0:
        masked = torch.where(cut, strength, torch.full_like(strength, float("-inf")))
        order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=a.device).expand_as(order))
        cut = cut & (rank < k)
    if min_len > 1 and n > 0:
        cut = _enforce_min_len(cut, min_len)
    seg = torch.zeros(B, T, dtype=torch.int32, device=a.device)
    seg[:, 1:] = cut.to(torch.int32).cumsum(-1, dtype=torch.int32)
    if lengths is not None:
        seg = seg.masked_fill(~valid_frames(lengths, B, T, a.device), -1)
    return seg


def segment_topk(scores: torch.Tensor, seg_id: torch.Tensor, k_per_segment: int, num_segments: int | None = None) -> torch.Tensor:
    """The k_per_segment highest-scoring frames of every segment (ties to the lower index).

    scores [B, T] or [B, Q, T]; seg_id int [B, T] (from scene_boundaries: non-decreasing, -1 =
    padding). Frames with seg_id < 0 or >= S, or a non-finite score, are skipped. Returns int32
    [B, S * k] (or [B, Q, S * k]) sorted by time and padded with -1, where S = num_segments, or
    seg_id.max() + 1 over the batch when None: a data-dependent size read on the host.
    """
    squeeze = scores.dim() == 2
    s = scores[:, None, :] if squeeze else scores
    B, Q, T = s.shape
    seg = seg_id.long()[:, None, :].expand(B, Q, T)
    if num_segments is None:
        num_segments = max(int(seg_id.max()) + 1, 0) if seg_id.numel() else 0
    S = num_segments
    ok = (seg >= 0) & (seg < S) & torch.isfinite(s)
    key_score = torch.where(ok, s.to(_acc(s)), torch.full_like(s, float("-inf"), dtype=_acc(s)))
    # stable sorts: by descending score, then by segment -> within a segment, best first, lower index on ties
    by_score = torch.sort(key_score, dim=-1, descending=True, stable=True).indices
    seg_sorted = torch.where(ok, seg, torch.full_like(seg, S)).gather(-1, by_score)
    seg_sorted, by_seg = torch.sort(seg_sorted, dim=-1, stable=True)
    frame = by_score.gather(-1, by_seg)
    first = torch.searchsorted(seg_sorted.contiguous(), seg_sorted.contiguous(), side="left")
    rank = torch.arange(T, device=s.device).expand(B, Q, T) - first
    take = (seg_sorted < S) & (rank < k_per_segment)
    slot = torch.where(take, seg_sorted * k_per_segment + rank, torch.full_like(rank, S * k_per_segment))
    out = torch.full((B, Q, S * k_per_segment + 1), -1, dtype=torch.long, device=s.device)
    out.scatter_(-1, slot, torch.where(take, frame, torch.full_like(frame, -1)))
    out = sort_by_time(out[..., :-1], T)[0]
    return out[:, 0] if squeeze else out


def uniform_indices(T: int, k: int, mode: str = "linspace", device=None) -> torch.Tensor:
    """k evenly spaced frame indices of a T-frame video, int32 [k].

    "linspace": floor(i * (T - 1) / (k - 1)) for i < k (0 when k = 1), exact integer arithmetic,
    first and last frame included. "numpy": bit-compatible with ``np.linspace(0, T - 1, k, dtype=int)``
    (lmms-eval's uniform sampling): i * ((T - 1) / (k - 1)) in float64, last set to T - 1, truncated;
    its rounding lands one frame below "linspace" where the exact value is an integer (T = 1996,
    k = 246: i = 119 gives 968, not 969). "center": floor((2i + 1) * T / (2k)), the frame at the
    centre of each of k equal bins.
    When k > T, the T frames are returned followed by -1 padding.
    """
    i = torch.arange(k, device=device, dtype=torch.long)
    if k > T:
        return torch.where(i < T, i, torch.full_like(i, -1)).to(torch.int32)
    if mode == "linspace":
        out = i * (T - 1) // (k - 1) if k > 1 else torch.zeros_like(i)
    elif mode == "numpy":
        y = torch.arange(k, device=device, dtype=torch.float64) * ((T - 1) / (k - 1)) if k > 1 else torch.zeros(k, device=device, dtype=torch.float64)
        if k > 1:
            y[-1] = T - 1
        out = y.long()
    elif mode == "center":
        out = (2 * i + 1) * T // (2 * k)
    else:
        raise ValueError(f"mode must be 'linspace', 'numpy' or 'center', got {mode!r}")
    return out.to(torch.int32)


# ---------------------------------------------------------------------------------------------------
# Exact token budgets: integer budgets per frame, the top-k tokens of every frame, segment ops.


def _fill(lam: torch.Tensor, w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """clamp(lam * w, lo, hi) per frame, lam [B, 1] (may be +inf); a frame of weight 0 stays at lo."""
    return torch.where(w > 0, torch.minimum(torch.maximum(lam * w, lo), hi), lo)


def _water_fill(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """float64 [B, T]: a_t = clamp(lam * w_t, lo_t, hi_t) with lam >= 0 chosen so that sum_t a_t = total.

    Needs sum lo <= total <= sum over w > 0 of hi + sum over w = 0 of lo. S(lam) = sum_t a_t is
    continuous, non-decreasing and linear between the breakpoints lo_t / w_t and hi_t / w_t. A
    bisection over the sorted breakpoints (log2(2T) steps, each summing S directly, so weights of
    very different sizes lose nothing to cancellation) finds the last breakpoint lam_j with
    S(lam_j) <= total; on the segment after it S grows with slope W = the weight of the frames not
    clamped there, so lam = lam_j + (total - S(lam_j)) / W. No host sync: the step count is a shape.
    """
    B, T = w.shape
    positive = w > 0
    safe_w = torch.where(positive, w, torch.ones_like(w))
    never = torch.full_like(w, float("inf"))
    enter, leave = torch.where(positive, lo / safe_w, never), torch.where(positive, hi / safe_w, never)
    at = torch.sort(torch.cat([w.new_zeros(B, 1), enter, leave], 1), dim=1).values  # [B, 2T + 1], at[:, 0] = 0 where S = sum lo <= total
    goal = total[:, None]
    first = torch.zeros(B, 1, dtype=torch.int64, device=w.device)
    last = torch.full((B, 1), 2 * T, dtype=torch.int64, device=w.device)
    for _ in range(max(2 * T, 1).bit_length()):  # largest j with S(at_j) <= total
        mid = (first + last + 1) // 2
        ok = _fill(at.gather(1, mid), w, lo, hi).sum(1, keepdim=True) <= goal
        first, last = torch.where(ok, mid, first), torch.where(ok, last, mid - 1)
    lam_j = at.gather(1, first)
    reached = _fill(lam_j, w, lo, hi).sum(1, keepdim=True)
    free = (enter <= lam_j) & (leave > lam_j)  # not clamped just after lam_j (the breakpoints' own floats)
    slope = torch.where(free, w, 0.0).sum(1, keepdim=True)
    lam = torch.where(slope > 0, lam_j + (goal - reached) / torch.where(slope > 0, slope, 1.0), lam_j)
    return _fill(lam, w, lo, hi)


def round_to_total(a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """int64 [B, T]: integers within [lo, hi] summing exactly to total, by the largest remainder:
    every frame gets floor(a_t), then the d = total - sum floor(a) units left go one each to the d
    frames with the largest remainders a_t - floor(a_t) that are below hi (ties to the lower index).
    Floating-point error could only make d negative; then the frames above lo with the smallest
    remainders give one back (ties: the higher index gives first)."""
    base = torch.minimum(torch.maximum(torch.floor(a), lo), hi)
    rem = a - base
    d = total - base.sum(1).round().long()  # [B]
    # one more unit: largest remainder first, lower index on ties (stable sort)
    up_key = torch.where(base < hi, rem, -1.0)
    up_rank = _ranks(up_key, descending=True)
    up = (up_rank < d[:, None]) & (base < hi)
    # one unit fewer (only after rounding error): smallest remainder first, the higher index on ties
    down_key = torch.where(base > lo, rem, 2.0).flip(1)
    down_rank = _ranks(down_key, descending=False).flip(1)
    down = (down_rank < (-d)[:, None]) & (base > lo)
    return base.long() + up.long() - down.long()


def _ranks(key: torch.Tensor, descending: bool) -> torch.Tensor:
    """int64 rank of every element of each row in a stable sort (0 = first)."""
    order = torch.sort(key, dim=1, descending=descending, stable=True).indices
    ranks = torch.empty_like(order)
    return ranks.scatter_(1, order, torch.arange(key.shape[1], device=key.device).expand_as(order))


def allocate_budget(
    scores: torch.Tensor,
    total: torch.Tensor,
    min_per_frame: torch.Tensor,
    max_per_frame: torch.Tensor,
    mode: str,
    temperature: float,
) -> torch.Tensor:
    """int64 ``[B, T]`` budgets in [min_per_frame, max_per_frame] summing to ``total[b]`` in every row.

    Weights: "proportional" w = scores (>= 0), "softmax" w = softmax(scores / temperature) over the
    frames, "uniform" w = 1. The real allocation a_t = clamp(lam * w_t, min_t, max_t) meets the total
    exactly (``_water_fill``); when the frames of positive weight cannot absorb the total even at their
    maximum, they get their maximum and the frames of zero weight share the rest evenly. Integers come
    from ``round_to_total`` (largest remainder, ties to the lower index). Computed in float64.
    """
    s = scores.to(torch.float64)
    lo, hi = min_per_frame.to(torch.float64), max_per_frame.to(torch.float64)
    tot = total.to(torch.float64)
    if mode == "uniform":
        w = torch.ones_like(s)
    elif mode == "softmax":  # a NaN frame (inside vidtok.allow_nan()) weighs 0
        w = torch.softmax(torch.where(torch.isnan(s), float("-inf"), s) / temperature, dim=1).nan_to_num(0.0)
    else:
        w = s.nan_to_num(0.0)
    positive = w > 0
    reach = torch.where(positive, hi, lo).sum(1)  # the most the positive weights can absorb
    # Two fills, computed as one batch of 2B rows (the rows are independent): the weights up to what
    # they can absorb, and the rest spread evenly over the zero-weight frames with the positive ones
    # at their maximum. A video whose total exceeds `reach` takes the second.
    both = _water_fill(
        torch.cat([w, (~positive).to(torch.float64)]),
        torch.cat([lo, torch.where(positive, hi, lo)]),
        torch.cat([hi, hi]),
        torch.cat([torch.minimum(tot, reach), tot]),
    )
    first, rest = both.chunk(2)
    a = torch.where((tot > reach)[:, None], rest, first)
    return round_to_total(a, lo, hi, total.long())


def topk_per_frame(scores: torch.Tensor, budgets: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep bool ``[B, T, N]``, index int32 ``[B, capacity]``).

    keep[b, t] holds the first budgets[b, t] tokens of frame t in a stable descending sort of its
    scores: the higher score, then the lower index; NaN sorts as -inf, -0.0 as 0.0. index[b] lists
    the kept tokens' flat positions t * N + n in (t, n) order, then -1 up to ``capacity`` (which must
    be at least every video's kept count). One sort, one scatter and one prefix sum; no host sync.
    """
    B, T, N = scores.shape
    s = scores.to(accumulation_dtype(scores.dtype))
    s = torch.where(torch.isnan(s), float("-inf"), s)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    first = torch.arange(N, device=s.device) < budgets.to(torch.int64)[..., None]  # the head of each sorted row
    keep = torch.zeros_like(first).scatter_(-1, order, first)
    return keep, kept_index(keep, capacity)


def kept_index(keep: torch.Tensor, capacity: int) -> torch.Tensor:
    """int32 ``[B, capacity]``: the flat positions t * N + n of the kept tokens of keep ``[B, T, N]`` in
    (t, n) order, then -1 (a prefix sum and a scatter, never ``nonzero``)."""
    B, T, N = keep.shape
    flat = keep.reshape(B, T * N)
    # dropped tokens go to a scratch column; kept ones are below capacity (the op checks the totals)
    slot = torch.where(flat, flat.cumsum(1) - 1, capacity)
    index = torch.full((B, capacity + 1), -1, dtype=torch.int32, device=keep.device)
    positions = torch.arange(flat.shape[1], dtype=torch.int32, device=keep.device).expand_as(flat)
    index.scatter_(1, slot, positions)
    return index[:, :capacity].contiguous()


def segment_reduce(x: torch.Tensor, segment_id: torch.Tensor, reduce: str, num_segments: int) -> torch.Tensor:
    """``[B, S, *rest]``: the frames of x ``[B, T, *rest]`` with segment_id[b, t] = s reduced into row s
    ("sum", "mean" or "max"); frames with segment_id < 0 or >= S are ignored; a segment without
    frames gives 0. Sums accumulate in fp32 (fp64 for fp64 x), cast back to x's dtype."""
    B, T = segment_id.shape
    rest = x.shape[2:]
    acc = accumulation_dtype(x.dtype)
    seg = segment_id.long()
    inside = (seg >= 0) & (seg < num_segments)
    slot = torch.where(inside, seg, num_segments)  # out-of-range frames land in a scratch row
    index = slot.view(B, T, *([1] * len(rest))).expand(B, T, *rest)
    xf = x.to(acc)
    if reduce == "max":
        out = xf.new_full((B, num_segments + 1, *rest), float("-inf"))
        out = out.scatter_reduce(1, index, xf, "amax", include_self=True)
    else:
        out = xf.new_zeros((B, num_segments + 1, *rest)).scatter_add(1, index, xf)
    count = torch.zeros(B, num_segments + 1, dtype=acc, device=x.device).scatter_add(1, slot, torch.ones_like(slot, dtype=acc))
    count = count.view(B, num_segments + 1, *([1] * len(rest)))
    if reduce == "mean":
        out = out / count.clamp_min(1)
    out = torch.where(count > 0, out, torch.zeros((), dtype=acc, device=x.device))
    return out[:, :num_segments].to(x.dtype)


def segment_bounds(segment_id: torch.Tensor, num_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, length) int64 ``[B, S]`` of every segment of non-decreasing ids (-1 padding ignored):
    the first frame and the number of frames of segment s (0, 0 for an empty segment)."""
    B, T = segment_id.shape
    seg = segment_id.long()
    inside = (seg >= 0) & (seg < num_segments)
    slot = torch.where(inside, seg, num_segments)
    t = torch.arange(T, device=seg.device).expand(B, T)
    length = torch.zeros(B, num_segments + 1, dtype=torch.int64, device=seg.device).scatter_add(1, slot, inside.long())
    start = torch.full((B, num_segments + 1), T, dtype=torch.int64, device=seg.device)
    start = start.scatter_reduce(1, slot, t, "amin", include_self=True)
    start = torch.where(length > 0, start, 0)
    return start[:, :num_segments], length[:, :num_segments]


def segment_pool(x: torch.Tensor, segment_id: torch.Tensor, m: int, num_segments: int) -> torch.Tensor:
    """``[B, S, m, *rest]``: segment s of x ``[B, T, *rest]`` (its frames start, ..., start + L - 1)
    average-pooled to m slots as ``torch.nn.functional.adaptive_avg_pool1d`` does: slot i is the
    mean of local frames floor(i * L / m) ... ceil((i + 1) * L / m) - 1 (overlapping slots repeat a
    frame when L < m). An empty segment gives zeros. Prefix sums in fp64, cast back to x's dtype."""
    B, T = segment_id.shape
    rest = x.shape[2:]
    start, length = segment_bounds(segment_id, num_segments)  # [B, S]
    i = torch.arange(m, device=x.device)
    lo = start[..., None] + (i * length[..., None]) // m  # [B, S, m]
    hi = start[..., None] + ((i + 1) * length[..., None] + m - 1) // m
    prefix = torch.cat([x.new_zeros((B, 1, *rest), dtype=torch.float64), x.to(torch.float64).cumsum(1)], 1)  # [B, T + 1, ...]
    flat = prefix.reshape(B, T + 1, -1)

    def at(pos):
        return flat.gather(1, pos.reshape(B, -1, 1).expand(B, pos[0].numel(), flat.shape[-1]))

    count = (hi - lo).clamp_min(1).reshape(B, -1, 1).to(torch.float64)
    mean = (at(hi) - at(lo)) / count
    present = (length > 0)[..., None].expand(B, num_segments, m).reshape(B, -1, 1)
    mean = torch.where(present, mean, 0.0)
    return mean.reshape(B, num_segments, m, *rest).to(x.dtype)

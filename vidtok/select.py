"""Similarity-based frame selection over cached frame embeddings.

Long-video LLMs choose which frames to show the model from per-frame embeddings (CLIP, SigLIP):
relevance to the question, similarity of consecutive frames, then a selection rule. These ops do
each stage batched over videos and queries, deterministically (ties: higher gain, then the lower
frame index), with every selection returned as int32 indices sorted by time and padded with -1.

The same hot path holds exact token budgets: the serving engines' counts (``evs_count``,
``vidcom2_count``: host-side arithmetic on the grid), integer budgets per frame that sum exactly to a
total (``allocate_budget``) and the top-k tokens of every frame under such budgets
(``topk_per_frame``), so a prompt's size is known before any encoder runs.

frame_scores, greedy_select, dpp_select, scene_boundaries, allocate_budget and topk_per_frame are
``torch.library.custom_op``s in the ``vidtok`` namespace whose last argument is the backend chosen in
Python (``vidtok._backend`` says which backends each has). ``segment_topk``, ``segment_reduce``,
``segment_pool``, ``clip_select`` and ``uniform_indices`` are plain PyTorch functions (clip_select
over greedy_select).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vidtok import _backend
from vidtok._numerics import REFERENCE_DTYPES
from vidtok._validation import check_float, check_int, check_no_nan, check_same_device, check_tensor, require
from vidtok.reference import select as reference

__all__ = ["Scores", "dpp_select", "frame_scores", "greedy_select", "scene_boundaries", "segment_topk", "uniform_indices",
           "Kept", "allocate_budget", "clip_select", "evs_count", "segment_pool", "segment_reduce", "topk_per_frame",
           "vidcom2_count"]

_INT_DTYPES = (torch.int32, torch.int64)


class Scores(NamedTuple):
    """Output of ``frame_scores``: relevance fp32 [B, Q, T], adjacent fp32 [B, T - 1], norms fp32 [B, T]."""

    relevance: torch.Tensor
    adjacent: torch.Tensor
    norms: torch.Tensor


def _check_lengths(lengths, B: int, T: int) -> None:
    """lengths: int tensor [B] with 0 <= lengths <= T. Checking the values reads them on the host, so
    it is skipped under torch.compile (values out of range then act as clamped to [0, T])."""
    if lengths is None:
        return
    check_tensor("lengths", lengths, rank=1, layout="[B]", dtypes=_INT_DTYPES)
    if lengths.shape[0] != B:
        raise ValueError(f"lengths must have B = {B} entries, got shape {tuple(lengths.shape)}")
    if lengths.numel() and not torch.compiler.is_compiling() and (int(lengths.max()) > T or int(lengths.min()) < 0):
        raise ValueError(f"lengths must be in [0, T = {T}], got values in [{int(lengths.min())}, {int(lengths.max())}]")


def _check_2d_or_3d(name: str, t, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() not in (2, 3):
        raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
    check_tensor(name, t, rank=t.dim(), layout=layout, dtypes=REFERENCE_DTYPES)


# ---------------------------------------------------------------------------------------------------
# frame_scores


@torch.library.custom_op("vidtok::frame_scores", mutates_args=())
def _frame_scores_op(
    x: torch.Tensor, query: torch.Tensor | None, scale: float, bias: float, lengths: torch.Tensor | None, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(_backend.implementation("frame_scores", backend)(x, query, scale, bias, lengths))


@_frame_scores_op.register_fake
def _(x, query, scale, bias, lengths, backend):
    B, T, _ = x.shape
    Q = 0 if query is None else query.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty((B, Q, T), dtype=acc), x.new_empty((B, T - 1), dtype=acc), x.new_empty((B, T), dtype=acc)


def frame_scores(
    x: torch.Tensor,
    query: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    bias: float = 0.0,
    lengths: torch.Tensor | None = None,
    backend: str | None = None,
) -> Scores:
    """Relevance of every frame to every query, cosine of consecutive frames and frame norms, in one read of x.

    Args:
        x: ``[B, T, C]`` frame embeddings (B videos of T frames), float32/float16/bfloat16 (float64 on
            the reference backend), any strides.
        query: ``[B, Q, C]`` query embeddings (a question, its options, sub-queries), same dtype; or None.
        scale, bias: relevance = scale * cos + bias (CLIP: logit_scale and 0; SigLIP: its scale and bias).
        lengths: int32/int64 ``[B]``, frames ``t >= lengths[b]`` are padding (videos of different
            length in one padded batch). Validating it reads it on the host (one sync).
        backend: "reference", "triton" or "auto".

    Returns:
        ``Scores(relevance, adjacent, norms)``, float32 (float64 for float64 x):
        relevance ``[B, Q, T]`` = scale * cos(x[b, t], query[b, q]) + bias ([B, 0, T] without query);
        adjacent ``[B, T - 1]`` = cos(x[b, t], x[b, t + 1]); norms ``[B, T]`` = |x[b, t]|. Cosines as
        ``F.cosine_similarity``: dot / (max(|a|, 1e-8) * max(|b|, 1e-8)), accumulated in fp32, so a zero
        frame gives 0. Padding frames get relevance -inf (never selected downstream), NaN adjacency
        for pairs touching them, norm 0. A NaN in a frame propagates: NaN relevance and NaN for its
        adjacent pairs, which greedy_select and scene_boundaries then refuse (a ValueError). Not
        differentiable.

    The Triton kernel is one pass over x for all queries and the adjacency (the scan behind TASS,
    AKS, BOLT relevance and TDC/SceneTilling cuts; research note §6.3).
    """
    check_tensor("x", x, rank=3, layout="[B, T, C]", dtypes=REFERENCE_DTYPES)
    B, T, C = x.shape
    if T < 1:
        raise ValueError(f"x must have at least 1 frame (x.shape[1] = T), got shape {tuple(x.shape)}")
    if query is not None:
        check_tensor("query", query, rank=3, layout="[B, Q, C]", dtypes=REFERENCE_DTYPES)
        if query.shape[0] != B or query.shape[2] != C:
            raise ValueError(
                f"query must be [B, Q, C] = [{B}, Q, {C}] to match x [B, T, C] = {list(x.shape)}, got {list(query.shape)}"
            )
        if query.dtype != x.dtype:
            raise TypeError(f"query must have x's dtype {x.dtype}, got {query.dtype}")
    _check_lengths(lengths, B, T)
    check_same_device(x=x, query=query, lengths=lengths)
    scale = check_float("scale", scale)
    bias = check_float("bias", bias)
    chosen = _backend.choose("frame_scores", x.device, x.dtype, backend, (x, query, scale, bias, lengths))
    return Scores(*_frame_scores_op(x, query, scale, bias, lengths, chosen))


# ---------------------------------------------------------------------------------------------------
# greedy_select


@torch.library.custom_op("vidtok::greedy_select", mutates_args=())
def _greedy_select_op(
    relevance: torch.Tensor,
    k: int,
    x: torch.Tensor | None,
    lam: float,
    min_gap: float,
    sim_thresh: float | None,
    pool: str,
    pool_top: int,
    timestamps: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    select = _backend.implementation("greedy_select", backend)
    return select(relevance, k, x, lam, min_gap, sim_thresh, pool, pool_top, timestamps)


@_greedy_select_op.register_fake
def _(relevance, k, x, lam, min_gap, sim_thresh, pool, pool_top, timestamps, backend):
    B, Q, _ = relevance.shape
    return relevance.new_empty((B, Q, k), dtype=torch.int32)


def greedy_select(
    relevance: torch.Tensor,
    k: int,
    *,
    x: torch.Tensor | None = None,
    lam: float = 0.0,
    min_gap: float = 0,
    sim_thresh: float | None = None,
    pool: str | int = "all",
    timestamps: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """k frames per (video, query), each step taking the frame of highest gain.

    Args:
        relevance: ``[B, Q, T]`` float scores (e.g. ``frame_scores(...).relevance``). Frames with a
            non-finite score (-inf padding) are never selected. NaN is a ValueError (inside
            ``vidtok.allow_nan()``: never selected).
        k: frames to select per (video, query), >= 1. More than can be chosen is not an error: the
            result is padded with -1.
        x: ``[B, T, C]`` frame embeddings, required when lam != 0 or sim_thresh is set. Frames with a
            inf embedding are then never selected; NaN is a ValueError (inside ``vidtok.allow_nan()``:
            never selected).
        lam: MMR weight (Carbonell & Goldstein 1998): gain = relevance - lam * max cosine to the frames
            already chosen (no penalty for the first pick). lam = 0 is top-k under the constraints.
        min_gap: >= 0; no two picks closer than this: |t_i - t_j| >= min_gap, in frames, or in the units
            of ``timestamps`` (seconds) when given. TASS (Yuan et al. 2025, DATE) uses a gap in seconds.
        sim_thresh: a pick removes every candidate with cosine > sim_thresh to it (ViLaMP's
            frame-to-frame NMS, 0.85 there).
        pool: candidates before selection: "all"; "above_mean" (relevance strictly above the mean of
            the finite relevances of that (video, query), as TASS); or an int m >= 1, the m most
            relevant frames (ties to the lower index).
        timestamps: ``[B, T]`` float frame times for min_gap.
        backend: "reference", "cuda" or "auto".

    Returns:
        int32 ``[B, Q, k]``: chosen frame indices sorted by time, padded with -1 at the end when fewer
        than k frames can be chosen. Ties: higher gain, then the lower frame index, so results are
        exact and independent of what else is in the batch. The reference loops over the k steps
        (vectorised over problems and frames: O(k * T * C) with x, O(k * T) without) and never syncs.

    The cuda backend (float32 math; relevance may be float16/bfloat16) runs all k steps of each
    (video, query) in one thread block of a persistent kernel, no host sync. Without similarities
    (lam = 0, no sim_thresh) its picks are exactly the reference's; with them a cosine is summed over
    channels in a different order than the reference's GEMM, so picks agree except where two gains are
    within float32 rounding of each other (near-ties). Up to 8192 frames it first forms the Gram matrix
    of the unit rows (T^2 floats per video; chunked to 1 GiB); longer videos stream x once per step.
    """
    check_tensor("relevance", relevance, rank=3, layout="[B, Q, T]", dtypes=REFERENCE_DTYPES)
    B, Q, T = relevance.shape
    check_int("k", k, low=1, high=2**31 - 1)
    lam = check_float("lam", lam)
    if isinstance(min_gap, bool) or not isinstance(min_gap, (int, float)):
        raise TypeError(f"min_gap must be an int or float, got {type(min_gap).__name__}")
    if not min_gap >= 0:
        raise ValueError(f"min_gap must be >= 0, got {min_gap}")
    if sim_thresh is not None:
        sim_thresh = check_float("sim_thresh", sim_thresh)
    if (lam != 0.0 or sim_thresh is not None) and x is None:
        raise ValueError("x (frame embeddings [B, T, C]) is required when lam != 0 or sim_thresh is set")
    if x is not None:
        check_tensor("x", x, rank=3, layout="[B, T, C]", dtypes=REFERENCE_DTYPES)
        if x.shape[:2] != (B, T):
            raise ValueError(f"x must be [B, T, C] with B = {B}, T = {T} to match relevance [B, Q, T], got {list(x.shape)}")
    if timestamps is not None:
        check_tensor("timestamps", timestamps, rank=2, layout="[B, T]", dtypes=REFERENCE_DTYPES)
        if tuple(timestamps.shape) != (B, T):
            raise ValueError(f"timestamps must be [B, T] = [{B}, {T}], got {list(timestamps.shape)}")
    if isinstance(pool, bool) or not isinstance(pool, (str, int)):
        raise TypeError(f"pool must be 'all', 'above_mean' or an int, got {type(pool).__name__}")
    if isinstance(pool, int):
        if pool < 1:
            raise ValueError(f"pool must be an int >= 1 (the candidate pool size), got {pool}")
        pool_name, pool_top = "top", pool
    elif pool in ("all", "above_mean"):
        pool_name, pool_top = pool, 0
    else:
        raise ValueError(f"pool must be 'all', 'above_mean' or an int, got {pool!r}")
    check_same_device(relevance=relevance, x=x, timestamps=timestamps)
    for name, t in (("relevance", relevance), ("x", x), ("timestamps", timestamps)):
        check_no_nan("greedy_select", name, t)
    args = (relevance, k, x, lam, float(min_gap), sim_thresh, pool_name, pool_top, timestamps)
    chosen = _backend.choose("greedy_select", relevance.device, relevance.dtype, backend, args)
    return _greedy_select_op(*args, chosen)


# ---------------------------------------------------------------------------------------------------
# dpp_select


@torch.library.custom_op("vidtok::dpp_select", mutates_args=())
def _dpp_select_op(
    x: torch.Tensor, k: int, quality: torch.Tensor | None, eps: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return _backend.implementation("dpp_select", backend)(x, k, quality, eps)


@_dpp_select_op.register_fake
def _(x, k, quality, eps, backend):
    B = x.shape[0]
    Q = 1 if quality is None else quality.shape[1]
    acc = torch.float64 if torch.float64 in (x.dtype, None if quality is None else quality.dtype) else torch.float32
    return x.new_empty((B, Q, k), dtype=torch.int32), x.new_empty((B, Q, k), dtype=acc)


def dpp_select(
    x: torch.Tensor,
    k: int,
    *,
    quality: torch.Tensor | None = None,
    eps: float = 1e-4,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy MAP of a DPP over frames: relevant and mutually dissimilar frames (MDP3-style).

    The kernel is L = diag(q) S diag(q), S the cosine similarity of the frames; the greedy step adds
    the frame that most increases log det L_S, with the incremental Cholesky update of Chen, Zhang &
    Zhou (NeurIPS 2018): O(T * k) per step and O(T * k) state, L is never formed.

    Args:
        x: ``[B, T, C]`` frame embeddings (float32/float16/bfloat16/float64).
        k: frames to select, >= 1.
        quality: ``[B, T]`` or ``[B, Q, T]`` per-frame quality q (e.g. exp(relevance / tau)); None = 1.
            Frames with zero or infinite quality or embedding are never chosen (pass 0 for padding);
            NaN in x or quality is a ValueError (inside ``vidtok.allow_nan()``: never chosen).
        eps: a frame stays a candidate while its residual d2_i = det(L_{S+i}) / det(L_S) exceeds
            eps * L_ii, i.e. while it is not, to relative precision eps, a combination of the chosen
            frames; the selection stops early when none is left (an exact duplicate is never chosen twice).
        backend: "reference", "cuda" or "auto".

    Returns:
        (idx, gains): idx int32 ``[B, k]`` (``[B, Q, k]`` for quality [B, Q, T]) sorted by time and
        padded with -1; gains float32 (float64 for float64 inputs), same shape, the natural-log
        determinant increment log d2 of each frame when it was picked and 0 beside padding, so
        ``gains.sum(-1)`` = log det L_S. Ties go to the lower frame index. No host sync.

    The cuda backend (float32) runs all k steps of each (video, quality row) in one thread block and
    keeps the Cholesky rows in a [B, Q, min(k, T), T] float32 scratch, as the reference does. Its
    cosines and projections are summed in a different order than the reference's, so picks agree
    except at near-ties of the residuals and gains agree to float32 rounding.
    """
    check_tensor("x", x, rank=3, layout="[B, T, C]", dtypes=REFERENCE_DTYPES)
    B, T, _ = x.shape
    check_int("k", k, low=1, high=2**31 - 1)
    squeeze = False
    if quality is not None:
        _check_2d_or_3d("quality", quality, "[B, T] or [B, Q, T]")
        if quality.dim() == 2:
            quality, squeeze = quality[:, None, :], True
        if quality.shape[0] != B or quality.shape[2] != T:
            raise ValueError(f"quality must be [B, T] or [B, Q, T] with B = {B}, T = {T} to match x, got {list(quality.shape)}")
    else:
        squeeze = True
    eps = check_float("eps", eps, low=0.0)
    check_same_device(x=x, quality=quality)
    check_no_nan("dpp_select", "x", x)
    check_no_nan("dpp_select", "quality", quality)
    chosen = _backend.choose("dpp_select", x.device, x.dtype, backend, (x, k, quality, eps))
    idx, gains = _dpp_select_op(x, k, quality, eps, chosen)
    return (idx[:, 0], gains[:, 0]) if squeeze else (idx, gains)


# ---------------------------------------------------------------------------------------------------
# scene_boundaries, segment_topk, uniform_indices

_METHODS = ("threshold", "lowest_k", "mean_std", "adaptive")


@torch.library.custom_op("vidtok::scene_boundaries", mutates_args=())
def _scene_boundaries_op(
    adjacent: torch.Tensor,
    method: str,
    threshold: float | None,
    k: int | None,
    min_len: int,
    window: int,
    min_change: float,
    lengths: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    boundaries = _backend.implementation("scene_boundaries", backend)
    return boundaries(adjacent, method, threshold, k, min_len, window, min_change, lengths)


@_scene_boundaries_op.register_fake
def _(adjacent, method, threshold, k, min_len, window, min_change, lengths, backend):
    B, n = adjacent.shape
    return adjacent.new_empty((B, n + 1), dtype=torch.int32)


def scene_boundaries(
    adjacent: torch.Tensor,
    *,
    method: str = "threshold",
    threshold: float | None = None,
    k: int | None = None,
    min_len: int = 1,
    window: int = 2,
    min_change: float = 0.0,
    lengths: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Segment id of every frame from the cosine similarity of consecutive frames.

    Args:
        adjacent: ``[B, T - 1]`` float, ``adjacent[b, t] = cos(x[b, t], x[b, t + 1])`` (``frame_scores``).
            NaN at a real pair (not touching padding) is a ValueError; inside ``vidtok.allow_nan()``
            NaN pairs never cut.
        method: where to cut between frames t and t + 1:
            "threshold": adjacent[t] < threshold (required);
            "lowest_k": the k lowest similarities (TDC, Hoar012/TDC-Video; k required);
            "mean_std": TextTiling depth (lpeak + rpeak - 2 a_t, VideoLLaMB SceneTilling, an O(T)
            scan) above mean + alpha * std of the video's depths, alpha = threshold (default 0.5);
            "adaptive": PySceneDetect AdaptiveDetector on change = 1 - adjacent: change_t over the mean
            change of the ``window`` neighbours each side >= threshold (default 3.0) and
            change_t >= min_change. The neighbours' mean is floored at 0.02 (cos 0.98): in a
            freeze, slow motion made of repeated frames or a still shot it is near zero, and any
            small motion would otherwise be a cut; a cut out of such a stretch needs
            1 - cos >= 3.0 * 0.02. The defaults need no tuning on the real and synthetic clips of
            bench/select_quality.py (F1 at least PySceneDetect's ContentDetector on each).
        k: for lowest_k the number of cuts; otherwise an optional cap (the strongest cuts kept:
            lowest similarity, deepest depth, highest ratio; ties to the lower index).
        min_len: >= 1; in time order, a cut that would close a segment shorter than min_len frames is
            dropped (PySceneDetect's min_scene_len), merging the short segment into the next one.
            The reference loops over the kept cuts and reads one flag per iteration on the host.
        lengths: int ``[B]``, frames at t >= lengths[b] are padding (segment id -1; no cut touches them).

    Returns:
        int32 ``[B, T]``, non-decreasing segment ids starting at 0 (-1 for padding).
    """
    check_tensor("adjacent", adjacent, rank=2, layout="[B, T - 1]", dtypes=REFERENCE_DTYPES)
    B, n = adjacent.shape
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if threshold is not None:
        threshold = check_float("threshold", threshold)
    if method == "threshold" and threshold is None:
        raise ValueError("method='threshold' needs threshold (cut where adjacent similarity < threshold)")
    if method == "lowest_k" and k is None:
        raise ValueError("method='lowest_k' needs k (the number of cuts)")
    if method == "lowest_k" and threshold is not None:
        raise ValueError("method='lowest_k' takes k, not threshold")
    if k is not None:
        check_int("k", k, low=0, high=2**31 - 1)
    check_int("min_len", min_len, low=1, high=2**31 - 1)
    check_int("window", window, low=1, high=2**31 - 1)
    min_change = check_float("min_change", min_change)
    _check_lengths(lengths, B, n + 1)
    check_same_device(adjacent=adjacent, lengths=lengths)
    # pairs touching padding frames are NaN by design (frame_scores with lengths): only real pairs count
    real_pairs = None if lengths is None else reference.valid_frames(lengths, B, n + 1, adjacent.device)[:, 1:]
    check_no_nan("scene_boundaries", "adjacent", adjacent, real_pairs)
    chosen = _backend.choose("scene_boundaries", adjacent.device, adjacent.dtype, backend)
    return _scene_boundaries_op(adjacent, method, threshold, k, min_len, window, min_change, lengths, chosen)


def segment_topk(scores: torch.Tensor, seg_id: torch.Tensor, k_per_segment: int, *, num_segments: int | None = None) -> torch.Tensor:
    """The ``k_per_segment`` highest-scoring frames of every segment (AKS leaves, one anchor per event).

    Args:
        scores: ``[B, T]`` or ``[B, Q, T]`` float; infinite scores are never selected; NaN is a
            ValueError (inside ``vidtok.allow_nan()``: never selected).
        seg_id: int ``[B, T]`` segment ids (``scene_boundaries``); frames with seg_id < 0 are skipped.
        k_per_segment: >= 1; a segment with fewer eligible frames gives all of them.
        num_segments: S, a static size (ids >= S are skipped, as in ``segment_reduce``); None reads
            seg_id.max() + 1 on the host (a data-dependent size).

    Returns:
        int32 ``[B, S * k_per_segment]`` (``[B, Q, ...]`` for 3-D scores) sorted by time and padded with
        -1. Ties to the lower index. Plain PyTorch, not a custom op; with num_segments it compiles
        with static shapes.
    """
    _check_2d_or_3d("scores", scores, "[B, T] or [B, Q, T]")
    check_tensor("seg_id", seg_id, rank=2, layout="[B, T]", dtypes=_INT_DTYPES)
    if (seg_id.shape[0], seg_id.shape[1]) != (scores.shape[0], scores.shape[-1]):
        raise ValueError(f"seg_id must be [B, T] = [{scores.shape[0]}, {scores.shape[-1]}], got {list(seg_id.shape)}")
    check_int("k_per_segment", k_per_segment, low=1, high=2**31 - 1)
    check_same_device(scores=scores, seg_id=seg_id)
    check_no_nan("segment_topk", "scores", scores)
    if num_segments is not None:
        check_int("num_segments", num_segments, low=0, high=2**31 - 1)
    return reference.segment_topk(scores, seg_id, k_per_segment, num_segments)


def uniform_indices(T: int, k: int, *, mode: str = "linspace", device: str | torch.device | None = None) -> torch.Tensor:
    """k evenly spaced frame indices of a T-frame video: the baseline every selection paper compares to.

    mode "linspace" (default): ``floor(i * (T - 1) / (k - 1))``, i = 0..k-1 (0 for k = 1), computed
    exactly in integers, first and last frame included. mode "numpy": bit-compatible with
    ``np.linspace(0, T - 1, k, dtype=int)`` (lmms-eval's uniform sampling), whose float rounding
    gives one frame less than "linspace" where i * (T - 1) / (k - 1) is an integer (e.g. T = 1996,
    k = 246, i = 119: 968 instead of 969). mode "center": ``floor((2i + 1) * T / (2k))``, the centre
    frame of each of k equal bins. Returns int32 ``[k]``; when k > T, the T frames then -1 padding.
    """
    check_int("T", T, low=0, high=2**31 - 1, why=" (the indices are int32)")
    check_int("k", k, low=1, high=2**31 - 1)
    if mode not in ("linspace", "numpy", "center"):
        raise ValueError(f"mode must be 'linspace', 'numpy' or 'center', got {mode!r}")
    return reference.uniform_indices(T, k, mode, device)


# ---------------------------------------------------------------------------------------------------
# Exact token budgets: the serving engines' counts, integer budgets per frame, the top-k tokens of
# every frame, and segment ops. Counts that a prompt needs are known before any encoder runs.


def _check_rate(q) -> float:
    q = check_float("q", q)
    if not 0.0 <= q < 1.0:
        raise ValueError(f"q (the pruning rate) must be in [0, 1), got {q}")
    return q


def evs_count(tokens_per_frame: int, frames: int, q: float) -> int:
    """Tokens Efficient Video Sampling keeps of a video (Bagrov et al. 2025, arXiv 2510.14624), as vLLM
    (``vllm/multimodal/evs.py``, ``compute_retained_tokens_count``) and SGLang
    (``python/sglang/srt/multimodal/evs/evs_core.py``) size the prompt:
    ``max(tokens_per_frame, int(tokens_per_frame * frames * (1 - q)))``.

    The first frame is always kept whole, so the count never falls below one frame. Computed with
    Python floats exactly as the engines do, truncation included: 100 frames of 100 tokens at q = 0.9
    keep int(10000 * 0.09999999999999998) = 999 tokens, not 1000.

    Args:
        tokens_per_frame: >= 1, the LLM-side tokens of one frame (after any spatial merge).
        frames: >= 1, frames (temporal slices) of the video.
        q: the pruning rate, in [0, 1).
    """
    check_int("tokens_per_frame", tokens_per_frame, low=1)
    check_int("frames", frames, low=1)
    q = _check_rate(q)
    return max(tokens_per_frame, int(tokens_per_frame * frames * (1 - q)))


def vidcom2_count(tokens_per_frame: int, frames: int, q: float) -> int:
    """Tokens VidCom2 keeps of a video (Liu et al., EMNLP 2025, arXiv 2505.14454) as vLLM sizes the prompt
    (``vllm/multimodal/video_prune/vidcom2.py``, ``compute_retained_tokens_count``):
    ``max(frames, min(int(tokens_per_frame * frames * (1 - q)), tokens_per_frame * frames))``: every
    frame keeps at least one token, so the floor is one token per frame rather than EVS's whole first
    frame. Arguments as ``evs_count``; Python float arithmetic as the engine."""
    check_int("tokens_per_frame", tokens_per_frame, low=1)
    check_int("frames", frames, low=1)
    q = _check_rate(q)
    total = tokens_per_frame * frames
    return max(frames, min(int(total * (1 - q)), total))


def _first_bad(bad: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in bad.nonzero()[0])


def _check_values(name: str, bad: torch.Tensor, expected: str, values: torch.Tensor) -> None:
    """ValueError naming ``name`` where ``bad`` holds: with the first bad value on CPU tensors, as a
    device-side assert on GPUs and under torch.compile (no host sync)."""
    if bad.numel() == 0:
        return
    if bad.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(bad.any()):
            where = _first_bad(bad)
            raise ValueError(f"{name} must be {expected}, got {values[where].item()} at {list(where)}")
    else:
        require(~bad.any(), f"{name} must be {expected}")


def _int_budget(name: str, value, shape: tuple, device) -> torch.Tensor:
    """An int argument or an int tensor of ``shape`` as an int64 tensor of that shape."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be an int or an int32/int64 tensor {list(shape)}, got {value.dtype}")
        if tuple(value.shape) != shape:
            raise ValueError(f"{name} must be an int or a tensor of shape {list(shape)}, got shape {list(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} must be on {device} (the scores' device), got {value.device}")
        return value.to(device=device, dtype=torch.int64)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or an int32/int64 tensor {list(shape)}, got {type(value).__name__}")
    return torch.full(shape, value, dtype=torch.int64, device=device)


ALLOCATION_MODES = ("proportional", "softmax", "uniform")


@torch.library.custom_op("vidtok::allocate_budget", mutates_args=())
def _allocate_budget_op(
    scores: torch.Tensor, total: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, mode: str, temperature: float,
    backend: str,
) -> torch.Tensor:
    return _backend.implementation("allocate_budget", backend)(scores, total, lo, hi, mode, temperature)


@_allocate_budget_op.register_fake
def _(scores, total, lo, hi, mode, temperature, backend):
    return scores.new_empty(scores.shape, dtype=torch.int64)


def allocate_budget(
    scores: torch.Tensor,
    total,
    *,
    min_per_frame=0,
    max_per_frame=None,
    mode: str = "proportional",
    temperature: float = 1.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Integer token budgets per frame that sum exactly to ``total`` in every video.

    Per-frame budgets drawn from frame scores are how KFFocus (condensation ratios from temporal
    redundancy), VidCom2 (budgets from frame distinctiveness, reconciled to the exact total) and LangDC
    (ratios from semantic density) spend a fixed token count unevenly; ``topk_per_frame`` then keeps
    that many tokens of each frame.

    Args:
        scores: ``[B, T]`` float frame scores (float32/float16/bfloat16/float64). "proportional":
            budgets follow the scores, which must be >= 0 and finite (a frame of score 0 gets its
            minimum while the others can absorb the total); "softmax": budgets follow
            softmax(scores / temperature) over the frames (finite scores); "uniform": scores only give
            the shape. NaN is a ValueError; inside ``vidtok.allow_nan()`` a NaN frame has weight 0.
        total: the tokens of each video: an int >= 0 or an int tensor ``[B]``.
        min_per_frame, max_per_frame: an int or an int tensor ``[B, T]`` each; max None means no
            upper limit. A max of 0 removes a frame (padding frames of a shorter video). Must satisfy
            0 <= min <= max and sum(min) <= total <= sum(max) in every video.
        mode: "proportional", "softmax" or "uniform".
        temperature: > 0, the softmax temperature.
        backend: "reference" or "auto" (the math runs in PyTorch on any device; no kernel).

    Returns:
        int64 ``[B, T]``. The real allocation a_t = clamp(lam * w_t, min_t, max_t) with lam such that
        the a_t sum to the total (water-filling on the sorted breakpoints, float64); when the frames
        of positive weight reach their maximum and tokens remain, the zero-weight frames share them
        evenly. Integers by the largest remainder: floor(a_t) first, then one more token each for the
        frames with the largest remainders, ties to the lower index ("uniform" gives the first frames
        the extra tokens). Deterministic; no host sync in the computation (the argument checks read
        the values: at once on CPU tensors, a device-side assert on GPUs).
    """
    check_tensor("scores", scores, rank=2, layout="[B, T]", dtypes=REFERENCE_DTYPES)
    B, T = scores.shape
    if mode not in ALLOCATION_MODES:
        raise ValueError(f"mode must be one of {ALLOCATION_MODES}, got {mode!r}")
    temperature = check_float("temperature", temperature, finite=True)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    device = scores.device
    if not isinstance(total, torch.Tensor):
        check_int("total", total, low=0)
    total_t = _int_budget("total", total, (B,), device)
    lo = _int_budget("min_per_frame", min_per_frame, (B, T), device)
    if max_per_frame is None:
        hi = torch.maximum(total_t[:, None].expand(B, T), lo)
    else:
        hi = _int_budget("max_per_frame", max_per_frame, (B, T), device)
    _check_values("total", total_t < 0, ">= 0", total_t)
    _check_values("min_per_frame", lo < 0, ">= 0", lo)
    _check_values("max_per_frame", hi < lo, ">= min_per_frame", hi)
    low_sum, high_sum = lo.sum(1), hi.sum(1)
    _check_values("total", total_t < low_sum, "at least the sum of min_per_frame of its video (else the "
                  "constraints cannot be met)", total_t)
    _check_values("total", total_t > high_sum, "at most the sum of max_per_frame of its video (else the "
                  "constraints cannot be met)", total_t)
    if mode != "uniform":
        check_no_nan("allocate_budget", "scores", scores)
        _check_values("scores", torch.isinf(scores), f"finite for mode={mode!r}", scores)
        if mode == "proportional":
            _check_values("scores", scores < 0, ">= 0 for mode='proportional' (use mode='softmax' for any real scores)", scores)
    chosen = _backend.choose("allocate_budget", device, scores.dtype, backend)
    return _allocate_budget_op(scores, total_t, lo, hi, mode, temperature, chosen)


class Kept(NamedTuple):
    """Output of ``topk_per_frame``: keep bool ``[B, T, N]``; index int32 ``[B, capacity]``, the kept
    tokens' flat positions ``t * N + n`` in (t, n) order, then -1."""

    keep: torch.Tensor
    index: torch.Tensor


@torch.library.custom_op("vidtok::topk_per_frame", mutates_args=())
def _topk_per_frame_op(scores: torch.Tensor, budgets: torch.Tensor, capacity: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _backend.implementation("topk_per_frame", backend)(scores, budgets, capacity)


@_topk_per_frame_op.register_fake
def _(scores, budgets, capacity, backend):
    B, T, N = scores.shape
    return scores.new_empty((B, T, N), dtype=torch.bool), scores.new_empty((B, capacity), dtype=torch.int32)


def _check_budgets(budgets, B: int, T: int, N: int) -> None:
    if not isinstance(budgets, torch.Tensor):
        raise TypeError(f"budgets must be an int32/int64 torch.Tensor [B, T], got {type(budgets).__name__}")
    if budgets.dtype not in _INT_DTYPES:
        raise TypeError(f"budgets must be int32 or int64 (whole tokens per frame), got {str(budgets.dtype).replace('torch.', '')}")
    if tuple(budgets.shape) != (B, T):
        raise ValueError(f"budgets must be [B, T] = [{B}, {T}] to match scores [B, T, N], got {list(budgets.shape)}")
    _check_values("budgets", budgets < 0, ">= 0", budgets)
    _check_values("budgets", budgets > N, f"<= N = {N} (the tokens of a frame)", budgets)


def topk_per_frame(
    scores: torch.Tensor, budgets: torch.Tensor, *, capacity: int | None = None, backend: str | None = None
) -> Kept:
    """Keep exactly ``budgets[b, t]`` tokens of every frame: the highest-scoring ones.

    Args:
        scores: ``[B, T, N]`` float token scores (float32/float16/bfloat16; float64 on the reference),
            any strides. Higher is kept first; -inf ranks below every finite score. NaN is a
            ValueError; inside ``vidtok.allow_nan()`` NaN ranks as -inf (kept only when a budget
            exceeds the finite tokens of its frame, lower index first). -0.0 and 0.0 are equal.
        budgets: int32/int64 ``[B, T]``, 0 <= budgets <= N (e.g. from ``allocate_budget``). Values
            out of range are a ValueError (a device-side assert on GPUs).
        capacity: columns of ``index``, at least every video's total budget; None reads the largest
            total on the host (one sync; pass it for static shapes under torch.compile). A capacity
            below a video's total is a ValueError (a device-side assert on GPUs), never a truncation.
        backend: "reference", "triton" (N <= 4096), "cpu" (CPU tensors) or "auto" (the Triton kernel
            on GPUs, the cpu backend on CPUs).

    Returns:
        ``Kept(keep, index)``: keep bool ``[B, T, N]`` with exactly budgets[b, t] True in row (b, t);
        index int32 ``[B, capacity]``, the kept flat positions ``t * N + n`` of each video in (t, n)
        order, then -1 (gather tokens with it; ``vidtok.pack(tokens, keep)`` gives varlen rows). Ties:
        the higher score, then the lower index, identical on every backend. Not differentiable.

    The Triton kernel runs one program per frame with the frame's N scores in registers: an exact
    k-th largest by bisection on the order-preserving integer image of the float32 scores (32 counting
    passes over registers), ties at the threshold resolved by a prefix count, and the kept positions
    written at the frame's offset in ``index``: one read of the scores, one write of keep and index.
    The cpu backend takes every frame's threshold from one batched, unsorted ``torch.topk`` of the
    frames padded to a common rank (vidtok.cpu.select), then the same tie rule.
    """
    check_tensor("scores", scores, rank=3, layout="[B, T, N]", dtypes=REFERENCE_DTYPES)
    B, T, N = scores.shape
    _check_budgets(budgets, B, T, N)
    check_same_device(scores=scores, budgets=budgets)
    check_int("T * N", T * N, low=0, high=2**31 - 1, why=" (index is int32)")
    totals = budgets.sum(1)
    if capacity is None:
        capacity = int(totals.max()) if B else 0
    check_int("capacity", capacity, low=0, high=2**31 - 1)
    _check_values("capacity", totals > capacity, f"at least every video's total budget (capacity = {capacity})",
                  totals)
    check_no_nan("topk_per_frame", "scores", scores)
    args = (scores, budgets, capacity)
    chosen = _backend.choose("topk_per_frame", scores.device, scores.dtype, backend, args)
    return Kept(*_topk_per_frame_op(scores, budgets, capacity, chosen))


def _num_segments(segment_id: torch.Tensor, num_segments) -> int:
    if num_segments is None:
        return max(int(segment_id.max()) + 1, 0) if segment_id.numel() else 0
    return check_int("num_segments", num_segments, low=0, high=2**31 - 1)


def _check_segments(x, segment_id) -> tuple[int, int]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor [B, T, ...], got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must be [B, T, ...] (rank >= 2), got shape {tuple(x.shape)}")
    check_tensor("x", x, rank=x.dim(), layout="[B, T, ...]", dtypes=REFERENCE_DTYPES)
    check_tensor("segment_id", segment_id, rank=2, layout="[B, T]", dtypes=_INT_DTYPES)
    if tuple(segment_id.shape) != tuple(x.shape[:2]):
        raise ValueError(f"segment_id must be [B, T] = {list(x.shape[:2])} to match x {list(x.shape)}, got {list(segment_id.shape)}")
    check_same_device(x=x, segment_id=segment_id)
    return x.shape[0], x.shape[1]


SEGMENT_REDUCES = ("mean", "max", "sum")


def segment_reduce(x: torch.Tensor, segment_id: torch.Tensor, reduce: str = "mean", *, num_segments: int | None = None) -> torch.Tensor:
    """One row per segment: the frames (or tokens) of each segment reduced together.

    Args:
        x: ``[B, T, ...]`` float (e.g. frame embeddings ``[B, T, C]`` or tokens ``[B, T, N, C]``).
        segment_id: int ``[B, T]``, frame t belongs to segment ``segment_id[b, t]`` (any order: the
            segments need not be contiguous); ids < 0 (padding, as ``scene_boundaries`` marks it) or
            >= num_segments are ignored.
        reduce: "mean", "max" or "sum".
        num_segments: S; None reads ``segment_id.max() + 1`` on the host (one sync; pass it for static
            shapes under torch.compile).

    Returns:
        ``[B, S, ...]`` in x's dtype, accumulated in fp32 (fp64 for fp64 x); a segment without frames
        gives 0. NaN propagates (a value op). Differentiable in x (plain PyTorch: ``scatter_add`` /
        ``scatter_reduce``; for "max", tied maxima share the gradient equally, as
        ``torch.scatter_reduce``; its CUDA backward uses atomic adds).
    """
    _check_segments(x, segment_id)
    if reduce not in SEGMENT_REDUCES:
        raise ValueError(f"reduce must be one of {SEGMENT_REDUCES}, got {reduce!r}")
    return reference.segment_reduce(x, segment_id, reduce, _num_segments(segment_id, num_segments))


def segment_pool(x: torch.Tensor, segment_id: torch.Tensor, m: int, *, num_segments: int | None = None) -> torch.Tensor:
    """``m`` tokens per segment: each segment's frames average-pooled in time to m slots, whatever its
    length (Quicksviewer's fixed resampling of non-uniform segments, without its learned resampler).

    Args:
        x: ``[B, T, ...]`` float (frame embeddings ``[B, T, C]`` or tokens ``[B, T, N, C]``).
        segment_id: int ``[B, T]`` from ``scene_boundaries``: non-decreasing ids over the real
            frames, -1 for padding at the end (anything else is a ValueError: a segment must be a
            run of consecutive frames).
        m: >= 1 slots per segment.
        num_segments: S; None reads ``segment_id.max() + 1`` on the host (one sync).

    Returns:
        ``[B, S, m, ...]`` in x's dtype: slot i of a segment of L frames starting at frame a is the
        mean of frames a + floor(i L / m) ... a + ceil((i + 1) L / m) - 1, exactly
        ``adaptive_avg_pool1d``'s bins (a segment shorter than m repeats frames); an empty segment
        gives zeros. Prefix sums in float64, no loop over segments. Differentiable in x.
    """
    B, T = _check_segments(x, segment_id)
    check_int("m", m, low=1, high=2**31 - 1)
    if T > 1:
        a, b = segment_id[:, :-1].long(), segment_id[:, 1:].long()
        broken = ((a >= 0) & (b >= 0) & (b < a)) | ((a < 0) & (b >= 0))
        _check_values("segment_id", broken, "non-decreasing over the real frames with -1 padding only at the "
                      "end (segments of consecutive frames, as scene_boundaries gives)", b)
    return reference.segment_pool(x, segment_id, m, _num_segments(segment_id, num_segments))


def clip_select(relevance: torch.Tensor, num_clips: int, clip_len: int) -> torch.Tensor:
    """``num_clips`` non-overlapping clips of ``clip_len`` consecutive frames around the most relevant
    frames (F2C's key clips under a fixed token budget: num_clips * clip_len frames).

    Each frame t is a candidate anchor of the clip starting at ``s(t) = clamp(t - (clip_len - 1) // 2,
    0, T - clip_len)`` (centred on it, shifted to stay inside the video). Anchors are taken greedily by
    relevance (``greedy_select`` with ``timestamps = s`` and ``min_gap = clip_len``, so no two clips
    overlap); ties: the higher relevance, then the lower frame index.

    Args:
        relevance: ``[B, T]`` or ``[B, Q, T]`` float (e.g. ``frame_scores(...).relevance``); non-finite
            scores are never anchors; NaN is a ValueError.
        num_clips, clip_len: >= 1.

    Returns:
        int32 ``[B, num_clips, clip_len]`` (``[B, Q, num_clips, clip_len]``): the frames of each clip,
        clips sorted by time; clips that do not fit (fewer than num_clips non-overlapping clips, or
        no finite score left) and frames past the video's end (clip_len > T) are -1. No host sync.
    """
    _check_2d_or_3d("relevance", relevance, "[B, T] or [B, Q, T]")
    check_int("num_clips", num_clips, low=1, high=2**31 - 1)
    check_int("clip_len", clip_len, low=1, high=2**31 - 1)
    squeeze = relevance.dim() == 2
    rel = relevance[:, None] if squeeze else relevance
    B, Q, T = rel.shape
    t = torch.arange(T, device=rel.device)
    start = (t - (clip_len - 1) // 2).clamp(min=0).clamp(max=max(T - clip_len, 0))
    exact = torch.float32 if T <= 2**24 else torch.float64  # clip starts as exact float times
    anchors = greedy_select(rel, num_clips, min_gap=clip_len, timestamps=start.to(exact).expand(B, T).contiguous())
    first = start[anchors.clamp(min=0).long()]  # [B, Q, num_clips]
    frames = first[..., None] + torch.arange(clip_len, device=rel.device)
    frames = torch.where((anchors[..., None] >= 0) & (frames < T), frames, -1).to(torch.int32)
    return frames[:, 0] if squeeze else frames

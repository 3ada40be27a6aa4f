"""Similarity-based frame selection over cached frame embeddings.

Long-video LLMs choose which frames to show the model from per-frame embeddings (CLIP, SigLIP):
relevance to the question, similarity of consecutive frames, then a selection rule. These ops do
each stage batched over videos and queries, deterministically (ties: higher gain, then the lower
frame index), with every selection returned as int32 indices sorted by time and padded with -1.

frame_scores, greedy_select, dpp_select and scene_boundaries are ``torch.library.custom_op``s in the
``vidtok`` namespace whose last argument is the backend chosen in Python (``vidtok._backend`` says
which backends each has). ``segment_topk`` and ``uniform_indices`` are plain PyTorch functions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vidtok import _backend
from vidtok._numerics import REFERENCE_DTYPES
from vidtok._validation import check_float, check_int, check_no_nan, check_same_device, check_tensor
from vidtok.reference import select as reference

__all__ = ["Scores", "dpp_select", "frame_scores", "greedy_select", "scene_boundaries", "segment_topk", "uniform_indices"]

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


def segment_topk(scores: torch.Tensor, seg_id: torch.Tensor, k_per_segment: int) -> torch.Tensor:
    """The ``k_per_segment`` highest-scoring frames of every segment (AKS leaves, one anchor per event).

    Args:
        scores: ``[B, T]`` or ``[B, Q, T]`` float; infinite scores are never selected; NaN is a
            ValueError (inside ``vidtok.allow_nan()``: never selected).
        seg_id: int ``[B, T]`` segment ids (``scene_boundaries``); frames with seg_id < 0 are skipped.
        k_per_segment: >= 1; a segment with fewer eligible frames gives all of them.

    Returns:
        int32 ``[B, S * k_per_segment]`` (``[B, Q, ...]`` for 3-D scores) sorted by time and padded with
        -1, S = seg_id.max() + 1. Ties to the lower index. S is read on the host (a data-dependent size):
        plain PyTorch, not a custom op.
    """
    _check_2d_or_3d("scores", scores, "[B, T] or [B, Q, T]")
    check_tensor("seg_id", seg_id, rank=2, layout="[B, T]", dtypes=_INT_DTYPES)
    if (seg_id.shape[0], seg_id.shape[1]) != (scores.shape[0], scores.shape[-1]):
        raise ValueError(f"seg_id must be [B, T] = [{scores.shape[0]}, {scores.shape[-1]}], got {list(seg_id.shape)}")
    check_int("k_per_segment", k_per_segment, low=1, high=2**31 - 1)
    check_same_device(scores=scores, seg_id=seg_id)
    check_no_nan("segment_topk", "scores", scores)
    return reference.segment_topk(scores, seg_id, k_per_segment)


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

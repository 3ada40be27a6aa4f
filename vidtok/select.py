"""Similarity-based frame selection over cached frame embeddings (issue 5).

Long-video LLMs choose which frames to show the model from per-frame embeddings (CLIP, SigLIP):
relevance to the question, similarity of consecutive frames, then a selection rule. These ops do
each stage batched over videos and queries, deterministically (ties: higher gain, then the lower
frame index), with every selection returned as int32 indices sorted by time and padded with -1.

``frame_scores`` has a fused Triton scan; ``greedy_select`` and ``dpp_select`` have a persistent
CUDA C++ kernel (csrc/select.cu: one thread block runs all k steps of a (video, query) problem);
``scene_boundaries`` runs the vectorised PyTorch reference on every device. Each is a
``torch.library.custom_op`` in the ``vidtok`` namespace whose last argument is the resolved backend.
``segment_topk`` and ``uniform_indices`` are plain PyTorch functions.
"""

from __future__ import annotations

import torch

from vidtok import _backend
from vidtok._backend import FLOAT_DTYPES
from vidtok._validation import check_int, check_same_device, check_tensor
from vidtok.reference import select as ref
from vidtok.reference.select import Scores

__all__ = ["Scores", "dpp_select", "frame_scores", "greedy_select", "scene_boundaries", "segment_topk", "uniform_indices"]

_DTYPES = FLOAT_DTYPES + (torch.float64,)
_INT_DTYPES = (torch.int32, torch.int64)


def _reference_only(op: str):
    def reasons(backend: str) -> list[str]:
        if backend == "reference":
            return []
        return [f"vidtok.{op} has no {backend} kernel (its vectorised reference runs on every device)"]

    return reasons


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
    check_tensor(name, t, rank=t.dim(), layout=layout, dtypes=_DTYPES)


def _check_float(name: str, value, *, low: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if value != value or (low is not None and value < low):  # value != value: NaN (math.isnan breaks dynamo)
        raise ValueError(f"{name} must be a number >= {low}, got {value}" if low is not None else f"{name} must not be NaN")
    return value


# ---------------------------------------------------------------------------------------------------
# frame_scores


def _frame_scores_triton(x, query, scale, bias, lengths):
    from vidtok.kernels import select as kernels

    return kernels.frame_scores(x, query, scale, bias, lengths)


def _frame_scores_reasons(backend: str) -> list[str]:
    # one fused memory-bound scan; the Triton kernel is its GPU path, there is no CUDA C++ version
    return ["vidtok.frame_scores has no cuda kernel (the Triton scan is its GPU path)"] if backend == "cuda" else []


_FRAME_SCORES = {"reference": lambda *a: tuple(ref.frame_scores(*a)), "triton": _frame_scores_triton}


@torch.library.custom_op("vidtok::frame_scores", mutates_args=())
def _frame_scores_op(
    x: torch.Tensor, query: torch.Tensor | None, scale: float, bias: float, lengths: torch.Tensor | None, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _FRAME_SCORES[backend](x, query, scale, bias, lengths)


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
        for pairs touching them, norm 0. A NaN in a frame gives NaN relevance (never selected by
        greedy_select) and NaN for its adjacent pairs (never a cut in scene_boundaries). Not differentiable.

    The Triton kernel is one pass over x for all queries and the adjacency (the scan behind TASS,
    AKS, BOLT relevance and TDC/SceneTilling cuts; research note §6.3).
    """
    check_tensor("x", x, rank=3, layout="[B, T, C]", dtypes=_DTYPES)
    B, T, C = x.shape
    if T < 1:
        raise ValueError(f"x must have at least 1 frame (x.shape[1] = T), got shape {tuple(x.shape)}")
    if query is not None:
        check_tensor("query", query, rank=3, layout="[B, Q, C]", dtypes=_DTYPES)
        if query.shape[0] != B or query.shape[2] != C:
            raise ValueError(
                f"query must be [B, Q, C] = [{B}, Q, {C}] to match x [B, T, C] = {list(x.shape)}, got {list(query.shape)}"
            )
        if query.dtype != x.dtype:
            raise TypeError(f"query must have x's dtype {x.dtype}, got {query.dtype}")
    _check_lengths(lengths, B, T)
    check_same_device(x=x, query=query, lengths=lengths)
    scale = _check_float("scale", scale)
    bias = _check_float("bias", bias)
    chosen = _backend.select("frame_scores", x.device, x.dtype, backend, _frame_scores_reasons)
    return Scores(*_frame_scores_op(x, query, scale, bias, lengths, chosen))


# ---------------------------------------------------------------------------------------------------
# The persistent CUDA C++ kernels of greedy_select and dpp_select (csrc/select.cu)

# Pool mode (research/selection.md §6.3): up to GRAM_MAX_T frames the kernels can read each step's
# similarities from the Gram matrix of the unit rows (one GEMM over the video first) instead of
# making one pass over x per step. Both give the same values (every Gram entry is the kernel's own
# fmaf chain over the channels), so the choice changes speed only, never a pick. Videos are processed
# in chunks whose Gram matrices fit GRAM_BUDGET_BYTES.
GRAM_MAX_T = 8192
GRAM_BUDGET_BYTES = 1 << 30
_SIMS_PATH: str | None = None  # "gram" or "stream" forces a path (the tests check that they agree)
_FORCE_GLOBAL_STATE = False  # True keeps per-candidate state in global scratch at any T (tests)
_F32_OVERFLOW = 2.0**128 - 2.0**103  # Python floats at or above this round to inf in float32


def _f32(value: float) -> float:
    """value rounded to float32 as torch rounds a Python scalar against a float32 tensor."""
    return float(torch.tensor(value, dtype=torch.float32))


def _use_gram(device: torch.device, B: int, Q: int, T: int, k: int) -> bool:
    """Pool mode or streaming. A guess until measured on a GPU (bench/NOTES.md): the Gram costs about
    B * T^2 * C / 2 FMAs spread over the whole GPU (~1.4e13 FMA/s on an H100), streaming min(k, T)
    passes of T * C * 4 bytes per problem through one SM (~1e11 B/s) in ceil(B * Q / SMs) waves."""
    if _SIMS_PATH is not None:
        return _SIMS_PATH == "gram"
    if T > GRAM_MAX_T:
        return False
    waves = -(-B * Q // torch.cuda.get_device_properties(device).multi_processor_count)
    return B * T <= 1000 * min(k, T) * max(waves, 1)


def _video_chunks(B: int, T: int, gram: bool):
    """(b0, b1) ranges of videos processed together: all at once when streaming, else as many as
    GRAM_BUDGET_BYTES of Gram matrices hold (at least one)."""
    step = max(1, GRAM_BUDGET_BYTES // (T * T * 4)) if gram else max(B, 1)
    return [(b0, min(b0 + step, B)) for b0 in range(0, B, step)]


def _unit_rows_channel_major(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(xt [B, C, T] float32, finite [B, T], norms [B, T]): the reference's own unit rows, transposed so
    that a warp of the kernel reads 32 consecutive frames of one channel."""
    xn, finite, norms = ref._unit_rows(x, torch.float32)
    return xn.transpose(1, 2).contiguous(), finite, norms


def _greedy_select_cuda(relevance, k, x, lam, min_gap, sim_thresh, pool, pool_top, timestamps):
    B, Q, T = relevance.shape
    device, f32 = relevance.device, torch.float32
    picks = torch.full((B, Q, k), -1, dtype=torch.int32, device=device)
    if B * Q == 0 or T == 0:
        return picks
    rel = relevance.to(f32)
    eligible = torch.isfinite(rel)
    sims = lam != 0.0 or sim_thresh is not None
    xt = None
    if sims:
        xt, finite, _ = _unit_rows_channel_major(x)
        eligible = eligible & finite[:, None, :]
    eligible = ref.candidate_pool(rel, eligible, pool, pool_top)
    # the kernel's per-candidate state: relevance, NaN once a frame is not (or no longer) a candidate
    state = torch.where(eligible, rel, torch.full_like(rel, float("nan"))).contiguous()
    gap = min_gap > 0
    pos, pos_sb = None, 0
    if gap:
        if timestamps is not None:
            pos, pos_sb = timestamps.to(f32).contiguous(), T
        else:
            pos = torch.arange(T, device=device, dtype=f32)  # the reference's frame positions, one row shared
    ms = torch.empty_like(state) if sims else None
    use_gram = sims and _use_gram(device, B, Q, T, k)
    module = _backend.cuda_module()
    lam32, thresh32, gap32 = _f32(lam), _f32(sim_thresh if sim_thresh is not None else 0.0), _f32(min_gap)
    C = 0 if xt is None else xt.shape[1]
    with torch.cuda.device(device):
        stream = _backend.cuda_stream(relevance)
        for b0, b1 in _video_chunks(B, T, use_gram):
            gram = None
            if use_gram:
                gram = torch.empty((b1 - b0, T, T), device=device, dtype=f32)
                module.select_gram(xt[b0:b1].data_ptr(), gram.data_ptr(), b1 - b0, T, C, stream)
            module.greedy_select(
                state[b0:b1].data_ptr(), 0 if pos is None else pos.data_ptr() + 4 * b0 * pos_sb, pos_sb,
                0 if (xt is None or use_gram) else xt[b0:b1].data_ptr(), 0 if gram is None else gram.data_ptr(),
                0 if ms is None else ms[b0:b1].data_ptr(), picks[b0:b1].data_ptr(), b1 - b0, Q, T, C, k,
                lam != 0.0, lam32, sim_thresh is not None, thresh32, gap, gap32, _FORCE_GLOBAL_STATE, stream,
            )
    return ref._sort_by_time(picks, T)[0]


def _stale_module(name: str) -> list[str]:
    """A vidtok._C built before csrc/select.cu has no selection kernels: say so (auto then falls back)."""
    if _backend.cuda_module_error() is None and not hasattr(_backend.cuda_module(), name):
        return [f"vidtok._C was built without the {name} kernel; rebuild it (VIDTOK_BUILD_CUDA=1 pip install -e .)"]
    return []


def _greedy_reasons(x, timestamps, lam: float, T: int):
    def reasons(backend: str) -> list[str]:
        if backend == "triton":
            return ["vidtok.greedy_select has no triton kernel (its GPU path is the CUDA C++ persistent kernel)"]
        if backend != "cuda":
            return []
        out = _stale_module("greedy_select")
        if any(t is not None and t.dtype == torch.float64 for t in (x, timestamps)):
            out.append("float64 x or timestamps make the reference compute in float64; the cuda kernel computes in float32")
        if not abs(lam) < _F32_OVERFLOW:
            out.append(f"the cuda kernel needs lam finite in float32, got {lam}")
        if T >= 2**31 - 1:
            out.append(f"the cuda kernel takes T < 2^31 - 1 frames, got {T}")
        return out

    return reasons


_GREEDY_SELECT = {"reference": ref.greedy_select, "cuda": _greedy_select_cuda}


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
    return _GREEDY_SELECT[backend](relevance, k, x, lam, min_gap, sim_thresh, pool, pool_top, timestamps)


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
            non-finite score (-inf padding, NaN) are never selected.
        k: frames to select per (video, query), >= 1. More than can be chosen is not an error: the
            result is padded with -1.
        x: ``[B, T, C]`` frame embeddings, required when lam != 0 or sim_thresh is set. Frames with a
            NaN/inf embedding are then never selected.
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
    check_tensor("relevance", relevance, rank=3, layout="[B, Q, T]", dtypes=_DTYPES)
    B, Q, T = relevance.shape
    check_int("k", k, low=1, high=2**31 - 1)
    lam = _check_float("lam", lam)
    if isinstance(min_gap, bool) or not isinstance(min_gap, (int, float)):
        raise TypeError(f"min_gap must be an int or float, got {type(min_gap).__name__}")
    if not min_gap >= 0:
        raise ValueError(f"min_gap must be >= 0, got {min_gap}")
    if sim_thresh is not None:
        sim_thresh = _check_float("sim_thresh", sim_thresh)
    if (lam != 0.0 or sim_thresh is not None) and x is None:
        raise ValueError("x (frame embeddings [B, T, C]) is required when lam != 0 or sim_thresh is set")
    if x is not None:
        check_tensor("x", x, rank=3, layout="[B, T, C]", dtypes=_DTYPES)
        if x.shape[:2] != (B, T):
            raise ValueError(f"x must be [B, T, C] with B = {B}, T = {T} to match relevance [B, Q, T], got {list(x.shape)}")
    if timestamps is not None:
        check_tensor("timestamps", timestamps, rank=2, layout="[B, T]", dtypes=_DTYPES)
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
    reasons = _greedy_reasons(x, timestamps, lam, T)
    chosen = _backend.select("greedy_select", relevance.device, relevance.dtype, backend, reasons)
    return _greedy_select_op(relevance, k, x, lam, float(min_gap), sim_thresh, pool_name, pool_top, timestamps, chosen)


# ---------------------------------------------------------------------------------------------------
# dpp_select


def _dpp_select_cuda(x, k, quality, eps):
    B, T, _ = x.shape
    device, f32 = x.device, torch.float32
    xt, finite, norms = _unit_rows_channel_major(x)
    # q, L_ii and eps * L_ii with the reference's tensor ops (bit-identical on the same device)
    q = torch.ones(B, 1, T, dtype=f32, device=device) if quality is None else quality.to(f32)
    q = torch.where(torch.isfinite(q), q, torch.zeros_like(q)).contiguous()
    Q, C = q.shape[1], xt.shape[1]
    diag = (q.square() * (finite & (norms > 0)).to(f32)[:, None, :]).contiguous()
    thr = (eps * diag).contiguous()
    picks = torch.full((B, Q, k), -1, dtype=torch.int32, device=device)
    d2_pick = torch.zeros((B, Q, k), dtype=f32, device=device)
    if B * Q > 0 and T > 0:
        d2 = torch.empty((B, Q, T), dtype=f32, device=device)
        cf = torch.empty((B, Q, min(k, T), T), dtype=f32, device=device)  # rows of the Cholesky factor
        use_gram = _use_gram(device, B, Q, T, k)
        module = _backend.cuda_module()
        with torch.cuda.device(device):
            stream = _backend.cuda_stream(x)
            for b0, b1 in _video_chunks(B, T, use_gram):
                gram = None
                if use_gram:
                    gram = torch.empty((b1 - b0, T, T), device=device, dtype=f32)
                    module.select_gram(xt[b0:b1].data_ptr(), gram.data_ptr(), b1 - b0, T, C, stream)
                module.dpp_select(
                    q[b0:b1].data_ptr(), diag[b0:b1].data_ptr(), thr[b0:b1].data_ptr(),
                    0 if use_gram else xt[b0:b1].data_ptr(), 0 if gram is None else gram.data_ptr(),
                    d2[b0:b1].data_ptr(), cf[b0:b1].data_ptr(), picks[b0:b1].data_ptr(), d2_pick[b0:b1].data_ptr(),
                    b1 - b0, Q, T, C, k, _FORCE_GLOBAL_STATE, stream,
                )
    # the reference's gain: log of the residual at the pick, 0 beside padding
    gains = torch.where(picks >= 0, d2_pick.clamp_min(torch.finfo(f32).tiny).log(), torch.zeros_like(d2_pick))
    return ref._sort_by_time(picks, T, gains)


def _dpp_reasons(quality, T: int):
    def reasons(backend: str) -> list[str]:
        if backend == "triton":
            return ["vidtok.dpp_select has no triton kernel (its GPU path is the CUDA C++ persistent kernel)"]
        if backend != "cuda":
            return []
        out = _stale_module("dpp_select")
        if quality is not None and quality.dtype == torch.float64:
            out.append("float64 quality makes the reference compute in float64; the cuda kernel computes in float32")
        if T >= 2**31 - 1:
            out.append(f"the cuda kernel takes T < 2^31 - 1 frames, got {T}")
        return out

    return reasons


_DPP_SELECT = {"reference": ref.dpp_select, "cuda": _dpp_select_cuda}


@torch.library.custom_op("vidtok::dpp_select", mutates_args=())
def _dpp_select_op(
    x: torch.Tensor, k: int, quality: torch.Tensor | None, eps: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return _DPP_SELECT[backend](x, k, quality, eps)


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
            Frames with zero or non-finite quality or embedding are never chosen (pass 0 for padding).
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
    check_tensor("x", x, rank=3, layout="[B, T, C]", dtypes=_DTYPES)
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
    eps = _check_float("eps", eps, low=0.0)
    check_same_device(x=x, quality=quality)
    chosen = _backend.select("dpp_select", x.device, x.dtype, backend, _dpp_reasons(quality, T))
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
    return ref.scene_boundaries(adjacent, method, threshold, k, min_len, window, min_change, lengths)


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
            NaN pairs never cut.
        method: where to cut between frames t and t + 1:
            "threshold": adjacent[t] < threshold (required);
            "lowest_k": the k lowest similarities (TDC, Hoar012/TDC-Video; k required);
            "mean_std": TextTiling depth (lpeak + rpeak - 2 a_t, VideoLLaMB SceneTilling, an O(T)
            scan) above mean + alpha * std of the video's depths, alpha = threshold (default 0.5);
            "adaptive": PySceneDetect AdaptiveDetector on change = 1 - adjacent: change_t over the mean
            change of the ``window`` neighbours each side >= threshold (default 3.0) and
            change_t >= min_change.
        k: for lowest_k the number of cuts; otherwise an optional cap (the strongest cuts kept:
            lowest similarity, deepest depth, highest ratio; ties to the lower index).
        min_len: >= 1; in time order, a cut that would close a segment shorter than min_len frames is
            dropped (PySceneDetect's min_scene_len), merging the short segment into the next one.
            The reference loops over the kept cuts and reads one flag per iteration on the host.
        lengths: int ``[B]``, frames at t >= lengths[b] are padding (segment id -1; no cut touches them).

    Returns:
        int32 ``[B, T]``, non-decreasing segment ids starting at 0 (-1 for padding).
    """
    check_tensor("adjacent", adjacent, rank=2, layout="[B, T - 1]", dtypes=_DTYPES)
    B, n = adjacent.shape
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if threshold is not None:
        threshold = _check_float("threshold", threshold)
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
    min_change = _check_float("min_change", min_change)
    _check_lengths(lengths, B, n + 1)
    check_same_device(adjacent=adjacent, lengths=lengths)
    chosen = _backend.select("scene_boundaries", adjacent.device, adjacent.dtype, backend, _reference_only("scene_boundaries"))
    return _scene_boundaries_op(adjacent, method, threshold, k, min_len, window, min_change, lengths, chosen)


def segment_topk(scores: torch.Tensor, seg_id: torch.Tensor, k_per_segment: int) -> torch.Tensor:
    """The ``k_per_segment`` highest-scoring frames of every segment (AKS leaves, one anchor per event).

    Args:
        scores: ``[B, T]`` or ``[B, Q, T]`` float; non-finite scores are never selected.
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
    return ref.segment_topk(scores, seg_id, k_per_segment)


def uniform_indices(T: int, k: int, *, mode: str = "linspace", device: str | torch.device | None = None) -> torch.Tensor:
    """k evenly spaced frame indices of a T-frame video: the baseline every selection paper compares to.

    mode "linspace" (default): ``floor(i * (T - 1) / (k - 1))``, i = 0..k-1 (0 for k = 1), computed
    exactly in integers, first and last frame included. mode "numpy": bit-compatible with
    ``np.linspace(0, T - 1, k, dtype=int)`` (lmms-eval's uniform sampling), whose float rounding
    gives one frame less than "linspace" where i * (T - 1) / (k - 1) is an integer (e.g. T = 1996,
    k = 246, i = 119: 968 instead of 969). mode "center": ``floor((2i + 1) * T / (2k))``, the centre
    frame of each of k equal bins. Returns int32 ``[k]``; when k > T, the T frames then -1 padding.
    """
    check_int("T", T, low=0, high=2**62)
    check_int("k", k, low=1, high=2**31 - 1)
    if mode not in ("linspace", "numpy", "center"):
        raise ValueError(f"mode must be 'linspace', 'numpy' or 'center', got {mode!r}")
    return ref.uniform_indices(T, k, mode, device)

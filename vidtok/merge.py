"""Temporal token merging: similarity of tokens across time, matching, and merging them.

Each op is a ``torch.library.custom_op`` in the ``vidtok`` namespace whose arguments include the
backend chosen in Python, so the choice is recorded in a traced graph and replayed as is. Which
backends each op has, and in which order "auto" tries them, is declared once in ``vidtok._backend``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vidtok import _backend
from vidtok._numerics import REFERENCE_DTYPES, accumulation_dtype
from vidtok._validation import check_float, check_int, check_no_nan, check_positive, check_same_device, check_tensor, require
from vidtok.reference import merge as reference

__all__ = [
    "Merged", "bipartite_merge", "connected_components_merge", "dpc_knn_merge", "match", "merge_by_assignment",
    "paired_similarity", "temporal_merge", "unmerge",
]


# ---------------------------------------------------------------------------------------------------
# paired_similarity


@torch.library.custom_op("vidtok::paired_similarity", mutates_args=())
def _paired_similarity_op(x: torch.Tensor, lag: int, backend: str) -> torch.Tensor:
    return _backend.implementation("paired_similarity", backend)(x, lag)


@_paired_similarity_op.register_fake
def _(x, lag, backend):
    B, T, N, _ = x.shape
    return x.new_empty((B, T - lag, N), dtype=accumulation_dtype(x.dtype))


@torch.library.custom_op("vidtok::paired_similarity_backward", mutates_args=())
def _paired_similarity_backward_op(grad: torch.Tensor, x: torch.Tensor, lag: int, backend: str) -> torch.Tensor:
    return _backend.implementation("paired_similarity", backend, "paired_similarity_backward")(grad, x, lag)


@_paired_similarity_backward_op.register_fake
def _(grad, x, lag, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _paired_similarity_setup(ctx, inputs, output):
    x, lag, backend = inputs
    ctx.save_for_backward(x)
    ctx.lag = lag
    ctx.backend = backend


def _paired_similarity_grad(ctx, grad):
    (x,) = ctx.saved_tensors
    return _paired_similarity_backward_op(grad, x, ctx.lag, ctx.backend), None, None


_paired_similarity_op.register_autograd(_paired_similarity_grad, setup_context=_paired_similarity_setup)


def paired_similarity(x: torch.Tensor, lag: int = 1, *, backend: str | None = None) -> torch.Tensor:
    """Cosine similarity of every token with the same token ``lag`` frames earlier.

    Args:
        x: ``[B, T, N, C]`` tokens — B videos, T frames, N tokens per frame, C channels; float32,
            float16 or bfloat16, any strides (float64 runs on the reference backend, for gradcheck).
        lag: frames between the compared tokens, ``1 <= lag < T``.
        backend: "reference", "triton", "cuda" or "auto" (default: ``use_backend``/``VIDTOK_BACKEND``,
            else auto).

    Returns:
        float32 (float64 for float64 x) ``[B, T - lag, N]``: ``out[b, t, n] = cos(x[b, t + lag, n], x[b, t, n])`` computed as
        ``F.cosine_similarity``: dot / (max(|a|, 1e-8) * max(|b|, 1e-8)), accumulated in fp32. A zero
        token gives 0, not NaN; a NaN in a token gives NaN for the pairs it is in. Differentiable in x.

    This is the signal FrameFusion (Fu et al. 2024), DyCoke (Tao et al. 2025), PruneVid and vLLM's
    EVS threshold to find tokens that did not change between frames. One read of x; no host sync.
    """
    check_tensor("x", x, rank=4, layout="[B, T, N, C]", dtypes=REFERENCE_DTYPES)
    T = x.shape[1]
    if T < 2:
        raise ValueError(f"x must have at least 2 frames to compare (x.shape[1] = T), got shape {tuple(x.shape)}")
    check_int("lag", lag, low=1, high=T - 1, why=f" for x with T = {T} frames")
    chosen = _backend.choose("paired_similarity", x.device, x.dtype, backend, (x, lag))
    return _paired_similarity_op(x, lag, chosen)


# ---------------------------------------------------------------------------------------------------
# match

GROUP_DTYPES = (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)


@torch.library.custom_op("vidtok::match", mutates_args=())
def _match_op(
    a: torch.Tensor, b: torch.Tensor, a_group: torch.Tensor | None, b_group: torch.Tensor | None, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return _backend.implementation("match", backend)(a, b, a_group, b_group)


@_match_op.register_fake
def _(a, b, a_group, b_group, backend):
    B, M, _ = a.shape
    return a.new_empty((B, M), dtype=accumulation_dtype(a.dtype)), a.new_empty((B, M), dtype=torch.int32)


def match(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    a_group: torch.Tensor | None = None,
    b_group: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every row of ``a``, its most cosine-similar row of ``b``.

    Args:
        a: ``[B, M, D]``, b: ``[B, K, D]`` — float32, float16 or bfloat16 of one dtype, any strides
            (float64 runs on the reference backend).
        a_group, b_group: optional integer group ids ``[B, M]`` and ``[B, K]`` (both or neither): only
            rows of equal group are compared (per-frame or windowed matching).
        backend: "reference", "triton" or "auto".

    Returns:
        ``(score, idx)``: score float32 (float64 for float64 inputs) ``[B, M]``, the best cosine
        similarity dot / (max(|a|, 1e-8) * max(|b|, 1e-8)) accumulated in fp32; idx int32 ``[B, M]``,
        the row of b achieving it. Ties go to the lowest index. A row with no allowed partner (K = 0,
        or no row of its group) gets -inf and -1. NaN in a or b is a ValueError (a NaN token would
        silently never match); inside ``vidtok.allow_nan()`` NaN similarities never match.
        Not differentiable (the matching step of ToMe, Bolya et al. 2023, runs under no_grad).

    The Triton kernel never materialises the ``[M, K]`` matrix (running max/argmax over tiles of b,
    tiles whose groups cannot meet are skipped); the reference builds it 1024 rows of a at a time.
    Group tiles are skipped only when group ids are sorted enough for a tile's range to exclude them.
    """
    check_tensor("a", a, rank=3, layout="[B, M, D]", dtypes=REFERENCE_DTYPES)
    check_tensor("b", b, rank=3, layout="[B, K, D]", dtypes=REFERENCE_DTYPES)
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must have one dtype, got {a.dtype} and {b.dtype}")
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(f"a [B, M, D] and b [B, K, D] must agree on B and D, got {tuple(a.shape)} and {tuple(b.shape)}")
    if (a_group is None) != (b_group is None):
        raise ValueError("pass both a_group and b_group, or neither")
    if a_group is not None:
        check_tensor("a_group", a_group, rank=2, layout="[B, M]", dtypes=GROUP_DTYPES)
        check_tensor("b_group", b_group, rank=2, layout="[B, K]", dtypes=GROUP_DTYPES)
        if tuple(a_group.shape) != tuple(a.shape[:2]):
            raise ValueError(f"a_group must be [B, M] = {tuple(a.shape[:2])}, got {tuple(a_group.shape)}")
        if tuple(b_group.shape) != tuple(b.shape[:2]):
            raise ValueError(f"b_group must be [B, K] = {tuple(b.shape[:2])}, got {tuple(b_group.shape)}")
        a_group, b_group = a_group.to(torch.int32), b_group.to(torch.int32)
    check_same_device(a=a, b=b, a_group=a_group, b_group=b_group)
    check_no_nan("match", "a", a)
    check_no_nan("match", "b", b)
    chosen = _backend.choose("match", a.device, a.dtype, backend, (a, b, a_group, b_group))
    return _match_op(a, b, a_group, b_group, chosen)


# ---------------------------------------------------------------------------------------------------
# bipartite_merge and unmerge


class Merged(NamedTuple):
    """The result of a merge.

    x: ``[B, L, C]`` merged tokens (x's dtype). size: ``[B, L]`` how many original tokens each output
    represents (fp32; fp64 for fp64 x). index: int32 ``[B, N]``, the output slot of every input token.
    origin: int32 ``[B, L]``, the input position of each output's representative (the token that kept
    its place: a destination or an unmerged token). lengths: int64 ``[B]``, the valid outputs of each
    video when outputs are padded (temporal_merge, connected_components_merge; padding has x = 0,
    size = 0, origin = -1, so log_size is -inf there); None for bipartite_merge, merge_by_assignment
    and dpc_knn_merge. grid: (T, h, w) of the merged positions for
    temporal_merge (what ``VideoLayout.from_merge`` needs to place the outputs); None for
    bipartite_merge, whose caller knows how its N tokens lie.
    """

    x: torch.Tensor
    size: torch.Tensor
    index: torch.Tensor
    origin: torch.Tensor
    lengths: torch.Tensor | None = None
    grid: tuple[int, int, int] | None = None

    @property
    def log_size(self) -> torch.Tensor:
        """``log(size)`` ``[B, L]``: the bias proportional attention adds to each key's logits
        (ToMe, Bolya et al. 2023, Sec. 3: softmax(QK^T / sqrt(d) + log s))."""
        return torch.log(self.size)


@torch.library.custom_op("vidtok::bipartite_assignment", mutates_args=())
def _bipartite_assignment_op(
    metric: torch.Tensor, r: int, protect: int, order: str, a_mask: torch.Tensor | None, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return _backend.implementation("bipartite_merge", backend, "bipartite_assignment")(metric, r, protect, order, a_mask)


@_bipartite_assignment_op.register_fake
def _(metric, r, protect, order, a_mask, backend):
    B, N, _ = metric.shape
    return metric.new_empty((B, N), dtype=torch.int32), metric.new_empty((B, N - r), dtype=torch.int32)


@torch.library.custom_op("vidtok::merge_tokens", mutates_args=())
def _merge_tokens_op(
    x: torch.Tensor, size: torch.Tensor, index: torch.Tensor, origin: torch.Tensor, mode: str, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    # both merges end with this step; their records list the same backends for it
    return _backend.implementation("bipartite_merge", backend, "merge_tokens")(x, size, index, origin, mode)


@_merge_tokens_op.register_fake
def _(x, size, index, origin, mode, backend):
    B, _, C = x.shape
    L = origin.shape[1]
    return x.new_empty((B, L, C)), x.new_empty((B, L), dtype=accumulation_dtype(x.dtype))


# The backward is a gather and a scale (no float scatter, so deterministic): the same PyTorch code
# serves every backend.
@torch.library.custom_op("vidtok::merge_tokens_backward", mutates_args=())
def _merge_tokens_backward_op(
    grad: torch.Tensor, size: torch.Tensor, size_out: torch.Tensor, index: torch.Tensor, origin: torch.Tensor, mode: str
) -> torch.Tensor:
    return reference.merge_tokens_backward(grad, size, size_out, index, origin, mode)


@_merge_tokens_backward_op.register_fake
def _(grad, size, size_out, index, origin, mode):
    B, _, C = grad.shape
    return grad.new_empty((B, index.shape[1], C))


def _merge_tokens_setup(ctx, inputs, output):
    _, size, index, origin, mode, _ = inputs
    ctx.save_for_backward(size, output[1], index, origin)
    ctx.mode = mode


def _merge_tokens_grad(ctx, grad, _grad_size):
    size, size_out, index, origin = ctx.saved_tensors
    grad_x = _merge_tokens_backward_op(grad, size, size_out, index, origin, ctx.mode)
    return grad_x, None, None, None, None, None


_merge_tokens_op.register_autograd(_merge_tokens_grad, setup_context=_merge_tokens_setup)


def _check_companion(name: str, t: torch.Tensor | None, x: torch.Tensor, rank: int, layout: str, dims: int):
    if t is None:
        return
    check_tensor(name, t, rank=rank, layout=layout, dtypes=REFERENCE_DTYPES)
    if tuple(t.shape[:dims]) != tuple(x.shape[:dims]):
        raise ValueError(f"{name} {layout} must match x [B, N, C] on B and N = {tuple(x.shape[:dims])}, got shape {tuple(t.shape)}")


def _check_a_mask(a_mask, x: torch.Tensor, r: int, protect: int) -> torch.Tensor:
    """a_mask as bool [B, N] after checking its type, shape, device and that every video can merge r tokens."""
    B, N, _ = x.shape
    if not isinstance(a_mask, torch.Tensor) or a_mask.dtype != torch.bool:
        got = f"{a_mask.dtype} tensor" if isinstance(a_mask, torch.Tensor) else type(a_mask).__name__
        raise TypeError(f"a_mask must be a bool tensor [N] or [B, N], got {got}")
    if tuple(a_mask.shape) not in ((N,), (B, N)):
        raise ValueError(f"a_mask must be [N] = [{N}] or [B, N] = [{B}, {N}], got shape {tuple(a_mask.shape)}")
    check_same_device(x=x, a_mask=a_mask)
    a_mask = a_mask.expand(B, N)
    if r > 0 and B > 0:
        free = a_mask[:, protect:]
        n_a = free.sum(1)
        require(((n_a >= r) & (n_a < N - protect)).all(),
                        f"a_mask must give every video at least r = {r} unprotected A tokens (True) and one "
                        f"unprotected B token (False) after the first protect = {protect} tokens")
    return a_mask


def bipartite_merge(
    x: torch.Tensor,
    r: int,
    *,
    metric: torch.Tensor | None = None,
    size: torch.Tensor | None = None,
    protect: int = 0,
    mode: str = "wmean",
    order: str = "keep",
    a_mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> Merged:
    """ToMe's bipartite soft matching (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023).

    Tokens 0, 2, 4, ... form set A and 1, 3, 5, ... set B. Every A token finds its most cosine-similar
    B token on ``metric``; the r A tokens with the highest similarity (ties: the lower position) merge
    into their partners. The first ``protect`` tokens (class, distillation or register tokens) never
    merge: protect=1 is ToMe's class_token, protect=2 its class_token + distill_token.

    Args:
        x: ``[B, N, C]`` tokens, float32/float16/bfloat16 (float64 on the reference backend).
        r: tokens to remove, ``0 <= r <= ceil((N - protect) / 2)`` rounded to the unprotected A tokens
            (0 when no unprotected B token exists); with ``a_mask``, at most the unprotected A tokens
            of every video. Unlike ToMe this does not silently clamp r.
        metric: ``[B, N, D]`` features to match on (ToMe: attention keys averaged over heads); default x.
            The matching is not differentiable (ToMe runs it under no_grad). Any float dtype on the
            reference backend; cast to x's dtype on the Triton backend.
        size: ``[B, N]`` positive token sizes (default ones), for ToMe's size tracking across layers.
        mode: "wmean" (size-weighted mean with the destination, ToMe's merge_wavg), "mean", "sum" or
            "replace" (keep the destination's value).
        order: "keep" (outputs in input order) or "tome" (ToMe's order: the protected tokens in
            position order, the unmerged A tokens by descending similarity — ascending position when
            protect > 0 — then the unprotected B tokens; r = 0 is the identity). With protect = 2
            this is [class, distillation, unmerged A, B], as ToMe's merge with class_token and
            distill_token returns it.
        a_mask: bool ``[N]`` or ``[B, N]``: True marks the tokens of set A (the sources), False those of
            set B (the destinations), in place of the even/odd alternation; the first ``protect``
            tokens stay out of both sets whatever the mask says. TempMe (Shen et al., ICLR 2025) merges
            the tokens of clip i into those of clip i + 1: a_mask True on clip i. Every video needs
            at least r unprotected A tokens and, when r > 0, an unprotected B token (a ValueError;
            a device-side assert on GPUs). The match then compares all N x N token pairs (the
            alternation needs N/2 x N/2), keeping A rows to B columns by group ids; ranks, ties and
            both orders are read with A and B from the mask, so the alternating mask gives exactly
            the default result.
        backend: "reference", "triton" or "auto". Triton: the fused match kernel, the ranking (a stable
            sort) in PyTorch, and a one-pass merge kernel (a segmented reduction over each output's
            members in position order: no atomics, bit-identical every run). The reference merges
            with scatter_add, which uses float atomics on CUDA.

    Returns:
        ``Merged(x [B, N - r, C], size [B, N - r], index int32 [B, N], origin int32 [B, N - r])``.
        Differentiable in x. NaN in the metric (x by default) is a ValueError; inside
        ``vidtok.allow_nan()`` a NaN token has no partner and ranks last, so it merges only when r
        exceeds the number of A tokens with a partner (it then goes to the first unprotected B
        token). A NaN in x but not in the metric spreads to the token it merges into. Sizes must be
        positive (a ValueError). No host sync; output shapes are static (the value checks are
        device-side asserts on GPUs).
    """
    check_tensor("x", x, rank=3, layout="[B, N, C]", dtypes=REFERENCE_DTYPES)
    B, N, C = x.shape
    metric = x if metric is None else metric
    _check_companion("metric", metric, x, 3, "[B, N, D]", 2)
    _check_companion("size", size, x, 2, "[B, N]", 2)
    check_int("protect", protect, low=0, high=N, why=f" for x with N = {N} tokens")
    if a_mask is None:
        cap = reference.max_merge(N, protect)
        check_int("r", r, low=0, high=cap, why=f" (the unprotected even tokens of N = {N} with protect = {protect})")
    else:
        check_int("r", r, low=0, high=N - protect, why=f" (the unprotected tokens of N = {N} with protect = {protect})")
        a_mask = _check_a_mask(a_mask, x, r, protect)
    if mode not in reference.MERGE_MODES:
        raise ValueError(f"mode must be one of {reference.MERGE_MODES}, got {mode!r}")
    if order not in reference.MERGE_ORDERS:
        raise ValueError(f"order must be one of {reference.MERGE_ORDERS}, got {order!r}")
    check_same_device(x=x, metric=metric, size=size)
    check_no_nan("bipartite_merge", "metric" if metric is not x else "x", metric)
    check_positive("size", size)
    chosen = _backend.choose("bipartite_merge", x.device, x.dtype, backend)
    if metric.dtype != x.dtype and chosen != "reference":  # the backend was chosen for x's dtype
        metric = metric.to(x.dtype)
    if size is None:
        size = torch.ones(B, N, device=x.device, dtype=accumulation_dtype(x.dtype))
    index, origin = _bipartite_assignment_op(metric.detach(), r, protect, order, a_mask, chosen)
    out, size_out = _merge_tokens_op(x, size.detach(), index, origin, mode, chosen)
    return Merged(out, size_out, index, origin)


def unmerge(y: torch.Tensor, merged: Merged, *, frames: int | None = None) -> torch.Tensor:
    """Undo a merge: ``[B, L, C]`` -> ``[B, N, C]`` where every input position receives its group's
    value, ``y[b, merged.index[b, n]]`` (ToMe's unmerge; tomesd unmerges after every block). For a
    temporal_merge pass ``frames=T`` to get ``[B, T, N, C]``: T must be the merge's own frame count
    (``merged.grid[0]``), which a temporal merge records. A gather, differentiable in y."""
    if not isinstance(merged, Merged):
        raise TypeError(f"merged must be a vidtok.Merged (from bipartite_merge or temporal_merge), got {type(merged).__name__}")
    check_tensor("y", y, rank=3, layout="[B, L, C]", dtypes=REFERENCE_DTYPES)
    B, L, C = y.shape
    index = merged.index
    if index.dim() != 2 or index.shape[0] != B or tuple(merged.origin.shape) != (B, L):
        raise ValueError(f"y [B, L, C] = {tuple(y.shape)} does not fit merged (index {tuple(index.shape)}, origin {tuple(merged.origin.shape)})")
    P = index.shape[1]
    if frames is not None:
        if isinstance(frames, bool) or not isinstance(frames, int) or frames <= 0 or P % frames:
            raise ValueError(f"frames must be a positive int dividing the {P} merged positions, got {frames!r}")
        if merged.grid is not None and frames != merged.grid[0]:
            raise ValueError(f"frames = {frames}, but merged comes from a merge of T = {merged.grid[0]} frames "
                             f"(merged.grid = {merged.grid})")
    out = y.gather(1, index.long()[..., None].expand(B, P, C))
    return out if frames is None else out.view(B, frames, P // frames, C)


# ---------------------------------------------------------------------------------------------------
# temporal_merge


@torch.library.custom_op("vidtok::temporal_assignment", mutates_args=())
def _temporal_assignment_op(
    metric: torch.Tensor, threshold: float | None, r: int | None, r_video: torch.Tensor | None, out_len: int | None,
    lag: int, radius: int | None, h: int, w: int, segment_id: torch.Tensor | None, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    assign = _backend.implementation("temporal_merge", backend, "temporal_assignment")
    return assign(metric, threshold, r if r_video is None else r_video, lag, radius, (h, w), segment_id, out_len)


@_temporal_assignment_op.register_fake
def _(metric, threshold, r, r_video, out_len, lag, radius, h, w, segment_id, backend):
    B, T, N, _ = metric.shape
    if out_len is not None:
        L = out_len
    else:
        L = T * N - r if r is not None else torch.library.get_ctx().new_dynamic_size()
    return (
        metric.new_empty((B, T * N), dtype=torch.int32),
        metric.new_empty((B, L), dtype=torch.int32),
        metric.new_empty((B,), dtype=torch.int64),
    )


def _frame_grid(N: int, grid) -> tuple[int, int]:
    if grid is None:
        side = int(round(N**0.5))
        if side * side != N:
            raise ValueError(f"x has N = {N} tokens per frame, not a square grid: pass grid=(h, w) with h * w = N")
        return side, side
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in grid)):
        raise TypeError(f"grid must be a pair of positive ints (h, w), got {grid!r}")
    if grid[0] * grid[1] != N:
        raise ValueError(f"grid (h, w) = {tuple(grid)} does not match N = {N} tokens per frame (h * w = {grid[0] * grid[1]})")
    return int(grid[0]), int(grid[1])


def _check_segment_id(segment_id, x: torch.Tensor, lag: int, r, r_video) -> torch.Tensor:
    """segment_id as int64 [B, T] after checking it, and that every video has its r links left."""
    B, T, N, _ = x.shape
    check_tensor("segment_id", segment_id, rank=2, layout="[B, T]", dtypes=GROUP_DTYPES)
    if tuple(segment_id.shape) != (B, T):
        raise ValueError(f"segment_id must be [B, T] = [{B}, {T}], got shape {tuple(segment_id.shape)}")
    check_same_device(x=x, segment_id=segment_id)
    segment_id = segment_id.to(torch.int64)
    if r is not None and B > 0 and T > lag:
        same = (segment_id[:, lag:] == segment_id[:, :-lag]) & (segment_id[:, lag:] >= 0)
        left = same.sum(1) * N
        wanted = r_video if r_video is not None else torch.full_like(left, r)
        require((wanted <= left).all(),
                        f"r asks for more links than segment_id leaves: video b has N * (frames in the segment "
                        f"of the frame lag = {lag} earlier) links, N = {N}")
    return segment_id


def temporal_merge(
    x: torch.Tensor,
    *,
    threshold: float | None = None,
    r: int | None = None,
    lag: int = 1,
    radius: int | None = 0,
    metric: torch.Tensor | None = None,
    size: torch.Tensor | None = None,
    mode: str = "wmean",
    grid: tuple[int, int] | None = None,
    segment_id: torch.Tensor | None = None,
    backend: str | None = None,
) -> Merged:
    """Merge tokens that persist across frames into one token per chain of matches.

    Token (t, n) links to its most cosine-similar token in frame t - lag among the positions within
    ``radius`` on the h x w grid (Chebyshev distance; radius=0: the same position, as FrameFusion,
    DyCoke and vLLM's EVS compare; radius=None: the whole frame, as FlashVID's TSTM). A link is kept
    when its similarity >= ``threshold``, or, with ``r``, the r best links of each video are kept (ties:
    higher score, then the lower position). Each token links to at most one earlier token, so the kept
    links form a forest across time; every tree becomes one output token placed at its earliest token
    (its root), and outputs are in (t, n) order of their roots. Trees are resolved on the device by
    pointer jumping (ceil(log2(T / lag)) gathers), with no host round-trip per frame.

    Args:
        x: ``[B, T, N, C]`` tokens, N = h * w per frame in row-major order; float32/float16/bfloat16
            (float64 on the reference backend).
        threshold: keep links with similarity >= threshold, in [-1, 1]. Exactly one of threshold and r.
        r: keep the r best links of each video, ``0 <= r <= (T - lag) * N``: one int for every video,
            or one per video (a list of B ints, or an integer tensor ``[B]``), so each video keeps
            exactly T*N - r_b tokens (budgets per video, e.g. from a budget allocation).
        lag: frames between linked tokens, ``1 <= lag < T`` (T = 1 with r = 0 or a threshold is fine).
        radius: search radius on the grid (int >= 0), or None for the whole frame.
        metric: ``[B, T, N, D]`` features to match on (default x); not differentiable. Cast to x's
            dtype on the Triton backend.
        size: ``[B, T, N]`` positive token sizes (default ones).
        mode: "wmean" (size-weighted mean of the tree), "mean", "sum" or "replace" (the root's value).
        grid: (h, w) when N is not a perfect square.
        segment_id: integer ``[B, T]`` segment of every frame (``scene_boundaries``; ids < 0, its
            padding, belong to no segment): a token links only to a token of a frame with the same
            segment id, so no chain crosses a segment boundary (merging never crosses a scene cut,
            as GRT and DyCoke require). With r, r_b must not exceed the links video b has left,
            N * (frames t >= lag in the segment of frame t - lag) (a ValueError; a device-side
            assert on GPUs).
        backend: "reference", "triton" or "auto". Triton: links by the paired_similarity kernel
            (radius=0), the window kernel (radius > 0) or the match kernel (radius=None); the link
            ranking (a stable sort) and pointer jumping in PyTorch; the one-pass merge kernel.

    Returns:
        ``Merged(x [B, L, C], size [B, L], index int32 [B, T*N], origin int32 [B, L], lengths [B])``
        with positions flattened as t * N + n. With one int r, every video has L = T*N - r outputs
        (static). With per-video r, video b has lengths[b] = T*N - r_b valid outputs and L = T*N -
        min r (known without a sync for a list; one host sync for a tensor). With a threshold, L =
        the most outputs of any video: a data-dependent size (one host sync to read it; under
        torch.compile an unbacked size). Shorter videos are padded with x = 0, size = 0, origin = -1. Differentiable in x. NaN in the metric (x by default) and sizes <= 0 are a
        ValueError; inside ``vidtok.allow_nan()`` a NaN token never passes a threshold and with r its
        links rank last.
    """
    check_tensor("x", x, rank=4, layout="[B, T, N, C]", dtypes=REFERENCE_DTYPES)
    B, T, N, C = x.shape
    h, w = _frame_grid(N, grid)
    metric = x if metric is None else metric
    check_tensor("metric", metric, rank=4, layout="[B, T, N, D]", dtypes=REFERENCE_DTYPES)
    if tuple(metric.shape[:3]) != (B, T, N):
        raise ValueError(f"metric [B, T, N, D] must match x on B, T, N = {(B, T, N)}, got shape {tuple(metric.shape)}")
    if size is not None:
        check_tensor("size", size, rank=3, layout="[B, T, N]", dtypes=REFERENCE_DTYPES)
        if tuple(size.shape) != (B, T, N):
            raise ValueError(f"size [B, T, N] must match x on B, T, N = {(B, T, N)}, got shape {tuple(size.shape)}")
    if (threshold is None) == (r is None):
        raise ValueError("pass exactly one of threshold= and r=")
    check_int("lag", lag, low=1, high=max(T - 1, 1), why=f" for x with T = {T} frames")
    links = max(T - lag, 0) * N
    r_video, out_len = None, None
    if isinstance(r, (list, tuple)):
        if len(r) != B:
            raise ValueError(f"r given per video must hold B = {B} counts, got {len(r)}")
        for b, r_b in enumerate(r):
            check_int(f"r[{b}]", r_b, low=0, high=links, why=f" (the links of T = {T}, N = {N}, lag = {lag})")
        r_video = torch.tensor(r, dtype=torch.int64, device=x.device)
        out_len = T * N - (min(r) if B > 0 else 0)
    elif isinstance(r, torch.Tensor):
        check_tensor("r", r, rank=1, layout="[B] (one count per video)", dtypes=GROUP_DTYPES)
        if tuple(r.shape) != (B,):
            raise ValueError(f"r given as a tensor must be [B] = [{B}] (one count per video), got shape {tuple(r.shape)}")
        check_same_device(x=x, r=r)
        r_video = r.to(torch.int64)
        if B > 0:
            require(((r_video >= 0) & (r_video <= links)).all(),
                            f"r must hold per-video counts in [0, {links}] (the links of T = {T}, N = {N}, lag = {lag})")
        out_len = T * N - (int(r_video.min()) if B > 0 else 0)  # the padded length: one host sync
    elif r is not None:
        check_int("r", r, low=0, high=links, why=f" (the links of T = {T}, N = {N}, lag = {lag})")
    if r is None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(f"threshold must be a float, got {type(threshold).__name__}")
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [-1, 1] (a cosine similarity), got {threshold}")
        threshold = float(threshold)
    if radius is not None:
        check_int("radius", radius, low=0, high=2**31 - 1)
    if mode not in reference.MERGE_MODES:
        raise ValueError(f"mode must be one of {reference.MERGE_MODES}, got {mode!r}")
    check_same_device(x=x, metric=metric, size=size)
    if segment_id is not None:
        segment_id = _check_segment_id(segment_id, x, lag, r, r_video)
    check_no_nan("temporal_merge", "metric" if metric is not x else "x", metric)
    check_positive("size", size)
    chosen = _backend.choose("temporal_merge", x.device, x.dtype, backend)
    if metric.dtype != x.dtype and chosen != "reference":  # the backend was chosen for x's dtype
        metric = metric.to(x.dtype)
    flat_size = (torch.ones(B, T * N, device=x.device, dtype=accumulation_dtype(x.dtype)) if size is None
                 else size.reshape(B, T * N))
    r_int = r if r_video is None else None
    index, origin, lengths = _temporal_assignment_op(metric.detach(), threshold, r_int, r_video, out_len, lag, radius,
                                                     h, w, segment_id, chosen)
    out, size_out = _merge_tokens_op(x.reshape(B, T * N, C), flat_size.detach(), index, origin, mode, chosen)
    return Merged(out, size_out, index, origin, lengths, (T, h, w))


# ---------------------------------------------------------------------------------------------------
# merge_by_assignment and the clustering merges that end with it


def _merged_from_assignment(x, size, index, origin, mode, chosen, lengths=None) -> Merged:
    """Merge x by a computed assignment: the merge_tokens step every merge ends with."""
    B, N, _ = x.shape
    if size is None:
        size = torch.ones(B, N, device=x.device, dtype=accumulation_dtype(x.dtype))
    out, size_out = _merge_tokens_op(x, size.detach(), index, origin, mode, chosen)
    return Merged(out, size_out, index, origin, lengths)


def _check_merge_inputs(op: str, x, metric, size, mode):
    """The checks every clustering merge shares; returns the metric (x by default)."""
    check_tensor("x", x, rank=3, layout="[B, N, C]", dtypes=REFERENCE_DTYPES)
    metric = x if metric is None else metric
    _check_companion("metric", metric, x, 3, "[B, N, D]", 2)
    _check_companion("size", size, x, 2, "[B, N]", 2)
    if mode not in reference.MERGE_MODES:
        raise ValueError(f"mode must be one of {reference.MERGE_MODES}, got {mode!r}")
    check_same_device(x=x, metric=metric, size=size)
    check_no_nan(op, "metric" if metric is not x else "x", metric)
    check_positive("size", size)
    return metric


def merge_by_assignment(
    x: torch.Tensor,
    assign: torch.Tensor,
    *,
    groups: int | None = None,
    size: torch.Tensor | None = None,
    mode: str = "wmean",
    backend: str | None = None,
) -> Merged:
    """Merge tokens by a given assignment: token n joins group ``assign[b, n]``, one output per group.

    The step every clustering merge ends with (PruneVid's and HoliTom's cluster means, VisionZip's
    contextual tokens, FastVID's anchors, k-means or any assignment a caller computes), on the same
    one-pass merge as bipartite_merge and temporal_merge.

    Args:
        x: ``[B, N, C]`` tokens, float32/float16/bfloat16 (float64 on the reference backend).
        assign: integer ``[B, N]`` group of every token, in ``[0, groups)``.
        groups: the number of groups L (static: no host sync); default ``assign.max() + 1`` over the
            batch (one host sync).
        size: ``[B, N]`` positive token sizes (default ones).
        mode: "wmean" (size-weighted mean), "mean", "sum" or "replace" (the representative's value).
        backend: "reference", "triton" or "auto" (Triton: the deterministic segmented-reduction merge
            kernel; the reference uses index_add_, float atomics on CUDA).

    Returns:
        ``Merged(x [B, L, C], size [B, L], index int32 [B, N] (= assign), origin int32 [B, L])``: group
        j's representative (origin) is its lowest position; a group without members gives x = 0,
        size = 0, origin = -1. Differentiable in x; the value checks (assign in range, sizes > 0) are
        a ValueError on CPU tensors and a device-side assert on GPUs.
    """
    check_tensor("x", x, rank=3, layout="[B, N, C]", dtypes=REFERENCE_DTYPES)
    B, N, _ = x.shape
    check_tensor("assign", assign, rank=2, layout="[B, N]", dtypes=GROUP_DTYPES)
    if tuple(assign.shape) != (B, N):
        raise ValueError(f"assign must be [B, N] = [{B}, {N}], got shape {tuple(assign.shape)}")
    _check_companion("size", size, x, 2, "[B, N]", 2)
    if mode not in reference.MERGE_MODES:
        raise ValueError(f"mode must be one of {reference.MERGE_MODES}, got {mode!r}")
    check_same_device(x=x, assign=assign, size=size)
    if groups is None:
        groups = int(assign.max()) + 1 if assign.numel() else 0  # one host sync
    check_int("groups", groups, low=0, high=2**31 - 1)
    if assign.numel():
        require(((assign >= 0) & (assign < groups)).all(), f"assign must hold group ids in [0, {groups}) (groups = {groups})")
    check_positive("size", size)
    chosen = _backend.choose("merge_by_assignment", x.device, x.dtype, backend)
    index = assign.to(torch.int32)
    origin = reference.first_members(index, groups).to(torch.int32)
    return _merged_from_assignment(x, size, index, origin, mode, chosen)


@torch.library.custom_op("vidtok::components_assignment", mutates_args=())
def _components_assignment_op(metric: torch.Tensor, threshold: float, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    assign = _backend.implementation("connected_components_merge", backend, "components_assignment")
    return assign(metric, threshold)


@_components_assignment_op.register_fake
def _(metric, threshold, backend):
    B, N, _ = metric.shape
    L = torch.library.get_ctx().new_dynamic_size()
    return (metric.new_empty((B, N), dtype=torch.int32), metric.new_empty((B, L), dtype=torch.int32),
            metric.new_empty((B,), dtype=torch.int64))


def connected_components_merge(
    x: torch.Tensor,
    threshold: float,
    *,
    metric: torch.Tensor | None = None,
    size: torch.Tensor | None = None,
    mode: str = "wmean",
    backend: str | None = None,
) -> Merged:
    """One token per connected component of the graph whose edges join tokens with cosine >= threshold.

    LLaVA-Scissor's semantic connected components (Sun et al. 2025): tokens i and j are linked when
    cos(metric_i, metric_j) >= threshold, and every component (all tokens reachable through links)
    becomes one output token. Components are found by min-label propagation with hooking and
    pointer jumping on the device (vidtok.reference.merge.component_labels), checked against
    scipy.sparse.csgraph.connected_components in the tests.

    Args:
        x: ``[B, N, C]`` tokens (one video's, one frame's or a segment's; batch them as B).
        threshold: cosine in [-1, 1].
        metric: ``[B, N, D]`` features for the similarity (default x); not differentiable.
        size: ``[B, N]`` positive token sizes (default ones).
        mode: "wmean", "mean", "sum" or "replace" (the component's lowest-position token).
        backend: "reference" or "auto": the graph and its components are PyTorch on every device (an
            [N, N] bool graph per video, built 1024 rows at a time); the merge step runs on
            merge_by_assignment's backend (Triton's merge kernel on GPUs).

    Returns:
        ``Merged(x [B, L, C], size [B, L], index int32 [B, N], origin int32 [B, L], lengths int64 [B])``:
        components in order of their lowest position, which is their representative (origin, so
        origin ascends); L = the most components of any video, shorter videos padded with x = 0,
        size = 0, origin = -1. The count depends on the data: host syncs read it, and one per round
        of label propagation (a few rounds; at most the components' diameter). Differentiable in x.
        NaN in the metric is a ValueError; inside ``vidtok.allow_nan()`` a NaN token has no link
        and stays alone.
    """
    metric = _check_merge_inputs("connected_components_merge", x, metric, size, mode)
    threshold = check_float("threshold", threshold)
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [-1, 1] (a cosine similarity), got {threshold}")
    chosen = _backend.choose("connected_components_merge", x.device, x.dtype, backend)
    merge_backend = _backend.choose("merge_by_assignment", x.device, x.dtype, backend)
    index, origin, lengths = _components_assignment_op(metric.detach(), threshold, chosen)
    return _merged_from_assignment(x, size, index, origin, mode, merge_backend, lengths)


@torch.library.custom_op("vidtok::dpc_knn_assignment", mutates_args=())
def _dpc_knn_assignment_op(metric: torch.Tensor, k: int, clusters: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _backend.implementation("dpc_knn_merge", backend, "dpc_knn_assignment")(metric, k, clusters)


@_dpc_knn_assignment_op.register_fake
def _(metric, k, clusters, backend):
    B, N, _ = metric.shape
    return metric.new_empty((B, N), dtype=torch.int32), metric.new_empty((B, clusters), dtype=torch.int32)


def dpc_knn_merge(
    x: torch.Tensor,
    k: int,
    clusters: int,
    *,
    metric: torch.Tensor | None = None,
    size: torch.Tensor | None = None,
    mode: str = "wmean",
    backend: str | None = None,
) -> Merged:
    """Density-peaks clustering with k nearest neighbours (DPC-kNN), one token per cluster.

    The clustering of HoliTom (Shao et al. 2025), PruneVid (Huang et al. 2025), FastVID and TCFormer
    (Zeng et al. 2022): with d the Euclidean distance / sqrt(D) on ``metric``, every token's density
    is exp(-mean d^2 to its k nearest tokens, itself included); its distance to the nearest denser
    token (denser: higher density, ties to the lower position; the densest token takes the video's
    largest distance) times its density ranks it; the ``clusters`` best are the centres (ties: lower
    position) and every other token joins its nearest centre (ties: the lower centre position).
    The paper code breaks density ties with random noise; vidtok's rule is deterministic.

    Args:
        x: ``[B, N, C]`` tokens.
        k: neighbours for the density, ``1 <= k <= N``.
        clusters: output tokens per video, ``1 <= clusters <= N`` (an exact budget).
        metric: ``[B, N, D]`` features to cluster on (default x); not differentiable.
        size: ``[B, N]`` positive token sizes (default ones).
        mode: "wmean" (default; the cluster mean with unit sizes, as PruneVid and HoliTom merge),
            "mean", "sum" or "replace" (the centre's value).
        backend: "reference" or "auto": the clustering is PyTorch on every device ([N, N] distances
            per video from one matmul, top-k and masked minima); the merge step runs on
            merge_by_assignment's backend (Triton's merge kernel on GPUs).

    Returns:
        ``Merged(x [B, clusters, C], size [B, clusters], index int32 [B, N], origin int32 [B, clusters])``:
        clusters in order of their centre's position, which is their representative (origin
        ascends). Static shapes, no host sync. Differentiable in x. NaN in the metric is a
        ValueError; inside ``vidtok.allow_nan()`` a NaN token is infinitely far from every other: it
        is a centre only when clusters exceed the other tokens, else it joins the first centre.
    """
    metric = _check_merge_inputs("dpc_knn_merge", x, metric, size, mode)
    N = x.shape[1]
    check_int("k", k, low=1, high=max(N, 1), why=f" for x with N = {N} tokens")
    check_int("clusters", clusters, low=1, high=max(N, 1), why=f" for x with N = {N} tokens")
    chosen = _backend.choose("dpc_knn_merge", x.device, x.dtype, backend)
    merge_backend = _backend.choose("merge_by_assignment", x.device, x.dtype, backend)
    index, origin = _dpc_knn_assignment_op(metric.detach(), k, clusters, chosen)
    return _merged_from_assignment(x, size, index, origin, mode, merge_backend)

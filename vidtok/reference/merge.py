"""Reference implementations for the temporal token merging hot path."""

from __future__ import annotations

import torch

from vidtok._numerics import EPS, accumulation_dtype, kept_rank


def paired_similarity(x: torch.Tensor, lag: int = 1) -> torch.Tensor:
    """Cosine similarity of token (t, n) with token (t - lag, n).

    x: [B, T, N, C] float. Returns fp32 (fp64 for fp64 x) [B, T - lag, N] where out[:, t] compares frame t + lag with
    frame t, as ``F.cosine_similarity(x[:, lag:], x[:, :-lag], dim=-1)`` does:
    dot(a, b) / (max(|a|, eps) * max(|b|, eps)), eps = 1e-8, so a zero-norm token gives 0.
    """
    xf = x.to(accumulation_dtype(x.dtype))
    norms = torch.linalg.vector_norm(xf, dim=-1).clamp_min(EPS)  # each token's norm, once
    dot = torch.linalg.vecdot(xf[:, lag:], xf[:, :-lag])
    return dot / (norms[:, lag:] * norms[:, :-lag])


def paired_similarity_backward(grad: torch.Tensor, x: torch.Tensor, lag: int = 1) -> torch.Tensor:
    """Gradient of ``paired_similarity`` with respect to x, in x's dtype.

    With |v|_e = max(|v|, eps): d cos(a, b)/da = b / (|a|_e |b|_e) - [|a| > eps] * cos * a / |a|^2.
    Frame t is the "a" of output t - lag and the "b" of output t; both terms land in grad_x[:, t].
    """
    xf = x.to(accumulation_dtype(x.dtype))
    grad = grad.to(xf.dtype)
    norms = torch.linalg.vector_norm(xf, dim=-1)
    clamped = norms.clamp_min(EPS)
    # 1/|v|^2 where the norm is not clamped, 0 where it is (the clamp has no gradient there).
    inv_sq = torch.where(norms > EPS, clamped.reciprocal().square(), torch.zeros_like(norms))
    a, b = xf[:, lag:], xf[:, :-lag]
    inv_denom = (clamped[:, lag:] * clamped[:, :-lag]).reciprocal()
    cos = torch.linalg.vecdot(a, b) * inv_denom
    g_cross = (grad * inv_denom).unsqueeze(-1)
    g_cos = grad * cos
    grad_x = torch.zeros_like(xf)
    grad_x[:, lag:] += g_cross * b - (g_cos * inv_sq[:, lag:]).unsqueeze(-1) * a
    grad_x[:, :-lag] += g_cross * a - (g_cos * inv_sq[:, :-lag]).unsqueeze(-1) * b
    return grad_x.to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# match: each row of a's most cosine-similar row of b


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B, M, K] cosine similarities of the rows of a [B, M, D] and b [B, K, D], accumulated in fp32,
    as dot / (max(|a|, eps) * max(|b|, eps)) (F.cosine_similarity's formula)."""
    dt = accumulation_dtype(a.dtype)
    af, bf = a.to(dt), b.to(dt)
    na = torch.linalg.vector_norm(af, dim=-1).clamp_min(EPS)
    nb = torch.linalg.vector_norm(bf, dim=-1).clamp_min(EPS)
    return (af @ bf.transpose(-1, -2)) / (na[..., :, None] * nb[..., None, :])


def match(
    a: torch.Tensor,
    b: torch.Tensor,
    a_group: torch.Tensor | None = None,
    b_group: torch.Tensor | None = None,
    chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every row of a [B, M, D], the most cosine-similar row of b [B, K, D].

    Returns (score fp32 (fp64 for fp64 inputs) [B, M], idx int32 [B, M]). With group ids [B, M] and
    [B, K] only pairs of equal group compete. A NaN similarity (a NaN token) is never a match. A row
    with no allowed partner gets score -inf and idx -1. Ties: the lowest index (torch.max's rule).
    Rows of a are processed ``chunk`` at a time, so at most [B, chunk, K] similarities exist at once.
    """
    B, M, _ = a.shape
    scores, idxs = [], []
    for m0 in range(0, M, chunk):
        sim = cosine_matrix(a[:, m0 : m0 + chunk], b)
        allowed = ~torch.isnan(sim)
        if a_group is not None:
            allowed &= a_group[:, m0 : m0 + chunk, None] == b_group[:, None, :]
        sim = sim.masked_fill(~allowed, float("-inf"))
        if sim.shape[-1] == 0:  # no rows in b: nothing to match
            score = sim.new_full(sim.shape[:-1], float("-inf"))
            idx = torch.full(sim.shape[:-1], -1, dtype=torch.int64, device=sim.device)
        else:
            score, idx = sim.max(dim=-1)  # documented: the first maximal index
        scores.append(score)
        idxs.append(torch.where(allowed.any(dim=-1), idx, -1).to(torch.int32))
    if not scores:
        return a.new_empty((B, 0), dtype=accumulation_dtype(a.dtype)), a.new_empty((B, 0), dtype=torch.int32)
    return torch.cat(scores, dim=1), torch.cat(idxs, dim=1)


# ---------------------------------------------------------------------------------------------------
# bipartite_merge: ToMe's bipartite soft matching (Bolya et al., ICLR 2023, arXiv 2210.09461, Sec. 3)

MERGE_MODES = ("wmean", "mean", "sum", "replace")
MERGE_ORDERS = ("keep", "tome")


def protected_split(protect: int) -> tuple[int, int]:
    """How many of the first ``protect`` tokens fall in set A (even positions) and in set B (odd)."""
    return (protect + 1) // 2, protect // 2


def max_merge(n: int, protect: int) -> int:
    """The largest r bipartite merging allows for n tokens of which the first ``protect`` never merge:
    every unprotected A token, provided some unprotected B token can receive it."""
    pa, pb = protected_split(protect)
    n_a, n_b = (n + 1) // 2, n // 2
    return max(n_a - pa, 0) if n_b > pb else 0


def bipartite_assignment(
    metric: torch.Tensor, r: int, protect: int = 0, order: str = "keep", a_mask: torch.Tensor | None = None, *, match_fn=match
):
    """Which tokens merge where: (index int32 [B, N], origin int32 [B, N - r]).

    A = tokens 0, 2, 4, ..., B = tokens 1, 3, 5, ...; protected tokens (the first ``protect``) take no
    part in matching: a protected A token is never a source, a protected B token never a destination
    (ToMe's class token is A[0], its distillation token B[0]). Every unprotected A token's best
    unprotected B partner is found with ``match_fn``; the r A tokens with the highest scores (ties:
    lower position) merge into their partners. ``index[n]`` is the output slot of token n,
    ``origin[j]`` the position of the token kept at slot j (a destination or an unmerged token).

    order="keep": outputs in the original token order. order="tome": ToMe's order — the protected
    tokens in position order, then the unmerged A tokens by descending score (ascending position when
    protect > 0, as ToMe re-sorts them when there is a class token), then the unprotected B tokens in
    order; r = 0 returns the input order in both. For protect = 1 and 2 this is the order of ToMe's
    merge with class_token (and distill_token): [class, unmerged A, B] and [class, distillation,
    unmerged A, B without the distillation token].
    A token without any partner (a NaN metric) ranks last; if r reaches it anyway it merges into the
    first unprotected B token.

    a_mask: bool [B, N], True for the tokens of set A (the sources) and False for set B (the
    destinations) in place of the alternation; the first ``protect`` tokens stay out of both. Every
    video needs at least r unprotected A tokens and, when r > 0, one unprotected B token (the caller
    checks). The same ranks, ties and orders apply, with "A" and "B" read from the mask.
    """
    B, N, _ = metric.shape
    device = metric.device
    if r == 0:  # ToMe returns its input untouched (do_nothing), in either order
        identity = torch.arange(N, dtype=torch.int32, device=device).expand(B, N).contiguous()
        return identity, identity.clone()
    if a_mask is not None:
        return _masked_assignment(metric, r, protect, order, a_mask, match_fn)
    pa, pb = protected_split(protect)
    n_a, n_b = (N + 1) // 2, N // 2
    score, partner = match_fn(metric[:, 2 * pa :: 2], metric[:, 2 * pb + 1 :: 2], None, None)
    rank = torch.sort(score, dim=1, descending=True, stable=True).indices  # over unprotected A
    src = rank[:, :r] + pa  # A indices that merge
    dst = partner.gather(1, rank[:, :r]).clamp_min(0).long() + pb  # their B partners
    n_unm = n_a - r
    kept = torch.ones(B, N, dtype=torch.bool, device=device).scatter_(1, 2 * src, False)
    if order == "tome":
        # slots: protected tokens at their own positions, then the unprotected unmerged A tokens, then
        # the unprotected B tokens
        unm = rank[:, r:] + pa
        if protect > 0:
            unm = unm.sort(dim=1).values
        n_free = n_unm - pa
        b_slot = torch.cat([2 * torch.arange(pb, device=device) + 1,
                            protect + n_free + torch.arange(n_b - pb, device=device)]).expand(B, n_b)
        a_slot = (2 * torch.arange(n_a, device=device)).expand(B, n_a).clone()  # right for the protected ones
        a_slot.scatter_(1, unm, protect + torch.arange(n_free, device=device).expand(B, n_free))
        a_slot.scatter_(1, src, b_slot.gather(1, dst))
        index = torch.empty(B, N, dtype=torch.long, device=device)
        index[:, 0::2] = a_slot
        index[:, 1::2] = b_slot
    else:
        slot = kept_rank(kept)[0]
        index = slot.scatter(1, 2 * src, slot.gather(1, 2 * dst + 1))
    return _with_origin(index, kept, N - r)


def _with_origin(index: torch.Tensor, kept: torch.Tensor, L: int):
    """(index int32, origin int32 [B, L]): each slot holds exactly one kept token, its representative;
    merged tokens write to a spare slot L."""
    B, N = index.shape
    origin = torch.zeros(B, L + 1, dtype=torch.long, device=index.device)
    origin.scatter_(1, torch.where(kept, index, L), torch.arange(N, device=index.device).expand(B, N))
    return index.to(torch.int32), origin[:, :L].to(torch.int32)


def _masked_assignment(metric: torch.Tensor, r: int, protect: int, order: str, a_mask: torch.Tensor, match_fn):
    """bipartite_assignment with the sets read from a_mask [B, N] (see there). The match compares every
    token with every token, the group ids keeping A rows to B columns: N x N similarities where the
    alternation needs N/2 x N/2."""
    B, N, _ = metric.shape
    device = metric.device
    pos = torch.arange(N, device=device).expand(B, N)
    free = pos >= protect
    is_a, is_b = a_mask & free, ~a_mask & free
    a_group = torch.where(is_a, 0, -1).to(torch.int32)  # rows outside A meet no column
    b_group = torch.where(is_b, 0, -2).to(torch.int32)
    score, partner = match_fn(metric, metric, a_group, b_group)
    # A tokens by score (ties: lower position), then every other token
    by_score = torch.sort(score, dim=1, descending=True, stable=True).indices
    rank = by_score.gather(1, torch.sort((~is_a).gather(1, by_score).to(torch.int8), dim=1, stable=True).indices)
    src = rank[:, :r]
    first_b = torch.where(is_b, pos, N).min(dim=1, keepdim=True).values.clamp_max(N - 1)
    dst = partner.gather(1, src).long()
    dst = torch.where(dst >= 0, dst, first_b)  # a token without a partner (NaN) goes to the first B token
    kept = torch.ones(B, N, dtype=torch.bool, device=device).scatter_(1, src, False)
    if order == "tome":
        # protected tokens (by position), unmerged A (by score rank; by position when protect > 0), B (by position)
        within = pos
        if protect == 0:
            within = torch.where(is_a, torch.empty_like(rank).scatter_(1, rank, pos), pos)
        category = torch.where(free, torch.where(is_a, 1, 2), 0)
        key = torch.where(kept, category * N + within, 3 * N)
        slot = torch.empty_like(pos).scatter_(1, torch.sort(key, dim=1, stable=True).indices, pos)
    else:
        slot = kept_rank(kept)[0]
    index = slot.scatter(1, src, slot.gather(1, dst))
    return _with_origin(index, kept, N - r)


def merge_tokens(x: torch.Tensor, size: torch.Tensor, index: torch.Tensor, origin: torch.Tensor, mode: str = "wmean"):
    """Reduce x [B, N, C] into L = origin.shape[1] groups: token n joins group index[n].

    Returns (out [B, L, C] in x's dtype, size_out [B, L] fp32 (fp64 for fp64 x) = the summed sizes).
    mode "wmean": size-weighted mean (ToMe's merge_wavg); "mean": plain mean of the members; "sum":
    their sum; "replace": the representative token x[origin] unchanged. Accumulates in fp32.
    A slot without members (padding: origin -1) gets zeros and size 0.
    """
    B, N, C = x.shape
    L = origin.shape[1]
    dt = accumulation_dtype(x.dtype)
    s = size.to(dt)
    # one flat index over the batch: index_add_ over rows is much faster than a [B, N, C] scatter_add_
    flat = (index.long() + L * torch.arange(B, device=x.device)[:, None]).reshape(-1)
    size_out = s.new_zeros(B * L).index_add_(0, flat, s.reshape(-1)).view(B, L)
    if mode == "replace":
        rep = origin.long()
        out = x.gather(1, rep.clamp_min(0)[..., None].expand(B, L, C))
        return out.masked_fill((rep < 0)[..., None], 0), size_out
    xf = x.to(dt)
    if mode == "wmean":
        xf = xf * s[..., None]
    out = xf.new_zeros(B * L, C).index_add_(0, flat, xf.reshape(B * N, C)).view(B, L, C)
    if mode == "wmean":
        out.div_(torch.where(size_out > 0, size_out, 1)[..., None])
    elif mode == "mean":
        count = s.new_zeros(B * L).index_add_(0, flat, torch.ones_like(flat, dtype=dt)).view(B, L)
        out.div_(count.clamp_min(1)[..., None])
    return out.to(x.dtype), size_out


def merge_weights(size: torch.Tensor, size_out: torch.Tensor, index: torch.Tensor, origin: torch.Tensor, mode: str, dtype: torch.dtype):
    """w [B, N]: out[j] = sum over the members n of group j of w[n] * x[n], so grad_x[n] = w[n] * grad[j].

    Built from gathers and an integer count only (no float scatter), so it is deterministic on every device.
    """
    B, N = index.shape
    L = origin.shape[1]
    idx = index.long()
    if mode == "wmean":
        return size.to(dtype) / size_out.to(dtype).gather(1, idx)
    if mode == "mean":
        count = torch.zeros(B, L, dtype=torch.int64, device=index.device).scatter_add_(1, idx, torch.ones_like(idx))
        return count.gather(1, idx).to(dtype).reciprocal()
    if mode == "sum":
        return torch.ones(B, N, dtype=dtype, device=index.device)
    return (origin.long().gather(1, idx) == torch.arange(N, device=index.device)).to(dtype)  # replace


def merge_tokens_backward(
    grad: torch.Tensor, size: torch.Tensor, size_out: torch.Tensor, index: torch.Tensor, origin: torch.Tensor, mode: str
):
    """Gradient of ``merge_tokens``'s output with respect to x: grad_x[n] = w[n] * grad[index[n]], in
    grad's dtype (the sizes get no gradient: ToMe's sizes are bookkeeping)."""
    B, L, C = grad.shape
    N = index.shape[1]
    dt = accumulation_dtype(grad.dtype)
    w = merge_weights(size, size_out, index, origin, mode, dt)
    g = grad.to(dt).gather(1, index.long()[..., None].expand(B, N, C))
    return (g * w[..., None]).to(grad.dtype)


# ---------------------------------------------------------------------------------------------------
# temporal_merge: frame-to-frame links, a forest across time, one output token per tree


def window_links(metric: torch.Tensor, lag: int, radius: int, grid: tuple[int, int]):
    """Best match of token (t + lag, y, x) among tokens (t, y', x') with max(|y - y'|, |x - x'|) <= radius.

    metric [B, T, N, D], N = h * w. Returns (score fp32 [B, T - lag, N], idx int32 [B, T - lag, N]),
    as ``match`` does: ties to the lowest candidate position, NaN never matches, none: -inf and -1.
    """
    B, T, N, D = metric.shape
    h, w = grid
    dev = metric.device
    dt = accumulation_dtype(metric.dtype)
    norms = torch.linalg.vector_norm(metric.to(dt), dim=-1).clamp_min(EPS)  # [B, T, N]
    cur_g = metric[:, lag:].to(dt).reshape(B, T - lag, h, w, D)
    prev_g = metric[:, :-lag].to(dt).reshape(B, T - lag, h, w, D)
    ncur, nprev = norms[:, lag:].view(B, T - lag, h, w), norms[:, :-lag].view(B, T - lag, h, w)
    best = torch.full((B, T - lag, h, w), float("-inf"), dtype=dt, device=dev)
    best_n = torch.full((B, T - lag, h, w), -1, dtype=torch.long, device=dev)
    ys, xs = torch.arange(h, device=dev).view(h, 1), torch.arange(w, device=dev).view(1, w)
    # offsets in increasing candidate position (dy, then dx), so "strictly better" keeps the lowest on ties
    for dy in range(-min(radius, h - 1), min(radius, h - 1) + 1):
        for dx in range(-min(radius, w - 1), min(radius, w - 1) + 1):
            y2, x2 = ys + dy, xs + dx
            valid = (y2 >= 0) & (y2 < h) & (x2 >= 0) & (x2 < w)  # [h, w]
            y2c, x2c = y2.clamp(0, h - 1).expand(h, w), x2.clamp(0, w - 1).expand(h, w)
            cand = prev_g[:, :, y2c, x2c]  # [B, T - lag, h, w, D]
            sim = torch.linalg.vecdot(cur_g, cand) / (ncur * nprev[:, :, y2c, x2c])
            better = valid & (sim > best)  # NaN is never better
            best = torch.where(better, sim, best)
            best_n = torch.where(better, y2c * w + x2c, best_n)
    return best.view(B, T - lag, N), best_n.view(B, T - lag, N).to(torch.int32)


def temporal_links(
    metric: torch.Tensor, lag: int, radius: int | None, grid: tuple[int, int],
    match_fn=match, paired_fn=paired_similarity, window_fn=window_links,
):
    """Each token's best match in the frame ``lag`` earlier: (score [B, T, N], parent [B, T, N] int64).

    metric: [B, T, N, D] with N = h * w tokens per frame in (h, w) row-major order. Candidates of token
    (t, y, x) are the tokens (t - lag, y', x') with max(|y - y'|, |x - x'|) <= radius: radius=0, the
    same position, through ``paired_fn`` (paired_similarity); radius=None, the whole frame, through
    ``match_fn``; otherwise through ``window_fn``. score is the best cosine similarity (ties: the
    lowest candidate position); -inf for the first ``lag`` frames and where every candidate similarity
    is NaN. parent is the flat position t' * N + n' of the best candidate; where there is none it is
    the same position one lag earlier (for the first lag frames: the token itself), so every link is
    well formed.
    """
    B, T, N, D = metric.shape
    dev = metric.device
    pos = torch.arange(T * N, device=dev).view(1, T, N)
    score = torch.full((B, T, N), float("-inf"), dtype=accumulation_dtype(metric.dtype), device=dev)
    parent = pos.expand(B, T, N).clone()
    if T <= lag or N == 0:
        return score, parent
    parent[:, lag:] -= lag * N  # default: the same position one lag earlier
    if radius == 0:  # one candidate: the same position
        s = paired_fn(metric, lag)
        score[:, lag:] = torch.where(torch.isnan(s), float("-inf"), s)
        return score, parent
    if radius is None:
        cur = metric[:, lag:].reshape(B * (T - lag), N, D)
        s, idx = match_fn(cur, metric[:, :-lag].reshape(B * (T - lag), N, D), None, None)
        s, idx = s.view(B, T - lag, N), idx.view(B, T - lag, N)
    else:
        s, idx = window_fn(metric, lag, radius, grid)
    score[:, lag:] = s
    frame_start = pos[:, :-lag] - pos[:, :-lag] % N  # first position of frame t - lag
    parent[:, lag:] = torch.where(idx >= 0, frame_start + idx.long(), parent[:, lag:])
    return score, parent


def resolve_forest(linked: torch.Tensor, parent: torch.Tensor, hops: int):
    """Number the trees of a forest whose links point to earlier positions.

    linked [B, P] bool: token p keeps its link to parent[b, p] < p; the others are roots. Every chain
    has at most ``hops`` tokens. Roots are found by pointer jumping (each step doubles the links a
    pointer has followed: ceil(log2(hops)) steps, a number fixed by the shapes, so no host sync).
    Trees are numbered by their root's position. Returns (index [B, P] int64: the tree of every token,
    is_root [B, P] bool, lengths [B] int64: the number of trees).
    """
    B, P = linked.shape
    pos = torch.arange(P, device=linked.device).expand(B, P)
    root = torch.where(linked, parent, pos)
    for _ in range(max(hops - 1, 0).bit_length()):
        root = root.gather(1, root)
    is_root = ~linked
    slot, lengths = kept_rank(is_root)
    return slot.gather(1, root), is_root, lengths


def temporal_assignment(
    metric: torch.Tensor, threshold: float | None, r, lag: int, radius: int | None, grid: tuple[int, int],
    segment_id: torch.Tensor | None = None, out_len: int | None = None,
    *, match_fn=match, paired_fn=paired_similarity, window_fn=window_links,
):
    """(index int32 [B, T*N], origin int32 [B, L], lengths int64 [B]) of ``temporal_merge``.

    With r (an int, or an int64 tensor [B] of per-video counts): the r best links of each video are
    kept (ties: higher score, then lower position), so video b has exactly T*N - r_b trees; L = T*N - r
    for an int, ``out_len`` (default T*N - min r, a host sync) for a tensor, shorter videos padded
    (origin -1). With a threshold: links with score >= threshold, L = the most trees of any video (a
    host sync: the output size depends on the data).

    segment_id: int [B, T] (``scene_boundaries``): a link from frame t to frame t - lag exists only
    where both frames have the same segment id >= 0, so no tree crosses a segment boundary; with r,
    forbidden links rank after every allowed one and the caller ensures r_b never exceeds the allowed
    links of video b.
    """
    B, T, N, _ = metric.shape
    P = T * N
    score, parent = temporal_links(metric, lag, radius, grid, match_fn, paired_fn, window_fn)
    score, parent = score.reshape(B, P), parent.reshape(B, P)
    allowed = None
    if segment_id is not None:
        seg = segment_id.long()
        same = torch.zeros(B, T, dtype=torch.bool, device=metric.device)
        same[:, lag:] = (seg[:, lag:] == seg[:, :-lag]) & (seg[:, lag:] >= 0)
        allowed = same[:, :, None].expand(B, T, N).reshape(B, P)
        score = torch.where(allowed, score, float("-inf"))
    if r is not None:  # rank the links of frames lag.. only: the first frames have none
        order = torch.sort(score[:, lag * N :], dim=1, descending=True, stable=True).indices
        if allowed is not None:  # forbidden links after every allowed one (ties in -inf otherwise)
            forbidden = (~allowed[:, lag * N :]).gather(1, order).to(torch.int8)
            order = order.gather(1, torch.sort(forbidden, dim=1, stable=True).indices)
        linked = torch.zeros(B, P, dtype=torch.bool, device=metric.device)
        if isinstance(r, torch.Tensor):
            place = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
            linked[:, lag * N :] = place < r[:, None]
            L = out_len if out_len is not None else P - int(r.min()) if B > 0 else P
        else:
            linked.scatter_(1, order[:, :r] + lag * N, True)
            L = P - r
    else:
        linked = score >= threshold
        L = None
    hops = -(-T // lag)  # the longest chain: one token per lag-th frame
    index, is_root, lengths = resolve_forest(linked, parent, hops)
    if L is None:
        L = int(lengths.max()) if B > 0 else 0
    origin = torch.full((B, L + 1), -1, dtype=torch.long, device=metric.device)
    origin.scatter_(1, torch.where(is_root, index, L), torch.arange(P, device=metric.device).expand(B, P))
    return index.to(torch.int32), origin[:, :L].to(torch.int32), lengths


# ---------------------------------------------------------------------------------------------------
# Clustering merges: each ends with merge_tokens on an assignment of tokens to groups


def first_members(index: torch.Tensor, L: int) -> torch.Tensor:
    """origin int64 [B, L]: the lowest position of every group of ``index`` [B, N] (group ids in
    [0, L)), -1 for a group without members. An integer scatter-min: deterministic on every device."""
    B, N = index.shape
    pos = torch.arange(N, device=index.device).expand(B, N)
    first = torch.full((B, L), N, dtype=torch.long, device=index.device).scatter_reduce(1, index.long(), pos, "amin")
    return torch.where(first < N, first, -1)


def similarity_graph(metric: torch.Tensor, threshold: float, chunk: int = 1024) -> torch.Tensor:
    """bool [B, N, N]: cos(metric_i, metric_j) >= threshold (a NaN similarity is no edge); built
    ``chunk`` rows at a time from ``cosine_matrix``."""
    B, N, _ = metric.shape
    out = torch.empty(B, N, N, dtype=torch.bool, device=metric.device)
    for i0 in range(0, N, chunk):
        out[:, i0 : i0 + chunk] = cosine_matrix(metric[:, i0 : i0 + chunk], metric) >= threshold
    return out


def component_labels(adjacency: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """int64 [B, N]: the lowest position of every token's connected component in the graph
    ``adjacency`` [B, N, N] (bool, read as undirected: an edge either way joins).

    Min-label propagation with hooking and pointer jumping (in the manner of Shiloach and Vishkin):
    each round every token takes the lowest label among itself and its neighbours, the old root of
    its label takes it too, then labels follow their labels ceil(log2 N) times. Labels only decrease
    and always name a token of the same component, so the fixed point gives every component its
    lowest position. Rounds run until no label changes: one host sync per round (a few rounds on
    real graphs; at most the component diameter).
    """
    B, N, _ = adjacency.shape
    device = adjacency.device
    label = torch.arange(N, device=device).expand(B, N).contiguous()
    jumps = max(N - 1, 1).bit_length()
    while True:
        lowest = label.clone()
        for i0 in range(0, N, chunk):  # min label over neighbours, [B, chunk, N] at a time
            rows = adjacency[:, i0 : i0 + chunk] | adjacency[:, :, i0 : i0 + chunk].transpose(1, 2)
            seen = torch.where(rows, label[:, None, :], N).amin(-1)
            lowest[:, i0 : i0 + chunk] = torch.minimum(lowest[:, i0 : i0 + chunk], seen)
        new = torch.minimum(lowest, label.scatter_reduce(1, label, lowest, "amin"))  # hook the old roots
        for _ in range(jumps):
            new = new.gather(1, new)
        if torch.equal(new, label):
            return label
        label = new


def components_assignment(metric: torch.Tensor, threshold: float):
    """(index int32 [B, N], origin int32 [B, L], lengths int64 [B]) of ``connected_components_merge``:
    components numbered by their lowest position, which is their representative; L = the most
    components of any video (a host sync), shorter videos padded with origin -1."""
    B, N, _ = metric.shape
    label = component_labels(similarity_graph(metric, threshold))
    is_root = label == torch.arange(N, device=metric.device)
    slot, lengths = kept_rank(is_root)
    index = slot.gather(1, label)
    L = int(lengths.max()) if B > 0 else 0
    origin = torch.full((B, L + 1), -1, dtype=torch.long, device=metric.device)
    origin.scatter_(1, torch.where(is_root, index, L), torch.arange(N, device=metric.device).expand(B, N))
    return index.to(torch.int32), origin[:, :L].to(torch.int32), lengths


def pairwise_distance(metric: torch.Tensor) -> torch.Tensor:
    """[B, N, N] Euclidean distances / sqrt(D) in fp32 (fp64 for fp64), from |a|^2 + |b|^2 - 2 a.b
    (clamped at 0), with an exact zero diagonal; TCFormer's (Zeng et al. 2022) scaled cdist."""
    B, N, D = metric.shape
    m = metric.to(accumulation_dtype(metric.dtype))
    sq = m.square().sum(-1)
    d2 = (sq[:, :, None] + sq[:, None, :] - 2 * (m @ m.transpose(-1, -2))).clamp_min(0)
    d2.diagonal(dim1=1, dim2=2).zero_()
    return d2.sqrt() / D**0.5


def dpc_knn_assignment(metric: torch.Tensor, k: int, clusters: int):
    """(index int32 [B, N], origin int32 [B, clusters]) of ``dpc_knn_merge``.

    Density peaks clustering with k nearest neighbours (Rodriguez and Laio 2014; Du et al. 2016),
    as TCFormer, PruneVid and HoliTom use it on tokens: distances d (``pairwise_distance``); density
    rho_i = exp(-mean of d^2 over the k nearest tokens, the token itself among them); delta_i = the
    distance to the nearest denser token (denser: higher rho, ties to the lower position), the
    largest distance of the video for the densest token; the ``clusters`` tokens of highest
    rho * delta (ties: lower position) are the centres; every token joins its nearest centre (ties:
    the lower centre position), a centre itself. Clusters are numbered by their centre's position,
    which is their representative.
    """
    B, N, _ = metric.shape
    device = metric.device
    dist = pairwise_distance(metric).nan_to_num(nan=float("inf"))  # a NaN token: infinitely far from the others
    density = (-dist.topk(k, dim=-1, largest=False).values.square().mean(-1)).exp()
    # rank in the density order (higher first, ties: the lower position): j is denser than i when it ranks before
    order = torch.sort(density, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=device).expand(B, N))
    delta = torch.where(rank[:, None, :] < rank[:, :, None], dist, float("inf")).amin(-1)
    farthest = dist.flatten(1).amax(1)[:, None]
    delta = torch.where(rank == 0, farthest, delta)  # the densest token
    score = (density * delta).nan_to_num(nan=float("-inf"))  # 0 * inf for a NaN token: never before a real one
    centres = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :clusters].sort(dim=1).values
    to_centre = dist.gather(2, centres[:, None, :].expand(B, N, clusters))  # [B, N, clusters]
    index = to_centre.argmin(-1)  # first minimum: the lower centre position
    index = index.scatter(1, centres, torch.arange(clusters, device=device).expand(B, clusters))
    return index.to(torch.int32), centres.to(torch.int32)

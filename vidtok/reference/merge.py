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


def bipartite_assignment(metric: torch.Tensor, r: int, protect: int = 0, order: str = "keep", *, match_fn=match):
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
    """
    B, N, _ = metric.shape
    device = metric.device
    if r == 0:  # ToMe returns its input untouched (do_nothing), in either order
        identity = torch.arange(N, dtype=torch.int32, device=device).expand(B, N).contiguous()
        return identity, identity.clone()
    pa, pb = protected_split(protect)
    n_a, n_b = (N + 1) // 2, N // 2
    score, partner = match_fn(metric[:, 2 * pa :: 2], metric[:, 2 * pb + 1 :: 2])
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
    # each slot holds exactly one kept token, its representative; merged sources write to a spare slot
    L = N - r
    origin = torch.zeros(B, L + 1, dtype=torch.long, device=device)
    origin.scatter_(1, torch.where(kept, index, L), torch.arange(N, device=device).expand(B, N))
    return index.to(torch.int32), origin[:, :L].to(torch.int32)


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
        s, idx = match_fn(cur, metric[:, :-lag].reshape(B * (T - lag), N, D))
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
    metric: torch.Tensor, threshold: float | None, r: int | None, lag: int, radius: int | None, grid: tuple[int, int],
    *, match_fn=match, paired_fn=paired_similarity, window_fn=window_links,
):
    """(index int32 [B, T*N], origin int32 [B, L], lengths int64 [B]) of ``temporal_merge``.

    With r: the r best links of each video are kept (ties: higher score, then lower position), so every
    video has exactly T*N - r trees and L = T*N - r. With a threshold: links with score >= threshold,
    L = the most trees of any video (a host sync: the output size depends on the data).
    """
    B, T, N, _ = metric.shape
    P = T * N
    score, parent = temporal_links(metric, lag, radius, grid, match_fn, paired_fn, window_fn)
    score, parent = score.reshape(B, P), parent.reshape(B, P)
    if r is not None:  # rank the links of frames lag.. only: the first frames have none
        rank = torch.sort(score[:, lag * N :], dim=1, descending=True, stable=True).indices[:, :r] + lag * N
        linked = torch.zeros(B, P, dtype=torch.bool, device=metric.device).scatter_(1, rank, True)
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

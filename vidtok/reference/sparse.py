"""Reference block-sparse attention over a SparsePlan's tiles: the spec of vidtok.sparse_attention.

A plan reaches every backend as ``PlanTensors`` (see vidtok.sparse.SparsePlan); the reference reads two:

- ``tile_map`` int32 [B, Hp, nQ, nK] (Hp = 1: one plan for every head; Hp = H: one per query head):
  0 = empty tile pair, 1 = full (every pair attends), s >= 2 = partial, whose token mask is ``bits[s]``;
- ``bits`` int32 [2 + P, BQ, ceil(BK / 32)]: bit ``c % 32`` of word ``bits[s, r, c // 32]`` says whether
  query r of the tile attends to key c; ``bits[0]`` is all zeros and ``bits[1]`` all ones, so
  ``bits[tile_map]`` is the token mask of every tile pair.

The math, in fp32 (fp64 for fp64 inputs): S = scale * q k^T + kv_log_size[key], pairs outside the mask
-> -inf, P = softmax(S) with rows that have no allowed key giving P = 0 (output 0, LSE -inf),
O = P v. ``kv_log_size`` is ToMe's proportional attention (Bolya et al. 2023, facebookresearch/ToMe):
a key of size s weighs as s copies of itself, since s e^x = e^(x + log s).

Written to be read, not to be fast: every query row against every key, with the token mask as a
-inf bias, a band of query tiles at a time so the scores stay within ``ROWS_SCORES`` elements. The
tuned CPU path (work proportional to the plan's tiles) is the ``cpu`` backend, vidtok.cpu.sparse;
GPUs run the Triton kernels.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import torch

from vidtok._numerics import accumulation_dtype

# Scores [B, H, rows, N] computed at once, at most (unless one query tile alone holds more).
ROWS_SCORES = 1 << 24


class PlanTensors(NamedTuple):
    """A SparsePlan's tensors, as custom ops pass them (int32, on the layout's device).

    tile_map [B, Hp, nQ, nK] and bits [S, BQ, ceil(BK / 32)] as above; row_ptr [B * Hp * nQ + 1],
    col_idx, entry_bits: CSR of the non-empty tile pairs by query tile (row (b * Hp + h) * nQ + i);
    col_ptr [B * Hp * nK + 1], row_idx, entry_bits_t: the same pairs by key tile (for backward passes
    that own keys). The index arrays may be longer than their last pointer (a fixed capacity).
    """

    tile_map: torch.Tensor
    bits: torch.Tensor
    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    entry_bits: torch.Tensor
    col_ptr: torch.Tensor
    row_idx: torch.Tensor
    entry_bits_t: torch.Tensor


def key_bytes(bits: torch.Tensor) -> torch.Tensor:
    """uint8 [S, BQ, 4W]: the bit words [S, BQ, W] as bytes in key order, byte c // 8 holding key c
    in bit c % 8. Key c is bit c % 32 of word c // 32, so the words' bytes are taken from the least
    significant end (as they lie in memory on little-endian machines; reordered on big-endian ones)."""
    words = bits.view(torch.uint8)
    if sys.byteorder == "big":
        words = words.view(*bits.shape, 4).flip(-1).reshape(words.shape)
    return words


def unpack_bits(bits: torch.Tensor, block_k: int) -> torch.Tensor:
    """bool [S, BQ, BK]: the token masks of every bit pattern ``bits`` [S, BQ, W], unpacked."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return (key_bytes(bits)[..., None] >> shifts & 1).bool().flatten(-2)[..., :block_k]


def dense_mask(tile_map: torch.Tensor, bits: torch.Tensor, block_q: int, block_k: int, n: int) -> torch.Tensor:
    """bool [B, Hp, rows, n]: the token mask of the query tiles in ``tile_map`` [B, Hp, nQ', nK] (all
    of a plan's, or a band of them), rows = nQ' * block_q cut at n, keys cut at n."""
    B, Hp, nQ, nK = tile_map.shape
    mask = unpack_bits(bits, block_k)[tile_map.long()]  # [B, Hp, nQ, nK, BQ, BK]
    return mask.permute(0, 1, 2, 4, 3, 5).reshape(B, Hp, nQ * block_q, nK * block_k)[:, :, :n, :n]


def _expand_heads(x: torch.Tensor, H: int) -> torch.Tensor:
    """GQA: key/value head j serves query heads j * (H / Hk) ... (j + 1) * (H / Hk) - 1."""
    return x if x.shape[1] == H else x.repeat_interleave(H // x.shape[1], dim=1)


def _bands(tiles: PlanTensors, block_q: int, n: int, heads: int):
    """(i0, i1, r0, r1): bands of query tiles [i0, i1), query rows [r0, r1), whose scores fit ROWS_SCORES."""
    B, _, nQ, _ = tiles.tile_map.shape
    per_band = max(1, ROWS_SCORES // max(1, B * heads * block_q * n))
    for i0 in range(0, nQ, per_band):
        i1 = min(i0 + per_band, nQ)
        yield i0, i1, i0 * block_q, min(i1 * block_q, n)


def _scores(q, k, kv_log_size, tiles, block_q, block_k, scale, i0, i1, r0, r1):
    """S [B, H, r1 - r0, N] of a band of query rows: scale * q k^T + log size, -inf where masked."""
    n = k.shape[2]
    allowed = dense_mask(tiles.tile_map[:, :, i0:i1], tiles.bits, block_q, block_k, n)[:, :, : r1 - r0]
    s = torch.matmul(q[:, :, r0:r1], k.transpose(-1, -2)) * scale
    if kv_log_size is not None:
        s = s + kv_log_size[:, None, None, :]
    return s.masked_fill(~allowed, float("-inf"))  # a shared plan (Hp = 1) broadcasts over the heads


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_log_size: torch.Tensor | None,
    tiles: PlanTensors,
    block_q: int,
    block_k: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out [B, H, N, D] in q's dtype and natural-log LSE [B, H, N] in fp32 (fp64 for fp64 q).

    q [B, H, N, D]; k, v [B, Hk, N, D] with H % Hk == 0; kv_log_size [B, N] or None.
    """
    B, H, N, D = q.shape
    acc = accumulation_dtype(q.dtype)
    qf, kf, vf = q.to(acc), _expand_heads(k.to(acc), H), _expand_heads(v.to(acc), H)
    ls = None if kv_log_size is None else kv_log_size.to(acc)
    out = torch.zeros(B, H, N, v.shape[-1], dtype=acc, device=q.device)
    lse = torch.full((B, H, N), float("-inf"), dtype=acc, device=q.device)
    for i0, i1, r0, r1 in _bands(tiles, block_q, N, H):
        s = _scores(qf, kf, ls, tiles, block_q, block_k, scale, i0, i1, r0, r1)
        band_lse = torch.logsumexp(s, -1)  # -inf for a row with no allowed key
        p = torch.exp(s - band_lse[..., None]).nan_to_num(0.0)  # such a row: exp(-inf - -inf) = NaN -> 0
        out[:, :, r0:r1] = torch.matmul(p, vf)
        lse[:, :, r0:r1] = band_lse
    return out.to(q.dtype), lse


def sparse_attention_backward(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_log_size: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    tiles: PlanTensors,
    block_q: int,
    block_k: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients (dq, dk, dv, d kv_log_size or None) of ``sparse_attention`` from its saved out and LSE.

    With P = exp(S - LSE): dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O) + dLSE), dQ = scale
    dS K, dK = scale dS^T Q, d kv_log_size[key] = the sum of dS over heads and queries. GQA gradients
    are summed over the query heads that share a key/value head. In the inputs' dtypes (d kv_log_size
    in fp32, fp64 for fp64 inputs).
    """
    B, H, N, D = q.shape
    Hk = k.shape[1]
    acc = accumulation_dtype(q.dtype)
    qf, kf, vf = q.to(acc), _expand_heads(k.to(acc), H), _expand_heads(v.to(acc), H)
    go, of = grad_out.to(acc), out.to(acc)
    ls = None if kv_log_size is None else kv_log_size.to(acc)
    dq = torch.zeros_like(qf)
    dk, dv = torch.zeros_like(kf), torch.zeros_like(vf)
    dls = None if kv_log_size is None else torch.zeros(B, N, dtype=acc, device=q.device)
    for i0, i1, r0, r1 in _bands(tiles, block_q, N, H):
        s = _scores(qf, kf, ls, tiles, block_q, block_k, scale, i0, i1, r0, r1)
        p = torch.exp(s - lse[:, :, r0:r1, None].to(acc)).nan_to_num(0.0)  # rows with no key: P = 0
        g = go[:, :, r0:r1]
        dv += torch.matmul(p.transpose(-1, -2), g)
        row_term = (g * of[:, :, r0:r1]).sum(-1, keepdim=True)
        if grad_lse is not None:
            row_term = row_term - grad_lse[:, :, r0:r1, None].to(acc)
        ds = p * (torch.matmul(g, vf.transpose(-1, -2)) - row_term)
        dq[:, :, r0:r1] = torch.matmul(ds, kf) * scale
        dk += torch.matmul(ds.transpose(-1, -2), qf[:, :, r0:r1]) * scale
        if dls is not None:
            dls += ds.sum((1, 2))
    if Hk != H:
        dk = dk.reshape(B, Hk, H // Hk, N, D).sum(2)
        dv = dv.reshape(B, Hk, H // Hk, N, v.shape[-1]).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dls


# ---------------------------------------------------------------------------------------------------
# attention_received: the attention mass each key receives (FastV, VisionZip, HoliTom, FlashVID)


def attention_received(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor | None,
    kv_log_size: torch.Tensor | None,
    tiles: PlanTensors | None,
    block_q: int,
    block_k: int,
    scale: float,
    row_start: int,
    row_end: int,
) -> torch.Tensor:
    """received [B, H, N] fp32 (fp64 for fp64 q): sum over query rows row_start <= i < row_end of
    P[b, h, i, j] = exp(scale q_i k_j + kv_log_size[j] - lse[i]) over the allowed pairs (all pairs
    without a plan; the plan's token mask with one, q and k then on the plan's N tokens).

    q [B, H, M, D]; k [B, Hk, N, D] with H % Hk == 0; lse [B, H, M] natural log, or None to compute it
    here (the same logsumexp over each row's allowed keys). A row with no allowed key (lse -inf)
    gives nothing. Computed a band of query rows at a time, like ``sparse_attention``: the [M, N]
    matrix is never whole.
    """
    B, H, M, D = q.shape
    N = k.shape[2]
    acc = accumulation_dtype(q.dtype)
    qf, kf = q.to(acc), _expand_heads(k.to(acc), H)
    ls = None if kv_log_size is None else kv_log_size.to(acc)
    out = torch.zeros(B, H, N, dtype=acc, device=q.device)
    rows_per_band = max(block_q, ROWS_SCORES // max(1, B * H * N) // block_q * block_q)
    start = row_start - row_start % block_q  # bands aligned to the plan's query tiles
    for r0 in range(start, row_end, rows_per_band):
        r1 = min(r0 + rows_per_band, -(-row_end // block_q) * block_q, M)
        if tiles is None:
            s = torch.matmul(qf[:, :, r0:r1], kf.transpose(-1, -2)).mul_(scale)
            if ls is not None:
                s.add_(ls[:, None, None, :])
        else:
            s = _scores(qf, kf, ls, tiles, block_q, block_k, scale, r0 // block_q, -(-r1 // block_q), r0, r1)
        if lse is None:  # a row without keys (all -inf) or with a NaN softmaxes to NaN: it gives nothing
            p = torch.softmax(s, -1).nan_to_num_(0.0)
        else:
            band_lse = lse[:, :, r0:r1].to(acc)
            p = s.sub_(band_lse[..., None]).exp_()  # in place: P of the band
            p.masked_fill_(~torch.isfinite(band_lse)[..., None], 0.0)  # rows without keys (or NaN) give nothing
        if r0 < row_start or r1 > row_end:  # a band that reaches past the rows that count
            rows = torch.arange(r0, r1, device=q.device)
            p.mul_(((rows >= row_start) & (rows < row_end)).to(acc)[:, None])
        out += p.sum(2)
    return out

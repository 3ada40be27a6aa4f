"""Reference implementation of block-sparse attention over a SparsePlan's tiles.

The plan is read through two tensors (see vidtok.sparse.SparsePlan):

- ``tile_map`` int32 [B, nQ, nK]: 0 = empty tile pair, 1 = full (every pair attends), s >= 2 = partial,
  whose token mask is ``bits[s]``;
- ``bits`` int32 [2 + P, BQ, ceil(BK / 32)]: bit ``c % 32`` of word ``bits[s, r, c // 32]`` says whether
  query r of the tile attends to key c; ``bits[0]`` is all zeros and ``bits[1]`` all ones, so
  ``bits[tile_map]`` is the token mask of every tile pair.

The forward gathers each query tile's non-empty key tiles (work proportional to the plan's tiles);
the backward is dense masked attention a chunk of query tiles at a time (memory O(chunk * N), time
O(N^2)); both in fp32 (fp64 for fp64 inputs): S = scale * q k^T + kv_log_size[key], pairs
outside the mask -> -inf, P = softmax(S) with rows that have no allowed key giving P = 0 (output 0,
LSE -inf), O = P v. ``kv_log_size`` is ToMe's proportional attention (Bolya et al. 2023,
facebookresearch/ToMe): a key of size s weighs as s copies of itself, since s e^x = e^(x + log s).
"""

from __future__ import annotations

import torch

from vidtok.reference.merge import accumulation_dtype

# Elements of the largest temporary of one chunk (B * H * rows * N scores): ~64 MiB in fp32.
_CHUNK_ELEMENTS = 1 << 24


def dense_mask_rows(tile_map: torch.Tensor, bits: torch.Tensor, block_q: int, block_k: int, q_tile0: int, q_tile1: int, n: int) -> torch.Tensor:
    """bool [B, rows, n]: the token mask of query tiles [q_tile0, q_tile1) (rows past n cut off)."""
    B, _, nK = tile_map.shape
    words = bits[tile_map[:, q_tile0:q_tile1].long()]  # [B, c, nK, BQ, W]
    col = torch.arange(block_k, device=bits.device)
    words = words[..., col // 32]  # [B, c, nK, BQ, BK]: the word holding each column's bit
    mask = ((words >> (col % 32)) & 1).bool()
    c = q_tile1 - q_tile0
    mask = mask.permute(0, 1, 3, 2, 4).reshape(B, c * block_q, nK * block_k)
    rows = min(n - q_tile0 * block_q, c * block_q)
    return mask[:, :rows, :n]


def _q_tile_chunks(B: int, H: int, n: int, block_q: int):
    n_tiles = -(-n // block_q)
    per_chunk = max(1, _CHUNK_ELEMENTS // max(1, B * H * block_q * max(n, 1)))
    for i0 in range(0, n_tiles, per_chunk):
        yield i0, min(n_tiles, i0 + per_chunk)


def _expand_heads(x: torch.Tensor, H: int) -> torch.Tensor:
    """GQA: key/value head j serves query heads j * (H / Hk) ... (j + 1) * (H / Hk) - 1."""
    return x if x.shape[1] == H else x.repeat_interleave(H // x.shape[1], dim=1)


def _scores(qc, kf, ls, mask, scale):
    s = torch.matmul(qc, kf.transpose(-1, -2)) * scale
    if ls is not None:
        s = s + ls[:, None, None, :]
    return s.masked_fill(~mask[:, None], float("-inf"))


def _row_tiles(tile_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query tile, its non-empty key tiles (ascending) padded with empty ones to the longest row:
    (key tile indices [B, nQ, T], their tile_map states [B, nQ, T], 0 for padding). Reads T on the host."""
    nonempty = tile_map != 0
    T = max(1, int(nonempty.sum(-1).max())) if tile_map.numel() else 1
    order = torch.sort((~nonempty).to(torch.int8), dim=-1, stable=True).indices[..., :T]
    return order, tile_map.gather(-1, order)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_log_size: torch.Tensor | None,
    tile_map: torch.Tensor,
    bits: torch.Tensor,
    block_q: int,
    block_k: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out [B, H, N, D] in q's dtype and natural-log LSE [B, H, N] in fp32 (fp64 for fp64 q).

    q [B, H, N, D]; k, v [B, Hk, N, D] with H % Hk == 0; kv_log_size [B, N] or None.

    Each query tile attends to the keys of its non-empty key tiles only, gathered into a dense
    [BQ, T * BK] block (T = the most key tiles any query tile has), so the work is proportional to the
    plan's tiles, not N^2; within it the token mask comes from ``bits``. A chunk of query tiles at a
    time bounds the memory.
    """
    B, H, N, D = q.shape
    acc = accumulation_dtype(q.dtype)
    out = torch.zeros(B, H, N, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full((B, H, N), float("-inf"), dtype=acc, device=q.device)
    if out.numel() == 0:
        return out, lse
    kf, vf = _expand_heads(k.to(acc), H), _expand_heads(v.to(acc), H)
    ls = None if kv_log_size is None else kv_log_size.to(acc)
    n_q = tile_map.shape[1]
    qf = torch.nn.functional.pad(q.to(acc), (0, 0, 0, n_q * block_q - N)).view(B, H, n_q, block_q, D)
    order, state = _row_tiles(tile_map)
    T = order.shape[-1]
    col = torch.arange(block_k, device=q.device)
    per_chunk = max(1, _CHUNK_ELEMENTS // (B * H * block_q * T * block_k))
    for i0 in range(0, n_q, per_chunk):
        i1 = min(n_q, i0 + per_chunk)
        c = i1 - i0
        kidx = (order[:, i0:i1, :, None] * block_k + col).reshape(B, c * T * block_k)  # key token of each column
        kvalid = kidx < N
        kidx = kidx.clamp_max(N - 1)
        words = bits[state[:, i0:i1].long()][..., col // 32]  # [B, c, T, BQ, BK]
        mask = ((words >> (col % 32)) & 1).bool().permute(0, 1, 3, 2, 4).reshape(B, c, block_q, T * block_k)
        mask = mask & kvalid.view(B, c, 1, T * block_k)
        gather = kidx.view(B, 1, -1, 1).expand(B, H, -1, D)
        kg = kf.gather(2, gather).view(B, H, c, T * block_k, D)
        vg = vf.gather(2, kidx.view(B, 1, -1, 1).expand(B, H, -1, vf.shape[-1])).view(B, H, c, T * block_k, -1)
        s = torch.matmul(qf[:, :, i0:i1], kg.transpose(-1, -2)) * scale  # [B, H, c, BQ, T * BK]
        if ls is not None:
            s = s + ls.gather(1, kidx).view(B, 1, c, 1, T * block_k)
        s = s.masked_fill(~mask[:, None], float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)  # -inf for rows with no allowed key
        p = torch.exp(s - torch.where(torch.isinf(row_lse), 0.0, row_lse)[..., None])
        r0, r1 = i0 * block_q, min(N, i1 * block_q)
        out[:, :, r0:r1] = torch.matmul(p, vg).reshape(B, H, c * block_q, -1)[:, :, : r1 - r0].to(q.dtype)
        lse[:, :, r0:r1] = row_lse.reshape(B, H, c * block_q)[:, :, : r1 - r0]
    return out, lse


def sparse_attention_backward(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_log_size: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    tile_map: torch.Tensor,
    bits: torch.Tensor,
    block_q: int,
    block_k: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients (dq, dk, dv, d kv_log_size) of ``sparse_attention`` from the saved out and LSE.

    With P recomputed from the LSE: dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O) + dLSE),
    dQ = scale dS K, dK = scale dS^T Q, d kv_log_size[key] = sum over heads and queries of dS (the
    column sums of dS, FlashAttention-2's backward with a per-key bias). GQA gradients are summed over
    the query heads sharing a key/value head. Returned in the inputs' dtypes (dls in fp32/fp64).
    """
    B, H, N, D = q.shape
    Hk = k.shape[1]
    acc = accumulation_dtype(q.dtype)
    kf, vf = _expand_heads(k.to(acc), H), _expand_heads(v.to(acc), H)
    ls = None if kv_log_size is None else kv_log_size.to(acc)
    go, o = grad_out.to(acc), out.to(acc)
    dq = torch.empty(B, H, N, D, dtype=acc, device=q.device)
    dk = torch.zeros(B, H, N, D, dtype=acc, device=q.device)
    dv = torch.zeros(B, H, N, v.shape[-1], dtype=acc, device=q.device)
    dls = None if ls is None else torch.zeros(B, N, dtype=acc, device=q.device)
    for i0, i1 in _q_tile_chunks(B, H, N, block_q):
        r0, r1 = i0 * block_q, min(N, i1 * block_q)
        mask = dense_mask_rows(tile_map, bits, block_q, block_k, i0, i1, N)
        qc = q[:, :, r0:r1].to(acc)
        s = _scores(qc, kf, ls, mask, scale)
        row_lse = lse[:, :, r0:r1].to(acc)
        p = torch.exp(s - torch.where(torch.isinf(row_lse), 0.0, row_lse)[..., None])
        goc = go[:, :, r0:r1]
        dv += torch.matmul(p.transpose(-1, -2), goc)
        dp = torch.matmul(goc, vf.transpose(-1, -2))
        delta = (goc * o[:, :, r0:r1]).sum(-1, keepdim=True)
        if grad_lse is not None:
            delta = delta - grad_lse[:, :, r0:r1, None].to(acc)
        ds = p * (dp - delta)
        dq[:, :, r0:r1] = torch.matmul(ds, kf) * scale
        dk += torch.matmul(ds.transpose(-1, -2), qc) * scale
        if dls is not None:
            dls += ds.sum(dim=(1, 2))
    if Hk != H:
        dk = dk.view(B, Hk, H // Hk, N, D).sum(2)
        dv = dv.view(B, Hk, H // Hk, N, v.shape[-1]).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dls

"""Reference implementation of block-sparse attention over a SparsePlan's tiles.

The plan is read through two tensors (see vidtok.sparse.SparsePlan):

- ``tile_map`` int32 [B, nQ, nK]: 0 = empty tile pair, 1 = full (every pair attends), s >= 2 = partial,
  whose token mask is ``bits[s]``;
- ``bits`` int32 [2 + P, BQ, ceil(BK / 32)]: bit ``c % 32`` of word ``bits[s, r, c // 32]`` says whether
  query r of the tile attends to key c; ``bits[0]`` is all zeros and ``bits[1]`` all ones, so
  ``bits[tile_map]`` is the token mask of every tile pair.

Both passes work on the plan's tiles only (time proportional to the non-empty tile pairs, not N^2):
a chunk of query tiles at a time gathers each tile's non-empty key tiles into a dense [BQ, T * BK]
block (T = the most key tiles any query tile of the chunk has; tiles are taken longest row first, so
little is padding), and the token mask inside comes from ``bits``. The forward and the dQ part of the
backward walk query tiles; dK, dV and d kv_log_size walk key tiles over the transposed map (the
FlashAttention-2 / FlexAttention split), so every output tile is written once: deterministic, no
atomics. All in fp32 (fp64 for fp64 inputs): S = scale * q k^T + kv_log_size[key], pairs outside the
mask -> -inf, P = softmax(S) with rows that have no allowed key giving P = 0 (output 0, LSE -inf),
O = P v. ``kv_log_size`` is ToMe's proportional attention (Bolya et al. 2023, facebookresearch/ToMe):
a key of size s weighs as s copies of itself, since s e^x = e^(x + log s).
"""

from __future__ import annotations

import torch

from vidtok.reference.merge import accumulation_dtype

# Scores held by one chunk of tile rows (rows * H * BQ * T * BK). On CPUs 2^20 fp32 = 4 MiB, so the
# softmax passes over them stay in cache: measured on the 2-thread CPU of bench/NOTES.md (one thread,
# CPU time, 16x16x16 grid, H = 4, D = 64), 2^20 ran the forward 1.2-2.8x faster than 2^24 (the old
# chunk), and 2^18-2^21 were within noise of each other. GPUs keep 2^24 (fewer, larger launches).
_CHUNK_ELEMENTS = {"cpu": 1 << 20}
_CHUNK_ELEMENTS_DEFAULT = 1 << 24


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


def _expand_heads(x: torch.Tensor, H: int) -> torch.Tensor:
    """GQA: key/value head j serves query heads j * (H / Hk) ... (j + 1) * (H / Hk) - 1."""
    return x if x.shape[1] == H else x.repeat_interleave(H // x.shape[1], dim=1)


def _tiles(x: torch.Tensor, n_tiles: int, block: int) -> torch.Tensor:
    """[B, H, N, C] -> [B * H * n_tiles, block * C]; tile i of (b, h) is row (b * H + h) * n_tiles + i
    (zero rows past N), so a chunk's tiles are gathered with one index_select of contiguous rows."""
    B, H, N, C = x.shape
    return torch.nn.functional.pad(x, (0, 0, 0, n_tiles * block - N)).reshape(B * H * n_tiles, block * C)


def _tile_rows(tile_map: torch.Tensor, H: int, block_row: int, block_col: int):
    """The rows of ``tile_map`` [B, nR, nC] that have non-empty tiles, in chunks, longest row first.

    Yields (b [R], i [R], cols [R, T], state [R, T]): the chunk's rows (sequence, row tile), each row's
    non-empty column tiles ascending then padded with empty ones up to T = the longest row of the
    chunk, and their tile_map states (0 for the padding). Taking rows longest first keeps the padding
    small (causal masks have rows of 1 .. nC tiles); a chunk holds at most _CHUNK_ELEMENTS scores
    (or one row, if a row alone holds more).
    Reads the row lengths on the host.
    """
    B, nR, nC = tile_map.shape
    flat = tile_map.reshape(B * nR, nC)
    nonempty = flat != 0
    lengths, order = torch.sort(nonempty.sum(-1), descending=True, stable=True)
    lengths = lengths.tolist()
    cols = torch.sort((~nonempty).to(torch.int8), dim=-1, stable=True).indices
    chunk = _CHUNK_ELEMENTS.get(tile_map.device.type, _CHUNK_ELEMENTS_DEFAULT)
    r0, n_rows = 0, sum(1 for n in lengths if n)
    while r0 < n_rows:
        T = lengths[r0]
        r1 = min(n_rows, r0 + max(1, chunk // (H * block_row * T * block_col)))
        rows = order[r0:r1]
        chunk_cols = cols[rows, :T]
        yield rows // nR, rows % nR, chunk_cols, flat[rows[:, None], chunk_cols]
        r0 = r1


def _tile_mask(bits: torch.Tensor, state: torch.Tensor, cols: torch.Tensor, block_q: int, block_k: int, n: int, by_key: bool):
    """The token mask of a chunk's tiles, or None when every tile is full (nothing to mask; checked
    on CPUs only, where reading it costs no device sync).

    Walking query tiles (``by_key`` False, ``cols`` = key tiles): bool [R, BQ, T * BK]; walking key
    tiles (``cols`` = query tiles): bool [R, BK, T * BQ]. Tokens past n on the gathered side are
    masked too (their bits are 0 in plans from build_plan; this keeps padding out whatever the bits)."""
    if state.device.type == "cpu" and bool((state == 1).all()):
        return None
    R, T = state.shape
    col = torch.arange(block_k, device=bits.device)
    words = bits[state][..., col // 32]  # [R, T, BQ, BK], the word holding each key's bit
    allowed = ((words >> (col % 32)) & 1).bool()
    if by_key:
        if n % block_q:
            allowed &= ((cols * block_q)[..., None] + torch.arange(block_q, device=bits.device) < n)[..., None]
        return allowed.permute(0, 3, 1, 2).reshape(R, block_k, T * block_q)
    if n % block_k:
        allowed &= ((cols * block_k)[..., None] + col < n)[:, :, None, :]
    return allowed.permute(0, 2, 1, 3).reshape(R, block_q, T * block_k)


def _heads_index(b: torch.Tensor, tiles: torch.Tensor, H: int, n_tiles: int) -> torch.Tensor:
    """Rows of ``_tiles`` for sequences b [R] and tiles [R] or [R, T]: [R * H] or [R * H * T], (r, h, t) order."""
    heads = torch.arange(H, device=b.device)
    if tiles.dim() == 1:
        return ((b[:, None] * H + heads) * n_tiles + tiles[:, None]).flatten()
    return ((b[:, None, None] * H + heads[:, None]) * n_tiles + tiles[:, None, :]).flatten()


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

    Each query tile attends to the keys of its non-empty key tiles only (``_tile_rows``): scores
    [BQ, T * BK] per tile and head, the row max subtracted and exponentiated in place, O = P V / rowsum.
    """
    B, H, N, D = q.shape
    Dv = v.shape[-1]
    acc = accumulation_dtype(q.dtype)
    nQ, nK = tile_map.shape[1:]
    out = torch.zeros(B * H * nQ, block_q * Dv, dtype=acc, device=q.device)
    lse = torch.full((B * H * nQ, block_q), float("-inf"), dtype=acc, device=q.device)
    if q.numel() and v.numel():
        qt = _tiles(q.to(acc) * scale, nQ, block_q)
        kt = _tiles(_expand_heads(k.to(acc), H), nK, block_k)
        vt = _tiles(_expand_heads(v.to(acc), H), nK, block_k)
        ls = None
        if kv_log_size is not None:
            ls = torch.nn.functional.pad(kv_log_size.to(acc), (0, nK * block_k - N)).view(B, nK, block_k)
        for b, i, cols, state in _tile_rows(tile_map, H, block_q, block_k):
            R, T = cols.shape
            q_rows, k_rows = _heads_index(b, i, H, nQ), _heads_index(b, cols, H, nK)
            s = torch.matmul(
                qt.index_select(0, q_rows).view(R, H, block_q, D),
                kt.index_select(0, k_rows).view(R, H, T * block_k, D).transpose(-1, -2),
            )  # [R, H, BQ, T * BK]
            mask = _tile_mask(bits, state, cols, block_q, block_k, N, by_key=False)
            if mask is not None:
                s.masked_fill_(~mask[:, None], float("-inf"))
            if ls is not None:
                s += ls[b[:, None], cols].view(R, 1, 1, T * block_k)
            m = s.amax(-1, keepdim=True)
            m.masked_fill_(torch.isinf(m), 0.0)  # rows with no allowed key: P = exp(-inf) = 0
            p = s.sub_(m).exp_()
            total = p.sum(-1, keepdim=True)
            o = torch.matmul(p, vt.index_select(0, k_rows).view(R, H, T * block_k, Dv))
            o *= torch.where(total > 0, 1 / total, 0.0)
            out.index_copy_(0, q_rows, o.view(R * H, block_q * Dv))
            lse.index_copy_(0, q_rows, (m + total.log()).view(R * H, block_q))  # -inf where total = 0
    out = out.view(B, H, nQ * block_q, Dv)[:, :, :N].to(q.dtype).contiguous()
    return out, lse.view(B, H, nQ * block_q)[:, :, :N].contiguous()


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
    column sums of dS, FlashAttention-2's backward with a per-key bias). dQ walks query tiles, dK, dV
    and d kv_log_size walk key tiles (the transposed tile map), each over the plan's tiles only. GQA
    gradients are summed over the query heads sharing a key/value head. Returned in the inputs'
    dtypes (dls in fp32/fp64).
    """
    B, H, N, D = q.shape
    Hk, Dv = k.shape[1], v.shape[-1]
    acc = accumulation_dtype(q.dtype)
    nQ, nK = tile_map.shape[1:]
    dq = torch.zeros(B * H * nQ, block_q * D, dtype=acc, device=q.device)
    dk = torch.zeros(B * H * nK, block_k * D, dtype=acc, device=q.device)
    dv = torch.zeros(B * H * nK, block_k * Dv, dtype=acc, device=q.device)
    dls = None if kv_log_size is None else torch.zeros(B * nK, block_k, dtype=acc, device=q.device)
    if q.numel() and v.numel():
        go = grad_out.to(acc)
        delta = (go * out.to(acc)).sum(-1)  # [B, H, N]
        if grad_lse is not None:
            delta = delta - grad_lse.to(acc)
        lse = lse.to(acc)
        lse = torch.where(torch.isinf(lse), 0.0, lse)  # rows with no allowed key have P = 0 anyway
        qt = _tiles(q.to(acc) * scale, nQ, block_q)  # scaled once: S = (scale q) k^T, dK = dS^T (scale q)
        gt = _tiles(go, nQ, block_q)
        lt, dt = _tiles(lse[..., None], nQ, block_q), _tiles(delta[..., None], nQ, block_q)
        kt = _tiles(_expand_heads(k.to(acc), H), nK, block_k)
        vt = _tiles(_expand_heads(v.to(acc), H), nK, block_k)
        ls = None
        if kv_log_size is not None:
            ls = torch.nn.functional.pad(kv_log_size.to(acc), (0, nK * block_k - N)).view(B, nK, block_k)
        # dQ: query tiles x their key tiles
        for b, i, cols, state in _tile_rows(tile_map, H, block_q, block_k):
            R, T = cols.shape
            q_rows, k_rows = _heads_index(b, i, H, nQ), _heads_index(b, cols, H, nK)
            kg = kt.index_select(0, k_rows).view(R, H, T * block_k, D)
            s = torch.matmul(qt.index_select(0, q_rows).view(R, H, block_q, D), kg.transpose(-1, -2))
            mask = _tile_mask(bits, state, cols, block_q, block_k, N, by_key=False)
            if mask is not None:
                s.masked_fill_(~mask[:, None], float("-inf"))
            if ls is not None:
                s += ls[b[:, None], cols].view(R, 1, 1, T * block_k)
            p = s.sub_(lt.index_select(0, q_rows).view(R, H, block_q, 1)).exp_()
            g = gt.index_select(0, q_rows).view(R, H, block_q, Dv)
            dp = torch.matmul(g, vt.index_select(0, k_rows).view(R, H, T * block_k, Dv).transpose(-1, -2))
            ds = p.mul_(dp.sub_(dt.index_select(0, q_rows).view(R, H, block_q, 1)))
            dq.index_copy_(0, q_rows, (torch.matmul(ds, kg) * scale).view(R * H, block_q * D))
        # dK, dV, d kv_log_size: key tiles x their query tiles (transposed scores S^T [BK, T * BQ])
        for b, j, rows, state in _tile_rows(tile_map.transpose(1, 2), H, block_k, block_q):
            R, T = rows.shape
            k_rows, q_rows = _heads_index(b, j, H, nK), _heads_index(b, rows, H, nQ)
            qg = qt.index_select(0, q_rows).view(R, H, T * block_q, D)
            g = gt.index_select(0, q_rows).view(R, H, T * block_q, Dv)
            st = torch.matmul(kt.index_select(0, k_rows).view(R, H, block_k, D), qg.transpose(-1, -2))
            mask = _tile_mask(bits, state, rows, block_q, block_k, N, by_key=True)
            if mask is not None:
                st.masked_fill_(~mask[:, None], float("-inf"))
            if ls is not None:
                st += ls[b, j].view(R, 1, block_k, 1)
            pt = st.sub_(lt.index_select(0, q_rows).view(R, H, 1, T * block_q)).exp_()
            dv.index_copy_(0, k_rows, torch.matmul(pt, g).view(R * H, block_k * Dv))
            dpt = torch.matmul(vt.index_select(0, k_rows).view(R, H, block_k, Dv), g.transpose(-1, -2))
            dst = pt.mul_(dpt.sub_(dt.index_select(0, q_rows).view(R, H, 1, T * block_q)))
            dk.index_copy_(0, k_rows, torch.matmul(dst, qg).view(R * H, block_k * D))
            if dls is not None:
                dls.index_copy_(0, b * nK + j, dst.sum(dim=(1, 3)))
    dq = dq.view(B, H, nQ * block_q, D)[:, :, :N]
    dk = dk.view(B, H, nK * block_k, D)[:, :, :N]
    dv = dv.view(B, H, nK * block_k, Dv)[:, :, :N]
    if Hk != H:
        dk = dk.reshape(B, Hk, H // Hk, N, D).sum(2)
        dv = dv.reshape(B, Hk, H // Hk, N, Dv).sum(2)
    dls = None if dls is None else dls.view(B, nK * block_k)[:, :N].contiguous()
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous(), dls

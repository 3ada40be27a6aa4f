"""Reference implementation of block-sparse attention over a SparsePlan's tiles.

The plan is read through two tensors (see vidtok.sparse.SparsePlan):

- ``tile_map`` int32 [B, nQ, nK]: 0 = empty tile pair, 1 = full (every pair attends), s >= 2 = partial,
  whose token mask is ``bits[s]``;
- ``bits`` int32 [2 + P, BQ, ceil(BK / 32)]: bit ``c % 32`` of word ``bits[s, r, c // 32]`` says whether
  query r of the tile attends to key c; ``bits[0]`` is all zeros and ``bits[1]`` all ones, so
  ``bits[tile_map]`` is the token mask of every tile pair.

Both passes walk query tiles and work on the plan's tiles only (time proportional to the non-empty
tile pairs, not N^2). A chunk of query tiles at a time (longest rows first, so little is padding)
is one attention problem: each query tile [BQ] against the keys of its non-empty key tiles that any
of its queries attends to (``_TileMasks.chunk``), the token mask inside as an additive bias (0 or
-inf, from ``bits``). q, k and v are laid out token-major (``_tiles``), so gathering a chunk's
queries and keys is one index_select of contiguous rows. On CPUs each chunk runs in ATen's fused
flash-attention kernels (``aten::_scaled_dot_product_flash_attention_for_cpu`` and its backward:
the blocked online softmax torch's own SDPA runs on CPUs); elsewhere as the explicit softmax(S) V of
``_attend_explicit``, which is what the CPU kernel computes (tests/test_sparse_attention.py checks
one against the other). The backward adds each chunk's dK and dV into their keys in chunk order
(``_add_rows``): deterministic, no float atomics.

All in fp32 (fp64 for fp64 inputs): S = scale * q k^T + kv_log_size[key], pairs outside the mask
-> -inf, P = softmax(S) with rows that have no allowed key giving P = 0 (output 0, LSE -inf),
O = P v. ``kv_log_size`` is ToMe's proportional attention (Bolya et al. 2023, facebookresearch/ToMe):
a key of size s weighs as s copies of itself, since s e^x = e^(x + log s).
"""

from __future__ import annotations

import sys

import torch

from vidtok.reference.merge import accumulation_dtype

# Scores held by one chunk of tile rows (rows * H * BQ * T * BK). On CPUs 2^20 (4 MiB of fp32):
# 2^17-2^20 ran within noise of each other through the fused kernel and 2^21-2^22 up to 1.7x slower
# (bench/NOTES.md, sparse attention). GPUs keep 2^24 (fewer, larger launches).
_CHUNK_ELEMENTS = {"cpu": 1 << 20}
_CHUNK_ELEMENTS_DEFAULT = 1 << 24


def _key_bytes(bits: torch.Tensor) -> torch.Tensor:
    """uint8 [S, BQ, 4W]: the bit words [S, BQ, W] as bytes in key order, byte c // 8 holding key c
    in bit c % 8. Key c is bit c % 32 of word c // 32, so the words' bytes are taken from the least
    significant end (as they lie in memory on little-endian machines; reordered on big-endian ones)."""
    words = bits.view(torch.uint8)
    if sys.byteorder == "big":
        words = words.view(*bits.shape, 4).flip(-1).reshape(words.shape)
    return words


def _unpack_bits(bits: torch.Tensor, block_k: int) -> torch.Tensor:
    """bool [S, BQ, BK]: the token masks of every bit pattern ``bits`` [S, BQ, W], unpacked."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return (_key_bytes(bits)[..., None] >> shifts & 1).bool().flatten(-2)[..., :block_k]


def dense_mask_rows(tile_map: torch.Tensor, bits: torch.Tensor, block_q: int, block_k: int, q_tile0: int, q_tile1: int, n: int) -> torch.Tensor:
    """bool [B, rows, n]: the token mask of query tiles [q_tile0, q_tile1) (rows past n cut off)."""
    B, _, nK = tile_map.shape
    c = q_tile1 - q_tile0
    mask = _unpack_bits(bits, block_k)[tile_map[:, q_tile0:q_tile1].long()]  # [B, c, nK, BQ, BK]
    mask = mask.permute(0, 1, 3, 2, 4).reshape(B, c * block_q, nK * block_k)
    rows = min(n - q_tile0 * block_q, c * block_q)
    return mask[:, :rows, :n]


class _TileMasks:
    """The token masks of a plan's tile pairs as additive score biases (0 where the pair attends,
    -inf where not), built per chunk from the bit words by one table look-up per byte (8 keys), and
    which keys and query rows of each bit pattern attend at all. Keys past N (in the last key tile
    when N is not a multiple of BK) are masked too: they have no bits in plans from build_plan; this
    keeps padding out whatever the bits."""

    def __init__(self, bits: torch.Tensor, block_q: int, block_k: int, n: int, n_key_tiles: int, dtype: torch.dtype):
        self.bytes, self.block_q, self.block_k, self.last_tile = _key_bytes(bits), block_q, block_k, n_key_tiles - 1
        self.tail = n - self.last_tile * block_k  # keys of the last key tile that exist
        device = bits.device
        byte_bits = torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device) & 1
        self.byte_bias = byte_bits.to(dtype).reciprocal_().neg_().add_(1)  # 1 - 1/x: 0 for a set bit, -inf if not
        self.row_used = (bits != 0).any(-1)  # [S, BQ]: the query attends to some key
        words = bits
        while words.shape[1] > 1:  # OR over the (power-of-two many) query rows
            words = words[:, 0::2] | words[:, 1::2]
        self.key_used = _unpack_bits(words, block_k)[:, 0]  # [S, BK]: some query attends to the key
        if self.tail < block_k:  # the row test of the last key tile sees only the keys that exist
            low_bits = [min(32, max(0, self.tail - 32 * w)) for w in range(bits.shape[-1])]
            existing = torch.tensor([(1 << b) - 1 if b < 32 else -1 for b in low_bits], dtype=torch.int32, device=device)
            self.row_used_last = (bits & existing != 0).any(-1)

    def chunk(self, state: torch.Tensor, cols: torch.Tensor, first_key: torch.Tensor, log_size: torch.Tensor | None = None):
        """(keys [R, L], bias [R, 1, BQ, L] or None, empty rows [R, BQ] or None) of a chunk's tile
        pairs state, cols [R, T], whose tiles start at key ``first_key`` [R, T] (an index into the
        flattened keys of every sequence).

        ``keys`` are the keys each query tile attends to: those of its key tiles that any of its
        queries attends to, ascending, padded with unused ones to the chunk's longest list (a 64-query
        tile of a 7x7 window on a pruned layout uses ~80 % of its partial tiles' keys: that much less
        attention to compute); ``log_size`` [R, T, BK] is added to every allowed key's bias. Every
        key, no bias and no empty row when every tile is full and there is no log size (checked on
        CPUs only, where reading it costs no device sync): full tiles have no padding and no empty row.
        """
        R, T = state.shape
        BQ, BK = self.block_q, self.block_k
        keys = (first_key[..., None] + torch.arange(BK, device=state.device)).view(R, T * BK)
        if log_size is None and state.device.type == "cpu" and bool((state == 1).all()):
            return keys, None, None
        state = state.long()
        words = self.bytes[state].permute(0, 2, 1, 3).contiguous()  # [R, BQ, T, 4W]
        bias = torch.nn.functional.embedding(words.long().flatten(), self.byte_bias).view(R, BQ, T, -1)[..., :BK]
        used, row_used = self.key_used[state], self.row_used[state]  # [R, T, BK], [R, T, BQ]
        if self.tail < BK:
            last = cols == self.last_tile
            r, t = last.nonzero(as_tuple=True)
            bias[r, :, t, self.tail :] = float("-inf")
            used[r, t, self.tail :] = False
            row_used = torch.where(last[..., None], self.row_used_last[state], row_used)
        if log_size is not None:
            bias += log_size[:, None]
        bias, used = bias.reshape(R, BQ, T * BK), used.view(R, T * BK)
        L = max(1, int(used.sum(1).max()))  # host sync (the chunking read the row lengths already)
        if L < T * BK:
            picked = torch.sort((~used).to(torch.int8), dim=1, stable=True).indices[:, :L]  # used keys first, in order
            keys = keys.gather(1, picked)
            bias = bias.gather(2, picked[:, None].expand(R, BQ, L))
        # a log size of -inf removes a key, so with log sizes the bias itself says which rows are empty
        empty = ~row_used.any(1) if log_size is None else torch.isneginf(bias).all(-1)
        return keys, bias[:, None], empty


def _expand_heads(x: torch.Tensor, H: int) -> torch.Tensor:
    """GQA: key/value head j serves query heads j * (H / Hk) ... (j + 1) * (H / Hk) - 1."""
    return x if x.shape[1] == H else x.repeat_interleave(H // x.shape[1], dim=1)


def _tiles(x: torch.Tensor, n_tiles: int, block: int, dtype: torch.dtype, extra: torch.Tensor | None = None) -> torch.Tensor:
    """[B, H, N, C] -> [B * n_tiles, block * H * C'] in dtype, token-major: row b * n_tiles + i holds
    the ``block`` tokens of tile i of sequence b, each with all its heads (zero rows past N); with
    ``extra`` (broadcastable to [B, H, N]) one more channel C' = C + 1 holds it. A chunk's tiles are
    then one index_select of long contiguous rows, ``_heads_view`` of them is the [R, H, block, C']
    the attention takes, and the fused CPU kernel's outputs and gradients, which it lays out
    token-major too, go back without a copy. One pass over x (the dtype cast rides in the copy)."""
    B, H, N, C = x.shape
    tiles = x.new_zeros((B, n_tiles * block, H, C + (extra is not None)), dtype=dtype)
    tiles[:, :N, :, :C] = x.transpose(1, 2)
    if extra is not None:
        tiles[:, :N, :, C] = extra.expand(B, H, N).transpose(1, 2)
    return tiles.view(B * n_tiles, -1)


def _heads_view(rows: torch.Tensor, R: int, H: int, C: int) -> torch.Tensor:
    """Gathered ``_tiles`` rows of R query tiles (or their T key tiles each) -> [R, H, tokens, C], a view."""
    return rows.view(R, -1, H, C).transpose(1, 2)


def _token_major(x: torch.Tensor) -> torch.Tensor:
    """[R, H, tokens, C] -> [R, tokens * H * C], the ``_tiles`` row layout (a view of the CPU kernel's outputs)."""
    return x.transpose(1, 2).reshape(x.shape[0], -1)


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


def _gather_buffer(keys: torch.Tensor, chunks: list, block_k: int) -> torch.Tensor:
    """One buffer for the keys or values of the largest chunk, reused by every chunk: on CPUs a
    fresh multi-MB tensor per chunk page-faults as it is first written, which cost more than the
    copy itself (bench/NOTES.md, sparse attention)."""
    rows = max((cols.numel() for _, _, cols, _ in chunks), default=0) * block_k
    return keys.new_empty((rows, keys.shape[1]))


def _gather(rows: torch.Tensor, index: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """rows[index], written into the front of ``buffer``."""
    return torch.index_select(rows, 0, index, out=buffer[: index.numel()])


def _chunks(tile_map, bits, kt, vt, H: int, C: int, block_q: int, block_k: int, n: int, dtype, log_size=None):
    """The chunks both passes walk (``_tile_rows``), each ready to attend: yields (q_rows [R], the
    ``_tiles`` rows of its query tiles; keys [R * L], its keys (``_TileMasks.chunk``); k, v
    [R, H, L, C], those keys' rows of ``kt`` and ``vt``; bias [R, 1, BQ, L] or None; empty rows
    [R, BQ] or None). ``log_size`` [B, nK, BK] goes into the bias. k and v are views of buffers
    the next chunk overwrites."""
    nQ, nK = tile_map.shape[1:]
    masks = _TileMasks(bits, block_q, block_k, n, nK, dtype)
    chunks = list(_tile_rows(tile_map, H, block_q, block_k))
    kbuf, vbuf = _gather_buffer(kt, chunks, block_k), _gather_buffer(vt, chunks, block_k)
    for b, i, cols, state in chunks:
        R = cols.shape[0]
        keys, bias, empty = masks.chunk(
            state, cols, (b[:, None] * nK + cols) * block_k, None if log_size is None else log_size[b[:, None], cols]
        )
        keys = keys.flatten()
        k, v = _heads_view(_gather(kt, keys, kbuf), R, H, C), _heads_view(_gather(vt, keys, vbuf), R, H, C)
        yield b * nQ + i, keys, k, v, bias, empty


def _attend_explicit(q, k, v, bias, scale):
    """softmax(scale q k^T + bias) v and its natural-log LSE for q [R, H, M, D], k, v [R, H, L, D],
    bias [R, 1, M, L] or None: the math of every chunk, in plain tensor ops (the path off CPUs).
    Rows whose bias is all -inf give output 0 and LSE -inf."""
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    if bias is not None:
        s += bias
    m = s.amax(-1, keepdim=True)
    m.masked_fill_(torch.isinf(m), 0.0)  # rows with no allowed key: P = exp(-inf) = 0
    p = s.sub_(m).exp_()
    total = p.sum(-1, keepdim=True)
    out = torch.matmul(p, v).mul_(torch.where(total > 0, 1 / total, 0.0))
    return out, (m + total.log()).squeeze(-1)


def _attend_cpu(q, k, v, bias, scale):
    """``_attend_explicit`` in ATen's fused CPU flash-attention kernel (rows with no allowed key are
    fixed up by the caller: the kernel's LSE there is not -inf)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=scale)


def _attend_backward_explicit(grad_out, q, k, v, out, lse, bias, scale):
    """(dq, dk, dv) of ``_attend_explicit`` from its output and a finite LSE (FlashAttention-2):
    P = exp(S - LSE), dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = scale dS K, dK = scale dS^T Q."""
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    if bias is not None:
        s += bias
    p = s.sub_(lse[..., None]).exp_()
    dv = torch.matmul(p.transpose(-1, -2), grad_out)
    dp = torch.matmul(grad_out, v.transpose(-1, -2))
    ds = p.mul_(dp.sub_((grad_out * out).sum(-1, keepdim=True)))
    return torch.matmul(ds, k).mul_(scale), torch.matmul(ds.transpose(-1, -2), q).mul_(scale), dv


def _attend_backward_cpu(grad_out, q, k, v, out, lse, bias, scale):
    """``_attend_backward_explicit`` in ATen's fused CPU flash-attention backward."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, q, k, v, out, lse, 0.0, False, attn_mask=bias, scale=scale
    )


def _chunk_math(device: torch.device):
    """(attend, attend_backward) for tensors on ``device``: ATen's fused kernels on CPUs, the
    explicit tensor ops elsewhere."""
    if device.type == "cpu":
        return _attend_cpu, _attend_backward_cpu
    return _attend_explicit, _attend_backward_explicit


def _add_rows(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    """dst[index] += src with repeated indices summed in a fixed order: index_add_ is serial over the
    index on CPUs; on GPUs it uses float atomics, so there index_put_(accumulate=True) (sorted) runs."""
    if dst.device.type == "cpu":
        dst.index_add_(0, index, src)
    else:
        dst.index_put_((index,), src, accumulate=True)


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

    Each query tile attends to the keys of its non-empty key tiles that any of its queries
    attends to (``_tile_rows``, ``_TileMasks.chunk``): one attention problem per tile and head, the
    token mask and the log sizes as its bias.
    """
    B, H, N, D = q.shape
    acc = accumulation_dtype(q.dtype)
    nQ, nK = tile_map.shape[1:]
    out = torch.zeros(B * nQ, block_q * H * D, dtype=acc, device=q.device)
    lse = torch.full((B * nQ, block_q * H), float("-inf"), dtype=acc, device=q.device)
    if q.numel() and v.numel():
        attend = _chunk_math(q.device)[0]
        qt = _tiles(q, nQ, block_q, acc)
        kt = _tiles(_expand_heads(k, H), nK * block_k, 1, acc)  # one row per key
        vt = _tiles(_expand_heads(v, H), nK * block_k, 1, acc)
        ls = None
        if kv_log_size is not None:
            ls = torch.nn.functional.pad(kv_log_size.to(acc), (0, nK * block_k - N)).view(B, nK, block_k)
        for q_rows, _, kc, vc, bias, empty in _chunks(tile_map, bits, kt, vt, H, D, block_q, block_k, N, acc, ls):
            R = q_rows.numel()
            o, m = attend(_heads_view(qt.index_select(0, q_rows), R, H, D), kc, vc, bias, scale)
            if empty is not None:  # rows with no allowed key: output 0, LSE -inf
                o = o.masked_fill(empty[:, None, :, None], 0.0)
                m = m.masked_fill(empty[:, None], float("-inf"))
            out.index_copy_(0, q_rows, _token_major(o))
            lse.index_copy_(0, q_rows, _token_major(m[..., None]))
    out = out.view(B, nQ * block_q, H, D)[:, :N].transpose(1, 2).to(q.dtype).contiguous()
    return out, lse.view(B, nQ * block_q, H)[:, :N].transpose(1, 2).contiguous()


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
    dQ = scale dS K, dK = scale dS^T Q, d kv_log_size[key] = sum over heads and queries of dS. One
    walk over query tiles: each chunk's dQ is final, its dK and dV are added into their key tiles.
    The log sizes and dLSE ride in one extra head channel, so every chunk is a plain attention
    backward: S = scale q' k'^T with q' = [q, 1/scale] and k' = [k, log size] (the last column of
    dK' = scale dS^T q' is then the column sums of dS, d kv_log_size); v' = [v, 0] leaves P V and dP
    as they are; out' = [out, -dLSE] with dO' = [dO, 1] turns rowsum(dO' * out') into
    rowsum(dO * O) - dLSE. Without log sizes and dLSE there is no extra channel (it costs ~8 % in
    the fused CPU backward). GQA gradients are summed over the query heads sharing a key/value head.
    Returned in the inputs' dtypes (d kv_log_size in fp32/fp64).
    """
    B, H, N, D = q.shape
    Hk = k.shape[1]
    acc = accumulation_dtype(q.dtype)
    nQ, nK = tile_map.shape[1:]
    extended = kv_log_size is not None or grad_lse is not None
    E = D + extended  # head channels, with the extra one
    dq = torch.zeros(B * nQ, block_q * H * E, dtype=acc, device=q.device)
    dk = torch.zeros(B * nK * block_k, H * E, dtype=acc, device=q.device)
    dv = torch.zeros(B * nK * block_k, H * E, dtype=acc, device=q.device)
    if q.numel() and v.numel():
        attend_backward = _chunk_math(q.device)[1]
        zero, one = q.new_zeros((), dtype=acc), q.new_ones((), dtype=acc)

        def channel(x):  # the extra channel's values, or no channel
            return x if extended else None

        ls = zero if kv_log_size is None else kv_log_size[:, None, :]
        qt = _tiles(q, nQ, block_q, acc, extra=channel(one / scale))
        kt = _tiles(_expand_heads(k, H), nK * block_k, 1, acc, extra=channel(ls))  # one row per key
        vt = _tiles(_expand_heads(v, H), nK * block_k, 1, acc, extra=channel(zero))
        ot = _tiles(out, nQ, block_q, acc, extra=channel(zero if grad_lse is None else -grad_lse))
        gt = _tiles(grad_out, nQ, block_q, acc, extra=channel(one))
        lse = lse.to(acc)
        lt = _tiles(torch.where(torch.isinf(lse), 0.0, lse)[..., None], nQ, block_q, acc)  # no allowed key: P = 0 anyway
        for q_rows, keys, kc, vc, bias, _ in _chunks(tile_map, bits, kt, vt, H, E, block_q, block_k, N, acc):
            R = q_rows.numel()
            dqc, dkc, dvc = attend_backward(
                _heads_view(gt.index_select(0, q_rows), R, H, E),
                _heads_view(qt.index_select(0, q_rows), R, H, E),
                kc,
                vc,
                _heads_view(ot.index_select(0, q_rows), R, H, E),
                _heads_view(lt.index_select(0, q_rows), R, H, 1)[..., 0],
                bias,
                scale,
            )
            dq.index_copy_(0, q_rows, _token_major(dqc))
            _add_rows(dk, keys, _token_major(dkc).view(keys.numel(), H * E))
            _add_rows(dv, keys, _token_major(dvc).view(keys.numel(), H * E))
    dq = dq.view(B, nQ * block_q, H, E)[:, :N, :, :D]
    dk = dk.view(B, nK * block_k, H, E)[:, :N]
    dv = dv.view(B, nK * block_k, H, E)[:, :N, :, :D]
    dls = None if kv_log_size is None else dk[..., D].sum(-1)
    dq, dk, dv = dq.transpose(1, 2), dk[..., :D].transpose(1, 2), dv.transpose(1, 2)
    if Hk != H:
        dk = dk.reshape(B, Hk, H // Hk, N, D).sum(2)
        dv = dv.reshape(B, Hk, H // Hk, N, D).sum(2)
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous(), dls

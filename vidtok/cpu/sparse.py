"""Block-sparse attention tuned for CPUs: the ``cpu`` backend of vidtok.sparse_attention.

The math is the reference's (vidtok.reference.sparse); the work is proportional to the plan's tiles,
not N^2. Both passes walk query tiles. Consecutive query tiles whose key sets overlap are taken
together (``_TileMasks.groups``): each group is one attention problem, its queries against one key
set -- a range of key tiles (a view of k and v, no copy) or the runs of 8 keys in which some query of
the group attends to some key (gathered) -- with the token mask as an additive bias (0 or -inf, from
the plan's bits; ``_TileMasks``). A small cost model picks the groups: larger problems run faster in
the kernel, while pairs of the key set that a tile does not use are wasted work. Each group runs in
ATen's fused CPU flash-attention kernels (``aten::_scaled_dot_product_flash_attention_for_cpu`` and
its backward: the blocked online softmax torch's own SDPA runs on CPUs). The backward adds each
group's dK and dV into its keys in group order: deterministic. Picking the groups reads the plan's
tile map on the host (free on CPUs).

Per-head plans (``build_plan_topk``, ``per_head_plan``) choose different key tiles in every head, so
query tiles share no key set: there every (sequence, head, query tile) row of the plan's CSR is its
own problem, its key tiles gathered, and a batch of rows with equal tile counts runs in one fused
call (``_RowBatches``; VSA's layout of the same computation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from vidtok._numerics import accumulation_dtype
from vidtok.reference.sparse import PlanTensors, key_bytes

# The cost model that picks the query groups (``_TileMasks.groups``), measured through the fused
# CPU kernel on CI's 2-thread AMD EPYC CPU (bench/NOTES.md, sparse attention, "query groups"):
# ~110 GFLOP/s in fp32 (a little faster with more query rows per problem), ~30 GB/s gathering k
# and v rows into a reused buffer, ~30 us per call. Only the ratios matter.
_FLOPS, _GATHER_BYTES, _CALL_SECONDS = 110e9, 30e9, 30e-6
_MAX_GROUP_TILES = 12  # 768 query rows at 64-token tiles, where the fused kernel's largest query split starts
# Scores of one group (rows * keys * heads) at most, unless one query tile alone holds more: bounds
# the group's bias buffer (1 / H of them) and the kernel's working set.
_GROUP_SCORES = 1 << 24


def _rows_speed(rows: int) -> float:
    """The fused CPU kernel's throughput at ``rows`` query rows relative to 64, as measured
    (bench/NOTES.md); it splits the queries in blocks of 32, 64 or 256 rows at fewer than 192, fewer
    than 768 and more (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp)."""
    return 1.0 if rows <= 64 else 1.1 if rows <= 128 else 1.2 if rows < 768 else 1.3


@dataclass
class _Group:
    """Query tiles [i0, i1) of sequence b (query tokens [r0, r1), cut at N) and the keys they attend
    to, either a range of key tiles (cols, keys: slices; keys cut at N) or compacted: the runs of 8
    keys (one byte of the bit words) in which some query of the group attends to some key (cols:
    their tiles, ascending; key_bytes: the runs' positions among those tiles' BK / 8 * len(cols)
    bytes; keys: their tokens, ascending, cut at N; index tensors). Compacting whole bytes keeps the
    bias one table look-up per byte."""

    b: int
    i0: int
    i1: int
    r0: int
    r1: int
    cols: slice | torch.Tensor
    keys: slice | torch.Tensor
    key_bytes: torch.Tensor | None
    num_keys: int

    def key_rows(self, x: torch.Tensor, scratch: "_Scratch", name: str) -> torch.Tensor:
        """[1, H, L, C]: the group's keys of x [B, H, N, C]: a view for a range, else gathered into
        ``scratch``'s buffer ``name`` (overwritten by the next group)."""
        if isinstance(self.keys, slice):
            return x[self.b : self.b + 1, :, self.keys]
        H, _, C = x.shape[1:]
        return torch.index_select(x[self.b], 1, self.keys, out=scratch.get(name, (H, self.num_keys, C), x.dtype))[None]

    def query_rows(self, x: torch.Tensor) -> torch.Tensor:
        """[1, H, M, C]: the group's queries of x [B, H, N, C], a view."""
        return x[self.b : self.b + 1, :, self.r0 : self.r1]


class _Scratch:
    """Buffers reused from group to group: on CPUs a fresh multi-MB tensor page-faults as it is first
    written, which cost more than the copy into it (bench/NOTES.md, sparse attention)."""

    def __init__(self, device: torch.device):
        self.device, self.buffers = device, {}

    def get(self, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """A contiguous [shape] tensor, the front of buffer ``name`` (grown when too small)."""
        numel = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
            buffer = self.buffers[name] = torch.empty(numel, dtype=dtype, device=self.device)
        return buffer[:numel].view(shape)


class _TileMasks:
    """The plan's query tiles in groups (``groups``) and each group's token masks as an additive
    score bias (``bias``: 0 where the pair attends, -inf where not), built from the bit words by one
    table look-up per byte (8 keys). Keys past N never enter a group, whatever the bits (plans from
    build_plan set none there)."""

    def __init__(self, tile_map: torch.Tensor, bits: torch.Tensor, block_q: int, block_k: int, n: int, dtype: torch.dtype):
        self.tile_map, self.block_q, self.block_k, self.n = tile_map, block_q, block_k, n
        tail = n - (tile_map.shape[2] - 1) * block_k  # keys of the last key tile that exist
        device = bits.device
        byte_words = key_bytes(bits)[..., : block_k // 8]  # [S, BQ, BK / 8] (BK >= 16, a power of two)
        self.bytes = byte_words.int()  # indices into byte_bias
        byte_bits = torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device) & 1
        self.byte_bias = byte_bits.to(dtype).reciprocal_().neg_().add_(1)  # 1 - 1/x: 0 for a set bit, -inf if not
        used = byte_words
        while used.shape[1] > 1:  # OR over the (power-of-two many) query rows
            used = used[:, 0::2] | used[:, 1::2]
        self.key_used = used[:, 0]  # [S, BK / 8]: bit c % 8 of byte c // 8 says some query attends to key c
        self.tail_bytes = np.array([(1 << min(8, max(0, tail - 8 * j))) - 1 for j in range(block_k // 8)], dtype=np.uint8)

    def groups(self, H: int, C: int) -> list[_Group]:
        """Consecutive query tiles of a sequence in groups, each one attention problem against one
        key set, the cheapest by the cost model above (greedy, cost per query tile). Larger groups
        run faster per pair in the kernel; each group's keys are either a range of key tiles (a
        view of k and v, but with the pairs no query of the range attends to computed and masked)
        or exactly the keys some query of the group attends to (the fewest pairs, but a copy of k
        and v). Query tiles without any key are left out (their output is 0). Reads the tile map
        on the host."""
        BQ, BK, n = self.block_q, self.block_k, self.n
        B, nQ, nK = self.tile_map.shape
        used = self.key_used.cpu().numpy()[self.tile_map.long().cpu().numpy()]  # [B, nQ, nK, BK / 8]
        used[:, :, -1] &= self.tail_bytes
        nonempty = used.any(-1)  # tiles with a pair that attends (partial tiles may have none)
        tiles, keys, stats = nonempty, used, []  # stats[g - 1]: keys used, first and last key tile of tiles i .. i + g - 1
        for g in range(1, min(_MAX_GROUP_TILES, nQ) + 1):
            if g > 1:
                tiles, keys = tiles[:, :-1] | nonempty[:, g - 1 :], keys[:, :-1] | used[:, g - 1 :]
            stats.append(((8 * (keys != 0).sum((-1, -2))).tolist(), tiles.argmax(-1).tolist(), (nK - 1 - tiles[..., ::-1].argmax(-1)).tolist()))
        pair_seconds = 4 * H * C / _FLOPS  # one query-key pair, all heads
        gather_seconds = H * C * 8 / _GATHER_BYTES  # k and v of one key, fp32
        groups = []
        for b in range(B):
            i = 0
            while i < nQ:
                if not nonempty[b, i].any():
                    i += 1
                    continue
                best = None
                for g in range(1, min(len(stats), nQ - i) + 1):
                    count, first, last = (s[b][i] for s in stats[g - 1])
                    span = min((last + 1) * BK, n) - first * BK
                    if g > 1 and g * BQ * span * H > _GROUP_SCORES:
                        break
                    rows = min((i + g) * BQ, n) - i * BQ
                    view_cost = rows * span * pair_seconds / _rows_speed(rows)
                    copy_cost = rows * count * pair_seconds / _rows_speed(rows) + count * gather_seconds
                    cost = (min(view_cost, copy_cost) + _CALL_SECONDS) / g
                    if best is None or cost < best[0]:
                        best = (cost, g, first, last, copy_cost < view_cost)
                _, g, first, last, compact = best
                groups.append(self._group(b, i, i + g, first, last, keys=used[b, i : i + g] if compact else None))
                i += g
        return groups

    def _group(self, b: int, i0: int, i1: int, first: int, last: int, keys: np.ndarray | None) -> _Group:
        """The group of query tiles [i0, i1): key tiles [first, last] as a range, or, with ``keys``
        (their used-key bytes [g, nK, BK / 8]), just the keys that some query of theirs uses."""
        BQ, BK, n, device = self.block_q, self.block_k, self.n, self.tile_map.device
        r0, r1 = i0 * BQ, min(i1 * BQ, n)
        if keys is None:
            key_range = slice(first * BK, min((last + 1) * BK, n))
            return _Group(b, i0, i1, r0, r1, slice(first, last + 1), key_range, None, key_range.stop - key_range.start)
        used_bytes = np.bitwise_or.reduce(keys, axis=0) != 0  # [nK, BK / 8]
        cols = used_bytes.any(-1).nonzero()[0]
        run_bytes = used_bytes[cols].reshape(-1).nonzero()[0]  # positions among the tiles' bytes
        tokens = ((cols.repeat(BK // 8) * BK + np.tile(np.arange(0, BK, 8), len(cols)))[run_bytes, None] + np.arange(8)).reshape(-1)
        tokens = tokens[tokens < n]  # ascending: only the last run can pass N, and its bias columns go last
        as_tensor = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
        return _Group(b, i0, i1, r0, r1, as_tensor(cols), as_tensor(tokens), as_tensor(run_bytes), len(tokens))

    def bias(self, grp: _Group, scratch: "_Scratch", log_size: torch.Tensor | None = None):
        """(bias [1, 1, M, L] or None, empty rows [M] or None) of the group's M queries and L keys, in
        ``scratch``'s buffers (overwritten by the next group); ``log_size`` [L] (the group's keys') is
        added to every allowed pair. Empty rows are those whose bias is all -inf (a log size of -inf
        removes a key). No bias and no empty row when every tile pair is full and there is no log
        size: full tiles have no padding and no empty row."""
        state = self.tile_map[grp.b, grp.i0 : grp.i1][:, grp.cols]  # [g, T]
        M = grp.r1 - grp.r0
        if log_size is None and grp.key_bytes is None and bool((state == 1).all()):
            return None, None
        state = state.long()
        words = self.bytes[state].permute(0, 2, 1, 3).flatten(2)  # [g, BQ, T * BK / 8]
        if grp.key_bytes is not None:
            words = words.index_select(2, grp.key_bytes)
        words = words.flatten()  # each byte's 8 biases, in key order
        bias = torch.index_select(self.byte_bias, 0, words, out=scratch.get("bias", (words.numel(), 8), self.byte_bias.dtype))
        bias = bias.view(state.shape[0] * self.block_q, -1)[:M, : grp.num_keys]
        if log_size is not None:
            bias += log_size
        return bias[None, None], bias.amax(-1) == float("-inf")  # amax: ~20x faster than isneginf().all()


# Gathered keys and values of one batch of per-head rows, at most (elements of k and v together).
_ROW_BATCH_ELEMENTS = 1 << 23


@dataclass
class _RowBatch:
    """Rows of a per-head plan (sequence b and plan head h as head_row = b * H + h, query tile i)
    that attend to the same number of key tiles: ``cols`` [R, c] and their bits indices ``states``."""

    head_rows: torch.Tensor
    tile: torch.Tensor
    cols: torch.Tensor
    states: torch.Tensor


class _RowBatches:
    """The rows of a per-head plan, each one attention problem (its query tile against its own key
    tiles, gathered), in batches of rows with equal tile counts (so no padding: a batch of full
    tiles needs no bias) whose gathered keys stay within ``_ROW_BATCH_ELEMENTS``. Rows without a
    tile are left out (output 0, LSE -inf). Reads the CSR's row lengths on the host."""

    def __init__(self, tiles: PlanTensors, block_q: int, block_k: int, dtype: torch.dtype, channels: int):
        B, Hp, nQ, nK = tiles.tile_map.shape
        self.nQ, self.nK, self.block_q, self.block_k = nQ, nK, block_q, block_k
        counts = (tiles.row_ptr[1:] - tiles.row_ptr[:-1]).long()
        self.batches = []
        for c in torch.unique(counts).tolist():
            if c == 0:
                continue
            rows = (counts == c).nonzero()[:, 0]
            pos = tiles.row_ptr[:-1].long()[rows, None] + torch.arange(c, device=rows.device)
            cols, states = tiles.col_idx[pos].long(), tiles.entry_bits[pos].long()
            step = max(1, _ROW_BATCH_ELEMENTS // (2 * c * block_k * channels))
            for r0 in range(0, rows.shape[0], step):
                r = rows[r0 : r0 + step]
                self.batches.append(_RowBatch(r // nQ, r % nQ, cols[r0 : r0 + step], states[r0 : r0 + step]))
        self.bytes = key_bytes(tiles.bits)[..., : block_k // 8].int()  # [S, BQ, BK / 8]
        byte_bits = torch.arange(256, device=counts.device)[:, None] >> torch.arange(8, device=counts.device) & 1
        self.byte_bias = byte_bits.to(dtype).reciprocal_().neg_().add_(1)  # 0 for a set bit, -inf if not

    def padded(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """x [B, H, N, C] as [B * H, tiles, block, C], zero rows added only when N is not a multiple of block."""
        B, H, N, C = x.shape
        tiles = -(-N // block)
        if tiles * block != N:
            x = torch.nn.functional.pad(x, (0, 0, 0, tiles * block - N))
        return x.reshape(B * H, tiles, block, C)

    def queries(self, x: torch.Tensor, batch: _RowBatch) -> torch.Tensor:
        """[R, 1, BQ, C]: the batch's query tiles, from x = padded(q, BQ)."""
        return x[batch.head_rows, batch.tile][:, None]

    def keys(self, x: torch.Tensor, batch: _RowBatch) -> torch.Tensor:
        """[R, 1, c * BK, C]: the batch's key tiles, from x = padded(k, BK)."""
        g = x[batch.head_rows[:, None], batch.cols]  # [R, c, BK, C]
        return g.view(g.shape[0], 1, -1, g.shape[-1])

    def key_index(self, batch: _RowBatch) -> torch.Tensor:
        """[R, c * BK]: each gathered key's row in padded(k, BK).view(-1, C)."""
        tile = batch.head_rows[:, None] * self.nK + batch.cols
        return (tile[..., None] * self.block_k + torch.arange(self.block_k, device=tile.device)).flatten(1)

    def bias(self, batch: _RowBatch, log_size: torch.Tensor | None):
        """(bias [R, 1, BQ, c * BK] or None, empty query rows [R, 1, BQ] or None): the token masks of
        partial tiles, plus ``log_size`` [R, c * BK] (the gathered keys') on every allowed pair. No
        bias for a batch of full tiles without log sizes (full tiles have no padding, no empty row)."""
        if log_size is None and bool((batch.states == 1).all()):
            return None, None
        words = self.bytes[batch.states].permute(0, 2, 1, 3).flatten()  # [R, BQ, c, BK / 8] in key order
        bias = self.byte_bias.index_select(0, words).view(batch.states.shape[0], self.block_q, -1)
        if log_size is not None:
            bias = bias + log_size[:, None, :]
        empty = bias.amax(-1) == float("-inf")
        return bias[:, None], (empty[:, None] if bool(empty.any()) else None)


def _attend(q, k, v, bias, scale):
    """(softmax(scale q k^T + bias) v, its natural-log LSE) for q [R, H, M, D], k, v [R, H, L, D],
    bias [R, 1, M, L] or None, in ATen's fused CPU flash-attention kernel. Rows whose bias is all
    -inf are fixed up by the caller (the kernel's LSE there is not -inf)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=scale)


def _attend_backward(grad_out, q, k, v, out, lse, bias, scale):
    """(dq, dk, dv) of ``_attend`` from its output and a finite LSE, in ATen's fused CPU backward."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, q, k, v, out, lse, 0.0, False, attn_mask=bias, scale=scale
    )


def _add_rows(dst: torch.Tensor, keys: slice | torch.Tensor, src: torch.Tensor) -> None:
    """dst[keys] += src for a range or distinct indices: each row gets one add, so even index_add_'s
    atomics on GPUs add in a fixed order (deterministic)."""
    if isinstance(keys, slice):
        dst[keys] += src
    else:
        dst.index_add_(0, keys, src)


def _expand_heads(x: torch.Tensor, H: int) -> torch.Tensor:
    """GQA: key/value head j serves query heads j * (H / Hk) ... (j + 1) * (H / Hk) - 1."""
    return x if x.shape[1] == H else x.repeat_interleave(H // x.shape[1], dim=1)


def _prepared(x: torch.Tensor, dtype: torch.dtype, H: int | None = None, extra: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, H, N, C] in dtype with a contiguous last dimension (the fused kernel's layout; a no-op
    for contiguous inputs of that dtype), GQA heads expanded to H, and with ``extra`` (broadcastable
    to [B, H, N]) one more channel holding it."""
    x = x.to(dtype) if H is None else _expand_heads(x.to(dtype), H)
    if extra is not None:
        x = torch.cat((x, extra.to(dtype).expand(*x.shape[:3])[..., None]), -1)
    return x if x.stride(-1) == 1 else x.contiguous()


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

    Groups of consecutive query tiles (``_TileMasks.groups``) each attend to one key set, the token
    mask and the log sizes as the bias: one attention problem per group.
    """
    B, H, N, D = q.shape
    dtype, acc = q.dtype, accumulation_dtype(q.dtype)
    out = torch.zeros(B, H, N, D, dtype=acc, device=q.device)
    lse = torch.full((B, H, N), float("-inf"), dtype=acc, device=q.device)
    if q.numel() and v.numel() and tiles.tile_map.shape[1] > 1:
        return _per_head_forward(q, k, v, kv_log_size, tiles, block_q, block_k, scale)
    if q.numel() and v.numel():
        q, k, v = _prepared(q, acc), _prepared(k, acc, H), _prepared(v, acc, H)
        ls = None if kv_log_size is None else kv_log_size.to(acc)
        masks = _TileMasks(tiles.tile_map[:, 0], tiles.bits, block_q, block_k, N, acc)
        scratch = _Scratch(q.device)
        for grp in masks.groups(H, D):
            bias, empty = masks.bias(grp, scratch, None if ls is None else ls[grp.b, grp.keys])
            o, m = _attend(grp.query_rows(q), grp.key_rows(k, scratch, "k"), grp.key_rows(v, scratch, "v"), bias, scale)
            if empty is not None:  # rows with no allowed key: output 0, LSE -inf
                o = o.masked_fill(empty[:, None], 0.0)
                m = m.masked_fill(empty, float("-inf"))
            out[grp.b, :, grp.r0 : grp.r1] = o[0]
            lse[grp.b, :, grp.r0 : grp.r1] = m[0]
    return out.to(dtype), lse


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
    """Gradients (dq, dk, dv, d kv_log_size) of ``sparse_attention`` from the saved out and LSE.

    With P recomputed from the LSE: dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O) + dLSE),
    dQ = scale dS K, dK = scale dS^T Q, d kv_log_size[key] = sum over heads and queries of dS. One
    walk over query groups (the forward's cost model, for this pass's head channels): each group's
    dQ is final, its dK and dV are added into its keys in group order. The log sizes and dLSE ride
    in one extra head channel, so every group is a plain attention backward: S = scale q' k'^T with q' = [q, 1/scale]
    and k' = [k, log size] (the last column of dK' = scale dS^T q' is then the column sums of dS,
    d kv_log_size); v' = [v, 0] leaves P V and dP as they are; out' = [out, -dLSE] with
    dO' = [dO, 1] turns rowsum(dO' * out') into rowsum(dO * O) - dLSE. Without log sizes and dLSE
    there is no extra channel (it costs ~8 % in the fused CPU backward). GQA gradients are summed
    over the query heads sharing a key/value head. Returned in the inputs' dtypes (d kv_log_size in
    fp32/fp64).
    """
    B, H, N, D = q.shape
    Hk = k.shape[1]
    acc = accumulation_dtype(q.dtype)
    extended = kv_log_size is not None or grad_lse is not None
    E = D + extended  # head channels, with the extra one
    dq = torch.zeros(B, H, N, E, dtype=acc, device=q.device)
    dk = torch.zeros(B, N, H, E, dtype=acc, device=q.device)  # token-major: a group adds whole keys
    dv = torch.zeros(B, N, H, E, dtype=acc, device=q.device)
    if q.numel() and v.numel():
        zero, one = q.new_zeros((), dtype=acc), q.new_ones((), dtype=acc)

        def channel(x):  # the extra channel's values, or no channel
            return x if extended else None

        ls = zero if kv_log_size is None else kv_log_size[:, None, :]
        qe, oe = _prepared(q, acc, extra=channel(one / scale)), _prepared(out, acc, extra=channel(zero if grad_lse is None else -grad_lse))
        ke, ve = _prepared(k, acc, H, extra=channel(ls)), _prepared(v, acc, H, extra=channel(zero))
        ge = _prepared(grad_out, acc, extra=channel(one))
        lse = lse.to(acc)
        lse = torch.where(torch.isinf(lse), 0.0, lse)  # no allowed key: P = 0 anyway
        if tiles.tile_map.shape[1] > 1:
            return _per_head_backward(ge, qe, ke, ve, oe, lse, kv_log_size, k, v, tiles, block_q, block_k, scale)
        masks = _TileMasks(tiles.tile_map[:, 0], tiles.bits, block_q, block_k, N, acc)
        scratch = _Scratch(q.device)
        for grp in masks.groups(H, E):
            bias, _ = masks.bias(grp, scratch)
            dqg, dkg, dvg = _attend_backward(
                grp.query_rows(ge), grp.query_rows(qe), grp.key_rows(ke, scratch, "k"), grp.key_rows(ve, scratch, "v"),
                grp.query_rows(oe), lse[grp.b : grp.b + 1, :, grp.r0 : grp.r1], bias, scale,
            )
            dq[grp.b, :, grp.r0 : grp.r1] = dqg[0]
            _add_rows(dk[grp.b], grp.keys, dkg[0].transpose(0, 1))
            _add_rows(dv[grp.b], grp.keys, dvg[0].transpose(0, 1))
    dls = None if kv_log_size is None else dk[..., D].sum(-1)
    dq, dk, dv = dq[..., :D], dk[..., :D].transpose(1, 2), dv[..., :D].transpose(1, 2)
    if Hk != H:
        dk = dk.reshape(B, Hk, H // Hk, N, D).sum(2)
        dv = dv.reshape(B, Hk, H // Hk, N, D).sum(2)
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous(), dls


def _per_head_forward(q, k, v, kv_log_size, tiles, block_q, block_k, scale):
    """``sparse_attention`` for a per-head plan: the row batches of ``_RowBatches``, one fused call each."""
    B, H, N, D = q.shape
    dtype, acc = q.dtype, accumulation_dtype(q.dtype)
    rows = _RowBatches(tiles, block_q, block_k, acc, D)
    nQ = rows.nQ
    qp = rows.padded(_prepared(q, acc), block_q)
    kp, vp = (rows.padded(_prepared(x, acc, H), block_k) for x in (k, v))
    lsp = None if kv_log_size is None else torch.nn.functional.pad(kv_log_size.to(acc), (0, rows.nK * block_k - N))
    out = torch.zeros(B * H, nQ, block_q, D, dtype=acc, device=q.device)
    lse = torch.full((B * H, nQ, block_q), float("-inf"), dtype=acc, device=q.device)
    for batch in rows.batches:
        ls = None
        if lsp is not None:  # the log sizes of the gathered keys: sequence b = head_row // H
            ls = lsp[batch.head_rows[:, None] // H, rows.key_index(batch) % lsp.shape[1]]
        bias, empty = rows.bias(batch, ls)
        o, m = _attend(rows.queries(qp, batch), rows.keys(kp, batch), rows.keys(vp, batch), bias, scale)
        if empty is not None:  # query rows with no allowed key: output 0, LSE -inf
            o = o.masked_fill(empty[..., None], 0.0)
            m = m.masked_fill(empty, float("-inf"))
        out[batch.head_rows, batch.tile] = o[:, 0]
        lse[batch.head_rows, batch.tile] = m[:, 0]
    out = out.view(B, H, nQ * block_q, D)[:, :, :N]
    return out.to(dtype).contiguous(), lse.view(B, H, -1)[:, :, :N].contiguous()


def _per_head_backward(ge, qe, ke, ve, oe, lse, kv_log_size, k, v, tiles, block_q, block_k, scale):
    """``sparse_attention_backward`` for a per-head plan, on the extended channels the shared path
    prepares (log sizes and dLSE in one extra channel): one fused backward per row batch; dQ is
    final per row, dK and dV are added into their keys (index_add_ in row order: deterministic)."""
    B, H, N, E = qe.shape
    D, Hk = k.shape[-1], k.shape[1]
    rows = _RowBatches(tiles, block_q, block_k, qe.dtype, E)
    nQ = rows.nQ
    qp, gp, op = (rows.padded(x, block_q) for x in (qe, ge, oe))
    kp, vp = (rows.padded(x, block_k) for x in (ke, ve))
    lp = rows.padded(lse[..., None], block_q)[..., 0]  # [B * H, nQ, BQ]
    dq = torch.zeros_like(qp)
    dk = torch.zeros(kp.numel() // E, E, dtype=kp.dtype, device=kp.device)
    dv = torch.zeros_like(dk)
    for batch in rows.batches:
        bias, _ = rows.bias(batch, None)  # the log sizes ride in the extra channel
        dqg, dkg, dvg = _attend_backward(
            rows.queries(gp, batch), rows.queries(qp, batch), rows.keys(kp, batch), rows.keys(vp, batch),
            rows.queries(op, batch), lp[batch.head_rows, batch.tile][:, None], bias, scale,
        )
        dq[batch.head_rows, batch.tile] = dqg[:, 0]
        index = rows.key_index(batch).flatten()
        dk.index_add_(0, index, dkg[:, 0].reshape(-1, E))
        dv.index_add_(0, index, dvg[:, 0].reshape(-1, E))
    dq = dq.view(B, H, -1, E)[:, :, :N]
    dk, dv = (x.view(B, H, -1, E)[:, :, :N] for x in (dk, dv))
    dls = None if kv_log_size is None else dk[..., D].sum(1)
    dq, dk, dv = dq[..., :D], dk[..., :D], dv[..., :D]
    if Hk != H:
        dk = dk.reshape(B, Hk, H // Hk, N, D).sum(2)
        dv = dv.reshape(B, Hk, H // Hk, N, D).sum(2)
    return dq.to(k.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous(), dls

"""Sparse attention for video: token layouts, mask plans built from tile bounds, block-sparse attention.

- ``VideoLayout``: the (t, h, w) position of every token of every sequence on the (T, h, w) token grid
  (global register tokens first), so masks can be stated in video terms whatever pruning or merging
  did to the token count; built from a grid, a keep mask, a ``Packed`` or a ``Merged``.
- ``build_plan(layout, spec, block=(BQ, BK))``: classifies every (query tile, key tile) pair as empty,
  full or partial from the tiles' coordinate bounds (vidtok.masks) -- the token predicate is evaluated
  only inside partial tiles, never on all N^2 pairs -- and stores the non-empty tiles in CSR form, with
  its transpose, and the token masks of the partial tiles as bits.
- ``sparse_attention(q, k, v, plan)``: attention on the plan's tiles only -- Triton forward and
  backward kernels on GPUs, the tuned cpu backend on CPUs, the readable reference anywhere -- with
  ToMe's proportional attention as ``kv_log_size``.

Patterns: FlexAttention's BlockMask (full + partial block lists, mask_mod inside partial blocks),
NATTEN's neighborhood windows, ToMe's proportional attention.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from vidtok import _backend
from vidtok import masks as _masks
from vidtok._numerics import REFERENCE_DTYPES, accumulation_dtype, kept_rank
from vidtok._validation import check_int, check_no_nan, check_same_device, check_tensor
from vidtok.reference.sparse import PlanTensors, dense_mask

__all__ = ["SparsePlan", "VideoLayout", "attention_received", "build_plan", "sparse_attention"]

_KIND_PAD, _KIND_VIDEO, _KIND_GLOBAL = 0, 1, 2


# ---------------------------------------------------------------------------------------------------
# VideoLayout


@dataclass(frozen=True, eq=False)
class VideoLayout:
    """Where every token of a batch of token sequences sits in its video.

    Sequence b holds ``lengths[b]`` tokens at positions 0 .. lengths[b] - 1 of an [N]-token axis:
    first ``num_global`` global (register) tokens, then the video tokens in (t, h, w) row-major order;
    positions past ``lengths[b]`` are padding, which attends to nothing and is attended by nothing.

    Attributes:
        coords: int32 [B, N, 3], the (t, h, w) of each video token (-1 for global and padding tokens).
        kind: int8 [B, N], 0 padding, 1 video token, 2 global token.
        lengths: int32 [B], valid tokens per sequence.
        grid: (T, h, w), the token grid the coordinates lie on (the neighborhood windows' extents).
        num_global: global tokens at the start of every sequence.
        kv_log_size: float32 [B, N] or None. For merged tokens (``from_merge``): log of how many
            original tokens each one stands for (0 for global tokens and padding), the bias ToMe's
            proportional attention adds to each key: pass it as ``sparse_attention(...,
            kv_log_size=layout.kv_log_size)``.
    """

    coords: torch.Tensor
    kind: torch.Tensor
    lengths: torch.Tensor
    grid: tuple
    num_global: int
    kv_log_size: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.coords.shape[0]

    @property
    def num_tokens(self) -> int:
        """N, the token axis of q, k and v (the longest sequence)."""
        return self.coords.shape[1]

    @property
    def device(self) -> torch.device:
        return self.coords.device

    def to(self, device) -> VideoLayout:
        """The same layout with its tensors on ``device`` (``self`` if they are there already)."""
        device = torch.device(device)
        if device == self.device:
            return self
        return self._map(lambda x: x.to(device))

    def expand(self, batch: int) -> VideoLayout:
        """A layout of one sequence repeated ``batch`` times (the same video in every row of a batch)."""
        check_int("batch", batch, low=1)
        if self.batch != 1:
            raise ValueError(f"only a layout of one sequence can be expanded, this one holds {self.batch}")
        return self._map(lambda x: x.expand(batch, *x.shape[1:]).contiguous())

    def _map(self, fn) -> VideoLayout:
        """The layout with ``fn`` applied to each of its tensors."""
        tensors = {name: getattr(self, name) for name in ("coords", "kind", "lengths", "kv_log_size")}
        return dataclasses.replace(self, **{name: None if t is None else fn(t) for name, t in tensors.items()})

    def token_coords(self) -> _masks.Coords:
        """int64 Coords [B, N] (t, h, w, is_global) of every token."""
        c = self.coords.long()
        return _masks.Coords(c[..., 0], c[..., 1], c[..., 2], self.kind == _KIND_GLOBAL)

    @staticmethod
    def from_grid(T: int, h: int, w: int, *, num_global: int = 0, batch: int = 1, device="cpu") -> VideoLayout:
        """Every token of a T x h x w token grid, after ``num_global`` global tokens, for ``batch``
        videos: N = num_global + T * h * w."""
        for name, value in (("T", T), ("h", h), ("w", w), ("batch", batch)):
            check_int(name, value, low=1)
        check_int("num_global", num_global, low=0)
        grid = _grid_coords((T, h, w), device)
        coords = torch.cat([torch.full((num_global, 3), -1, device=device), grid]).to(torch.int32)
        kind = torch.cat([torch.full((num_global,), _KIND_GLOBAL), torch.full((T * h * w,), _KIND_VIDEO)]).to(device, torch.int8)
        n = num_global + T * h * w
        return VideoLayout(
            coords.expand(batch, n, 3).contiguous(),
            kind.expand(batch, n).contiguous(),
            torch.full((batch,), n, dtype=torch.int32, device=device),
            (T, h, w),
            num_global,
        )

    @staticmethod
    def from_keep(keep: torch.Tensor, *, num_global: int = 0) -> VideoLayout:
        """The tokens a motion gate or pruner kept: keep bool [B, T, h, w].

        Sequence b holds its ``num_global`` global tokens and then its kept tokens in (t, h, w) order
        (ranked by ``vidtok._numerics.kept_rank``, the rule ``pack`` uses), so frames keep varying
        numbers of tokens; N = num_global + the largest kept count, shorter sequences are padded. The
        host reads that count (one sync; a layout is built once per clip).
        """
        check_tensor("keep", keep, rank=4, layout="[B, T, h, w]", dtypes=(torch.bool,))
        check_int("num_global", num_global, low=0)
        if keep.shape[0] == 0:
            raise ValueError(f"keep must hold at least one video, got shape {tuple(keep.shape)}")
        B = keep.shape[0]
        rank = kept_rank(keep.reshape(B, -1))[0]
        positions = torch.arange(rank.shape[1], device=keep.device).expand(B, -1)
        return VideoLayout._from_ranked(rank, positions, tuple(keep.shape[1:]), num_global)

    @staticmethod
    def from_packed(packed, *, grid: tuple[int, int, int] | None = None, num_global: int = 0) -> VideoLayout:
        """The tokens of a ``vidtok.pack`` result, lined up with ``packed.padded()``: sequence b holds
        ``num_global`` global tokens (which the caller puts in front of the padded tensor) and then
        clip b's packed rows in order. ``grid``: (T, h, w) of the packed positions, default
        ``packed.shape[1:]`` when the tokens were packed as ``[B, T, h, w, D]``. Reads the largest kept
        count on the host (one sync)."""
        from vidtok.motion import Packed

        if not isinstance(packed, Packed):
            raise TypeError(f"packed must be a vidtok.Packed (from vidtok.pack), got {type(packed).__name__}")
        grid = _check_grid(packed.shape[1:] if grid is None and len(packed.shape) == 4 else grid,
                           "packed holds flat [B, N] tokens: pass grid=(T, h, w) of its N positions")
        B, N = packed.shape[0], math.prod(packed.shape[1:])
        if math.prod(grid) != N:
            raise ValueError(f"grid (T, h, w) = {grid} holds {math.prod(grid)} positions, but packed covers {N}")
        check_int("num_global", num_global, low=0)
        if B == 0:
            raise ValueError("packed must hold at least one clip")
        rows = torch.arange(packed.index.shape[0], device=packed.index.device)
        clip = torch.searchsorted(packed.cu_seqlens[1:].long(), rows, right=True)
        valid = packed.index >= 0
        # the (clip, position) of every packed row, scattered back to a [B, N] rank table
        rank = torch.full((B * N + 1,), -1, dtype=torch.long, device=rows.device)
        slot = torch.where(valid, clip * N + packed.index.long(), B * N)
        rank = rank.scatter(0, slot, rows - packed.cu_seqlens[clip.clamp_max(B - 1)].long())[: B * N].view(B, N)
        positions = torch.arange(N, device=rows.device).expand(B, -1)
        return VideoLayout._from_ranked(rank, positions, grid, num_global)

    @staticmethod
    def _from_ranked(rank: torch.Tensor, positions: torch.Tensor, grid: tuple, num_global: int) -> VideoLayout:
        """The layout whose sequence b holds, after ``num_global`` global tokens, the token at flat grid
        position ``positions[b, j]`` in column num_global + rank[b, j] (rank -1: not in the layout)."""
        B = rank.shape[0]
        device = rank.device
        counts = (rank >= 0).sum(1)
        n = num_global + int(counts.max())  # the padded length: one host sync
        dest = torch.where(rank >= 0, num_global + rank, n)  # dropped tokens go to a scratch column n
        coords = torch.full((B, n + 1, 3), -1, dtype=torch.int64, device=device)
        coords.scatter_(1, dest[..., None].expand(-1, -1, 3), _grid_coords(grid, device)[positions])
        kind = torch.zeros(B, n + 1, dtype=torch.int8, device=device)
        kind.scatter_(1, dest, torch.full_like(dest, _KIND_VIDEO, dtype=torch.int8))
        kind[:, :num_global] = _KIND_GLOBAL
        return VideoLayout(
            coords[:, :n].to(torch.int32).contiguous(),
            kind[:, :n].contiguous(),
            (counts + num_global).to(torch.int32),
            tuple(int(v) for v in grid),
            num_global,
        )

    @staticmethod
    def from_merge(merged, grid: tuple[int, int, int] | None = None, *, num_global: int = 0) -> VideoLayout:
        """The tokens of a merge (``vidtok.temporal_merge`` or ``vidtok.bipartite_merge``), in output order.

        Output token i of video b sits at the (t, h, w) of its representative, ``merged.origin[b, i]``
        (the earliest token of its chain for temporal_merge), after ``num_global`` global tokens, so
        the layout lines up with ``merged.x`` (global tokens prepended). ``kv_log_size`` holds
        log(merged.size) for ToMe's proportional attention (Bolya et al. 2023, Sec. 3).

        grid: (T, h, w) of the merged positions, T * h * w = merged.index.shape[1]; default
        ``merged.grid`` (set by temporal_merge; bipartite_merge of a flattened video needs it).
        Padding outputs (origin -1, temporal_merge with a threshold) must come last in each row, as
        vidtok's merges produce them. Validating that reads one flag on the host (one sync; a layout
        is built once per clip).
        """
        from vidtok.merge import Merged

        if not isinstance(merged, Merged):
            raise TypeError(f"merged must be a vidtok.Merged (from temporal_merge or bipartite_merge), got {type(merged).__name__}")
        T, h, w = _check_grid(merged.grid if grid is None else grid,
                              "merged carries no grid (bipartite_merge): pass grid=(T, h, w) of its N positions")
        check_int("num_global", num_global, low=0)
        origin = merged.origin
        B, L = origin.shape
        if merged.index.shape[1] != T * h * w:
            raise ValueError(
                f"grid (T, h, w) = {(T, h, w)} holds {T * h * w} positions, but merged.index covers {merged.index.shape[1]}"
            )
        if B == 0:
            raise ValueError(f"merged must hold at least one video, got origin of shape {tuple(origin.shape)}")
        valid = origin >= 0
        lengths = valid.sum(1)
        if not bool((valid == (torch.arange(L, device=origin.device) < lengths[:, None])).all()):
            raise ValueError("merged.origin has padding (-1) before valid outputs; padding must come last in each row")
        coords = _grid_coords((T, h, w), origin.device)[origin.long().clamp_min(0)].masked_fill(~valid[..., None], -1)
        kind = torch.where(valid, _KIND_VIDEO, _KIND_PAD).to(torch.int8)
        log_size = torch.where(valid, merged.size.float().clamp_min(torch.finfo(torch.float32).tiny).log(), 0.0)
        if num_global:
            coords = torch.cat([torch.full((B, num_global, 3), -1, dtype=coords.dtype, device=coords.device), coords], 1)
            kind = torch.cat([torch.full((B, num_global), _KIND_GLOBAL, dtype=torch.int8, device=kind.device), kind], 1)
            log_size = torch.cat([log_size.new_zeros(B, num_global), log_size], 1)
        return VideoLayout(
            coords.to(torch.int32).contiguous(),
            kind.contiguous(),
            (lengths + num_global).to(torch.int32),
            (T, h, w),
            num_global,
            log_size.contiguous(),
        )


def _grid_coords(grid: tuple, device) -> torch.Tensor:
    """int64 [T * h * w, 3]: the (t, h, w) of every flat position of the token grid, row-major."""
    axes = (torch.arange(int(n), device=device) for n in grid)
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


def _check_grid(grid, missing: str) -> tuple[int, int, int]:
    if grid is None:
        raise ValueError(missing)
    if not (isinstance(grid, (tuple, list, torch.Size)) and len(grid) == 3):
        raise TypeError(f"grid must be (T, h, w), got {grid!r}")
    for name, value in zip(("T", "h", "w"), grid):
        check_int(f"grid {name}", value, low=1)
    return tuple(int(v) for v in grid)


# ---------------------------------------------------------------------------------------------------
# SparsePlan


@dataclass(frozen=True, eq=False)
class SparsePlan:
    """Which (query tile, key tile) pairs of a layout attend, and how.

    Tiles are ``block = (BQ, BK)`` consecutive tokens of one sequence; nQ = ceil(N / BQ), nK = ceil(N / BK).

    Attributes (int32 tensors on the layout's device):
        tile_map [B, nQ, nK]: 0 empty, 1 full (every pair of the tiles attends, no padding inside),
            s >= 2 partial with token mask ``bits[s]``.
        bits [2 + U, BQ, ceil(BK / 32)]: token masks; bit c % 32 of word [s, r, c // 32] says whether
            query r attends to key c; bits[0] is all zeros, bits[1] all ones. U <= num_partial:
            partial tile pairs of one geometry share their mask (see ``build_plan``).
        row_ptr [B * nQ + 1], col_idx [nnz], entry_bits [nnz]: CSR of the non-empty tile pairs, row
            b * nQ + i lists the key tiles of query tile i of sequence b (ascending) and their bits index.
        col_ptr [B * nK + 1], row_idx [nnz], entry_bits_t [nnz]: the transposed CSR (query tiles of
            each key tile), for backward passes that own key tiles.
        lengths [B]: valid tokens per sequence.
        num_full, num_partial: tile pairs of each kind; allowed_pairs: token pairs that attend.
    """

    layout: VideoLayout
    spec: _masks.MaskSpec
    block: tuple
    tile_map: torch.Tensor
    bits: torch.Tensor
    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    entry_bits: torch.Tensor
    col_ptr: torch.Tensor
    row_idx: torch.Tensor
    entry_bits_t: torch.Tensor
    lengths: torch.Tensor
    num_full: int
    num_partial: int
    allowed_pairs: int

    @property
    def batch(self) -> int:
        return self.tile_map.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.layout.num_tokens

    @property
    def density(self) -> float:
        """Allowed token pairs / all pairs of valid tokens (sum over sequences of lengths^2)."""
        total = int((self.lengths.long() ** 2).sum())
        return self.allowed_pairs / total if total else 0.0

    @property
    def tensors(self) -> PlanTensors:
        """The plan's tensors by name, as the backends take them."""
        return PlanTensors(self.tile_map, self.bits, self.row_ptr, self.col_idx, self.entry_bits, self.col_ptr,
                           self.row_idx, self.entry_bits_t)

    @property
    def tile_density(self) -> float:
        """Computed tile pairs / all tile pairs."""
        return (self.num_full + self.num_partial) / max(1, self.tile_map.numel())

    def to_dense(self) -> torch.Tensor:
        """bool [B, N, N]: True where query token i attends to key token j. Materialises N^2 (tests,
        small inputs)."""
        BQ, BK = self.block
        return dense_mask(self.tile_map, self.bits, BQ, BK, self.num_tokens)

    def to_sdpa_mask(self) -> torch.Tensor:
        """bool [B, 1, N, N] for ``F.scaled_dot_product_attention(attn_mask=...)`` (True = attend).
        SDPA returns NaN for rows with no allowed key, where sparse_attention returns 0."""
        return self.to_dense()[:, None]

    def to_flex_block_mask(self):
        """A FlexAttention ``BlockMask`` of the same tiles: the full tiles as full blocks, the partial
        ones as partial blocks, and a real ``mask_mod`` that reads the plan's token bits (eager
        FlexAttention ignores the block lists and uses only mask_mod). BLOCK_SIZE = the plan's block."""
        from torch.nn.attention.flex_attention import BlockMask

        BQ, BK = self.block
        tile_map, bits = self.tile_map, self.bits
        B, nQ, nK = tile_map.shape
        N = self.num_tokens

        def kv_blocks(sel):
            count = sel.sum(-1).to(torch.int32)
            # indices of the selected key tiles first (stable sort of "not selected"), the rest unused
            order = torch.sort((~sel).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
            return count[:, None], order[:, None]

        partial_num, partial_idx = kv_blocks(tile_map >= 2)
        full_num, full_idx = kv_blocks(tile_map == 1)

        def mask_mod(b, h, q_idx, kv_idx):
            state = tile_map[b, q_idx // BQ, kv_idx // BK]
            key = kv_idx % BK  # the key's place in its tile: bit key % 32 of word key // 32
            word = bits[state, q_idx % BQ, key // 32]
            return ((word >> (key % 32)) & 1) == 1

        return BlockMask.from_kv_blocks(
            partial_num, partial_idx, full_num, full_idx, BLOCK_SIZE=(BQ, BK), mask_mod=mask_mod, seq_lengths=(N, N)
        )

    def __repr__(self):
        return (
            f"SparsePlan(B={self.batch}, N={self.num_tokens}, block={self.block}, spec={self.spec!r}, "
            f"full={self.num_full}, partial={self.num_partial}, density={self.density:.4f}, "
            f"tile_density={self.tile_density:.4f})"
        )


def _tile_bounds(coords: torch.Tensor, kind: torch.Tensor):
    """Bounds [B, n_tiles] of the video tokens of each tile (from ``_padded_tile_coords``), and the
    valid-token count per tile. Reduced in int32 (half the bytes of int64), then widened: tiles
    without video tokens get lo = _FAR, hi = -_FAR, as the specs expect."""
    video = kind == _KIND_VIDEO
    big = torch.iinfo(torch.int32).max
    has_video = video.any(2)
    lo = coords.masked_fill(~video[..., None], big).amin(2).long()
    hi = coords.masked_fill(~video[..., None], -big).amax(2).long()
    lo = torch.where(has_video[..., None], lo, _masks._FAR)
    hi = torch.where(has_video[..., None], hi, -_masks._FAR)
    bounds = _masks.Bounds(
        tuple(lo[..., d] for d in range(3)),
        tuple(hi[..., d] for d in range(3)),
        has_video,
        (kind == _KIND_GLOBAL).any(2),
    )
    return bounds, (kind != _KIND_PAD).sum(2)


def _index_bounds(bounds: _masks.Bounds, index) -> _masks.Bounds:
    return _masks.Bounds(
        tuple(x[index] for x in bounds.lo), tuple(x[index] for x in bounds.hi), bounds.has_video[index], bounds.has_global[index]
    )


def _padded_tile_coords(layout: VideoLayout, block: int):
    """int32 coords and kind per tile, [B, n_tiles, block] (padding past N is kind 0, coords -1)."""
    B, N = layout.batch, layout.num_tokens
    n_tiles = -(-N // block)
    pad = n_tiles * block - N
    c = torch.nn.functional.pad(layout.coords.to(torch.int32), (0, 0, 0, pad), value=-1).view(B, n_tiles, block, 3)
    kind = torch.nn.functional.pad(layout.kind, (0, pad), value=_KIND_PAD).view(B, n_tiles, block)
    return c, kind


def _words_to_int32(words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 words [P, BQ, W] with values in [0, 2**32) (``masks.TilePairs``) -> (the same bits as
    int32, the number of set bits of each tile pair [P]). The count is a SWAR popcount: 2-, 4- then
    8-bit partial sums, and the product by 0x01010101 adds the four byte counts into the top byte."""
    x = words - ((words >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    count = ((((x * 0x01010101) & 0xFFFFFFFF) >> 24)).sum((1, 2))
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32), count


def _row_ids(rows: torch.Tensor) -> torch.Tensor:
    """int64 [R]: equal ids exactly for equal rows of the int64 matrix ``rows`` [R, C], in 0 .. R - 1.
    Column by column, (id so far, column value) pairs are renumbered with a 1-D unique: exact (no
    hashing) and much faster than ``torch.unique(dim=0)``, which compares rows one at a time on CPU."""
    ids = rows.new_zeros(rows.shape[0])
    for column in rows.unbind(1):
        column = column - column.min()
        ids = torch.unique(ids * (int(column.max()) + 1) + column, return_inverse=True)[1]
    return ids


def _tile_classes(coords: torch.Tensor, kind: torch.Tensor, bounds: _masks.Bounds, invariant) -> tuple[torch.Tensor, torch.Tensor]:
    """(class [B, n], shift int64 [B, n, 3]) of the tiles of ``_padded_tile_coords``: shift is each
    tile's lowest video coordinate on the shift-invariant dims (0 elsewhere), and two tiles share a
    class when their tokens are equal once their video tokens are moved by -shift."""
    lo = torch.stack(bounds.lo, -1)  # [B, n, 3]
    keep = torch.tensor(invariant, device=lo.device) & bounds.has_video[..., None]
    shift = torch.where(keep, lo, torch.zeros_like(lo))
    video = (kind == _KIND_VIDEO)[..., None]
    moved = torch.where(video, coords.long() - shift[:, :, None, :], coords.long())
    content = torch.cat([moved.flatten(2), kind.long()], 2).flatten(0, 1)
    return _row_ids(content).view(kind.shape[:2]), shift


def _partial_geometries(where, invariant, qc, qkind, qb, kc, kkind, kb, same_tiles: bool):
    """(geometry [P], first [U]) for the partial tile pairs ``where`` [P, 3] (b, i, j): pairs of one
    geometry (equal query-tile class, key-tile class and key-minus-query shift) have one token mask,
    because moving both tiles by a shift on the spec's invariant dims never changes it; first[u] is
    the row of ``where`` whose mask stands for geometry u."""
    P = where.shape[0]
    if P == 0:
        return where.new_zeros(0), where.new_zeros(0)
    q_class, q_shift = _tile_classes(qc, qkind, qb, invariant)
    k_class, k_shift = (q_class, q_shift) if same_tiles else _tile_classes(kc, kkind, kb, invariant)
    b, i, j = where.unbind(1)
    key = torch.cat([q_class[b, i, None], k_class[b, j, None], k_shift[b, j] - q_shift[b, i]], 1)
    geometry = _row_ids(key)
    U = int(geometry.max()) + 1
    first = torch.full((U,), P, dtype=torch.int64, device=where.device).scatter_reduce(
        0, geometry, torch.arange(P, device=where.device), "amin"
    )
    return geometry, first


# Token pairs of the partial tiles evaluated at once (bounds the [P, BQ, BK / 32] word temporaries and
# the [P, BQ, BK] masks of specs without their own pred_words).
_PARTIAL_CHUNK_PAIRS = 1 << 22


def build_plan(layout: VideoLayout, spec: _masks.MaskSpec, *, block: tuple[int, int] = (64, 64)) -> SparsePlan:
    """The SparsePlan of ``spec`` on ``layout`` with (BQ, BK) = ``block`` tiles.

    Every (query tile, key tile) pair of a sequence is classified empty / full / partial by
    ``spec.classify`` on the tiles' coordinate bounds: O(N + B * nQ * nK), no token pair evaluated.
    Only the partial tiles' token masks are then evaluated, with ``spec.pred_words`` (BQ * BK pairs
    each), and only once per geometry: along the dims where the spec is shift-invariant
    (``spec.shift_invariant()``; windows of constant offsets), tile pairs whose tiles hold the same
    tokens up to a shift, at the same offset from each other, share one mask.
    A full tile has every pair of its tokens allowed and no padding. BQ and BK are powers of two
    >= 16 (the tile sizes the Triton kernel accepts; 64 and 128 are the fast ones on GPUs).

    Building reads the number of non-empty and partial tiles on the host (the CSR sizes): a plan is
    built once per (layout, spec) and reused by every layer and step that shares them.
    """
    if not isinstance(layout, VideoLayout):
        raise TypeError(f"layout must be a vidtok.VideoLayout, got {type(layout).__name__}")
    if not isinstance(spec, _masks.MaskSpec):
        raise TypeError(f"spec must be a vidtok.masks spec (frame_local(), neighborhood(...), ...), got {type(spec).__name__}")
    if not (isinstance(block, (tuple, list)) and len(block) == 2):
        raise TypeError(f"block must be a pair (BQ, BK) of ints, got {block!r}")
    for name, value in zip(("BQ", "BK"), block):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"block {name} must be an int, got {type(value).__name__}")
        if value < 16 or value & (value - 1):
            raise ValueError(f"block {name} must be a power of two >= 16 (16, 32, 64, 128, ...), got {value}")
    BQ, BK = block
    spec.validate(layout.grid)
    grid = layout.grid
    B = layout.batch
    dev = layout.device

    qc, qkind = _padded_tile_coords(layout, BQ)
    qb, q_valid = _tile_bounds(qc, qkind)
    if BK == BQ:
        kc, kkind, kb, k_valid = qc, qkind, qb, q_valid
    else:
        kc, kkind = _padded_tile_coords(layout, BK)
        kb, k_valid = _tile_bounds(kc, kkind)
    nQ, nK = q_valid.shape[1], k_valid.shape[1]
    q_side = _index_bounds(qb, (slice(None), slice(None), None))
    k_side = _index_bounds(kb, (slice(None), None, slice(None)))
    any_, all_ = spec.classify(q_side, k_side, grid)
    nonempty = any_ & (q_valid > 0)[:, :, None] & (k_valid > 0)[:, None, :]
    # everything after the classification works on the non-empty tiles only (O(nnz), not nQ * nK)
    entries = nonempty.nonzero()  # [nnz, 3] (b, i, j) row-major: CSR order; host sync for its size (docstring)
    eb, ei, ej = entries.unbind(1)
    is_full = torch.as_tensor(all_, device=dev).expand(B, nQ, nK)[eb, ei, ej] & (q_valid[eb, ei] == BQ) & (k_valid[eb, ej] == BK)

    # token masks of the partial tiles: one evaluation per geometry (shift-invariant specs repeat the
    # same few tile pairs all over a video), a chunk of geometries at a time
    where = entries[~is_full]  # [P, 3] (b, i, j), row-major
    P = where.shape[0]
    geometry, first = _partial_geometries(where, spec.shift_invariant(), qc, qkind, qb, kc, kkind, kb, BQ == BK)
    chunks, counts = [], []
    step = max(1, _PARTIAL_CHUNK_PAIRS // (BQ * BK))
    for p0 in range(0, first.shape[0], step):
        b, i, j = where[first[p0 : p0 + step]].unbind(1)
        qt, kt = qc[b, i].long(), kc[b, j].long()  # [p, BQ, 3], [p, BK, 3]: specs compute in int64
        qk, kk = qkind[b, i], kkind[b, j]
        tiles = _masks.TilePairs(
            _masks.Coords(qt[..., 0], qt[..., 1], qt[..., 2], qk == _KIND_GLOBAL),
            _masks.Coords(kt[..., 0], kt[..., 1], kt[..., 2], kk == _KIND_GLOBAL),
        )
        # padding (only in tiles at sequence ends) attends to nothing and is attended by nothing
        words = spec.pred_words(tiles, grid) & tiles.key_bits(kk != _KIND_PAD)
        words, count = _words_to_int32(words * (qk != _KIND_PAD)[..., None])
        chunks.append(words)
        counts.append(count)
    allowed_partial = int(torch.cat(counts)[geometry].sum()) if P else 0
    W = -(-BK // 32)
    bits = torch.cat(
        [torch.zeros(1, BQ, W, dtype=torch.int32, device=dev), torch.full((1, BQ, W), -1, dtype=torch.int32, device=dev), *chunks]
    )
    state = is_full.to(torch.int32)  # 1 full, else the bits index 2 + geometry of the partial tile
    state[~is_full] = (2 + geometry).to(torch.int32)
    tile_map = torch.zeros(B, nQ, nK, dtype=torch.int32, device=dev)
    tile_map[eb, ei, ej] = state

    row_ptr = torch.zeros(B * nQ + 1, dtype=torch.int32, device=dev)
    row_ptr[1:] = torch.bincount(eb * nQ + ei, minlength=B * nQ).cumsum(0)
    # the transposed CSR: the same entries stably sorted by (b, j), so i stays ascending in each column
    key_t = eb * nK + ej
    by_col = torch.sort(key_t, stable=True).indices
    col_ptr = torch.zeros(B * nK + 1, dtype=torch.int32, device=dev)
    col_ptr[1:] = torch.bincount(key_t, minlength=B * nK).cumsum(0)
    num_full = int(is_full.sum())
    return SparsePlan(
        layout=layout,
        spec=spec,
        block=(BQ, BK),
        tile_map=tile_map,
        bits=bits,
        row_ptr=row_ptr,
        col_idx=entries[:, 2].to(torch.int32).contiguous(),
        entry_bits=state,
        col_ptr=col_ptr,
        row_idx=ei[by_col].to(torch.int32),
        entry_bits_t=state[by_col],
        lengths=layout.lengths,
        num_full=num_full,
        num_partial=P,
        allowed_pairs=num_full * BQ * BK + allowed_partial,
    )


# ---------------------------------------------------------------------------------------------------
# sparse_attention


@torch.library.custom_op("vidtok::sparse_attention", mutates_args=())
def _sparse_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_log_size: torch.Tensor | None,
    plan_tensors: list[torch.Tensor],
    block_q: int,
    block_k: int,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    attend = _backend.implementation("sparse_attention", backend)
    return attend(q, k, v, kv_log_size, PlanTensors(*plan_tensors), block_q, block_k, scale)


@_sparse_attention_op.register_fake
def _(q, k, v, kv_log_size, plan_tensors, block_q, block_k, scale, backend):
    B, H, N, _ = q.shape
    out = q.new_empty((B, H, N, v.shape[-1]))
    return out, q.new_empty((B, H, N), dtype=accumulation_dtype(q.dtype))


@torch.library.custom_op("vidtok::sparse_attention_backward", mutates_args=())
def _sparse_attention_backward_op(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_log_size: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    plan_tensors: list[torch.Tensor],
    block_q: int,
    block_k: int,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    backward = _backend.implementation("sparse_attention", backend, "sparse_attention_backward")
    dq, dk, dv, dls = backward(grad_out, grad_lse, q, k, v, kv_log_size, out, lse, PlanTensors(*plan_tensors), block_q, block_k, scale)
    if dls is None:  # a custom op returns tensors: an empty one stands for "no log sizes"
        dls = q.new_empty((0,), dtype=accumulation_dtype(q.dtype))
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dls


@_sparse_attention_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, kv_log_size, out, lse, plan_tensors, block_q, block_k, scale, backend):
    dls_shape = (0,) if kv_log_size is None else kv_log_size.shape
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
        q.new_empty(dls_shape, dtype=accumulation_dtype(q.dtype)),
    )


def _sparse_attention_setup(ctx, inputs, output):
    q, k, v, kv_log_size, plan_tensors, block_q, block_k, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, kv_log_size, out, lse, *plan_tensors)
    ctx.args = (block_q, block_k, scale, backend)
    ctx.has_log_size = kv_log_size is not None
    # an unused LSE gets grad None, not zeros: the backward then skips its dLSE term
    ctx.set_materialize_grads(False)


def _sparse_attention_grad(ctx, grad_out, grad_lse):
    q, k, v, kv_log_size, out, lse, *plan_tensors = ctx.saved_tensors
    if grad_out is None:  # only the LSE was used
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dls = _sparse_attention_backward_op(
        grad_out, grad_lse, q, k, v, kv_log_size, out, lse, plan_tensors, *ctx.args
    )
    dls = dls.to(kv_log_size.dtype) if ctx.has_log_size else None
    return dq, dk, dv, dls, [None] * len(plan_tensors), None, None, None, None


_sparse_attention_op.register_autograd(_sparse_attention_grad, setup_context=_sparse_attention_setup)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: SparsePlan,
    *,
    scale: float | None = None,
    kv_log_size: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str | None = None,
):
    """Attention restricted to the token pairs of ``plan``.

    Args:
        q: [B, H, N, D]; k, v: [B, Hk, N, D] with H % Hk == 0 (GQA: query head h reads key/value head
            h // (H / Hk)); B and N those of the plan's layout. float32, float16 or bfloat16 (float64
            on the reference and cpu backends, for gradcheck), one dtype, any strides.
        plan: from ``build_plan``.
        scale: logit scale, default D ** -0.5.
        kv_log_size: optional float [B, N] added to every logit of key j (ToMe's proportional
            attention, Bolya et al. 2023: a key of size s behaves as s copies of itself when this is
            log s; -inf removes a key). Differentiable.
        return_lse: also return the natural-log LSE [B, H, N] (fp32; -inf for rows with no key).
        backend: "reference", "triton", "cpu" or "auto".

    Returns:
        out [B, H, N, D] in q's dtype, softmax over the allowed keys of each query (fp32
        accumulation); rows with no allowed key (padding, or a mask that leaves a token alone) give 0.
        With ``return_lse``, (out, lse). NaN in q, k, v or kv_log_size propagates, as in any
        attention: to the rows that read it.

    Backends: "triton" runs FlashAttention-2-style kernels over the plan's CSR tiles only: the
    forward (online softmax in exp2, fp32 accumulation, full tiles unmasked, partial tiles masked by
    the plan's token bits), and a backward that recomputes P from the saved LSE in separate dQ
    programs (forward CSR) and dK/dV programs (transposed CSR). "cpu" (auto on CPU tensors)
    computes the same tiles in PyTorch, a group of consecutive query tiles at a time against one
    key set (a range of key tiles, read as a view, or the runs of keys the group's queries attend
    to, gathered), as a small cost model picks, each group in ATen's fused CPU flash-attention
    kernels (the ones torch's own SDPA uses there); its backward is one walk over the groups adding
    dK, dV into their keys in a fixed order. "reference" is the readable spec: every query row
    against every key with the mask as a -inf bias, a band of rows at a time (N^2 work; the tests'
    oracle, and the path for float32 on GPUs). Deterministic (no float atomics in the Triton
    kernels; the cpu backend adds to each key once per group); no host sync in the Triton and
    reference paths (the cpu backend reads the plan's tile map on the host to pick its groups).
    """
    if not isinstance(plan, SparsePlan):
        raise TypeError(f"plan must be a vidtok.SparsePlan from vidtok.build_plan, got {type(plan).__name__}")
    for name, t, layout in (("q", q, "[B, H, N, D]"), ("k", k, "[B, Hk, N, D]"), ("v", v, "[B, Hk, N, D]")):
        check_tensor(name, t, rank=4, layout=layout, dtypes=REFERENCE_DTYPES)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    B, H, N, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, Hk, N, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[2] != N or k.shape[3] != D:
        raise ValueError(f"k and v must be [B, Hk, N, D] = [{B}, Hk, {N}, {D}] to fit q {tuple(q.shape)}, got {tuple(k.shape)}")
    Hk = k.shape[1]
    if Hk == 0 or H % Hk:
        raise ValueError(f"q's head count H = {H} must be a multiple of k/v's head count Hk = {Hk}")
    if (B, N) != (plan.batch, plan.num_tokens):
        raise ValueError(
            f"q is [B, H, N, D] = {tuple(q.shape)} but the plan was built for a layout of B = {plan.batch} "
            f"sequences of N = {plan.num_tokens} tokens"
        )
    if kv_log_size is not None:
        check_tensor("kv_log_size", kv_log_size, rank=2, layout="[B, N]", dtypes=REFERENCE_DTYPES)
        if tuple(kv_log_size.shape) != (B, N):
            raise ValueError(f"kv_log_size must be [B, N] = [{B}, {N}], got {tuple(kv_log_size.shape)}")
        kv_log_size = kv_log_size.to(accumulation_dtype(q.dtype))
    check_same_device(q=q, k=k, v=v, kv_log_size=kv_log_size, plan=plan.tile_map)
    if D == 0:
        raise ValueError(f"q, k and v must have a head dimension D >= 1, got q of shape {tuple(q.shape)}")
    if scale is None:
        scale = D**-0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float, got {scale!r}")

    BQ, BK = plan.block
    args = (q, k, v, kv_log_size, plan.tensors, BQ, BK, float(scale))
    chosen = _backend.choose("sparse_attention", q.device, q.dtype, backend, args)
    out, lse = _sparse_attention_op(q, k, v, kv_log_size, list(plan.tensors), BQ, BK, float(scale), chosen)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------------
# attention_received

RECEIVED_REDUCTIONS = ("sum", "cls", "last")


@torch.library.custom_op("vidtok::attention_received", mutates_args=())
def _attention_received_op(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor | None,
    kv_log_size: torch.Tensor | None,
    plan_tensors: list[torch.Tensor],
    block_q: int,
    block_k: int,
    scale: float,
    row_start: int,
    row_end: int,
    backend: str,
) -> torch.Tensor:
    received = _backend.implementation("attention_received", backend)
    tiles = PlanTensors(*plan_tensors) if plan_tensors else None
    return received(q, k, lse, kv_log_size, tiles, block_q, block_k, scale, row_start, row_end)


@_attention_received_op.register_fake
def _(q, k, lse, kv_log_size, plan_tensors, block_q, block_k, scale, row_start, row_end, backend):
    B, H, _, _ = q.shape
    return q.new_empty((B, H, k.shape[2]), dtype=accumulation_dtype(q.dtype))


def attention_received(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor | None = None,
    *,
    reduce: str = "sum",
    plan: SparsePlan | None = None,
    scale: float | None = None,
    kv_log_size: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """The attention mass each key receives, without the ``[M, N]`` attention matrix.

    For softmax attention P = softmax(scale q k^T + kv_log_size) (per head, over each query's allowed
    keys), ``received[b, j]`` = the mean over query heads of the sum over the chosen query rows i of
    P[b, h, i, j]. This is the importance signal of FastV (Chen et al. 2024: attention the visual
    tokens receive), VisionZip (Yang et al. 2025: [CLS] attention), HoliTom's dominant tokens and
    FlashVID's [CLS]-calibrated diversity; the paper code takes it from a materialised attention
    matrix, which flash and sparse kernels never form.

    Args:
        q: ``[B, H, M, D]`` queries; k: ``[B, Hk, N, D]`` keys with H % Hk == 0 (GQA). float32,
            float16 or bfloat16 (float64 on the reference backend), one dtype, any strides.
        lse: ``[B, H, M]`` natural-log log-sum-exp of every query row, as
            ``sparse_attention(..., return_lse=True)`` returns it: reusing the forward's value makes
            this one pass over the keys. None computes it first (a second pass). It must come from the
            same attention (q, k, scale, kv_log_size, plan); a row with lse = -inf (no allowed key)
            gives nothing.
        reduce: which query rows count: "sum" all M, "cls" row 0 (the class token), "last" row M - 1
            (FastV's last instruction token).
        plan: a ``SparsePlan`` (from ``build_plan``): only its allowed pairs count, as in
            ``sparse_attention`` (then M = N = the plan's token count).
        scale: logit scale, default D ** -0.5.
        kv_log_size: float ``[B, N]`` added to every logit of key j (ToMe's proportional attention).
        backend: "reference", "triton" or "auto". Triton: one program per (key tile, sequence, head)
            walks the query tiles (with a plan: the plan's transposed CSR, partial tiles masked by
            its token bits), recomputes P from the LSE and sums it, in a fixed order (no atomics);
            float16/bfloat16 on GPUs (float32 there runs on the reference).

    Returns:
        float32 (float64 for float64 q) ``[B, N]``. With reduce="sum" every query row with an allowed
        key adds 1 in all (the rows of P sum to 1), so the result sums to (rows with keys) per video.
        Not differentiable (a decision signal, like ToMe's matching). NaN in q, k, lse or kv_log_size
        is a ValueError; inside ``vidtok.allow_nan()`` a query row whose attention holds a NaN adds
        nothing. No host sync.
    """
    for name, t, layout in (("q", q, "[B, H, M, D]"), ("k", k, "[B, Hk, N, D]")):
        check_tensor(name, t, rank=4, layout=layout, dtypes=REFERENCE_DTYPES)
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must have one dtype, got {q.dtype} and {k.dtype}")
    B, H, M, D = q.shape
    Hk, N = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k must be [B, Hk, N, D] = [{B}, Hk, N, {D}] to fit q {tuple(q.shape)}, got {tuple(k.shape)}")
    if Hk == 0 or H % Hk:
        raise ValueError(f"q's head count H = {H} must be a multiple of k's head count Hk = {Hk}")
    if D == 0:
        raise ValueError(f"q and k must have a head dimension D >= 1, got q of shape {tuple(q.shape)}")
    if reduce not in RECEIVED_REDUCTIONS:
        raise ValueError(f"reduce must be one of {RECEIVED_REDUCTIONS}, got {reduce!r}")
    if plan is not None:
        if not isinstance(plan, SparsePlan):
            raise TypeError(f"plan must be a vidtok.SparsePlan from vidtok.build_plan, got {type(plan).__name__}")
        if (B, M, N) != (plan.batch, plan.num_tokens, plan.num_tokens):
            raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must be [B, H, N, D] with the plan's B = "
                             f"{plan.batch} sequences of N = {plan.num_tokens} tokens")
        block_q, block_k = plan.block
        plan_tensors = list(plan.tensors)
    else:
        block_q, block_k, plan_tensors = 64, 64, []
    if lse is not None:
        check_tensor("lse", lse, rank=3, layout="[B, H, M]", dtypes=REFERENCE_DTYPES)
        if tuple(lse.shape) != (B, H, M):
            raise ValueError(f"lse must be [B, H, M] = [{B}, {H}, {M}] (one value per query row), got {tuple(lse.shape)}")
        lse = lse.to(accumulation_dtype(q.dtype))
    if kv_log_size is not None:
        check_tensor("kv_log_size", kv_log_size, rank=2, layout="[B, N]", dtypes=REFERENCE_DTYPES)
        if tuple(kv_log_size.shape) != (B, N):
            raise ValueError(f"kv_log_size must be [B, N] = [{B}, {N}], got {tuple(kv_log_size.shape)}")
        kv_log_size = kv_log_size.to(accumulation_dtype(q.dtype))
    check_same_device(q=q, k=k, lse=lse, kv_log_size=kv_log_size, plan=None if plan is None else plan.tile_map)
    if scale is None:
        scale = D**-0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float, got {scale!r}")
    for name, t in (("q", q), ("k", k), ("lse", lse), ("kv_log_size", kv_log_size)):
        check_no_nan("attention_received", name, t)
    row_start, row_end = {"sum": (0, M), "cls": (0, min(M, 1)), "last": (max(M - 1, 0), M)}[reduce]
    tiles = PlanTensors(*plan_tensors) if plan_tensors else None
    args = (q, k, lse, kv_log_size, tiles, block_q, block_k, float(scale), row_start, row_end)
    chosen = _backend.choose("attention_received", q.device, q.dtype, backend, args)
    lse = None if lse is None else lse.detach()
    kv_log_size = None if kv_log_size is None else kv_log_size.detach()
    received = _attention_received_op(q.detach(), k.detach(), lse, kv_log_size, plan_tensors, block_q, block_k,
                                      float(scale), row_start, row_end, chosen)
    return received.mean(1)

"""Sparse attention for video: token layouts, mask plans built from tile bounds or from the data,
block-sparse attention.

- ``VideoLayout``: the (t, h, w) position of every token of every sequence on the (T, h, w) token grid
  (global register or text tokens anywhere), so masks can be stated in video terms whatever pruning or
  merging did to the token count; built from a grid (optionally ordered in 3-D cubes, with
  ``permute`` / ``unpermute`` between the model's order and the layout's), a keep mask, a ``Packed``
  or a ``Merged``.
- ``build_plan(layout, spec, block=(BQ, BK))``: classifies every (query tile, key tile) pair as empty,
  full or partial from the tiles' coordinate bounds (vidtok.masks) -- the token predicate is evaluated
  only inside partial tiles, never on all N^2 pairs -- and stores the non-empty tiles in CSR form, with
  its transpose, and the token masks of the partial tiles as bits. One plan serves every head.
- Per-head plans chosen from the data, on the device without host syncs: ``build_plan_topk`` (the
  key tiles of highest pooled attention per query tile and head, VSA / SVG2), ``classify_heads`` +
  ``per_head_plan`` (Sparse VideoGen's spatial and temporal heads), ``plan_from_tiles`` (any tile
  selection).
- ``sparse_attention(q, k, v, plan)``: attention on the plan's tiles only -- Triton forward and
  backward kernels on GPUs, the tuned cpu backend on CPUs, the readable reference anywhere -- with
  ToMe's proportional attention as ``kv_log_size``.

Patterns: FlexAttention's BlockMask (full + partial block lists, mask_mod inside partial blocks),
NATTEN's neighborhood windows and token permutation, ToMe's proportional attention, Video Sparse
Attention's coarse top-k stage, Sparse VideoGen's head profiling.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from vidtok import _backend
from vidtok import masks as _masks
from vidtok._numerics import REFERENCE_DTYPES, accumulation_dtype, kept_rank
from vidtok._validation import check_int, check_no_nan, check_same_device, check_tensor
from vidtok.reference.sparse import PlanTensors, dense_mask

__all__ = ["SparsePlan", "TileValidity", "VideoLayout", "attention_received", "build_plan", "build_plan_topk", "classify_heads",
           "default_head_specs", "per_head_plan", "plan_from_tiles", "sparse_attention"]

_KIND_PAD, _KIND_VIDEO, _KIND_GLOBAL = 0, 1, 2


# ---------------------------------------------------------------------------------------------------
# VideoLayout


@dataclass(frozen=True, eq=False)
class VideoLayout:
    """Where every token of a batch of token sequences sits in its video.

    Sequence b lies on an [N]-token axis (the axis of q, k and v): each position holds a video token,
    a global token (a register, a text token) or padding, which attends to nothing and is attended
    by nothing. ``from_keep``, ``from_packed`` and ``from_merge`` put ``num_global`` global tokens
    first, then the video tokens in (t, h, w) row-major order, then padding; ``from_grid`` can put the
    global tokens anywhere (``global_at``) and order the video tokens cube by cube (``cube``).

    A layout may order the tokens differently from the model that produces them (its *source* order):
    ``order`` maps each layout position to its source token, and ``permute`` / ``unpermute`` move a
    tensor between the two orders. Layouts built in the source order have ``order`` None.

    Attributes:
        coords: int32 [B, N, 3], the (t, h, w) of each video token (-1 for global and padding tokens).
        kind: int8 [B, N], 0 padding, 1 video token, 2 global token.
        lengths: int32 [B], valid (video and global) tokens per sequence.
        grid: (T, h, w), the token grid the coordinates lie on (the neighborhood windows' extents).
        num_global: global tokens per sequence.
        kv_log_size: float32 [B, N] or None. For merged tokens (``from_merge``): log of how many
            original tokens each one stands for (0 for global tokens and padding), the bias ToMe's
            proportional attention adds to each key: pass it as ``sparse_attention(...,
            kv_log_size=layout.kv_log_size)``.
        order: int64 [N] or None: the source index of the token at each layout position (-1 for
            padding), the same for every sequence; None when the layout is in source order.
        inverse: int64 [S] or None: the layout position of each of the S source tokens.
        cube: (ct, ch, cw) when the video tokens are ordered cube by cube (``from_grid(cube=...)``).
    """

    coords: torch.Tensor
    kind: torch.Tensor
    lengths: torch.Tensor
    grid: tuple
    num_global: int
    kv_log_size: torch.Tensor | None = None
    order: torch.Tensor | None = None
    inverse: torch.Tensor | None = None
    cube: tuple | None = None

    @property
    def batch(self) -> int:
        return self.coords.shape[0]

    @property
    def num_tokens(self) -> int:
        """N, the token axis of q, k and v (the longest sequence, padding included)."""
        return self.coords.shape[1]

    @property
    def num_source_tokens(self) -> int:
        """S, the tokens of the source order (``permute``'s input length); N when there is no order."""
        return self.num_tokens if self.inverse is None else self.inverse.shape[0]

    @property
    def device(self) -> torch.device:
        return self.coords.device

    def to(self, device) -> VideoLayout:
        """The same layout with its tensors on ``device`` (``self`` if they are there already)."""
        device = torch.device(device)
        if device == self.device:
            return self
        return self._map(lambda x: x.to(device), ("order", "inverse"))

    def expand(self, batch: int) -> VideoLayout:
        """A layout of one sequence repeated ``batch`` times (the same video in every row of a batch)."""
        check_int("batch", batch, low=1)
        if self.batch != 1:
            raise ValueError(f"only a layout of one sequence can be expanded, this one holds {self.batch}")
        return self._map(lambda x: x.expand(batch, *x.shape[1:]).contiguous())

    def _map(self, fn, also: tuple = ()) -> VideoLayout:
        """The layout with ``fn`` applied to each of its per-sequence tensors (and to those in ``also``)."""
        names = ("coords", "kind", "lengths", "kv_log_size") + also
        tensors = {name: getattr(self, name) for name in names}
        return dataclasses.replace(self, **{name: None if t is None else fn(t) for name, t in tensors.items()})

    def token_coords(self) -> _masks.Coords:
        """int64 Coords [B, N] (t, h, w, is_global) of every token."""
        c = self.coords.long()
        return _masks.Coords(c[..., 0], c[..., 1], c[..., 2], self.kind == _KIND_GLOBAL)

    def permute(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """x with its ``dim`` axis (the S source tokens) in the layout's order (N positions, padding
        0): ``x.index_select(dim, order)``, differentiable; x itself when the layout has no order."""
        dim = self._token_dim(x, dim, self.num_source_tokens, "permute", "S source tokens")
        if self.order is None:
            return x
        order = self.order.to(x.device)
        shape = [1] * x.dim()
        shape[dim] = order.shape[0]
        return torch.where((order >= 0).view(shape), x.index_select(dim, order.clamp_min(0)), 0)

    def unpermute(self, y: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """y with its ``dim`` axis (the layout's N positions) back in the source order (S tokens,
        padding dropped): ``y.index_select(dim, inverse)``; y itself when the layout has no order."""
        dim = self._token_dim(y, dim, self.num_tokens, "unpermute", "N layout positions")
        if self.inverse is None:
            return y
        return y.index_select(dim, self.inverse.to(y.device))

    @staticmethod
    def _token_dim(x, dim, size, what, name) -> int:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{what} takes a tensor, got {type(x).__name__}")
        if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
            raise ValueError(f"{what}: dim must be an int in [{-x.dim()}, {x.dim()}) for a tensor of shape {tuple(x.shape)}, got {dim!r}")
        dim %= x.dim()
        if x.shape[dim] != size:
            raise ValueError(f"{what}: dim {dim} of a tensor of shape {tuple(x.shape)} must hold the layout's {size} {name}")
        return dim

    @staticmethod
    def from_grid(T: int, h: int, w: int, *, num_global: int = 0, global_at: int = 0, cube: tuple[int, int, int] | None = None,
                  batch: int = 1, device="cpu") -> VideoLayout:
        """Every token of a T x h x w token grid and ``num_global`` global tokens, for ``batch`` videos.

        Source order: the T * h * w video tokens in (t, h, w) row-major order, with the global tokens
        (registers, or a diffusion transformer's text tokens) inserted before video token
        ``global_at`` (0: first, as CogVideoX's joint attention; T * h * w: last, as HunyuanVideo's).

        Without ``cube`` the layout is in source order (N = num_global + T * h * w). With ``cube`` =
        (ct, ch, cw) the layout orders the video tokens cube by cube (VSA, Sliding Tile Attention,
        NATTEN's token permutation): cubes in (t, h, w) row-major order of their corners, the tokens of
        a cube in (t, h, w) order, and every cube padded to ct * ch * cw positions, so that with plan
        tiles of that many tokens every tile holds exactly one cube (cubes that do not divide the grid
        add padding positions: choose one that does). The global tokens come first when
        ``global_at`` is 0 (padded to a multiple of the cube volume, so the cubes stay aligned to the
        tiles), else last. ``permute`` / ``unpermute`` move q, k, v and outputs between the orders.
        """
        for name, value in (("T", T), ("h", h), ("w", w), ("batch", batch)):
            check_int(name, value, low=1)
        check_int("num_global", num_global, low=0)
        n_video = T * h * w
        check_int("global_at", global_at, low=0)
        if global_at > n_video:
            raise ValueError(f"global_at must be in [0, T * h * w = {n_video}], got {global_at}")
        video = _grid_coords((T, h, w), device)  # [n_video, 3], row-major
        # the source order: video tokens [0, global_at), the global tokens, the remaining video tokens
        source_coords = torch.cat([video[:global_at], torch.full((num_global, 3), -1, device=device), video[global_at:]])
        source_kind = torch.full((n_video + num_global,), _KIND_VIDEO, dtype=torch.int8, device=device)
        source_kind[global_at : global_at + num_global] = _KIND_GLOBAL
        n_source = n_video + num_global
        order = inverse = None
        if cube is None:
            coords, kind = source_coords, source_kind
        else:
            cube = _check_grid(cube, "", name="cube")
            volume = math.prod(cube)
            counts = [-(-n // c) for n, c in zip((T, h, w), cube)]  # cubes per dimension
            cube_id = ((video[:, 0] // cube[0]) * counts[1] + video[:, 1] // cube[1]) * counts[2] + video[:, 2] // cube[2]
            within = ((video[:, 0] % cube[0]) * cube[1] + video[:, 1] % cube[1]) * cube[2] + video[:, 2] % cube[2]
            video_span = math.prod(counts) * volume
            first = global_at == 0 and num_global > 0
            global_span = -(-num_global // volume) * volume if first else num_global
            n = video_span + global_span
            video_pos = cube_id * volume + within + (global_span if first else 0)
            global_pos = torch.arange(num_global, device=device) + (0 if first else video_span)
            video_source = torch.cat([torch.arange(global_at, device=device), torch.arange(global_at + num_global, n_source, device=device)])
            order = torch.full((n,), -1, dtype=torch.int64, device=device)
            order[video_pos] = video_source
            order[global_pos] = torch.arange(global_at, global_at + num_global, device=device)
            inverse = torch.empty(n_source, dtype=torch.int64, device=device).scatter_(
                0, order.clamp_min(0)[order >= 0], torch.arange(n, device=device)[order >= 0]
            )
            coords = torch.where((order >= 0)[:, None], source_coords[order.clamp_min(0)], -1)
            kind = torch.where(order >= 0, source_kind[order.clamp_min(0)], _KIND_PAD).to(torch.int8)
        n = coords.shape[0]
        return VideoLayout(
            coords.to(torch.int32).expand(batch, n, 3).contiguous(),
            kind.expand(batch, n).contiguous(),
            torch.full((batch,), n_source, dtype=torch.int32, device=device),
            (T, h, w),
            num_global,
            order=order,
            inverse=inverse,
            cube=None if cube is None else tuple(cube),
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


def _check_grid(grid, missing: str, name: str = "grid") -> tuple[int, int, int]:
    if grid is None:
        raise ValueError(missing)
    if not (isinstance(grid, (tuple, list, torch.Size)) and len(grid) == 3):
        raise TypeError(f"{name} must be (T, h, w), got {grid!r}")
    for dim, value in zip(("T", "h", "w"), grid):
        check_int(f"{name} {dim}", value, low=1)
    return tuple(int(v) for v in grid)


# ---------------------------------------------------------------------------------------------------
# SparsePlan


class TileValidity(NamedTuple):
    """Which token pairs of each tile pair are valid (neither is padding), as a plan's bits index.

    q_pattern int64 [B, nQ] and k_pattern int64 [B, nK]: the padding pattern of each query and key
    tile (tiles with the same valid positions share one); states int32 [Pq, Pk]: the plan's bits
    index of "every valid pair" for each pair of patterns: 1 (full) when neither tile holds padding,
    0 when one holds no valid token. ``states[q_pattern[b, i], k_pattern[b, j]]`` is the state a tile
    pair gets when all its pairs attend (``build_plan_topk``'s chosen tiles).
    """

    q_pattern: torch.Tensor
    k_pattern: torch.Tensor
    states: torch.Tensor

    def full_states(self) -> torch.Tensor:
        """int32 [B, nQ, nK]: the "every valid pair" state of every tile pair."""
        return self.states[self.q_pattern[:, :, None], self.k_pattern[:, None, :]]


@dataclass(frozen=True, eq=False)
class SparsePlan:
    """Which (query tile, key tile) pairs of a layout attend, and how, for every head or per head.

    Tiles are ``block = (BQ, BK)`` consecutive tokens of one sequence; nQ = ceil(N / BQ), nK = ceil(N / BK).
    A plan is shared by all heads (Hp = 1, ``build_plan``) or holds one per query head (Hp = H,
    ``build_plan_topk``, ``per_head_plan``); ``heads`` is Hp.

    Attributes (int32 tensors on the layout's device):
        tile_map [B, Hp, nQ, nK]: 0 empty, 1 full (every pair of the tiles attends, no padding
            inside), s >= 2 partial with token mask ``bits[s]``.
        bits [S, BQ, ceil(BK / 32)]: token masks; bit c % 32 of word [s, r, c // 32] says whether
            query r attends to key c; bits[0] is all zeros, bits[1] all ones. Partial tile pairs of
            one geometry share their mask (see ``build_plan``).
        row_ptr [B * Hp * nQ + 1], col_idx, entry_bits: CSR of the non-empty tile pairs: row
            (b * Hp + h) * nQ + i lists the key tiles of query tile i of sequence b and plan head h
            (ascending) and their bits index. col_idx and entry_bits may be longer than row_ptr[-1]
            (plans built without a host sync have a fixed capacity, ``row_capacity`` per row); the
            tail is unused.
        col_ptr [B * Hp * nK + 1], row_idx, entry_bits_t: the transposed CSR (query tiles of each
            key tile), for backward passes that own key tiles.
        lengths [B]: valid tokens per sequence.
        validity: the "every valid pair" state of each tile pair (``TileValidity``).
        row_capacity: an upper bound on the non-empty key tiles of one CSR row.
        spec: the mask spec the plan was built from (for ``build_plan_topk``: its ``always`` spec).

    ``num_full``, ``num_partial``, ``allowed_pairs``, ``density`` and ``tile_density`` are computed
    from the tensors when read (a host sync each).
    """

    layout: VideoLayout
    spec: _masks.MaskSpec | None
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
    validity: TileValidity
    row_capacity: int

    @property
    def batch(self) -> int:
        return self.tile_map.shape[0]

    @property
    def heads(self) -> int:
        """Hp: 1 for a plan shared by all heads, else the query head count it was built for."""
        return self.tile_map.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.layout.num_tokens

    @property
    def num_full(self) -> int:
        """Full tile pairs, over sequences and plan heads."""
        return int((self.tile_map == 1).sum())

    @property
    def num_partial(self) -> int:
        """Partial tile pairs, over sequences and plan heads."""
        return int((self.tile_map >= 2).sum())

    @property
    def allowed_pairs(self) -> int:
        """Token pairs that attend, over sequences and plan heads."""
        return int(_popcounts(self.bits, self.block[1])[self.tile_map.long()].sum())

    @property
    def density(self) -> float:
        """Allowed token pairs / all pairs of valid tokens (sum over sequences of lengths^2, times Hp)."""
        total = int((self.lengths.long() ** 2).sum()) * self.heads
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
        """bool [B, N, N] (a shared plan) or [B, H, N, N] (a per-head plan): True where query token i
        attends to key token j. Materialises N^2 (tests, small inputs)."""
        BQ, BK = self.block
        mask = dense_mask(self.tile_map, self.bits, BQ, BK, self.num_tokens)
        return mask[:, 0] if self.heads == 1 else mask

    def to_sdpa_mask(self) -> torch.Tensor:
        """bool [B, Hp, N, N] for ``F.scaled_dot_product_attention(attn_mask=...)`` (True = attend).
        SDPA returns NaN for rows with no allowed key, where sparse_attention returns 0."""
        BQ, BK = self.block
        return dense_mask(self.tile_map, self.bits, BQ, BK, self.num_tokens)

    def to_flex_block_mask(self):
        """A FlexAttention ``BlockMask`` of the same tiles (heads: 1 or H): the full tiles as full
        blocks, the partial ones as partial blocks, and a real ``mask_mod`` that reads the plan's token
        bits (eager FlexAttention ignores the block lists and uses only mask_mod). BLOCK_SIZE = the
        plan's block."""
        from torch.nn.attention.flex_attention import BlockMask

        BQ, BK = self.block
        tile_map, bits = self.tile_map, self.bits
        N = self.num_tokens

        def kv_blocks(sel):
            count = sel.sum(-1).to(torch.int32)
            # indices of the selected key tiles first (stable sort of "not selected"), the rest unused
            order = torch.sort((~sel).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
            return count, order

        partial_num, partial_idx = kv_blocks(tile_map >= 2)
        full_num, full_idx = kv_blocks(tile_map == 1)
        shared = self.heads == 1

        def mask_mod(b, h, q_idx, kv_idx):
            state = tile_map[b, 0 if shared else h, q_idx // BQ, kv_idx // BK]
            key = kv_idx % BK  # the key's place in its tile: bit key % 32 of word key // 32
            word = bits[state, q_idx % BQ, key // 32]
            return ((word >> (key % 32)) & 1) == 1

        return BlockMask.from_kv_blocks(
            partial_num, partial_idx, full_num, full_idx, BLOCK_SIZE=(BQ, BK), mask_mod=mask_mod, seq_lengths=(N, N)
        )

    def __repr__(self):
        return (
            f"SparsePlan(B={self.batch}, heads={self.heads}, N={self.num_tokens}, block={self.block}, spec={self.spec!r}, "
            f"full={self.num_full}, partial={self.num_partial}, density={self.density:.4f}, "
            f"tile_density={self.tile_density:.4f})"
        )


def _popcounts(bits: torch.Tensor, block_k: int) -> torch.Tensor:
    """int64 [S]: the token pairs each bit pattern of ``bits`` [S, BQ, W] allows (keys past BK
    uncounted: bits[1]'s all-ones rows count BK each)."""
    words = bits.long() & 0xFFFFFFFF
    if block_k < 32:
        words = words & ((1 << block_k) - 1)
    return _words_to_int32(words)[1]


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
    BQ, BK = _check_block(block)
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
    chunks = []
    step = max(1, _PARTIAL_CHUNK_PAIRS // (BQ * BK))
    for p0 in range(0, first.shape[0], step):
        b, i, j = where[first[p0 : p0 + step]].unbind(1)
        qt, kt = qc[b, i].long(), kc[b, j].long()  # [p, BQ, 3], [p, BK, 3]: specs compute in int64
        qk, kk = qkind[b, i], kkind[b, j]
        tiles = _masks.TilePairs(
            _masks.Coords(qt[..., 0], qt[..., 1], qt[..., 2], qk == _KIND_GLOBAL),
            _masks.Coords(kt[..., 0], kt[..., 1], kt[..., 2], kk == _KIND_GLOBAL),
        )
        # padding attends to nothing and is attended by nothing
        words = spec.pred_words(tiles, grid) & tiles.key_bits(kk != _KIND_PAD)
        chunks.append(_words_to_int32(words * (qk != _KIND_PAD)[..., None])[0])
    W = -(-BK // 32)
    bits = torch.cat(
        [torch.zeros(1, BQ, W, dtype=torch.int32, device=dev), torch.full((1, BQ, W), -1, dtype=torch.int32, device=dev), *chunks]
    )
    state = is_full.to(torch.int32)  # 1 full, else the bits index 2 + geometry of the partial tile
    state[~is_full] = (2 + geometry).to(torch.int32)
    tile_map = torch.zeros(B, 1, nQ, nK, dtype=torch.int32, device=dev)
    tile_map[eb, 0, ei, ej] = state
    validity, valid_bits = _tile_validity(qkind, kkind, bits.shape[0])
    row_capacity = int(torch.bincount(eb * nQ + ei, minlength=B * nQ).max()) if B * nQ else 0
    return SparsePlan(
        layout=layout,
        spec=spec,
        block=(BQ, BK),
        tile_map=tile_map,
        bits=torch.cat([bits, valid_bits]),
        **_csr(tile_map, entries.shape[0])._asdict(),
        lengths=layout.lengths,
        validity=validity,
        row_capacity=row_capacity,
    )


def _check_block(block) -> tuple[int, int]:
    if not (isinstance(block, (tuple, list)) and len(block) == 2):
        raise TypeError(f"block must be a pair (BQ, BK) of ints, got {block!r}")
    for name, value in zip(("BQ", "BK"), block):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"block {name} must be an int, got {type(value).__name__}")
        if value < 16 or value & (value - 1):
            raise ValueError(f"block {name} must be a power of two >= 16 (16, 32, 64, 128, ...), got {value}")
    return tuple(block)


def _keys_to_words(keys: torch.Tensor) -> torch.Tensor:
    """int64 [..., W]: bool keys [..., BK] packed, key c as bit c % 32 of word c // 32."""
    BK = keys.shape[-1]
    W = -(-BK // 32)
    padded = torch.nn.functional.pad(keys, (0, W * 32 - BK)).unflatten(-1, (W, 32)).to(torch.int64)
    return (padded << torch.arange(32, device=keys.device)).sum(-1)


def _tile_validity(qkind: torch.Tensor, kkind: torch.Tensor, first_bits: int) -> tuple[TileValidity, torch.Tensor]:
    """The TileValidity of tiles of kinds qkind [B, nQ, BQ] and kkind [B, nK, BK] (``_padded_tile_coords``)
    and the bit patterns [E, BQ, W] of its partial "every valid pair" states, numbered from
    ``first_bits``. Tiles with equal padding positions share one pattern. The numbers of patterns and of
    partial pairs size the outputs, so they are read on the host (three syncs, once per plan, beside
    build_plan's own read of its tile count)."""
    def patterns(kind):
        valid = (kind != _KIND_PAD).flatten(0, 1)  # [B * n, block]
        ids = _row_ids(valid.long()) if valid.shape[0] else valid.new_zeros(0, dtype=torch.int64)
        count = int(ids.max()) + 1 if ids.numel() else 0
        first = torch.full((count,), valid.shape[0], dtype=torch.int64, device=kind.device).scatter_reduce(
            0, ids, torch.arange(valid.shape[0], device=kind.device), "amin")
        return ids.view(kind.shape[:2]), valid[first]  # [B, n], [P, block]

    q_pattern, q_valid = patterns(qkind)
    k_pattern, k_valid = patterns(kkind)
    q_all, q_none = q_valid.all(1), ~q_valid.any(1)
    k_all, k_none = k_valid.all(1), ~k_valid.any(1)
    partial = ~(q_all[:, None] & k_all[None, :]) & ~q_none[:, None] & ~k_none[None, :]  # [Pq, Pk]
    number = partial.flatten().cumsum(0).view(partial.shape) - 1 + first_bits
    states = torch.where(q_all[:, None] & k_all[None, :], 1, torch.where(partial, number, 0)).to(torch.int32)
    pq, pk = partial.nonzero(as_tuple=True)  # row-major, the order ``number`` counts them in
    words = _keys_to_words(k_valid[pk])[:, None, :] * q_valid[pq][:, :, None]  # [E, BQ, W]
    return TileValidity(q_pattern, k_pattern, states), _words_to_int32(words)[0]


class _Csr(NamedTuple):
    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    entry_bits: torch.Tensor
    col_ptr: torch.Tensor
    row_idx: torch.Tensor
    entry_bits_t: torch.Tensor


def _csr(tile_map: torch.Tensor, capacity: int) -> _Csr:
    """The CSR of the non-empty tile pairs of ``tile_map`` [B, Hp, nQ, nK] by query tile (rows b * Hp
    * nQ + h * nQ + i, key tiles ascending) and by key tile (query tiles ascending), in index arrays
    of ``capacity`` entries (at least the non-empty count; the tail stays 0). Static shapes and no
    host sync: each entry's place is its row's start (a cumulative count) plus its rank in the row."""
    B, Hp, nQ, nK = tile_map.shape
    nonempty = tile_map != 0

    def compress(nz, state, n_lines, n_cols):
        counts = nz.sum(-1).flatten()  # [lines]
        ptr = torch.zeros(counts.shape[0] + 1, dtype=torch.int64, device=nz.device)
        ptr[1:] = counts.cumsum(0)
        place = ptr[:-1].view(nz.shape[:-1] + (1,)) + nz.cumsum(-1) - 1
        place = torch.where(nz, place, capacity).flatten()  # empty pairs go to one scratch entry
        cols = torch.arange(n_cols, dtype=torch.int32, device=nz.device).expand(nz.shape).flatten()
        idx = torch.zeros(capacity + 1, dtype=torch.int32, device=nz.device).scatter_(0, place, cols)[:capacity]
        bits = torch.zeros(capacity + 1, dtype=torch.int32, device=nz.device).scatter_(0, place, state.flatten())[:capacity]
        return ptr.to(torch.int32), idx, bits

    row_ptr, col_idx, entry_bits = compress(nonempty, tile_map, B * Hp * nQ, nK)
    col_ptr, row_idx, entry_bits_t = compress(nonempty.transpose(-1, -2), tile_map.transpose(-1, -2), B * Hp * nK, nQ)
    return _Csr(row_ptr, col_idx, entry_bits, col_ptr, row_idx, entry_bits_t)


# ---------------------------------------------------------------------------------------------------
# Data-dependent plans: top-k tiles from pooled queries and keys, per-head choices of static specs


def per_head_plan(plans, heads: torch.Tensor) -> SparsePlan:
    """One plan per query head: head h of sequence b uses ``plans[heads[b, h]]``.

    plans: a list of shared plans (``build_plan``) of one layout and one block, e.g. one per mask
    spec of ``classify_heads``. heads: int tensor [H] (the same choice for every sequence) or
    [B, H], values in [0, len(plans)) (an index out of range is an indexing error). Built on the
    device with no host sync: the plans' bit patterns are concatenated and the CSR has a fixed
    capacity (the largest ``row_capacity`` of the plans per row).
    """
    plans = list(plans) if isinstance(plans, (list, tuple)) else plans
    if not isinstance(plans, list) or not plans or not all(isinstance(p, SparsePlan) for p in plans):
        raise TypeError(f"plans must be a non-empty list of vidtok.SparsePlan, got {plans!r}")
    first = plans[0]
    for i, p in enumerate(plans):
        if p.layout is not first.layout or p.block != first.block:
            raise ValueError(f"plans[{i}] was built for another layout or block ({p.block}) than plans[0] ({first.block}); "
                             "build every plan from one layout object and one block")
        if p.heads != 1:
            raise ValueError(f"plans[{i}] is already per-head ({p.heads} heads); per_head_plan combines shared plans")
    if not isinstance(heads, torch.Tensor) or heads.dtype not in (torch.int32, torch.int64) or heads.dim() not in (1, 2):
        what = f"{heads.dtype} of shape {tuple(heads.shape)}" if isinstance(heads, torch.Tensor) else type(heads).__name__
        raise TypeError(f"heads must be an int32/int64 tensor [H] or [B, H], got {what}")
    B = first.batch
    if heads.dim() == 2 and heads.shape[0] != B:
        raise ValueError(f"heads must be [H] or [B, H] with B = {B}, got shape {tuple(heads.shape)}")
    check_same_device(heads=heads, plan=first.tile_map)
    # plan p's partial patterns follow those of the plans before it in the concatenated bits
    maps, bits, offset = [], [first.bits], first.bits.shape[0]
    for p in plans:
        if p is first:
            maps.append(p.tile_map[:, 0])
            continue
        maps.append(torch.where(p.tile_map[:, 0] >= 2, p.tile_map[:, 0] + (offset - 2), p.tile_map[:, 0]))
        bits.append(p.bits[2:])
        offset += p.bits.shape[0] - 2
    stacked = torch.stack(maps, 1)  # [B, P, nQ, nK]
    choice = heads.long().expand(B, -1) if heads.dim() == 1 else heads.long()
    tile_map = stacked.gather(1, choice[:, :, None, None].expand(-1, -1, *stacked.shape[2:]))
    capacity = max(p.row_capacity for p in plans)
    return dataclasses.replace(
        first, tile_map=tile_map, bits=torch.cat(bits), **_csr(tile_map, tile_map.shape[0] * tile_map.shape[1] * tile_map.shape[2] * capacity)._asdict(),
        row_capacity=capacity, spec=None,
    )


def build_plan_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: VideoLayout,
    *,
    topk: int | None = None,
    top_p: float | None = None,
    pool: tuple[int, int, int] | None = None,
    always: _masks.MaskSpec | SparsePlan | None = None,
    block: tuple[int, int] | None = None,
    scale: float | None = None,
) -> SparsePlan:
    """A per-head plan chosen from the data: for every query tile and head, the key tiles with the
    highest coarse attention, unioned with a static spec (Video Sparse Attention's coarse stage, VSA,
    Zhang et al. 2025; with ``top_p``, SVG2's top-p budget, Yang et al. 2025).

    The coarse stage pools q and k: the mean of the valid tokens of every query tile and key tile (or
    of every ``pool`` sub-cube inside them). A key tile's coarse score for a query tile is
    ``scale * <pooled q, pooled k> + log(valid keys in the tile)``, the log of the attention mass the
    tile would receive if its keys were all equal to their mean (so a tile half of padding counts
    half); with sub-cubes, the key sub-cubes' masses add up (logsumexp) and the tile takes the
    highest over its query sub-cubes. Per row (sequence, head, query tile) the chosen tiles are:

    - ``topk``: the k highest scores (ties: the lower tile index);
    - ``top_p``: the fewest highest tiles whose softmax of coarse scores sums to >= top_p, at most
      ``topk`` of them when both are given.

    A chosen tile pair attends on every valid token pair; the tile pairs of ``always`` keep their own
    token mask where they are not chosen. Query tiles without valid tokens choose nothing, and tiles
    of padding only are never chosen.

    Args:
        q: [B, H, N, D]; k: [B, Hk, N, D] (H % Hk == 0), in the layout's order (``layout.permute``).
        layout: the VideoLayout of the N tokens. Tiles are consecutive tokens: on a cube-ordered
            layout (``VideoLayout.from_grid(..., cube=(4, 4, 4))``) with 64-token tiles every tile
            is one cube, as in VSA.
        topk: key tiles chosen per query tile (>= 1); the capacity of each CSR row.
        top_p: in (0, 1]; with no ``topk``, a row may choose every key tile.
        pool: (t, h, w) sub-cubes that the coarse stage pools separately, finer than the tiles:
            only on a cube-ordered layout, with ``pool`` inside its ``cube`` so that the sub-cube's
            tokens are consecutive (pool = (pt, ch, cw), (1, ph, cw) or (1, 1, pw) with pt | ct,
            ph | ch, pw | cw) and its volume dividing BQ and BK. Default: one pooled token per tile.
        always: the tiles every head keeps: a mask spec (e.g. ``masks.cube_window(cube) |
            masks.global_tokens()``: the diagonal and the text tokens), whose plan is built here
            (host syncs), or that plan, built by ``build_plan`` on this layout (no host sync; build
            it once and reuse it every step). Default: nothing.
        block: the (BQ, BK) tiles; default the ``always`` plan's, else (64, 64).
        scale: the coarse logits' scale, default D ** -0.5.

    Returns:
        a SparsePlan with one plan per query head (``heads`` = H), built on the device with static
        shapes and no host sync (given ``always`` as a plan): its CSR rows have a fixed capacity,
        ``row_capacity`` = min(nK, topk (nK with top_p alone) + the ``always`` plan's row capacity).
        Not differentiable (the choice is discrete). NaN in q or k gives NaN coarse scores: those
        tiles are never chosen but take places among a row's top k (the row chooses fewer tiles).
    """
    B, H, N, D, Hk = _check_qk(q, k, layout)
    if topk is None and top_p is None:
        raise ValueError("build_plan_topk needs topk=... or top_p=... (or both)")
    if topk is not None:
        check_int("topk", topk, low=1)
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be a float in (0, 1], got {top_p!r}")
    base = _always_plan(layout, always, block)
    BQ, BK = base.block
    if scale is None:
        scale = D**-0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float, got {scale!r}")
    group = _pool_tokens(pool, layout, BQ, BK)

    nQ, nK = base.tile_map.shape[2:]
    valid = layout.kind != _KIND_PAD
    qp, q_count = _pooled(q, valid, group, nQ * BQ)  # [B, H, Gq, D] fp32, [B, Gq]
    kp, k_count = _pooled(k, valid, group, nK * BK)
    kp = kp.repeat_interleave(H // Hk, dim=1)
    scores = torch.matmul(qp, kp.transpose(-1, -2)) * scale + k_count.log()[:, None, None, :]  # log 0 = -inf
    scores = scores.masked_fill((q_count == 0)[:, None, :, None], float("-inf"))
    s_q, s_k = BQ // group, BK // group
    # key sub-groups of a tile add their masses; the tile takes its best query sub-group
    scores = scores.view(B, H, nQ, s_q, nK, s_k).logsumexp(-1).amax(3)  # [B, H, nQ, nK]

    ranked, order = torch.sort(scores, dim=-1, descending=True, stable=True)
    keep = ranked > float("-inf")
    if top_p is not None:
        probs = torch.softmax(ranked, -1).nan_to_num(0.0)  # a row of -inf only: NaN -> nothing kept
        keep = keep & (probs.cumsum(-1) - probs < top_p)
    width = nK if topk is None else min(topk, nK)
    order = torch.where(keep[..., :width], order[..., :width], nK)  # the unkept go to a scratch column
    chosen = torch.zeros(B, H, nQ, nK + 1, dtype=torch.bool, device=q.device).scatter_(-1, order, True)[..., :nK]
    return _union(base, chosen, width)


def plan_from_tiles(layout: VideoLayout, tiles: torch.Tensor, *, always: _masks.MaskSpec | SparsePlan | None = None,
                    block: tuple[int, int] | None = None) -> SparsePlan:
    """The plan of a tile selection made elsewhere (a router, k-means clusters, a learned gate, the
    exact top-k tiles of a dense attention): ``tiles`` bool [B, nQ, nK] (every head) or [B, H, nQ,
    nK] (per head) says which (query tile, key tile) pairs attend on every valid token pair; the
    pairs of ``always`` (a spec, or its plan from ``build_plan`` on this layout) keep their token
    mask where not selected. Built on the device with no host sync (given ``always`` as a plan or
    None); CSR rows of capacity nK. block: default the ``always`` plan's, else (64, 64).
    """
    if not isinstance(layout, VideoLayout):
        raise TypeError(f"layout must be a vidtok.VideoLayout, got {type(layout).__name__}")
    base = _always_plan(layout, always, block)
    B, _, nQ, nK = base.tile_map.shape
    if not isinstance(tiles, torch.Tensor) or tiles.dtype != torch.bool or tiles.dim() not in (3, 4):
        what = f"{tiles.dtype} of shape {tuple(tiles.shape)}" if isinstance(tiles, torch.Tensor) else type(tiles).__name__
        raise TypeError(f"tiles must be a bool tensor [B, nQ, nK] or [B, H, nQ, nK], got {what}")
    tiles = tiles[:, None] if tiles.dim() == 3 else tiles
    if tiles.shape[0] != B or tiles.shape[2:] != (nQ, nK):
        raise ValueError(f"tiles must be [B, (H,) nQ, nK] = [{B}, (H,) {nQ}, {nK}] for this layout and block {base.block}, "
                         f"got {tuple(tiles.shape)}")
    check_same_device(tiles=tiles, layout=layout.coords)
    return _union(base, tiles, nK)


def _always_plan(layout: VideoLayout, always, block) -> SparsePlan:
    """The static plan an ``always=`` argument stands for (built here from a spec, host syncs)."""
    if isinstance(always, SparsePlan):
        if always.layout is not layout:
            raise ValueError("the always plan was built for another layout: build it with build_plan(layout, spec) from this layout")
        if block is not None and tuple(block) != always.block:
            raise ValueError(f"block {tuple(block)} differs from the always plan's block {always.block}")
        return always
    spec = ~_masks.all_pairs() if always is None else always
    if not isinstance(spec, _masks.MaskSpec):
        raise TypeError(f"always must be a vidtok.masks spec, a SparsePlan or None, got {type(always).__name__}")
    return build_plan(layout, spec, block=(64, 64) if block is None else _check_block(block))


def _union(base: SparsePlan, chosen: torch.Tensor, width: int) -> SparsePlan:
    """``base`` with the ``chosen`` tile pairs [B, H or 1, nQ, nK] (at most ``width`` per row) made
    "every valid pair"; CSR rows of capacity min(nK, width + base.row_capacity)."""
    B, _, nQ, nK = base.tile_map.shape
    full = base.validity.full_states()[:, None]  # [B, 1, nQ, nK]
    tile_map = torch.where(chosen, full, base.tile_map).contiguous()
    capacity = min(nK, width + base.row_capacity)
    return dataclasses.replace(
        base, tile_map=tile_map, **_csr(tile_map, B * tile_map.shape[1] * nQ * capacity)._asdict(), row_capacity=capacity,
    )


def _check_qk(q, k, layout):
    if not isinstance(layout, VideoLayout):
        raise TypeError(f"layout must be a vidtok.VideoLayout, got {type(layout).__name__}")
    check_tensor("q", q, rank=4, layout="[B, H, N, D]", dtypes=REFERENCE_DTYPES)
    check_tensor("k", k, rank=4, layout="[B, Hk, N, D]", dtypes=REFERENCE_DTYPES)
    B, H, N, D = q.shape
    Hk = k.shape[1]
    if k.shape[0] != B or k.shape[2] != N or k.shape[3] != D:
        raise ValueError(f"k must be [B, Hk, N, D] = [{B}, Hk, {N}, {D}] to fit q {tuple(q.shape)}, got {tuple(k.shape)}")
    if Hk == 0 or H % Hk:
        raise ValueError(f"q's head count H = {H} must be a multiple of k's head count Hk = {Hk}")
    if (B, N) != (layout.batch, layout.num_tokens):
        raise ValueError(f"q is [B, H, N, D] = {tuple(q.shape)} but the layout holds B = {layout.batch} sequences of "
                         f"N = {layout.num_tokens} tokens (pass q and k in the layout's order: layout.permute)")
    check_same_device(q=q, k=k, layout=layout.coords)
    return B, H, N, D, Hk


def _pool_tokens(pool, layout: VideoLayout, BQ: int, BK: int) -> int:
    """Tokens per pooled group: the tile (pool None) or the ``pool`` sub-cube of a cube-ordered layout."""
    if pool is None:
        if BQ != BK:
            raise ValueError(f"the coarse stage pools whole tiles, so BQ and BK must be equal, got {(BQ, BK)} (or pass pool=)")
        return BQ
    pool = _check_grid(pool, "", name="pool")
    if layout.cube is None:
        raise ValueError("pool=(t, h, w) needs a cube-ordered layout (VideoLayout.from_grid(..., cube=...)), whose "
                         "sub-cubes are runs of consecutive tokens")
    cube = layout.cube
    nested = any(
        all(p == c for p, c in zip(pool[d + 1 :], cube[d + 1 :])) and all(p == 1 for p in pool[:d]) and cube[d] % pool[d] == 0
        for d in range(3)
    )
    volume = math.prod(pool)
    if not nested or BQ % volume or BK % volume or math.prod(cube) % volume:
        raise ValueError(f"pool {pool} must be a sub-cube of the layout's cube {cube} whose tokens are consecutive "
                         f"((pt, ch, cw), (1, ph, cw) or (1, 1, pw) with pt | ct, ph | ch, pw | cw) and whose volume "
                         f"divides the block {(BQ, BK)}")
    return volume


def _pooled(x: torch.Tensor, valid: torch.Tensor, group: int, padded: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 [B, h, G, D] mean of the valid tokens of each run of ``group`` tokens of x [B, h, N, D],
    0 for runs without one; their valid counts [B, G]) over ``padded`` >= N positions (G = padded /
    group). One pass over x: a batched [1, group] x [group, D] product per run."""
    B, h, N, D = x.shape
    weights = torch.nn.functional.pad(valid, (0, padded - N)).view(B, -1, group)
    count = weights.sum(-1)
    weights = (weights / count.clamp_min(1)[..., None]).to(x.dtype)  # [B, G, group]
    if padded != N:
        x = torch.nn.functional.pad(x, (0, 0, 0, padded - N))
    runs = x.view(B, h, -1, group, D)
    pooled = torch.matmul(weights[:, None, :, None, :], runs).squeeze(-2)  # [B, h, G, D]
    return pooled.to(accumulation_dtype(x.dtype)), count


def classify_heads(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: VideoLayout,
    specs=None,
    *,
    sample: int = 64,
    v: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Which mask spec suits each attention head, from a sample of its queries (Sparse VideoGen's
    online profiling, Xi et al. 2025): int64 [B, H], an index into ``specs`` per sequence and head.

    ``sample`` queries, evenly spaced over the N positions (padding among them is skipped), attend to
    every key exactly (softmax of ``scale`` q k^T over the valid keys, scale default D ** -0.5). With
    ``v`` [B, Hk, N, D], each spec's masked attention output is compared with the exact one and the
    head takes the spec of the lowest mean squared error (Sparse VideoGen's rule); without ``v``,
    the spec that holds the largest share of the exact attention mass. Ties: the lower index.

    specs: a list of mask specs. Default, Sparse VideoGen's two head types on the layout's (T, h, w)
    grid, both with the global tokens: spatial heads (0) attend to every position of frames t - 1 ..
    t + 1 (``temporal_window(1, 1)``); temporal heads (1) to the k x k positions around their own in
    every frame (``spatial_window(k, k)``, k the odd size whose density matches the spatial spec's).

    The choice feeds ``per_head_plan([build_plan(layout, s) for s in specs], choice)``. Costs sample x
    N scores per head and no host sync; q and k in the layout's order, as for ``build_plan_topk``.
    """
    B, H, N, D, Hk = _check_qk(q, k, layout)
    specs = default_head_specs(layout.grid) if specs is None else list(specs)
    if not specs or not all(isinstance(s, _masks.MaskSpec) for s in specs):
        raise TypeError(f"specs must be a non-empty list of vidtok.masks specs, got {specs!r}")
    check_int("sample", sample, low=1)
    if v is not None:
        check_tensor("v", v, rank=4, layout="[B, Hk, N, D]", dtypes=REFERENCE_DTYPES)
        if v.shape[:3] != k.shape[:3]:
            raise ValueError(f"v must be [B, Hk, N, Dv] = [{B}, {Hk}, {N}, Dv] like k, got {tuple(v.shape)}")
        check_same_device(q=q, v=v)
    if scale is None:
        scale = D**-0.5
    for s in specs:
        s.validate(layout.grid)
    acc = accumulation_dtype(q.dtype)
    rows = torch.arange(min(sample, N), device=q.device) * N // min(sample, N)  # evenly spaced, distinct
    valid = layout.kind != _KIND_PAD  # [B, N]
    row_valid = valid[:, rows]  # [B, S]
    logits = torch.matmul(q[:, :, rows].to(acc), k.to(acc).repeat_interleave(H // Hk, 1).transpose(-1, -2)) * scale
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))  # [B, H, S, N]
    c = layout.token_coords()
    q_coords = _masks.Coords(*(x[:, rows, None] for x in c))
    k_coords = _masks.Coords(*(x[:, None, :] for x in c))
    probs = torch.softmax(logits, -1).nan_to_num(0.0)
    if v is not None:
        vf = v.to(acc).repeat_interleave(H // Hk, 1)
        exact = torch.matmul(probs, vf)
    costs = []
    for spec in specs:
        allowed = (spec.pred(q_coords, k_coords, layout.grid) & valid[:, None, :])[:, None]  # [B, 1, S, N]
        if v is None:
            per_row = -(probs * allowed).sum(-1)  # minus the kept mass
        else:
            masked = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
            per_row = (torch.matmul(masked, vf) - exact).square().mean(-1)
        weight = row_valid[:, None, :].to(acc)
        costs.append((per_row * weight).sum(-1) / weight.sum(-1).clamp_min(1))
    return torch.stack(costs, -1).argmin(-1)  # the first of equal costs: the lower index


def default_head_specs(grid: tuple[int, int, int]) -> list:
    """Sparse VideoGen's spatial and temporal head specs for a (T, h, w) grid (``classify_heads``):
    [temporal_window(1, 1) | global_tokens(), spatial_window(k, k) | global_tokens()], k the odd size
    with k^2 / (h w) closest to min(3, T) / T (equal densities; at most the frame's larger side)."""
    T, h, w = _check_grid(grid, "", name="grid")
    target = min(3, T) / T * h * w
    k = min(range(1, 2 * max(h, w) + 1, 2), key=lambda n: (abs(n * n - target), n))
    return [_masks.temporal_window(1, 1) | _masks.global_tokens(), _masks.spatial_window(k, k) | _masks.global_tokens()]


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
        plan: from ``build_plan`` (one plan for every head), or per head (``build_plan_topk``,
            ``per_head_plan``, ``plan_from_tiles``: plan.heads == H).
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
    the plan's token bits, IEEE division), and a backward of three launches: delta = rowsum(dO * O)
    - dLSE, dQ programs (forward CSR) and dK/dV programs (transposed CSR, keys as every product's M
    dimension), P recomputed from the saved LSE. float32 inputs run IEEE fp32 products (no TF32) on
    smaller sub-tiles, 16-bit ones the tensor cores. "cpu" (auto on CPU tensors)
    computes the same tiles in PyTorch, a group of consecutive query tiles at a time against one
    key set (a range of key tiles, read as a view, or the runs of keys the group's queries attend
    to, gathered), as a small cost model picks, each group in ATen's fused CPU flash-attention
    kernels (the ones torch's own SDPA uses there); its backward is one walk over the groups adding
    dK, dV into their keys in a fixed order. "reference" is the readable spec: every query row
    against every key with the mask as a -inf bias, a band of rows at a time (N^2 work; the tests'
    oracle). Deterministic (no float atomics in the Triton
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
    if plan.heads not in (1, H):
        raise ValueError(f"the plan holds {plan.heads} per-head plans but q has H = {H} heads")
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
        if plan.heads not in (1, H):
            raise ValueError(f"the plan holds {plan.heads} per-head plans but q has H = {H} heads")
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

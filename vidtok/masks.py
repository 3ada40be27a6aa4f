"""Attention mask specs for video tokens, composable with ``&``, ``|`` and ``~``.

A spec says which (query, key) token pairs may attend, from each token's (t, h, w) position in the
video and whether it is a global (register) token. Every spec answers two questions:

- ``pred(q, k, grid)``: the exact token predicate, vectorised over broadcastable coordinate tensors
  (``Coords``). It defines the truth: ``SparsePlan.to_dense`` and the partial tiles of a plan use it.
- ``pred_words(tiles, grid)``: the same predicate over the token pairs of a batch of tile pairs
  (``TilePairs``), packed 32 keys to a word. The window specs answer it from sorted key coordinates
  (two binary searches per query and dimension instead of one comparison per pair, ~20x less work for
  64-token tiles); a spec without its own falls back to ``pred``. Partial tiles of a plan use it.
- ``classify(q, k, grid)``: for tiles of tokens described only by the bounds of their coordinates
  (``Bounds``), a pair ``(any, all)`` of bool tensors: ``any`` is False only if no pair of the two
  tiles can be allowed (the tile pair is empty), ``all`` is True only if every pair of valid tokens is
  allowed (the tile pair is full). Both are conservative: a wrong "mixed" answer only costs work,
  never correctness. Composition: AND is any-and-any / all-and-all, OR is any-or-any / all-or-all,
  NOT swaps them (``any = ~all``, ``all = ~any``).

Convention for global tokens: the video specs (frame_local, temporal_window, causal_in_time,
spatial_window, neighborhood) are False for every pair that contains a global token, and
``global_tokens()`` is True exactly for those pairs, so ``frame_local() | global_tokens()`` is
"attend within the frame, plus registers that see and are seen by everything".

Every video spec here is a product over dimensions of windows ``lo(q) <= k <= hi(q)`` whose ends
are non-decreasing in the query coordinate, so for a query box [q_lo, q_hi] the union of windows is
[lo(q_lo), hi(q_hi)] and their intersection [lo(q_hi), hi(q_lo)]: that gives exact-or-conservative
tile classification from the boxes' bounds alone.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "Bounds",
    "Coords",
    "MaskSpec",
    "TilePairs",
    "all_pairs",
    "causal_in_time",
    "cube_window",
    "frame_local",
    "frame_pairs",
    "global_tokens",
    "neighborhood",
    "spatial_window",
    "temporal_window",
]

# "No limit" for a window end, far outside any coordinate (coordinates are int64 in the specs).
_FAR = 1 << 40
_DIMS = ("t", "h", "w")


class Coords(NamedTuple):
    """Token positions, int64 tensors broadcastable against each other: frame t, row h, column w,
    and bool ``g`` (a global token; its t/h/w are ignored)."""

    t: torch.Tensor
    h: torch.Tensor
    w: torch.Tensor
    g: torch.Tensor


class Bounds(NamedTuple):
    """A tile of tokens summarised by int64 bounds of its video tokens' coordinates (``lo``/``hi`` are
    (t, h, w) triples, meaningful only where ``has_video``) and whether it holds any video token and any
    global token. Tensors broadcast against each other (query tiles [.., Q, 1], key tiles [.., 1, K])."""

    lo: tuple
    hi: tuple
    has_video: torch.Tensor
    has_global: torch.Tensor


class TilePairs:
    """P (query tile, key tile) pairs whose token masks are evaluated as packed words.

    ``q``: Coords [P, BQ] and ``k``: Coords [P, BK] (int64; ``g`` bool). A word mask is int64
    [P, BQ, W] (or [P, 1, W], broadcastable), W = ceil(BK / 32): bit c % 32 of word c // 32 says
    whether the query attends to key c; values stay in [0, 2**32). Because every key owns one bit, the
    union of disjoint key sets is their sum, which makes prefix unions a cumsum.
    """

    def __init__(self, q: Coords, k: Coords):
        self.q, self.k = q, k
        P, BK = k.t.shape
        dev = k.t.device
        c = torch.arange(BK, device=dev)
        self.onehot = torch.zeros(BK, -(-BK // 32), dtype=torch.int64, device=dev)  # key c's bit in its word
        self.onehot[c, c // 32] = torch.ones_like(c) << (c % 32)
        self._below: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def key_bits(self, keys: torch.Tensor) -> torch.Tensor:
        """int64 [P, 1, W]: the words of the keys where ``keys`` (bool [P, BK]) is True."""
        return (keys.to(torch.int64)[..., None] * self.onehot).sum(1, keepdim=True)

    def all_keys(self) -> torch.Tensor:
        return self.key_bits(torch.ones_like(self.k.g))

    def pack(self, mask: torch.Tensor) -> torch.Tensor:
        """int64 [P, BQ, W] words of a bool token mask [P, BQ, BK] (the fallback of ``pred_words``)."""
        P, BQ, BK = mask.shape
        W = self.onehot.shape[1]
        groups = torch.nn.functional.pad(mask, (0, W * 32 - BK)).view(P, BQ, W, 32).to(torch.int64)
        return (groups << torch.arange(32, device=mask.device)).sum(-1)

    def window(self, dim: int, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """int64 [P, BQ, W]: the keys with ``lo <= k[dim] <= hi`` for per-query ends lo, hi [P, BQ].

        The keys of each tile sorted by coordinate, ``below[j]`` = the words of the j smallest; the
        window is then below[#keys <= hi] - below[#keys < lo] (nested sets: a difference is a set)."""
        if dim not in self._below:
            vals, order = self.k[dim].sort(dim=-1)
            bits = self.onehot[order]  # [P, BK, W]
            below = torch.cat([bits.new_zeros(bits.shape[0], 1, bits.shape[2]), bits.cumsum(1)], 1)
            self._below[dim] = (vals.contiguous(), below)
        vals, below = self._below[dim]
        n_lo = torch.searchsorted(vals, lo.contiguous(), side="left")
        n_hi = torch.maximum(torch.searchsorted(vals, hi.contiguous(), side="right"), n_lo)
        W = below.shape[-1]
        return below.gather(1, n_hi[..., None].expand(-1, -1, W)) - below.gather(1, n_lo[..., None].expand(-1, -1, W))


class MaskSpec:
    """Base of every mask spec; combine specs with ``&``, ``|`` and ``~``."""

    def pred(self, q: Coords, k: Coords, grid: tuple[int, int, int]) -> torch.Tensor:
        raise NotImplementedError

    def pred_words(self, tiles: TilePairs, grid: tuple[int, int, int]) -> torch.Tensor:
        """``pred`` over every (query, key) pair of each tile pair, as int64 words (``TilePairs``)."""
        q = Coords(*(x[:, :, None] for x in tiles.q))
        k = Coords(*(x[:, None, :] for x in tiles.k))
        return tiles.pack(self.pred(q, k, grid))

    def classify(self, q: Bounds, k: Bounds, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def validate(self, grid: tuple[int, int, int]) -> None:
        """Raise ValueError if the spec cannot apply to a video of this (T, h, w) token grid."""

    def shift_invariant(self) -> tuple[bool, bool, bool]:
        """Per dimension (t, h, w): whether shifting every video token's coordinate by the same integer
        never changes the predicate. build_plan then evaluates one partial tile pair per geometry
        (tiles of equal content up to such a shift, at equal offsets) and copies its mask."""
        return (False, False, False)

    def __and__(self, other: MaskSpec) -> MaskSpec:
        return _And(self, _spec(other, "&"))

    def __or__(self, other: MaskSpec) -> MaskSpec:
        return _Or(self, _spec(other, "|"))

    def __invert__(self) -> MaskSpec:
        return _Not(self)


def _spec(other, op: str) -> MaskSpec:
    if not isinstance(other, MaskSpec):
        raise TypeError(f"a mask spec can only be combined with another mask spec by {op}, got {type(other).__name__}")
    return other


class _And(MaskSpec):
    def __init__(self, a: MaskSpec, b: MaskSpec):
        self.a, self.b = a, b

    def pred(self, q, k, grid):
        return self.a.pred(q, k, grid) & self.b.pred(q, k, grid)

    def pred_words(self, tiles, grid):
        return self.a.pred_words(tiles, grid) & self.b.pred_words(tiles, grid)

    def classify(self, q, k, grid):
        (a_any, a_all), (b_any, b_all) = self.a.classify(q, k, grid), self.b.classify(q, k, grid)
        return a_any & b_any, a_all & b_all

    def validate(self, grid):
        self.a.validate(grid)
        self.b.validate(grid)

    def shift_invariant(self):
        return tuple(x and y for x, y in zip(self.a.shift_invariant(), self.b.shift_invariant()))

    def __repr__(self):
        return f"({self.a!r} & {self.b!r})"


class _Or(_And):
    def pred(self, q, k, grid):
        return self.a.pred(q, k, grid) | self.b.pred(q, k, grid)

    def pred_words(self, tiles, grid):
        return self.a.pred_words(tiles, grid) | self.b.pred_words(tiles, grid)

    def classify(self, q, k, grid):
        (a_any, a_all), (b_any, b_all) = self.a.classify(q, k, grid), self.b.classify(q, k, grid)
        return a_any | b_any, a_all | b_all

    def __repr__(self):
        return f"({self.a!r} | {self.b!r})"


class _Not(MaskSpec):
    def __init__(self, a: MaskSpec):
        self.a = a

    def pred(self, q, k, grid):
        return ~self.a.pred(q, k, grid)

    def pred_words(self, tiles, grid):
        return tiles.all_keys() & ~self.a.pred_words(tiles, grid)

    def classify(self, q, k, grid):
        a_any, a_all = self.a.classify(q, k, grid)
        # some pair allowed by ~a  =>  not every pair allowed by a; every pair allowed by ~a <= none by a
        return ~a_all, ~a_any

    def validate(self, grid):
        self.a.validate(grid)

    def shift_invariant(self):
        return self.a.shift_invariant()

    def __repr__(self):
        return f"~{self.a!r}"


class _GlobalTokens(MaskSpec):
    def pred(self, q, k, grid):
        return q.g | k.g

    def pred_words(self, tiles, grid):
        return torch.where(tiles.q.g[..., None], tiles.all_keys(), tiles.key_bits(tiles.k.g))

    def classify(self, q, k, grid):
        # every pair has a global member iff one side holds only global tokens
        return q.has_global | k.has_global, ~q.has_video | ~k.has_video

    def shift_invariant(self):
        return (True, True, True)

    def __repr__(self):
        return "global_tokens()"


class _Window(MaskSpec):
    """Video spec: for each constrained dim d, ``lo_d(q_d) <= k_d <= hi_d(q_d)`` with non-decreasing
    ends; pairs with a global token are excluded."""

    def interval(self, dim: int, qd: torch.Tensor, grid) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    dims: tuple[int, ...] = ()

    def pred(self, q, k, grid):
        ok = ~q.g & ~k.g
        for d in self.dims:
            lo, hi = self.interval(d, q[d], grid)
            ok = ok & (k[d] >= lo) & (k[d] <= hi)
        return ok

    def pred_words(self, tiles, grid):
        q = tiles.q
        words = tiles.key_bits(~tiles.k.g)
        for d in self.dims:
            words = words & tiles.window(d, *self.interval(d, q[d], grid))
        return words * (~q.g)[..., None]

    def classify(self, q, k, grid):
        any_ = q.has_video & k.has_video
        all_ = ~q.has_global & ~k.has_global
        for d in self.dims:
            lo_first, hi_first = self.interval(d, q.lo[d], grid)  # window of the lowest query coordinate
            lo_last, hi_last = self.interval(d, q.hi[d], grid)  # ... and of the highest
            any_ = any_ & (k.hi[d] >= lo_first) & (k.lo[d] <= hi_last)
            all_ = all_ & (k.lo[d] >= lo_last) & (k.hi[d] <= hi_first)
        return any_, all_


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


class _TemporalWindow(_Window):
    dims = (0,)

    def __init__(self, before: int | None, after: int | None, name: str):
        self.before, self.after, self.name = before, after, name

    def interval(self, dim, qd, grid):
        lo = qd - (_FAR if self.before is None else self.before)
        hi = qd + (_FAR if self.after is None else self.after)
        return lo, hi

    def shift_invariant(self):
        return (True, True, True)  # a window of constant offsets; h and w unconstrained

    def __repr__(self):
        if self.name == "temporal_window":
            return f"temporal_window({self.before}, {self.after})"
        return f"{self.name}()"


class _SpatialWindow(_Window):
    dims = (1, 2)

    def __init__(self, kh: int, kw: int):
        self.radius = (None, kh // 2, kw // 2)
        self.kh, self.kw = kh, kw

    def interval(self, dim, qd, grid):
        return qd - self.radius[dim], qd + self.radius[dim]

    def shift_invariant(self):
        return (True, True, True)

    def __repr__(self):
        return f"spatial_window({self.kh}, {self.kw})"


class _Neighborhood(_Window):
    dims = (0, 1, 2)

    def __init__(self, kernel: tuple[int, int, int], is_causal: tuple[bool, bool, bool]):
        self.kernel, self.is_causal = kernel, is_causal

    def validate(self, grid):
        for name, k, extent in zip(_DIMS, self.kernel, grid):
            if k > extent:
                raise ValueError(
                    f"neighborhood kernel {self.kernel} is larger than the video grid {tuple(grid)} along {name} "
                    f"({k} > {extent}); NATTEN requires kernel <= extent in every dimension"
                )

    def interval(self, dim, qd, grid):
        K = self.kernel[dim]
        if self.is_causal[dim]:
            # NATTEN causal window: the K positions ending at the query, cut at 0.
            return (qd - (K - 1)).clamp_min(0), qd
        # NATTEN (src/natten/backends/flex.py): left = K // 2, right = K // 2 + (K % 2 - 1) (one less
        # for even K), window centre = query clamped to [left, L - 1 - right]: always K positions.
        left, right = K // 2, K // 2 + K % 2 - 1
        centre = qd.clamp(left, grid[dim] - 1 - right)
        return centre - left, centre + right

    def __repr__(self):
        return f"neighborhood({self.kernel}, is_causal={self.is_causal})"


class _CubeWindow(_Window):
    dims = (0, 1, 2)

    def __init__(self, cube: tuple[int, int, int], radius: tuple[int, int, int]):
        self.cube, self.radius = cube, radius

    def interval(self, dim, qd, grid):
        c, r = self.cube[dim], self.radius[dim]
        first = torch.div(qd, c, rounding_mode="floor") * c  # the first coordinate of the query's cube
        return first - r * c, first + (r + 1) * c - 1

    def shift_invariant(self):
        return (False, False, False)  # cube boundaries sit at multiples of the cube size

    def __repr__(self):
        return f"cube_window({self.cube}, radius={self.radius})"


class _AllPairs(MaskSpec):
    def pred(self, q, k, grid):
        return torch.ones(torch.broadcast_shapes(q.g.shape, k.g.shape), dtype=torch.bool, device=q.g.device)

    def pred_words(self, tiles, grid):
        return tiles.all_keys().expand(-1, tiles.q.g.shape[1], -1)

    def classify(self, q, k, grid):
        q_any, k_any = q.has_video | q.has_global, k.has_video | k.has_global
        return q_any & k_any, torch.ones_like(q_any & k_any)

    def shift_invariant(self):
        return (True, True, True)

    def __repr__(self):
        return "all_pairs()"


class _FramePairs(MaskSpec):
    """Video pairs whose (query frame, key frame) is True in a [T, T] table."""

    def __init__(self, allowed: torch.Tensor):
        self.allowed = allowed
        # summed-area table: allowed pairs in any rectangle of frames in O(1) (tile classification)
        sat = torch.zeros(allowed.shape[0] + 1, allowed.shape[1] + 1, dtype=torch.int64)
        sat[1:, 1:] = allowed.long().cumsum(0).cumsum(1)
        self.sat = sat

    def validate(self, grid):
        if tuple(self.allowed.shape) != (grid[0], grid[0]):
            raise ValueError(f"frame_pairs table must be [T, T] = [{grid[0]}, {grid[0]}] for this layout, got {tuple(self.allowed.shape)}")

    def pred(self, q, k, grid):
        allowed = self.allowed.to(q.t.device)
        video = ~q.g & ~k.g
        T = allowed.shape[0]
        return video & allowed[q.t.clamp(0, T - 1), k.t.clamp(0, T - 1)]

    def classify(self, q, k, grid):
        T = self.allowed.shape[0]
        sat = self.sat.to(q.has_video.device)
        q0, q1 = q.lo[0].clamp(0, T - 1), q.hi[0].clamp(0, T - 1) + 1
        k0, k1 = k.lo[0].clamp(0, T - 1), k.hi[0].clamp(0, T - 1) + 1
        count = sat[q1, k1] - sat[q0, k1] - sat[q1, k0] + sat[q0, k0]
        area = (q1 - q0) * (k1 - k0)
        return q.has_video & k.has_video & (count > 0), ~q.has_global & ~k.has_global & (count == area)

    def shift_invariant(self):
        return (False, True, True)  # the table is indexed by absolute frames

    def __repr__(self):
        return f"frame_pairs({int(self.allowed.sum())} of {self.allowed.numel()} pairs)"


def frame_pairs(allowed: torch.Tensor) -> MaskSpec:
    """Queries of frame t attend to keys of frame s where ``allowed[t, s]`` (bool [T, T], T the
    layout's frame count): a learned or hand-made frame-level mask (vidtok.nn.LearnableSparseMask)."""
    if not isinstance(allowed, torch.Tensor) or allowed.dtype != torch.bool or allowed.dim() != 2 or allowed.shape[0] != allowed.shape[1]:
        what = f"{allowed.dtype} {tuple(allowed.shape)}" if isinstance(allowed, torch.Tensor) else type(allowed).__name__
        raise TypeError(f"allowed must be a square bool tensor [T, T], got {what}")
    return _FramePairs(allowed.detach().cpu())  # once, at spec construction: the table is tiny and read on the host


def frame_local() -> MaskSpec:
    """Queries attend to keys of their own frame (dt = 0)."""
    return _TemporalWindow(0, 0, "frame_local")


def temporal_window(before: int, after: int) -> MaskSpec:
    """Queries of frame t attend to keys of frames t - before .. t + after (ints >= 0)."""
    return _TemporalWindow(_check_int("before", before, 0), _check_int("after", after, 0), "temporal_window")


def causal_in_time() -> MaskSpec:
    """Queries of frame t attend to keys of frames <= t (every position; combine with
    ``spatial_window`` for causal + local)."""
    return _TemporalWindow(None, 0, "causal_in_time")


def spatial_window(kh: int, kw: int) -> MaskSpec:
    """Queries at (h, w) attend to keys with |dh| <= kh // 2 and |dw| <= kw // 2, in any frame
    (a sliding window, not clamped at the borders: border queries see fewer keys). kh, kw odd >= 1."""
    for name, value in (("kh", kh), ("kw", kw)):
        _check_int(name, value, 1)
        if value % 2 == 0:
            raise ValueError(f"{name} must be odd (a window centred on the query), got {value}")
    return _SpatialWindow(kh, kw)


def neighborhood(kernel: tuple[int, int, int], *, is_causal: tuple[bool, bool, bool] = (False, False, False)) -> MaskSpec:
    """NATTEN's 3-D neighborhood attention (stride 1, dilation 1), on the layout's full (T, h, w) token grid.

    Per dimension with extent L and kernel K: non-causal, the window is the K positions
    [c - K // 2, c + K // 2 + K % 2 - 1] with centre c = the query clamped to [K // 2, L - 1 - (K // 2 +
    K % 2 - 1)] (so border queries keep K keys, and even K has one more key before than after);
    causal, it is [max(q - K + 1, 0), q]. Rules from SHI-Labs/NATTEN ``src/natten/backends/flex.py``.
    Tokens pruned away from the grid (``VideoLayout.from_keep``) simply are not there; the windows
    stay those of the full grid. Each kernel size must be <= the grid extent (checked by build_plan).
    """
    if not isinstance(kernel, (tuple, list)) or len(kernel) != 3:
        raise TypeError(f"kernel must be a tuple (kt, kh, kw) of 3 ints, got {kernel!r}")
    for name, value in zip(("kt", "kh", "kw"), kernel):
        _check_int(f"kernel {name}", value, 1)
    if not isinstance(is_causal, (tuple, list)) or len(is_causal) != 3 or not all(isinstance(c, bool) for c in is_causal):
        raise TypeError(f"is_causal must be a tuple of 3 bools, got {is_causal!r}")
    return _Neighborhood(tuple(kernel), tuple(is_causal))


def cube_window(cube: tuple[int, int, int], *, radius: tuple[int, int, int] = (0, 0, 0)) -> MaskSpec:
    """Sliding tile attention (STA, Zhang et al. 2025): the grid is cut into cubes of ``cube`` = (ct,
    ch, cw) tokens (the first cube of each dimension starts at 0), and a query attends to the keys of
    every cube within ``radius`` cubes of its own along each dimension (not clamped at the borders:
    border cubes see fewer). ``radius=(0, 0, 0)`` is the block diagonal, every cube with itself: the
    "diagonal" that ``vidtok.build_plan_topk`` unions with its chosen tiles on a cube-ordered layout
    (``VideoLayout.from_grid(..., cube=...)``), where each cube pair is one full tile pair."""
    for name, value in (("cube", cube), ("radius", radius)):
        if not isinstance(value, (tuple, list)) or len(value) != 3:
            raise TypeError(f"{name} must be a tuple (t, h, w) of 3 ints, got {value!r}")
    for name, value in zip(("cube t", "cube h", "cube w"), cube):
        _check_int(name, value, 1)
    for name, value in zip(("radius t", "radius h", "radius w"), radius):
        _check_int(name, value, 0)
    return _CubeWindow(tuple(cube), tuple(radius))


def all_pairs() -> MaskSpec:
    """Every pair of tokens (video and global; padding never attends): dense attention as a spec. Its
    complement ``~all_pairs()`` allows nothing (``build_plan_topk``'s default for ``always``)."""
    return _AllPairs()


def global_tokens() -> MaskSpec:
    """Pairs with a global (register) token: registers attend to every token and every token attends
    to the registers. OR it with a video spec."""
    return _GlobalTokens()

"""Gated residual motion skipping: score how much each patch changed, keep the ones that did, pack
the survivors for varlen attention and scatter them back.

Layout: video ``[B, T, C, H, W]`` (C = 1 luma or 3 RGB; uint8, float32, float16 or bfloat16) in
pixels; patch (ph, pw) and tubelet ts give the token grid (T', h, w) = (T / ts, H / ph, W / pw), with
N = T' h w tokens per clip in (t, h, w) row-major order: flat position ``n = t * h * w + i * w + j``.
(T' counts tubelet slices; it is the token grid's T, named apart from the video's T frames.)

patch_delta, motion_gate and block_match are ``torch.library.custom_op``s in the ``vidtok`` namespace
whose last argument is the backend chosen in Python (``vidtok._backend``, which also says which
backends each op has). pack/unpack are plain PyTorch (a prefix sum, gathers and scatters) around one
custom op for the data-dependent row count; motion_report is a host-side report.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from vidtok import _backend
from vidtok import select as _select
from vidtok._backend import VIDEO_DTYPES
from vidtok._numerics import kept_rank
from vidtok._validation import check_float, check_int, check_no_nan, check_optional_count, check_tensor, check_unit_range
from vidtok.reference import motion as reference

__all__ = ["Gate", "Packed", "block_match", "motion_gate", "motion_report", "pack", "patch_delta", "unpack"]

REDUCES = ("mean_abs", "l2", "max_abs", "rlt")
COMPARE_TO = ("prev", "last_kept")


class Gate(NamedTuple):
    """What ``motion_gate`` decided, every field ``[B, T', h, w]``.

    keep: bool, the patches to encode. delta: fp32, each patch's change from the copy it was compared
    with (+inf on slice 0). run_length: int32, for a kept patch the number of slices it stands
    for (itself and the dropped slices after it at its location), 0 for dropped slots; the run lengths
    of every location sum to T'. carry: int32, for every slot the flat position ``t * h * w + i * w + j``
    (within its clip) of the kept patch that stands for it (a kept slot carries itself). motion: int16
    ``[B, T', h, w, 2]`` (dy, dx) from the motion-compensated gate (``search_radius > 0``), else None.
    """

    keep: torch.Tensor
    delta: torch.Tensor
    run_length: torch.Tensor
    carry: torch.Tensor
    motion: torch.Tensor | None = None


class Packed(NamedTuple):
    """Kept tokens packed back to back in (b, t, h, w) order, the layout of flash-attn's varlen
    functions (``cu_seqlens_q/k``, ``max_seqlen``) and xformers' ``BlockDiagonalMask.from_seqlens``.

    values: ``[K, D]`` (``[capacity, D]`` with a capacity: rows past ``cu_seqlens[-1]`` are zeros).
    cu_seqlens: int32 ``[B + 1]``, row offsets of each clip. index: int32 ``[K]`` (or ``[capacity]``),
    each row's flat position within its clip, -1 on padding rows. max_seqlen: a static upper bound on
    the longest clip, ``min(N, rows)`` (flash-attn only uses it to size its grid, so a bound is valid and
    needs no host sync). shape: the leading shape of the tokens (``(B, N)`` or ``(B, T', h, w)``).

    Row ``cu_seqlens[b] + r`` holds the kept token of rank r in clip b (``vidtok._numerics.kept_rank``,
    the rule ``VideoLayout.from_keep`` orders tokens by), so ``padded()`` lines up with
    ``VideoLayout.from_packed(packed)`` token for token.
    """

    values: torch.Tensor
    cu_seqlens: torch.Tensor
    index: torch.Tensor
    max_seqlen: int
    shape: tuple

    def counts(self) -> torch.Tensor:
        """int64 ``[B]``: kept tokens per clip."""
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()

    def _rows(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(row of values for every (clip, slot) of a [B, length] padding, valid [B, length])."""
        r = torch.arange(length, device=self.values.device)
        valid = r < self.counts()[:, None]
        return torch.where(valid, self.cu_seqlens[:-1, None].long() + r, 0), valid

    def padded(self, length: int | None = None) -> torch.Tensor:
        """``[B, L, D]``: each clip's kept tokens first, in (t, h, w) order, then zeros; L = ``length``
        or the largest kept count (read on the host: one sync). The tensor attention takes beside
        ``VideoLayout.from_packed(self)``; ``unpad`` brings a result back. Differentiable in values."""
        if length is None:
            length = int(self.counts().max()) if self.shape[0] else 0
        check_int("length", length, low=0)
        if self.shape[0] and length < int(self.counts().max()):
            raise ValueError(f"length = {length} is smaller than the largest kept count {int(self.counts().max())}")
        rows, valid = self._rows(length)
        out = self.values[rows]
        return torch.where(valid[..., None], out, torch.zeros((), dtype=out.dtype, device=out.device))

    def unpad(self, y: torch.Tensor) -> Packed:
        """This packing with its values replaced by ``y`` ``[B, L, D']`` laid out as ``padded()``
        (e.g. attention's output): slots past a clip's kept count are ignored. Differentiable in y."""
        if not isinstance(y, torch.Tensor) or y.dim() != 3:
            raise TypeError(f"y must be a torch.Tensor [B, L, D] laid out as Packed.padded(), got {getattr(y, 'shape', type(y).__name__)}")
        B, L, _ = y.shape
        if B != self.shape[0] or (B and L < int(self.counts().max())):
            raise ValueError(f"y [B, L, D] = {tuple(y.shape)} must hold B = {self.shape[0]} clips of at least their kept counts")
        if L == 0:  # no clip kept a token: only padding rows
            return self._replace(values=y.new_zeros(self.values.shape[0], y.shape[-1]))
        row = torch.arange(self.values.shape[0], device=y.device)
        clip = torch.searchsorted(self.cu_seqlens[1:].long(), row, right=True).clamp_max(B - 1)
        slot = row - self.cu_seqlens[clip].long()
        valid = (self.index >= 0) & (slot < L)
        values = y[clip, slot.clamp(0, L - 1)]
        return self._replace(values=torch.where(valid[:, None], values, torch.zeros((), dtype=y.dtype, device=y.device)))


# ---------------------------------------------------------------------------------------------------
# validation


def _check_video(video, patch, tubelet) -> tuple[int, int, int]:
    check_tensor("video", video, rank=5, layout="[B, T, C, H, W]", dtypes=VIDEO_DTYPES)
    B, T, C, H, W = video.shape
    if C not in (1, 3):
        raise ValueError(f"video must have 1 (luma) or 3 (RGB) channels in dim 2 of [B, T, C, H, W], got C = {C} (shape {tuple(video.shape)})")
    if isinstance(patch, int) and not isinstance(patch, bool):
        patch = (patch, patch)
    if not (isinstance(patch, (tuple, list)) and len(patch) == 2):
        raise TypeError(f"patch must be an int or a pair (ph, pw), got {patch!r}")
    ph, pw = patch
    check_int("patch height", ph, low=1, high=max(H, 1))
    check_int("patch width", pw, low=1, high=max(W, 1))
    if H % ph or W % pw:
        raise ValueError(f"video H and W must be multiples of the patch ({ph}, {pw}), got H = {H}, W = {W}")
    check_int("tubelet", tubelet, low=1, high=max(T, 1))
    if T % tubelet:
        raise ValueError(f"video T must be a multiple of the tubelet {tubelet}, got T = {T}")
    return ph, pw, tubelet


def _check_reduce(reduce):
    if reduce not in REDUCES:
        raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")


def _check_float_video(video: torch.Tensor, threshold: float, ph: int, pw: int, ts: int, reduce: str) -> None:
    """Float video is read in [0, 1] (uint8 / 255, as torchvision's float images and motion_report's
    peak 1), the threshold in the same units. A finite threshold that no change in [0, 1] can exceed
    is a unit mix-up (grey levels given for float video), and values outside [0, 1] (or NaN) break
    the contract: both raise rather than silently keep only the forced patches."""
    if not video.is_floating_point():
        return
    elements = (1 if reduce == "rlt" else ts) * video.shape[2] * ph * pw
    largest = math.sqrt(elements) if reduce == "l2" else 1.0
    if math.isfinite(threshold) and threshold >= largest:
        raise ValueError(
            f"threshold = {threshold:g} can never be exceeded: float video is read in [0, 1], where the largest "
            f"{reduce} change of a patch is {largest:g}; pass the threshold in those units (grey levels / 255) "
            f"or uint8 video for grey levels")
    check_unit_range("float video", video, "read as uint8 / 255; rescale it, or pass uint8 video (then the "
                                           "threshold is in grey levels)")


def _choose(op: str, video: torch.Tensor, backend, args: tuple) -> str:
    return _backend.choose(op, video.device, video.dtype, backend, args)


# ---------------------------------------------------------------------------------------------------
# patch_delta


@torch.library.custom_op("vidtok::patch_delta", mutates_args=())
def _patch_delta_op(video: torch.Tensor, ph: int, pw: int, ts: int, reduce: str, backend: str) -> torch.Tensor:
    return _backend.implementation("patch_delta", backend)(video, ph, pw, ts, reduce)


@_patch_delta_op.register_fake
def _(video, ph, pw, ts, reduce, backend):
    B, T, C, H, W = video.shape
    return video.new_empty((B, T // ts, H // ph, W // pw), dtype=torch.float32)


def patch_delta(video: torch.Tensor, patch, *, tubelet: int = 1, reduce: str = "mean_abs", backend: str | None = None) -> torch.Tensor:
    """How much every patch changed since the same patch one tubelet earlier.

    Args:
        video: ``[B, T, C, H, W]``, C = 1 or 3, uint8 (grey levels) or float32/float16/bfloat16, any strides.
        patch: int or (ph, pw); H and W must be multiples of it.
        tubelet: ts frames per slice; T must be a multiple of it.
        reduce: over the ts x C x ph x pw differences of a patch: "mean_abs" (mean |d|), "l2" (the
            Euclidean norm sqrt(sum d^2), as Eventful Transformers' TokenNormThreshold), "max_abs"; or
            "rlt": RLT's published rule (Choudhury et al., NeurIPS 2024; rccchoudhury/rlt
            ``batched_find_idxs_to_keep``): mean |d| between the LAST frame of tubelet k and the FIRST
            frame of tubelet k - 1 over C x ph x pw. (RLT scores ImageNet-normalised video; on uint8
            the score is in grey levels: tau_255 = tau_z x 255 x std.)
        backend: "reference", "triton" or "auto" (default: ``use_backend``/``VIDTOK_BACKEND``, else auto).

    Returns:
        fp32 ``[B, T', h, w]``, T' = T / ts; slice 0 is +inf. uint8 video accumulates in integers and
        rounds once, so every backend returns bit-identical values; float video is differenced in fp32
        (sums agree within fp32 rounding). A NaN pixel gives NaN for "mean_abs", "l2" and "rlt".
        Not differentiable. One read of the video, no host sync.
    """
    ph, pw, ts = _check_video(video, patch, tubelet)
    _check_reduce(reduce)
    chosen = _choose("patch_delta", video, backend, (video, ph, pw, ts, reduce))
    return _patch_delta_op(video, ph, pw, ts, reduce, chosen)


# ---------------------------------------------------------------------------------------------------
# motion_gate


@torch.library.custom_op("vidtok::motion_gate", mutates_args=())
def _motion_gate_op(
    video: torch.Tensor, ph: int, pw: int, threshold: float, compare_to: str, ts: int, reduce: str,
    refresh_every: int, max_run: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backend.implementation("motion_gate", backend)(video, ph, pw, threshold, compare_to, ts, reduce, refresh_every, max_run)


def _gate_fakes(video: torch.Tensor, ph: int, pw: int, ts: int) -> tuple[torch.Tensor, ...]:
    """Empty (keep, delta, run, carry) [B, T', h, w] for the fake impls of both gates."""
    B, T, C, H, W = video.shape
    shape = (B, T // ts, H // ph, W // pw)
    return tuple(video.new_empty(shape, dtype=d) for d in (torch.bool, torch.float32, torch.int32, torch.int32))


@_motion_gate_op.register_fake
def _(video, ph, pw, threshold, compare_to, ts, reduce, refresh_every, max_run, backend):
    return _gate_fakes(video, ph, pw, ts)


@torch.library.custom_op("vidtok::motion_gate_compensated", mutates_args=())
def _motion_gate_compensated_op(
    video: torch.Tensor, ph: int, pw: int, threshold: float, compare_to: str, ts: int, reduce: str,
    refresh_every: int, max_run: int, radius: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gate = _backend.implementation("motion_gate", backend, "motion_gate_compensated")
    return gate(video, ph, pw, threshold, compare_to, ts, reduce, refresh_every, max_run, radius)


@_motion_gate_compensated_op.register_fake
def _(video, ph, pw, threshold, compare_to, ts, reduce, refresh_every, max_run, radius, backend):
    gate = _gate_fakes(video, ph, pw, ts)
    return (*gate, video.new_empty((*gate[0].shape, 2), dtype=torch.int16))


def motion_gate(
    video: torch.Tensor,
    patch,
    threshold: float | None = None,
    *,
    keep: int | None = None,
    keep_ratio: float | None = None,
    compare_to: str | None = None,
    tubelet: int = 1,
    reduce: str = "mean_abs",
    refresh_every: int | None = None,
    max_run: int | None = None,
    search_radius: int = 0,
    backend: str | None = None,
) -> Gate:
    """Decide which patches of a clip to keep: those that changed by more than ``threshold``, or
    exactly ``keep`` of them per clip (the ones that changed most).

    Args:
        video, patch, tubelet, reduce: as in ``patch_delta``. Float video must be in [0, 1] (uint8 / 255);
            values outside it, or NaN, are a ValueError (a device-side assert on GPUs).
        keep, keep_ratio: exact-count mode (pass exactly one of threshold, keep and keep_ratio): every
            clip keeps exactly K patches, known before the video is read, as EVS (Bagrov et al. 2025;
            vLLM ``vllm/multimodal/evs.py``) sizes a prompt. Slice 0 is kept whole (and the slices of
            ``refresh_every``), then the patches of largest delta against the previous slice, ties to
            the lower flat position (t, h, w); K = keep, or max(h*w, int(T' h w keep_ratio)) for
            keep_ratio in (0, 1] (for EVS's pruning rate q, ``keep=vidtok.evs_count(h*w, T', q)``
            reproduces its float rounding). K must cover the forced slices and be at most T' h w.
            compare_to must be "prev" (the default in this mode): under "last_kept" every decision
            changes later deltas, so there is no single ranking to cut; max_run is refused for the
            same reason. Static shapes: the top-K is ``topk_per_frame`` on the clip's deltas.
        threshold: a slice is kept iff its delta > threshold (strict, as RLT), in the units of
            ``reduce``: grey levels for uint8 video, [0, 1] units for float video ("mean_abs",
            "max_abs", "rlt"; "l2" up to sqrt(elements)). A finite threshold that float video can
            never exceed (grey levels passed with float video) is a ValueError. Below 0 keeps every
            patch; +inf keeps only the forced ones.
        compare_to: "prev" compares each slice with the previous slice (RLT, vLLM EVS): a change slower
            than the threshold per slice is never sent. "last_kept" compares with the version of the
            patch that was last kept (Eventful Transformers' TokenGate, Dutson et al. ICCV 2023): unsent
            change accumulates until it crosses the threshold, so nothing drifts away. Default
            (None): "last_kept" with a threshold, "prev" with keep / keep_ratio.
        refresh_every: keep every location at slices 0, n, 2n, ... (bounds staleness; None: never).
        max_run: keep a location when its last kept slice is max_run slices back, so one kept patch
            stands for at most max_run slices (e.g. the size of a length-embedding table; None: no cap).
        search_radius: r > 0 makes the gate motion-compensated (GRT): slice k is compared with every
            block of the slice it is compared with, displaced by |dy|, |dx| <= r pixels (inside the
            frame), and delta is the smallest change; ``Gate.motion`` holds the displacement (see
            ``vidtok.reference.motion.motion_gate_compensated``): (2r + 1)^2 candidate comparisons per
            patch and slice, compute-bound from r ~ 4.
        backend: "reference", "triton" or "auto".

    Returns:
        ``Gate(keep, delta, run_length, carry)``, each ``[B, T', h, w]`` (see ``Gate``). Slice 0 is
        always kept. On uint8 video every backend returns bit-identical masks; on float video a delta
        within fp32 rounding of the threshold may decide differently. Inside ``vidtok.allow_nan()``
        a NaN delta is never above the threshold (dropped unless forced). Not differentiable. Static output shapes, no host sync:
        one fused pass (Triton: one program per patch column walking through time; with
        search_radius, a second kernel that re-reads the candidate blocks of the compared slice).
    """
    ph, pw, ts = _check_video(video, patch, tubelet)
    _check_reduce(reduce)
    if sum(v is not None for v in (threshold, keep, keep_ratio)) != 1:
        raise ValueError("pass exactly one of threshold (keep what changed more), keep (exactly K patches per clip) "
                         "and keep_ratio (exactly max(h*w, int(T' h w keep_ratio)) per clip)")
    counted = threshold is None
    if compare_to is None:
        compare_to = "prev" if counted else "last_kept"
    if compare_to not in COMPARE_TO:
        raise ValueError(f"compare_to must be one of {COMPARE_TO}, got {compare_to!r}")
    refresh_every = check_optional_count("refresh_every", refresh_every)
    max_run = check_optional_count("max_run", max_run)
    check_int("search_radius", search_radius, low=0, high=2**15 - 1)
    if counted:
        return _gate_exact_count(video, ph, pw, ts, reduce, keep, keep_ratio, compare_to, refresh_every, max_run,
                                 search_radius, backend)
    threshold = check_float("threshold", threshold)
    _check_float_video(video, threshold, ph, pw, ts, reduce)
    args = (video, ph, pw, threshold, compare_to, ts, reduce, refresh_every, max_run)
    chosen = _choose("motion_gate", video, backend, args)
    if search_radius > 0:
        return Gate(*_motion_gate_compensated_op(*args, search_radius, chosen))
    return Gate(*_motion_gate_op(*args, chosen))


def _gate_exact_count(video, ph, pw, ts, reduce, keep, keep_ratio, compare_to, refresh_every, max_run, search_radius,
                      backend) -> Gate:
    """motion_gate's exact-count mode (see its docstring)."""
    B, T, _, H, W = video.shape
    Tq, h, w = T // ts, H // ph, W // pw
    N = Tq * h * w
    if compare_to != "prev":
        raise ValueError("keep / keep_ratio need compare_to='prev': under 'last_kept' each kept patch changes the "
                         "deltas of the slices after it, so no single ranking gives exactly K patches")
    if max_run:
        raise ValueError("keep / keep_ratio cannot take max_run (whether a run is capped depends on the decisions "
                         "before it); use refresh_every to force whole slices")
    forced = torch.zeros(Tq, dtype=torch.bool, device=video.device)
    forced[:: refresh_every or max(Tq, 1)] = True  # slice 0, and every refresh_every-th
    forced_count = (len(range(0, Tq, refresh_every)) if refresh_every else min(Tq, 1)) * h * w
    if keep is not None:
        K = check_int("keep", keep, low=0, high=N)
    else:
        ratio = check_float("keep_ratio", keep_ratio)
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {ratio}")
        K = max(h * w, int(N * ratio))
    if K < forced_count:
        raise ValueError(f"keep = {K} patches cannot cover the slices kept whole ({forced_count} = slice 0"
                         f"{' and every refresh_every-th slice' if refresh_every else ''}, {h}x{w} patches each)")
    _check_float_video(video, float("inf"), ph, pw, ts, reduce)
    motion = None
    if search_radius > 0:
        args = (video, ph, pw, float("inf"), "prev", ts, reduce, 0, 0)
        chosen = _choose("motion_gate", video, backend, args)
        _, delta, _, _, motion = _motion_gate_compensated_op(*args, search_radius, chosen)
    else:
        chosen = _choose("patch_delta", video, backend, (video, ph, pw, ts, reduce))
        delta = _patch_delta_op(video, ph, pw, ts, reduce, chosen)
    score = torch.where(forced.view(1, Tq, 1, 1), float("inf"), delta)
    budgets = torch.full((B, 1), K, dtype=torch.int64, device=video.device)
    kept = _select.topk_per_frame(score.reshape(B, 1, N), budgets, capacity=K, backend=backend).keep
    kept = kept.view(B, Tq, h, w)
    carry, run = reference.carry_and_run_length(kept)
    return Gate(kept, delta, run, carry, motion)


# ---------------------------------------------------------------------------------------------------
# block_match


@torch.library.custom_op("vidtok::block_match", mutates_args=())
def _block_match_op(cur: torch.Tensor, ref: torch.Tensor, block: int, radius: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _backend.implementation("block_match", backend)(cur, ref, block, radius)


@_block_match_op.register_fake
def _(cur, ref, block, radius, backend):
    B, H, W = cur.shape
    shape = (B, H // block, W // block)
    return cur.new_empty((*shape, 2), dtype=torch.int16), cur.new_empty(shape, dtype=torch.float32)


def block_match(cur: torch.Tensor, ref: torch.Tensor, *, block: int = 16, radius: int = 8, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exhaustive block-matching motion estimation by the sum of absolute differences.

    Args:
        cur, ref: ``[B, H, W]`` luma frames of one shape, uint8 or float32/float16/bfloat16; H and W
            multiples of ``block``.
        block: block size in pixels, <= 256 (16: one block per 16x16 patch).
        radius: search range: every motion with ``|dy|, |dx| <= radius`` whose displaced block lies
            inside ref is tried ((2 radius + 1)^2 candidates).
        backend: "reference", "triton" (blocks of at most 4096 pixels), "cuda" or "auto" (on CUDA
            tensors: cuda, then triton, then reference). The CUDA C++ kernel (csrc/motion.cu) stages
            each block's (block + 2 radius)^2 search window in shared memory, at most
            ``vidtok.csrc.motion.SHARED_LIMIT`` (48 KiB - 1280) bytes per thread block
            (``vidtok.csrc.motion.shared_bytes``): block 16 reaches radius 45 (float types) or 100
            (uint8), block 8 radius 49 or 104, block 64 radius 11 or 71. Past that "auto" falls back
            to Triton and a forced "cuda" raises ``BackendUnavailableError`` saying why.

    Returns:
        ``(motion, cost)``: motion int16 ``[B, h, w, 2]`` as (dy, dx), meaning block (i, j) of cur best
        matches the ref block at ``(i*block + dy, j*block + dx)``; cost fp32 ``[B, h, w]``, its SAD
        (exact integers for uint8). Ties prefer the smaller motion |dy| + |dx|, then the lower candidate
        index (row-major over (dy, dx) from (-radius, -radius)). uint8 frames give bit-identical
        results on every backend; float SADs agree within fp32 rounding (near-ties may pick another
        motion). NaN in float frames is a ValueError; inside ``vidtok.allow_nan()`` a NaN SAD never
        wins, except that a block whose zero-motion SAD is NaN gets motion 0 and cost NaN. Not
        differentiable; no host sync (the NaN check is a device-side assert on GPUs).
    """
    for name, t in (("cur", cur), ("ref", ref)):
        check_tensor(name, t, rank=3, layout="[B, H, W]", dtypes=VIDEO_DTYPES)
    if cur.shape != ref.shape or cur.dtype != ref.dtype or cur.device != ref.device:
        raise ValueError(
            f"cur and ref must have one shape, dtype and device, got {tuple(cur.shape)} {cur.dtype} {cur.device} "
            f"and {tuple(ref.shape)} {ref.dtype} {ref.device}"
        )
    B, H, W = cur.shape
    check_int("block", block, low=1, high=256, why=" (uint8 SADs stay exact in fp32 below 255 * 256^2 < 2^24)")
    if H % block or W % block:
        raise ValueError(f"H and W must be multiples of block = {block}, got H = {H}, W = {W}")
    check_int("radius", radius, low=0, high=2**15 - 1)
    check_no_nan("block_match", "cur", cur)
    check_no_nan("block_match", "ref", ref)
    chosen = _choose("block_match", cur, backend, (cur, ref, block, radius))
    return _block_match_op(cur, ref, block, radius, chosen)


# ---------------------------------------------------------------------------------------------------
# pack / unpack


@torch.library.custom_op("vidtok::pack_rows", mutates_args=())
def _pack_rows_op(keep: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, N = keep.shape
    rank, counts = kept_rank(keep)
    cu_seqlens = torch.zeros(B + 1, dtype=torch.int32, device=keep.device)
    cu_seqlens[1:] = counts.cumsum(0)
    total = cu_seqlens[-1]
    if capacity < 0:
        rows = int(total)  # the output size is the kept count: one host sync, unavoidable
    else:
        rows = capacity
        if keep.device.type == "cpu":
            if int(total) > capacity:
                raise ValueError(f"capacity = {capacity} is smaller than the kept count {int(total)}")
        else:
            # no host sync: a device-side assert fails the stream (and later CUDA calls) instead
            torch._assert_async(total <= capacity, "vidtok.pack: capacity is smaller than the kept count")
    # the row of a kept token: its clip's offset plus its rank in the clip (never nonzero, which syncs)
    pos = (cu_seqlens[:-1, None].long() + rank).reshape(-1)
    dest = torch.where((rank.reshape(-1) >= 0) & (pos < rows), pos, rows)  # dropped tokens go to a scratch row
    flat = torch.full((rows + 1,), -1, dtype=torch.int64, device=keep.device)
    flat.scatter_(0, dest, torch.arange(B * N, device=keep.device))
    return flat[:rows].clone(), cu_seqlens


@_pack_rows_op.register_fake
def _(keep, capacity):
    B, N = keep.shape
    rows = torch.library.get_ctx().new_dynamic_size() if capacity < 0 else capacity
    return keep.new_empty((rows,), dtype=torch.int64), keep.new_empty((B + 1,), dtype=torch.int32)


def _leading(tokens: torch.Tensor, keep: torch.Tensor) -> tuple[int, int]:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor [B, N, D] or [B, T', h, w, D], got {type(tokens).__name__}")
    if not isinstance(keep, torch.Tensor):
        raise TypeError(f"keep must be a bool torch.Tensor, got {type(keep).__name__}")
    if tokens.dim() not in (3, 5):
        raise ValueError(f"tokens must be [B, N, D] or [B, T', h, w, D], got shape {tuple(tokens.shape)}")
    if keep.dtype != torch.bool:
        raise TypeError(f"keep must be bool, got {str(keep.dtype).replace('torch.', '')}")
    if tuple(keep.shape) != tuple(tokens.shape[:-1]):
        raise ValueError(f"keep must have the tokens' leading shape {tuple(tokens.shape[:-1])}, got {tuple(keep.shape)}")
    if keep.device != tokens.device:
        raise ValueError(f"tokens and keep must be on one device, got tokens on {tokens.device}, keep on {keep.device}")
    return tokens.shape[0], math.prod(tokens.shape[1:-1])


def pack(tokens: torch.Tensor, keep: torch.Tensor, *, capacity: int | None = None) -> Packed:
    """Pack the kept tokens of every clip back to back for varlen attention.

    Args:
        tokens: ``[B, N, D]`` or ``[B, T', h, w, D]``, any dtype, in (t, h, w) order.
        keep: bool of the tokens' leading shape (e.g. ``Gate.keep``).
        capacity: rows of the result. None: exactly the kept count K (a data-dependent size: one host
            sync, and ``torch.compile`` sees an unbacked size). An int: static shapes and no host sync
            on GPUs; rows past the kept count are zeros with index -1. A capacity smaller than the
            kept count is an error, never a truncation: a ``ValueError`` on CPU tensors, and on CUDA
            tensors a device-side assert (``torch._assert_async``), which fails the CUDA stream
            asynchronously rather than synchronising to raise.

    Returns:
        ``Packed(values, cu_seqlens, index, max_seqlen, shape)``; rows in (b, t, h, w) order. Rows are
        found with a prefix sum over keep, not ``nonzero``. Differentiable in tokens (the gradient of
        a dropped token is 0).
    """
    B, N = _leading(tokens, keep)
    if capacity is not None:
        check_int("capacity", capacity, low=0, high=2**62)
    D = tokens.shape[-1]
    flat, cu_seqlens = _pack_rows_op(keep.reshape(B, N), -1 if capacity is None else capacity)
    valid = flat >= 0
    values = tokens.reshape(B * N, D).index_select(0, flat.clamp_min(0))
    if capacity is not None:  # zero the padding rows (without a capacity every row is a kept token)
        values = torch.where(valid[:, None], values, torch.zeros((), dtype=values.dtype, device=values.device))
    index = torch.where(valid, flat % max(N, 1), -1).to(torch.int32)
    rows = N if capacity is None else min(N, capacity)
    return Packed(values, cu_seqlens, index, rows, tuple(keep.shape))


def unpack(packed: Packed, *, fill: str = "carry", gate: Gate | None = None) -> torch.Tensor:
    """Scatter packed tokens back to the dense layout ``[*packed.shape, D]``.

    Args:
        packed: from ``pack`` (``values`` may have been transformed, e.g. by attention, keeping rows).
        fill: what a dropped slot gets: "carry" copies the kept token that stands for it (the last kept
            token at its location, copy-forward as RLT/Eventful buffers); "zero" leaves zeros.
        gate: the ``Gate`` whose keep was packed: its ``carry`` gives the (t, h, w) structure when the
            tokens were packed flat as ``[B, N, D]``. Not needed for ``[B, T', h, w, D]`` tokens.

    Returns:
        ``[*packed.shape, D]`` in values' dtype. A slot with no kept token before it at its location
        gets zeros under "carry". Differentiable in ``packed.values`` (under "carry" the gradient of a
        kept token sums over the slots it stands for, through index_select's backward, which uses
        atomic adds on CUDA: not bit-deterministic there).
    """
    if not isinstance(packed, Packed):
        raise TypeError(f"packed must be a vidtok.Packed (from vidtok.pack), got {type(packed).__name__}")
    if fill not in ("carry", "zero"):
        raise ValueError(f"fill must be 'carry' or 'zero', got {fill!r}")
    values, cu_seqlens, index, _, shape = packed
    B, N = shape[0], math.prod(shape[1:])
    rows = values.shape[0]
    device = values.device
    # batch of each row: the clip whose [cu_seqlens[b], cu_seqlens[b + 1]) holds it
    batch = torch.searchsorted(cu_seqlens[1:].to(torch.int64), torch.arange(rows, device=device), right=True)
    valid = index >= 0
    slot = torch.where(valid, batch * N + index.to(torch.int64), B * N)
    row_of = torch.full((B * N + 1,), -1, dtype=torch.int64, device=device)
    row_of = row_of.scatter(0, slot, torch.arange(rows, device=device))[: B * N].view(B, N)
    if fill == "carry":
        if gate is not None:
            if not isinstance(gate, Gate):
                raise TypeError(f"gate must be a vidtok.Gate, got {type(gate).__name__}")
            if gate.carry.shape[0] != B or gate.carry[0].numel() != N:
                raise ValueError(f"gate is for {tuple(gate.carry.shape)} slots, but packed holds {tuple(shape)}")
            carry = gate.carry.reshape(B, N).to(torch.int64)
        elif len(shape) == 4:
            carry = reference.carry_and_run_length((row_of >= 0).view(shape))[0].reshape(B, N).to(torch.int64)
        else:
            raise ValueError("fill='carry' needs the (t, h, w) structure: pack [B, T', h, w, D] tokens or pass gate=")
        row_of = torch.where(carry >= 0, row_of.gather(1, carry.clamp_min(0)), -1)
    out = values.index_select(0, row_of.reshape(-1).clamp_min(0))
    out = torch.where((row_of.reshape(-1) >= 0)[:, None], out, torch.zeros((), dtype=values.dtype, device=device))
    return out.view(*shape, values.shape[-1])


# ---------------------------------------------------------------------------------------------------
# motion_report

PSNR_CAP_DB = 100.0  # a frame rebuilt exactly would have infinite PSNR; reported as this cap


def motion_report(video: torch.Tensor, gate: Gate, *, fps: float | None = None) -> dict:
    """How much a gate saves and what it costs in quality on ``video`` (research note section 10.6).

    Args:
        video: the ``[B, T, C, H, W]`` clip the gate was computed on (uint8: peak 255; float: peak 1).
        gate: its ``Gate``; patch and tubelet are read off the shapes.
        fps: frames per second of the video, for ``kept_per_second``.

    Returns a dict of Python numbers (computing them syncs the host; this is a report, not a hot path):
        keep_fraction: kept patches / all patches; keep_fraction_min / keep_fraction_max: over the
        slices of every clip; kept_per_second: kept patches per second of video per clip (None without
        fps); mean_run_length: slices a kept patch stands for, on average; max_staleness: the most
        slices any slot lies after the kept patch that stands for it; psnr_mean / psnr_min: PSNR (dB)
        of the rebuilt video over the frames after the first slice: of their mean squared error, and
        of the worst frame (capped at PSNR_CAP_DB for exact rebuilds; None when T' = 1). The rebuilt video copies each patch
        from the kept patch that stands for it, displaced by ``gate.motion`` when the gate is
        motion-compensated (exactly the block a "last_kept" gate compared it with).
    """
    check_tensor("video", video, rank=5, layout="[B, T, C, H, W]", dtypes=VIDEO_DTYPES)
    if not isinstance(gate, Gate):
        raise TypeError(f"gate must be a vidtok.Gate (from vidtok.motion_gate), got {type(gate).__name__}")
    B, T, C, H, W = video.shape
    if gate.keep.dim() != 4 or gate.keep.shape[0] != B or any(
        n == 0 or size % n for size, n in zip((T, H, W), gate.keep.shape[1:])
    ):
        raise ValueError(f"gate is [B, T', h, w] = {tuple(gate.keep.shape)}, which does not tile video {tuple(video.shape)}")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    keep = gate.keep
    Tq, h, w = keep.shape[1:]
    ts = T // Tq
    per_slice = keep.sum((2, 3))  # [B, T'] kept counts
    kept = int(keep.sum())
    t = torch.arange(Tq, device=keep.device).view(1, Tq, 1, 1)
    staleness = t - gate.carry.long() // (h * w)
    report = {
        "keep_fraction": kept / max(keep.numel(), 1),
        "keep_fraction_min": int(per_slice.min()) / (h * w),
        "keep_fraction_max": int(per_slice.max()) / (h * w),
        "kept_per_second": None if fps is None else kept / B / (T / fps),
        "mean_run_length": int(gate.run_length.sum()) / max(kept, 1),
        "max_staleness": int(staleness.max().item()),
        "psnr_mean": None,
        "psnr_min": None,
    }
    if Tq > 1:
        peak = 255.0 if video.dtype == torch.uint8 else 1.0
        rebuilt = reference.rebuild(video, keep, gate.carry, gate.motion)
        mse = (rebuilt - video.to(torch.float32)).square().mean((2, 3, 4))[:, ts:]  # [B, T - ts] frames
        psnr = (10 * torch.log10(peak**2 / mse)).clamp(max=PSNR_CAP_DB)
        # the clip's PSNR (of the mean squared error): a mean of per-frame dB would let a few exact
        # frames (capped at 100 dB) hide bad ones, as in uniform-in-time keeping
        report["psnr_mean"] = (10 * torch.log10(peak**2 / mse.mean())).clamp(max=PSNR_CAP_DB).item()
        report["psnr_min"] = psnr.min().item()
    return report

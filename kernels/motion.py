"""Triton kernels for gated residual motion skipping (vidtok.patch_delta, vidtok.motion_gate and
vidtok.block_match).

One program owns one patch column (b, i, j) and walks through the T' slices of the clip. A patch is
held as a 2-D tile of rows x PW pixels: row r is (frame in tubelet, channel, pixel row) = r in
row-major order, and the PW pixels of a row are contiguous in a video with unit column stride. PW
is a compile-time constant (one specialisation per patch width), so each row is read with vector
loads as wide as its alignment allows: 16 bytes per load (16 uint8 or 4 fp32 pixels) when the row's
bytes and the frame's strides are multiples of 16 (Triton specialises a stride divisible by 16 at
launch): uint8 or fp32 patches 16 wide in frames 224 wide; uint8 width 8 reads 8 bytes per load,
width 14 two. The per-row index arithmetic (divisions by C and ph) runs once, before the walk.

The walk is software-pipelined: slice k + 1 is loaded (its address does not depend on any decision)
while slice k is reduced to a delta and decided, so every program keeps two slices of loads in
flight. Per slice the program writes keep, delta, carry and (for the previous kept slice, once the
next one is known) run_length. The clip is read from HBM once; every output element is written
exactly once by one program (no atomics).

uint8 video is differenced and summed in int32 (exact: |d| <= 255 and d^2 * 4096 < 2^31) and turned
into fp32 with correctly rounded operations (int -> fp32, div_rn, sqrt_rn), exactly as the reference
does, so deltas and masks are bit-identical to vidtok.reference.motion. Float video is differenced
in fp32; its sums follow the tile's order (within fp32 rounding of the reference).

The motion-compensated gate (search_radius > 0) is a second kernel with the same walk: per slice it
scans the (2r + 1)^2 displaced blocks of the reference slice, re-read from the video (they overlap,
so L1/L2 serve most of them; their column offsets are arbitrary, so they are byte-aligned loads)
instead of one reference tile in registers, keeping the best in scalars.

Warps: in the gate a thread holds 32 uint8 pixels of a tile (two 16-byte vectors) or 16 wider
elements (see gate_per_thread), so a 16x16 RGB uint8 patch is one warp and its reductions need no
barrier. Resources from `python -m vidtok aot`; instruction counts and predictions in bench/NOTES.md
(motion section).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import TRITON_DTYPES, AotCase, on_tensor_device

INF = tl.constexpr(float("inf"))
# A patch of at most MAX_ELEMENTS pixels (ts x C x ph x pw, or C x ph x pw for RLT's rule) lives in one
# register tile of BLOCK_R x BLOCK_W elements, both powers of two (BLOCK_R >= its ts x C x ph rows,
# BLOCK_W >= pw; at most 2 x MAX_ELEMENTS). 16x16 RGB patches use 64 x 16, 14x14 RGB 64 x 16, 32x32 RGB
# 128 x 32.
MAX_ELEMENTS = 4096
# reduce name -> the kernels' REDUCE ("rlt" is a mean |d| over other frames)
REDUCE_CODES = {"mean_abs": 0, "l2": 1, "max_abs": 2, "rlt": 0}
# Patch widths of the ahead-of-time table: the ViT/CLIP/SigLIP patch embeddings (14, 16, 32) and 8.
# Any other width compiles its own specialisation the first time it is used (Triton's JIT).
AOT_WIDTHS = (8, 14, 16, 32)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def patch_rows(C: int, ph: int, ts: int, reduce: str) -> int:
    """Rows of one patch tile: ts x C x ph (C x ph for RLT's rule, which reads one frame per side)."""
    return (1 if reduce == "rlt" else ts) * C * ph


def tile_shape(rows: int, cols: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_W): the register tile of a rows x cols patch."""
    return _pow2(rows), _pow2(cols)


def num_warps(tile: tuple[int, int], per_thread: int) -> int:
    """Warps for a tile whose threads hold <= per_thread of its elements each, 1 to 16."""
    return max(1, min(16, tile[0] * tile[1] // (32 * per_thread)))


def gate_per_thread(dtype: torch.dtype) -> int:
    """Elements of a patch tile per thread in the gate. uint8 is bound by instruction issue, not
    bandwidth (~5 instructions per pixel against 1 byte moved): 32 pixels (two 16-byte vectors) per
    thread spread the per-slice work (reduction tail, decision, stores) over more pixels. Wider dtypes
    are bound by bandwidth: 16 elements per thread keep registers near 80, so more programs (and their
    loads) fit on an SM."""
    return 32 if dtype == torch.uint8 else 16


# The candidate searches (compensated gate, block_match): byte-aligned candidate loads, one register and
# one address per element.
SEARCH_PER_THREAD = 8


def _tile_reasons(rows: int, cols: int, what: str) -> list[str]:
    if rows * cols > MAX_ELEMENTS:
        return [f"the Triton kernel holds a {what} in registers: at most {MAX_ELEMENTS} elements, got {rows * cols}"]
    return []


def patch_delta_reasons(video, ph, pw, ts, reduce) -> list[str]:
    return _tile_reasons(patch_rows(video.shape[2], ph, ts, reduce), pw, "patch")


def motion_gate_reasons(video, ph, pw, threshold, compare_to, ts, reduce, refresh_every, max_run) -> list[str]:
    return _tile_reasons(patch_rows(video.shape[2], ph, ts, reduce), pw, "patch")


def block_match_reasons(cur, ref, block, radius) -> list[str]:
    return _tile_reasons(block, block, "block")


@triton.jit
def _patch_tile(x_ptr, b, i, j, C, ph, rows, s_b, s_t, s_c, s_h, s_w,
                PW: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    """(pointers [BLOCK_R, BLOCK_W] to patch (i, j) of video b in its first frame, their mask): row r
    is (frame in tubelet, channel, pixel row) = r in row-major order; column x the pixel column."""
    r = tl.arange(0, BLOCK_R)
    x = tl.arange(0, BLOCK_W)
    f = r // (C * ph)
    c = (r // ph) % C
    y = r % ph
    row = f.to(tl.int64) * s_t + c.to(tl.int64) * s_c + y.to(tl.int64) * s_h
    corner = b.to(tl.int64) * s_b + (i * ph).to(tl.int64) * s_h + (j * PW).to(tl.int64) * s_w
    ptrs = x_ptr + corner + row[:, None] + x.to(tl.int64)[None, :] * s_w
    mask = (r < rows)[:, None] & (x < PW)[None, :]
    return ptrs, mask


@triton.jit
def _widen(a, IS_INT: tl.constexpr):
    """int32 for uint8 (differences and sums of them stay exact), else fp32. Pixels are widened once
    per load: differencing raw bytes makes LLVM repack them into 16-bit pairs for every use."""
    if IS_INT:
        return a.to(tl.int32)
    else:
        return a.to(tl.float32)




@triton.jit
def _reduce_delta(ad, REDUCE: tl.constexpr, count):
    """A patch's change from its absolute differences ad [rows, cols] (int32 for uint8 video: exact),
    correctly rounded to fp32 as the reference does: 1 l2, 2 max_abs, else mean_abs."""
    if REDUCE == 1:
        delta = tl.sqrt_rn(tl.sum(tl.sum(ad * ad, axis=1), axis=0).to(tl.float32))
    elif REDUCE == 2:
        delta = tl.max(tl.max(ad, axis=1), axis=0).to(tl.float32)
    else:
        delta = tl.div_rn(tl.sum(tl.sum(ad, axis=1), axis=0).to(tl.float32), count)
    return delta


@triton.jit
def _decide_and_store(delta, k, last, out, hw, spatial, threshold, refresh_every, max_run,
                      keep_ptr, delta_ptr, run_ptr, carry_ptr):
    """Both gate kernels: keep slice k at this location (forced: the first slice, refresh_every,
    max_run; else delta > threshold), store delta, keep, run_length and carry; return (keep, last
    kept slice)."""
    forced = k == 0
    forced = forced | ((refresh_every > 0) & (k % tl.maximum(refresh_every, 1) == 0))
    forced = forced | ((max_run > 0) & (k - last >= max_run))
    keep = forced | (delta > threshold)
    o = out + k * hw
    tl.store(delta_ptr + o, delta)
    tl.store(keep_ptr + o, keep.to(tl.int8))
    # run length: 0 for a dropped slot now; for a kept one once the next kept slice is known
    tl.store(run_ptr + o, 0, mask=keep == 0)
    tl.store(run_ptr + out + last * hw, k - last, mask=keep & (k > 0))
    last = tl.where(keep, k, last)
    tl.store(carry_ptr + o, last * hw + spatial)
    return keep, last


@triton.jit
def _motion_gate_kernel(
    x_ptr, keep_ptr, delta_ptr, run_ptr, carry_ptr,
    Tq, h, w, ts, C, ph, rows,
    s_b, s_t, s_c, s_h, s_w,
    threshold, refresh_every, max_run, last_kept,
    REDUCE: tl.constexpr, RLT: tl.constexpr, IS_INT: tl.constexpr, PW: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    pid = tl.program_id(0)  # b * h * w + i * w + j
    hw = h * w
    b = pid // hw
    spatial = pid % hw
    i = spatial // w
    j = spatial % w

    first, mask = _patch_tile(x_ptr, b, i, j, C, ph, rows, s_b, s_t, s_c, s_h, s_w, PW, BLOCK_R, BLOCK_W)
    # (tl.cast: an integer argument equal to 1 arrives as a constant, which has no .to)
    step = tl.cast(ts, tl.int64) * s_t  # from one slice to the next
    count = tl.cast(rows * PW, tl.float32)
    # What slice k shows: its tubelet; in RLT's rule the LAST frame of tubelet k, compared with the
    # FIRST frame of tubelet k - 1 (what slice k leaves as the reference).
    if RLT:
        shown = first + tl.cast(ts - 1, tl.int64) * s_t
    else:
        shown = first

    # Software pipelining: the loads of slice k + 1 are issued before slice k is reduced and decided
    # (the last slice re-reads itself: an L1 hit, no branch).
    nxt = tl.load(shown, mask=mask, other=0)
    if RLT:
        nxt_first = tl.load(first, mask=mask, other=0)
    ref = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.int32 if IS_INT else tl.float32)
    last = 0
    out = b.to(tl.int64) * Tq * hw + spatial
    for k in range(0, Tq):
        cur = nxt
        ahead = tl.minimum(k + 1, Tq - 1).to(tl.int64) * step
        nxt = tl.load(shown + ahead, mask=mask, other=0)
        if RLT:
            cand = nxt_first
            nxt_first = tl.load(first + ahead, mask=mask, other=0)
        else:
            cand = cur

        delta = _reduce_delta(tl.abs(_widen(cur, IS_INT) - ref), REDUCE, count)
        delta = tl.where(k == 0, INF, delta)
        keep, last = _decide_and_store(delta, k, last, out, hw, spatial, threshold, refresh_every, max_run,
                                       keep_ptr, delta_ptr, run_ptr, carry_ptr)
        ref = tl.where(keep | (last_kept == 0), _widen(cand, IS_INT), ref)
    tl.store(run_ptr + out + last * hw, Tq - last)


@triton.jit
def _motion_gate_mc_kernel(
    x_ptr, keep_ptr, delta_ptr, run_ptr, carry_ptr, motion_ptr,
    Tq, h, w, ts, C, ph, rows, H, W,
    s_b, s_t, s_c, s_h, s_w,
    threshold, refresh_every, max_run, last_kept, rlt, radius,
    REDUCE: tl.constexpr, IS_INT: tl.constexpr, PW: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    # As _motion_gate_kernel, but slice k is compared with every block of its reference slice (the
    # previous one, or the last kept one at this location) displaced by |dy|, |dx| <= radius and
    # inside the frame; the smallest delta decides. The reference is re-read from the video (L1/L2
    # hits: the (2r + 1)^2 candidate blocks overlap), not held in registers.
    pid = tl.program_id(0)
    hw = h * w
    b = pid // hw
    spatial = pid % hw
    i = spatial // w
    j = spatial % w
    first, mask = _patch_tile(x_ptr, b, i, j, C, ph, rows, s_b, s_t, s_c, s_h, s_w, PW, BLOCK_R, BLOCK_W)
    # (a scalar condition joins the mask as a row vector: the interpreter rejects scalar-and-vector masks)
    zero_rows = tl.zeros([BLOCK_R], dtype=tl.int32)
    y0 = i * ph
    x0 = j * PW
    step = tl.cast(ts, tl.int64) * s_t
    shown = first + tl.cast(tl.where(rlt != 0, ts - 1, 0), tl.int64) * s_t  # RLT: the last frame of the tubelet
    count = tl.cast(rows * PW, tl.float32)

    nxt = tl.load(shown, mask=mask, other=0)  # software-pipelined as in _motion_gate_kernel
    last = 0
    out = b.to(tl.int64) * Tq * hw + spatial
    for k in range(0, Tq):
        cur = _widen(nxt, IS_INT)
        nxt = tl.load(shown + tl.minimum(k + 1, Tq - 1).to(tl.int64) * step, mask=mask, other=0)
        src = tl.where(last_kept != 0, last, tl.maximum(k - 1, 0))
        src_tile = first + src.to(tl.int64) * step
        best = INF
        best_l1 = 4 * radius + 1
        best_dy = 0
        best_dx = 0
        d00 = 0.0
        for dy in range(-radius, radius + 1):
            for dx in range(-radius, radius + 1):
                inside = (y0 + dy >= 0) & (y0 + dy + ph <= H) & (x0 + dx >= 0) & (x0 + dx + PW <= W)
                inside_rows = (zero_rows + inside.to(tl.int32)) != 0
                cand = tl.load(src_tile + dy * s_h + dx * s_w, mask=mask & inside_rows[:, None], other=0)
                dc = _reduce_delta(tl.abs(cur - _widen(cand, IS_INT)), REDUCE, count)
                l1 = tl.abs(dy) + tl.abs(dx)
                # candidates run row-major, so on equal delta and |m| the earlier (lower index) stays
                better = inside & ((dc < best) | ((dc == best) & (l1 < best_l1)))
                best = tl.where(better, dc, best)
                best_l1 = tl.where(better, l1, best_l1)
                best_dy = tl.where(better, dy, best_dy)
                best_dx = tl.where(better, dx, best_dx)
                d00 = tl.where((dy == 0) & (dx == 0), dc, d00)
        # a NaN zero-motion delta stays NaN with motion 0 (NaN never compares below anything)
        nan00 = d00 != d00
        delta = tl.where(nan00, d00, best)
        best_dy = tl.where(nan00 | (k == 0), 0, best_dy)
        best_dx = tl.where(nan00 | (k == 0), 0, best_dx)
        delta = tl.where(k == 0, INF, delta)
        o = out + k * hw
        tl.store(motion_ptr + 2 * o, best_dy.to(tl.int16))
        tl.store(motion_ptr + 2 * o + 1, best_dx.to(tl.int16))
        keep, last = _decide_and_store(delta, k, last, out, hw, spatial, threshold, refresh_every, max_run,
                                       keep_ptr, delta_ptr, run_ptr, carry_ptr)
    tl.store(run_ptr + out + last * hw, Tq - last)


def _gate_launch(video: torch.Tensor, ph: int, pw: int, ts: int, reduce: str):
    """What both gate launchers share: (T', h, w, rows per patch tile, the launch's compile-time
    arguments, the outputs keep int8, delta fp32, run int32, carry int32, each [B, T', h, w])."""
    B, T, C, H, W = video.shape
    Tq, h, w = T // ts, H // ph, W // pw
    rows = patch_rows(C, ph, ts, reduce)
    block_r, block_w = tile = tile_shape(rows, pw)
    meta = dict(REDUCE=REDUCE_CODES[reduce], IS_INT=video.dtype == torch.uint8, PW=pw, BLOCK_R=block_r, BLOCK_W=block_w)
    shape = (B, Tq, h, w)
    outputs = tuple(torch.empty(shape, device=video.device, dtype=d) for d in (torch.int8, torch.float32, torch.int32, torch.int32))
    return Tq, h, w, rows, tile, meta, outputs


@on_tensor_device
def motion_gate_compensated(
    video: torch.Tensor, ph: int, pw: int, threshold: float, compare_to: str, ts: int, reduce: str,
    refresh_every: int, max_run: int, radius: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``motion_gate`` plus motion int16 ``[B, T', h, w, 2]``; semantics:
    vidtok.reference.motion.motion_gate_compensated."""
    B, T, C, H, W = video.shape
    Tq, h, w, rows, tile, meta, (keep, delta, run, carry) = _gate_launch(video, ph, pw, ts, reduce)
    motion = torch.empty((B, Tq, h, w, 2), device=video.device, dtype=torch.int16)
    if keep.numel() > 0:
        _motion_gate_mc_kernel[(B * h * w,)](
            video, keep, delta, run, carry, motion,
            Tq, h, w, ts, C, ph, rows, H, W, *video.stride(),
            float(threshold), refresh_every, max_run, int(compare_to == "last_kept"), int(reduce == "rlt"), radius,
            **meta, num_warps=num_warps(tile, SEARCH_PER_THREAD),
        )
    return keep.view(torch.bool), delta, run, carry, motion


@on_tensor_device
def motion_gate(
    video: torch.Tensor, ph: int, pw: int, threshold: float, compare_to: str, ts: int, reduce: str,
    refresh_every: int, max_run: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keep bool, delta fp32, run_length int32, carry int32) ``[B, T', h, w]``; video
    ``[B, T, C, H, W]`` uint8/fp32/fp16/bf16, any strides. Semantics: vidtok.reference.motion."""
    B, T, C, H, W = video.shape
    Tq, h, w, rows, tile, meta, (keep, delta, run, carry) = _gate_launch(video, ph, pw, ts, reduce)
    if keep.numel() > 0:
        _motion_gate_kernel[(B * h * w,)](
            video, keep, delta, run, carry,
            Tq, h, w, ts, C, ph, rows, *video.stride(),
            float(threshold), refresh_every, max_run, int(compare_to == "last_kept"),
            RLT=reduce == "rlt", **meta, num_warps=num_warps(tile, gate_per_thread(video.dtype)),
        )
    return keep.view(torch.bool), delta, run, carry


@triton.jit
def _block_match_kernel(
    cur_ptr, ref_ptr, motion_ptr, cost_ptr,
    h, w, H, W, radius,
    c_b, c_h, c_w, r_b, r_h, r_w,
    IS_INT: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # One program per block (b, i, j): the cur block stays in registers as a BLOCK_P x BLOCK_P tile
    # while the (2r + 1)^2 candidate blocks of ref are streamed (they overlap: L1/L2 serve most
    # loads). Exhaustive, row-major over (dy, dx); ties prefer the smaller |dy| + |dx|, then the
    # earlier candidate.
    pid = tl.program_id(0)
    hw = h * w
    b = pid // hw
    i = (pid % hw) // w
    j = pid % w
    y = tl.arange(0, BLOCK_P)
    x = tl.arange(0, BLOCK_P)
    mask = (y < BLOCK)[:, None] & (x < BLOCK)[None, :]
    zero_rows = tl.zeros([BLOCK_P], dtype=tl.int32)
    y0 = i * BLOCK
    x0 = j * BLOCK
    cur = _widen(tl.load(cur_ptr + b.to(tl.int64) * c_b + (y0 + y).to(tl.int64)[:, None] * c_h
                         + (x0 + x).to(tl.int64)[None, :] * c_w, mask=mask, other=0), IS_INT)
    ref_tile = ref_ptr + b.to(tl.int64) * r_b + (y0 + y).to(tl.int64)[:, None] * r_h + (x0 + x).to(tl.int64)[None, :] * r_w
    best = INF
    best_l1 = 4 * radius + 1
    best_dy = 0
    best_dx = 0
    c00 = 0.0
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            inside = (y0 + dy >= 0) & (y0 + dy + BLOCK <= H) & (x0 + dx >= 0) & (x0 + dx + BLOCK <= W)
            inside_rows = (zero_rows + inside.to(tl.int32)) != 0
            cand = tl.load(ref_tile + dy * r_h + dx * r_w, mask=mask & inside_rows[:, None], other=0)
            # uint8: an exact int32 sum, then one correctly rounded conversion
            sad = tl.sum(tl.sum(tl.abs(cur - _widen(cand, IS_INT)), axis=1), axis=0).to(tl.float32)
            l1 = tl.abs(dy) + tl.abs(dx)
            better = inside & ((sad < best) | ((sad == best) & (l1 < best_l1)))
            best = tl.where(better, sad, best)
            best_l1 = tl.where(better, l1, best_l1)
            best_dy = tl.where(better, dy, best_dy)
            best_dx = tl.where(better, dx, best_dx)
            c00 = tl.where((dy == 0) & (dx == 0), sad, c00)
    nan00 = c00 != c00  # a NaN zero-motion SAD stays NaN with motion 0, as the reference
    tl.store(cost_ptr + pid, tl.where(nan00, c00, best))
    tl.store(motion_ptr + 2 * pid, tl.where(nan00, 0, best_dy).to(tl.int16))
    tl.store(motion_ptr + 2 * pid + 1, tl.where(nan00, 0, best_dx).to(tl.int16))


def patch_delta(video: torch.Tensor, ph: int, pw: int, ts: int, reduce: str) -> torch.Tensor:
    """delta fp32 ``[B, T', h, w]``. The gate kernel in "prev" mode computes exactly these deltas; its
    other outputs (13 bytes per patch, against >= 256 bytes of video read per patch) are dropped
    rather than a second kernel kept."""
    return motion_gate(video, ph, pw, float("inf"), "prev", ts, reduce, 0, 0)[1]


@on_tensor_device
def block_match(cur: torch.Tensor, ref: torch.Tensor, block: int, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """motion int16 ``[B, h, w, 2]`` and cost fp32 ``[B, h, w]``; cur, ref ``[B, H, W]``, any strides.
    Semantics: vidtok.reference.motion.block_match."""
    B, H, W = cur.shape
    h, w = H // block, W // block
    motion = torch.empty((B, h, w, 2), device=cur.device, dtype=torch.int16)
    cost = torch.empty((B, h, w), device=cur.device, dtype=torch.float32)
    if cost.numel() > 0:
        tile = tile_shape(block, block)
        _block_match_kernel[(B * h * w,)](
            cur, ref, motion, cost, h, w, H, W, radius, *cur.stride(), *ref.stride(),
            IS_INT=cur.dtype == torch.uint8, BLOCK=block, BLOCK_P=tile[0],
            num_warps=num_warps(tile, SEARCH_PER_THREAD),
        )
    return motion, cost


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time cases: the configurations the launchers pick for the patch and block sizes in use.
# A contiguous video has unit column stride (Triton specialises an integer argument equal to 1 to the
# constant 1) and strides below 2^31 (i32); the strided cases take a general view (channels-last
# frames: column stride C).


def _gate_signature(ty: str, compensated: bool, contiguous: bool) -> dict:
    stride = "i32" if contiguous else "i64"
    sig = {"x_ptr": f"*{ty}", "keep_ptr": "*i8", "delta_ptr": "*fp32", "run_ptr": "*i32", "carry_ptr": "*i32"}
    if compensated:
        sig["motion_ptr"] = "*i16"
    sig.update({name: "i32" for name in ("Tq", "h", "w", "ts", "C", "ph", "rows")})
    if compensated:
        sig.update(H="i32", W="i32")
    sig.update({name: stride for name in ("s_b", "s_t", "s_c", "s_h")})
    sig.update(s_w="constexpr" if contiguous else stride, threshold="fp32", refresh_every="i32", max_run="i32",
               last_kept="i32")
    if compensated:
        sig.update(rlt="i32", radius="i32")
    sig["REDUCE"] = "constexpr"
    if not compensated:
        sig["RLT"] = "constexpr"
    sig.update(IS_INT="constexpr", PW="constexpr", BLOCK_R="constexpr", BLOCK_W="constexpr")
    return sig


def _gate_configs() -> list[tuple[int, int, str, bool]]:
    """(pw, ts, reduce, contiguous) of RGB square patches: every AOT width with one-frame slices,
    tubelets of 2 and RLT's rule; the other reductions and a strided view at width 16; width 33, whose
    tile is the largest a patch of MAX_ELEMENTS pixels can need."""
    configs = [(pw, ts, reduce, True) for pw in AOT_WIDTHS for ts, reduce in ((1, "mean_abs"), (2, "mean_abs"), (2, "rlt"))]
    configs += [(16, 1, "l2", True), (16, 1, "max_abs", True), (16, 1, "mean_abs", False)]
    configs.append((33, 1, "mean_abs", True))  # the largest tile: 99 x 33 pixels in 128 x 64
    return configs


def _aot_cases() -> list[AotCase]:
    cases = []
    for dtype, ty in {torch.uint8: "u8", **TRITON_DTYPES}.items():
        for pw, ts, reduce, contiguous in _gate_configs():
            rows = patch_rows(3, pw, ts, reduce)
            if rows * pw > MAX_ELEMENTS:
                continue  # refused by motion_gate_reasons
            tile = tile_shape(rows, pw)
            consts = {"REDUCE": REDUCE_CODES[reduce], "IS_INT": dtype == torch.uint8, "PW": pw,
                      "BLOCK_R": tile[0], "BLOCK_W": tile[1]}
            if contiguous:
                consts["s_w"] = 1
            tag = f"{ty}-p{pw}-ts{ts}-{reduce}-{'contiguous' if contiguous else 'strided'}"
            cases.append(AotCase(f"motion_gate-{tag}", _motion_gate_kernel, _gate_signature(ty, False, contiguous),
                                 {**consts, "RLT": reduce == "rlt"}, num_warps=num_warps(tile, gate_per_thread(dtype))))
            if reduce != "rlt":  # the compensated kernel takes RLT's rule as a runtime flag
                cases.append(AotCase(f"motion_gate_mc-{tag}", _motion_gate_mc_kernel,
                                     _gate_signature(ty, True, contiguous), consts,
                                     num_warps=num_warps(tile, SEARCH_PER_THREAD)))
        for block, contiguous in ((8, True), (16, True), (32, True), (16, False)):
            tile = tile_shape(block, block)
            stride = "i32" if contiguous else "i64"
            sig = {"cur_ptr": f"*{ty}", "ref_ptr": f"*{ty}", "motion_ptr": "*i16", "cost_ptr": "*fp32",
                   "h": "i32", "w": "i32", "H": "i32", "W": "i32", "radius": "i32",
                   "c_b": stride, "c_h": stride, "c_w": "constexpr" if contiguous else stride,
                   "r_b": stride, "r_h": stride, "r_w": "constexpr" if contiguous else stride,
                   "IS_INT": "constexpr", "BLOCK": "constexpr", "BLOCK_P": "constexpr"}
            consts = {"IS_INT": dtype == torch.uint8, "BLOCK": block, "BLOCK_P": tile[0]}
            if contiguous:
                consts.update(c_w=1, r_w=1)
            cases.append(AotCase(f"block_match-{ty}-b{block}-{'contiguous' if contiguous else 'strided'}",
                                 _block_match_kernel, sig, consts, num_warps=num_warps(tile, SEARCH_PER_THREAD)))
    return cases


AOT_CASES = _aot_cases()

"""Triton kernels for gated residual motion skipping (vidtok.patch_delta, vidtok.motion_gate and
vidtok.block_match).

One program owns one patch column (b, i, j) and walks through the T' slices of the clip with the
reference patch (ts x C x ph x pw elements, flattened into one BLOCK_E tile) held in registers. Per
slice it loads the patch once, reduces |cur - ref| to a delta, decides keep, and writes keep, delta,
carry and (for the previous kept slice, once the next one is known) run_length. The clip is read from
HBM once; every output element is written exactly once by one program (no atomics).

uint8 video is differenced and summed in int32 (exact: |d| <= 255 and d^2 * 4096 < 2^31) and turned
into fp32 with correctly rounded operations (int -> fp32, div_rn, sqrt_rn), exactly as the reference
does, so deltas and masks are bit-identical to vidtok.reference.motion.

The motion-compensated gate (search_radius > 0) is a second kernel with the same walk: per slice it
scans the (2r + 1)^2 displaced blocks of the reference slice, re-read from the video (they overlap,
so L1/L2 serve most of them) instead of one reference tile in registers, keeping the best in scalars.

Resources (`python -m vidtok aot`, triton 3.9): the gate kernel 32-82 registers per thread, the
compensated one 97-128 (E = 4096 tiles at 16 warps), no spills on sm_80 or sm_90.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .common import TRITON_DTYPES, AotCase, meta, on_tensor_device

INF = tl.constexpr(float("inf"))
# A patch (ts * C * ph * pw elements, or C * ph * pw for RLT's rule) lives in one register tile of
# BLOCK_E elements, BLOCK_E the next power of two >= max(256, E). 16x16 RGB patches use 1024
# (2048 with tubelet 2), 32x32 RGB 4096. Warps grow with the tile so that each thread holds <= 8
# elements of each of the two tiles (cur, ref).
BLOCK_SIZES = (256, 512, 1024, 2048, 4096)
MAX_ELEMENTS = BLOCK_SIZES[-1]
# reduce name -> the kernels' reduce_mode ("rlt" is a mean |d| over other frames)
REDUCE_CODES = {"mean_abs": 0, "l2": 1, "max_abs": 2, "rlt": 0}


def _tile_reasons(elements: int, what: str) -> list[str]:
    if elements > MAX_ELEMENTS:
        return [f"the Triton kernel holds a {what} in registers: at most {MAX_ELEMENTS} elements, got {elements}"]
    return []


def _patch_elements_of(video: torch.Tensor, ph: int, pw: int, ts: int, reduce: str) -> int:
    """Elements of one patch delta: ts x C x ph x pw (C x ph x pw for RLT's rule)."""
    return (1 if reduce == "rlt" else ts) * video.shape[2] * ph * pw


def patch_delta_reasons(video, ph, pw, ts, reduce) -> list[str]:
    return _tile_reasons(_patch_elements_of(video, ph, pw, ts, reduce), "patch")


def motion_gate_reasons(video, ph, pw, threshold, compare_to, ts, reduce, refresh_every, max_run) -> list[str]:
    return _tile_reasons(_patch_elements_of(video, ph, pw, ts, reduce), "patch")


def block_match_reasons(cur, ref, block, radius) -> list[str]:
    return _tile_reasons(block * block, "block")


def _num_warps(block: int) -> int:
    return max(4, min(16, block // 128))


@triton.jit
def _patch_elements(x_ptr, b, i, j, C, ph, pw, E, s_b, s_t, s_c, s_h, s_w, BLOCK_E: tl.constexpr):
    """(pointers to the E elements of patch (i, j) of video b in its first frame, their mask): element
    e of the flattened patch is (frame in tubelet, channel, row, column) = e in row-major order."""
    offs_e = tl.arange(0, BLOCK_E)
    pp = ph * pw
    f = offs_e // (C * pp)
    c = (offs_e // pp) % C
    y = (offs_e // pw) % ph
    xx = offs_e % pw
    elem = f.to(tl.int64) * s_t + c.to(tl.int64) * s_c + y.to(tl.int64) * s_h + xx.to(tl.int64) * s_w
    base = x_ptr + b.to(tl.int64) * s_b + (i * ph).to(tl.int64) * s_h + (j * pw).to(tl.int64) * s_w + elem
    return base, offs_e < E


@triton.jit
def _reduce_delta(d, reduce_mode, count):
    """A patch's change from its differences d (int32 for uint8 video: exact), correctly rounded to
    fp32 as the reference does: 1 l2, 2 max_abs, else mean_abs."""
    if reduce_mode == 1:
        delta = tl.sqrt_rn(tl.sum(d * d, axis=0).to(tl.float32))
    elif reduce_mode == 2:
        delta = tl.max(tl.abs(d), axis=0).to(tl.float32)
    else:
        delta = tl.div_rn(tl.sum(tl.abs(d), axis=0).to(tl.float32), count)
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
    Tq, h, w, ts, C, ph, pw, E,
    s_b, s_t, s_c, s_h, s_w,
    threshold, refresh_every, max_run, last_kept, rlt, reduce_mode,
    IS_INT: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)  # b * h * w + i * w + j
    hw = h * w
    b = pid // hw
    spatial = pid % hw
    i = spatial // w
    j = spatial % w

    base, emask = _patch_elements(x_ptr, b, i, j, C, ph, pw, E, s_b, s_t, s_c, s_h, s_w, BLOCK_E)
    # (broadcast to a vector: the interpreter rejects a scalar condition in a vector mask)
    first_mask = emask & ((tl.zeros([BLOCK_E], dtype=tl.int32) + rlt) != 0)
    # RLT's rule compares the LAST frame of tubelet k with the FIRST frame of tubelet k - 1
    cur_shift = tl.where(rlt != 0, ts - 1, 0)
    count = E.to(tl.float32)

    if IS_INT:
        ref = tl.zeros([BLOCK_E], dtype=tl.int32)
    else:
        ref = tl.zeros([BLOCK_E], dtype=tl.float32)
    last = 0
    out = b.to(tl.int64) * Tq * hw + spatial
    for k in range(0, Tq):
        frame = (k * ts).to(tl.int64) * s_t
        cur = tl.load(base + frame + cur_shift.to(tl.int64) * s_t, mask=emask, other=0)
        first = tl.load(base + frame, mask=first_mask, other=0)
        if IS_INT:
            cur = cur.to(tl.int32)
            first = first.to(tl.int32)
        else:
            cur = cur.to(tl.float32)
            first = first.to(tl.float32)
        cand = tl.where(rlt != 0, first, cur)  # what slice k leaves as the reference

        delta = _reduce_delta(cur - ref, reduce_mode, count)
        delta = tl.where(k == 0, INF, delta)
        keep, last = _decide_and_store(delta, k, last, out, hw, spatial, threshold, refresh_every, max_run,
                                       keep_ptr, delta_ptr, run_ptr, carry_ptr)
        ref = tl.where(keep | (last_kept == 0), cand, ref)
    tl.store(run_ptr + out + last * hw, Tq - last)


@triton.jit
def _motion_gate_mc_kernel(
    x_ptr, keep_ptr, delta_ptr, run_ptr, carry_ptr, motion_ptr,
    Tq, h, w, ts, C, ph, pw, E, H, W,
    s_b, s_t, s_c, s_h, s_w,
    threshold, refresh_every, max_run, last_kept, rlt, reduce_mode, radius,
    IS_INT: tl.constexpr, BLOCK_E: tl.constexpr,
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
    base, emask = _patch_elements(x_ptr, b, i, j, C, ph, pw, E, s_b, s_t, s_c, s_h, s_w, BLOCK_E)
    zero_vec = tl.zeros([BLOCK_E], dtype=tl.int32)
    y0 = i * ph
    x0 = j * pw
    cur_shift = tl.where(rlt != 0, ts - 1, 0)
    count = E.to(tl.float32)

    last = 0
    out = b.to(tl.int64) * Tq * hw + spatial
    for k in range(0, Tq):
        cur = tl.load(base + ((k * ts).to(tl.int64) + cur_shift) * s_t, mask=emask, other=0)
        if IS_INT:
            cur = cur.to(tl.int32)
        else:
            cur = cur.to(tl.float32)
        src = tl.where(last_kept != 0, last, tl.maximum(k - 1, 0))
        src_base = base + (src * ts).to(tl.int64) * s_t
        best = INF
        best_l1 = 4 * radius + 1
        best_dy = 0
        best_dx = 0
        d00 = 0.0
        for dy in range(-radius, radius + 1):
            for dx in range(-radius, radius + 1):
                inside = (y0 + dy >= 0) & (y0 + dy + ph <= H) & (x0 + dx >= 0) & (x0 + dx + pw <= W)
                cand = tl.load(src_base + dy * s_h + dx * s_w,
                               mask=emask & ((zero_vec + inside.to(tl.int32)) != 0), other=0)
                if IS_INT:
                    cand = cand.to(tl.int32)
                else:
                    cand = cand.to(tl.float32)
                dc = _reduce_delta(cur - cand, reduce_mode, count)
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
    """What both gate launchers share: (T', h, w, rlt, E = elements per patch delta, the outputs
    keep int8, delta fp32, run int32, carry int32, each [B, T', h, w])."""
    B, T, C, H, W = video.shape
    Tq, h, w = T // ts, H // ph, W // pw
    shape = (B, Tq, h, w)
    outputs = tuple(torch.empty(shape, device=video.device, dtype=d) for d in (torch.int8, torch.float32, torch.int32, torch.int32))
    return Tq, h, w, reduce == "rlt", _patch_elements_of(video, ph, pw, ts, reduce), outputs


@on_tensor_device
def motion_gate_compensated(
    video: torch.Tensor, ph: int, pw: int, threshold: float, compare_to: str, ts: int, reduce: str,
    refresh_every: int, max_run: int, radius: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``motion_gate`` plus motion int16 ``[B, T', h, w, 2]``; semantics:
    vidtok.reference.motion.motion_gate_compensated."""
    B, T, C, H, W = video.shape
    Tq, h, w, rlt, E, (keep, delta, run, carry) = _gate_launch(video, ph, pw, ts, reduce)
    motion = torch.empty((B, Tq, h, w, 2), device=video.device, dtype=torch.int16)
    if keep.numel() > 0:
        block = block_size(E)
        _motion_gate_mc_kernel[(B * h * w,)](
            video, keep, delta, run, carry, motion,
            Tq, h, w, ts, C, ph, pw, E, H, W, *video.stride(),
            float(threshold), refresh_every, max_run, int(compare_to == "last_kept"), int(rlt), REDUCE_CODES[reduce], radius,
            IS_INT=video.dtype == torch.uint8, BLOCK_E=block, num_warps=_num_warps(block),
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
    Tq, h, w, rlt, E, (keep, delta, run, carry) = _gate_launch(video, ph, pw, ts, reduce)
    if keep.numel() > 0:
        block = block_size(E)
        _motion_gate_kernel[(B * h * w,)](
            video, keep, delta, run, carry,
            Tq, h, w, ts, C, ph, pw, E, *video.stride(),
            float(threshold), refresh_every, max_run, int(compare_to == "last_kept"), int(rlt), REDUCE_CODES[reduce],
            IS_INT=video.dtype == torch.uint8, BLOCK_E=block, num_warps=_num_warps(block),
        )
    return keep.view(torch.bool), delta, run, carry


@triton.jit
def _block_match_kernel(
    cur_ptr, ref_ptr, motion_ptr, cost_ptr,
    h, w, H, W, block, radius,
    c_b, c_h, c_w, r_b, r_h, r_w,
    IS_INT: tl.constexpr, BLOCK_E: tl.constexpr,
):
    # One program per block (b, i, j): the cur block stays in registers while the (2r + 1)^2
    # candidate blocks of ref are streamed (they overlap: L1/L2 serve most loads). Exhaustive,
    # row-major over (dy, dx); ties prefer the smaller |dy| + |dx|, then the earlier candidate.
    pid = tl.program_id(0)
    hw = h * w
    b = pid // hw
    i = (pid % hw) // w
    j = pid % w
    offs = tl.arange(0, BLOCK_E)
    emask = offs < block * block
    zero_vec = tl.zeros([BLOCK_E], dtype=tl.int32)
    y = offs // block
    x = offs % block
    y0 = i * block
    x0 = j * block
    cur = tl.load(cur_ptr + b.to(tl.int64) * c_b + (y0 + y).to(tl.int64) * c_h + (x0 + x).to(tl.int64) * c_w,
                  mask=emask, other=0)
    ref_base = ref_ptr + b.to(tl.int64) * r_b + (y0 + y).to(tl.int64) * r_h + (x0 + x).to(tl.int64) * r_w
    if IS_INT:
        cur = cur.to(tl.int32)
    else:
        cur = cur.to(tl.float32)
    best = INF
    best_l1 = 4 * radius + 1
    best_dy = 0
    best_dx = 0
    c00 = 0.0
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            inside = (y0 + dy >= 0) & (y0 + dy + block <= H) & (x0 + dx >= 0) & (x0 + dx + block <= W)
            cand = tl.load(ref_base + dy * r_h + dx * r_w, mask=emask & ((zero_vec + inside.to(tl.int32)) != 0), other=0)
            if IS_INT:
                sad = tl.sum(tl.abs(cur - cand.to(tl.int32)), axis=0).to(tl.float32)
            else:
                sad = tl.sum(tl.abs(cur - cand.to(tl.float32)), axis=0)
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
        tile = block_size(block * block)
        _block_match_kernel[(B * h * w,)](
            cur, ref, motion, cost, h, w, H, W, block, radius, *cur.stride(), *ref.stride(),
            IS_INT=cur.dtype == torch.uint8, BLOCK_E=tile, num_warps=_num_warps(tile),
        )
    return motion, cost


def block_size(elements: int) -> int:
    """The register tile a patch of this many elements uses; raises past MAX_ELEMENTS."""
    for block in BLOCK_SIZES:
        if elements <= block:
            return block
    raise ValueError(f"a patch of {elements} elements does not fit the {MAX_ELEMENTS}-element register tile")


# Realistic inputs of the AOT cases: 16 frames of 224 x 224 video, each patch shape that reaches one
# register tile size (elements -> BLOCK_E): grey 16 x 16 (256), grey 16 x 16 tubelet 2 (512), RGB
# 16 x 16 (768 -> 1024), RGB 16 x 16 tubelet 2 (1536 -> 2048), RGB 32 x 32 (3072 -> 4096); the video
# contiguous [B, T, C, H, W] or decoded channels-last ([B, T, H, W, C] permuted). The gate runs with
# motion_gate's defaults (compare to the last kept slice, mean |d|, no refresh or run cap), the
# compensated one with search radius 2; block_match at blocks 8, 16 (its default, radius 8), 32 and
# 64 on one grey frame, contiguous or one channel of a channels-last RGB frame.
AOT_T, AOT_SIZE = 16, 224
AOT_PATCHES = {"E256": (1, 16, 1), "E512": (1, 16, 2), "E1024": (3, 16, 1), "E2048": (3, 16, 2), "E4096": (3, 32, 1)}
AOT_DTYPES = {**TRITON_DTYPES, torch.uint8: "u8"}


def _aot_video(C: int, dtype: torch.dtype, layout: str) -> torch.Tensor:
    if layout == "contiguous":
        return meta(1, AOT_T, C, AOT_SIZE, AOT_SIZE, dtype=dtype)
    return meta(1, AOT_T, AOT_SIZE, AOT_SIZE, C, dtype=dtype).permute(0, 1, 4, 2, 3)


def _aot_frame(dtype: torch.dtype, layout: str) -> torch.Tensor:
    if layout == "contiguous":
        return meta(1, AOT_SIZE, AOT_SIZE, dtype=dtype)
    return meta(1, AOT_SIZE, AOT_SIZE, 3, dtype=dtype)[..., 0]


def _aot_cases() -> list[AotCase]:
    cases = []
    for dtype, ty in AOT_DTYPES.items():
        threshold = 8.0 if dtype == torch.uint8 else 8.0 / 255
        for layout in ("contiguous", "channels_last"):
            for tile, (C, p, ts) in AOT_PATCHES.items():
                video = _aot_video(C, dtype, layout)
                gate = (video, p, p, threshold, "last_kept", ts, "mean_abs", 0, 0)
                cases += [
                    AotCase(f"motion_gate-{ty}-{tile}-{layout}", functools.partial(motion_gate, *gate)),
                    AotCase(f"motion_gate_mc-{ty}-{tile}-{layout}", functools.partial(motion_gate_compensated, *gate, 2)),
                ]
            for block in (8, 16, 32, 64):
                frame = _aot_frame(dtype, layout)
                cases.append(AotCase(f"block_match-{ty}-B{block}-{layout}", functools.partial(block_match, frame, frame, block, 8)))
    return cases


AOT_CASES = _aot_cases()

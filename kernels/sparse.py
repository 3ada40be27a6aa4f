"""Triton kernels for block-sparse video attention over a vidtok SparsePlan.

Forward (FlashAttention-2's online softmax, Dao 2023, restricted to the plan's tiles): one program
owns one query tile of one (sequence, head) and walks the key tiles of its CSR row. Per key tile:
s = (q k^T) * scale * log2(e) + kv_log_size * log2(e); a partial tile masks s by the plan's token bits
(bit c % 32 of word [r, c // 32]), a full tile is used unmasked; then the exp2 online update
m' = max(m, rowmax s), alpha = exp2(m - m'), p = exp2(s - m'), l = l alpha + rowsum p,
acc = acc alpha + p v, all in fp32. A row whose keys are all masked keeps m = -inf and uses 0 as its
reference max (no NaN); it ends with l = 0 and writes O = 0 and LSE = -inf.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from vidtok.reference.sparse import PlanTensors

from .common import TRITON_DTYPES, AotCase, meta, on_tensor_device

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _sparse_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, ls_ptr, o_ptr, lse_ptr,
    row_ptr, col_idx, entry_bits, bits_ptr,
    N, H, GROUP, PLAN_H, nQ, qk_scale,
    sq_b, sq_h, sq_n, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    sls_b, sls_n,
    D,
    HAS_LS: tl.constexpr, FP32: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr, SQ: tl.constexpr, SK: tl.constexpr, BD: tl.constexpr, W: tl.constexpr,
):
    # One program owns SQ rows (sub-tile r of plan query tile qi; SQ = BQ in 16 bits) of one head.
    qi = tl.program_id(0) // (BQ // SQ)
    r = tl.program_id(0) % (BQ // SQ)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP  # GQA: GROUP query heads share one key/value head
    rows = qi * BQ + r * SQ + tl.arange(0, SQ)
    offs_d = tl.arange(0, BD)
    offs_k = tl.arange(0, SK)
    d_ok = offs_d < D
    q = tl.load(
        q_ptr + b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h + rows.to(tl.int64)[:, None] * sq_n + offs_d[None, :] * sq_d,
        mask=(rows < N)[:, None] & d_ok[None, :], other=0.0,
    )
    k_base = k_ptr + b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h
    v_base = v_ptr + b.to(tl.int64) * sv_b + hk.to(tl.int64) * sv_h
    # A plan tile of BK keys is processed as BK / SK sub-tiles of SK keys (SK = min(BK, 64)): 128-wide
    # key tiles at SK = 128 spilled registers on sm_80/sm_90. A partial tile's mask is BQ x W words;
    # a sub-tile reads WS of them, each expanding to PER columns.
    WS: tl.constexpr = W * SK // BK
    PER: tl.constexpr = SK // WS
    bit_offs = (r * SQ + tl.arange(0, SQ))[:, None] * W + tl.arange(0, WS)[None, :]
    bit_shift = tl.arange(0, PER)[None, None, :]

    m_i = tl.full([SQ], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([SQ], dtype=tl.float32)
    acc = tl.zeros([SQ, BD], dtype=tl.float32)
    row = (b * PLAN_H + h % PLAN_H) * nQ + qi  # a shared plan (PLAN_H = 1) serves every head
    start = tl.load(row_ptr + row)
    end = tl.load(row_ptr + row + 1)
    for e in range(start, end):
        kt = tl.load(col_idx + e)
        bi = tl.load(entry_bits + e)
        for j in tl.static_range(BK // SK):
            cols = kt * BK + j * SK + offs_k
            kv_mask = (cols < N)[:, None] & d_ok[None, :]
            kk = tl.load(k_base + cols.to(tl.int64)[:, None] * sk_n + offs_d[None, :] * sk_d, mask=kv_mask, other=0.0)
            if FP32:
                s = tl.dot(q, tl.trans(kk), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(kk))
            s = s * qk_scale
            if HAS_LS:
                ls = tl.load(ls_ptr + b.to(tl.int64) * sls_b + cols.to(tl.int64) * sls_n, mask=cols < N, other=0.0)
                s = s + ls[None, :] * LOG2E
            if bi != 1:  # a partial tile (bits index 1 = full): token mask from the plan's bits
                words = tl.load(bits_ptr + bi.to(tl.int64) * (BQ * W) + j * WS + bit_offs)  # [SQ, WS]
                keep = tl.reshape(((words[:, :, None] >> bit_shift) & 1) != 0, [SQ, SK])
                s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_ref)
            p = tl.exp2(s - m_ref[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            vv = tl.load(v_base + cols.to(tl.int64)[:, None] * sv_n + offs_d[None, :] * sv_d, mask=kv_mask, other=0.0)
            if FP32:
                acc = acc * alpha[:, None] + tl.dot(p, vv, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
            m_i = m_new

    empty = l_i == 0.0
    # IEEE division (div.rn): the approximate division Triton emits by default is off by up to 2 ulp
    out = tl.div_rn(acc, tl.where(empty, 1.0, l_i)[:, None])
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2)
    o_rows = (bh.to(tl.int64) * N + rows.to(tl.int64))
    tl.store(o_ptr + o_rows[:, None] * D + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=(rows < N)[:, None] & d_ok[None, :])
    tl.store(lse_ptr + o_rows, lse, mask=rows < N)


@triton.jit
def _sparse_attention_bwd_preprocess_kernel(
    o_ptr, do_ptr, dlse_ptr, delta_ptr, N, D,
    HAS_DLSE: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
):
    # delta_i = rowsum(dO_i * O_i) - dLSE_i for BR rows of one head (dS_ij = P_ij (dP_ij - delta_i),
    # the LSE's own gradient included): O and dO read once in their dtype, summed in fp32.
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    offs_d = tl.arange(0, BD)
    o_rows = tl.program_id(1).to(tl.int64) * N + rows.to(tl.int64)  # O, dO [B, H, N, D] and dLSE, delta [B, H, N], contiguous
    mask = (rows < N)[:, None] & (offs_d < D)[None, :]
    o = tl.load(o_ptr + o_rows[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + o_rows[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, axis=1)
    if HAS_DLSE:
        delta -= tl.load(dlse_ptr + o_rows, mask=rows < N, other=0.0)
    tl.store(delta_ptr + o_rows, delta, mask=rows < N)


@triton.jit
def _sparse_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, ls_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    row_ptr, col_idx, entry_bits, bits_ptr,
    N, H, GROUP, PLAN_H, nQ, qk_scale, scale,
    sq_b, sq_h, sq_n, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    sls_b, sls_n,
    D,
    HAS_LS: tl.constexpr, FP32: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr, SQ: tl.constexpr, SK: tl.constexpr, BD: tl.constexpr, W: tl.constexpr,
):
    # dQ of SQ rows (sub-tile r of plan query tile qi) of one head, walking the forward CSR: P is
    # recomputed from the saved LSE, dS = P * (dO V^T - delta), dQ = scale * dS K. One program owns
    # its rows: no atomics.
    qi = tl.program_id(0) // (BQ // SQ)
    r = tl.program_id(0) % (BQ // SQ)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    rows = qi * BQ + r * SQ + tl.arange(0, SQ)
    offs_d = tl.arange(0, BD)
    offs_k = tl.arange(0, SK)
    d_ok = offs_d < D
    r_ok = rows < N
    q = tl.load(
        q_ptr + b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h + rows.to(tl.int64)[:, None] * sq_n + offs_d[None, :] * sq_d,
        mask=r_ok[:, None] & d_ok[None, :], other=0.0,
    )
    o_rows = bh.to(tl.int64) * N + rows.to(tl.int64)  # dO, LSE, delta and dQ are contiguous [B, H, N(, D)]
    do = tl.load(do_ptr + o_rows[:, None] * D + offs_d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    lse2 = tl.load(lse_ptr + o_rows, mask=r_ok, other=0.0) * LOG2E
    lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)  # rows with no key: every p is masked to 0
    delta = tl.load(delta_ptr + o_rows, mask=r_ok, other=0.0)
    k_base = k_ptr + b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h
    v_base = v_ptr + b.to(tl.int64) * sv_b + hk.to(tl.int64) * sv_h
    WS: tl.constexpr = W * SK // BK
    PER: tl.constexpr = SK // WS
    bit_offs = (r * SQ + tl.arange(0, SQ))[:, None] * W + tl.arange(0, WS)[None, :]
    bit_shift = tl.arange(0, PER)[None, None, :]
    dq = tl.zeros([SQ, BD], dtype=tl.float32)
    row = (b * PLAN_H + h % PLAN_H) * nQ + qi
    start = tl.load(row_ptr + row)
    end = tl.load(row_ptr + row + 1)
    for e in range(start, end):
        kt = tl.load(col_idx + e)
        bi = tl.load(entry_bits + e)
        for j in tl.static_range(BK // SK):
            cols = kt * BK + j * SK + offs_k
            kv_mask = (cols < N)[:, None] & d_ok[None, :]
            kk = tl.load(k_base + cols.to(tl.int64)[:, None] * sk_n + offs_d[None, :] * sk_d, mask=kv_mask, other=0.0)
            vv = tl.load(v_base + cols.to(tl.int64)[:, None] * sv_n + offs_d[None, :] * sv_d, mask=kv_mask, other=0.0)
            if FP32:
                s = tl.dot(q, tl.trans(kk), input_precision="ieee")
                dp = tl.dot(do, tl.trans(vv), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(kk))
                dp = tl.dot(do.to(vv.dtype), tl.trans(vv))
            s = s * qk_scale
            if HAS_LS:
                ls = tl.load(ls_ptr + b.to(tl.int64) * sls_b + cols.to(tl.int64) * sls_n, mask=cols < N, other=0.0)
                s = s + ls[None, :] * LOG2E
            p = tl.exp2(s - lse2[:, None])
            if bi != 1:
                words = tl.load(bits_ptr + bi.to(tl.int64) * (BQ * W) + j * WS + bit_offs)
                keep = tl.reshape(((words[:, :, None] >> bit_shift) & 1) != 0, [SQ, SK])
                p = tl.where(keep, p, 0.0)
            ds = p * (dp - delta[:, None])
            if FP32:
                dq += tl.dot(ds, kk, input_precision="ieee")
            else:
                dq += tl.dot(ds.to(kk.dtype), kk)
    tl.store(dq_ptr + o_rows[:, None] * D + offs_d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=r_ok[:, None] & d_ok[None, :])


@triton.jit
def _sparse_attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, ls_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dls_ptr,
    col_ptr, row_idx, entry_bits_t, bits_ptr,
    N, H, Hk, GROUP, PLAN_H, nK, qk_scale, scale,
    sq_b, sq_h, sq_n, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    sls_b, sls_n,
    D,
    HAS_LS: tl.constexpr, FP32: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr, SQ: tl.constexpr, SK: tl.constexpr, BD: tl.constexpr, W: tl.constexpr,
):
    # dK, dV (and the per-key d kv_log_size partial sum of this key/value head) of SK keys -- sub-tile
    # j of plan key tile kt -- summed over the GROUP query heads that read them and over the query
    # tiles of the transposed CSR. One program owns its keys: no atomics. Every product has the keys
    # as its M dimension (S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q), so M = SK = 64 for
    # every GEMM, the M a Hopper warpgroup MMA (wgmma) takes.
    pid = tl.program_id(0)
    kt = pid // (BK // SK)
    j = pid % (BK // SK)
    bh = tl.program_id(1)  # b * Hk + hk
    b = bh // Hk
    hk = bh % Hk
    cols = kt * BK + j * SK + tl.arange(0, SK)
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D
    c_ok = cols < N
    kv_mask = c_ok[:, None] & d_ok[None, :]
    kk = tl.load(k_ptr + b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h + cols.to(tl.int64)[:, None] * sk_n + offs_d[None, :] * sk_d,
                 mask=kv_mask, other=0.0)
    vv = tl.load(v_ptr + b.to(tl.int64) * sv_b + hk.to(tl.int64) * sv_h + cols.to(tl.int64)[:, None] * sv_n + offs_d[None, :] * sv_d,
                 mask=kv_mask, other=0.0)
    if HAS_LS:
        ls2 = tl.load(ls_ptr + b.to(tl.int64) * sls_b + cols.to(tl.int64) * sls_n, mask=c_ok, other=0.0) * LOG2E
    # the token mask transposed, [SK, SQ]: key c is bit (j SK + c) % 32 of word (j SK + c) // 32 of
    # its query's row (a gather of the few words of a partial tile, each read by 32 keys)
    key_in_tile = j * SK + tl.arange(0, SK)
    word_offs = tl.arange(0, SQ)[None, :] * W + (key_in_tile // 32)[:, None]
    bit_shift = (key_in_tile % 32)[:, None]
    dk = tl.zeros([SK, BD], dtype=tl.float32)
    dv = tl.zeros([SK, BD], dtype=tl.float32)
    dls = tl.zeros([SK], dtype=tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = q_ptr + b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h
        head_rows = (b * H + h).to(tl.int64) * N
        col = (b * PLAN_H + h % PLAN_H) * nK + kt
        start = tl.load(col_ptr + col)
        end = tl.load(col_ptr + col + 1)
        for e in range(start, end):
            qi = tl.load(row_idx + e)
            bi = tl.load(entry_bits_t + e)
            for r in tl.static_range(BQ // SQ):  # SQ-row sub-tiles of the plan's query tile
                rows = qi * BQ + r * SQ + tl.arange(0, SQ)
                r_ok = rows < N
                q = tl.load(q_base + rows.to(tl.int64)[:, None] * sq_n + offs_d[None, :] * sq_d,
                            mask=r_ok[:, None] & d_ok[None, :], other=0.0)
                o_rows = head_rows + rows.to(tl.int64)
                do = tl.load(do_ptr + o_rows[:, None] * D + offs_d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
                lse2 = tl.load(lse_ptr + o_rows, mask=r_ok, other=0.0) * LOG2E
                lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)
                delta = tl.load(delta_ptr + o_rows, mask=r_ok, other=0.0)
                if FP32:
                    st = tl.dot(kk, tl.trans(q), input_precision="ieee")  # [SK, SQ]
                    dpt = tl.dot(vv, tl.trans(do), input_precision="ieee")
                else:
                    st = tl.dot(kk, tl.trans(q))
                    dpt = tl.dot(vv, tl.trans(do.to(vv.dtype)))
                st = st * qk_scale
                if HAS_LS:
                    st = st + ls2[:, None]
                pt = tl.exp2(st - lse2[None, :])  # P^T [SK, SQ]
                if bi != 1:
                    words = tl.load(bits_ptr + bi.to(tl.int64) * (BQ * W) + (r * SQ) * W + word_offs)
                    pt = tl.where(((words >> bit_shift) & 1) != 0, pt, 0.0)
                dst = pt * (dpt - delta[None, :])
                if FP32:
                    dv += tl.dot(pt, do, input_precision="ieee")
                    dk += tl.dot(dst, q, input_precision="ieee")
                else:
                    dv += tl.dot(pt.to(vv.dtype), do.to(vv.dtype))
                    dk += tl.dot(dst.to(q.dtype), q)
                dls += tl.sum(dst, axis=1)
    out_rows = bh.to(tl.int64) * N + cols.to(tl.int64)  # dK, dV [B, Hk, N, D] and dls [B, Hk, N], contiguous
    tl.store(dk_ptr + out_rows[:, None] * D + offs_d[None, :], (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out_rows[:, None] * D + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)
    if HAS_LS:
        tl.store(dls_ptr + out_rows, dls, mask=c_ok)


def _num_warps(rows: int, cols: int, head_block: int) -> int:
    # 4 warps while a program's [rows, cols] scores and [rows, BD] accumulator are at most 64 x 64,
    # else 8: at 4 warps, 64 x 64 tiles with D = 128 used a 368-byte stack frame (spills) on sm_80
    # and sm_90. Not yet tuned on a GPU: no measurement exists.
    return 4 if rows * max(cols, head_block) <= 64 * 64 else 8


def _head_block(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def tile_config(kernel: str, block_q: int, block_k: int, D: int, float32: bool) -> dict:
    """The sub-tiles (SQ query rows, SK keys), warps and pipeline stages of one kernel ("fwd",
    "bwd_dq", "bwd_dkdv") for a plan's (BQ, BK) tiles, head dimension D and input precision: the
    launchers and the AOT cases read this one table. Chosen from ``python bench/sparse_aot.py``
    (compiles as launched, registers, spills, stack frames, shared memory; bench/NOTES.md):

    16-bit: the forward owns a whole query tile, the dQ programs 64-row sub-tiles (128 rows with D =
    128 used a 5.9 KB stack frame on sm_80); key tiles are walked 64 keys at a time (128-wide
    sub-tiles spilled). The dK/dV programs own 64 keys, the M dimension of all four of their
    products (a Hopper warpgroup MMA takes M = 64), against 32-row query sub-tiles (64 rows at 128
    query rows left 320-360 B stack frames on sm_90), or 64 with D = 128 and 64-row plan tiles.
    float32 (IEEE products on CUDA cores, twice the bytes per operand): sub-tiles of 32 x 32
    (forward), 16 x 32 (dQ) and 16 x 16 (dK/dV), 4 warps, 2 stages; larger ones left kilobytes of
    stack or overflowed sm_80's 163 KB of shared memory.
    """
    BD = _head_block(D)
    if float32:
        SQ, SK = {"fwd": (32, 32), "bwd_dq": (16, 32), "bwd_dkdv": (16, 16)}[kernel]
        return {"SQ": min(block_q, SQ), "SK": min(block_k, SK), "BD": BD, "num_warps": 4, "num_stages": 2}
    SK = min(block_k, 64)
    if kernel == "fwd":
        SQ, warps = block_q, _num_warps(block_q, SK, BD)
    elif kernel == "bwd_dq":
        SQ = min(block_q, 64)
        warps = _num_warps(SQ, SK, BD)
    elif kernel == "bwd_dkdv":
        SQ = min(block_q, 64 if block_q == 64 and BD >= 128 else 32)
        warps = 8 if SK * BD >= 64 * 64 else 4
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    return {"SQ": SQ, "SK": SK, "BD": BD, "num_warps": warps, "num_stages": 3}


# Head dimensions the kernels take (zero-padded in registers to the next power of two >= 16).
MAX_HEAD_DIM = 128
# Rows of the backward's delta preprocess per program.
_PREPROCESS_ROWS = 64


def sparse_attention_reasons(q, k, v, kv_log_size, tiles, block_q: int, block_k: int, scale: float) -> list[str]:
    out = []
    if q.shape[-1] > MAX_HEAD_DIM:
        out.append(f"the Triton kernel takes head dimensions D <= {MAX_HEAD_DIM} (16, 32, 64, 128 or smaller, "
                   f"zero-padded), got D = {q.shape[-1]}")
    return out


def _launch(kernel, name, grid, block_q, block_k, D, dtype, *args, **constexprs):
    config = tile_config(name, block_q, block_k, D, dtype == torch.float32)
    warps, stages = config.pop("num_warps"), config.pop("num_stages")
    kernel[grid(config)](*args, BQ=block_q, BK=block_k, FP32=dtype == torch.float32, num_warps=warps, num_stages=stages,
                         **config, **constexprs)


@on_tensor_device
def sparse_attention(q, k, v, kv_log_size, tiles, block_q: int, block_k: int, scale: float):
    """out [B, H, N, D] (contiguous, q's dtype) and fp32 natural-log LSE [B, H, N].

    q [B, H, N, D], k/v [B, Hk, N, D] any strides; kv_log_size fp32 [B, N] or None; ``tiles`` the
    plan's PlanTensors (the forward walks its CSR by query tile; a per-head plan's rows by head).
    D <= MAX_HEAD_DIM. float32 runs its products in IEEE fp32 (no TF32), as the reference.
    """
    B, H, N, D = q.shape
    out = torch.empty((B, H, N, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse
    n_q = -(-N // block_q)
    has_ls = kv_log_size is not None
    ls = kv_log_size if has_ls else lse  # any tensor: not read when HAS_LS is False
    ls_strides = kv_log_size.stride() if has_ls else (0, 0)
    _launch(
        _sparse_attention_fwd_kernel, "fwd", lambda c: (n_q * (block_q // c["SQ"]), B * H), block_q, block_k, D, q.dtype,
        q, k, v, ls, out, lse, tiles.row_ptr, tiles.col_idx, tiles.entry_bits, tiles.bits,
        N, H, H // k.shape[1], tiles.tile_map.shape[1], n_q, scale * 1.4426950408889634,
        *q.stride(), *k.stride(), *v.stride(), *ls_strides, D,
        HAS_LS=has_ls, W=tiles.bits.shape[-1],
    )
    return out, lse


@on_tensor_device
def sparse_attention_backward(grad_out, grad_lse, q, k, v, kv_log_size, out, lse, tiles, block_q: int, block_k: int, scale: float):
    """(dq, dk, dv, d kv_log_size): dq [B, H, N, D], dk/dv [B, Hk, N, D] in the inputs' dtype,
    d kv_log_size fp32 [B, N] (None without kv_log_size). Three launches: delta = rowsum(dO * O) -
    dLSE (one pass over O and dO), dQ programs walking the forward CSR, dK/dV programs walking the
    transposed one. Deterministic: every program owns what it writes; the per-head partial sums of
    d kv_log_size are added by a torch reduction, not atomics."""
    bits = tiles.bits
    B, H, N, D = q.shape
    Hk = k.shape[1]
    go = grad_out.contiguous()
    out = out.contiguous()
    lse = lse.contiguous()
    dq = torch.empty((B, H, N, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, Hk, N, D), device=q.device, dtype=k.dtype)
    dv = torch.empty((B, Hk, N, D), device=q.device, dtype=v.dtype)
    has_ls = kv_log_size is not None
    dls = torch.empty((B, Hk, N) if has_ls else (0,), device=q.device, dtype=torch.float32)
    if dq.numel() == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        return dq, dk, dv, dls.sum(1) if has_ls else None
    delta = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    dlse = delta if grad_lse is None else grad_lse.float().contiguous()
    _sparse_attention_bwd_preprocess_kernel[(-(-N // _PREPROCESS_ROWS), B * H)](
        out, go, dlse, delta, N, D, HAS_DLSE=grad_lse is not None, BR=_PREPROCESS_ROWS, BD=_head_block(D),
    )
    ls = kv_log_size if has_ls else lse
    ls_strides = kv_log_size.stride() if has_ls else (0, 0)
    n_q, n_k = -(-N // block_q), -(-N // block_k)
    plan_heads = tiles.tile_map.shape[1]
    strides = (*q.stride(), *k.stride(), *v.stride(), *ls_strides)
    common = dict(HAS_LS=has_ls, W=bits.shape[-1])
    _launch(
        _sparse_attention_bwd_dq_kernel, "bwd_dq", lambda c: (n_q * (block_q // c["SQ"]), B * H), block_q, block_k, D, q.dtype,
        q, k, v, ls, go, lse, delta, dq, tiles.row_ptr, tiles.col_idx, tiles.entry_bits, bits,
        N, H, H // Hk, plan_heads, n_q, scale * 1.4426950408889634, scale, *strides, D, **common,
    )
    _launch(
        _sparse_attention_bwd_dkdv_kernel, "bwd_dkdv", lambda c: (n_k * (block_k // c["SK"]), B * Hk), block_q, block_k, D, q.dtype,
        q, k, v, ls, go, lse, delta, dk, dv, dls, tiles.col_ptr, tiles.row_idx, tiles.entry_bits_t, bits,
        N, H, Hk, H // Hk, plan_heads, n_k, scale * 1.4426950408889634, scale, *strides, D, **common,
    )
    return dq, dk, dv, dls.sum(1) if has_ls else None


def _aot_forward_backward(q, k, v, kv_log_size, tiles, block_q: int, block_k: int, scale: float, with_dlse: bool) -> None:
    out, lse = sparse_attention(q, k, v, kv_log_size, tiles, block_q, block_k, scale)
    sparse_attention_backward(out, lse if with_dlse else None, q, k, v, kv_log_size, out, lse, tiles, block_q, block_k, scale)


def _aot_plan(B: int, heads: int, N: int, block_q: int, block_k: int, partial: int) -> PlanTensors:
    """Plan tensors of the shapes build_plan gives (for ahead-of-time compiles: no values needed):
    ``heads`` plan heads (1: one plan for every head)."""
    nq, nk = -(-N // block_q), -(-N // block_k)
    pairs = B * heads * nq * nk // 8  # an eighth of the tile pairs computed
    i32 = functools.partial(meta, dtype=torch.int32)
    return PlanTensors(i32(B, heads, nq, nk), i32(2 + partial, block_q, -(-block_k // 32)), i32(B * heads * nq + 1),
                       i32(pairs), i32(pairs), i32(B * heads * nk + 1), i32(pairs), i32(pairs))


def _aot_cases() -> list[AotCase]:
    # The launchers on meta tensors of the benchmarks' shape (16 x 24 x 24 = 9,216 tokens, B = 1,
    # H = 16, contiguous [B, H, N, D]): the heaviest variant (D = 128 with kv_log_size and a dLSE) at
    # every tile size the benchmarks use, and the lightest (D = 64, 64 x 64, no log size, one plan per
    # head), forward and backward (with its delta preprocess), in every dtype the GPU path takes.
    B, H, N = 1, 16, 16 * 24 * 24
    variants = [((64, 64), 128, True, 1), ((128, 64), 128, True, 1), ((128, 128), 128, True, 1), ((64, 64), 64, False, H)]
    cases = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for (BQ, BK), D, has_ls, heads in variants:
            q, k, v = (meta(B, H, N, D, dtype=dtype) for _ in range(3))
            ls = meta(B, N) if has_ls else None
            name = f"sparse_attention-{TRITON_DTYPES[dtype]}-q{BQ}k{BK}-d{D}{'-logsize-dlse' if has_ls else '-per_head'}"
            cases.append(AotCase(name, functools.partial(
                _aot_forward_backward, q, k, v, ls, _aot_plan(B, heads, N, BQ, BK, 64), BQ, BK, D**-0.5, has_ls)))
    return cases


AOT_CASES = _aot_cases()


# ---------------------------------------------------------------------------------------------------
# attention_received: the attention mass each key receives, P recomputed from the LSE.
#
# One program owns SK keys of one (sequence, head) and walks the query rows that count, SQ at a time
# (with a plan: the query tiles of its key tile's transposed-CSR column, partial tiles masked by the
# plan's token bits): s = q k^T * scale * log2(e) (+ kv_log_size * log2(e)), p = exp2(s - lse * log2(e)),
# and the column sums of p accumulate in fp32 registers in a fixed order: no atomics, each output
# written once. Without an LSE a first kernel computes it (an online max and sum over each row's keys,
# the forward kernel without V).


@triton.jit
def _received_lse_kernel(
    q_ptr, k_ptr, ls_ptr, lse_ptr,
    row_ptr, col_idx, entry_bits, bits_ptr,
    M, N, H, GROUP, PLAN_H, nQ, qk_scale,
    sq_b, sq_h, sq_n, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sls_b, sls_n,
    D,
    HAS_LS: tl.constexpr, HAS_PLAN: tl.constexpr, IEEE: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr, SQ: tl.constexpr, SK: tl.constexpr, BD: tl.constexpr, W: tl.constexpr,
):
    qi = tl.program_id(0) // (BQ // SQ)
    r = tl.program_id(0) % (BQ // SQ)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    rows = qi * BQ + r * SQ + tl.arange(0, SQ)
    offs_d = tl.arange(0, BD)
    offs_k = tl.arange(0, SK)
    d_ok = offs_d < D
    r_ok = rows < M
    q = tl.load(q_ptr + b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h + rows.to(tl.int64)[:, None] * sq_n + offs_d[None, :] * sq_d,
                mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = k_ptr + b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h
    WS: tl.constexpr = W * SK // BK
    PER: tl.constexpr = SK // WS
    bit_offs = (r * SQ + tl.arange(0, SQ))[:, None] * W + tl.arange(0, WS)[None, :]
    bit_shift = tl.arange(0, PER)[None, None, :]
    m_i = tl.full([SQ], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([SQ], dtype=tl.float32)
    if HAS_PLAN:
        row = (b * PLAN_H + h % PLAN_H) * nQ + qi  # a shared plan (PLAN_H = 1) serves every head
        start = tl.load(row_ptr + row)
        end = tl.load(row_ptr + row + 1)
    else:
        start = 0
        end = tl.cdiv(N, BK)
    for e in range(start, end):
        if HAS_PLAN:
            kt = tl.load(col_idx + e)
            bi = tl.load(entry_bits + e)
        else:
            kt = e
            bi = 1
        for j in tl.static_range(BK // SK):
            cols = kt * BK + j * SK + offs_k
            kk = tl.load(k_base + cols.to(tl.int64)[:, None] * sk_n + offs_d[None, :] * sk_d,
                         mask=(cols < N)[:, None] & d_ok[None, :], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(kk), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(kk))
            s = s * qk_scale
            if HAS_LS:
                ls = tl.load(ls_ptr + b.to(tl.int64) * sls_b + cols.to(tl.int64) * sls_n, mask=cols < N, other=0.0)
                s = s + ls[None, :] * LOG2E
            s = tl.where((cols < N)[None, :], s, float("-inf"))
            if bi != 1:
                words = tl.load(bits_ptr + bi.to(tl.int64) * (BQ * W) + j * WS + bit_offs)
                keep = tl.reshape(((words[:, :, None] >> bit_shift) & 1) != 0, [SQ, SK])
                s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_ref) + tl.sum(tl.exp2(s - m_ref[:, None]), axis=1)
            m_i = m_new
    empty = l_i == 0.0
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2)
    tl.store(lse_ptr + bh.to(tl.int64) * M + rows, lse, mask=r_ok)


@triton.jit
def _received_kernel(
    q_ptr, k_ptr, ls_ptr, lse_ptr, out_ptr,
    col_ptr, row_idx, entry_bits_t, bits_ptr,
    M, N, H, GROUP, PLAN_H, nK, qk_scale, row_start, row_end,
    sq_b, sq_h, sq_n, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sls_b, sls_n,
    D,
    HAS_LS: tl.constexpr, HAS_PLAN: tl.constexpr, IEEE: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr, SQ: tl.constexpr, SK: tl.constexpr, BD: tl.constexpr, W: tl.constexpr,
):
    pid = tl.program_id(0)
    kt = pid // (BK // SK)
    j = pid % (BK // SK)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    cols = kt * BK + j * SK + tl.arange(0, SK)
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D
    c_ok = cols < N
    kk = tl.load(k_ptr + b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h + cols.to(tl.int64)[:, None] * sk_n + offs_d[None, :] * sk_d,
                 mask=c_ok[:, None] & d_ok[None, :], other=0.0)
    if HAS_LS:
        ls2 = tl.load(ls_ptr + b.to(tl.int64) * sls_b + cols.to(tl.int64) * sls_n, mask=c_ok, other=0.0) * LOG2E
    q_base = q_ptr + b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h
    WS: tl.constexpr = W * SK // BK
    PER: tl.constexpr = SK // WS
    bit_offs = tl.arange(0, SQ)[:, None] * W + tl.arange(0, WS)[None, :]
    bit_shift = tl.arange(0, PER)[None, None, :]
    acc = tl.zeros([SK], dtype=tl.float32)
    if HAS_PLAN:
        col = (b * PLAN_H + h % PLAN_H) * nK + kt
        start = tl.load(col_ptr + col)
        end = tl.load(col_ptr + col + 1)
    else:
        start = row_start // BQ
        end = tl.cdiv(row_end, BQ)
    for e in range(start, end):
        if HAS_PLAN:
            qi = tl.load(row_idx + e)
            bi = tl.load(entry_bits_t + e)
        else:
            qi = e
            bi = 1
        if (qi * BQ < row_end) & (qi * BQ + BQ > row_start):  # a tile with rows that count
            for r in tl.static_range(BQ // SQ):
                rows = qi * BQ + r * SQ + tl.arange(0, SQ)
                r_ok = (rows >= row_start) & (rows < row_end) & (rows < M)
                q = tl.load(q_base + rows.to(tl.int64)[:, None] * sq_n + offs_d[None, :] * sq_d,
                            mask=r_ok[:, None] & d_ok[None, :], other=0.0)
                lse2 = tl.load(lse_ptr + bh.to(tl.int64) * M + rows, mask=r_ok, other=float("-inf")) * LOG2E
                # rows without keys (lse -inf) or with a NaN give nothing
                finite = (lse2 == lse2) & (lse2 != float("-inf")) & (lse2 != float("inf"))
                if IEEE:
                    s = tl.dot(q, tl.trans(kk), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(kk))
                s = s * qk_scale
                if HAS_LS:
                    s = s + ls2[None, :]
                p = tl.exp2(s - tl.where(finite, lse2, 0.0)[:, None])
                ok = finite[:, None] & c_ok[None, :]
                if bi != 1:
                    words = tl.load(bits_ptr + bi.to(tl.int64) * (BQ * W) + (r * SQ) * W + j * WS + bit_offs)
                    ok = ok & tl.reshape(((words[:, :, None] >> bit_shift) & 1) != 0, [SQ, SK])
                acc += tl.sum(tl.where(ok, p, 0.0), axis=0)
    tl.store(out_ptr + bh.to(tl.int64) * N + cols, acc, mask=c_ok)


def _received_rows(block_q: int) -> int:
    # query rows per step: 32 (the dK/dV kernel's choice for the same [rows, keys] tiles)
    return min(block_q, 32)


def _received_keys(block_k: int) -> int:
    # keys per program: a plan tile's keys 64 at a time (128-wide sub-tiles spilled in the attention
    # kernels, tile_config)
    return min(block_k, 64)


def attention_received_reasons(q, k, lse, kv_log_size, tiles, block_q, block_k, scale, row_start, row_end) -> list[str]:
    out = []
    if q.shape[-1] > MAX_HEAD_DIM:
        out.append(f"the Triton kernel takes head dimensions D <= {MAX_HEAD_DIM} (zero-padded to a power of two), got D = {q.shape[-1]}")
    if q.device.type == "cuda" and q.dtype == torch.float32:
        # float32 tiles (IEEE dot products) spill hundreds of bytes to kilobytes at these tiles on
        # sm_80/sm_90 (python -m vidtok aot)
        out.append("on GPUs the Triton kernel takes float16 or bfloat16; float32 runs on the reference backend")
    return out


@on_tensor_device
def attention_received(q, k, lse, kv_log_size, tiles, block_q: int, block_k: int, scale: float, row_start: int, row_end: int):
    """received fp32 [B, H, N]: column sums of P over query rows [row_start, row_end), P from ``lse``
    (computed by a first kernel when None). q [B, H, M, D], k [B, Hk, N, D] any strides; with
    ``tiles`` (a plan's PlanTensors, M = N) only the plan's pairs; block_q/block_k the plan's tiles
    (64 x 64 without a plan)."""
    B, H, M, D = q.shape
    Hk, N = k.shape[1], k.shape[2]
    out = torch.zeros((B, H, N), device=q.device, dtype=torch.float32)
    if out.numel() == 0 or M == 0 or row_end <= row_start:
        return out
    has_plan, has_ls = tiles is not None, kv_log_size is not None
    plan_heads = tiles.tile_map.shape[1] if has_plan else 1
    dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
    csr = (tiles.row_ptr, tiles.col_idx, tiles.entry_bits, tiles.bits) if has_plan else (dummy,) * 4
    csr_t = (tiles.col_ptr, tiles.row_idx, tiles.entry_bits_t, tiles.bits) if has_plan else (dummy,) * 4
    W = tiles.bits.shape[-1] if has_plan else max(block_k // 32, 1)
    ls = kv_log_size if has_ls else out
    ls_strides = kv_log_size.stride() if has_ls else (0, 0)
    SQ, SK, BD = _received_rows(block_q), _received_keys(block_k), _head_block(D)
    common = dict(HAS_LS=has_ls, HAS_PLAN=has_plan, IEEE=q.dtype == torch.float32, BQ=block_q, BK=block_k, SQ=SQ, SK=SK,
                  BD=BD, W=W, num_warps=_num_warps(SQ, SK, BD))
    n_q, n_k = -(-M // block_q), -(-N // block_k)
    if lse is None:
        lse = torch.empty((B, H, M), device=q.device, dtype=torch.float32)
        _received_lse_kernel[(n_q * (block_q // SQ), B * H)](
            q, k, ls, lse, *csr, M, N, H, H // Hk, plan_heads, n_q, scale * 1.4426950408889634,
            *q.stride(), *k.stride(), *ls_strides, D, **common,
        )
    lse = lse.to(torch.float32).contiguous()
    _received_kernel[(n_k * (block_k // SK), B * H)](
        q, k, ls, lse, out, *csr_t, M, N, H, H // Hk, plan_heads, n_k, scale * 1.4426950408889634, row_start, row_end,
        *q.stride(), *k.stride(), *ls_strides, D, **common,
    )
    return out


def _received_aot_cases() -> list[AotCase]:
    # The launcher on meta tensors of the benchmarks' shape (9,216 tokens, H = 16), without an LSE (so
    # both kernels launch): 16-bit (float32 runs on the reference on GPUs: attention_received_reasons),
    # with and without a plan, at the plan tiles the benchmarks use, D = 128 with kv_log_size (the
    # heaviest) and D = 64 without.
    B, H, N = 1, 16, 16 * 24 * 24
    cases = []
    for dtype in (torch.float16, torch.bfloat16):
        ty = TRITON_DTYPES[dtype]
        for (BQ, BK), D, has_ls, has_plan in [((64, 64), 128, True, False), ((64, 64), 64, False, False),
                                             ((64, 64), 128, True, True), ((128, 128), 128, True, True)]:
            q, k = meta(B, H, N, D, dtype=dtype), meta(B, H, N, D, dtype=dtype)
            ls = meta(B, N) if has_ls else None
            tiles = _aot_plan(B, 1, N, BQ, BK, 64) if has_plan else None
            tag = f"{ty}-q{BQ}k{BK}-d{D}{'-logsize' if has_ls else ''}{'-plan' if has_plan else ''}"
            cases.append(AotCase(f"attention_received-{tag}",
                                 functools.partial(attention_received, q, k, None, ls, tiles, BQ, BK, D**-0.5, 0, N)))
    return cases


AOT_CASES = AOT_CASES + _received_aot_cases()

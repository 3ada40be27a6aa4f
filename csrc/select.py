"""Launchers of select.cu: the persistent kernels of vidtok.greedy_select and vidtok.dpp_select (one
thread block runs all k steps of a (video, query) problem), fed the reference's own unit rows so that
both compute the same cosines."""

from __future__ import annotations

import torch

from vidtok.csrc import module, stale_module_reasons, stream
from vidtok.reference import select as reference

# Pool mode: up to GRAM_MAX_T frames the kernels can read each step's similarities from the Gram
# matrix of the unit rows (one GEMM over the video first) instead of making one pass over x per step.
# Both give the same values (every Gram entry is the kernel's own fmaf chain over the channels), so
# the choice changes speed only, never a pick. Videos are processed in chunks whose Gram matrices fit
# GRAM_BUDGET_BYTES.
GRAM_MAX_T = 8192
GRAM_BUDGET_BYTES = 1 << 30
SIMS_PATH: str | None = None  # "gram" or "stream" forces a path (the tests check that they agree)
FORCE_GLOBAL_STATE = False  # True keeps per-candidate state in global scratch at any T (tests)
_F32_OVERFLOW = 2.0**128 - 2.0**103  # Python floats at or above this round to inf in float32
_MAX_T = 2**31 - 1


def _f32(value: float) -> float:
    """value rounded to float32 as torch rounds a Python scalar against a float32 tensor."""
    return float(torch.tensor(value, dtype=torch.float32))


def _use_gram(device: torch.device, B: int, Q: int, T: int, k: int) -> bool:
    """Pool mode or streaming. A guess until measured on a GPU (bench/NOTES.md): the Gram costs about
    B * T^2 * C / 2 FMAs spread over the whole GPU (~1.4e13 FMA/s on an H100), streaming min(k, T)
    passes of T * C * 4 bytes per problem through one SM (~1e11 B/s) in ceil(B * Q / SMs) waves."""
    if SIMS_PATH is not None:
        return SIMS_PATH == "gram"
    if T > GRAM_MAX_T:
        return False
    waves = -(-B * Q // torch.cuda.get_device_properties(device).multi_processor_count)
    return B * T <= 1000 * min(k, T) * max(waves, 1)


def _video_chunks(B: int, T: int, gram: bool):
    """(b0, b1) ranges of videos processed together: all at once when streaming, else as many as
    GRAM_BUDGET_BYTES of Gram matrices hold (at least one)."""
    step = max(1, GRAM_BUDGET_BYTES // (T * T * 4)) if gram else max(B, 1)
    return [(b0, min(b0 + step, B)) for b0 in range(0, B, step)]


def _unit_rows_channel_major(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(xt [B, C, T] float32, finite [B, T], norms [B, T]): the reference's own unit rows, transposed so
    that a warp of the kernel reads 32 consecutive frames of one channel."""
    xn, finite, norms = reference.unit_rows(x, torch.float32)
    return xn.transpose(1, 2).contiguous(), finite, norms


def _gram(xt: torch.Tensor, b0: int, b1: int, T: int, C: int, cuda_stream: int) -> torch.Tensor:
    gram = torch.empty((b1 - b0, T, T), device=xt.device, dtype=torch.float32)
    module().select_gram(xt[b0:b1].data_ptr(), gram.data_ptr(), b1 - b0, T, C, cuda_stream)
    return gram


def greedy_select_reasons(relevance, k, x, lam, min_gap, sim_thresh, pool, pool_top, timestamps) -> list[str]:
    out = stale_module_reasons("greedy_select", "select_gram")
    if any(t is not None and t.dtype == torch.float64 for t in (x, timestamps)):
        out.append("float64 x or timestamps make the reference compute in float64; the cuda kernel computes in float32")
    if not abs(lam) < _F32_OVERFLOW:
        out.append(f"the cuda kernel needs lam finite in float32, got {lam}")
    if relevance.shape[-1] >= _MAX_T:
        out.append(f"the cuda kernel takes T < 2^31 - 1 frames, got {relevance.shape[-1]}")
    return out


def greedy_select(relevance, k, x, lam, min_gap, sim_thresh, pool, pool_top, timestamps):
    B, Q, T = relevance.shape
    device, f32 = relevance.device, torch.float32
    picks = torch.full((B, Q, k), -1, dtype=torch.int32, device=device)
    if B * Q == 0 or T == 0:
        return picks
    rel = relevance.to(f32)
    eligible = torch.isfinite(rel)
    sims = lam != 0.0 or sim_thresh is not None
    xt = None
    if sims:
        xt, finite, _ = _unit_rows_channel_major(x)
        eligible = eligible & finite[:, None, :]
    eligible = reference.candidate_pool(rel, eligible, pool, pool_top)
    # the kernel's per-candidate state: relevance, NaN once a frame is not (or no longer) a candidate
    state = torch.where(eligible, rel, torch.full_like(rel, float("nan"))).contiguous()
    gap = min_gap > 0
    pos, pos_sb = None, 0
    if gap:
        if timestamps is not None:
            pos, pos_sb = timestamps.to(f32).contiguous(), T
        else:
            pos = torch.arange(T, device=device, dtype=f32)  # the reference's frame positions, one row shared
    ms = torch.empty_like(state) if sims else None
    use_gram = sims and _use_gram(device, B, Q, T, k)
    lam32, thresh32, gap32 = _f32(lam), _f32(sim_thresh if sim_thresh is not None else 0.0), _f32(min_gap)
    C = 0 if xt is None else xt.shape[1]
    with torch.cuda.device(device):
        cuda_stream = stream(relevance)
        for b0, b1 in _video_chunks(B, T, use_gram):
            gram = _gram(xt, b0, b1, T, C, cuda_stream) if use_gram else None
            module().greedy_select(
                state[b0:b1].data_ptr(), 0 if pos is None else pos.data_ptr() + 4 * b0 * pos_sb, pos_sb,
                0 if (xt is None or use_gram) else xt[b0:b1].data_ptr(), 0 if gram is None else gram.data_ptr(),
                0 if ms is None else ms[b0:b1].data_ptr(), picks[b0:b1].data_ptr(), b1 - b0, Q, T, C, k,
                lam != 0.0, lam32, sim_thresh is not None, thresh32, gap, gap32, FORCE_GLOBAL_STATE, cuda_stream,
            )
    return reference.sort_by_time(picks, T)[0]


def dpp_select_reasons(x, k, quality, eps) -> list[str]:
    out = stale_module_reasons("dpp_select", "select_gram")
    if quality is not None and quality.dtype == torch.float64:
        out.append("float64 quality makes the reference compute in float64; the cuda kernel computes in float32")
    if x.shape[1] >= _MAX_T:
        out.append(f"the cuda kernel takes T < 2^31 - 1 frames, got {x.shape[1]}")
    return out


def dpp_select(x, k, quality, eps):
    B, T, _ = x.shape
    device, f32 = x.device, torch.float32
    xt, finite, norms = _unit_rows_channel_major(x)
    # q, L_ii and eps * L_ii with the reference's tensor ops (bit-identical on the same device)
    q = torch.ones(B, 1, T, dtype=f32, device=device) if quality is None else quality.to(f32)
    q = torch.where(torch.isfinite(q), q, torch.zeros_like(q)).contiguous()
    Q, C = q.shape[1], xt.shape[1]
    diag = (q.square() * (finite & (norms > 0)).to(f32)[:, None, :]).contiguous()
    thr = (eps * diag).contiguous()
    picks = torch.full((B, Q, k), -1, dtype=torch.int32, device=device)
    d2_pick = torch.zeros((B, Q, k), dtype=f32, device=device)
    if B * Q > 0 and T > 0:
        d2 = torch.empty((B, Q, T), dtype=f32, device=device)
        cf = torch.empty((B, Q, min(k, T), T), dtype=f32, device=device)  # rows of the Cholesky factor
        use_gram = _use_gram(device, B, Q, T, k)
        with torch.cuda.device(device):
            cuda_stream = stream(x)
            for b0, b1 in _video_chunks(B, T, use_gram):
                gram = _gram(xt, b0, b1, T, C, cuda_stream) if use_gram else None
                module().dpp_select(
                    q[b0:b1].data_ptr(), diag[b0:b1].data_ptr(), thr[b0:b1].data_ptr(),
                    0 if use_gram else xt[b0:b1].data_ptr(), 0 if gram is None else gram.data_ptr(),
                    d2[b0:b1].data_ptr(), cf[b0:b1].data_ptr(), picks[b0:b1].data_ptr(), d2_pick[b0:b1].data_ptr(),
                    b1 - b0, Q, T, C, k, FORCE_GLOBAL_STATE, cuda_stream,
                )
    # the reference's gain: log of the residual at the pick, 0 beside padding
    gains = torch.where(picks >= 0, d2_pick.clamp_min(torch.finfo(f32).tiny).log(), torch.zeros_like(d2_pick))
    return reference.sort_by_time(picks, T, gains)

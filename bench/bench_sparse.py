"""Sparse video attention: vidtok against FlexAttention and dense masked SDPA, and
vidtok.build_plan against FlexAttention's create_block_mask, side by side in one run.

Groups (each one shape, one mask, every implementation):
- ``sparse_attention fwd|bwd``: vidtok.sparse_attention (the Triton kernels on a GPU, the cpu
  backend -- vidtok.cpu.sparse -- on a CPU); FlexAttention compiled
  (``torch.compile(flex_attention)``) on the same BlockMask (``plan.to_flex_block_mask()``: the plan's full and partial tiles, a mask_mod that
  reads the plan's token bits; on GPUs the same mask at 128 x 128 tiles, FLEX_BLOCK_GPU); dense SDPA with the plan's boolean mask (``plan.to_sdpa_mask()``, built
  outside the timed region; padding rows of the gated layouts have no allowed key and give NaN in
  SDPA, which does not change its cost), named "eager ..." so bench/render.py uses it as the baseline. The
  backward is timed alone: one forward with inputs that require grad, then
  ``torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)`` per call.
- ``build_plan``: vidtok.build_plan (tile classification from coordinate bounds, token predicate only
  inside partial tiles) vs ``torch.compile(create_block_mask)`` (on CPUs also compiled with
  Inductor's ``cpp.threads=1``, which ran 20-45x faster than the default on the 2-thread CPU here;
  eager create_block_mask where its N^2 mask fits) with the mask_mod a FlexAttention user writes for
  the same mask (index arithmetic on the grid; coordinate look-ups for a pruned layout). Before
  timing, the two block maps are checked to be the same tiles.

- ``top-k sparse_attention fwd|bwd``: vidtok.sparse_attention on a per-head ``build_plan_topk`` plan
  (the top-k 4x4x4 key cubes of each query cube and head plus the diagonal cube, on a cube-ordered
  layout with 64-token tiles, q/k/v from ``vidtok.testing.attention_like_qkv``) at tile densities
  0.1 / 0.2 / 0.3, beside dense SDPA with the same [B, H, N, N] boolean mask and, on GPUs,
  FlexAttention with the same per-head BlockMask.
- ``build_plan_topk``: building that plan from q and k beside the forward attention it plans, at
  32,768 tokens (target: plan <= 5 % of the attention).

Shapes: B in {1, 4}, H = 16, D in {64, 128}, bf16; grids
16x24x24 and 32x24x24 (9,216 and 18,432 tokens) and a motion-gated 16x24x24 layout
(``VideoLayout.from_keep`` of vidtok.motion_gate's keep mask on synthetic clips, ~40 % kept, a
different length per video); masks frame-local, |dt| <= 1, causal-in-time & 7x7 spatial window,
neighborhood (3, 7, 7); 64x64 tiles. Plan building also at 64x24x24 = 36,864 tokens (target:
build_plan >= 10x faster than compiled create_block_mask). These GPU shapes are collected
everywhere and skip on a CPU with the reason. On a CPU the attention groups run 16x16x16 grids
(4,096 tokens) and a motion-gated 16x16x16 layout at B = 1, H = 4, D = 64 in fp32 (every mask there
has density <= 0.3: the "cpu backend faster than dense masked SDPA" comparison), and the plan groups
run 64x24x24; FlexAttention's backward does not exist on CPUs (torch raises), so it skips there.
VIDTOK_BENCH_QUICK=1 runs a 4x8x8 smoke test only. A GPU run of everything is long (one Flex
compile per case): select with -k, e.g. ``-k "16x24x24 and B1 and D64"`` or ``-k build_plan``.

Work recorded in extra_info: ``flops`` = what the implementation
executes: for vidtok and FlexAttention the plan's computed tiles, 4 * BQ * BK * D per (tile, head)
forward and 2.5x that backward; for dense SDPA every pair, 4 * B * H * N^2 * D (x 2.5). Beside it
``useful_flops`` = the same count over the allowed token pairs only (the dense FLOPs at the mask's
density), and both as fractions of this device's measured GEMM peak (bf16 on GPUs, fp32 on CPUs,
best of 5). ``bytes_moved`` is the floor: q, k, v read and out written (forward), q, k, v, out, dout
read and dq, dk, dv written (backward).
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import vidtok
from vidtok import masks as M

ON_GPU = torch.cuda.is_available()
QUICK = os.environ.get("VIDTOK_BENCH_QUICK") == "1"
BLOCK = (64, 64)
# Compiled FlexAttention on H100-class GPUs needs BlockMask blocks that are multiples of its own
# kernel tile (128 x 128 in Inductor's default bf16 configs; 64-token blocks raise "Q and KV block
# size must be divisible by BLOCK_M and BLOCK_N", pytorch/pytorch#133562), so there it gets the same
# token mask as a 128 x 128 plan; its FLOP counts are that plan's tiles.
FLEX_BLOCK_GPU = (128, 128)
TAU = 6.0  # motion gate threshold in grey levels (as bench_motion.py)

# mask name -> spec. Spatial window 7x7 like the neighborhood's 7x7.
SPECS = {
    "frame_local": lambda: M.frame_local(),
    "dt1": lambda: M.temporal_window(1, 1),
    "causal_sw7": lambda: M.causal_in_time() & M.spatial_window(7, 7),
    "na3x7x7": lambda: M.neighborhood((3, 7, 7)),
}
MASK_LABELS = {
    "frame_local": "frame-local",
    "dt1": "abs(dt) <= 1",
    "causal_sw7": "causal-in-time & spatial 7x7",
    "na3x7x7": "neighborhood (3, 7, 7)",
}


@dataclass(frozen=True)
class Case:
    layout: str  # "TxHxW" (full grid) or "gatedTxHxW" (motion-gated, VideoLayout.from_keep)
    B: int
    H: int
    D: int
    mask: str
    where: str  # "gpu": the full-size shapes; "cpu": sized for a CPU; "quick": smoke test

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(int(x) for x in self.layout.removeprefix("gated").split("x"))

    @property
    def gated(self) -> bool:
        return self.layout.startswith("gated")

    @property
    def id(self) -> str:
        return f"{self.layout}-{self.mask}-B{self.B}-H{self.H}-D{self.D}"


def _attention_cases() -> list[Case]:
    if QUICK:
        return [Case("4x8x8", 1, 2, 32, m, "quick") for m in ("frame_local", "na3x7x7")]
    cases = [
        Case(layout, B, 16, D, mask, "gpu")
        for layout in ("16x24x24", "32x24x24", "gated16x24x24")
        for mask in SPECS
        for B in (1, 4)
        for D in (64, 128)
    ]
    cases += [Case(layout, 1, 4, 64, mask, "cpu") for layout in ("16x16x16", "gated16x16x16") for mask in SPECS]
    return cases


def _plan_cases() -> list[Case]:
    if QUICK:
        return [Case("4x8x8", 1, 1, 0, m, "quick") for m in ("frame_local", "na3x7x7")]
    # 36,864 tokens: the plan-building target, runs everywhere; the attention layouts on GPUs only
    cases = [Case("64x24x24", 1, 1, 0, mask, "any") for mask in SPECS]
    cases += [Case(layout, B, 1, 0, mask, "gpu") for layout, B in (("16x24x24", 1), ("32x24x24", 1), ("gated16x24x24", 4)) for mask in SPECS]
    return cases


def _skip_reason(case: Case, plan: bool = False) -> str | None:
    if case.where == "gpu" and not ON_GPU:
        if plan:
            return f"GPU case ({case.layout}, B={case.B}): on a CPU the plan groups run the 36,864-token target only"
        return f"GPU shape ({case.layout}, B={case.B}, H={case.H}, D={case.D}): dense SDPA alone would take minutes on a CPU"
    if case.where == "cpu" and ON_GPU:
        return "CPU-sized case; the GPU runs the full-size shapes"
    return None


def _device() -> torch.device:
    return torch.device("cuda" if ON_GPU else "cpu")


# ---------------------------------------------------------------------------------------------------
# layouts, plans, peaks (cached: the implementations of one case run back to back)


@functools.lru_cache(maxsize=2)
def _layout(name: str, B: int, device: str) -> vidtok.VideoLayout:
    T, Hp, Wp = Case(name, B, 0, 0, "", "").grid
    if not name.startswith("gated"):
        return vidtok.VideoLayout.from_grid(T, Hp, Wp, batch=B, device=device)
    from vidtok.testing import synthetic_clip

    # one clip per video (seed b): 8 moving textured squares on a static background, a scene cut at
    # T // 2; the motion gate keeps ~40 % of the 16x16 patches, a different number per video
    clips = torch.stack([synthetic_clip(T, Hp * 16, Wp * 16, objects=8, seed=b) for b in range(B)])
    keep = vidtok.motion_gate(clips, 16, TAU).keep
    return vidtok.VideoLayout.from_keep(keep.to(device))


@functools.lru_cache(maxsize=2)
def _plan(layout_name: str, B: int, mask: str, device: str) -> vidtok.SparsePlan:
    return vidtok.build_plan(_layout(layout_name, B, device), SPECS[mask](), block=BLOCK)


_GEMM_PEAK: dict[tuple[str, torch.dtype], float] = {}


def gemm_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Measured matmul FLOP/s of this device in dtype (square GEMM, best of 5): the compute roof."""
    key = (str(device), dtype)
    if key not in _GEMM_PEAK:
        n = 8192 if device.type == "cuda" else 1024
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        best = float("inf")
        for _ in range(6):
            _sync(device)
            start = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            best = min(best, time.perf_counter() - start)
        _GEMM_PEAK[key] = 2 * n**3 / best
    return _GEMM_PEAK[key]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------
# attention


def _flex():
    from torch.nn.attention.flex_attention import flex_attention

    return _compiled(flex_attention)


@functools.lru_cache(maxsize=None)
def _compiled(fn, cpp_threads: int | None = None):
    """torch.compile(fn); ``cpp_threads`` pins the thread count of Inductor's generated C++ (CPUs)."""
    options = None if cpp_threads is None else {"cpp.threads": cpp_threads}
    return torch.compile(fn, dynamic=False, options=options)


# Each case is a new shape or mask: allow the recompiles, and fail rather than silently fall back to
# eager FlexAttention (which ignores the block lists and computes the dense N^2 scores).
_DYNAMO = dict(recompile_limit=1024, accumulated_recompile_limit=4096, fail_on_recompile_limit_hit=True)


def _attention_impls(device: torch.device, backward: bool) -> dict:
    """name -> (fn(q, k, v, plan, aux) -> out, reason to skip or None). ``aux`` is what the
    implementation needs beside the plan, built outside the timed region (``_aux``)."""
    impls = {}
    vidtok_backend = "triton" if device.type == "cuda" else "cpu"
    impls[f"vidtok {vidtok_backend}"] = (
        lambda q, k, v, plan, aux: vidtok.sparse_attention(q, k, v, plan, backend=vidtok_backend),
        None,
    )
    flex_reason = None
    if QUICK:
        flex_reason = "quick mode: compiling FlexAttention takes ~20 s on a CPU"
    elif backward and device.type != "cuda":
        flex_reason = "FlexAttention has no CPU backward (torch raises NotImplementedError)"
    impls["FlexAttention compiled"] = (lambda q, k, v, plan, aux: _flex()(q, k, v, block_mask=aux), flex_reason)
    impls["eager SDPA dense bool mask"] = (
        lambda q, k, v, plan, aux: F.scaled_dot_product_attention(q, k, v, attn_mask=aux),
        None,
    )
    return impls


def _own_plan(impl: str, plan: vidtok.SparsePlan) -> vidtok.SparsePlan:
    """The plan an implementation runs: vidtok's, or on GPUs FlexAttention's 128 x 128 tiles of it."""
    if impl.startswith("FlexAttention") and plan.tile_map.is_cuda:
        return vidtok.build_plan(plan.layout, plan.spec, block=FLEX_BLOCK_GPU)
    return plan


def _aux(impl: str, plan: vidtok.SparsePlan):
    """The SDPA boolean mask [B, 1, N, N], FlexAttention's BlockMask, or nothing (vidtok reads the plan)."""
    if impl.startswith("eager SDPA"):
        return plan.to_sdpa_mask()
    if impl.startswith("FlexAttention"):
        return plan.to_flex_block_mask()
    return None


def _attention_params(backward: bool):
    device = _device()
    for case in _attention_cases():
        reason = _skip_reason(case)
        for name, (_, impl_reason) in _attention_impls(device, backward).items():
            why = reason or impl_reason
            marks = [pytest.mark.skip(reason=why)] if why else []
            if case.where == "gpu":
                marks.append(pytest.mark.gpu)
            yield pytest.param(case, name, id=f"{case.id}-{name}", marks=marks)


def _attention_work(plan: vidtok.SparsePlan, case: Case, dtype: torch.dtype, backward: bool) -> dict:
    BQ, BK = plan.block
    N, H, D, B = plan.num_tokens, case.H, case.D, plan.batch
    mult = 2.5 if backward else 1.0
    elt = torch.finfo(dtype).bits // 8
    tiles = plan.num_full + plan.num_partial  # over the whole batch
    return {
        "plan_flops": int(mult * 4 * BQ * BK * D * tiles * H),
        "useful_flops": int(mult * 4 * D * H * plan.allowed_pairs),
        "dense_flops": int(mult * 4 * B * H * N * N * D),
        "bytes_moved": (8 if backward else 4) * B * H * N * D * elt + B * H * N * 4,
        "density": plan.density,
        "tile_density": plan.tile_density,
        "num_tokens": N,
        "valid_tokens": int(plan.lengths.sum()),
        "full_tiles": plan.num_full,
        "partial_tiles": plan.num_partial,
    }


def _run_attention(case: Case, impl: str, device, measure, benchmark, backward: bool):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    plan = _plan(case.layout, case.B, case.mask, str(device))
    N = plan.num_tokens
    direction = "bwd" if backward else "fwd"
    benchmark.group = (
        f"sparse_attention {direction} {case.layout} ({N} tokens) {MASK_LABELS[case.mask]} "
        f"B={case.B} H={case.H} D={case.D} {str(dtype)[6:]}"
    )
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(case.B, case.H, N, case.D, generator=g).to(device, dtype) for _ in range(3))
    fn = _attention_impls(device, backward)[impl][0]
    plan = _own_plan(impl, plan)
    aux = _aux(impl, plan)
    work = _attention_work(plan, case, dtype, backward)
    executed = work["dense_flops"] if impl.startswith("eager SDPA") else work["plan_flops"]
    # one call of the slowest CPU case is ~1 s; GPU calls are milliseconds
    iterations, rounds = (3, 10) if device.type == "cuda" else (1, 3)
    with torch._dynamo.config.patch(**_DYNAMO):
        if backward:
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            out = fn(q, k, v, plan, aux)
            dout = torch.randn(out.shape, generator=g).to(device, dtype)
            seconds = measure(
                lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
                bytes_moved=work["bytes_moved"], flops=executed, iterations=iterations, rounds=rounds,
            )
        else:
            with torch.no_grad():
                seconds = measure(lambda: fn(q, k, v, plan, aux), bytes_moved=work["bytes_moved"], flops=executed,
                                  iterations=iterations, rounds=rounds)
    peak = gemm_peak(device, dtype)
    info = benchmark.extra_info
    info.update(work)
    info["block"] = list(plan.block)
    info["executed_flops"] = executed
    info["useful_TFLOPps"] = work["useful_flops"] / seconds / 1e12
    info["gemm_peak_TFLOPps"] = peak / 1e12
    info["fraction_of_gemm_peak"] = executed / seconds / peak
    info["useful_fraction_of_gemm_peak"] = work["useful_flops"] / seconds / peak


@pytest.mark.parametrize("case,impl", list(_attention_params(backward=False)))
def bench_sparse_attention_forward(case, impl, device, measure, benchmark):
    _run_attention(case, impl, device, measure, benchmark, backward=False)


@pytest.mark.parametrize("case,impl", list(_attention_params(backward=True)))
def bench_sparse_attention_backward(case, impl, device, measure, benchmark):
    _run_attention(case, impl, device, measure, benchmark, backward=True)


# ---------------------------------------------------------------------------------------------------
# plan building


def _mask_mod(case: Case, layout: vidtok.VideoLayout):
    """The mask_mod a FlexAttention user writes for the case's mask: (t, h, w) from the token index
    on a full grid, from coordinate tables (and a valid-token test) on a pruned layout."""
    T, Hg, Wg = layout.grid
    if case.gated:
        ct, ch, cw = (c.contiguous() for c in layout.coords.long().unbind(-1))
        video = (layout.kind == 1).contiguous()

        def pos(b, i):
            return ct[b, i], ch[b, i], cw[b, i]
    else:
        video = None

        def pos(b, i):
            return i // (Hg * Wg), (i // Wg) % Hg, i % Wg

    def frame_local(tq, hq, wq, tk, hk, wk):
        return tq == tk

    def dt1(tq, hq, wq, tk, hk, wk):
        return (tk >= tq - 1) & (tk <= tq + 1)

    def causal_sw7(tq, hq, wq, tk, hk, wk):
        return (tk <= tq) & ((hq - hk).abs() <= 3) & ((wq - wk).abs() <= 3)

    def na3x7x7(tq, hq, wq, tk, hk, wk):
        # NATTEN, odd kernels: window centre = query clamped to [K // 2, L - 1 - K // 2]
        ok = None
        for qd, kd, K, L in ((tq, tk, 3, T), (hq, hk, 7, Hg), (wq, wk, 7, Wg)):
            near = (kd - qd.clamp(K // 2, L - 1 - K // 2)).abs() <= K // 2
            ok = near if ok is None else ok & near
        return ok

    rule = {"frame_local": frame_local, "dt1": dt1, "causal_sw7": causal_sw7, "na3x7x7": na3x7x7}[case.mask]

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = rule(*pos(b, q_idx), *pos(b, kv_idx))
        if video is not None:
            allowed = allowed & video[b, q_idx] & video[b, kv_idx]
        return allowed

    return mask_mod


def _plan_impls(device: torch.device) -> dict:
    """name -> reason to skip or None.

    Two compiled baselines on CPUs: Inductor's default C++ (as many threads as torch) and the same
    kernel generated for one thread. On the 2-thread CPU of bench/NOTES.md the default one ran
    20-45x slower than the one-thread one on the frame-granular masks (abs(dt) <= 1 at 36,864
    tokens: ~480 ms vs 10-20 ms, idle machine) and ~1.2x faster on the partial-heavy ones: both are
    kept, and a comparison takes the faster."""
    compile_reason = "quick mode: compiling create_block_mask takes ~10 s on a CPU" if QUICK else None
    return {
        "vidtok build_plan": None,
        "compiled create_block_mask": compile_reason,
        "compiled create_block_mask cpp.threads=1": compile_reason
        or ("Inductor's C++ thread option: CPU only" if device.type == "cuda" else None),
        "eager create_block_mask": None if QUICK or device.type == "cuda" else
        "materialises the N^2 mask: 13.7 GB peak and ~26 s per call at 36,864 tokens on this CPU",
    }


def _plan_params():
    device = _device()
    for case in _plan_cases():
        for name, impl_reason in _plan_impls(device).items():
            why = _skip_reason(case, plan=True) or impl_reason
            marks = [pytest.mark.skip(reason=why)] if why else []
            if case.where == "gpu":
                marks.append(pytest.mark.gpu)
            yield pytest.param(case, name, id=f"{case.layout}-{case.mask}-B{case.B}-{name}", marks=marks)


@pytest.mark.parametrize("case,impl", list(_plan_params()))
def bench_build_plan(case, impl, device, measure, benchmark):
    from torch.nn.attention.flex_attention import create_block_mask

    layout = _layout(case.layout, case.B, str(device))
    spec = SPECS[case.mask]()
    B, N = layout.batch, layout.num_tokens
    benchmark.group = f"build_plan {case.layout} ({N} tokens) B={B} {MASK_LABELS[case.mask]} block={BLOCK}"
    plan = vidtok.build_plan(layout, spec, block=BLOCK)
    mask_mod = _mask_mod(case, layout)
    # a full grid's mask is the same for every video: FlexAttention users broadcast B = 1
    flex_B = B if case.gated else 1
    if impl == "vidtok build_plan":
        fn = lambda: vidtok.build_plan(layout, spec, block=BLOCK)  # noqa: E731
        pairs = plan.num_partial * BLOCK[0] * BLOCK[1]
    else:
        if impl.startswith("compiled"):
            build = _compiled(create_block_mask, 1 if impl.endswith("cpp.threads=1") else None)
        else:
            build = create_block_mask
        fn = lambda: build(mask_mod, flex_B, 1, N, N, device=device, BLOCK_SIZE=BLOCK)  # noqa: E731
        pairs = flex_B * N * N
        with torch._dynamo.config.patch(**_DYNAMO):
            block_mask = fn()
        # the baseline builds the same tiles as the plan (else the comparison means nothing)
        tiles = block_mask.to_dense()[:, 0].bool().expand(B, -1, -1)
        assert torch.equal(tiles, plan.tile_map[:, 0] != 0), "create_block_mask's tiles differ from build_plan's"
        benchmark.extra_info["flex_full_tiles"] = int(block_mask.full_kv_num_blocks.sum()) * (B // flex_B)
    nQ, nK = plan.tile_map.shape[2:]
    # floor: read the token coordinates (int32 x 3 + int8 kind), write one int32 per tile pair
    bytes_moved = B * N * 13 + B * nQ * nK * 4
    # the slowest CPU case (a partial-heavy plan at 36,864 tokens) takes seconds per call
    rounds = 10 if device.type == "cuda" else 3
    with torch._dynamo.config.patch(**_DYNAMO):
        measure(fn, bytes_moved=bytes_moved, iterations=1, rounds=rounds)
    info = benchmark.extra_info
    info["num_tokens"] = N
    info["token_pairs_evaluated"] = pairs
    info["density"] = plan.density
    info["tile_density"] = plan.tile_density
    info["full_tiles"] = plan.num_full
    info["partial_tiles"] = plan.num_partial


# ---------------------------------------------------------------------------------------------------
# data-dependent plans: build_plan_topk (per head) and attention on them

# (grid, cube, B, H, D, where): cube-ordered layouts, 64-token tiles = 4x4x4 cubes, as VSA runs them
TOPK_ATTENTION = [((16, 16, 16), 1, 4, 64, "cpu"), ((32, 32, 32), 1, 16, 128, "gpu"), ((16, 48, 80), 1, 24, 128, "gpu")]
TOPK_DENSITIES = (0.1, 0.2, 0.3)  # target tile densities: topk = density * nK
TOPK_PLAN = [((32, 32, 32), 1, 4, 64, "any"), ((32, 32, 32), 1, 16, 128, "gpu")]  # 32,768 tokens
if QUICK:
    TOPK_ATTENTION = [((8, 8, 8), 1, 2, 32, "quick")]
    TOPK_PLAN = [((8, 8, 8), 1, 2, 32, "quick")]


def _topk_inputs(grid, B, H, D, device, dtype):
    """q, k, v [B, H, N, D] in a cube-ordered layout's order, with the spatial and temporal structure
    of vidtok.testing.attention_like_qkv (random inputs make every tile look alike)."""
    from vidtok.testing import attention_like_qkv

    layout = vidtok.VideoLayout.from_grid(*grid, cube=(4, 4, 4), batch=B, device=device)
    q, k, v = attention_like_qkv(grid, B, H, D, seed=0)
    return layout, *(layout.permute(x.to(device, dtype)) for x in (q, k, v))


def _topk_params(cases, impls):
    for grid, B, H, D, where in cases:
        for density in TOPK_DENSITIES if cases is TOPK_ATTENTION and not QUICK else (0.2,):
            for impl in impls:
                why = None
                if where == "gpu" and not ON_GPU:
                    why = f"GPU shape ({'x'.join(map(str, grid))}, H={H}, D={D}): minutes per call on a CPU"
                elif where == "cpu" and ON_GPU:
                    why = "CPU-sized case; the GPU runs the full-size shapes"
                elif impl.startswith("FlexAttention") and not ON_GPU:
                    why = "FlexAttention has no CPU backward, and its CPU forward is not the baseline here"
                marks = [pytest.mark.skip(reason=why)] if why else []
                yield pytest.param(grid, B, H, D, density, impl, marks=marks,
                                   id=f"{'x'.join(map(str, grid))}-B{B}-H{H}-D{D}-density{density}-{impl}")


def _topk_plan(layout, q, k, density):
    nK = -(-layout.num_tokens // BLOCK[1])
    always = vidtok.build_plan(layout, M.cube_window((4, 4, 4)), block=BLOCK)  # the diagonal cube
    return vidtok.build_plan_topk(q, k, layout, topk=max(1, round(density * nK)), always=always)


_TOPK_ATTENTION_IMPLS = ("vidtok per-head top-k", "eager SDPA dense bool mask", "FlexAttention compiled")


@pytest.mark.parametrize("grid,B,H,D,density,impl", list(_topk_params(TOPK_ATTENTION, _TOPK_ATTENTION_IMPLS)))
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def bench_topk_attention(grid, B, H, D, density, impl, direction, device, measure, benchmark):
    """Attention on a per-head build_plan_topk plan (top-k 4x4x4 key cubes per query cube and head,
    plus the diagonal) beside dense SDPA with the same [B, H, N, N] boolean mask and, on GPUs,
    FlexAttention with the same per-head BlockMask."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layout, q, k, v = _topk_inputs(grid, B, H, D, device, dtype)
    plan = _topk_plan(layout, q, k, density)
    N = layout.num_tokens
    benchmark.group = (f"top-k sparse_attention {direction} {'x'.join(map(str, grid))} ({N} tokens, 4x4x4 cubes) "
                       f"tile density ~{density} B={B} H={H} D={D} {str(dtype)[6:]}")
    if impl.startswith("vidtok"):
        fn = lambda q, k, v: vidtok.sparse_attention(q, k, v, plan)  # noqa: E731
    elif impl.startswith("eager SDPA"):
        mask = plan.to_sdpa_mask()
        fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
    else:
        block_mask = plan.to_flex_block_mask()
        fn = lambda q, k, v: _flex()(q, k, v, block_mask=block_mask)  # noqa: E731
    backward = direction == "bwd"
    work = _attention_work(plan, Case("x".join(map(str, grid)), B, 1, D, "", ""), dtype, backward)  # H in the plan
    executed = work["dense_flops"] * H if impl.startswith("eager SDPA") else work["plan_flops"]
    iterations, rounds = (3, 10) if device.type == "cuda" else (1, 3)
    with torch._dynamo.config.patch(**_DYNAMO):
        if backward:
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            out = fn(q, k, v)
            dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
            seconds = measure(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
                              bytes_moved=work["bytes_moved"] * H, flops=executed, iterations=iterations, rounds=rounds)
        else:
            with torch.no_grad():
                seconds = measure(lambda: fn(q, k, v), bytes_moved=work["bytes_moved"] * H, flops=executed,
                                  iterations=iterations, rounds=rounds)
    info = benchmark.extra_info
    info.update({name: work[name] for name in ("density", "tile_density", "num_tokens")})
    info["executed_flops"] = executed
    info["useful_TFLOPps"] = work["useful_flops"] / seconds / 1e12


@pytest.mark.parametrize("grid,B,H,D,density,impl", list(_topk_params(TOPK_PLAN, ("vidtok build_plan_topk", "vidtok sparse_attention fwd on that plan"))))
def bench_build_plan_topk(grid, B, H, D, density, impl, device, measure, benchmark):
    """Building a per-head top-k plan from q and k (pool, coarse scores, top-k, union with the
    diagonal, CSR) beside the forward attention it plans: target plan <= 5 % of attention at
    32,768 tokens. The diagonal's static plan is built once outside the timed region."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layout, q, k, v = _topk_inputs(grid, B, H, D, device, dtype)
    nK = -(-layout.num_tokens // BLOCK[1])
    always = vidtok.build_plan(layout, M.cube_window((4, 4, 4)), block=BLOCK)
    topk = max(1, round(density * nK))
    plan = vidtok.build_plan_topk(q, k, layout, topk=topk, always=always)
    benchmark.group = (f"build_plan_topk {'x'.join(map(str, grid))} ({layout.num_tokens} tokens, 4x4x4 cubes) topk={topk} "
                       f"B={B} H={H} D={D} {str(dtype)[6:]}")
    if impl == "vidtok build_plan_topk":
        fn = lambda: vidtok.build_plan_topk(q, k, layout, topk=topk, always=always)  # noqa: E731
        bytes_moved = 2 * q.numel() * q.element_size() + plan.tile_map.numel() * 4
    else:
        fn = lambda: vidtok.sparse_attention(q, k, v, plan)  # noqa: E731
        bytes_moved = 4 * q.numel() * q.element_size()
    with torch.no_grad():
        measure(fn, bytes_moved=bytes_moved, iterations=3 if device.type == "cuda" else 1, rounds=10 if device.type == "cuda" else 3)
    benchmark.extra_info["density"] = plan.density
    benchmark.extra_info["tile_density"] = plan.tile_density

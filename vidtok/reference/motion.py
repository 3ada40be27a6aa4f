"""Reference implementations for gated residual motion skipping: the spec of vidtok.motion.

Layout: video ``[B, T, C, H, W]``, patch (ph, pw), tubelet ts, grid (T' = T / ts, h = H / ph,
w = W / pw); every per-patch output is ``[B, T', h, w]`` and flat positions are (t, h, w) row-major,
``n = t * h * w + i * w + j``.

Exactness: uint8 video is differenced and summed in integers, and the one float operation at the end
(int -> fp32, a division by the element count, a square root) is correctly rounded IEEE arithmetic,
which the Triton kernel reproduces with ``div_rn``/``sqrt_rn``. So deltas, and every mask derived from
them, are bit-identical across backends on uint8 input. Float video is differenced in fp32; sums then
depend on the summation order (within fp32 rounding).
"""

from __future__ import annotations

import torch

def patchify(video: torch.Tensor, ph: int, pw: int, ts: int) -> torch.Tensor:
    """``[B, T, C, H, W]`` -> ``[B, T', h, w, ts * C * ph * pw]`` (int32 for uint8, else fp32)."""
    B, T, C, H, W = video.shape
    x = video.reshape(B, T // ts, ts, C, H // ph, ph, W // pw, pw).permute(0, 1, 4, 6, 2, 3, 5, 7)
    x = x.reshape(B, T // ts, H // ph, W // pw, ts * C * ph * pw)
    return x.to(torch.int32 if video.dtype == torch.uint8 else torch.float32)


def _compare_sides(video: torch.Tensor, ph: int, pw: int, ts: int, reduce: str):
    """(cur, cand): ``cur[:, k]`` is what slice k shows, ``cand[:, k]`` what slice k leaves as the
    reference for later slices. They are the same tubelet, except in RLT's rule (rccchoudhury/rlt,
    ``batched_find_idxs_to_keep``), where the last frame of tubelet k is compared with the first frame
    of tubelet k - 1."""
    if reduce != "rlt":
        x = patchify(video, ph, pw, ts)
        return x, x
    last = patchify(video[:, ts - 1 :: ts], ph, pw, 1)
    first = patchify(video[:, ::ts], ph, pw, 1)
    return last, first


# the patch dims of the grid layout [..., F, C, h, ph, w, pw]
PATCH_DIMS = (-6, -5, -3, -1)


def _grid_sides(video: torch.Tensor, ph: int, pw: int, ts: int, reduce: str):
    """``_compare_sides`` in the grid layout ``[B, T', F, C, h, ph, w, pw]`` (F = ts frames, 1 for
    RLT), a view of the video where its strides allow: no per-patch copy of the clip."""
    B, T, C, H, W = video.shape
    if reduce != "rlt":
        x = video.reshape(B, T // ts, ts, C, H // ph, ph, W // pw, pw)
        return x, x
    grid = (B, T // ts, 1, C, H // ph, ph, W // pw, pw)
    return video[:, ts - 1 :: ts].reshape(grid), video[:, ::ts].reshape(grid)


def _difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a - b: int16 for uint8 (exact, |d| <= 255), else fp32."""
    wide = torch.int16 if a.dtype == torch.uint8 else torch.float32
    return a.to(wide) - b.to(wide)


def reduce_diff(diff: torch.Tensor, reduce: str, dims: tuple[int, ...] = (-1,)) -> torch.Tensor:
    """Reduce ``dims`` of ``cur - ref`` (integer or fp32) to an fp32 change score.

    mean_abs (and rlt): mean |d|; l2: sqrt(sum d^2) (the Euclidean norm, as Eventful's
    TokenNormThreshold); max_abs: max |d|. Integer sums are exact (int64) and rounded to fp32 once.
    """
    n = 1
    for d in dims:
        n *= diff.shape[d]
    integer = not diff.is_floating_point()
    total = torch.int64 if integer else None
    # The square root and the division are taken in fp64 of the fp32 operands and rounded to fp32,
    # which is the correctly rounded fp32 result (53 >= 2 * 24 + 2 bits; Figueroa 1995), as the
    # kernels' sqrt_rn/div_rn. torch's fp32 CPU sqrt is not: it is off by one ulp on some inputs.
    if reduce == "l2":
        sq = diff.to(torch.int32).square() if integer else diff.square()
        return torch.sqrt(sq.sum(dims, dtype=total).to(torch.float32).double()).to(torch.float32)
    if reduce == "max_abs":
        return diff.abs().amax(dims).to(torch.float32)
    return (diff.abs().sum(dims, dtype=total).to(torch.float32).double() / n).to(torch.float32)


def patch_delta(video: torch.Tensor, ph: int, pw: int, ts: int = 1, reduce: str = "mean_abs") -> torch.Tensor:
    """fp32 ``[B, T', h, w]``: the change of every patch from the same patch one tubelet earlier;
    slice 0 is +inf. ``reduce="rlt"`` is RLT's rule: mean |last frame of tubelet k - first frame of
    tubelet k - 1| over (C, ph, pw)."""
    cur, cand = _grid_sides(video, ph, pw, ts, reduce)
    B, Tq, _, _, h, _, w, _ = cur.shape
    first = torch.full((B, min(Tq, 1), h, w), float("inf"), dtype=torch.float32, device=video.device)
    return torch.cat([first, reduce_diff(_difference(cur[:, 1:], cand[:, :-1]), reduce, PATCH_DIMS)], dim=1)


def carry_and_run_length(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From keep bool ``[B, T', h, w]``: carry int32 (flat position of the kept patch that stands for
    each slot, -1 where no patch was kept yet at that location) and run_length int32 (for a kept
    patch, the slices until the next kept one at its location or the end; 0 for dropped slots)."""
    B, Tq, h, w = keep.shape
    t = torch.arange(Tq, device=keep.device).view(1, Tq, 1, 1)
    last = torch.where(keep, t, -1).cummax(dim=1).values
    spatial = torch.arange(h * w, device=keep.device).view(1, 1, h, w)
    carry = torch.where(last >= 0, last * (h * w) + spatial, -1)
    # next kept slice strictly after t: a reverse cummin of the kept slice indices, shifted by one
    kept_t = torch.where(keep, t, Tq)
    nxt = kept_t.flip(1).cummin(dim=1).values.flip(1)
    nxt = torch.cat([nxt[:, 1:], torch.full_like(nxt[:, :1], Tq)], dim=1)
    run = torch.where(keep, nxt - t, 0)
    return carry.to(torch.int32), run.to(torch.int32)


def motion_gate(
    video: torch.Tensor,
    ph: int,
    pw: int,
    threshold: float,
    compare_to: str = "last_kept",
    ts: int = 1,
    reduce: str = "mean_abs",
    refresh_every: int = 0,
    max_run: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keep bool, delta fp32, run_length int32, carry int32), each ``[B, T', h, w]``.

    Slice k of a location is kept iff k == 0, or ``refresh_every`` > 0 and k % refresh_every == 0, or
    ``max_run`` > 0 and k - (last kept slice) >= max_run, or delta > threshold (strict, as RLT). delta
    compares slice k with the previous slice ("prev", RLT) or with the slice last kept at that location
    ("last_kept", Eventful Transformers' TokenGate: unsent change accumulates, so nothing drifts away).
    Slice 0's delta is +inf. ``refresh_every``/``max_run`` of 0 mean none. The walk through time is
    sequential by nature; it is vectorised over (B, h, w).
    """
    cur, cand = _grid_sides(video, ph, pw, ts, reduce)  # [B, T', F, C, h, ph, w, pw]
    B, Tq, _, _, h, _, w, _ = cur.shape
    thr = torch.tensor(threshold, dtype=torch.float32)
    if compare_to == "prev":
        deltas = patch_delta(video, ph, pw, ts, reduce)
    keep = torch.zeros(B, Tq, h, w, dtype=torch.bool, device=video.device)
    delta = torch.empty(B, Tq, h, w, dtype=torch.float32, device=video.device)
    if Tq == 0:
        return (keep, delta, *reversed(carry_and_run_length(keep)))
    kept_copy = cand[:, 0]  # what each location's next slice is compared with
    last = torch.zeros(B, h, w, dtype=torch.int64, device=video.device)
    keep[:, 0] = True
    delta[:, 0] = float("inf")
    for k in range(1, Tq):
        d = deltas[:, k] if compare_to == "prev" else reduce_diff(_difference(cur[:, k], kept_copy), reduce, PATCH_DIMS)
        forced = (refresh_every > 0 and k % refresh_every == 0) | ((max_run > 0) & (k - last >= max_run))
        kk = (d > thr) | forced
        keep[:, k] = kk
        delta[:, k] = d
        last = torch.where(kk, k, last)
        kept_copy = cand[:, k] if compare_to == "prev" else torch.where(kk[:, None, None, :, None, :, None], cand[:, k], kept_copy)
    carry, run = carry_and_run_length(keep)
    return keep, delta, run, carry


def block_match(cur: torch.Tensor, ref: torch.Tensor, block: int = 16, radius: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Exhaustive block matching by the sum of absolute differences (SAD).

    cur, ref: ``[B, H, W]`` luma (uint8: exact integer SAD; float: fp32). Block (i, j) of cur covers
    rows ``i*block : (i+1)*block`` and columns ``j*block : (j+1)*block``; candidate motion (dy, dx),
    ``|dy|, |dx| <= radius``, compares it with the ref block displaced by (dy, dx), which must lie
    inside the frame (no padding). Returns motion int16 ``[B, h, w, 2]`` (dy, dx) and cost fp32
    ``[B, h, w]`` (the SAD). Ties prefer the smaller motion |dy| + |dx|, then the lower candidate index
    (row-major over dy, then dx, from -radius). A block whose zero-motion SAD is NaN keeps motion 0 and
    cost NaN. One vectorised pass per candidate: (2 radius + 1)^2 frame-sized differences.
    """
    B, H, W = cur.shape
    h, w = H // block, W // block
    n = 2 * radius + 1
    # fp32 for uint8 too: the sums are integers below 255 * 256^2 < 2^24 (block <= 256), so exact in
    # any order, and fp32 runs ~8x faster than int32 on CPUs (measured: 544x960, r = 8, 2 threads)
    c = cur.to(torch.float32)
    padded = torch.nn.functional.pad(ref.to(torch.float32), (radius, radius, radius, radius))
    # the cost volume [B, h, w, n, n], one row of displacements (all dx for one dy) at a time
    costs = []
    for dy in range(-radius, radius + 1):
        shifted = padded[:, radius + dy : radius + dy + H].unfold(2, W, 1)  # [B, H, n (dx), W]
        diff = (c[:, :, None] - shifted).abs_()
        sad = diff.view(B, H, n, w, block).sum(-1).view(B, h, block, n, w).sum(2)  # [B, h, n, w]
        costs.append(sad.permute(0, 1, 3, 2))
    cost = torch.stack(costs, dim=3)  # [B, h, w, n (dy), n (dx)]
    span = torch.arange(-radius, radius + 1, device=cur.device)
    ys = torch.arange(h, device=cur.device) * block
    xs = torch.arange(w, device=cur.device) * block
    inside_y = (ys[:, None] + span >= 0) & (ys[:, None] + span + block <= H)  # [h, n]
    inside_x = (xs[:, None] + span >= 0) & (xs[:, None] + span + block <= W)  # [w, n]
    inside = inside_y[:, None, :, None] & inside_x[None, :, None, :]  # [h, w, n, n]
    cost = cost.flatten(3)
    zero_cost = cost[..., radius * n + radius]
    # outside the frame, and NaN, never wins; ties: smaller |dy| + |dx|, then the lower index
    usable = torch.where(inside.flatten(2) & ~cost.isnan(), cost, float("inf"))
    best = usable.amin(-1, keepdim=True)
    order = (span.abs()[:, None] + span.abs()[None, :]).flatten() * n * n + torch.arange(n * n, device=cur.device)
    choice = torch.where(usable == best, order, n * n * (2 * n + 1)).argmin(-1)
    motion = torch.stack([span[choice // n], span[choice % n]], dim=-1).to(torch.int16)
    cost = best[..., 0]
    # a NaN zero-motion SAD keeps motion 0 and cost NaN
    nan = zero_cost.isnan()
    motion = torch.where(nan[..., None], 0, motion)
    cost = torch.where(nan, zero_cost, cost)
    return motion, cost


def _candidates(radius: int) -> list[tuple[int, int]]:
    """Motions (dy, dx) with |dy|, |dx| <= radius in preference order: smaller |dy| + |dx| first,
    then the lower row-major index (as block_match)."""
    span = range(-radius, radius + 1)
    cands = [(dy, dx) for dy in span for dx in span]
    return [cands[n] for n in sorted(range(len(cands)), key=lambda n: (abs(cands[n][0]) + abs(cands[n][1]), n))]


def search_windows(side: torch.Tensor, ph: int, pw: int, radius: int) -> torch.Tensor:
    """``[B, T', F, C, H, W]`` -> a view ``[B, T', h, w, F, C, ph + 2r, pw + 2r]``: every patch with
    ``radius`` pixels of context (zero outside the frame; candidates reaching there are never chosen)."""
    r = radius
    padded = torch.nn.functional.pad(side, (r, r, r, r))
    return padded.unfold(4, ph + 2 * r, ph).unfold(5, pw + 2 * r, pw).permute(0, 1, 4, 5, 2, 3, 6, 7)


def motion_gate_compensated(
    video: torch.Tensor,
    ph: int,
    pw: int,
    threshold: float,
    compare_to: str = "last_kept",
    ts: int = 1,
    reduce: str = "mean_abs",
    refresh_every: int = 0,
    max_run: int = 0,
    radius: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``motion_gate`` with motion compensation: (keep, delta, run_length, carry, motion int16
    ``[B, T', h, w, 2]``).

    Slice k of a patch is compared not only with the co-located patch of its reference slice (the
    previous slice or the last kept one, as in ``motion_gate``) but with every block of the reference
    slice displaced by (dy, dx), ``|dy|, |dx| <= radius``, that lies inside the frame; delta is the
    smallest reduced difference and motion the displacement that gives it (ties: smaller
    |dy| + |dx|, then the lower row-major index, as ``block_match``). A static-camera rule becomes a
    pan- and object-motion-tolerant one (GRT's motion-compensated gating, Zhang et al. 2025). Slice 0
    has motion 0. With reduce="rlt" the candidates come from the first frame of the reference tubelet.
    """
    B, T, C, H, W = video.shape
    Tq, h, w = T // ts, H // ph, W // pw
    cur, _ = _compare_sides(video, ph, pw, ts, reduce)
    acc = torch.int32 if video.dtype == torch.uint8 else torch.float32
    side = video[:, ::ts].unsqueeze(2) if reduce == "rlt" else video.reshape(B, Tq, ts, C, H, W)
    windows = search_windows(side.to(acc), ph, pw, radius)
    device = video.device
    thr = torch.tensor(threshold, dtype=torch.float32)
    bi = torch.arange(B, device=device).view(B, 1, 1)
    ii = torch.arange(h, device=device).view(1, h, 1)
    jj = torch.arange(w, device=device).view(1, 1, w)
    ys, xs = ii * ph, jj * pw
    keep = torch.zeros(B, Tq, h, w, dtype=torch.bool, device=device)
    delta = torch.empty(B, Tq, h, w, dtype=torch.float32, device=device)
    motion = torch.zeros(B, Tq, h, w, 2, dtype=torch.int16, device=device)
    if Tq == 0:
        return (keep, delta, *reversed(carry_and_run_length(keep)), motion)
    keep[:, 0] = True
    delta[:, 0] = float("inf")
    last = torch.zeros(B, h, w, dtype=torch.int64, device=device)
    for k in range(1, Tq):
        src = last if compare_to == "last_kept" else torch.full_like(last, k - 1)
        win = windows[bi, src, ii, jj]  # [B, h, w, F, C, ph + 2r, pw + 2r]: the reference slice
        best = best_mv = None
        for dy, dx in _candidates(radius):
            block = win[..., radius + dy : radius + dy + ph, radius + dx : radius + dx + pw].reshape(cur[:, k].shape)
            d = reduce_diff(cur[:, k] - block, reduce)
            if best is None:  # (0, 0): always inside the frame
                best, best_mv = d, torch.zeros(B, h, w, 2, dtype=torch.int16, device=device)
                continue
            inside = (ys + dy >= 0) & (ys + dy + ph <= H) & (xs + dx >= 0) & (xs + dx + pw <= W)
            better = inside & (d < best)
            best = torch.where(better, d, best)
            best_mv = torch.where(better[..., None], torch.tensor([dy, dx], dtype=torch.int16, device=device), best_mv)
        forced = (refresh_every > 0 and k % refresh_every == 0) | ((max_run > 0) & (k - last >= max_run))
        kk = (best > thr) | forced
        keep[:, k], delta[:, k], motion[:, k] = kk, best, best_mv
        last = torch.where(kk, k, last)
    carry, run = carry_and_run_length(keep)
    return keep, delta, run, carry, motion


def rebuild(video: torch.Tensor, keep: torch.Tensor, carry: torch.Tensor, motion: torch.Tensor | None = None) -> torch.Tensor:
    """The video a gate's decisions reproduce, in fp32: every patch (tubelet) is copied from the kept
    patch that stands for it (``carry``); a dropped one displaced by its ``motion`` when given (the
    block the motion-compensated gate compared it with under compare_to="last_kept"). Slots with no
    kept patch before them (carry -1) are zeros."""
    B, T, C, H, W = video.shape
    _, Tq, h, w = keep.shape
    ts, ph, pw = T // Tq, H // h, W // w
    side = video.reshape(B, Tq, ts, C, H, W).to(torch.float32)
    src_t = (carry.clamp_min(0) // (h * w)).long()
    bi = torch.arange(B, device=video.device).view(B, 1, 1, 1)
    ii = torch.arange(h, device=video.device).view(1, 1, h, 1)
    jj = torch.arange(w, device=video.device).view(1, 1, 1, w)
    if motion is None:
        patches = patchify(video.to(torch.float32), ph, pw, ts)[bi, src_t, ii, jj]  # [B, T', h, w, E]
        patches = patches.view(B, Tq, h, w, ts, C, ph, pw)
    else:
        motion = torch.where(keep[..., None], 0, motion)  # a kept patch is its own copy, undisplaced
        r = int(motion.abs().max()) if motion.numel() else 0
        win = search_windows(side, ph, pw, r)[bi, src_t, ii, jj]  # [B, T', h, w, ts, C, ph + 2r, pw + 2r]
        rows = (r + motion[..., 0].long())[..., None, None, None, None] + torch.arange(ph, device=video.device).view(ph, 1)
        cols = (r + motion[..., 1].long())[..., None, None, None, None] + torch.arange(pw, device=video.device).view(1, pw)
        win = win.take_along_dim(rows.expand(B, Tq, h, w, ts, C, ph, pw + 2 * r), dim=6)
        patches = win.take_along_dim(cols.expand(B, Tq, h, w, ts, C, ph, pw), dim=7)
    patches = torch.where((carry >= 0).view(B, Tq, h, w, 1, 1, 1, 1), patches, 0)
    return patches.permute(0, 1, 4, 5, 2, 6, 3, 7).reshape(B, T, C, H, W)

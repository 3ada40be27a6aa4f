"""Gated residual motion skipping: vidtok against the eager PyTorch code the paper repos write.

- motion_gate: vidtok's gate (RLT's rule with compare_to="prev", and the drift-free "last_kept") vs an
  eager RLT-style gate (float video, slices of the last/first frames of the tubelets, avg_pool3d over
  patches, mean over channels; re-derived from the rule of RLT, Choudhury et al., NeurIPS 2024).
  Floor: one read of the uint8 clip; outputs (keep, delta, run_length, carry: 13 bytes per patch) are small.
- block_match: vidtok's exhaustive SAD search vs an eager unfold-based matcher that materialises the
  (2r + 1)^2 candidate blocks of every block. Floor: two luma frames, but (2r + 1)^2 absolute
  differences per pixel (289 at r = 8): compute-bound; FLOPs counted as 3 per difference (sub, abs, add).
"""

import os

import pytest
import torch
import torch.nn.functional as F

import vidtok
from vidtok.testing import runnable_backends

QUICK = os.environ.get("VIDTOK_BENCH_QUICK") == "1"
# (B, T, H, W, patch, tubelet): action-recognition clips and a long 720p video
GATE_SHAPES = [(2, 8, 64, 64, 16, 2)] if QUICK else [(32, 16, 224, 224, 16, 2), (1, 64, 720, 1280, 16, 1)]
# (B, H, W, block, radius): one 1080p luma frame at radius 8 (1088 rows: a multiple of the block)
MATCH_SHAPES = [(1, 64, 64, 16, 2)] if QUICK else [(1, 1088, 1920, 16, 8)]
TAU = 6.0  # grey levels: about RLT's default tau = 0.1 in ImageNet z-units


def _rlt_eager(video, patch, ts, tau):
    x = video.float().permute(0, 2, 1, 3, 4)  # [B, C, T, H, W]
    d = (x[:, :, 2 * ts - 1 :: ts] - x[:, :, : -ts : ts]).abs()
    score = F.avg_pool3d(d, (1, patch, patch)).mean(1)
    score = torch.cat([torch.full_like(score[:, :1], 255.0), score], dim=1)
    return score > tau


def _gate_impls(device):
    impls = {"eager RLT-style gate": lambda v, p, ts: _rlt_eager(v, p, ts, TAU)}
    for backend in runnable_backends("motion_gate", device, torch.uint8):
        impls[f"vidtok {backend} rlt/prev"] = lambda v, p, ts, b=backend: vidtok.motion_gate(
            v, p, TAU, compare_to="prev", reduce="rlt", tubelet=ts, backend=b)
        impls[f"vidtok {backend} last_kept"] = lambda v, p, ts, b=backend: vidtok.motion_gate(
            v, p, TAU, tubelet=ts, backend=b)
    return impls


def _eager_block_match(cur, ref, block, radius):
    B, H, W = cur.shape
    h, w = H // block, W // block
    padded = F.pad(ref.float(), (radius,) * 4, value=float("inf"))  # out-of-frame candidates never win
    windows = padded.unfold(1, block + 2 * radius, block).unfold(2, block + 2 * radius, block)  # B h w wy wx
    cands = windows.unfold(3, block, 1).unfold(4, block, 1)  # B h w (2r+1) (2r+1) block block
    blocks = cur.float().view(B, h, block, w, block).permute(0, 1, 3, 2, 4)[:, :, :, None, None]
    sad = (cands - blocks).abs().sum((-1, -2)).flatten(3)
    cost, idx = sad.min(-1)
    return torch.stack([idx // (2 * radius + 1) - radius, idx % (2 * radius + 1) - radius], -1), cost


def _cases(shapes, impls):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for shape in shapes:
        for name in impls(device):
            yield pytest.param(shape, name, id=f"{'x'.join(map(str, shape))}-{name}")


@pytest.mark.parametrize("shape,impl", list(_cases(GATE_SHAPES, _gate_impls)))
def bench_motion_gate(shape, impl, device, measure, benchmark):
    B, T, H, W, p, ts = shape
    benchmark.group = f"motion_gate B={B} T={T} {H}x{W} patch={p} tubelet={ts} uint8"
    g = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (B, T, 3, H, W), generator=g, dtype=torch.uint8).to(device)
    fn = _gate_impls(device)[impl]
    patches = B * (T // ts) * (H // p) * (W // p)
    measure(lambda: fn(video, p, ts), bytes_moved=video.numel() + 13 * patches)


def _match_impls(device):
    impls = {"eager unfold block matcher": _eager_block_match}
    for backend in runnable_backends("block_match", device, torch.uint8):
        impls[f"vidtok {backend}"] = lambda c, r, bl, rad, b=backend: vidtok.block_match(c, r, block=bl, radius=rad, backend=b)
    return impls


@pytest.mark.parametrize("shape,impl", list(_cases(MATCH_SHAPES, _match_impls)))
def bench_block_match(shape, impl, device, measure, benchmark):
    B, H, W, block, radius = shape
    benchmark.group = f"block_match B={B} {H}x{W} block={block} radius={radius} uint8"
    g = torch.Generator().manual_seed(1)
    ref = torch.randint(0, 256, (B, H, W), generator=g, dtype=torch.uint8).to(device)
    cur = torch.roll(ref, (2, -3), (1, 2))
    fn = _match_impls(device)[impl]
    measure(lambda: fn(cur, ref, block, radius), bytes_moved=2 * cur.numel(), flops=3 * cur.numel() * (2 * radius + 1) ** 2)

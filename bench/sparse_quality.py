"""How good are data-dependent sparse attention plans? Block recall and output error of
vidtok.build_plan_topk, classify_heads + per_head_plan and static masks, at matched densities.

Inputs: ``vidtok.testing.attention_like_qkv`` -- q, k, v whose attention has the structure of a video
diffusion transformer's (heads that attend to nearby frames, to nearby positions in every frame, or
to a 3-D neighbourhood, plus a per-token random part) -- on a 16 x 16 x 16 token grid (4,096 tokens)
ordered in 4 x 4 x 4 cubes, 64-token tiles (one cube per tile, as in VSA), H = 6 heads (two of each
kind), D = 64, float32, on the CPU.

For every plan, per head and query tile (a row of tiles):
- density: allowed token pairs / all pairs; tiles: computed tile pairs / all tile pairs;
- block recall: of the c key tiles the row computes, the share that are among the c tiles holding
  the most attention mass in the exact (dense) attention of that row's queries ("the exact top-c
  tiles of the true attention"), averaged over rows and heads;
- mass: the share of the exact attention mass that falls in the plan's allowed pairs;
- output error: ||O_plan - O_dense|| / ||O_dense|| (relative L2 over all rows and heads), O_plan
  from vidtok.sparse_attention on the plan.
The "exact top-k tiles" rows choose the tiles from the dense attention itself: the best any tile
selection with that many tiles per row can do.

    python bench/sparse_quality.py [--out bench/results/sparse_topk_quality.md]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import vidtok
from vidtok import masks as M
from vidtok.testing import attention_like_qkv

GRID, CUBE, H, D, BLOCK = (16, 16, 16), (4, 4, 4), 6, 64, (64, 64)


def dense_attention(q, k, v):
    """(O [1, H, N, D], tile mass [H, nQ, nK]: mean attention mass per query row of each tile pair,
    P [H, N, N] per head computed one head at a time)."""
    N = q.shape[2]
    n = N // BLOCK[0]
    out, mass, probs = torch.empty_like(q), torch.empty(H, n, n), []
    for h in range(H):
        p = torch.softmax(q[0, h] @ k[0, h].T * D**-0.5, -1)
        out[0, h] = p @ v[0, h]
        mass[h] = p.view(n, BLOCK[0], n, BLOCK[1]).sum((1, 3)) / BLOCK[0]
        probs.append(p)
    return out, mass, probs


def exact_topk_plan(layout, mass, counts):
    """The per-head plan of the exact top-c tiles per row (c from ``counts`` [H, nQ]), by tile mass."""
    order = torch.sort(mass, dim=-1, descending=True, stable=True).indices
    keep = torch.arange(mass.shape[-1]) < counts[..., None]
    n = mass.shape[-1]
    chosen = torch.zeros(*mass.shape[:-1], n + 1, dtype=torch.bool).scatter_(-1, torch.where(keep, order, n), True)[..., :n]
    return vidtok.plan_from_tiles(layout, chosen[None], block=BLOCK)


def evaluate(name, plan, q, k, v, out, mass, probs):
    tm = plan.tile_map[0].expand(H, -1, -1)  # [H, nQ, nK]
    computed = tm != 0
    counts = computed.sum(-1)  # [H, nQ]
    order = torch.sort(mass, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order))
    hits = (computed & (rank < counts[..., None])).sum(-1)
    rows = counts > 0
    recall = float((hits[rows] / counts[rows]).mean())
    mask = plan.to_sdpa_mask()[0].expand(H, -1, -1)
    captured = float(sum((p * m).sum() for p, m in zip(probs, mask)) / (H * q.shape[2]))
    o = vidtok.sparse_attention(q, k, v, plan, backend="cpu")
    error = float((o - out).norm() / out.norm())
    return dict(plan=name, density=plan.density, tiles=float(computed.float().mean()), recall=recall, mass=captured, error=error)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sparse_topk_quality.md"))
    args = parser.parse_args()
    torch.manual_seed(0)
    layout = vidtok.VideoLayout.from_grid(*GRID, cube=CUBE)
    q, k, v = (layout.permute(x) for x in attention_like_qkv(GRID, 1, H, D, seed=0))
    out, mass, probs = dense_attention(q, k, v)
    diagonal = vidtok.build_plan(layout, M.cube_window(CUBE), block=BLOCK)
    rows = []
    start = time.perf_counter()
    for topk in (4, 8, 13, 19):
        plan = vidtok.build_plan_topk(q, k, layout, topk=topk)
        rows.append(evaluate(f"build_plan_topk topk={topk}", plan, q, k, v, out, mass, probs))
        plan = vidtok.build_plan_topk(q, k, layout, topk=topk - 1, always=diagonal)
        rows.append(evaluate(f"build_plan_topk topk={topk - 1} + diagonal cube", plan, q, k, v, out, mass, probs))
        counts = (plan.tile_map[0] != 0).sum(-1)
        rows.append(evaluate(f"exact top-k tiles (as many per row as the previous)", exact_topk_plan(layout, mass, counts),
                             q, k, v, out, mass, probs))
    for top_p in (0.5, 0.8, 0.95):
        plan = vidtok.build_plan_topk(q, k, layout, top_p=top_p, always=diagonal)
        rows.append(evaluate(f"build_plan_topk top_p={top_p} + diagonal cube", plan, q, k, v, out, mass, probs))
    pooled = vidtok.build_plan_topk(q, k, layout, topk=8, pool=(2, 4, 4), always=diagonal)
    rows.append(evaluate("build_plan_topk topk=8, pool=(2, 4, 4) + diagonal cube", pooled, q, k, v, out, mass, probs))
    specs = vidtok.default_head_specs(layout.grid)
    choice = vidtok.classify_heads(q, k, layout, specs, sample=64)
    svg = vidtok.per_head_plan([vidtok.build_plan(layout, s, block=BLOCK) for s in specs], choice)
    label = f"classify_heads: temporal_window(1, 1) or {specs[1].a!r} per head, + global tokens (chose {choice[0].tolist()})"
    rows.append(evaluate(label, svg, q, k, v, out, mass, probs))
    statics = [
        M.temporal_window(1, 1), M.spatial_window(7, 7), M.neighborhood((3, 7, 7)), M.neighborhood((5, 9, 9)),
        M.cube_window(CUBE, radius=(1, 1, 1)), M.cube_window(CUBE, radius=(0, 1, 1)), M.cube_window(CUBE, radius=(1, 0, 0)),
    ]
    for spec in statics:
        rows.append(evaluate(f"static {spec!r}".replace(", is_causal=(False, False, False)", ""),
                             vidtok.build_plan(layout, spec, block=BLOCK), q, k, v, out, mass, probs))
    seconds = time.perf_counter() - start

    head_kinds = ", ".join(f"{h}: {['nearby frames', 'nearby positions', '3-D neighbourhood'][h % 3]}" for h in range(H))
    lines = [
        "# Sparse attention plans on attention-like inputs: block recall and output error",
        "",
        f"`python bench/sparse_quality.py` (CPU, float32; {seconds:.0f} s). Grid {GRID} = {layout.num_tokens} tokens in "
        f"{CUBE} cubes, 64-token tiles, H = {H} ({head_kinds}), D = {D}; inputs `vidtok.testing.attention_like_qkv(seed=0)`.",
        "density: allowed token pairs / all pairs; tiles: computed tile pairs / all; recall: block recall against the exact",
        "top-c tiles of the dense attention (c = the tiles the row computes); mass: share of the dense attention mass kept;",
        "error: relative L2 error of the output against dense attention.",
        "",
        "| plan | density | tiles | block recall | mass kept | output error |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['plan']} | {r['density']:.3f} | {r['tiles']:.3f} | {r['recall']:.3f} | {r['mass']:.3f} | {r['error']:.4f} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()

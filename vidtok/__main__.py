"""Command line: ``python -m vidtok info | example | aot``."""

from __future__ import annotations

import argparse
import sys


def _example() -> str:
    """Run paired_similarity on synthetic video tokens with every backend that can run here."""
    import time

    import torch
    import torch.nn.functional as F

    import vidtok
    from vidtok.testing import runnable_backends, video_tokens

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = video_tokens(1, 16, 196, 768, static_fraction=0.6, device=device, seed=0)
    lines = [f"paired_similarity on {device}: x [B=1, T=16, N=196, C=768] float32, 60% static positions"]
    baseline = F.cosine_similarity(x[:, 1:], x[:, :-1], dim=-1)
    for backend in runnable_backends(device, x.dtype):
        vidtok.paired_similarity(x, 1, backend=backend)  # warm-up: first-call setup and JIT compiles
        start = time.perf_counter()
        sim = vidtok.paired_similarity(x, 1, backend=backend)
        if device == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3
        static = (sim > 0.9).float().mean().item()
        err = (sim - baseline).abs().max().item()
        lines.append(
            f"  {backend:<10} {ms:8.2f} ms   pairs with cos > 0.9: {static:.1%}  "
            f"max |diff| vs F.cosine_similarity: {err:.1e}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vidtok", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, and which backends can run here (and why not)")
    sub.add_parser("example", help="run paired_similarity on synthetic video tokens with every runnable backend")
    aot = sub.add_parser("aot", help="compile every Triton kernel for sm_80/sm_90 (no GPU needed), print resources")
    aot.add_argument("--report", help="also write the table to this file")
    aot.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    args = parser.parse_args(argv)
    if args.command == "info":
        from vidtok.info import report

        print(report())
    elif args.command == "aot":
        from vidtok.aot import main as aot_main

        print(aot_main(args.report, args.json))
    elif args.command == "example":
        print(_example())
    return 0


if __name__ == "__main__":
    sys.exit(main())

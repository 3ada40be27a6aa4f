"""The curation's output: one Parquet file per video under ``OUT/shots/``, one row per shot (or one
error row for a video that could not be curated), written whole or not at all, so a run can stop at
any point and the next one skips the videos already there."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np

from vidtok.curate.stages import Config

__all__ = ["done", "read_shots", "schema", "shot_table", "video_key", "write_table"]

SHOTS_DIR = "shots"
IMAGES_DIR = "keyframes"
DUPLICATES_FILE = "duplicates.parquet"


def schema():
    """The columns of the results, one row per shot (what each holds: the comments)."""
    import pyarrow as pa

    return pa.schema([
        ("video", pa.string()),  # the video's absolute path
        ("shot", pa.int32()),  # shot number within the video, in time order
        ("start_frame", pa.int64()),  # source frame numbers (decode order), end exclusive
        ("end_frame", pa.int64()),
        ("start_time", pa.float64()),  # seconds, end exclusive
        ("end_time", pa.float64()),
        ("frames", pa.int32()),  # analysed frames in the shot
        ("source_fps", pa.float64()),  # the stream's average frame rate (0 when unknown)
        ("motion", pa.float32()),  # mean |change| per patch between consecutive analysed frames, grey levels
        ("motion_peak", pa.float32()),  # the highest per-patch mean
        ("motion_patches", pa.list_(pa.float32())),  # per-patch means, grid_h x grid_w row-major
        ("grid_h", pa.int32()),
        ("grid_w", pa.int32()),
        ("keyframes", pa.list_(pa.int64())),  # source frame numbers, in time order
        ("keyframe_times", pa.list_(pa.float64())),
        ("keyframe_files", pa.list_(pa.string())),  # relative to the output folder; empty without images
        ("duplicate_of", pa.int32()),  # the earlier shot of the same video this one nearly repeats, -1 for none
        ("keep", pa.bool_()),  # long enough, moving within the thresholds, not a duplicate
        ("drop_reason", pa.string()),  # "short", "static", "fast" or "duplicate" (the first that applies)
        ("embedding", pa.list_(pa.float32())),  # mean unit frame embedding of the shot (256 values)
        ("error", pa.string()),  # why the video has no shots; null for curated videos
    ])


def video_key(path: str) -> str:
    """The file name (without extension) of a video's results: its name, readable, plus a hash of its
    absolute path, so two ``clip.mp4`` in different folders never collide."""
    path = os.path.abspath(path)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(path))[:80] or "video"
    return f"{stem}-{hashlib.sha1(path.encode()).hexdigest()[:12]}"


def _drop_reason(short: bool, moving: bool, motion: float, config: Config, duplicate: bool) -> str | None:
    if short:
        return "short"
    if not moving:
        return "fast" if config.max_motion is not None and motion > config.max_motion else "static"
    if duplicate:
        return "duplicate"
    return None


def shot_table(record: dict, config: Config, keyframe_files: list | None = None):
    """A video's record (after the Analyze stage) -> ``pyarrow.Table`` with ``schema()``: one row per
    shot, or one row with ``error`` set and the other columns null."""
    import pyarrow as pa

    columns = schema()
    video = str(record["video"])
    if record.get("error"):
        row = {name: [None] for name in columns.names}
        row.update(video=[video], error=[str(record["error"])])
        return pa.table(row, schema=columns)
    index, times = np.asarray(record["frame_index"]), np.asarray(record["frame_time"])
    T = len(index)
    shots = np.asarray(record["shots"])
    S = len(shots)

    def source(i):  # analysed frame i -> (source frame, seconds); T: the end of the video
        return (int(index[i]), float(times[i])) if i < T else (int(record["source_frames"]), float(record["duration"]))

    starts = [source(s) for s in shots[:, 0]]
    ends = [source(e) for e in shots[:, 1]]
    patches = np.asarray(record["motion_patches"], np.float32)
    keyframes = np.asarray(record["keyframes"])
    duplicate_of = np.asarray(record["duplicate_of"])
    motion = np.asarray(record["motion"], np.float32)
    rows = {name: [] for name in columns.names}
    for s in range(S):
        short = ends[s][1] - starts[s][1] < config.min_shot - 1e-6
        reason = _drop_reason(short, bool(record["moving"][s]), float(motion[s]), config, duplicate_of[s] >= 0)
        picked = [int(i) for i in keyframes[s] if i >= 0]
        rows["video"].append(video)
        rows["shot"].append(s)
        rows["start_frame"].append(starts[s][0])
        rows["end_frame"].append(ends[s][0])
        rows["start_time"].append(starts[s][1])
        rows["end_time"].append(ends[s][1])
        rows["frames"].append(int(shots[s, 1] - shots[s, 0]))
        rows["source_fps"].append(float(record["source_fps"]))
        rows["motion"].append(float(motion[s]))
        rows["motion_peak"].append(float(record["motion_peak"][s]))
        rows["motion_patches"].append(patches[s].ravel().tolist())
        rows["grid_h"].append(int(patches.shape[1]))
        rows["grid_w"].append(int(patches.shape[2]))
        rows["keyframes"].append([int(index[i]) for i in picked])
        rows["keyframe_times"].append([float(times[i]) for i in picked])
        rows["keyframe_files"].append(list(keyframe_files[s]) if keyframe_files else [])
        rows["duplicate_of"].append(int(duplicate_of[s]))
        rows["keep"].append(reason is None)
        rows["drop_reason"].append(reason)
        rows["embedding"].append(np.asarray(record["shot_embedding"][s], np.float32).tolist())
        rows["error"].append(None)
    return pa.table(rows, schema=columns)


def write_table(table, path: str | os.PathLike) -> None:
    """Write ``table`` to ``path`` through a temporary file and a rename: a reader (or the next run)
    sees the whole file or none."""
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def done(out: str | os.PathLike, *, with_errors: bool = True) -> set[str]:
    """The video keys that already have results in ``out``; without the error rows' videos when
    with_errors is False (to try those again)."""
    folder = Path(out) / SHOTS_DIR
    if not folder.is_dir():
        return set()
    keys = {p.stem for p in folder.glob("*.parquet")}
    if not with_errors:
        import pyarrow.parquet as pq

        keys = {k for k in keys if pq.read_table(folder / f"{k}.parquet", columns=["error"]).column(0).null_count > 0}
    return keys


def read_shots(out: str | os.PathLike):
    """Every row under ``out`` as one ``pyarrow.Table`` (videos in key order, shots in time order)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted((Path(out) / SHOTS_DIR).glob("*.parquet"))
    if not files:
        return schema().empty_table()
    return pa.concat_tables([pq.read_table(f, schema=schema()) for f in files])

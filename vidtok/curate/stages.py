"""The curation stages, each usable on its own (no Ray needed) and as a Ray Data ``map_batches`` class.

A video travels between stages as a *record*: a dict of plain values and NumPy arrays (the fields are
listed in ``Decode.features``), one record per video. Each stage's ``apply(record)`` adds fields and
returns it; ``stage(batch)`` does the same on a one-video Ray Data batch (``batch_size=1``), and
turns an exception into the record's ``error`` so that one bad video never stops a run.

Records live on the host, so every stage ends by copying its few per-video results there (a sync per
stage and video, outside vidtok's ops); the shot bookkeeping between ops (cut positions, stitching,
capping) is small host work on those results. Decode copies each chunk's embeddings and deltas as it
goes: its ops timer then measures finished GPU work, and the device holds one chunk at a time.

Frame indices inside a record count *analysed* frames (the decoded frames kept at ``Config.fps``);
the table (``shot_table``) reports source frame numbers and seconds.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from vidtok.merge import match
from vidtok.motion import patch_delta
from vidtok.select import dpp_select, frame_scores, greedy_select, scene_boundaries

__all__ = [
    "Analyze", "Config", "Decode", "Duplicates", "KeyframeImages", "Keyframes", "Motion", "Shots", "Stage",
    "corpus_duplicates", "curate_video", "encode_image", "from_batch", "to_batch",
]

THUMB = 16  # frame embeddings: 16 x 16 grey thumbnails (256 values)
KEYFRAME_METHODS = ("dpp", "mmr")
IMAGE_FORMATS = ("jpg", "png")


@dataclass(frozen=True)
class Config:
    """Every knob of the curation, with the units it is read in.

    fps: analysis rate: keep, for each tick k / fps, the first decoded frame that reaches it (as
        ``vidtok.io.read_video``); None analyses every decoded frame. Shot boundaries are found on
        analysed frames only, so a low rate blurs them (a fast pan between two samples looks like a cut).
    width: analysis width in pixels (at most the source's; the height keeps the aspect ratio); both
        are rounded to multiples of ``patch``.
    patch: side of the square patches of the motion statistics, in analysis pixels.
    chunk: frames decoded and scored at a time: the most frames a decoder holds in memory.
    max_frames: analyse at most this many frames per video (None: all).
    cut_threshold: a shot boundary where the cosine of consecutive frame embeddings is below this
        (``scene_boundaries(method="threshold")``).
    min_shot: seconds; a cut that would close a shot shorter than this is dropped (the short piece
        joins the next shot), and a shot still shorter (the last one) is marked "short".
    max_shot: seconds; a longer shot is split into equal pieces no longer than this.
    stitch_threshold: adjacent shots are joined again when the frame 95% into the first and the frame
        5% into the second have at least this cosine (Panda-70M's event stitching, which compares
        ImageBind features of those two frames).
    min_motion, max_motion: a shot is kept when its motion (mean |change| of a patch between
        consecutive analysed frames, grey levels 0-255) is at least min_motion and, when max_motion is
        set, at most max_motion.
    keyframes: frames picked per shot. keyframe_method: "dpp" (``dpp_select``: the most mutually
        dissimilar frames) or "mmr" (``greedy_select`` with lam 0.5: frames close to the shot's mean
        embedding and far from the frames already picked).
    duplicate_threshold: a shot whose mean embedding has at least this cosine with an earlier kept
        shot of the same video is its near-duplicate (``match``).
    device: "cpu", "cuda", "cuda:1", ... or "auto" (cuda when the process sees a GPU).
    """

    fps: float | None = None
    width: int = 224
    patch: int = 16
    chunk: int = 64
    max_frames: int | None = None
    cut_threshold: float = 0.5
    min_shot: float = 1.0
    max_shot: float = 60.0
    stitch_threshold: float = 0.8
    min_motion: float = 0.5
    max_motion: float | None = None
    keyframes: int = 3
    keyframe_method: str = "dpp"
    duplicate_threshold: float = 0.95
    device: str = "auto"

    def __post_init__(self):
        def positive(name, value, kind=(int, float)):
            if isinstance(value, bool) or not isinstance(value, kind):
                raise TypeError(f"Config.{name} must be {'an int' if kind is int else 'a number'}, got {value!r}")
            if not value > 0:
                raise ValueError(f"Config.{name} must be > 0, got {value}")

        if self.fps is not None:
            positive("fps", self.fps)
        for name in ("width", "patch", "chunk", "keyframes"):
            positive(name, getattr(self, name), int)
        if self.max_frames is not None:
            positive("max_frames", self.max_frames, int)
        if self.width < self.patch:
            raise ValueError(f"Config.width must be at least one patch ({self.patch}), got {self.width}")
        for name in ("min_shot", "max_shot"):
            positive(name, getattr(self, name))
        if self.max_shot < self.min_shot:
            raise ValueError(f"Config.max_shot ({self.max_shot}) must be >= min_shot ({self.min_shot})")
        for name in ("cut_threshold", "stitch_threshold", "duplicate_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1.0 <= value <= 1.0:
                raise ValueError(f"Config.{name} is a cosine in [-1, 1], got {value!r}")
        if isinstance(self.min_motion, bool) or not isinstance(self.min_motion, (int, float)) or self.min_motion < 0:
            raise ValueError(f"Config.min_motion must be a number >= 0 (grey levels), got {self.min_motion!r}")
        if self.max_motion is not None and not (isinstance(self.max_motion, (int, float)) and self.max_motion >= self.min_motion):
            raise ValueError(f"Config.max_motion must be None or a number >= min_motion ({self.min_motion}), got {self.max_motion!r}")
        if self.keyframe_method not in KEYFRAME_METHODS:
            raise ValueError(f"Config.keyframe_method must be one of {KEYFRAME_METHODS}, got {self.keyframe_method!r}")
        if not isinstance(self.device, str):
            raise TypeError(f"Config.device must be a string such as 'cpu', 'cuda' or 'auto', got {self.device!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------------
# records <-> one-video Ray Data batches


def to_batch(record: dict) -> dict:
    """A record -> a one-video Ray Data batch (every field gets a leading dimension of 1)."""
    return {k: np.asarray([v]) if isinstance(v, (str, int, float)) else np.asarray(v)[None] for k, v in record.items()}


def from_batch(batch: dict) -> dict:
    """A one-video Ray Data batch (NumPy format) -> its record."""
    record = {}
    for key, column in batch.items():
        if len(column) != 1:
            raise ValueError(f"curation stages take one video per batch (map_batches(batch_size=1)), got {len(column)}")
        value = column[0]
        if isinstance(value, np.generic):
            value = value.item()
        record[key] = value
    return record


class Stage:
    """A step of the curation. ``apply(record)`` is the stage itself; calling the stage on a one-video
    Ray Data batch runs ``apply`` and records an exception as the video's ``error`` instead of raising
    it. A record that already carries an error passes through untouched."""

    name = "stage"  # in error messages and the record's seconds_<name> timing

    def __init__(self, config: Config | dict | None = None):
        self.config = config if isinstance(config, Config) else Config.from_dict(config or {})
        self.device = _device(self.config.device)

    def apply(self, record: dict) -> dict:
        raise NotImplementedError

    def empty(self, record: dict) -> dict:
        """The fields this stage adds, empty: what a failed video carries so every row has one schema."""
        return {}

    def run(self, record: dict) -> dict:
        """apply(), with errors recorded instead of raised; timed into record["seconds_<name>"]."""
        key = "seconds_" + self.name
        start = time.perf_counter()
        if not record.get("error"):
            try:
                record = self.apply(dict(record))
            except Exception as exc:  # a bad video must not stop the others: it becomes an error row
                record = {**record, "error": f"{self.name}: {type(exc).__name__}: {' '.join(str(exc).split())}"}
        if record.get("error"):
            record = {**self.empty(record), **record}
        record[key] = record.get(key, 0.0) + time.perf_counter() - start
        return record

    def __call__(self, batch: dict) -> dict:
        return to_batch(self.run(from_batch(batch)))


# ---------------------------------------------------------------------------------------------------
# decode


def analysis_size(height: int, width: int, config: Config) -> tuple[int, int]:
    """(H, W) of the analysed frames: ``config.width`` wide (the source width when narrower: no
    upscaling), aspect kept, both rounded to multiples of the patch."""
    p = config.patch
    W = max(p, round(min(config.width, width) / p) * p)
    H = max(p, round(height * W / width / p) * p)
    return H, W


class Decode(Stage):
    """Decode a video with PyAV at ``config.fps`` and reduce each chunk of frames to what the later
    stages need, so the frames are never all in memory: a 256-value embedding per frame (its 16 x 16
    grey thumbnail minus its own mean, so the cosine of two frames is their correlation) and every
    patch's mean |change| from the previous analysed frame (``patch_delta``, grey levels).

    Memory: ``chunk`` frames at the analysis size, plus (256 + h w) float32 per analysed frame
    (about 150 MB for an hour at 30 fps with the default 224-pixel width).

    Resources: decoding runs on this process's CPU (PyAV's threads); the vidtok ops on
    ``config.device``.
    """

    name = "decode"


    def __init__(self, config: Config | dict | None = None):
        super().__init__(config)
        # the first call of a vidtok op imports torch's compiler stack (seconds): pay it here, once per process
        patch_delta(torch.zeros(1, 2, 3, self.config.patch, self.config.patch, dtype=torch.uint8, device=self.device),
                    self.config.patch)

    def empty(self, record: dict) -> dict:
        return {
            "source_fps": 0.0, "source_frames": 0, "duration": 0.0, "height": 0, "width": 0,
            "frame_index": np.zeros(0, np.int64), "frame_time": np.zeros(0, np.float64),
            "embedding": np.zeros((0, THUMB * THUMB), np.float32), "motion_delta": np.zeros((0, 0, 0), np.float32),
            "seconds_decode_only": 0.0, "seconds_decode_ops": 0.0,
        }

    def apply(self, record: dict) -> dict:
        return {**record, **self.features(str(record["video"]))}

    def features(self, path: str) -> dict:
        """The decode fields of ``path``'s record:

        source_fps (the stream's average rate, 0.0 when unknown), source_frames (frames decoded),
        duration (seconds to the end of the last decoded frame), height/width (analysis size),
        frame_index int64 [T] and frame_time float64 [T] (source frame number and seconds of each
        analysed frame), embedding float32 [T, 256], motion_delta float32 [T, h, w] (+inf at frame 0).

        Raises FileNotFoundError, or ValueError for a file with no decodable video frame.
        """
        import av

        c = self.config
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such video file: {path}")
        decode_s = ops_s = 0.0
        index, times, embeddings, deltas = [], [], [], []
        pending, pending_index, pending_time = [], [], []
        previous = None  # the last analysed frame of the previous chunk (uint8 [3, H, W] on the device)
        size = None
        decoded, next_tick, end_time = 0, 0.0, 0.0

        def flush():
            nonlocal previous, ops_s
            start = time.perf_counter()
            frames = torch.from_numpy(np.stack(pending)).to(self.device).permute(0, 3, 1, 2)  # [n, 3, H, W]
            embeddings.append(self.embed(frames).cpu())
            clip = frames if previous is None else torch.cat([previous[None], frames])
            delta = patch_delta(clip[None], c.patch)[0]  # [n (+1), h, w]; slice 0 is +inf
            deltas.append((delta if previous is None else delta[1:]).cpu())
            previous = frames[-1]
            index.extend(pending_index)
            times.extend(pending_time)
            pending.clear(), pending_index.clear(), pending_time.clear()
            ops_s += time.perf_counter() - start

        start = time.perf_counter()
        try:
            container = av.open(path)
        except av.FFmpegError as exc:
            raise ValueError(f"cannot open {path} as a video: {exc}") from exc
        with container:
            if not container.streams.video:
                raise ValueError(f"{path} has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = float(stream.average_rate) if stream.average_rate else 0.0
            try:
                for frame in container.decode(stream):
                    t = frame.time if frame.time is not None else decoded / (rate or 1.0)
                    number = decoded
                    decoded += 1
                    step = float(frame.duration * frame.time_base) if frame.duration and frame.time_base else 0.0
                    end_time = max(end_time, t + (step or (1.0 / rate if rate else 0.0)))
                    if c.fps is not None:
                        if t + 1e-6 < next_tick:
                            continue
                        next_tick += 1.0 / c.fps
                    if size is None:
                        size = analysis_size(frame.height, frame.width, c)
                    pending.append(frame.to_ndarray(format="rgb24", height=size[0], width=size[1]))
                    pending_index.append(number)
                    pending_time.append(t)
                    if c.max_frames is not None and len(index) + len(pending) >= c.max_frames:
                        break
                    if len(pending) == c.chunk:
                        decode_s += time.perf_counter() - start
                        flush()
                        start = time.perf_counter()
            except av.FFmpegError as exc:
                raise ValueError(f"cannot decode {path}: {exc}") from exc
        decode_s += time.perf_counter() - start
        if pending:
            flush()
        if not index:
            raise ValueError(f"{path} contains no decodable video frames")
        return {
            "source_fps": rate, "source_frames": decoded, "duration": end_time, "height": size[0], "width": size[1],
            "frame_index": np.asarray(index, np.int64), "frame_time": np.asarray(times, np.float64),
            "embedding": torch.cat(embeddings).numpy(), "motion_delta": torch.cat(deltas).numpy(),
            "seconds_decode_only": decode_s, "seconds_decode_ops": ops_s,
        }

    @staticmethod
    def embed(frames: torch.Tensor) -> torch.Tensor:
        """uint8 [n, 3, H, W] -> float32 [n, 256]: each frame's 16 x 16 area-averaged grey thumbnail
        in [0, 1] minus its own mean (a flat frame gives the zero vector)."""
        thumb = F.adaptive_avg_pool2d(frames.float(), THUMB).mean(1).flatten(1) / 255.0  # pool, then grey
        return thumb - thumb.mean(1, keepdim=True)


# ---------------------------------------------------------------------------------------------------
# shots


def analysis_rate(record: dict, config: Config) -> float:
    """Analysed frames per second: config.fps capped by the source rate, or the source rate; measured
    from the frame times when the header has no rate."""
    source = float(record["source_fps"])
    if not source:
        t = np.asarray(record["frame_time"])
        source = (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else 1.0
    return min(config.fps, source) if config.fps is not None else source


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine as vidtok's ops define it: dot / (max(|a|, 1e-8) max(|b|, 1e-8))."""
    return (a * b).sum(-1) / (a.norm(dim=-1).clamp_min(1e-8) * b.norm(dim=-1).clamp_min(1e-8))


class Shots(Stage):
    """Split a video into shots: ``scene_boundaries`` on the cosine of consecutive frame embeddings
    (``frame_scores``), at least ``min_shot`` seconds per shot; adjacent shots stitched back when
    they look alike across the cut (Panda-70M); shots longer than ``max_shot`` split evenly.

    Adds ``shots`` int64 [S, 2]: (first, end) analysed-frame indices, end exclusive, in time order.
    """

    name = "shots"


    def empty(self, record: dict) -> dict:
        return {"shots": np.zeros((0, 2), np.int64)}

    def apply(self, record: dict) -> dict:
        x = torch.as_tensor(record["embedding"], device=self.device)
        rate = analysis_rate(record, self.config)
        return {**record, "shots": self.split(x, rate).numpy()}

    def split(self, x: torch.Tensor, rate: float) -> torch.Tensor:
        """float [T, C] frame embeddings at ``rate`` frames per second -> int64 [S, 2] shots."""
        c = self.config
        T = x.shape[0]
        starts = torch.zeros(1, dtype=torch.int64)
        if T > 1:
            adjacent = frame_scores(x[None]).adjacent
            min_len = max(1, math.ceil(c.min_shot * rate - 1e-9))
            seg = scene_boundaries(adjacent, threshold=c.cut_threshold, min_len=min_len)[0].cpu()
            starts = torch.cat([starts, torch.nonzero(seg[1:] != seg[:-1]).flatten() + 1])
        starts = self.stitch(x, starts, T)
        ends = torch.cat([starts[1:], torch.tensor([T])])
        return self.cap(torch.stack([starts, ends], 1), max(1, math.floor(c.max_shot * rate + 1e-9)))

    def stitch(self, x: torch.Tensor, starts: torch.Tensor, T: int) -> torch.Tensor:
        """Drop the cut between shots i and i + 1 when the frame 95% into shot i and the frame 5% into
        shot i + 1 have cosine >= stitch_threshold. Panda-70M compares the last frame feature of the
        event built so far with the next shot's first: that is always shot i's own 95% frame, so every
        cut is decided on its own."""
        if len(starts) < 2:
            return starts
        ends = torch.cat([starts[1:], torch.tensor([T])])
        first = (0.95 * starts + 0.05 * (ends - 1)).long()  # 5% into each shot (Panda-70M's rounding)
        last = (0.05 * starts + 0.95 * (ends - 1)).long()  # 95% into each shot
        sim = _cosine(x[last[:-1].to(x.device)], x[first[1:].to(x.device)]).cpu()
        keep = torch.cat([torch.tensor([True]), sim < self.config.stitch_threshold])
        return starts[keep]

    @staticmethod
    def cap(shots: torch.Tensor, max_len: int) -> torch.Tensor:
        """Split every shot longer than max_len frames into ceil(len / max_len) near-equal pieces."""
        pieces = []
        for start, end in shots.tolist():
            n = -(-(end - start) // max_len)
            cuts = [start + (end - start) * j // n for j in range(n + 1)]
            pieces.extend(zip(cuts[:-1], cuts[1:]))
        return torch.tensor(pieces, dtype=torch.int64).view(-1, 2)


# ---------------------------------------------------------------------------------------------------
# motion


class Motion(Stage):
    """Motion statistics per shot from the per-patch changes ``patch_delta`` gave the decoder, over
    the pairs of consecutive analysed frames inside the shot (the pair across a cut is never counted).

    Adds ``motion`` float32 [S] (mean |change| over the shot's patches and pairs, grey levels),
    ``motion_peak`` float32 [S] (the highest per-patch mean: motion of a small object),
    ``motion_patches`` float32 [S, h, w] (per-patch means) and ``moving`` bool [S], the filter:
    min_motion <= motion (<= max_motion when set). A one-frame shot has no pair: NaN scores, not moving.
    """

    name = "motion"


    def empty(self, record: dict) -> dict:
        return {"motion": np.zeros(0, np.float32), "motion_peak": np.zeros(0, np.float32),
                "motion_patches": np.zeros((0, 0, 0), np.float32), "moving": np.zeros(0, bool)}

    def apply(self, record: dict) -> dict:
        delta = torch.as_tensor(record["motion_delta"], device=self.device)
        shots = torch.as_tensor(record["shots"], device=self.device)
        patches = self.per_patch(delta, shots)
        motion = patches.flatten(1).mean(1)
        peak = patches.flatten(1).amax(1) if patches.shape[0] else motion
        moving = motion >= self.config.min_motion  # NaN compares False: a one-frame shot never passes
        if self.config.max_motion is not None:
            moving &= motion <= self.config.max_motion
        return {**record, "motion": motion.cpu().numpy(), "motion_peak": peak.cpu().numpy(),
                "motion_patches": patches.cpu().numpy(), "moving": moving.cpu().numpy()}

    @staticmethod
    def per_patch(delta: torch.Tensor, shots: torch.Tensor) -> torch.Tensor:
        """float [T, h, w] changes (row t: frame t - 1 -> t) and [S, 2] shots -> float32 [S, h, w]
        means over rows first + 1 .. end - 1 of each shot (NaN where a shot has one frame). Prefix
        sums in float64, so long shots lose no precision."""
        T, h, w = delta.shape
        rows = delta.reshape(T, h * w).double()
        rows = torch.where(torch.isinf(rows), torch.zeros((), dtype=rows.dtype, device=rows.device), rows)  # frame 0
        prefix = torch.cat([rows.new_zeros(1, h * w), rows.cumsum(0)])
        first, end = shots[:, 0] + 1, shots[:, 1]
        count = (end - first).clamp_min(0)
        sums = prefix[end] - prefix[torch.minimum(first, end)]
        means = sums / count[:, None].to(sums.dtype)  # 0 / 0 = NaN for one-frame shots
        return means.float().view(-1, h, w)


# ---------------------------------------------------------------------------------------------------
# keyframes


class Keyframes(Stage):
    """``config.keyframes`` frames per shot, all shots of a video in one call. Both methods score a
    frame's typicality: t = cosine of its embedding to the shot's mean unit embedding.

    "dpp": ``dpp_select`` (the greedy MAP of a DPP) with quality q = (1 + t) / 2, so the first pick is
    the most typical frame and each next one trades typicality for dissimilarity to those picked;
    frames with a zero embedding (flat frames) or t = -1 are never picked. "mmr": ``greedy_select``
    with relevance t and lam 0.5. A shot with fewer frames than asked for gives all of them.

    Adds ``keyframes`` int64 [S, k]: analysed-frame indices sorted by time, -1 padded.
    """

    name = "keyframes"


    def empty(self, record: dict) -> dict:
        return {"keyframes": np.zeros((0, self.config.keyframes), np.int64)}

    def apply(self, record: dict) -> dict:
        x = torch.as_tensor(record["embedding"], device=self.device)
        shots = torch.as_tensor(record["shots"], device=self.device)
        return {**record, "keyframes": self.select(x, shots).cpu().numpy()}

    def select(self, x: torch.Tensor, shots: torch.Tensor) -> torch.Tensor:
        """float [T, C], int [S, 2] -> int64 [S, k] frame indices (-1 padded)."""
        k = self.config.keyframes
        if shots.shape[0] == 0:
            return torch.zeros(0, k, dtype=torch.int64, device=x.device)
        length = shots[:, 1] - shots[:, 0]
        L = int(length.max())
        offsets = torch.arange(L, device=x.device)
        valid = offsets[None] < length[:, None]  # [S, L]
        frame = (shots[:, :1] + offsets[None]).clamp_max(x.shape[0] - 1)
        xs = torch.where(valid[..., None], x[frame], torch.zeros((), dtype=x.dtype, device=x.device))  # [S, L, C]
        typical = self.typicality(xs, length)
        if self.config.keyframe_method == "dpp":
            quality = torch.where(valid, (1 + typical) / 2, torch.zeros((), dtype=x.dtype, device=x.device))
            idx, _ = dpp_select(xs, k, quality=quality)
        else:
            relevance = torch.where(valid, typical, torch.full((), -math.inf, device=x.device))
            idx = greedy_select(relevance[:, None], k, x=xs, lam=0.5)[:, 0]
        idx = idx.long()
        return torch.where(idx >= 0, idx + shots[:, :1], idx)

    @staticmethod
    def typicality(xs: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """float [S, L, C] zero-padded frames of S shots, int [S] lengths -> [S, L]: each frame's cosine
        to its shot's mean unit embedding."""
        unit = xs / xs.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        centre = unit.sum(1) / length[:, None].to(xs.dtype)
        return _cosine(xs, centre[:, None])


# ---------------------------------------------------------------------------------------------------
# near-duplicate shots


class Duplicates(Stage):
    """Near-duplicate shots within a video: shots are visited in time order and each is compared
    (``match``) with the earlier shots that are not duplicates themselves; at cosine >=
    ``duplicate_threshold`` of the mean frame embeddings it becomes a duplicate of the most similar
    one. Group ids tell ``match`` which earlier shots may be compared (0: an original, 1: a
    duplicate), so duplicates always point at an original. One ``match`` call per shot after the first.

    Adds ``shot_embedding`` float32 [S, C] (the mean of the shot's unit frame embeddings) and
    ``duplicate_of`` int64 [S] (-1 for an original).
    """

    name = "duplicates"


    def empty(self, record: dict) -> dict:
        return {"shot_embedding": np.zeros((0, THUMB * THUMB), np.float32), "duplicate_of": np.zeros(0, np.int64)}

    def apply(self, record: dict) -> dict:
        x = torch.as_tensor(record["embedding"], device=self.device)
        shots = torch.as_tensor(record["shots"], device=self.device)
        emb = self.shot_embeddings(x, shots)
        return {**record, "shot_embedding": emb.cpu().numpy(), "duplicate_of": self.find(emb).cpu().numpy()}

    @staticmethod
    def shot_embeddings(x: torch.Tensor, shots: torch.Tensor) -> torch.Tensor:
        unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        prefix = torch.cat([unit.new_zeros(1, unit.shape[1]), unit.double().cumsum(0).to(unit.dtype)])
        length = (shots[:, 1] - shots[:, 0]).clamp_min(1)
        return (prefix[shots[:, 1]] - prefix[shots[:, 0]]) / length[:, None].to(unit.dtype)

    def find(self, emb: torch.Tensor) -> torch.Tensor:
        """float [S, C] -> int64 [S]: the original each shot duplicates, -1 for originals."""
        S = emb.shape[0]
        duplicate_of = torch.full((S,), -1, dtype=torch.int64)
        group = torch.zeros(1, S, dtype=torch.int32, device=emb.device)  # 0: original, 1: duplicate
        for i in range(1, S):
            score, idx = match(emb[None, i:i + 1], emb[None, :i], a_group=group[:, i:i + 1], b_group=group[:, :i])
            if float(score) >= self.config.duplicate_threshold:
                duplicate_of[i] = int(idx)
                group[0, i] = 1
        return duplicate_of


def corpus_duplicates(shots, threshold: float, device: str = "auto"):
    """Near-duplicate shots across videos, from the rows of many videos (a ``pyarrow.Table`` with the
    columns video, shot, duplicate_of, embedding and error, as ``vidtok.curate.read_shots`` gives).

    Videos are visited in path order; the originals of each (its shots with duplicate_of = -1) are
    compared in one ``match`` call with the originals of the videos before it, which streams them and
    never forms the shots-by-originals matrix. A shot at cosine >= threshold to one of them repeats
    it; the others join the originals. Work: O(shots x originals x 256) over the corpus.

    Returns a ``pyarrow.Table`` with one row per repeating shot: video, shot, duplicate_of_video,
    duplicate_of_shot, similarity.
    """
    import pyarrow as pa

    device = _device(device)
    columns = shots.select(["video", "shot", "duplicate_of", "embedding", "error"]).to_pydict()
    per_video: dict = {}
    for video, shot, dup, emb, error in zip(*columns.values()):
        if error is None and dup == -1:
            per_video.setdefault(video, []).append((shot, emb))
    out = {"video": [], "shot": [], "duplicate_of_video": [], "duplicate_of_shot": [], "similarity": []}
    originals = torch.zeros(0, THUMB * THUMB, device=device)
    owners: list = []  # (video, shot) of each row of originals
    for video in sorted(per_video):
        numbers = [shot for shot, _ in per_video[video]]
        emb = torch.tensor([e for _, e in per_video[video]], dtype=torch.float32, device=device)
        repeat = torch.zeros(len(numbers), dtype=torch.bool, device=device)
        if len(owners):
            score, idx = match(emb[None], originals[None])
            repeat = score[0] >= threshold
            for i in torch.nonzero(repeat).flatten().tolist():
                out["video"].append(video)
                out["shot"].append(numbers[i])
                out["duplicate_of_video"].append(owners[int(idx[0, i])][0])
                out["duplicate_of_shot"].append(owners[int(idx[0, i])][1])
                out["similarity"].append(float(score[0, i]))
        originals = torch.cat([originals, emb[~repeat]])
        owners += [(video, n) for n, r in zip(numbers, repeat.tolist()) if not r]
    schema = pa.schema([("video", pa.string()), ("shot", pa.int32()), ("duplicate_of_video", pa.string()),
                        ("duplicate_of_shot", pa.int32()), ("similarity", pa.float32())])
    return pa.table(out, schema=schema)


class Analyze(Stage):
    """Shots, Motion, Keyframes and Duplicates in one stage: they work on per-frame features (not
    pixels), so one process runs them all and no record crosses processes in between."""

    name = "analyze"

    def __init__(self, config: Config | dict | None = None):
        super().__init__(config)
        self.stages = [Shots(self.config), Motion(self.config), Keyframes(self.config), Duplicates(self.config)]
        # the first call of a vidtok op imports torch's compiler stack (seconds): pay it here, once per process
        frame_scores(torch.ones(1, 2, THUMB * THUMB, device=self.device))

    def empty(self, record: dict) -> dict:
        out = {}
        for stage in self.stages:
            out.update(stage.empty(record))
        return out

    def run(self, record: dict) -> dict:
        for stage in self.stages:
            record = stage.run(record)
        return record

    def apply(self, record: dict) -> dict:
        for stage in self.stages:
            record = stage.apply(record)
        return record


# ---------------------------------------------------------------------------------------------------
# keyframe images


def encode_image(frame, fmt: str) -> bytes:
    """PyAV frame -> JPEG (quantiser scale 3 of 2-31: visually lossless) or PNG bytes, with FFmpeg's
    encoders (no imaging library needed)."""
    from fractions import Fraction

    import av

    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"image format must be one of {IMAGE_FORMATS}, got {fmt!r}")
    codec = av.CodecContext.create("mjpeg" if fmt == "jpg" else "png", "w")
    codec.width, codec.height, codec.time_base = frame.width, frame.height, Fraction(1, 25)
    codec.pix_fmt = "yuvj420p" if fmt == "jpg" else "rgb24"
    if fmt == "jpg":  # FFmpeg's -q:v 3: a fixed quantiser scale, in lambda units (FF_QP2LAMBDA = 118)
        codec.flags |= av.codec.context.Flags.qscale
        codec.global_quality = 3 * 118
    image = frame.reformat(format=codec.pix_fmt)
    image.pts = None
    return b"".join(bytes(p) for p in [*codec.encode(image), *codec.encode(None)])


class KeyframeImages(Stage):
    """Decode the video again and encode its keyframes at the source size as ``fmt`` images (a second
    pass: keyframes are known only once the whole video is analysed). Adds ``keyframe_images``: an
    object array of bytes [S, k] aligned with ``keyframes`` (b"" beside -1 padding)."""

    name = "keyframe_images"


    def __init__(self, config: Config | dict | None = None, fmt: str = "jpg"):
        super().__init__(config)
        if fmt not in IMAGE_FORMATS:
            raise ValueError(f"keyframe image format must be one of {IMAGE_FORMATS}, got {fmt!r}")
        self.fmt = fmt

    def empty(self, record: dict) -> dict:
        return {"keyframe_images": np.zeros((0, self.config.keyframes), object)}

    def apply(self, record: dict) -> dict:
        import av

        keyframes = np.asarray(record["keyframes"])
        wanted = {}
        for (s, j), i in np.ndenumerate(keyframes):
            if i >= 0:
                wanted.setdefault(int(record["frame_index"][i]), []).append((s, j))
        images = np.full(keyframes.shape, b"", dtype=object)
        with av.open(str(record["video"])) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for number, frame in enumerate(container.decode(stream)):
                for s, j in wanted.pop(number, ()):
                    images[s, j] = encode_image(frame, self.fmt)
                if not wanted:
                    break
        return {**record, "keyframe_images": images}


# ---------------------------------------------------------------------------------------------------
# one video in one process


def curate_video(path: str, config: Config | None = None, *, images: str | None = None) -> dict:
    """Every stage on one video in this process: the record the Ray pipeline builds for ``path``.
    A bad video gives a record with ``error`` set (never an exception)."""
    config = config or Config()
    record = Analyze(config).run(Decode(config).run({"video": str(path)}))
    if images:
        record = KeyframeImages(config, images).run(record)
    return record

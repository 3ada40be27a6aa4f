"""Reading and writing video as uint8 [T, C, H, W] tensors: PyAV (FFmpeg bundled in its wheels), or
torchcodec when it is installed and can load its FFmpeg libraries."""

from __future__ import annotations

import os
from fractions import Fraction
from typing import Callable, NamedTuple

import numpy as np
import torch

DECODERS = ("auto", "pyav", "torchcodec")


class VideoInfo(NamedTuple):
    """What a container header says about its first video stream (no frame is decoded).

    width, height: pixels; fps: the average frame rate (None when the header has none); frames: the
    frame count from the header (None when unknown, as in some streams); codec: FFmpeg's codec name.
    """

    width: int
    height: int
    fps: float | None
    frames: int | None
    codec: str


def _open(path: str):
    import av

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such video file: {path}")
    try:
        container = av.open(path)
    except av.FFmpegError as exc:
        raise ValueError(f"cannot open {path} as a video: {exc}") from exc
    if not container.streams.video:
        container.close()
        raise ValueError(f"{path} has no video stream")
    return container


def video_info(path: str) -> VideoInfo:
    """The size, frame rate, frame count and codec of ``path``'s first video stream, from its header.

    Raises FileNotFoundError for a missing file and ValueError for a file FFmpeg cannot open or that
    has no video stream.
    """
    with _open(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        return VideoInfo(
            int(stream.codec_context.width),
            int(stream.codec_context.height),
            float(rate) if rate else None,
            int(stream.frames) if stream.frames else None,
            stream.codec_context.name,
        )


def _torchcodec_decoder():
    """torchcodec's VideoDecoder class, or None when torchcodec is missing or cannot load FFmpeg
    (its wheels link the system's FFmpeg libraries, unlike PyAV's, so an install can be unusable)."""
    import importlib.util

    if importlib.util.find_spec("torchcodec") is None:
        return None
    try:
        from torchcodec.decoders import VideoDecoder
    except (ImportError, OSError, RuntimeError):
        return None
    return VideoDecoder


def _check_read_args(fps, size, max_frames, decoder) -> None:
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ValueError(f"size must be (H, W) with positive sides, got {size}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")


def read_video(
    path: str,
    *,
    fps: float | None = None,
    size: tuple[int, int] | None = None,
    max_frames: int | None = None,
    decoder: str = "auto",
    progress: Callable[[int, int | None], None] | None = None,
) -> torch.Tensor:
    """Decode a video file to uint8 ``[T, 3, H, W]`` RGB frames.

    Args:
        path: any file FFmpeg can read.
        fps: resample in time to this rate by keeping, for each tick k / fps, the first decoded frame
            whose timestamp reaches it (frames are never repeated, so a rate above the source's keeps
            every frame). None keeps every frame.
        size: (H, W) to rescale every frame to; None keeps the size. PyAV rescales with FFmpeg's
            bilinear scaler, torchcodec's path with ``F.interpolate(bilinear, antialias=True)``: the
            two agree to a few grey levels, not bit for bit.
        max_frames: stop after this many output frames.
        decoder: "pyav", "torchcodec", or "auto": torchcodec when it is installed and loads, else PyAV.
        progress: called as ``progress(frames_so_far, expected_or_None)`` after every output frame
            (the expected count comes from the header, capped by max_frames).

    Raises FileNotFoundError for a missing file, ValueError for a file with no decodable video, and
    RuntimeError when decoder="torchcodec" is asked for but cannot be loaded.
    """
    _check_read_args(fps, size, max_frames, decoder)
    if decoder != "pyav":
        VideoDecoder = _torchcodec_decoder()
        if VideoDecoder is not None:
            return _read_torchcodec(VideoDecoder, path, fps, size, max_frames, progress)
        if decoder == "torchcodec":
            raise RuntimeError("decoder='torchcodec' needs the torchcodec package with FFmpeg libraries it can load")
    return _read_pyav(path, fps, size, max_frames, progress)


def _expected(total: int | None, fps_in: float | None, fps: float | None, max_frames: int | None) -> int | None:
    if total and fps and fps_in:
        total = max(1, int(total * min(1.0, fps / fps_in)))
    if max_frames is not None:
        total = max_frames if not total else min(total, max_frames)
    return total or None


def _read_pyav(path, fps, size, max_frames, progress) -> torch.Tensor:
    import av

    reformat = {} if size is None else {"height": int(size[0]), "width": int(size[1])}
    frames, next_tick = [], 0.0
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate) if stream.average_rate else None
        expected = _expected(stream.frames or None, rate, fps, max_frames)
        try:
            for frame in container.decode(stream):
                if fps is not None:
                    time = frame.time if frame.time is not None else len(frames) / (rate or 1.0)
                    if time + 1e-6 < next_tick:
                        continue
                    next_tick += 1.0 / fps
                frames.append(frame.to_ndarray(format="rgb24", **reformat))
                if progress is not None:
                    progress(len(frames), expected)
                if max_frames is not None and len(frames) >= max_frames:
                    break
        except av.FFmpegError as exc:
            raise ValueError(f"cannot decode {path}: {exc}") from exc
    if not frames:
        raise ValueError(f"{path} contains no decodable video frames")
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()


def _read_torchcodec(VideoDecoder, path, fps, size, max_frames, progress) -> torch.Tensor:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such video file: {path}")
    try:
        dec = VideoDecoder(path, dimension_order="NCHW")
    except (RuntimeError, ValueError) as exc:  # torchcodec reports FFmpeg failures as these
        raise ValueError(f"cannot open {path} as a video: {exc}") from exc
    total = len(dec)
    expected = _expected(total, dec.metadata.average_fps, fps, max_frames)
    out, count, next_tick, chunk = [], 0, 0.0, 32
    try:
        # chunks of frames in decode order, so memory holds the output plus one chunk
        for start in range(0, total, chunk):
            batch = dec.get_frames_in_range(start, min(start + chunk, total))
            data, times = batch.data, batch.pts_seconds.tolist()
            for i, time in enumerate(times):
                if fps is not None:
                    if time + 1e-6 < next_tick:
                        continue
                    next_tick += 1.0 / fps
                frame = data[i]
                if size is not None and tuple(frame.shape[-2:]) != tuple(size):
                    frame = torch.nn.functional.interpolate(
                        frame[None].float(), size=tuple(size), mode="bilinear", antialias=True, align_corners=False
                    )[0].round().clamp(0, 255).to(torch.uint8)
                out.append(frame)
                count += 1
                if progress is not None:
                    progress(count, expected)
                if max_frames is not None and count >= max_frames:
                    break
            if max_frames is not None and count >= max_frames:
                break
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"cannot decode {path}: {exc}") from exc
    if not out:
        raise ValueError(f"{path} contains no decodable video frames")
    return torch.stack(out).contiguous()


def write_video(path: str, frames: torch.Tensor, *, fps: float = 25.0, codec: str = "libx264") -> None:
    """Encode uint8 ``[T, 3, H, W]`` frames (H and W even, as yuv420p needs) to a video file."""
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be uint8 [T, 3, H, W], got {frames.dtype} {tuple(frames.shape)}")
    import av

    T, _, H, W = frames.shape
    if H % 2 or W % 2:
        raise ValueError(f"frame height and width must be even for yuv420p, got {H}x{W}")
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for image in frames.permute(0, 2, 3, 1).cpu().numpy():
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)

"""Reading and writing video with PyAV (FFmpeg bundled in its wheels), as uint8 [T, C, H, W] tensors."""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np
import torch


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


def read_video(
    path: str,
    *,
    fps: float | None = None,
    size: tuple[int, int] | None = None,
    max_frames: int | None = None,
) -> torch.Tensor:
    """Decode a video file to uint8 ``[T, 3, H, W]`` RGB frames.

    Args:
        path: any file PyAV (FFmpeg) can read.
        fps: resample in time to this rate by keeping, for each tick k / fps, the first decoded frame
            whose timestamp reaches it (frames are never repeated, so a rate above the source's keeps
            every frame). None keeps every frame.
        size: (H, W) to rescale every frame to (FFmpeg's bilinear scaler); None keeps the size.
        max_frames: stop after this many output frames.

    Raises FileNotFoundError for a missing file and ValueError for a file with no decodable video.
    """
    import av

    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ValueError(f"size must be (H, W) with positive sides, got {size}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    reformat = {} if size is None else {"height": int(size[0]), "width": int(size[1])}
    frames, next_tick = [], 0.0
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                if fps is not None:
                    time = frame.time if frame.time is not None else len(frames) / float(stream.average_rate or 1)
                    if time + 1e-6 < next_tick:
                        continue
                    next_tick += 1.0 / fps
                frames.append(frame.to_ndarray(format="rgb24", **reformat))
                if max_frames is not None and len(frames) >= max_frames:
                    break
        except av.FFmpegError as exc:
            raise ValueError(f"cannot decode {path}: {exc}") from exc
    if not frames:
        raise ValueError(f"{path} contains no decodable video frames")
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()


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

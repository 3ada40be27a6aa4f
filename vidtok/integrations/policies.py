"""Policies: what a model integration does to one video's visual tokens.

The contract every policy follows (``vidtok.integrations.transformers.apply`` calls it once per video):

``policy(features, grid) -> (features_out, origin)``

- ``features``: one video's visual tokens as the language model will see them, ``[T*h*w, C]``
  (float32, float16 or bfloat16), in (t, h, w) row-major order.
- ``grid``: ``(T, h, w)`` as Python ints, the LLM-side grid: for Qwen2-VL / Qwen2.5-VL / Qwen3-VL the grid after
  the 2x2 patch merger (``video_grid_thw // (1, 2, 2)``, T counting temporal patches of 2 frames); for
  LLaVA-OneVision ``(frames, ceil(p/2), ceil(p/2))`` after its bilinear pooling, without the trailing
  ``image_newline`` token (the integration keeps that one).
- ``features_out``: ``[L', C]`` with ``0 < L' <= T*h*w``, same dtype and device: the tokens kept or
  merged, in the order the language model reads them.
- ``origin``: int64 ``[L']``, strictly increasing: the flat (t, h, w) index each output token stands
  at. The integration gives output token i the prompt slot and, for Qwen-VL, the 3-D M-RoPE position
  ``(t, h, w)`` of input token ``origin[i]``; a merged token reports the index of the token that
  represents its group.

A policy may also define ``num_tokens(grid) -> int | None``: the ``L'`` it will return for any video
of that grid, known from the grid alone (None: it depends on the data). ``EVS``, ``Budget``,
``KeepAll``, ``MergeTemporal(r=...)`` and ``SelectFrames`` with "uniform" or "mmr" have exact counts,
so a prompt can be sized before any encoder runs (as vLLM and SGLang size EVS prompts) and the
integrations check every video against its predicted count before anything reaches the model.
Threshold policies (``DropStatic``, ``MergeTemporal(threshold)``) keep a data-dependent number.

Where ``L'`` depends on the data, reading it (``nonzero``, ``tolist``) is a host sync. That sync
happens once per video per prefill, outside vidtok's kernel hot paths, and the integrations document
it. ``check_output`` validates a policy's result.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from vidtok._numerics import REFERENCE_DTYPES
from vidtok.merge import connected_components_merge, dpc_knn_merge, paired_similarity, temporal_merge
from vidtok.select import (
    ALLOCATION_MODES,
    allocate_budget,
    dpp_select,
    evs_count,
    frame_scores,
    greedy_select,
    topk_per_frame,
    uniform_indices,
)
from vidtok.sparse import attention_received

__all__ = ["Budget", "DropStatic", "EVS", "KeepAll", "KeepAttended", "MergeClusters", "MergeComponents", "MergeTemporal",
           "Policy", "SelectFrames", "check_input", "check_output", "predicted_tokens"]


class Policy(Protocol):
    """A callable ``policy(features [T*h*w, C], grid (T, h, w)) -> (features_out [L', C], origin int64 [L'])``."""

    def __call__(self, features: torch.Tensor, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]: ...


def predicted_tokens(policy, grid) -> int | None:
    """The tokens ``policy`` keeps of a video of LLM-side grid (T, h, w), from the grid alone: its
    ``num_tokens(grid)``, or None when it has none (a data-dependent count)."""
    count = getattr(policy, "num_tokens", None)
    return None if count is None else count(tuple(grid))


def _check_grid(grid) -> tuple[int, int, int]:
    if not isinstance(grid, (tuple, list)) or len(grid) != 3:
        raise ValueError(f"grid must be (T, h, w), got {grid!r}")
    if any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid):
        raise ValueError(f"grid must be three positive ints (T, h, w), got {tuple(grid)!r}")
    return tuple(grid)


def check_input(features, grid) -> tuple[int, int, int]:
    """Validate a policy's arguments; return the grid as a tuple of three positive ints."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor [T*h*w, C], got {type(features).__name__}")
    if features.dim() != 2:
        raise ValueError(f"features must be [T*h*w, C] (rank 2), got shape {tuple(features.shape)}")
    if features.dtype not in REFERENCE_DTYPES:
        raise TypeError(f"features must be a floating tensor, got {str(features.dtype).replace('torch.', '')}")
    T, h, w = _check_grid(grid)
    if features.shape[0] != T * h * w:
        raise ValueError(
            f"features must have T*h*w = {T}*{h}*{w} = {T * h * w} rows for grid {tuple(grid)}, "
            f"got shape {tuple(features.shape)}"
        )
    return T, h, w


def check_output(result, features: torch.Tensor, grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate what a policy returned for ``features``/``grid``; return ``(features_out, origin)``.

    Raises ValueError/TypeError naming what is wrong: not a pair, wrong rank, channel count, dtype or
    device, an empty output, ``origin`` not int64 ``[L']`` or not strictly increasing in
    ``[0, T*h*w)``. Reads ``origin`` on the host (a sync; see the module docstring).
    """
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise TypeError(f"a policy must return (features_out, origin), got {type(result).__name__}")
    out, origin = result
    n, C = features.shape
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != C:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"policy features_out must be [L', {C}], got {shape}")
    if out.dtype != features.dtype or out.device != features.device:
        raise TypeError(
            f"policy features_out must be {features.dtype} on {features.device}, got {out.dtype} on {out.device}"
        )
    if not isinstance(origin, torch.Tensor) or origin.dtype != torch.int64 or origin.shape != (out.shape[0],):
        desc = f"{origin.dtype} {tuple(origin.shape)}" if isinstance(origin, torch.Tensor) else type(origin).__name__
        raise ValueError(f"policy origin must be int64 [{out.shape[0]}] (one index per output token), got {desc}")
    if out.shape[0] == 0:
        raise ValueError(f"a policy must keep at least one token of a video with grid {tuple(grid)}, kept none")
    o = origin.cpu()
    if int(o[0]) < 0 or int(o[-1]) >= n or (o.numel() > 1 and not bool((o[1:] > o[:-1]).all())):
        raise ValueError(f"policy origin must be strictly increasing in [0, {n}), got {o.tolist()[:16]}...")
    return out, origin


class KeepAll:
    """The identity policy: every token kept, ``origin = arange(T*h*w)``. A patched model with it
    computes exactly what the unpatched model computes."""

    def num_tokens(self, grid) -> int:
        T, h, w = _check_grid(grid)
        return T * h * w

    def __call__(self, features: torch.Tensor, grid) -> tuple[torch.Tensor, torch.Tensor]:
        check_input(features, grid)
        return features, torch.arange(features.shape[0], device=features.device)

    def __repr__(self) -> str:
        return "KeepAll()"


class DropStatic:
    """Drop the tokens that did not change since the previous frame.

    Token ``(t, n)`` with ``t >= 1`` is dropped when ``cos(features[t, n], features[t - 1, n]) >=
    threshold`` (``vidtok.paired_similarity`` with lag 1, fp32 accumulation); frame 0 is always kept,
    so a fully static video keeps ``h*w`` tokens. The comparison is always with the previous *input*
    frame, not the last kept one. NaN similarities (NaN features) keep the token.

    This is the threshold form of EVS (Efficient Video Sampling, arXiv 2510.14624; vLLM
    ``vllm/multimodal/evs.py`` scores 1 - cos against the previous temporal slice, keeps the first
    slice, and keeps the original (t, h, w) M-RoPE positions of the survivors) and the same-position
    test of DyCoke's temporal stage (Tao et al., CVPR 2025), which drops rather than averages.

    Args:
        threshold: a real number; 1.0 drops only exact repeats (up to rounding), values above 1 drop
            nothing, -1 drops every token after frame 0.
        backend: passed to ``paired_similarity`` (None: the usual selection).

    Returns ``(features[origin], origin)``; ``origin`` comes from ``nonzero``, a host sync.
    """

    def __init__(self, threshold: float, *, backend: str | None = None):
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
            raise TypeError(f"threshold must be a real number, got {threshold!r}")
        self.threshold = float(threshold)
        self.backend = backend

    def keep_mask(self, features: torch.Tensor, grid) -> torch.Tensor:
        """bool ``[T, h*w]``: which tokens this policy keeps (no host sync)."""
        T, h, w = check_input(features, grid)
        keep = torch.ones((T, h * w), dtype=torch.bool, device=features.device)
        if T >= 2:
            sim = paired_similarity(features.reshape(1, T, h * w, -1), 1, backend=self.backend)[0]
            keep[1:] = ~(sim >= self.threshold)
        return keep

    def __call__(self, features: torch.Tensor, grid) -> tuple[torch.Tensor, torch.Tensor]:
        origin = self.keep_mask(features, grid).flatten().nonzero().squeeze(1)
        return features.index_select(0, origin), origin

    def __repr__(self) -> str:
        return f"DropStatic(threshold={self.threshold})"


class MergeTemporal:
    """Merge the tokens that persist across frames (``vidtok.temporal_merge``): each chain of matches
    becomes one size-weighted mean token at its earliest position.

    Token (t, n) links to its most similar token of frame t - 1 within ``radius`` on the h x w grid
    (0: the same position, FrameFusion / DyCoke; None: the whole frame, FlashVID) when the cosine is
    >= ``threshold``, or, with ``r``, the r best links of the video are kept. The output token of a
    chain stands at its root, so it keeps the root's prompt slot and (Qwen2-VL) M-RoPE position.

    Args:
        threshold: cosine in [-1, 1] (exactly one of threshold and r).
        r: links to merge per video (clamped to the (T - 1) * h * w links a video has).
        radius: search radius on the grid, or None for the whole frame.
        mode: "wmean" (default), "mean", "sum" or "replace" (see ``vidtok.temporal_merge``).
        backend: passed to ``temporal_merge``.

    Returns ``(merged tokens [L', C], origin int64 [L'])``; with a threshold, L' is read on the host.
    """

    def __init__(self, threshold: float | None = None, *, r: int | None = None, radius: int | None = 0,
                 mode: str = "wmean", backend: str | None = None):
        if (threshold is None) == (r is None):
            raise ValueError("pass exactly one of threshold= and r=")
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 0):
            raise ValueError(f"r must be an int >= 0, got {r!r}")
        self.threshold, self.r, self.radius, self.mode, self.backend = threshold, r, radius, mode, backend

    def num_tokens(self, grid) -> int | None:
        """T*h*w - min(r, (T - 1)*h*w) with r; None with a threshold (data-dependent)."""
        T, h, w = _check_grid(grid)
        return None if self.r is None else T * h * w - min(self.r, (T - 1) * h * w)

    def __call__(self, features: torch.Tensor, grid) -> tuple[torch.Tensor, torch.Tensor]:
        T, h, w = check_input(features, grid)
        x = features.reshape(1, T, h * w, -1)
        r = None if self.r is None else min(self.r, (T - 1) * h * w)
        merged = temporal_merge(x, threshold=self.threshold, r=r, radius=self.radius, mode=self.mode,
                                grid=(h, w), backend=self.backend)
        # one video: no padding, so every output is valid and origin ascends (roots in (t, n) order)
        return merged.x[0], merged.origin[0].long()

    def __repr__(self) -> str:
        what = f"threshold={self.threshold}" if self.r is None else f"r={self.r}"
        return f"MergeTemporal({what}, radius={self.radius}, mode={self.mode!r})"


class SelectFrames:
    """Keep every token of k frames chosen from the frames' mean tokens, drop the other frames.

    Methods: "dpp" (``vidtok.dpp_select``: greedy MAP of a DPP on the frame embeddings, the most
    diverse frames; MDP3-style without a query), "mmr" (``vidtok.greedy_select`` with lam: each pick
    the frame least similar to those chosen, from relevance = the frame's similarity to the video's
    mean frame), or "uniform" (``vidtok.uniform_indices``, the baseline every paper reports).
    Chosen frames keep their tokens, prompt slots and M-RoPE positions. A video with at most k frames
    is kept whole.

    Args:
        k: frames to keep, >= 1.
        method: "dpp", "mmr" or "uniform".
        lam: MMR's redundancy weight (method "mmr").
    """

    METHODS = ("dpp", "mmr", "uniform")

    def __init__(self, k: int, *, method: str = "dpp", lam: float = 1.0):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        if method not in self.METHODS:
            raise ValueError(f"method must be one of {self.METHODS}, got {method!r}")
        self.k, self.method, self.lam = k, method, float(lam)

    def num_tokens(self, grid) -> int | None:
        """min(k, T)*h*w for "uniform" and "mmr"; None for "dpp", which stops early on frames that are
        combinations of those chosen (data-dependent)."""
        T, h, w = _check_grid(grid)
        if T <= self.k:
            return T * h * w
        return None if self.method == "dpp" else self.k * h * w

    def frames(self, features: torch.Tensor, grid) -> torch.Tensor:
        """int64 ``[k']`` the chosen frames in time order (k' <= k)."""
        T, h, w = check_input(features, grid)
        if T <= self.k:
            return torch.arange(T, device=features.device)
        if self.method == "uniform":
            return uniform_indices(T, self.k, device=features.device).long()
        emb = features.reshape(T, h * w, -1).float().mean(1)[None]  # [1, T, C]
        if self.method == "dpp":
            idx = dpp_select(emb, self.k)[0]
        else:
            rel = frame_scores(emb, emb.mean(1, keepdim=True)).relevance  # [1, 1, T]
            idx = greedy_select(rel, self.k, x=emb, lam=self.lam)
        idx = idx.reshape(-1)
        return idx[idx >= 0].long()  # -1 padding (fewer frames could be chosen) dropped: a host sync

    def __call__(self, features: torch.Tensor, grid) -> tuple[torch.Tensor, torch.Tensor]:
        T, h, w = check_input(features, grid)
        chosen = self.frames(features, grid)
        origin = (chosen[:, None] * (h * w) + torch.arange(h * w, device=features.device)).reshape(-1)
        return features.index_select(0, origin), origin

    def __repr__(self) -> str:
        return f"SelectFrames(k={self.k}, method={self.method!r})"


def _dissimilarity_to_previous(features: torch.Tensor, grid, backend) -> torch.Tensor:
    """fp32 ``[T, h*w]``: 1 - cos(token, same position one frame earlier), +inf on frame 0."""
    T, h, w = grid
    score = torch.full((T, h * w), float("inf"), dtype=torch.float32, device=features.device)
    if T >= 2:
        sim = paired_similarity(features.reshape(1, T, h * w, -1), 1, backend=backend)[0]
        score[1:] = 1 - sim.float()
    return score


class EVS:
    """Efficient Video Sampling (Bagrov et al. 2025, arXiv 2510.14624) exactly as vLLM
    (``vllm/multimodal/evs.py``, ``compute_retention_mask``) and SGLang run it: a token's score is
    1 - cos(token, the same position one frame earlier), frame 0 is kept whole, and the
    ``evs_count(h*w, T, q)`` highest scores of the whole video are kept (ties to the lower (t, h, w)
    position, as their stable argsort). Kept tokens keep their prompt slots and M-RoPE positions.

    ``per_frame=True`` fixes each frame's count instead, so a prompt with one placeholder run per
    frame (timestamps between frames) cannot misalign with the kept tokens: frame 0 whole, the other frames split the rest of the same total
    evenly, the earlier frames taking the extra token (``allocate_budget``'s "uniform" rule), and
    each frame keeps its top tokens (``topk_per_frame``). ``frame_counts(grid)`` gives them.

    Args:
        q: the pruning rate, in [0, 1) (vLLM's ``video_pruning_rate``).
        per_frame: fixed counts per frame (see above) instead of one ranking over the video.
        backend: passed to ``paired_similarity`` and ``topk_per_frame``.

    Cosines accumulate in fp32 (vLLM computes them in the features' dtype), so near-ties can rank
    differently from vLLM on bf16 features; the count is identical. NaN features are a ValueError
    (inside ``vidtok.allow_nan()`` a NaN score ranks as -inf).
    """

    def __init__(self, q: float, *, per_frame: bool = False, backend: str | None = None):
        evs_count(1, 1, q)  # validates q
        self.q, self.per_frame, self.backend = float(q), bool(per_frame), backend

    def num_tokens(self, grid) -> int:
        T, h, w = _check_grid(grid)
        return evs_count(h * w, T, self.q)

    def frame_counts(self, grid) -> list[int]:
        """Tokens kept of each frame with ``per_frame=True`` (known from the grid)."""
        T, h, w = _check_grid(grid)
        rest = self.num_tokens(grid) - h * w
        base, extra = divmod(rest, T - 1) if T > 1 else (0, 0)
        return [h * w] + [base + (t < extra) for t in range(T - 1)]

    def keep_index(self, features: torch.Tensor, grid) -> torch.Tensor:
        """int64 ``[L']`` the kept flat (t, h, w) positions, ascending (no host sync)."""
        T, h, w = check_input(features, grid)
        score = _dissimilarity_to_previous(features, (T, h, w), self.backend)
        K = self.num_tokens(grid)
        if self.per_frame:
            budgets = torch.tensor([self.frame_counts(grid)], device=features.device)
            kept = topk_per_frame(score[None], budgets, capacity=K, backend=self.backend)
        else:
            budgets = torch.full((1, 1), K, device=features.device)
            kept = topk_per_frame(score.reshape(1, 1, T * h * w), budgets, capacity=K, backend=self.backend)
        return kept.index[0].long()

    def __call__(self, features: torch.Tensor, grid) -> tuple[torch.Tensor, torch.Tensor]:
        origin = self.keep_index(features, grid)
        return features.index_select(0, origin), origin

    def __repr__(self) -> str:
        return f"EVS(q={self.q}{', per_frame=True' if self.per_frame else ''})"


class Budget:
    """Exactly ``num_tokens(grid)`` tokens per video, spread over the frames by ``allocate_budget`` and
    chosen inside each frame by ``topk_per_frame``: VidCom2's recipe (Liu et al., EMNLP 2025: frames
    that differ from the video get more tokens, tokens that differ from their frame are kept) with
    the allocation and the token score as choices.

    Frame score (for the allocation): 1 - cos(frame mean, video mean), the frame's distinctiveness.
    Token score: "distinct", 1 - cos(token, its frame's mean token); or "change", 1 - cos(token, the
    same position one frame earlier) (EVS's score; frame 0 uses "distinct").

    Args:
        total: tokens per video; or ``ratio``, a fraction of the video's T*h*w (exactly one).
        allocate: "proportional" (budgets follow the frame scores), "softmax" (softmax of the frame
            scores / temperature, VidCom2's form) or "uniform".
        temperature: for "softmax".
        min_per_frame: >= 0 tokens every frame keeps (1 keeps every frame, and its timestamp, visible).
        token_score: "distinct" or "change".
        backend: passed to the ops.

    Count: ``num_tokens((T, h, w)) = min(T*h*w, max(T*min(min_per_frame, h*w), total or
    int(T*h*w*ratio)))``, from the grid alone. Outputs keep their prompt slots and M-RoPE positions.
    """

    TOKEN_SCORES = ("distinct", "change")

    def __init__(self, total: int | None = None, *, ratio: float | None = None, allocate: str = "proportional",
                 temperature: float = 0.01, min_per_frame: int = 1, token_score: str = "distinct",
                 backend: str | None = None):
        if (total is None) == (ratio is None):
            raise ValueError("pass exactly one of total= (tokens per video) and ratio= (a fraction of T*h*w)")
        if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 1):
            raise ValueError(f"total must be an int >= 1, got {total!r}")
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1):
            raise ValueError(f"ratio must be a number in (0, 1], got {ratio!r}")
        if allocate not in ALLOCATION_MODES:
            raise ValueError(f"allocate must be one of {ALLOCATION_MODES}, got {allocate!r}")
        if isinstance(min_per_frame, bool) or not isinstance(min_per_frame, int) or min_per_frame < 0:
            raise ValueError(f"min_per_frame must be an int >= 0, got {min_per_frame!r}")
        if token_score not in self.TOKEN_SCORES:
            raise ValueError(f"token_score must be one of {self.TOKEN_SCORES}, got {token_score!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        self.total, self.ratio, self.allocate, self.temperature = total, ratio, allocate, float(temperature)
        self.min_per_frame, self.token_score, self.backend = min_per_frame, token_score, backend

    def num_tokens(self, grid) -> int:
        T, h, w = _check_grid(grid)
        wanted = self.total if self.total is not None else int(T * h * w * self.ratio)
        return min(T * h * w, max(T * min(self.min_per_frame, h * w), wanted))

    def budgets(self, features: torch.Tensor, grid) -> torch.Tensor:
        """int64 ``[T]`` tokens kept of each frame (no host sync)."""
        T, h, w = check_input(features, grid)
        means = features.reshape(T, h * w, -1).float().mean(1)  # [T, C]
        centre = means.mean(0, keepdim=True)
        distinct = 1 - frame_scores(means[None], centre[None], backend=self.backend).relevance[0]  # [1, T]
        return allocate_budget(distinct.clamp_min(0), self.num_tokens(grid), min_per_frame=min(self.min_per_frame, h * w),
                               max_per_frame=h * w, mode=self.allocate, temperature=self.temperature,
                               backend=self.backend)[0]

    def token_scores(self, features: torch.Tensor, grid) -> torch.Tensor:
        """fp32 ``[T, h*w]``: the score ranking each frame's tokens."""
        T, h, w = check_input(features, grid)
        x = features.reshape(T, h * w, -1).float()
        score = 1 - torch.nn.functional.cosine_similarity(x, x.mean(1, keepdim=True), dim=-1)
        if self.token_score == "change" and T >= 2:
            score[1:] = _dissimilarity_to_previous(features, (T, h, w), self.backend)[1:]
        return score

    def keep_index(self, features: torch.Tensor, grid) -> torch.Tensor:
        """int64 ``[L']`` the kept flat (t, h, w) positions, ascending (no host sync)."""
        budgets = self.budgets(features, grid)
        kept = topk_per_frame(self.token_scores(features, grid)[None], budgets[None],
                              capacity=self.num_tokens(grid), backend=self.backend)
        return kept.index[0].long()

    def __call__(self, features: torch.Tensor, grid) -> tuple[torch.Tensor, torch.Tensor]:
        origin = self.keep_index(features, grid)
        return features.index_select(0, origin), origin

    def __repr__(self) -> str:
        size = f"total={self.total}" if self.total is not None else f"ratio={self.ratio}"
        return f"Budget({size}, allocate={self.allocate!r}, token_score={self.token_score!r})"


# ---------------------------------------------------------------------------------------------------
# Importance-aware policies: attention received and clustering (exact counts where a budget is given)


def _frames_or_video(features: torch.Tensor, grid, per_frame: bool) -> torch.Tensor:
    """[B', n, C]: the video as one sequence, or its T frames as T sequences of h*w tokens."""
    T, h, w = check_input(features, grid)
    return features.reshape(T, h * w, -1) if per_frame else features[None]


def _flat_origin(origin: torch.Tensor, n: int) -> torch.Tensor:
    """int64 [L']: per-sequence ascending positions [B', L] (no padding) as flat (t, h, w) indices."""
    return (origin.long() + n * torch.arange(origin.shape[0], device=origin.device)[:, None]).reshape(-1)


class KeepAttended:
    """Keep the tokens that receive the most attention, exactly ``tokens`` of them.

    Every token's importance is the attention mass it receives in one softmax self-attention over
    the video's tokens, with the features as queries and keys (``vidtok.attention_received``,
    scale C^-1/2, no [N, N] matrix), the signal FastV (Chen et al. 2024) and VisionZip (Yang et al.
    2025) rank visual tokens by, here computed from the tokens the policy sees. The ``tokens``
    highest are kept (ties: the lower position), in (t, h, w) order, at their own prompt slots and
    M-RoPE positions.

    Args:
        tokens: tokens to keep per video (per frame with ``per_frame``), an int >= 1; a video (frame)
            with fewer keeps all of them, so the count is min(tokens, T*h*w) (min(tokens, h*w) per
            frame): known from the grid alone.
        per_frame: rank within each frame (attention among the frame's tokens), as VisionZip does
            for video, instead of over the whole video.
        backend: passed to ``attention_received``.
    """

    def __init__(self, tokens: int, *, per_frame: bool = False, backend: str | None = None):
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"tokens must be an int >= 1, got {tokens!r}")
        self.tokens, self.per_frame, self.backend = tokens, bool(per_frame), backend

    def num_tokens(self, grid) -> int:
        """The number of tokens this policy keeps for a video of ``grid`` (T, h, w)."""
        T, h, w = _check_grid(grid)
        return T * min(self.tokens, h * w) if self.per_frame else min(self.tokens, T * h * w)

    def scores(self, features: torch.Tensor, grid) -> torch.Tensor:
        """float32 [B', n]: the attention each token receives (B' = 1, or T with per_frame)."""
        x = _frames_or_video(features, grid, self.per_frame)
        qk = x[:, None]  # one head: [B', 1, n, C]
        return attention_received(qk, qk, backend=self.backend)

    def __call__(self, features: torch.Tensor, grid) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.scores(features, grid)
        n = scores.shape[1]
        keep = min(self.tokens, n)
        ranked = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :keep]
        origin = _flat_origin(ranked.sort(dim=1).values, n)
        return features.index_select(0, origin), origin

    def __repr__(self) -> str:
        return f"KeepAttended(tokens={self.tokens}, per_frame={self.per_frame})"


class MergeClusters:
    """Merge the tokens into exactly ``clusters`` tokens per video (or per frame) by DPC-kNN.

    ``vidtok.dpc_knn_merge``: density peaks with k nearest neighbours pick the centres, every token
    joins its nearest centre, and each cluster becomes its tokens' mean at the centre's position
    (prompt slot and M-RoPE position), as HoliTom's and PruneVid's spatial merging do.

    Args:
        clusters: output tokens per video (per frame with ``per_frame``), an int >= 1; a video
            (frame) with fewer tokens keeps them all: min(clusters, T*h*w) (T * min(clusters, h*w)).
        k: neighbours for the density (clamped to the tokens present), default 5.
        per_frame: cluster each frame's tokens separately.
        mode: "wmean" (default, the mean), "mean", "sum" or "replace" (the centre's value).
        backend: passed to ``dpc_knn_merge``.
    """

    def __init__(self, clusters: int, *, k: int = 5, per_frame: bool = False, mode: str = "wmean",
                 backend: str | None = None):
        for name, value in (("clusters", clusters), ("k", k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.clusters, self.k, self.per_frame, self.mode, self.backend = clusters, k, bool(per_frame), mode, backend

    def num_tokens(self, grid) -> int:
        """The number of tokens this policy returns for a video of ``grid`` (T, h, w)."""
        T, h, w = _check_grid(grid)
        return T * min(self.clusters, h * w) if self.per_frame else min(self.clusters, T * h * w)

    def __call__(self, features: torch.Tensor, grid) -> tuple[torch.Tensor, torch.Tensor]:
        x = _frames_or_video(features, grid, self.per_frame)
        n = x.shape[1]
        merged = dpc_knn_merge(x, min(self.k, n), min(self.clusters, n), mode=self.mode, backend=self.backend)
        return merged.x.reshape(-1, x.shape[-1]), _flat_origin(merged.origin, n)

    def __repr__(self) -> str:
        return f"MergeClusters(clusters={self.clusters}, k={self.k}, per_frame={self.per_frame}, mode={self.mode!r})"


class MergeComponents:
    """One token per connected component of the tokens' similarity graph (LLaVA-Scissor).

    ``vidtok.connected_components_merge``: tokens with cosine >= ``threshold`` are linked, every
    component becomes its tokens' mean at its lowest position. The count depends on the data (read
    on the host).

    Args:
        threshold: cosine in [-1, 1].
        per_frame: find components within each frame only.
        mode: "wmean" (default, the mean), "mean", "sum" or "replace".
        backend: passed to ``connected_components_merge``.
    """

    def __init__(self, threshold: float, *, per_frame: bool = False, mode: str = "wmean", backend: str | None = None):
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a cosine in [-1, 1], got {threshold!r}")
        self.threshold, self.per_frame, self.mode, self.backend = float(threshold), bool(per_frame), mode, backend

    def __call__(self, features: torch.Tensor, grid) -> tuple[torch.Tensor, torch.Tensor]:
        x = _frames_or_video(features, grid, self.per_frame)
        n = x.shape[1]
        merged = connected_components_merge(x, self.threshold, mode=self.mode, backend=self.backend)
        valid = merged.origin >= 0  # frames with fewer components are padded: drop the padding (a host sync)
        origin = (merged.origin.long() + n * torch.arange(x.shape[0], device=x.device)[:, None])[valid]
        return merged.x[valid], origin

    def __repr__(self) -> str:
        return f"MergeComponents(threshold={self.threshold}, per_frame={self.per_frame}, mode={self.mode!r})"


"""Hugging Face transformers: compress video tokens between the vision tower and the language model.

``apply(model, policy)`` patches one loaded ``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``, ``Qwen3VLForConditionalGeneration``,
``LlavaOnevisionForConditionalGeneration`` or ``InternVLForConditionalGeneration`` (transformers 5.x)
so that every video it reads goes through ``policy`` (see ``vidtok.integrations.policies``) after the
vision tower and before the language model; ``remove(model)`` undoes it. Only the instance
is patched (its ``forward`` and ``generate`` become instance attributes wrapping the originals, with
the originals' signatures); no transformers class or file changes, and other instances are untouched.

What the patched model does when it is given a video, ``pixel_values_videos`` (InternVL:
``video_rows``, below), in ``forward`` or ``generate``:

1. Predicts each video's token count from the config and the input shapes alone (the policy's
   ``num_tokens(grid)``; ``video_token_counts`` gives the same numbers to whoever sizes prompts), runs
   the model's own ``get_video_features`` (vision tower, then Qwen's 2x2 patch merger or
   LLaVA-OneVision's projector + bilinear pooling, InternVL's pixel shuffle + projector) and calls
   ``policy(features, grid)`` once per video on its ``[T*h*w, C]`` tokens. A video whose output count differs from the prediction is a
   ValueError before anything reaches the language model. LLaVA-OneVision's trailing
   ``image_newline`` token is always kept. Qwen3-VL's DeepStack features keep the same tokens.
2. Shrinks the prompt to match: each video's run of placeholder tokens (``config.video_token_id``)
   keeps one slot per output token, and ``input_ids``, ``attention_mask``, ``labels``,
   ``mm_token_type_ids`` and given ``position_ids`` drop the same columns. When the rows of a batch
   end up with different lengths, the shorter rows are left-padded (pad token, ``attention_mask`` 0,
   label -100), the layout ``generate`` expects.
3. Qwen2-VL / Qwen2.5-VL / Qwen3-VL: the 3-D M-RoPE position ids are the ones the unpatched model
   computes for the full prompt (its own ``get_rope_index``, so Qwen2.5-VL's ``second_per_grid_ts``
   time scaling and Qwen3-VL's per-frame runs between timestamp tokens hold) restricted to the kept
   columns: a kept video token keeps the (t, h, w) position of the input token it stands at
   (``origin``), timestamps and text keep theirs, as vLLM's EVS does.
   ``model.model.rope_deltas`` is set so that decoding continues after the last original position.
   LLaVA-OneVision and InternVL (1-D RoPE): the compressed prompt is numbered 0, 1, 2, ... as if it
   were the prompt (what ``generate`` derives from the attention mask). Given ``position_ids`` (any
   family) are not recomputed: the kept columns keep theirs.
4. Calls the original ``forward``/``generate`` with the compressed prompt and the compressed features
   as ``mm_encoder_outputs={"video": CompressedVideoOutput}`` (it records each video's ``origin``;
   InternVL: ``{"image": ...}``, holding the images' features too).

Results: ``forward`` returns logits (and loss) over the *compressed* sequence, its
``video_outputs`` is the ``CompressedVideoOutput``. ``generate`` returns the prompt you passed
(uncompressed) followed by the new tokens, so ``out[:, input_ids.shape[1]:]`` are the new tokens as
usual (also for ``return_dict_in_generate``'s ``sequences``; scores and attentions refer to the
compressed prompt).

Host syncs: the kept counts are data-dependent, so each prefill with a video reads them on the host
(the policy's ``nonzero``, ``check_output``, the grid ``tolist`` and the prompt re-packing). This is
once per prompt, outside vidtok's kernel hot paths; decoding steps add none. It rules out CUDA-graph
capture of the prefill, and ``generate`` must run eagerly for that step (the usual default).

InternVL: its processor turns a video into per-frame images ("Frame1: <img><IMG_CONTEXT>...</img>",
the frames' pixels among the images' in ``pixel_values``), so the model cannot tell a video from
images. ``internvl_video_rows(processor, text, input_ids)`` recovers each video's rows from the
processor's call; pass them as ``video_rows=`` and the patched model compresses those frames
(``<IMG_CONTEXT>`` placeholders of a frame drop with its tokens; the "FrameN: <img>" text stays), its
images passing through whole. Without ``video_rows`` (or with an empty one, a prompt without video)
it runs unchanged; a named row that is not one frame's run of placeholders is a ValueError::

    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=text, videos=[clip], return_tensors="pt")
    rows = vidtok.integrations.transformers.internvl_video_rows(processor, text, inputs["input_ids"])
    model.generate(**inputs, video_rows=rows, max_new_tokens=64)

Limits (each raises a ValueError saying so): a video needs ``input_ids`` (not only
``inputs_embeds``) to find its placeholders, and must arrive at the prefill (a cache that already
holds tokens plus new ``pixel_values_videos`` is refused); LLaVA-OneVision batches whose videos keep
different token counts cannot use ``num_beams``/``num_return_sequences`` > 1 (transformers expands
its pooled video features as one tensor per video), nor InternVL batches whose prompt rows keep
different placeholder counts. Call ``remove`` before ``copy.deepcopy`` of a
patched model (the wrappers refer to the original instance).

Sparse video attention: ``apply_sparse_attention(model, layout, spec)`` makes the attention layers of
a transformers model that dispatch through ``AttentionInterface`` (``config._attn_implementation``:
VideoMAE, ViViT, V-JEPA 2, ViT, SigLIP, ...) run ``vidtok.sparse_attention`` with the plan of
``spec`` on ``layout``; ``remove_sparse_attention(model)`` undoes it. See its docstring.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.generation.utils import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vidtok import masks as _masks
from vidtok import sparse as _sparse
from vidtok.integrations.policies import check_output, predicted_tokens

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "CompressedVideoOutput",
    "apply",
    "apply_sparse_attention",
    "internvl_video_rows",
    "is_applied",
    "remove",
    "remove_sparse_attention",
    "video_token_counts",
]

_QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
_LLAVA = ("llava_onevision",)
_INTERNVL = ("internvl",)
SUPPORTED_MODEL_TYPES = _QWEN + _LLAVA + _INTERNVL
# the call argument that carries a family's videos: InternVL's frames are pixel_values rows named by video_rows
_VIDEO_INPUT = {"qwen": "pixel_values_videos", "llava": "pixel_values_videos", "internvl": "video_rows"}
_MISSING = object()
_STATE = "_vidtok_patch"


@dataclass
class CompressedVideoOutput(BaseModelOutputWithPooling):
    """The vision tower's output for the videos of one call, after the policy.

    ``pooler_output`` holds the compressed features in the layout the model's ``forward`` reads:
    Qwen: a tuple with one ``[L'_i, C]`` tensor per video; LLaVA-OneVision: ``[V, L' + 1, C]`` when
    every video kept the same count ``L'`` (the ``+ 1`` is ``image_newline``), otherwise all videos
    concatenated as ``[1, sum_i (L'_i + 1), C]``; InternVL (passed as ``mm_encoder_outputs["image"]``):
    the features of every kept image placeholder, images and video frames in prompt order, as
    ``[B, n, C]`` when every prompt row keeps ``n`` of them, otherwise ``[1, total, C]``. ``last_hidden_state``/``hidden_states``/
    ``attentions`` are the tower's, unchanged. ``origin[i]``: int64 ``[L'_i]``, the flat (t, h, w)
    index of each kept token of video i; ``grid[i]``: its LLM-side ``(T, h, w)``. Qwen3-VL:
    ``deepstack_features``, one tuple per DeepStack layer with each video's ``[L'_i, C]`` features of
    the tokens at ``origin[i]`` (exact for policies that select; a merged token takes the DeepStack
    features of the token it stands at).
    """

    origin: tuple[torch.Tensor, ...] | None = None
    grid: tuple[tuple[int, int, int], ...] | None = None
    deepstack_features: list | None = None


class _Patch:
    def __init__(self, policy, family: str):
        self.policy = policy
        self.family = family
        self.saved: dict[str, object] = {}


def _family_of(model_type: str) -> str:
    return "qwen" if model_type in _QWEN else "llava" if model_type in _LLAVA else "internvl"


def _family(model) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    inner = getattr(model, "model", None)
    encoder = "get_image_features" if model_type in _INTERNVL else "get_video_features"
    if model_type not in SUPPORTED_MODEL_TYPES or not hasattr(inner, encoder) or not hasattr(model, "generate"):
        raise TypeError(
            "apply() patches a transformers *ForConditionalGeneration model of type "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}; got {type(model).__name__} (model_type {model_type!r})"
        )
    if "mm_encoder_outputs" not in inspect.signature(model.forward).parameters:
        # the compressed features reach the model through this argument (transformers 5.x)
        raise TypeError(
            f"{type(model).__name__}.forward takes no mm_encoder_outputs: this transformers version is too old"
        )
    return _family_of(model_type)


def apply(model, policy):
    """Compress every video ``model`` reads with ``policy``; returns ``model`` (patched in place).

    Args:
        model: a loaded ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``,
            ``Qwen3VLForConditionalGeneration``, ``LlavaOnevisionForConditionalGeneration`` or
            ``InternVLForConditionalGeneration``.
        policy: ``policy(features [T*h*w, C], grid (T, h, w)) -> (features_out [L', C], origin int64
            [L'])``, e.g. ``DropStatic(0.95)``; see ``vidtok.integrations.policies``.

    Applying to a patched model replaces its policy. See the module docstring for what changes in
    ``forward``/``generate``, the host syncs and the limits.
    """
    family = _family(model)
    if not callable(policy):
        raise TypeError(f"policy must be callable as policy(features, grid), got {type(policy).__name__}")
    state = model.__dict__.get(_STATE)
    if state is not None:
        state.policy = policy
        return model
    state = _Patch(policy, family)
    for name, make in (("forward", _make_forward), ("generate", _make_generate)):
        state.saved[name] = model.__dict__.get(name, _MISSING)
        wrapper = make(model, state)
        object.__setattr__(model, name, wrapper)
    object.__setattr__(model, _STATE, state)
    return model


def remove(model):
    """Undo ``apply``: the instance's ``forward``/``generate`` are the ones it had before; returns it.

    A model that is not patched is returned unchanged. For Qwen models the cached ``rope_deltas``
    (recomputed at every prefill) is cleared, so no compressed offset outlives the patch.
    """
    state = model.__dict__.get(_STATE)
    if state is None:
        return model
    for name, old in state.saved.items():
        if old is _MISSING:
            del model.__dict__[name]
        else:
            object.__setattr__(model, name, old)
    del model.__dict__[_STATE]
    if state.family == "qwen":
        model.model.rope_deltas = None
    return model


def is_applied(model) -> bool:
    """Whether ``apply`` patched this instance (and ``remove`` has not undone it)."""
    return _STATE in model.__dict__


# ---------------------------------------------------------------------------------------------------
# wrappers


def _arguments(signature: inspect.Signature, args, kwargs) -> dict:
    """All arguments of a call by name, with the ``**kwargs`` catch-all flattened in."""
    arguments = dict(signature.bind_partial(*args, **kwargs).arguments)
    for p in signature.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            arguments.update(arguments.pop(p.name, {}))
    return arguments


def _check_prefill(arguments: dict) -> None:
    cache = arguments.get("cache", arguments.get("past_key_values"))
    if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
        raise ValueError(
            "vidtok compresses videos at the prefill only; got a video with a cache that already "
            f"holds {cache.get_seq_length()} tokens"
        )


def _has_video(family: str, arguments: dict, kwargs: dict) -> bool:
    """Whether the call carries a video; an empty InternVL ``video_rows`` (a prompt without one) is
    dropped from ``kwargs`` and the call runs unchanged."""
    videos = arguments.get(_VIDEO_INPUT[family])
    if family == "internvl" and videos is not None and torch.as_tensor(videos).numel() == 0:
        kwargs.pop("video_rows", None)
        return False
    return videos is not None


def _make_forward(model, state: _Patch):
    original = model.forward
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        arguments = _arguments(signature, args, kwargs)
        if not _has_video(state.family, arguments, kwargs):
            return original(*args, **kwargs)
        _check_prefill(arguments)
        return original(**_compress(model, state, arguments, for_generate=False))

    return forward


def _make_generate(model, state: _Patch):
    original = model.generate
    signature = inspect.signature(original)

    @functools.wraps(original)
    def generate(*args, **kwargs):
        arguments = _arguments(signature, args, kwargs)
        if not _has_video(state.family, arguments, kwargs):
            return original(*args, **kwargs)
        inputs = arguments.pop("inputs", None)
        if inputs is not None:
            if arguments.get("input_ids") is not None:
                raise ValueError("pass the prompt either as inputs or as input_ids, not both")
            arguments["input_ids"] = inputs
        _check_prefill(arguments)
        prompt = arguments.get("input_ids")
        with torch.no_grad():
            new = _compress(model, state, arguments, for_generate=True)
        _check_expansion(model, state, new)
        out = original(**new)
        # Give back the caller's prompt: the new tokens start after column L' of the compressed prompt.
        start = new["input_ids"].shape[1]
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        repeat = sequences.shape[0] // prompt.shape[0]
        restored = torch.cat([prompt.repeat_interleave(repeat, 0).to(sequences.device), sequences[:, start:]], 1)
        if isinstance(out, torch.Tensor):
            return restored
        out.sequences = restored
        return out

    return generate


def _check_expansion(model, state: _Patch, new: dict) -> None:
    """generate expands a pooled feature tensor one group per video (LLaVA-OneVision) or per prompt row
    (InternVL); features concatenated across groups of different counts cannot be expanded."""
    if state.family == "qwen":
        return
    if state.family == "llava":
        video = new["mm_encoder_outputs"]["video"]
        groups, what = len(video.origin), f"videos kept different token counts ({[len(o) for o in video.origin]})"
    else:
        video = new["mm_encoder_outputs"]["image"]
        counts = (new["input_ids"] == model.config.image_token_id).sum(1).tolist()
        groups, what = len(counts), f"prompt rows kept different image placeholder counts ({counts})"
    if groups == 1 or video.pooler_output.shape[0] == groups:
        return
    config = new.get("generation_config") or model.generation_config
    beams = new.get("num_beams") or config.num_beams or 1
    returns = new.get("num_return_sequences") or config.num_return_sequences or 1
    if beams * returns > 1:
        name = "LLaVA-OneVision" if state.family == "llava" else "InternVL"
        raise ValueError(
            f"{name}: the {what} of one batch; transformers cannot expand them for num_beams={beams}, "
            f"num_return_sequences={returns}: generate one prompt per call or use a single beam"
        )


# ---------------------------------------------------------------------------------------------------
# compression


def _llava_side(config) -> int:
    """LLaVA-OneVision's pooled grid side: ceil(patches per side / 2) after its bilinear pooling."""
    return math.ceil(config.vision_config.image_size // config.vision_config.patch_size / 2)


def _internvl_side(config) -> int:
    """InternVL's tokens per side of one frame: patches per side times the pixel-shuffle ratio."""
    vision = config.vision_config
    size, patch = (v[0] if isinstance(v, (list, tuple)) else v for v in (vision.image_size, vision.patch_size))
    return int(size // patch * config.downsample_ratio)


def _llm_grids(config, family: str, video_grid_thw=None, num_frames=None) -> list[tuple[int, int, int]]:
    """Every video's LLM-side (T, h, w), from the config and the input shapes alone (no encoder)."""
    if family == "qwen":
        if video_grid_thw is None:
            raise ValueError("Qwen-VL models need video_grid_thw with pixel_values_videos")
        m = config.vision_config.spatial_merge_size
        return [(int(t), int(h) // m, int(w) // m) for t, h, w in torch.as_tensor(video_grid_thw).tolist()]
    frames = [num_frames] if isinstance(num_frames, int) else list(num_frames)
    side = _llava_side(config) if family == "llava" else _internvl_side(config)
    return [(int(f), side, side) for f in frames]


def video_token_counts(model, policy, *, video_grid_thw=None, num_frames=None) -> list[int | None]:
    """The prompt tokens each video occupies after ``policy``, from the config alone (no encoder runs):
    what a processor or serving engine needs to size the prompt, as vLLM and SGLang size EVS prompts.

    Args:
        model: a model (or its config) of a type ``apply`` takes.
        policy: a policy; its ``num_tokens(grid)`` gives the count (see ``vidtok.integrations.policies``).
        video_grid_thw: Qwen-VL: ``[V, 3]`` as the processor gives it (patches before the spatial merge).
        num_frames: LLaVA-OneVision and InternVL: frames per video, an int (one video) or a list.

    Returns one entry per video: the LLM tokens (LLaVA-OneVision: plus its ``image_newline``; InternVL:
    the ``<IMG_CONTEXT>`` placeholders of its frames, without the "FrameN: <img>" text), or None
    where the policy keeps a data-dependent number (``DropStatic``, threshold merges). The patched model
    checks every video against this count before anything reaches the language model.
    """
    config = getattr(model, "config", model)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise TypeError(f"video_token_counts takes a model or config of type {', '.join(SUPPORTED_MODEL_TYPES)}, "
                        f"got model_type {model_type!r}")
    family = _family_of(model_type)
    if (video_grid_thw is None) == (num_frames is None) or (family == "qwen") != (video_grid_thw is not None):
        raise ValueError("pass video_grid_thw for Qwen-VL models, num_frames for LLaVA-OneVision and InternVL")
    tail = 1 if family == "llava" else 0
    counts = [predicted_tokens(policy, grid) for grid in _llm_grids(config, family, video_grid_thw, num_frames)]
    return [None if c is None else c + tail for c in counts]


def internvl_video_rows(processor, text, input_ids: torch.Tensor) -> torch.Tensor:
    """InternVL: which rows of ``pixel_values`` are the frames of each video of a processor call.

    InternVL's processor turns each ``<video>`` of the text into per-frame images ("Frame1: <img>
    <IMG_CONTEXT>... </img>") and puts their pixels among the images' in ``pixel_values``, so the
    model cannot tell a video from images. Pass the result as ``video_rows=`` to a patched InternVL
    model (``apply``) to have its videos compressed.

    Args:
        processor: the ``InternVLProcessor`` that made ``input_ids``.
        text: the text (a string or a list, one per prompt row) given to the processor.
        input_ids: the processor's ``input_ids``.

    Returns int64 ``[V, 2]``: each video's first ``pixel_values`` row and its frame count, in prompt
    order. Found by walking the runs of ``<IMG_CONTEXT>`` tokens in the order the processor stacked
    the pixels: an image is one run (its tiles), a video one run per frame; every video of a call has
    the same number of frames (the processor stacks them).
    """
    texts = [text] if isinstance(text, str) else list(text)
    order = [m.lastgroup for row in texts for m in processor.multimodal_pattern.finditer(row)]
    per_row = processor.image_seq_length
    runs = []  # lengths of the runs of image tokens, in row-major order
    for row in (torch.as_tensor(input_ids) == processor.image_token_id).tolist():
        length = 0
        for is_image in row + [False]:
            if is_image:
                length += 1
            elif length:
                runs.append(length)
                length = 0
    videos = order.count("video")
    images = len(order) - videos
    if videos == 0:
        return torch.zeros(0, 2, dtype=torch.int64)
    frames, left = divmod(len(runs) - images, videos)
    if frames < 1 or left or any(n % per_row for n in runs):
        raise ValueError(
            f"input_ids hold {len(runs)} runs of image tokens for {images} images and {videos} videos of the "
            "text: they are not the processor's output for this text")
    out, row, run = [], 0, 0
    for kind in order:
        if kind == "image":
            row += runs[run] // per_row
            run += 1
        else:
            if any(n != per_row for n in runs[run : run + frames]):
                raise ValueError("a video frame of input_ids is not one image row long: not the processor's output "
                                 "for this text")
            out.append((row, frames))
            row += frames
            run += frames
    return torch.tensor(out, dtype=torch.int64)


def _video_rows(arguments: dict) -> list[tuple[int, int]]:
    """InternVL: each video's (first row, frames) in ``pixel_values``, checked against its rows."""
    pixel_values = arguments.get("pixel_values")
    if pixel_values is None:
        raise ValueError("InternVL: video_rows names rows of pixel_values, but no pixel_values were given")
    rows = torch.as_tensor(arguments["video_rows"])
    if rows.dim() != 2 or rows.shape[1] != 2 or rows.dtype.is_floating_point or rows.dtype == torch.bool:
        raise ValueError(f"video_rows must be integer [V, 2] (first pixel_values row, frames), got {rows.dtype} "
                         f"{tuple(rows.shape)}")
    pairs = [(int(s), int(f)) for s, f in rows.tolist()]
    end = 0
    for s, f in pairs:
        if s < end or f < 1 or s + f > pixel_values.shape[0]:
            raise ValueError(
                f"video_rows must list non-overlapping runs of at least one frame, in order, inside the "
                f"{pixel_values.shape[0]} rows of pixel_values; got {pairs}")
        end = s + f
    return pairs


def _check_frame_runs(placeholders: torch.Tensor, rows: list[tuple[int, int]], per_row: int) -> None:
    """InternVL: every row that video_rows names must be one frame, a run of exactly ``per_row``
    placeholders in the prompt ("FrameN: <img>...</img>"); an image's tiles share one longer run."""
    width = placeholders.shape[1]
    pos = placeholders.flatten().nonzero().squeeze(1).tolist()  # batch-flat positions, in feature order
    for s, f in rows:
        for row in range(s, s + f):
            first, last = row * per_row, (row + 1) * per_row - 1
            joined = [(first > 0 and pos[first - 1] + 1 == pos[first] and pos[first - 1] // width == pos[first] // width),
                      (last + 1 < len(pos) and pos[last] + 1 == pos[last + 1] and pos[last] // width == pos[last + 1] // width)]
            one_run = pos[last] - pos[first] == per_row - 1 and pos[first] // width == pos[last] // width
            if not one_run or any(joined):
                raise ValueError(
                    f"video_rows names pixel_values row {row}, whose {per_row} placeholders are not one frame's run "
                    "of their own in input_ids (the tiles of an image share one run): video_rows must name video "
                    "frames only (see internvl_video_rows)")


def _video_features(model, family: str, arguments: dict, rows: list[tuple[int, int]] | None):
    """(tower output, per-video [n_i, C] bodies, per-video tails or None, per-video LLM-side grids).
    InternVL: the tower output covers every pixel_values row (images and frames); ``rows`` are the
    videos' (first row, frames)."""
    inner, config = model.model, model.config
    if family == "internvl":
        output = inner.get_image_features(
            arguments["pixel_values"],
            vision_feature_layer=arguments.get("vision_feature_layer"),
            vision_feature_select_strategy=arguments.get("vision_feature_select_strategy"),
            return_dict=True,
        )
        pooled = output.pooler_output  # [rows, side * side, C]
        side = _internvl_side(config)
        if pooled.shape[1] != side * side:
            raise ValueError(f"InternVL features have {pooled.shape[1]} tokens per image row, expected "
                             f"{side}x{side} from the config; unsupported feature layout")
        bodies = [pooled[s : s + f].reshape(f * side * side, -1) for s, f in rows]
        return output, bodies, [None] * len(rows), [(f, side, side) for _, f in rows]
    pixel_values_videos = arguments["pixel_values_videos"]
    if family == "qwen":
        grid_thw = arguments.get("video_grid_thw")
        grids = _llm_grids(config, family, grid_thw)
        output = inner.get_video_features(pixel_values_videos, grid_thw, return_dict=True)
        return output, list(output.pooler_output), [None] * len(grids), grids
    output = inner.get_video_features(
        pixel_values_videos,
        vision_feature_layer=arguments.get("vision_feature_layer"),
        vision_feature_select_strategy=arguments.get("vision_feature_select_strategy"),
        return_dict=True,
    )
    pooled = output.pooler_output  # [V, frames * ph * pw + 1, C]: pooled frames, then image_newline
    frames = pixel_values_videos.shape[1]
    side = _llava_side(config)
    if pooled.shape[1] != frames * side * side + 1:
        raise ValueError(
            f"LLaVA-OneVision video features have {pooled.shape[1]} tokens per video, expected "
            f"frames*ceil(p/2)^2 + 1 = {frames}*{side}*{side} + 1; unsupported pooling"
        )
    grids = [(frames, side, side)] * pooled.shape[0]
    return output, list(pooled[:, :-1]), list(pooled[:, -1:]), grids


def _image_features(model, family: str, arguments: dict):
    """The images of the call encoded as the model's forward would (they pass through uncompressed):
    the forward refuses pixel_values beside mm_encoder_outputs, so both modalities go in the latter."""
    inner = model.model
    if family == "qwen":
        return inner.get_image_features(arguments["pixel_values"], arguments.get("image_grid_thw"), return_dict=True)
    return inner.get_image_features(
        arguments["pixel_values"],
        arguments.get("image_sizes"),
        vision_feature_layer=arguments.get("vision_feature_layer"),
        vision_feature_select_strategy=arguments.get("vision_feature_select_strategy"),
        batch_num_images=arguments.get("batch_num_images"),
        return_dict=True,
    )


def _compress(model, state: _Patch, arguments: dict, *, for_generate: bool) -> dict:
    """The call's arguments with the videos compressed and the prompt shrunk to match (see module doc)."""
    family, config, inner = state.family, model.config, model.model
    input_ids = arguments.get("input_ids")
    if input_ids is None:
        raise ValueError(
            "vidtok needs input_ids to find the video placeholder tokens; got a video with inputs_embeds only"
        )
    modality = "image" if family == "internvl" else "video"  # where the compressed features go
    if (arguments.get("mm_encoder_outputs") or {}).get(modality) is not None:
        raise ValueError(f"got both {_VIDEO_INPUT[family]} and mm_encoder_outputs[{modality!r}]")
    attention_mask = arguments.get("attention_mask")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [batch, seq] (2-D), got shape {tuple(attention_mask.shape)}")
    if family == "qwen" and arguments.get("position_ids") is None and arguments.get("mm_token_type_ids") is None:
        raise ValueError(
            "Qwen-VL models need mm_token_type_ids (from the processor) to compute M-RoPE positions of a video"
        )

    # 1. The policy, once per video; its count predicted from the grid before the encoder runs.
    rows = None  # InternVL: each video's (first pixel_values row, frames)
    if family == "qwen":
        grids = _llm_grids(config, family, arguments.get("video_grid_thw"))
    elif family == "llava":
        videos = arguments["pixel_values_videos"]
        grids = _llm_grids(config, family, num_frames=[videos.shape[1]] * videos.shape[0])
    else:
        rows = _video_rows(arguments)
        grids = _llm_grids(config, family, num_frames=[f for _, f in rows])
    predicted = [predicted_tokens(state.policy, grid) for grid in grids]
    output, bodies, tails, grids = _video_features(model, family, arguments, rows)
    device = input_ids.device
    outs, origins, keeps = [], [], []
    for i, (body, tail, grid) in enumerate(zip(bodies, tails, grids)):
        if body.shape[0] != math.prod(grid):
            raise ValueError(f"video {i} has {body.shape[0]} tokens after the vision tower, but its grid {grid} "
                             f"from the config and inputs gives {math.prod(grid)}")
        out, origin = check_output(state.policy(body, grid), body, grid)
        if predicted[i] is not None and out.shape[0] != predicted[i]:
            raise ValueError(
                f"{state.policy!r} kept {out.shape[0]} tokens of video {i} (grid {grid}) but its num_tokens "
                f"predicted {predicted[i]} from the grid; nothing was passed to the model")
        keep = torch.zeros(body.shape[0], dtype=torch.bool, device=device)
        keep[origin.to(device)] = True
        if tail is not None:
            out = torch.cat([out, tail])
            keep = torch.cat([keep, keep.new_ones(1)])
        outs.append(out)
        origins.append(origin)
        keeps.append(keep)

    if family == "internvl":
        # Every image placeholder of the call, images and frames: images keep all of theirs, and the
        # features become the kept ones in prompt order.
        pooled = output.pooler_output
        per_row = pooled.shape[1]
        flat = pooled.reshape(-1, pooled.shape[-1])
        keep_all = torch.ones(flat.shape[0], dtype=torch.bool, device=device)
        pieces, done = [], 0
        for (s, f), keep, out in zip(rows, keeps, outs):
            keep_all[s * per_row : (s + f) * per_row] = keep
            pieces += [flat[done * per_row : s * per_row], out]
            done = s + f
        features = torch.cat(pieces + [flat[done * per_row :]])
        keeps = [keep_all]

    # 2. Which prompt columns survive. masked_scatter fills placeholders in row-major order, so the
    #    i-th placeholder of the whole batch belongs to the i-th video token in order (InternVL: the
    #    i-th image token of the rows of pixel_values).
    placeholder = config.image_token_id if family == "internvl" else config.video_token_id
    video_mask = input_ids == placeholder
    placeholders, expected = int(video_mask.sum()), sum(k.numel() for k in keeps)
    if placeholders != expected:
        given = "the rows of pixel_values give" if family == "internvl" else "the videos give"
        raise ValueError(
            f"input_ids hold {placeholders} placeholder tokens (id {placeholder}) but {given} {expected} tokens"
        )
    if family == "internvl":
        _check_frame_runs(video_mask, rows, output.pooler_output.shape[1])
    keep_seq = torch.ones_like(video_mask)
    keep_seq[video_mask] = torch.cat(keeps)
    batch = input_ids.shape[0]
    lengths = keep_seq.sum(1)
    width = int(lengths.max())
    pad = width - lengths  # new left padding per row
    rows, cols = keep_seq.nonzero(as_tuple=True)
    dest = pad[rows] + keep_seq.long().cumsum(1)[rows, cols] - 1

    def pack(x: torch.Tensor, fill) -> torch.Tensor:  # x [..., B, L] -> [..., B, width]
        packed = x.new_full((*x.shape[:-2], batch, width), fill)
        packed[..., rows, dest] = x[..., rows, cols]
        return packed

    new_padding = bool((pad > 0).any())
    consumed = ("pixel_values", "video_rows") if family == "internvl" else ("pixel_values_videos",)
    new = {k: v for k, v in arguments.items() if k not in consumed}
    pad_id = config.text_config.pad_token_id
    new["input_ids"] = pack(input_ids, 0 if pad_id is None else pad_id)
    if attention_mask is None and (new_padding or for_generate):
        attention_mask = torch.ones_like(input_ids)
    new["attention_mask"] = None if attention_mask is None else pack(attention_mask, 0)
    for name, fill in (("labels", -100), ("mm_token_type_ids", 0)):
        if arguments.get(name) is not None:
            new[name] = pack(arguments[name], fill)

    # 3. Position ids.
    if arguments.get("position_ids") is not None:
        new["position_ids"] = pack(arguments["position_ids"], 0)
    elif family == "qwen":
        rope_kwargs = {"attention_mask": arguments.get("attention_mask")}
        for name in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts"):
            if arguments.get(name) is not None:
                rope_kwargs[name] = arguments[name]
        full, deltas = inner.get_rope_index(input_ids, mm_token_type_ids=arguments["mm_token_type_ids"], **rope_kwargs)
        positions = pack(full, 0)  # [3, B, width]: kept tokens keep their (t, h, w)
        # delta = max position + 1 - tokens; each dropped token shortens the row by one.
        removed = (~keep_seq).sum(1, keepdim=True)
        inner.rope_deltas = deltas + removed.to(deltas.device)
        if for_generate:
            # the [text; t; h; w] layout Qwen's own _prepare_position_ids_for_generation builds
            text = GenerationMixin._prepare_position_ids_for_generation(
                model, new["input_ids"], {"attention_mask": new["attention_mask"]}
            )
            positions = torch.cat([text[None].to(positions), positions])
        new["position_ids"] = positions
    elif new_padding and not for_generate:
        # 1-D positions: number each compressed row from 0, as if it were not padded.
        new["position_ids"] = (torch.arange(width, device=device)[None] - pad[:, None]).clamp(min=0)

    # 4. The compressed features, in the layout the model's forward reads.
    if family == "qwen":
        pooler = tuple(outs)
    elif family == "internvl":
        counts = (new["input_ids"] == placeholder).sum(1).tolist()
        pooler = features.view(batch, counts[0], -1) if len(set(counts)) == 1 else features[None]
    elif len({o.shape[0] for o in outs}) == 1:
        pooler = torch.stack(outs)
    else:
        pooler = torch.cat(outs)[None]
    deepstack = getattr(output, "deepstack_features", None)
    if deepstack is not None:  # Qwen3-VL: the same tokens of every DeepStack layer
        deepstack = [tuple(f.index_select(0, o.to(f.device)) for f, o in zip(layer, origins)) for layer in deepstack]
    video = CompressedVideoOutput(
        last_hidden_state=output.last_hidden_state,
        pooler_output=pooler,
        hidden_states=output.hidden_states,
        attentions=output.attentions,
        origin=tuple(origins),
        grid=tuple(grids),
        deepstack_features=deepstack,
    )
    mm_encoder_outputs = {**(arguments.get("mm_encoder_outputs") or {}), modality: video}
    if family != "internvl" and arguments.get("pixel_values") is not None:
        if mm_encoder_outputs.get("image") is not None:
            raise ValueError("got both pixel_values and mm_encoder_outputs['image']")
        mm_encoder_outputs["image"] = _image_features(model, family, arguments)
        del new["pixel_values"]
    new["mm_encoder_outputs"] = mm_encoder_outputs
    return new


# ---------------------------------------------------------------------------------------------------
# sparse video attention

_SPARSE_STATE = "_vidtok_sparse_attention"


@dataclass
class _SparseAttention:
    name: str  # its key in transformers' AttentionInterface
    layout: _sparse.VideoLayout
    spec: _masks.MaskSpec
    block: tuple
    saved: str | None  # the config's attention implementation before
    plans: dict  # (device, batch) -> SparsePlan, built on first use

    def plan(self, device: torch.device, batch: int) -> _sparse.SparsePlan:
        key = (device, batch)
        if key not in self.plans:
            layout = self.layout
            if layout.batch not in (1, batch):
                raise ValueError(
                    f"apply_sparse_attention's layout holds {layout.batch} sequences, but an attention layer got a "
                    f"batch of {batch} (a layout of one sequence serves any batch)"
                )
            layout = layout.to(device)
            if layout.batch != batch:
                layout = layout.expand(batch)
            self.plans[key] = _sparse.build_plan(layout, self.spec, block=self.block)
        return self.plans[key]

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """The AttentionInterface function: query [B, H, N, D], key/value [B, H_kv, N, D] ->
        ([B, N, H, D], None)."""
        if attention_mask is not None:
            raise ValueError(
                f"{type(module).__name__} passed an attention_mask; vidtok sparse attention takes its mask from the "
                "plan only (remove_sparse_attention to run this model with masks)"
            )
        if dropout:
            raise ValueError(f"vidtok sparse attention has no attention dropout, got dropout={dropout} (call model.eval() or set it to 0)")
        unsupported = sorted(name for name, v in kwargs.items() if isinstance(v, torch.Tensor) or v)
        if unsupported:
            raise ValueError(f"vidtok sparse attention does not support these arguments of {type(module).__name__}: {unsupported}")
        plan = self.plan(query.device, query.shape[0])
        log_size = plan.layout.kv_log_size
        out = _sparse.sparse_attention(query, key, value, plan, scale=scaling, kv_log_size=log_size)
        return out.transpose(1, 2), None


def apply_sparse_attention(model, layout, spec, *, block: tuple[int, int] = (64, 64)):
    """Run the attention layers of ``model`` as ``vidtok.sparse_attention`` with the plan of ``spec``
    on ``layout``; returns ``model`` (changed in place).

    Args:
        model: a transformers model (or sub-model) whose attention layers dispatch through
            ``AttentionInterface``, i.e. read ``config._attn_implementation`` (VideoMAE, ViViT, V-JEPA 2,
            ViT, SigLIP, ...). Exactly the layers that read ``model.config`` change: a sub-model with
            its own sub-config (a VLM's vision tower) changes alone. Its layers must see the layout's
            tokens in the layout's order (a token count that differs is refused; an order that differs,
            e.g. Qwen2-VL's vision blocks, which order tokens by 2x2 merge windows, cannot be seen).
        layout: the ``vidtok.VideoLayout`` of the layers' token sequence (N tokens in the model's
            order, e.g. ``VideoLayout.from_grid(T, h, w, num_global=1)`` for a [CLS] token followed by
            the video's patches in (t, h, w) order). One sequence serves any batch; B sequences serve
            batches of B. Its ``kv_log_size`` (``from_merge``), if any, is added to the keys' logits.
        spec: a ``vidtok.masks`` spec, e.g. ``masks.neighborhood((3, 7, 7)) | masks.global_tokens()``.
        block: the plan's (BQ, BK) tiles.

    Plans are built on the first call per (device, batch size) and cached (host syncs; the first plan
    is built here, so a bad layout or spec fails now). Run one eager call per device and batch size
    before ``torch.compile``; after it the layers compile with ``fullgraph=True``. Layers given an
    ``attention_mask``, attention dropout (training with a dropout probability > 0) or other options
    the op lacks (sliding windows, soft-capping, varlen ``cu_seq_lens``) raise a ValueError naming
    them instead of being approximated. Applying again replaces the layout and spec. On GPUs run the
    model in bfloat16 or float16 for speed: sparse_attention's Triton kernels take float32 too, but
    with IEEE fp32 products (no tensor cores).
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise TypeError(f"model must be a transformers model with a config, got {type(model).__name__}")
    if not isinstance(layout, _sparse.VideoLayout):
        raise TypeError(f"layout must be a vidtok.VideoLayout, got {type(layout).__name__}")
    first = _sparse.build_plan(layout, spec, block=block)  # validates spec and block
    remove_sparse_attention(model)
    state = _SparseAttention(
        name=f"vidtok_sparse_{id(model):x}",
        layout=layout,
        spec=spec,
        block=tuple(block),
        saved=config._attn_implementation,
        plans={(layout.device, layout.batch): first},
    )
    AttentionInterface.register(state.name, state.attention)
    config._attn_implementation = state.name
    object.__setattr__(model, _SPARSE_STATE, state)
    return model


def remove_sparse_attention(model):
    """Undo ``apply_sparse_attention``: the config's attention implementation is the one it had before
    and the attention function is unregistered; returns ``model``. Unchanged if it was not applied."""
    state = model.__dict__.get(_SPARSE_STATE)
    if state is None:
        return model
    model.config._attn_implementation = state.saved
    AttentionInterface._global_mapping.pop(state.name, None)
    del model.__dict__[_SPARSE_STATE]
    return model

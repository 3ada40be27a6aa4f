"""vidtok.integrations.transformers on tiny random-weight Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision
and InternVL.

Fully offline: models are built from configs (no downloads); prompts are built by hand from the
placeholder token ids, and pixel inputs have the shapes the processors would give. InternVL's
``internvl_video_rows`` is also checked on a real ``InternVLProcessor`` with a tokenizer built here.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from vidtok.integrations import EVS, Budget, DropStatic, KeepAll, KeepAttended, MergeClusters, MergeTemporal, SelectFrames  # noqa: E402
from vidtok.integrations import transformers as vt  # noqa: E402
import vidtok  # noqa: E402
from vidtok.integrations.policies import check_output  # noqa: E402

VOCAB, PAD, BOS, EOS = 128, 0, 1, 2
IMAGE, VIDEO, V_START, V_END = 120, 121, 122, 123
TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, max_position_embeddings=512,
)
MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "internvl"]
TIMESTAMP = 30  # Qwen3-VL: one text token before each temporal patch stands for its "<t seconds>"
FRAME = 40  # InternVL: one text token before each frame stands for its "FrameN:"
NEW_TOKENS = 3


class Case:
    """A tiny model of one family and the inputs its processor would produce for a prompt with one video
    per row: ``[BOS, 5, V_START, <video placeholders>, V_END, 6, 7]``; Qwen3-VL puts a timestamp token
    and its own V_START ... V_END around each temporal patch's placeholders, as its processor does;
    InternVL a "FrameN:" token and <img> ... </img> around each frame's image placeholders, its frames
    being rows of ``pixel_values`` named by ``video_rows``."""

    def __init__(self, family: str):
        self.family = family
        self.qwen = family not in ("llava_onevision", "internvl")
        self.internvl = family == "internvl"
        self.placeholder = IMAGE if self.internvl else VIDEO
        torch.manual_seed(0)
        if family == "qwen2_vl":
            config = transformers.Qwen2VLConfig(
                vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4),
                text_config=dict(TEXT, rope_parameters=MROPE),
                image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=V_START, vision_end_token_id=V_END,
            )
            self.model = transformers.Qwen2VLForConditionalGeneration(config)
        elif family == "qwen2_5_vl":
            config = transformers.Qwen2_5_VLConfig(
                vision_config=dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2,
                                   patch_size=4, window_size=16, fullatt_block_indexes=[1]),
                text_config=dict(TEXT, rope_parameters=MROPE),
                image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=V_START, vision_end_token_id=V_END,
            )
            self.model = transformers.Qwen2_5_VLForConditionalGeneration(config)
        elif family == "qwen3_vl":
            config = transformers.Qwen3VLConfig(
                vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                                   out_hidden_size=64, num_position_embeddings=16, deepstack_visual_indexes=[0]),
                text_config=dict(TEXT, head_dim=16, rope_parameters=dict(MROPE, mrope_interleaved=True)),
                image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=V_START, vision_end_token_id=V_END,
            )
            self.model = transformers.Qwen3VLForConditionalGeneration(config)
        elif family == "internvl":
            config = transformers.InternVLConfig(
                vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=[32, 32], patch_size=[8, 8]),
                text_config=transformers.Qwen2Config(**TEXT), image_token_id=IMAGE, image_seq_length=4,
            )
            self.model = transformers.InternVLForConditionalGeneration(config)
        else:
            config = transformers.LlavaOnevisionConfig(
                vision_config=transformers.SiglipVisionConfig(
                    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                    patch_size=8,
                ),
                text_config=transformers.Qwen2Config(**TEXT),
                image_token_id=IMAGE, video_token_id=VIDEO, vision_feature_layer=-1,
            )
            self.model = transformers.LlavaOnevisionForConditionalGeneration(config)
        self.model.eval()
        # LLM-side grid of every video: Qwen 3 temporal patches (6 frames) of 4x4 patches -> (3, 2, 2)
        # after the 2x2 merger; LLaVA 3 frames of 4x4 SigLIP patches -> (3, 2, 2) after pooling;
        # InternVL 3 frames of 4x4 patches -> (3, 2, 2) after its pixel shuffle.
        self.grid = (3, 2, 2)
        self.tail = 1 if family == "llava_onevision" else 0  # LLaVA adds image_newline

    def video(self, static: bool, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        if self.qwen:  # pre-patchified rows (T*H*W, C*temporal_patch*P*P), one temporal slab after another
            slab = torch.randn(16, 3 * 2 * 4 * 4, generator=g)
            return slab.repeat(3, 1) if static else torch.cat([slab, torch.randn(32, 96, generator=g)])
        frames = torch.randn(3, 3, 32, 32, generator=g)
        return frames[:1].expand(3, -1, -1, -1).clone() if static else frames

    def video_ids(self, T: int = 3) -> list[int]:
        """The placeholder span of one video of T temporal patches (2x2 LLM tokens each)."""
        if self.family == "qwen3_vl":
            return sum(([TIMESTAMP + t, V_START] + [VIDEO] * 4 + [V_END] for t in range(T)), [])
        if self.internvl:
            return sum(([FRAME + t, V_START] + [IMAGE] * 4 + [V_END] for t in range(T)), [])
        return [V_START] + [VIDEO] * (4 * T + self.tail) + [V_END]

    def inputs(self, statics: list[bool], seed: int = 0, image: bool = False) -> dict:
        """One video per row (static or not); ``image`` (Qwen, InternVL) puts a one-row image before it."""
        picture = [V_START] + [IMAGE] * 4 + [V_END] if image else []
        ids = torch.tensor([[BOS, 5] + picture + self.video_ids() + [6, 7]] * len(statics))
        videos = [self.video(s, seed + i) for i, s in enumerate(statics)]
        kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
        if self.internvl:
            g = torch.Generator().manual_seed(seed + 50)
            pictures = [torch.randn(1, 3, 32, 32, generator=g) if image else torch.zeros(0, 3, 32, 32) for _ in statics]
            kw["pixel_values"] = torch.cat([torch.cat(pair) for pair in zip(pictures, videos)])
            per_row = 3 + int(image)
            kw["video_rows"] = torch.tensor([[row * per_row + int(image), 3] for row in range(len(statics))])
        elif self.qwen:
            kw.update(
                pixel_values_videos=torch.cat(videos),
                video_grid_thw=torch.tensor([[3, 4, 4]] * len(statics)),
                mm_token_type_ids=(ids == VIDEO).long() * 2 + (ids == IMAGE).long(),
            )
            if image:
                g = torch.Generator().manual_seed(seed + 50)
                kw["pixel_values"] = torch.randn(16 * len(statics), 96, generator=g)
                kw["image_grid_thw"] = torch.tensor([[1, 4, 4]] * len(statics))
            if self.family == "qwen2_5_vl":  # time-scaled temporal positions must survive compression
                kw["second_per_grid_ts"] = torch.tensor([2.0] * len(statics))
        else:
            kw["pixel_values_videos"] = torch.stack(videos)
        return kw

    def generate(self, kw, **extra):
        if not vt.is_applied(self.model):  # the unpatched generate refuses the argument it does not know
            kw = {k: v for k, v in kw.items() if k != "video_rows"}
        return self.model.generate(**kw, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, **extra)

    def compressed(self, out) -> vt.CompressedVideoOutput:
        """The patched forward's record of the videos (InternVL: in its image outputs)."""
        return out.image_outputs if self.internvl else out.video_outputs

    def single(self, kw: dict, row: int) -> dict:
        """The inputs of one row of ``kw`` (made by ``inputs``, one video per row and no image)."""
        pixels = ("pixel_values", "video_rows", "pixel_values_videos", "video_grid_thw")
        single = {k: v[row : row + 1] for k, v in kw.items() if k not in pixels}
        if self.internvl:
            single["pixel_values"] = kw["pixel_values"].view(-1, 3, 3, 32, 32)[row]
            single["video_rows"] = torch.tensor([[0, 3]])
        elif self.qwen:
            single["pixel_values_videos"] = kw["pixel_values_videos"].view(2, -1, 96)[row]
            single["video_grid_thw"] = kw["video_grid_thw"][row : row + 1]
        else:
            single["pixel_values_videos"] = kw["pixel_values_videos"][row : row + 1]
        return single


@pytest.fixture(scope="module", params=FAMILIES)
def case(request):
    return Case(request.param)


@pytest.fixture
def patched(case):
    """The case's model, un-patched again after the test whatever happens."""
    yield case
    vt.remove(case.model)


class Recorder:
    """Records what reaches the language model on each call: sequence length and position ids."""

    def __init__(self, model):
        self.lengths, self.positions = [], []
        self.handle = model.model.language_model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.lengths.append(kwargs["inputs_embeds"].shape[1])
        self.positions.append(kwargs.get("position_ids"))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_keep_all_is_exact(patched):
    case, model = patched, patched.model
    kw = case.inputs([False, False], seed=1, image=case.qwen or case.internvl)
    labels = kw["input_ids"].masked_fill(kw["input_ids"] >= IMAGE, -100)
    with torch.no_grad():
        ref = model(**kw).logits
        ref_loss = model(**kw, labels=labels).loss
    ref_gen = case.generate(kw, return_dict_in_generate=True, output_logits=True)
    vt.apply(model, KeepAll())
    assert vt.is_applied(model)
    # generate() reads the forward's signature (mm_encoder_outputs, position_ids): it must be kept
    assert inspect.signature(model.forward) == inspect.signature(type(model).forward.__get__(model))
    with torch.no_grad():
        assert torch.equal(model(**kw).logits, ref)
        assert torch.equal(model(**kw, labels=labels).loss, ref_loss)
    gen = case.generate(kw, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(gen.sequences, ref_gen.sequences)
    assert all(torch.equal(a, b) for a, b in zip(gen.logits, ref_gen.logits))


def test_drop_static_generate_prefill_sees_fewer_tokens(patched):
    case, model = patched, patched.model
    kw = case.inputs([True])
    L = kw["input_ids"].shape[1]
    T, h, w = case.grid
    vt.apply(model, DropStatic(0.99))
    with torch.no_grad(), Recorder(model) as rec:
        out = model(**kw)
    assert rec.lengths == [L - (T - 1) * h * w]  # a static video keeps frame 0 only
    video = (kw["input_ids"][0] == case.placeholder).nonzero().squeeze(1)
    assert out.logits.shape[1] == L - (T - 1) * h * w
    assert isinstance(case.compressed(out), vt.CompressedVideoOutput)
    assert case.compressed(out).grid == (case.grid,)
    assert torch.equal(case.compressed(out).origin[0], torch.arange(h * w))
    # labels shrink with the prompt: the loss is the one of the compressed sequence
    labels = kw["input_ids"].masked_fill(kw["input_ids"] >= IMAGE, -100)
    dropped = torch.zeros(L, dtype=torch.bool)
    dropped[video[h * w : T * h * w]] = True  # LLaVA-OneVision keeps its trailing image_newline
    kept = labels[0, ~dropped]  # dropped ones are -100
    with torch.no_grad():
        loss = model(**kw, labels=labels).loss
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1], kept[1:], ignore_index=-100)
    torch.testing.assert_close(loss, expected)

    with Recorder(model) as rec:
        seq = case.generate(kw)
    assert rec.lengths == [L - (T - 1) * h * w] + [1] * (NEW_TOKENS - 1)
    assert seq.shape == (1, L + NEW_TOKENS)
    assert torch.equal(seq[:, :L], kw["input_ids"])  # the caller's prompt comes back uncompressed


def _kept_columns(kw, origins):
    """Columns of the uncompressed prompt that survive (one Qwen video per row)."""
    cols = []
    for row, origin in zip(kw["input_ids"], origins):
        where = (row == VIDEO).nonzero().squeeze(1)
        keep = torch.ones(row.shape[0], dtype=torch.bool)
        keep[where] = False
        keep[where[origin]] = True  # image placeholders stay: the policy only sees videos
        cols.append(keep.nonzero().squeeze(1))
    return cols


def test_qwen_positions_are_kept(patched):
    case, model = patched, patched.model
    if not case.qwen:
        pytest.skip("M-RoPE is Qwen's; 1-D RoPE is checked in test_1d_positions_number_the_kept_prompt")
    kw = case.inputs([True], image=True)
    for name, first in (("input_ids", PAD), ("attention_mask", 0), ("mm_token_type_ids", 0)):  # left-padded
        kw[name] = torch.cat([torch.tensor([[first]]), kw[name]], 1)
    keys = ("attention_mask", "image_grid_thw", "video_grid_thw", "second_per_grid_ts")
    rope_kwargs = {k: kw[k] for k in keys if k in kw}
    full, deltas = model.model.get_rope_index(kw["input_ids"], mm_token_type_ids=kw["mm_token_type_ids"], **rope_kwargs)
    if case.family == "qwen2_5_vl":
        assert full[0].max() > full[1].max()  # second_per_grid_ts really spreads the temporal positions
    vt.apply(model, DropStatic(0.99))
    with torch.no_grad(), Recorder(model) as rec:
        out = model(**kw)
    (cols,) = _kept_columns(kw, out.video_outputs.origin)
    assert torch.equal(rec.positions[0], full[:, :, cols])
    removed = kw["input_ids"].shape[1] - cols.numel()
    assert torch.equal(model.model.rope_deltas, deltas + removed)

    with Recorder(model) as rec:
        case.generate(kw)
    prefill = rec.positions[0]  # [text; t; h; w] as Qwen's generate builds it
    assert torch.equal(prefill[1:], full[:, :, cols])
    assert torch.equal(prefill[0, 0], torch.arange(-1, cols.numel() - 1).clamp(min=0))
    # the first generated token continues right after the last prompt position
    assert torch.equal(rec.positions[1][1:, 0, 0], full[:, 0, -1] + 1)


def test_1d_positions_number_the_kept_prompt(patched):
    """1-D RoPE (LLaVA-OneVision, InternVL): forward numbers each compressed row 0, 1, ... after its new
    left padding, exactly as generate() derives positions from the compressed attention mask."""
    case, model = patched, patched.model
    if case.qwen:
        pytest.skip("1-D RoPE only")
    kw = case.inputs([True, False], seed=5)
    vt.apply(model, DropStatic(0.99))
    with torch.no_grad(), Recorder(model) as rec:
        model(**kw)
    with Recorder(model) as gen:
        case.generate(kw)
    width = rec.lengths[0]
    pad = width - (kw["input_ids"].shape[1] - 2 * 4)  # the static row drops (T - 1) * h * w = 8 tokens
    assert pad > 0
    assert torch.equal(rec.positions[0][0], torch.cat([torch.zeros(pad, dtype=torch.long), torch.arange(width - pad)]))
    assert torch.equal(rec.positions[0][1], torch.arange(width))
    assert torch.equal(rec.positions[0], gen.positions[0])


def test_remove_restores_original(patched):
    case, model = patched, patched.model
    kw = case.inputs([True])
    with torch.no_grad():
        ref = model(**kw).logits
    ref_seq = case.generate(kw)
    vt.apply(model, DropStatic(0.99))
    with torch.no_grad():
        assert model(**kw).logits.shape[1] < ref.shape[1]
    vt.apply(model, DropStatic(2.0))  # re-applying swaps the policy: nothing is static at 2.0
    with torch.no_grad():
        assert model(**kw).logits.shape[1] == ref.shape[1]
    assert vt.remove(model) is model
    assert not vt.is_applied(model)
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
    assert model.forward.__func__ is type(model).forward
    with torch.no_grad():
        assert torch.equal(model(**kw).logits, ref)
    assert torch.equal(case.generate(kw), ref_seq)
    vt.remove(model)  # removing twice is a no-op


def test_batch_rows_compressed_differently(patched):
    """A static and a moving video in one batch, the static row already left-padded by one: it gets
    more left padding and gives the same next-token logits as when it runs alone."""
    case, model = patched, patched.model
    kw = case.inputs([True, False], seed=3)
    kw["input_ids"] = torch.cat([torch.tensor([[PAD], [9]]), kw["input_ids"]], 1)
    kw["attention_mask"] = torch.cat([torch.tensor([[0], [1]]), kw["attention_mask"]], 1)
    if case.qwen:
        kw["mm_token_type_ids"] = torch.cat([torch.zeros(2, 1, dtype=torch.long), kw["mm_token_type_ids"]], 1)
    L = kw["input_ids"].shape[1]
    T, h, w = case.grid
    vt.apply(model, DropStatic(0.99))
    with torch.no_grad(), Recorder(model) as rec:
        both = model(**kw)
    kept = [o.numel() for o in case.compressed(both).origin]
    assert kept[0] == h * w and kept[1] > h * w  # random frames are not static
    assert rec.lengths == [L - (T * h * w - kept[1])]
    alone = []
    for row in range(2):
        single = case.single(kw, row)
        with torch.no_grad():
            alone.append(model(**single).logits[0, -1])
    torch.testing.assert_close(both.logits[:, -1], torch.stack(alone), atol=1e-5, rtol=1e-5)

    seq = case.generate(kw)
    assert seq.shape == (2, L + NEW_TOKENS)
    assert torch.equal(seq[:, :L], kw["input_ids"])


def test_beam_search(patched):
    """num_beams/num_return_sequences expand the compressed features; LLaVA-OneVision and InternVL can
    only when every video (prompt row) kept the same count (their features are one tensor)."""
    case, model = patched, patched.model
    vt.apply(model, DropStatic(0.99))
    for statics in ([True, True], [True, False]):
        kw = case.inputs(statics, seed=7)
        L = kw["input_ids"].shape[1]
        if not case.qwen and statics == [True, False]:
            with pytest.raises(ValueError, match="kept different .* counts"):
                case.generate(kw, num_beams=2, num_return_sequences=2)
            continue
        seq = case.generate(kw, num_beams=2, num_return_sequences=2)
        assert seq.shape == (4, L + NEW_TOKENS)
        assert torch.equal(seq[:, :L], kw["input_ids"].repeat_interleave(2, 0))


def test_policy_errors_are_clear(patched):
    case, model = patched, patched.model
    kw = case.inputs([False])

    def reversed_origin(features, grid):
        return features.flip(0), torch.arange(features.shape[0] - 1, -1, -1)

    vt.apply(model, reversed_origin)
    with pytest.raises(ValueError, match="strictly increasing"):
        model(**kw)
    vt.apply(model, KeepAll())
    bad = dict(kw, input_ids=kw["input_ids"][:, 1:], attention_mask=kw["attention_mask"][:, 1:])
    bad["input_ids"][0, 0] = case.placeholder  # one placeholder too many
    if case.qwen:
        bad["mm_token_type_ids"] = (bad["input_ids"] == VIDEO).long() * 2
    with pytest.raises(ValueError, match=f"hold {case.tail + 13} placeholder tokens \\(id {case.placeholder}\\)"):
        model(**bad)
    with pytest.raises(ValueError, match="needs input_ids to find the video placeholder"):
        embeds = model.get_input_embeddings()(kw["input_ids"])
        model(**{k: v for k, v in kw.items() if k != "input_ids"}, inputs_embeds=embeds)


def test_apply_rejects_other_models():
    config = transformers.Qwen2Config(**TEXT)
    with pytest.raises(TypeError, match="model_type 'qwen2'"):
        vt.apply(transformers.Qwen2ForCausalLM(config), KeepAll())


# ---------------------------------------------------------------------------------------------------
# the policies themselves


def _drop_static_oracle(features, grid, threshold):
    """Token by token, the rule DropStatic documents."""
    T, h, w = grid
    x = features.view(T, h * w, -1).double()
    keep = []
    for t in range(T):
        for n in range(h * w):
            if t == 0:
                keep.append(True)
            else:
                cos = torch.nn.functional.cosine_similarity(x[t, n], x[t - 1, n], dim=0)
                keep.append(not bool(cos >= threshold))
    return torch.tensor(keep).nonzero().squeeze(1)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("grid", [(1, 3, 2), (5, 3, 2), (4, 1, 7)])
def test_drop_static_matches_oracle(seed, grid):
    g = torch.Generator().manual_seed(seed + 100 * sum(grid))
    T, h, w = grid
    x = torch.randn(T, h * w, 8, generator=g)
    copy = torch.rand(T, h * w, generator=g) < 0.5  # these tokens repeat (almost) the previous frame
    for t in range(1, T):
        noise = 1e-3 * torch.randn(h * w, 8, generator=g)
        x[t] = torch.where(copy[t, :, None], x[t - 1] + noise, x[t])
    features = x.reshape(-1, 8)
    for threshold in (0.999, 0.5, -1.0, 1.5):
        out, origin = DropStatic(threshold)(features, grid)
        check_output((out, origin), features, grid)
        assert torch.equal(origin, _drop_static_oracle(features, grid, threshold)), threshold
        assert torch.equal(out, features[origin])
    assert DropStatic(-1.0)(features, grid)[1].numel() == h * w  # frame 0 is always kept
    assert DropStatic(1.5)(features, grid)[1].numel() == T * h * w


def test_keep_all_and_policy_input_errors():
    features = torch.randn(12, 4)
    out, origin = KeepAll()(features, (3, 2, 2))
    assert out is features and torch.equal(origin, torch.arange(12)) and origin.dtype == torch.int64
    with pytest.raises(ValueError, match="T\\*h\\*w"):
        DropStatic(0.9)(features, (2, 2, 2))
    with pytest.raises(ValueError, match="grid"):
        KeepAll()(features, (3, 4))
    with pytest.raises(TypeError, match="threshold"):
        DropStatic(float("nan"))
    with pytest.raises(ValueError, match="at least one token"):
        check_output((features[:0], torch.arange(0)), features, (3, 2, 2))
    with pytest.raises(ValueError, match="int64"):
        check_output((features, torch.arange(12, dtype=torch.int32)), features, (3, 2, 2))


def test_import_vidtok_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, vidtok, vidtok.integrations; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "policy", [MergeTemporal(0.99), MergeTemporal(r=10**6, radius=None), SelectFrames(1), SelectFrames(1, method="mmr")], ids=repr
)
def test_vidtok_policies_generate_with_fewer_tokens(patched, policy):
    """Temporal merging and frame selection as policies: a static video keeps one frame's worth of
    tokens (at frame 0's positions), and generate() runs end to end on the shorter prefill."""
    case, model = patched, patched.model
    kw = case.inputs([True])
    L = kw["input_ids"].shape[1]
    T, h, w = case.grid
    vt.apply(model, policy)
    with torch.no_grad(), Recorder(model) as rec:
        out = model(**kw)
    expected = L - (T - 1) * h * w
    assert rec.lengths == [expected] and out.logits.shape[1] == expected
    origin = case.compressed(out).origin[0]
    if isinstance(policy, MergeTemporal):
        assert torch.equal(origin, torch.arange(h * w))  # each chain stands at its frame-0 root
    else:
        assert origin.shape == (h * w,) and int(origin[0]) % (h * w) == 0  # one whole frame
    with Recorder(model) as rec:
        seq = case.generate(kw)
    assert rec.lengths == [expected] + [1] * (NEW_TOKENS - 1)
    assert torch.equal(seq[:, :L], kw["input_ids"])


# ---------------------------------------------------------------------------------------------------
# exact counts: predicted from the config before encoding, equal after, for every policy


def _varied_inputs(case, Ts: list[int], seed: int = 0) -> dict:
    """One video per row of Ts[i] temporal patches (LLaVA, InternVL: frames; LLaVA's equal in a batch),
    rows left-padded."""
    g = torch.Generator().manual_seed(seed)
    rows = [[BOS, 5] + case.video_ids(T) + [6, 7] for T in Ts]
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    kw = dict(input_ids=ids, attention_mask=mask)
    if case.qwen:
        kw["pixel_values_videos"] = torch.randn(16 * sum(Ts), 96, generator=g)
        kw["video_grid_thw"] = torch.tensor([[T, 4, 4] for T in Ts])
        kw["mm_token_type_ids"] = (ids == VIDEO).long() * 2
        if case.family == "qwen2_5_vl":
            kw["second_per_grid_ts"] = torch.tensor([2.0] * len(Ts))
    elif case.internvl:
        kw["pixel_values"] = torch.randn(sum(Ts), 3, 32, 32, generator=g)
        kw["video_rows"] = torch.tensor([[sum(Ts[:i]), T] for i, T in enumerate(Ts)])
    else:
        kw["pixel_values_videos"] = torch.randn(len(Ts), Ts[0], 3, 32, 32, generator=g)
    return kw


COUNTED = [KeepAll(), EVS(0.5), EVS(0.7, per_frame=True), Budget(5), Budget(ratio=0.5, allocate="softmax", token_score="change"),
           MergeTemporal(r=3), SelectFrames(2, method="uniform"), KeepAttended(5), MergeClusters(4, k=2, per_frame=True)]


@pytest.mark.parametrize("policy", COUNTED, ids=repr)
def test_count_predicted_before_encoding_is_the_count_after(patched, policy):
    """For every exact-count policy, batch sizes 1 and 2 and videos of different lengths: the counts
    vt.video_token_counts gives from the config alone are the tokens each video keeps, and the
    prefill that reaches the language model has exactly that many placeholders."""
    case, model = patched, patched.model
    vt.apply(model, policy)
    for Ts in ([3, 3], [2]) if case.family == "llava_onevision" else ([3, 2], [2]):
        kw = _varied_inputs(case, Ts, seed=len(Ts))
        if case.qwen:
            predicted = vt.video_token_counts(model, policy, video_grid_thw=kw["video_grid_thw"])
        else:
            predicted = vt.video_token_counts(model.config, policy, num_frames=Ts)
        full = [4 * T + case.tail for T in Ts]
        assert all(isinstance(c, int) for c in predicted)
        with torch.no_grad(), Recorder(model) as rec:
            out = model(**kw)
        assert [o.numel() + case.tail for o in case.compressed(out).origin] == predicted
        lengths = kw["attention_mask"].shape[1] - torch.tensor(full) + torch.tensor(predicted)
        assert rec.lengths == [int(lengths.max())]
        if case.family == "qwen3_vl":
            (deep,) = out.video_outputs.deepstack_features
            assert [d.shape[0] for d in deep] == predicted
        if len(Ts) == 1:
            continue  # generate() on the batch of two
        with Recorder(model) as rec:
            seq = case.generate(kw)
        assert rec.lengths == [int(lengths.max())] + [1] * (NEW_TOKENS - 1)
        assert torch.equal(seq[:, : kw["input_ids"].shape[1]], kw["input_ids"])


def test_count_mismatch_never_reaches_the_model(patched):
    case, model = patched, patched.model

    class Miscounted(KeepAll):
        def num_tokens(self, grid):
            return super().num_tokens(grid) - 1

    vt.apply(model, Miscounted())
    kw = case.inputs([False])
    with Recorder(model) as rec, pytest.raises(ValueError, match="predicted 11 from the grid"):
        case.generate(kw)
    assert rec.lengths == []
    # data-dependent policies have no prediction, and are still checked for consistency with the prompt
    assert vt.video_token_counts(model, DropStatic(0.9), **(
        {"video_grid_thw": kw["video_grid_thw"]} if case.qwen else {"num_frames": 3})) == [None]


def test_video_token_counts_errors():
    config = transformers.Qwen2VLConfig()
    with pytest.raises(ValueError, match="pass video_grid_thw for Qwen-VL models"):
        vt.video_token_counts(config, KeepAll(), num_frames=3)
    with pytest.raises(TypeError, match="model_type 'qwen2'"):
        vt.video_token_counts(transformers.Qwen2Config(**TEXT), KeepAll(), num_frames=3)
    assert vt.video_token_counts(config, EVS(0.75), video_grid_thw=torch.tensor([[16, 28, 28], [1, 28, 28]])) == [
        vidtok.evs_count(196, 16, 0.75), 196]


def test_exact_count_policies_oracles():
    """EVS against a transcription of vLLM's compute_retention_mask; EVS(per_frame) and Budget against
    allocate_budget + per-frame loops."""
    g = torch.Generator().manual_seed(9)
    T, h, w, C = 6, 3, 4, 16
    x = torch.randn(T, h * w, C, generator=g)
    x[2] = x[1] + 1e-3 * torch.randn(h * w, C, generator=g)  # a near-static frame
    features = x.reshape(-1, C)
    for q in (0.3, 0.75, 0.9):
        # vLLM: 1 - cos against the previous frame, 255 on frame 0, global stable argsort, the first K
        dis = 1 - torch.nn.functional.cosine_similarity(x[1:].double(), x[:-1].double(), dim=-1)
        dis = torch.cat([torch.full((1, h * w), 255.0, dtype=torch.float64), dis]).reshape(-1)
        K = vidtok.evs_count(h * w, T, q)
        expected = torch.argsort(dis, descending=True, stable=True)[:K].sort().values
        out, origin = EVS(q)(features, (T, h, w))
        assert torch.equal(origin, expected) and torch.equal(out, features[origin])
        per = EVS(q, per_frame=True)
        counts = per.frame_counts((T, h, w))
        lo = torch.tensor([[h * w] + [0] * (T - 1)])
        assert counts == vidtok.allocate_budget(torch.zeros(1, T), K, min_per_frame=lo, max_per_frame=h * w,
                                                mode="uniform")[0].tolist()
        origin = per(features, (T, h, w))[1]
        assert torch.bincount(origin // (h * w), minlength=T).tolist() == counts
        for t in range(1, T):
            mine = origin[origin // (h * w) == t] % (h * w)
            order = sorted(range(h * w), key=lambda n: (-float(dis[t * h * w + n]), n))[: counts[t]]
            assert mine.tolist() == sorted(order)
    policy = Budget(20, allocate="proportional")
    budgets = policy.budgets(features, (T, h, w))
    assert int(budgets.sum()) == 20 == policy.num_tokens((T, h, w)) and (budgets >= 1).all()
    origin = policy(features, (T, h, w))[1]
    assert torch.bincount(origin // (h * w), minlength=T).tolist() == budgets.tolist()
    assert Budget(1000).num_tokens((T, h, w)) == T * h * w and Budget(1).num_tokens((T, h, w)) == T


def test_policy_constructors_reject_bad_arguments():
    with pytest.raises(ValueError, match="q"):
        EVS(1.0)
    with pytest.raises(ValueError, match="exactly one of total"):
        Budget()
    with pytest.raises(ValueError, match="ratio must be"):
        Budget(ratio=1.5)
    with pytest.raises(ValueError, match="allocate must be one of"):
        Budget(4, allocate="greedy")
    with pytest.raises(ValueError, match="token_score must be one of"):
        Budget(4, token_score="random")


# ---------------------------------------------------------------------------------------------------
# InternVL: videos are rows of pixel_values, named by internvl_video_rows from the processor's call


def _internvl_processor(image_token_id: int):
    """A real InternVLProcessor on 32 x 32 images (4 tokens per image row) with a word-level tokenizer
    built here; its <IMG_CONTEXT> id is ``image_token_id``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>", "hello", "look", "and"] + [f"Frame{i}:" for i in range(1, 9)]
    vocab = {w: i for i, w in enumerate(words)}
    specials = {"<img>": image_token_id + 2, "</img>": image_token_id + 3, "<IMG_CONTEXT>": image_token_id,
                "<video>": image_token_id + 1}
    vocab.update(specials)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(specials)})
    return transformers.InternVLProcessor(
        image_processor=transformers.GotOcr2ImageProcessor(size={"height": 32, "width": 32}, crop_to_patches=True,
                                                          max_patches=4),
        tokenizer=tokenizer,
        video_processor=transformers.InternVLVideoProcessor(size={"height": 32, "width": 32}),
        image_seq_length=4,
    )


def test_internvl_video_rows_from_the_processor():
    """Images of several tiles and videos in two prompt rows: the rows found are the videos' frames in
    the processor's pixel_values, and the patched model compresses exactly those."""
    import numpy as np

    processor = _internvl_processor(IMAGE)
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    wide = rng.integers(0, 255, (40, 90, 3), dtype=np.uint8)  # several tiles
    text = ["hello <IMG_CONTEXT> look <video> and", "<video> look and hello look and hello <IMG_CONTEXT> <video>"]
    inputs = processor(text=text, images=[wide, wide], videos=[clip, clip.copy(), clip[::-1].copy()],
                       return_tensors="pt", padding=True)
    rows = vt.internvl_video_rows(processor, text, inputs["input_ids"])
    tiles = (inputs["input_ids"][0] == IMAGE).sum().item() // 4 - 3  # row 0: the image's tiles, then 3 frames
    assert tiles > 1
    assert rows.tolist() == [[tiles, 3], [tiles + 3, 3], [2 * tiles + 6, 3]]
    assert inputs["pixel_values"].shape[0] == 2 * tiles + 9
    torch.testing.assert_close(inputs["pixel_values"][tiles + 3 : tiles + 6], inputs["pixel_values"][tiles : tiles + 3])

    case = Case("internvl")
    model = case.model
    kw = dict(inputs, video_rows=rows)
    with torch.no_grad():
        reference = model(**inputs).logits
    try:
        vt.apply(model, KeepAll())
        with torch.no_grad():
            assert torch.equal(model(**kw).logits, reference)
        policy = EVS(0.5)
        vt.apply(model, policy)
        predicted = vt.video_token_counts(model, policy, num_frames=[3, 3, 3])
        with torch.no_grad(), Recorder(model) as rec:
            out = model(**kw)
        assert [o.numel() for o in out.image_outputs.origin] == predicted == [vidtok.evs_count(4, 3, 0.5)] * 3
        per_row = [1, 2]  # videos per prompt row
        L = kw["input_ids"].shape[1]
        assert rec.lengths == [L - min(n * (12 - predicted[0]) for n in per_row)]  # the longer row sets the width
        seq = case.generate(kw)
        assert torch.equal(seq[:, :L], kw["input_ids"])
    finally:
        vt.remove(model)

    assert vt.internvl_video_rows(processor, ["hello <IMG_CONTEXT>"], inputs["input_ids"][:1, :10]).shape == (0, 2)
    with pytest.raises(ValueError, match="not the processor's output for this text"):
        vt.internvl_video_rows(processor, text[:1], inputs["input_ids"])


def test_internvl_video_rows_errors_name_the_argument():
    case = Case("internvl")
    model = vt.apply(case.model, KeepAll())
    kw = case.inputs([False])
    for rows, match in (
        (torch.tensor([[0, 4]]), "inside the 3 rows of pixel_values"),
        (torch.tensor([[0, 0]]), "at least one frame"),
        (torch.tensor([[1, 2], [0, 1]]), "non-overlapping runs"),
        (torch.tensor([0, 3]), "video_rows must be integer \\[V, 2\\]"),
        (torch.tensor([[0.0, 3.0]]), "video_rows must be integer"),
    ):
        with pytest.raises(ValueError, match=match):
            model(**dict(kw, video_rows=rows))
    with pytest.raises(ValueError, match="no pixel_values were given"):
        model(**{k: v for k, v in kw.items() if k != "pixel_values"})
    # without video_rows the frames are images: nothing is compressed
    with torch.no_grad(), Recorder(model) as rec:
        model(**{k: v for k, v in kw.items() if k != "video_rows"})
    assert rec.lengths == [kw["input_ids"].shape[1]]


def test_internvl_prompts_without_video_and_rows_that_are_not_frames():
    import numpy as np

    processor = _internvl_processor(IMAGE)
    case = Case("internvl")
    model = case.model
    text = ["hello look and"]
    plain = processor(text=text, return_tensors="pt")
    rows = vt.internvl_video_rows(processor, text, plain["input_ids"])
    assert rows.shape == (0, 2)
    with torch.no_grad():
        reference = model(**plain).logits
    reference_seq = case.generate(dict(plain))
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 255, (40, 90, 3), dtype=np.uint8)  # 3 tiles: one run of 12 placeholders
    clip = rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    text2 = ["hello <IMG_CONTEXT> look <video> and"]
    mixed = processor(text=text2, images=[wide], videos=[clip], return_tensors="pt")
    assert vt.internvl_video_rows(processor, text2, mixed["input_ids"]).tolist() == [[3, 3]]
    try:
        vt.apply(model, Budget(2))
        with torch.no_grad():  # an empty video_rows: the prompt has no video, the call runs unchanged
            assert torch.equal(model(**plain, video_rows=rows).logits, reference)
        assert torch.equal(case.generate(dict(plain, video_rows=rows)), reference_seq)
        for wrong in ([[0, 3]], [[1, 1]], [[2, 2]]):  # the image's tiles, or a tile and a frame
            with pytest.raises(ValueError, match="not one frame's run"):
                model(**mixed, video_rows=torch.tensor(wrong))
    finally:
        vt.remove(model)

"""The demo's stages hand each other vidtok's token representations (Gate, Packed, Merged, VideoLayout)
and nothing built by hand: the tokens, the layout and the proportional-attention bias line up."""

import math

import torch

from vidtok import demo
from vidtok.sparse import VideoLayout, build_plan
from vidtok.testing import synthetic_clip


def _pipeline(T=10, H=48, W=64, patch=16, k=3):
    clip = synthetic_clip(T, H, W, cut_at=5, seed=4)
    gate = demo._gate_stage(clip[None], patch, 8.0)
    packed, dense = demo._token_stage(clip, gate, patch, None, 0)
    merged = demo._merge_stage(dense, 0.95, (H // patch, W // patch))
    has_kept = demo._chains_with_kept(merged, gate.keep[0])
    _, _, selected = demo._select_stage(dense, gate.keep[0], k)
    survivors = demo._survivors(merged, has_kept, selected)
    return clip, gate, packed, dense, merged, has_kept, selected, survivors


def test_tokens_packed_and_carried_line_up():
    clip, gate, packed, dense, *_ = _pipeline()
    keep = gate.keep.reshape(1, -1)
    assert packed.values.shape[0] == int(keep.sum())
    # the kept slots of the carried tokens are the packed rows, in (t, h, w) order (padded() of one clip)
    assert torch.equal(dense.reshape(1, -1, dense.shape[-1])[keep], packed.padded()[0])


def test_survivors_are_a_merge_on_the_selected_frames_grid():
    _, gate, _, _, merged, has_kept, selected, survivors = _pipeline()
    T, h, w = merged.grid
    N = h * w
    assert survivors.grid == (len(selected), h, w)
    origin = survivors.origin[0].long()
    assert torch.equal(origin, torch.sort(origin).values)  # (t, h, w) order on the new grid
    # every survivor is a chain that holds a kept token and reaches a selected frame, placed at its first
    # slot there; its token and size are the whole chain's
    index = merged.index[0].long()
    for s, o in enumerate(origin.tolist()):
        slot = selected[o // N].item() * N + o % N
        chain = index[slot].item()
        assert has_kept[chain]
        earlier = [selected[r].item() * N + o % N for r in range(o // N)]  # same position, earlier selected frames
        assert all(index[e].item() != chain for e in earlier)
        assert torch.equal(survivors.x[0, s], merged.x[0, chain]) and survivors.size[0, s] == merged.size[0, chain]
    valid = survivors.index[0] >= 0
    assert torch.equal(survivors.origin[0].long()[survivors.index[0][valid].long()].unique(), origin)


def test_plan_comes_from_the_merge_bridge_with_its_log_size():
    _, gate, _, _, merged, has_kept, selected, survivors = _pipeline()
    layout, plan = demo._plan_stage(survivors)
    assert torch.allclose(layout.kv_log_size, survivors.size.float().log())
    # the same tokens as a keep mask on the selected frames would give (the rule the demo used to build by hand)
    Ts, h, w = survivors.grid
    keep_sel = torch.zeros(Ts * h * w, dtype=torch.bool)
    keep_sel[survivors.origin[0].long()] = True
    by_keep = VideoLayout.from_keep(keep_sel.view(1, Ts, h, w))
    assert torch.equal(layout.coords, by_keep.coords)
    assert math.isclose(plan.density, build_plan(by_keep, demo.SPEC).density)
    # sparse attention with the layout's bias matches dense masked attention
    qkv, qkv32 = demo._qkv(survivors, 0, torch.float32)
    out = demo._attention_stage(qkv, layout, plan)
    assert demo._dense_check(out, qkv32, layout, plan) < 1e-4

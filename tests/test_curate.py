"""vidtok.curate: every stage against a brute-force oracle, bad videos as error rows, and the Ray Data
pipeline (Ray's local mode, started once for the session with 2 CPUs) giving exactly what the same
stages give in one process, resuming, and retrying a video whose worker was killed."""

import math
import os
import signal
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("av")
# Ray Data's own deprecation notices (its DataContext reads its deprecated fields when a dataset starts)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")

from vidtok.curate import (  # noqa: E402
    Config, Decode, Duplicates, Keyframes, Motion, Shots, curate_video, find_videos, read_shots, save, shot_table,
    video_key,
)
from vidtok.curate.stages import from_batch, to_batch  # noqa: E402
from vidtok.curate.table import done  # noqa: E402
from vidtok.io import read_video, write_video  # noqa: E402
from vidtok.select import dpp_select, greedy_select  # noqa: E402
from vidtok.testing import real_clip_path, synthetic_clip  # noqa: E402

REAL = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")
# few frames at low resolution: the pipeline's logic, not the clips' size, is under test
SMALL = Config(width=64, max_frames=40)


# ---------------------------------------------------------------------------------------------------
# clips


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Small clips written with PyAV: a repeated scene (A B A), a cut, a static shot, and bad files."""
    folder = tmp_path_factory.mktemp("clips")
    a, b = synthetic_clip(12, 64, 96, cut_at=12, seed=1), synthetic_clip(12, 64, 96, cut_at=12, seed=2)
    paths = {"aba": folder / "aba.mp4", "cut": folder / "cut.mp4", "static": folder / "static.mp4"}
    write_video(str(paths["aba"]), torch.cat([a, b, a]), fps=8)
    write_video(str(paths["cut"]), synthetic_clip(24, 64, 96, cut_at=12, seed=4), fps=8)
    write_video(str(paths["static"]), synthetic_clip(16, 64, 96, cut_at=16, objects=0, seed=3), fps=8)
    bad = folder / "bad"
    bad.mkdir()
    (bad / "empty.mp4").write_bytes(b"")
    garbage = np.random.default_rng(0).bytes
    (bad / "corrupt.mp4").write_bytes(garbage(4000))
    (bad / "text.mp4").write_text("not a video")
    # a container with a video stream and no frame (a YUV4MPEG2 header alone)
    (bad / "zero_frames.y4m").write_text("YUV4MPEG2 W64 H64 F8:1 Ip A1:1 C420jpeg\n")
    whole = paths["cut"].read_bytes()
    (bad / "truncated.mp4").write_bytes(whole[: len(whole) // 2])  # the index (moov) is at the end: gone
    n = len(whole)  # a sound index over garbage frames
    (bad / "garbled.mp4").write_bytes(whole[: n // 4] + garbage(n // 2 - n // 4) + whole[n // 2:])
    return {k: str(v) for k, v in paths.items()} | {"bad": str(bad), "folder": str(folder)}


BAD_REASONS = {
    "empty.mp4": "cannot open", "corrupt.mp4": "cannot open", "text.mp4": "cannot open",
    "zero_frames.y4m": "no decodable video frames", "truncated.mp4": "cannot open", "garbled.mp4": "cannot decode",
    "missing.mp4": "no such video file",
}


def _real(name):
    try:
        return real_clip_path(name)
    except FileNotFoundError as e:
        pytest.skip(str(e))


# ---------------------------------------------------------------------------------------------------
# stages, one process


def test_decode_matches_read_video_and_never_depends_on_the_chunk(monkeypatch):
    path = _real("bikes.mp4")
    config = Config(width=64, fps=10, max_frames=12)
    one = Decode(config).features(path)
    stacked = []  # the frames the decoder holds at once: what np.stack gathers into a chunk
    stack = np.stack
    monkeypatch.setattr(np, "stack", lambda arrays, *a, **k: stacked.append(len(arrays)) or stack(arrays, *a, **k))
    chunked = Decode(Config(width=64, fps=10, max_frames=12, chunk=5)).features(path)
    monkeypatch.undo()
    assert stacked == [5, 5, 2]
    for key in ("frame_index", "frame_time", "embedding", "motion_delta"):
        np.testing.assert_array_equal(one[key], chunked[key], err_msg=key)
    # the same frames read_video gives at that rate and size (27 x 64 rounds to 32 x 64 for 16-pixel patches)
    frames = read_video(path, fps=10, size=(32, 64), max_frames=12, decoder="pyav")
    assert (one["height"], one["width"]) == (32, 64) and len(one["frame_index"]) == 12
    np.testing.assert_allclose(one["embedding"], Decode.embed(frames).numpy(), rtol=0, atol=1e-6)
    # 10 of 25 fps: the first frame at or after each tick of 0.1 s
    assert one["frame_index"].tolist() == [math.ceil(2.5 * k - 1e-9) for k in range(12)]
    # motion_delta row t is the per-patch mean |change| from analysed frame t - 1, in grey levels
    d = (frames[1:].float() - frames[:-1].float()).abs().view(11, 3, 2, 16, 4, 16).mean((1, 3, 5))
    np.testing.assert_allclose(one["motion_delta"][1:], d.numpy(), rtol=0, atol=1e-4)
    assert np.isinf(one["motion_delta"][0]).all()


def _cuts(shots):
    return [int(s) for s in shots[1:, 0]]


def test_shots_cut_stitch_and_cap():
    torch.manual_seed(0)
    scene = torch.randn(4, 256)
    # 4 scenes of 10, 3, 10 and 25 frames at 10 fps; frames of one scene are near copies
    labels = [0] * 10 + [1] * 3 + [2] * 10 + [3] * 25
    x = scene[labels] + 0.05 * torch.randn(len(labels), 256)
    shots = Shots(Config(min_shot=0.5, max_shot=100, stitch_threshold=0.99)).split(x, rate=10.0)
    # the 3-frame scene is shorter than 5 frames: its cut is dropped and it joins the next shot
    assert _cuts(shots) == [10, 23]
    assert shots.tolist() == [[0, 10], [10, 23], [23, 48]]
    # max_shot 1 s = 10 frames: the 13-frame shot becomes 2 near-equal pieces, the 25-frame one 3
    capped = Shots(Config(min_shot=0.5, max_shot=1.0, stitch_threshold=0.99)).split(x, rate=10.0)
    assert capped.tolist() == [[0, 10], [10, 16], [16, 23], [23, 31], [31, 39], [39, 48]]
    # a flash: one frame unlike its neighbours at frame 30 of a 60-frame shot cuts before and after it;
    # min_len 2 drops the second cut, and stitching (Panda-70M) then compares frame 27 (95% into the
    # first piece) with frame 31 (5% into the second): the same scene, so the pieces are joined again
    y = scene[[0] * 60].clone() + 0.05 * torch.randn(60, 256)
    y[30] = scene[1]
    cfg = dict(min_shot=0.2, max_shot=100)
    assert _cuts(Shots(Config(**cfg, stitch_threshold=1.0)).split(y, rate=10.0)) == [30]
    assert _cuts(Shots(Config(**cfg, stitch_threshold=0.8)).split(y, rate=10.0)) == []
    assert Shots(Config()).split(x[:1], rate=10.0).tolist() == [[0, 1]]


def test_motion_per_shot_is_the_mean_over_pairs_inside_the_shot():
    g = torch.Generator().manual_seed(1)
    delta = torch.rand(9, 2, 3, generator=g) * 20
    delta[0] = math.inf
    shots = torch.tensor([[0, 4], [4, 5], [5, 9]])
    got = Motion.per_patch(delta, shots)
    for s, (a, b) in enumerate(shots.tolist()):
        rows = [delta[t].double() for t in range(a + 1, b)]  # the pair across the cut (row a) never counts
        want = sum(rows) / len(rows) if rows else torch.full((2, 3), math.nan, dtype=torch.float64)
        torch.testing.assert_close(got[s].double(), want, rtol=1e-6, atol=1e-6, equal_nan=True)
    # the filter: shot 0 moves 10 grey levels, shot 2 moves 2, shot 1 has no pair
    flat = torch.tensor([math.inf] + [10.0] * 4 + [2.0] * 4)[:, None, None].expand(9, 2, 3)
    record = {"motion_delta": flat.numpy(), "shots": shots.numpy()}
    out = Motion(Config(min_motion=5.0, max_motion=11.0)).apply(record)
    np.testing.assert_array_equal(out["motion"], [10.0, math.nan, 2.0])
    assert out["moving"].tolist() == [True, False, False]
    assert Motion(Config(min_motion=1.0, max_motion=5.0)).apply(record)["moving"].tolist() == [False, False, True]


@pytest.mark.parametrize("method", ["dpp", "mmr"])
def test_keyframes_equal_one_op_call_per_shot(method):
    """All shots in one padded call pick what each shot alone picks."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(30, 16, generator=g)
    shots = torch.tensor([[0, 7], [7, 9], [9, 30]])
    got = Keyframes(Config(keyframes=3, keyframe_method=method)).select(x, shots)
    for s, (a, b) in enumerate(shots.tolist()):
        xs = x[a:b][None]
        unit = xs / xs.norm(dim=-1, keepdim=True)
        typical = torch.nn.functional.cosine_similarity(xs, unit.mean(1, keepdim=True), dim=-1)  # [1, L]
        if method == "dpp":
            want = dpp_select(xs, 3, quality=(1 + typical) / 2)[0][0]
        else:
            want = greedy_select(typical[:, None], 3, x=xs, lam=0.5)[0, 0]
        want = torch.where(want >= 0, want.long() + a, want.long())
        assert got[s].tolist() == want.tolist(), (s, got[s], want)
    assert got[1].tolist()[2] == -1  # a 2-frame shot gives its 2 frames, padded


def test_duplicates_point_at_the_first_original():
    base = torch.eye(4, 8)
    # shots 0..5: A, B, A', C, B', A''; primes are A/B with a little noise
    emb = torch.stack([base[0], base[1], base[0] + 0.05 * base[3], base[2], base[1] + 0.02 * base[2], base[0]])
    got = Duplicates(Config(duplicate_threshold=0.95)).find(emb)
    # brute force: in order, a shot duplicates the most similar earlier original when cos >= 0.95
    unit = emb / emb.norm(dim=1, keepdim=True)
    want, originals = [], []
    for i in range(len(emb)):
        sims = [(float(unit[i] @ unit[j]), -j) for j in originals]
        best = max(sims) if sims else (-1.0, 0)
        want.append(-best[1] if best[0] >= 0.95 else -1)
        if want[-1] < 0:
            originals.append(i)
    assert got.tolist() == want == [-1, -1, 0, -1, 1, 0]


def test_curate_video_on_synthetic_clips(clips):
    config = Config()
    aba = shot_table(curate_video(clips["aba"], config), config).to_pydict()
    assert aba["start_frame"] == [0, 12, 24] and aba["end_frame"] == [12, 24, 36]
    assert aba["duplicate_of"] == [-1, -1, 0] and aba["drop_reason"] == [None, None, "duplicate"]
    assert aba["start_time"] == [0.0, 1.5, 3.0] and aba["end_time"] == [1.5, 3.0, 4.5]
    assert all(len(k) == 3 and k == sorted(k) and s <= k[0] and k[-1] < e
               for k, s, e in zip(aba["keyframes"], aba["start_frame"], aba["end_frame"]))
    assert all(m > 1.0 for m in aba["motion"])  # moving squares
    static = shot_table(curate_video(clips["static"], config), config).to_pydict()
    assert static["motion"] == [0.0] and static["keep"] == [False] and static["drop_reason"] == ["static"]
    assert len(static["motion_patches"][0]) == static["grid_h"][0] * static["grid_w"][0] == 4 * 6


def test_bad_videos_are_error_records_not_exceptions(clips):
    for name, reason in BAD_REASONS.items():
        record = curate_video(os.path.join(clips["bad"], name), Config())
        assert reason in record["error"] and record["error"].startswith("decode: "), (name, record["error"])
        table = shot_table(record, Config()).to_pydict()
        assert table["error"] == [record["error"]] and table["shot"] == [None]


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_keyframe_images_are_the_chosen_source_frames(fmt, tmp_path):
    import io

    import av

    path = _real("carphone_pristine.mp4")
    config = Config(width=64, max_frames=20, min_shot=0.1, keyframes=2)
    record = curate_video(path, config, images=fmt)
    result = save(record, tmp_path, config, fmt)
    frames = read_video(path, max_frames=20, decoder="pyav")  # the source size, 144 x 176
    files = read_shots(tmp_path).column("keyframe_files").to_pylist()[0]
    picked = [int(record["frame_index"][i]) for i in record["keyframes"][0] if i >= 0]
    assert result.error is None and len(files) == len(picked) == 2
    for name, number in zip(files, picked):
        assert name.endswith(f"shot0000_frame{number:07d}.{fmt}")
        with av.open(io.BytesIO((tmp_path / name).read_bytes())) as container:
            image = torch.from_numpy(next(container.decode(video=0)).to_ndarray(format="rgb24")).permute(2, 0, 1)
        error = (image.float() - frames[number].float()).abs().mean()
        assert error == 0 if fmt == "png" else error < 3, (name, float(error))  # PNG is lossless


def test_batches_round_trip_and_config_errors():
    record = {"video": "v.mp4", "error": "", "fps": 25.0, "n": 3, "x": np.zeros((3, 4), np.float32)}
    back = from_batch(to_batch(record))
    assert back.keys() == record.keys() and back["x"].shape == (3, 4) and back["n"] == 3 and back["video"] == "v.mp4"
    with pytest.raises(ValueError, match="Config.fps must be > 0"):
        Config(fps=0)
    with pytest.raises(ValueError, match="keyframe_method"):
        Config(keyframe_method="best")
    with pytest.raises(ValueError, match="max_shot"):
        Config(min_shot=5, max_shot=2)
    with pytest.raises(ValueError, match="cut_threshold is a cosine"):
        Config(cut_threshold=2)


def test_find_videos(clips, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# corpus\n{clips['cut']}\n\n{clips['aba']}\nnot_there.mp4\n")
    found = find_videos([listing, clips["folder"], clips["cut"]])
    assert found[:3] == [clips["cut"], clips["aba"], str(tmp_path / "not_there.mp4")]
    assert set(found[3:]) == {clips["static"]} | {os.path.join(clips["bad"], n) for n in BAD_REASONS if n != "missing.mp4"}
    assert len(found) == len(set(found))
    assert video_key("/a/clip.mp4") != video_key("/b/clip.mp4") and video_key("/a/clip.mp4").startswith("clip.mp4-")


# ---------------------------------------------------------------------------------------------------
# the Ray Data pipeline


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the session: 2 CPUs, a small object store, no dashboard."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("pyarrow")
    import logging

    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=100 * 1024**2, include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=False)
    yield ray
    ray.shutdown()


def _same_rows(got: dict, want: dict, video: str):
    exact = ("shot", "start_frame", "end_frame", "start_time", "end_time", "frames", "keyframes", "keyframe_times",
             "duplicate_of", "keep", "drop_reason", "error", "grid_h", "grid_w")
    for key in exact:
        assert got[key] == want[key], (video, key, got[key], want[key])
    # float scores: a Ray worker runs torch on its own thread count, which may reorder float sums
    for key in ("motion", "motion_peak"):
        np.testing.assert_allclose(np.array(got[key], float), np.array(want[key], float), rtol=1e-5, err_msg=key)
    for key in ("motion_patches", "embedding"):
        for a, b in zip(got[key], want[key]):
            np.testing.assert_allclose(np.array(a, float), np.array(b, float), rtol=1e-5, atol=1e-6, err_msg=key)


class Crashing(Decode):
    """Decode, except that a worker opening a video named crash*.mp4 kills its own process (SIGKILL:
    no Python cleanup, as a segfault in a decoder would) the first time, and one named poison*.mp4
    every time; a marker file counts the kills."""

    def features(self, path):
        name, marker = os.path.basename(path), path + ".killed"
        if name.startswith("poison") or (name.startswith("crash") and not os.path.exists(marker)):
            with open(marker, "a") as f:
                f.write("x")
            os.kill(os.getpid(), signal.SIGKILL)
        return super().features(path)


@pytest.fixture(scope="module")
def pipeline_run(ray_session, clips, tmp_path_factory):
    """One pipeline run over the real clips, the synthetic ones, the bad files, a missing path, a video
    whose first worker is killed and one that kills every worker: (videos, out folder, summary)."""
    from ray import cloudpickle

    from vidtok.curate import curate

    folder = tmp_path_factory.mktemp("run")
    for name in ("crash.mp4", "poison.mp4"):
        (folder / name).write_bytes(open(clips["cut"], "rb").read())
    videos = [_real(n) for n in REAL] + [clips["aba"], clips["static"], clips["bad"], "missing.mp4"]
    videos += [clips["cut"], str(folder / "crash.mp4"), str(folder / "poison.mp4")]  # crash.mp4 repeats cut.mp4
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this test module
    try:
        summary = curate(videos, folder / "out", SMALL, workers=1, progress=False, decode_stage=Crashing)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    return videos, folder / "out", summary


def _rows_by_video(out) -> dict:
    rows = read_shots(out).to_pydict()
    by_video = {}
    for i, video in enumerate(rows["video"]):
        by_video.setdefault(video, {k: [] for k in rows})
        for k in rows:
            by_video[video][k].append(rows[k][i])
    return by_video


def test_pipeline_equals_one_process(pipeline_run):
    videos, out, summary = pipeline_run
    assert len(summary.results) == 15 and summary.skipped == 0 and summary.errors == 8
    by_video = _rows_by_video(out)
    assert sorted(by_video) == sorted(find_videos(videos))
    for video, got in by_video.items():
        name = os.path.basename(video)
        if name == "poison.mp4":
            continue  # test_a_video_that_always_kills_its_worker_is_an_error_row
        if name in BAD_REASONS:
            assert BAD_REASONS[name] in got["error"][0], (name, got["error"])
        _same_rows(got, shot_table(curate_video(video, SMALL), SMALL).to_pydict(), video)
    assert by_video[_real("bikes.mp4")]["start_frame"] == [0, 30]  # bikes.mp4 cuts before its frame 30
    table = summary.table()
    assert all(name in table for name in BAD_REASONS) and "15 videos curated (8 errors)" in table


def test_shots_repeated_across_videos(pipeline_run, clips):
    """crash.mp4 is a copy of cut.mp4: both its shots repeat cut.mp4's (and nothing else repeats)."""
    import pyarrow.parquet as pq

    videos, out, summary = pipeline_run
    repeats = pq.read_table(out / "duplicates.parquet").to_pydict()
    assert repeats["video"] == [videos[-2]] * 2 and repeats["shot"] == [0, 1]
    assert repeats["duplicate_of_video"] == [clips["cut"]] * 2 and repeats["duplicate_of_shot"] == [0, 1]
    assert min(repeats["similarity"]) > 0.999 and summary.repeats == 2


def test_a_killed_worker_is_retried(pipeline_run):
    videos, out, summary = pipeline_run
    crash = videos[-2]
    assert open(crash + ".killed").read() == "x", "the worker was never killed"
    result = next(r for r in summary.results if r.video == crash)
    assert result.error is None and result.shots == 2
    _same_rows(_rows_by_video(out)[crash], shot_table(curate_video(crash, SMALL), SMALL).to_pydict(), crash)


def test_a_video_that_always_kills_its_worker_is_an_error_row(pipeline_run):
    """Ray restarts the decoder and tries the video RETRIES more times, then the run goes on without it."""
    from vidtok.curate import RETRIES

    videos, out, summary = pipeline_run
    poison = videos[-1]
    assert open(poison + ".killed").read() == "x" * (RETRIES + 1)
    result = next(r for r in summary.results if r.video == poison)
    assert result.error.startswith("lost: its worker process died")
    assert _rows_by_video(out)[poison]["error"] == [result.error]


def test_cli_resumes_and_reports_bad_arguments(pipeline_run, capsys):
    """The CLI on the folder the pipeline filled: every video is skipped (error rows too), nothing is
    rewritten, and the table still comes out. (The CLI's Ray path is ``curate``'s, tested above.)"""
    from vidtok.__main__ import main

    videos, out, _ = pipeline_run
    stamps = {p: p.stat().st_mtime_ns for p in (out / "shots").iterdir()}
    args = ["curate", *videos, "--out", str(out), "--width", "64", "--max-frames", "40", "--workers", "1", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("video ") and "0 videos curated (0 errors), 15 already done" in printed, printed
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}
    # --retry-errors would redo exactly the error rows
    assert len(done(out)) == 15 and len(done(out) - done(out, with_errors=False)) == 8
    assert main(["curate", videos[0], "--out", str(out), "--fps", "0"]) == 2
    assert "vidtok curate: error: Config.fps must be > 0, got 0.0" in capsys.readouterr().err

"""Curate a video corpus with vidtok's ops: split videos into shots, score their motion, pick
keyframes and find near-duplicate shots, one Parquet row per shot.

The stages (``vidtok.curate.stages``) work on one video in one process, with or without Ray:

- ``Decode``: PyAV decoding at a target frame rate, ``chunk`` frames at a time, each frame reduced to a
  cheap embedding (a 16 x 16 grey thumbnail) and its per-patch change (``patch_delta``);
- ``Shots``: ``scene_boundaries`` on the cosine of consecutive embeddings (``frame_scores``), a
  minimum and maximum shot length, and Panda-70M's stitching of over-split shots
  (Chen et al., CVPR 2024; snap-research/Panda-70M ``splitting/event_stitching.py``);
- ``Motion``: global and per-patch motion per shot, and a threshold filter;
- ``Keyframes``: ``dpp_select`` or ``greedy_select`` per shot;
- ``Duplicates``: near-duplicate shots of a video with ``match`` (group ids keep duplicates from being
  matched); ``corpus_duplicates``: shots that repeat a shot of another video, one ``match`` per video;
- ``KeyframeImages``: the keyframes as JPEG/PNG.

``curate`` (``vidtok.curate.pipeline``) runs them over a corpus as Ray Data ``map_batches`` stages and
writes ``OUT/shots/<video>.parquet`` (``vidtok.curate.table``); ``python -m vidtok curate`` is its
command line. Ray Data and pyarrow are needed for the pipeline only: ``pip install "ray[data]" pyarrow``.

    from vidtok.curate import Config, curate, curate_video, read_shots
    record = curate_video("clip.mp4", Config(fps=8))          # one video, this process
    summary = curate(["videos/"], "out", Config(fps=8))        # a corpus, on Ray Data
    shots = read_shots("out").to_pandas()
"""

from vidtok.curate.pipeline import RETRIES, Summary, VideoResult, curate, find_videos, save
from vidtok.curate.stages import (
    Analyze, Config, Decode, Duplicates, KeyframeImages, Keyframes, Motion, Shots, Stage, corpus_duplicates,
    curate_video,
)
from vidtok.curate.table import read_shots, schema, shot_table, video_key

__all__ = [
    "Analyze", "Config", "Decode", "Duplicates", "KeyframeImages", "Keyframes", "Motion", "RETRIES", "Shots", "Stage",
    "Summary", "VideoResult", "corpus_duplicates", "curate", "curate_video", "find_videos", "read_shots", "save",
    "schema", "shot_table", "video_key",
]

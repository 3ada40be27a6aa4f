"""vidtok: fused GPU kernels that cut the visual token count of video transformers and video LLMs.

One import gives every op as a torch op (``torch.ops.vidtok.*``) with a pure-PyTorch reference beside
its kernels (Triton, CUDA C++ or CPU-tuned, as its record in ``vidtok._backend`` declares); see
``python -m vidtok info`` for which can run here.
"""

from vidtok._backend import BACKENDS, BackendUnavailableError, load_backends, use_backend
from vidtok._validation import allow_nan
from vidtok.merge import (
    Merged, bipartite_merge, connected_components_merge, dpc_knn_merge, match, merge_by_assignment, paired_similarity,
    temporal_merge, unmerge,
)
from vidtok.select import Scores, dpp_select, frame_scores, greedy_select, scene_boundaries, segment_topk, uniform_indices
from vidtok.select import Kept, allocate_budget, clip_select, evs_count, segment_pool, segment_reduce, topk_per_frame, vidcom2_count
from vidtok import masks, nn
from vidtok.sparse import (
    SparsePlan, VideoLayout, attention_received, build_plan, build_plan_topk, classify_heads, default_head_specs, per_head_plan,
    plan_from_tiles, sparse_attention,
)
from vidtok.motion import Gate, Packed, block_match, motion_gate, motion_report, pack, patch_delta, unpack

__version__ = "0.1.0"

load_backends()

__all__ = ["BACKENDS", "BackendUnavailableError", "allow_nan", "paired_similarity", "Merged", "bipartite_merge", "match", "temporal_merge", "unmerge", "use_backend", "masks", "nn", "SparsePlan", "VideoLayout", "build_plan", "sparse_attention", "Scores", "dpp_select", "frame_scores", "greedy_select", "scene_boundaries", "segment_topk", "uniform_indices", "Kept", "allocate_budget", "clip_select", "evs_count", "segment_pool", "segment_reduce", "topk_per_frame", "vidcom2_count", "Gate", "Packed", "block_match", "motion_gate", "motion_report", "pack", "patch_delta", "unpack", "connected_components_merge", "dpc_knn_merge", "merge_by_assignment", "attention_received", "build_plan_topk", "classify_heads", "default_head_specs", "per_head_plan", "plan_from_tiles", "__version__"]

"""Pure-PyTorch references: the spec of every vidtok op, the oracle of the tests and the CPU path.

Written to be read: vectorised tensor code, fp32 accumulation, low-precision inputs upcast first.
The same four names as the rest of the package: merge, motion, select, sparse.
"""

from vidtok.reference.merge import (
    MERGE_MODES,
    MERGE_ORDERS,
    bipartite_plan,
    match,
    max_merge,
    merge_tokens,
    merge_tokens_backward,
    paired_similarity,
    paired_similarity_backward,
    temporal_links,
    temporal_plan,
)
from vidtok.reference.select import dpp_select, frame_scores, greedy_select, scene_boundaries, segment_topk, uniform_indices
from vidtok.reference.sparse import sparse_attention, sparse_attention_backward
from vidtok.reference.motion import block_match, motion_gate, patch_delta

__all__ = ["MERGE_MODES", "MERGE_ORDERS", "bipartite_plan", "match", "max_merge", "merge_tokens", "merge_tokens_backward", "paired_similarity", "paired_similarity_backward", "temporal_links", "temporal_plan", "sparse_attention", "sparse_attention_backward", "dpp_select", "frame_scores", "greedy_select", "scene_boundaries", "segment_topk", "uniform_indices", "block_match", "motion_gate", "patch_delta"]

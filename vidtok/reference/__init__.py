"""Pure-PyTorch references: the spec of every vidtok op and the oracle of the tests.

Written to be read: vectorised tensor code, fp32 accumulation, low-precision inputs upcast first.
The same four names as the rest of the package: merge, motion, select, sparse. Each module defines
the entry points that ``vidtok._backend`` names for its ops, with the signatures every other backend
of those ops shares.
"""

from vidtok.reference.merge import (
    MERGE_MODES,
    MERGE_ORDERS,
    bipartite_assignment,
    match,
    max_merge,
    merge_tokens,
    merge_tokens_backward,
    paired_similarity,
    paired_similarity_backward,
    temporal_assignment,
    temporal_links,
)
from vidtok.reference.motion import block_match, motion_gate, patch_delta
from vidtok.reference.select import (
    allocate_budget,
    dpp_select,
    frame_scores,
    greedy_select,
    scene_boundaries,
    segment_pool,
    segment_reduce,
    segment_topk,
    topk_per_frame,
    uniform_indices,
)
from vidtok.reference.sparse import PlanTensors, sparse_attention, sparse_attention_backward

__all__ = ["MERGE_MODES", "MERGE_ORDERS", "bipartite_assignment", "match", "max_merge", "merge_tokens", "merge_tokens_backward", "paired_similarity", "paired_similarity_backward", "temporal_assignment", "temporal_links", "PlanTensors", "sparse_attention", "sparse_attention_backward", "dpp_select", "frame_scores", "greedy_select", "scene_boundaries", "segment_topk", "uniform_indices", "allocate_budget", "segment_pool", "segment_reduce", "topk_per_frame", "block_match", "motion_gate", "patch_delta"]

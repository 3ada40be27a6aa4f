// Host entry points of csrc/select.cu (frame selection). Pointers are device addresses of
// contiguous float32 / int32 tensors prepared by csrc/select.py; 0 stands for "not given".
#pragma once
#include <cstdint>

namespace vidtok {

// gram[b, i, j] = sum_c xt[b, c, i] * xt[b, c, j] for xt [B, C, T] (unit rows, channel-major), as the
// fmaf chain over c = 0, 1, ..., C - 1 that the streaming path of the selection kernels computes.
// gram is [B, T, T] (T^2 floats per video: vidtok/select.py uses it for T <= 8192).
void select_gram(std::uintptr_t xt, std::uintptr_t gram, int64_t B, int64_t T, int64_t C, std::uintptr_t stream);

// Greedy / MMR / temporal-NMS / similarity-NMS selection, one block per problem p = b * Q + q.
// rel [B*Q, T]: relevance, NaN where a frame is not a candidate (overwritten when state is global);
// pos [B, T] (batch stride pos_sb, 0 to share one row): frame times for min_gap; xt [B, C, T] unit rows
// or gram [B, T, T] (sims: at most one given, neither when no similarity is needed); ms [B*Q, T]
// scratch; picks [B*Q, k] int32, pre-filled with -1, gets the picks in pick order.
void greedy_select(std::uintptr_t rel, std::uintptr_t pos, int64_t pos_sb, std::uintptr_t xt, std::uintptr_t gram,
                   std::uintptr_t ms, std::uintptr_t picks, int64_t B, int64_t Q, int64_t T, int64_t C, int64_t k,
                   bool mmr, float lam, bool use_thresh, float sim_thresh, bool use_gap, float min_gap,
                   bool force_global_state, std::uintptr_t stream);

// Greedy DPP MAP (Chen, Zhang & Zhou 2018), one block per problem p = b * Q + q.
// q, diag, thr [B*Q, T]: quality, L_ii and eps * L_ii; xt [B, C, T] or gram [B, T, T] (exactly one);
// d2 [B*Q, T] and cf [B*Q, kk, T] scratch, kk = min(k, T); picks [B*Q, k] int32 pre-filled with -1 and
// d2_pick [B*Q, k] float32 pre-filled with 0 get the picks and their residuals d2_j in pick order.
void dpp_select(std::uintptr_t q, std::uintptr_t diag, std::uintptr_t thr, std::uintptr_t xt, std::uintptr_t gram,
                std::uintptr_t d2, std::uintptr_t cf, std::uintptr_t picks, std::uintptr_t d2_pick, int64_t B, int64_t Q,
                int64_t T, int64_t C, int64_t k, bool force_global_state, std::uintptr_t stream);

}  // namespace vidtok

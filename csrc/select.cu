// Frame selection hot path, CUDA C++ side: persistent greedy kernels.
//
// greedy_select (top-k under min_gap and similarity NMS; MMR, Carbonell & Goldstein 1998) and
// dpp_select (greedy DPP MAP with the incremental Cholesky update of Chen, Zhang & Zhou, NeurIPS
// 2018, Algorithm 1) run all k steps of one (video, query) problem in one thread block, with no launch
// and no host sync per step. A step is one pass over the candidates (fold in the last pick, compute
// the new gain) and one block argmax over a 64-bit key: the order-preserving bits of the gain in the
// high word, 2^32 - 1 - index in the low word. The maximum key is the higher gain, then the lower
// index, whatever order the reduction combines them in.
//
// Float math follows vidtok/reference/select.py operation by operation: the unit rows are the
// reference's own (csrc/select.py calls reference.unit_rows), every scalar is rounded to float32 as
// torch rounds a Python scalar, and where the reference does two tensor ops (a product, then a
// difference) the kernel rounds twice (the __f*_rn intrinsics keep nvcc from fusing them into an FMA).
// What cannot match is the order of two sums: a similarity is the fmaf chain over channels
// c = 0, 1, ..., C - 1 (the reference calls a BLAS GEMM), and the DPP projection <c_j, c_i> adds the
// steps in order (torch's sum may cascade). Picks therefore equal the reference's except where two
// gains lie within rounding of each other (near-ties); with lam = 0 and no sim_thresh no similarity is
// computed and the picks are exactly the reference's.
//
// Similarities come either from a Gram matrix of the unit rows computed first (select_gram; one row
// read per step, the "pool mode") or from one pass over the unit rows per
// step (streaming, for long videos). Both give the same values: every Gram entry is the same fmaf
// chain in the same order, so which one runs is a speed decision only.
//
// Per-candidate state (relevance, max similarity, times for greedy; residual d2, quality, threshold
// for DPP) lives in shared memory when it fits (T <= 8192 and the device's opt-in limit), otherwise in
// global scratch that the block streams through in tiles of 8192 candidates.
#include <cfloat>
#include <cmath>
#include <cstring>

#include "common.cuh"
#include "select.h"

namespace vidtok {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kPerThread = 16;                                // candidates a thread owns per tile
constexpr int64_t kTile = int64_t(kThreads) * kPerThread;     // 8192: also the shared-state limit
constexpr int kStage = 1024;                                  // floats of the pick's row / c_j per pass
enum SimSource : int { kNoSims = 0, kGram = 1, kStream = 2 };
using u64 = unsigned long long;  // what __shfl_xor_sync and max() take (uint64_t is unsigned long on LP64)

// ---------------------------------------------------------------------------------------------------
// Float operations with the reference's roundings (host versions exist so that the per-candidate math
// below can be run, unchanged, by a host emulation).

__host__ __device__ __forceinline__ float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
__host__ __device__ __forceinline__ float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
__host__ __device__ __forceinline__ float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
__host__ __device__ __forceinline__ float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
__host__ __device__ __forceinline__ float sqrt_rn(float a) {
#ifdef __CUDA_ARCH__
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
__host__ __device__ __forceinline__ float nan_f() {
#ifdef __CUDA_ARCH__
  return __int_as_float(0x7fffffff);
#else
  return NAN;
#endif
}
__host__ __device__ __forceinline__ uint32_t float_bits(float v) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(v);
#else
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return u;
#endif
}

// Argmax key of a candidate; 0 (below every real key) means "not a candidate". NaN never gets here.
__host__ __device__ __forceinline__ u64 make_key(float gain, int64_t i) {
  uint32_t u = float_bits(gain);
  if ((u << 1) == 0) u = 0;                          // -0 ties with +0, as torch.argmax compares them
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);    // order-preserving: negatives reversed, below positives
  return (u64(u) << 32) | u64(0xFFFFFFFFu - uint32_t(i));
}
__host__ __device__ __forceinline__ int64_t key_index(u64 key) { return int64_t(0xFFFFFFFFu - uint32_t(key)); }
constexpr uint32_t kNegInfKey = 0x007FFFFFu;         // make_key(-inf, i) >> 32

struct GreedyRule {
  bool sims;          // similarities to the pick are needed (MMR or similarity NMS)
  bool mmr;           // lam != 0
  float lam;
  bool thresh;        // sim_thresh given
  float sim_thresh;
  bool gap;           // min_gap > 0
  float min_gap;
};

// Folds pick j into candidate i (still a candidate before this pick); returns i's key for the next
// step, or 0 after setting rel = NaN when the pick removes it. Mirrors one step of
// reference.greedy_select: max_sim = sims at the first update, then torch.maximum; removal by
// sims > sim_thresh (ViLaMP-style NMS) and by |pos_i - pos_j| < min_gap; gain = rel - lam * max_sim.
__host__ __device__ __forceinline__ u64 greedy_update(float& rel, float& ms, float sim, float pos_i, float pos_j,
                                                           bool first, const GreedyRule& g, int64_t i) {
  if (g.mmr) ms = first ? sim : fmaxf(ms, sim);
  if (g.thresh && sim > g.sim_thresh) {
    rel = nan_f();
    return 0;
  }
  if (g.gap && fabsf(sub_rn(pos_i, pos_j)) < g.min_gap) {
    rel = nan_f();
    return 0;
  }
  return make_key(g.mmr ? sub_rn(rel, mul_rn(g.lam, ms)) : rel, i);
}

// Chen et al. 2018, Algorithm 1, for candidate i after pick j: e_i = (L_ji - <c_j, c_i>) / sqrt(d2_j),
// d2_i -= e_i^2, with L_ji = (q_j * q_i) * S_ji rounded as the reference's q.gather(j) * q * sims.
// Returns i's key (its new d2) while d2_i > eps * L_ii, else 0 (it is then never updated again).
__host__ __device__ __forceinline__ u64 dpp_update(float& d2, float thr, float qi, float qj, float sim, float proj,
                                                        float sqrt_dj, float& c_out, int64_t i) {
  const float l = mul_rn(mul_rn(qj, qi), sim);
  const float e = div_rn(sub_rn(l, proj), sqrt_dj);
  c_out = e;
  d2 = sub_rn(d2, mul_rn(e, e));
  return d2 > thr ? make_key(d2, i) : 0;
}

// ---------------------------------------------------------------------------------------------------
// Block pieces.

__device__ __forceinline__ u64 warp_max_u64(u64 v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const u64 w = __shfl_xor_sync(0xffffffffu, v, offset);
    v = w > v ? w : v;
  }
  return v;
}

struct Broadcast {
  u64 red[kWarps];
  int64_t pick;   // -1: nothing left to pick
  float a, b;     // greedy: time of the pick; dpp: d2 and quality of the pick
};

// The block maximum of every thread's key, valid in thread 0 only; thread 0 then resolves the pick and
// publishes it in Broadcast before the caller's next __syncthreads. red[] is rewritten only after that
// barrier, so no reader of this step is overtaken.
__device__ __forceinline__ u64 block_max_to_thread0(u64 v, Broadcast& sh) {
  v = warp_max_u64(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) sh.red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? sh.red[lane] : 0;
    v = warp_max_u64(v);
  }
  return v;
}

// acc[r] = similarity of pick j with candidate i = tile0 + r * kThreads + tid, for the live ones.
// Gram: one coalesced read of row j. Streaming: the pick's unit row is staged in shared memory
// kStage channels at a time; each thread runs the fmaf chain over c = 0..C-1 for its candidates
// (channel-major xt, so a warp reads 32 consecutive frames per channel). Called by every thread.
template <int kSims>
__device__ __forceinline__ void tile_sims(const float* xt, const float* grow, int64_t T, int64_t C, int64_t j,
                                          int64_t tile0, const bool (&live)[kPerThread], float (&acc)[kPerThread],
                                          float* stage) {
  const int tid = threadIdx.x;
#pragma unroll
  for (int r = 0; r < kPerThread; ++r) acc[r] = 0.f;
  if constexpr (kSims == kGram) {
#pragma unroll
    for (int r = 0; r < kPerThread; ++r)
      if (live[r]) acc[r] = grow[tile0 + r * kThreads + tid];
  } else if constexpr (kSims == kStream) {
    for (int64_t c0 = 0; c0 < C; c0 += kStage) {
      const int n = int(C - c0 < kStage ? C - c0 : kStage);
      __syncthreads();  // the previous users of stage are done
      for (int c = tid; c < n; c += kThreads) stage[c] = xt[(c0 + c) * T + j];
      __syncthreads();
      for (int c = 0; c < n; ++c) {
        const float w = stage[c];
        const float* col = xt + (c0 + c) * T + tile0 + tid;
#pragma unroll
        for (int r = 0; r < kPerThread; ++r)
          if (live[r]) acc[r] = fmaf(col[r * kThreads], w, acc[r]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// greedy_select

struct GreedyArgs {
  float* rel;          // [P, T], NaN = not a candidate
  const float* pos;    // [B, T] with batch stride pos_sb, or null without min_gap
  int64_t pos_sb;
  const float* xt;     // [B, C, T] (streaming) or null
  const float* gram;   // [B, T, T] (pool mode) or null
  float* ms;           // [P, T] scratch (global state) or null
  int32_t* picks;      // [P, k]
  int64_t Q, T, C, k;
  GreedyRule rule;
};

// Two blocks per SM (<= 64 registers) so that batches of more problems than SMs overlap their barriers.
template <bool kShared, int kSims>
__global__ void __launch_bounds__(kThreads, 2) greedy_kernel(GreedyArgs a) {
  extern __shared__ float dyn[];
  __shared__ Broadcast sh;
  __shared__ float stage[kSims == kStream ? kStage : 1];
  const int tid = threadIdx.x;
  const int64_t p = blockIdx.x, b = p / a.Q, T = a.T;
  const GreedyRule g = a.rule;
  float* rel = a.rel + p * T;
  float* ms = a.ms != nullptr ? a.ms + p * T : nullptr;
  const float* pos = g.gap ? a.pos + b * a.pos_sb : nullptr;
  if constexpr (kShared) {
    float* s_rel = dyn;
    float* s_ms = dyn + T;
    float* s_pos = dyn + (kSims != kNoSims ? 2 : 1) * T;
    for (int64_t i = tid; i < T; i += kThreads) {
      s_rel[i] = rel[i];
      if (g.gap) s_pos[i] = pos[i];
    }
    rel = s_rel;
    ms = s_ms;
    if (g.gap) pos = s_pos;
    __syncthreads();
  }

  u64 best = 0;
  for (int64_t tile0 = 0; tile0 < T; tile0 += kTile) {
#pragma unroll
    for (int r = 0; r < kPerThread; ++r) {
      const int64_t i = tile0 + r * kThreads + tid;
      if (i < T && !isnan(rel[i])) best = max(best, make_key(rel[i], i));
    }
  }

  for (int64_t s = 0; s < a.k; ++s) {
    const u64 top = block_max_to_thread0(best, sh);
    if (tid == 0) {
      int64_t j = top == 0 ? -1 : key_index(top);
      // Every gain left is -inf (float overflow): the reference's argmax over where(eligible, gain,
      // -inf) then returns frame 0, a pick only if frame 0 is a candidate. (Thread 0 owns frame 0.)
      if (top != 0 && uint32_t(top >> 32) == kNegInfKey) j = isnan(rel[0]) ? -1 : 0;
      sh.pick = j;
      if (j >= 0) {
        a.picks[p * a.k + s] = int32_t(j);
        if (g.gap) sh.a = pos[j];
      }
    }
    __syncthreads();
    const int64_t j = sh.pick;
    if (j < 0 || s + 1 == a.k) break;
    const float pos_j = sh.a;
    const float* grow = kSims == kGram ? a.gram + (b * T + j) * T : nullptr;
    const float* xt = kSims == kStream ? a.xt + b * a.C * T : nullptr;
    best = 0;
    for (int64_t tile0 = 0; tile0 < T; tile0 += kTile) {
      bool live[kPerThread];
      float acc[kPerThread];
#pragma unroll
      for (int r = 0; r < kPerThread; ++r) {
        const int64_t i = tile0 + r * kThreads + tid;
        live[r] = false;
        if (i < T) {
          if (i == j) rel[i] = nan_f();  // the pick is no longer a candidate
          else live[r] = !isnan(rel[i]);
        }
      }
      tile_sims<kSims>(xt, grow, T, a.C, j, tile0, live, acc, stage);
#pragma unroll
      for (int r = 0; r < kPerThread; ++r) {
        if (!live[r]) continue;
        const int64_t i = tile0 + r * kThreads + tid;
        float unused = 0.f;
        float& m = kSims != kNoSims ? ms[i] : unused;
        best = max(best, greedy_update(rel[i], m, acc[r], g.gap ? pos[i] : 0.f, pos_j, s == 0, g, i));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// dpp_select

struct DppArgs {
  const float* q;      // [P, T]
  const float* diag;   // [P, T] L_ii
  const float* thr;    // [P, T] eps * L_ii
  const float* xt;     // [B, C, T] or null
  const float* gram;   // [B, T, T] or null
  float* d2;           // [P, T] scratch
  float* cf;           // [P, kk, T] scratch: cf[p, s, i] = c_i[s]
  int32_t* picks;      // [P, k]
  float* d2_pick;      // [P, k]
  int64_t Q, T, C, k, kk;
};

// One block per SM: the sims and projections of 16 candidates per thread need ~96 registers (at the
// 64 that two blocks allow, ptxas spills).
template <bool kShared, int kSims>
__global__ void __launch_bounds__(kThreads, 1) dpp_kernel(DppArgs a) {
  extern __shared__ float dyn[];
  __shared__ Broadcast sh;
  __shared__ float stage[kStage];
  const int tid = threadIdx.x;
  const int64_t p = blockIdx.x, b = p / a.Q, T = a.T;
  const float* q = a.q + p * T;
  const float* thr = a.thr + p * T;
  const float* diag = a.diag + p * T;
  float* d2 = a.d2 + p * T;
  if constexpr (kShared) {
    float* s_d2 = dyn;
    float* s_q = dyn + T;
    float* s_thr = dyn + 2 * T;
    for (int64_t i = tid; i < T; i += kThreads) {
      s_q[i] = q[i];
      s_thr[i] = thr[i];
    }
    d2 = s_d2;
    q = s_q;
    thr = s_thr;
  }
  for (int64_t i = tid; i < T; i += kThreads) d2[i] = diag[i];  // d2_i = L_ii before any pick
  __syncthreads();

  u64 best = 0;
  for (int64_t tile0 = 0; tile0 < T; tile0 += kTile) {
#pragma unroll
    for (int r = 0; r < kPerThread; ++r) {
      const int64_t i = tile0 + r * kThreads + tid;
      if (i < T && d2[i] > thr[i]) best = max(best, make_key(d2[i], i));
    }
  }

  float* cf = a.cf + p * a.kk * T;
  const float* grow_base = kSims == kGram ? a.gram + b * T * T : nullptr;
  const float* xt = kSims == kStream ? a.xt + b * a.C * T : nullptr;
  for (int64_t s = 0; s < a.k; ++s) {
    const u64 top = block_max_to_thread0(best, sh);
    if (tid == 0) {
      const int64_t j = top == 0 ? -1 : key_index(top);
      sh.pick = j;
      if (j >= 0) {
        sh.a = d2[j];
        sh.b = q[j];
        a.picks[p * a.k + s] = int32_t(j);
        a.d2_pick[p * a.k + s] = d2[j];
      }
    }
    __syncthreads();
    const int64_t j = sh.pick;
    if (j < 0 || s + 1 == a.k) break;
    const float sqrt_dj = sqrt_rn(fmaxf(sh.a, FLT_MIN));  // reference: dj.clamp_min(finfo.tiny).sqrt()
    const float qj = sh.b;
    float* c_row = cf + s * T;  // s < min(k, T): every step before this one picked a distinct frame
    const float* grow = grow_base != nullptr ? grow_base + j * T : nullptr;
    best = 0;
    for (int64_t tile0 = 0; tile0 < T; tile0 += kTile) {
      bool live[kPerThread];
      float acc[kPerThread], proj[kPerThread];
#pragma unroll
      for (int r = 0; r < kPerThread; ++r) {
        const int64_t i = tile0 + r * kThreads + tid;
        live[r] = false;
        proj[r] = 0.f;
        if (i < T) {
          if (i == j) d2[i] = -INFINITY;  // never a candidate again (d2 > thr fails)
          else live[r] = d2[i] > thr[i];
        }
      }
      tile_sims<kSims>(xt, grow, T, a.C, j, tile0, live, acc, stage);
      // <c_j, c_i> over the s earlier steps, product then sum in step order. c_i[t] was written at step
      // t for every frame that was still a candidate then, which includes j and every live i.
      for (int64_t s0 = 0; s0 < s; s0 += kStage) {
        const int n = int(s - s0 < kStage ? s - s0 : kStage);
        __syncthreads();
        for (int c = tid; c < n; c += kThreads) stage[c] = cf[(s0 + c) * T + j];
        __syncthreads();
        for (int c = 0; c < n; ++c) {
          const float w = stage[c];
          const float* row = cf + (s0 + c) * T + tile0 + tid;
#pragma unroll
          for (int r = 0; r < kPerThread; ++r)
            if (live[r]) proj[r] = add_rn(proj[r], mul_rn(w, row[r * kThreads]));
        }
      }
#pragma unroll
      for (int r = 0; r < kPerThread; ++r) {
        if (!live[r]) continue;
        const int64_t i = tile0 + r * kThreads + tid;
        best = max(best, dpp_update(d2[i], thr[i], q[i], qj, acc[r], proj[r], sqrt_dj, c_row[i], i));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// select_gram: G = X X^T per video from channel-major unit rows xt [C, T]. 128 x 128 output tiles,
// 16 x 16 threads with 8 x 8 outputs each, channels in slices of 16 through shared memory. Every entry
// is one fmaf chain over c = 0..C-1 in order (no split over c), exactly what the streaming path computes;
// the padding past C adds fmaf(0, 0, acc) = acc. Only tiles on or above the diagonal run and write both
// G[i, j] and G[j, i] (fmaf(a, b, acc) = fmaf(b, a, acc), so the halves agree).

constexpr int kGramTile = 128;
constexpr int kGramK = 16;
constexpr int kGramThreads = 256;

__global__ void __launch_bounds__(kGramThreads) gram_kernel(const float* __restrict__ xt, float* __restrict__ gram,
                                                           int64_t T, int64_t C, int tiles) {
  const int ti = blockIdx.x / tiles, tj = blockIdx.x % tiles;
  if (ti > tj) return;
  const int64_t b = blockIdx.y;
  const float* X = xt + b * C * T;
  float* G = gram + b * T * T;
  __shared__ __align__(16) float As[kGramK][kGramTile];
  __shared__ __align__(16) float Bs[kGramK][kGramTile];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t i0 = int64_t(ti) * kGramTile, j0 = int64_t(tj) * kGramTile;
  float acc[8][8];
#pragma unroll
  for (int m = 0; m < 8; ++m)
#pragma unroll
    for (int n = 0; n < 8; ++n) acc[m][n] = 0.f;

  for (int64_t c0 = 0; c0 < C; c0 += kGramK) {
#pragma unroll
    for (int l = 0; l < kGramK * kGramTile / kGramThreads; ++l) {
      const int e = tid + l * kGramThreads, kk = e / kGramTile, m = e % kGramTile;
      const int64_t c = c0 + kk;
      As[kk][m] = (c < C && i0 + m < T) ? X[c * T + i0 + m] : 0.f;
      Bs[kk][m] = (c < C && j0 + m < T) ? X[c * T + j0 + m] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kGramK; ++kk) {
      float av[8], bv[8];
      const float4 a0 = *reinterpret_cast<const float4*>(&As[kk][ty * 8]);
      const float4 a1 = *reinterpret_cast<const float4*>(&As[kk][ty * 8 + 4]);
      const float4 b0 = *reinterpret_cast<const float4*>(&Bs[kk][tx * 8]);
      const float4 b1 = *reinterpret_cast<const float4*>(&Bs[kk][tx * 8 + 4]);
      av[0] = a0.x, av[1] = a0.y, av[2] = a0.z, av[3] = a0.w, av[4] = a1.x, av[5] = a1.y, av[6] = a1.z, av[7] = a1.w;
      bv[0] = b0.x, bv[1] = b0.y, bv[2] = b0.z, bv[3] = b0.w, bv[4] = b1.x, bv[5] = b1.y, bv[6] = b1.z, bv[7] = b1.w;
#pragma unroll
      for (int m = 0; m < 8; ++m)
#pragma unroll
        for (int n = 0; n < 8; ++n) acc[m][n] = fmaf(av[m], bv[n], acc[m][n]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int m = 0; m < 8; ++m) {
    const int64_t i = i0 + ty * 8 + m;
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      const int64_t j = j0 + tx * 8 + n;
      if (i < T && j < T) {
        G[i * T + j] = acc[m][n];
        if (ti != tj) G[j * T + i] = acc[m][n];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Host side.

template <typename Kernel>
size_t static_smem(Kernel kernel) {
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) check_launch("vidtok select: cudaFuncGetAttributes");
  return attr.sharedSizeBytes;
}

int optin_smem() {
  int dev = 0, bytes = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    check_launch("vidtok select: shared memory limit");
  return bytes;
}

// Launches kernel<kShared = true> when the per-candidate state fits in shared memory, else <false>.
template <typename Args>
void launch_persistent(void (*shared_kernel)(Args), void (*global_kernel)(Args), const Args& args, int64_t problems,
                       int64_t T, size_t state_bytes, bool force_global, cudaStream_t stream, const char* what) {
  if (problems > 0x7fffffff) throw std::invalid_argument(std::string(what) + ": more than 2^31 - 1 problems (B * Q)");
  const size_t smem = state_bytes + static_smem(shared_kernel);
  const bool shared = !force_global && T <= kTile && smem <= static_cast<size_t>(optin_smem());
  if (shared) {
    // past the default 48 KiB per block (static + dynamic shared memory together) the kernel must opt in
    if (smem > 48 * 1024 &&
        cudaFuncSetAttribute(shared_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(state_bytes)) != cudaSuccess)
      check_launch(what);
    shared_kernel<<<static_cast<unsigned>(problems), kThreads, state_bytes, stream>>>(args);
  } else {
    global_kernel<<<static_cast<unsigned>(problems), kThreads, 0, stream>>>(args);
  }
  check_launch(what);
}

template <int kSims>
void launch_greedy(const GreedyArgs& a, int64_t problems, bool force_global, cudaStream_t stream) {
  const int arrays = 1 + (kSims != kNoSims ? 1 : 0) + (a.rule.gap ? 1 : 0);  // rel, max sim, times
  launch_persistent<GreedyArgs>(greedy_kernel<true, kSims>, greedy_kernel<false, kSims>, a, problems, a.T,
                                size_t(arrays) * a.T * sizeof(float), force_global, stream, "vidtok greedy_select");
}

template <int kSims>
void launch_dpp(const DppArgs& a, int64_t problems, bool force_global, cudaStream_t stream) {
  launch_persistent<DppArgs>(dpp_kernel<true, kSims>, dpp_kernel<false, kSims>, a, problems, a.T,
                             size_t(3) * a.T * sizeof(float), force_global, stream, "vidtok dpp_select");  // d2, q, thr
}

void require(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(what);
}

}  // namespace

void select_gram(std::uintptr_t xt, std::uintptr_t gram, int64_t B, int64_t T, int64_t C, std::uintptr_t stream) {
  if (B == 0 || T == 0) return;
  require(xt != 0 && gram != 0, "select_gram: xt and gram must be device pointers");
  const int64_t tiles = (T + kGramTile - 1) / kGramTile;
  require(tiles * tiles <= 0x7fffffff, "select_gram: T too large for one Gram launch");
  auto cs = reinterpret_cast<cudaStream_t>(stream);
  const auto* X = reinterpret_cast<const float*>(xt);
  auto* G = reinterpret_cast<float*>(gram);
  for (int64_t b0 = 0; b0 < B; b0 += 65535) {  // gridDim.y limit
    const int64_t nb = B - b0 < 65535 ? B - b0 : 65535;
    const dim3 grid(static_cast<unsigned>(tiles * tiles), static_cast<unsigned>(nb));
    gram_kernel<<<grid, kGramThreads, 0, cs>>>(X + b0 * C * T, G + b0 * T * T, T, C, int(tiles));
    check_launch("vidtok select_gram");
  }
}

void greedy_select(std::uintptr_t rel, std::uintptr_t pos, int64_t pos_sb, std::uintptr_t xt, std::uintptr_t gram,
                   std::uintptr_t ms, std::uintptr_t picks, int64_t B, int64_t Q, int64_t T, int64_t C, int64_t k,
                   bool mmr, float lam, bool use_thresh, float sim_thresh, bool use_gap, float min_gap,
                   bool force_global_state, std::uintptr_t stream) {
  if (B * Q == 0 || T == 0 || k == 0) return;
  require(T < 0x7fffffff, "greedy_select: T must be < 2^31");
  require(rel != 0 && picks != 0, "greedy_select: rel and picks must be device pointers");
  const bool sims = mmr || use_thresh;
  require(!sims || (xt != 0) != (gram != 0), "greedy_select: MMR / sim_thresh need exactly one of xt and gram");
  require(!use_gap || pos != 0, "greedy_select: min_gap needs pos");
  require(!sims || ms != 0, "greedy_select: MMR / sim_thresh need the ms scratch");
  GreedyArgs a{};
  a.rel = reinterpret_cast<float*>(rel);
  a.pos = reinterpret_cast<const float*>(pos);
  a.pos_sb = pos_sb;
  a.xt = reinterpret_cast<const float*>(xt);
  a.gram = reinterpret_cast<const float*>(gram);
  a.ms = reinterpret_cast<float*>(ms);
  a.picks = reinterpret_cast<int32_t*>(picks);
  a.Q = Q, a.T = T, a.C = C, a.k = k;
  a.rule = GreedyRule{sims, mmr, lam, use_thresh, sim_thresh, use_gap, min_gap};
  auto cs = reinterpret_cast<cudaStream_t>(stream);
  if (!sims) return launch_greedy<kNoSims>(a, B * Q, force_global_state, cs);
  if (gram != 0) return launch_greedy<kGram>(a, B * Q, force_global_state, cs);
  return launch_greedy<kStream>(a, B * Q, force_global_state, cs);
}

void dpp_select(std::uintptr_t q, std::uintptr_t diag, std::uintptr_t thr, std::uintptr_t xt, std::uintptr_t gram,
                std::uintptr_t d2, std::uintptr_t cf, std::uintptr_t picks, std::uintptr_t d2_pick, int64_t B, int64_t Q,
                int64_t T, int64_t C, int64_t k, bool force_global_state, std::uintptr_t stream) {
  if (B * Q == 0 || T == 0 || k == 0) return;
  require(T < 0x7fffffff, "dpp_select: T must be < 2^31");
  require(q != 0 && diag != 0 && thr != 0 && d2 != 0 && cf != 0 && picks != 0 && d2_pick != 0,
          "dpp_select: q, diag, thr, d2, cf, picks and d2_pick must be device pointers");
  require((xt != 0) != (gram != 0), "dpp_select: exactly one of xt and gram");
  DppArgs a{};
  a.q = reinterpret_cast<const float*>(q);
  a.diag = reinterpret_cast<const float*>(diag);
  a.thr = reinterpret_cast<const float*>(thr);
  a.xt = reinterpret_cast<const float*>(xt);
  a.gram = reinterpret_cast<const float*>(gram);
  a.d2 = reinterpret_cast<float*>(d2);
  a.cf = reinterpret_cast<float*>(cf);
  a.picks = reinterpret_cast<int32_t*>(picks);
  a.d2_pick = reinterpret_cast<float*>(d2_pick);
  a.Q = Q, a.T = T, a.C = C, a.k = k, a.kk = k < T ? k : T;
  auto cs = reinterpret_cast<cudaStream_t>(stream);
  if (gram != 0) return launch_dpp<kGram>(a, B * Q, force_global_state, cs);
  return launch_dpp<kStream>(a, B * Q, force_global_state, cs);
}

}  // namespace vidtok

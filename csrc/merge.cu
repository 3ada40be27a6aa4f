// Temporal token merging hot path, CUDA C++ side.
//
// paired_similarity: cosine similarity of token (t, n) with token (t - lag, n) for x [B, T, N, C],
// the signal FrameFusion, DyCoke, PruneVid and vLLM's EVS threshold on. Same formula as
// torch.nn.functional.cosine_similarity: dot / (max(|a|, eps) * max(|b|, eps)), eps = 1e-8.
// One warp per token pair; fp32 accumulation; 16-byte vector loads when the channel dimension is
// contiguous and aligned, scalar strided loads otherwise.
#include "common.cuh"
#include "merge.h"

namespace vidtok {
namespace {

constexpr float kEps = 1e-8f;
constexpr int kWarpsPerBlock = 8;

struct Strides4 {
  int64_t b, t, n, c;
};

// Adds the partial dot products of a and b (and their squared norms) owned by this lane.
template <typename T, bool kVectorized>
__device__ __forceinline__ void accumulate_pair(const T* a, const T* b, int64_t C, int64_t sc, int lane,
                                                float& ab, float& aa, float& bb) {
  if constexpr (kVectorized) {
    constexpr int V = kVec<T>;
    for (int64_t c = int64_t(lane) * V; c < C; c += 32 * V) {
      float va[V], vb[V];
      load_vec(a + c, va);
      load_vec(b + c, vb);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        ab = fmaf(va[i], vb[i], ab);
        aa = fmaf(va[i], va[i], aa);
        bb = fmaf(vb[i], vb[i], bb);
      }
    }
  } else {
    for (int64_t c = lane; c < C; c += 32) {
      const float va = to_float(a[c * sc]), vb = to_float(b[c * sc]);
      ab = fmaf(va, vb, ab);
      aa = fmaf(va, va, aa);
      bb = fmaf(vb, vb, bb);
    }
  }
}

template <typename T, bool kVectorized>
__global__ void paired_similarity_fwd_kernel(const T* __restrict__ x, float* __restrict__ out, int64_t B,
                                             int64_t T_, int64_t N, int64_t C, int64_t lag, Strides4 s) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int64_t t_out = T_ - lag;
  if (row >= B * t_out * N) return;
  const int64_t n = row % N, t = (row / N) % t_out, b = row / (N * t_out);
  const T* a = x + b * s.b + (t + lag) * s.t + n * s.n;  // frame t + lag
  const T* p = x + b * s.b + t * s.t + n * s.n;          // the frame lag steps earlier
  float ab = 0.f, aa = 0.f, bb = 0.f;
  accumulate_pair<T, kVectorized>(a, p, C, s.c, lane, ab, aa, bb);
  ab = warp_sum(ab);
  aa = warp_sum(aa);
  bb = warp_sum(bb);
  if (lane == 0) out[row] = ab / (fmaxf(sqrtf(aa), kEps) * fmaxf(sqrtf(bb), kEps));
}

// d cos(a, b) / d a = b / (|a|_e |b|_e) - [|a| > eps] cos a / |a|^2, with |v|_e = max(|v|, eps).
// Token (t, n) is the "a" of output pair t - lag and the "b" of output pair t, so each token's
// gradient gathers both terms: no atomics, every element written once.
template <typename T, bool kVectorized>
__global__ void paired_similarity_bwd_kernel(const T* __restrict__ x, const float* __restrict__ grad_out,
                                             T* __restrict__ grad_x, int64_t B, int64_t T_, int64_t N,
                                             int64_t C, int64_t lag, Strides4 s) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= B * T_ * N) return;
  const int64_t n = row % N, t = (row / N) % T_, b = row / (N * T_);
  const int64_t t_out = T_ - lag;
  const bool has_prev = t >= lag, has_next = t + lag < T_;
  const T* self = x + b * s.b + t * s.t + n * s.n;
  const T* prev = x + b * s.b + (has_prev ? t - lag : t) * s.t + n * s.n;
  const T* next = x + b * s.b + (has_next ? t + lag : t) * s.t + n * s.n;

  float d_prev = 0.f, ss = 0.f, pp = 0.f, d_next = 0.f, ss2 = 0.f, nn = 0.f;
  accumulate_pair<T, kVectorized>(self, prev, C, s.c, lane, d_prev, ss, pp);
  accumulate_pair<T, kVectorized>(self, next, C, s.c, lane, d_next, ss2, nn);
  d_prev = warp_sum(d_prev);
  ss = warp_sum(ss);
  pp = warp_sum(pp);
  d_next = warp_sum(d_next);
  nn = warp_sum(nn);

  const float norm_self = fmaxf(sqrtf(ss), kEps);
  float coef_prev = 0.f, coef_next = 0.f, coef_self = 0.f;
  if (has_prev) {
    const float g = grad_out[(b * t_out + (t - lag)) * N + n];
    const float denom = norm_self * fmaxf(sqrtf(pp), kEps);
    coef_prev = g / denom;
    coef_self += g * (d_prev / denom);
  }
  if (has_next) {
    const float g = grad_out[(b * t_out + t) * N + n];
    const float denom = norm_self * fmaxf(sqrtf(nn), kEps);
    coef_next = g / denom;
    coef_self += g * (d_next / denom);
  }
  coef_self = sqrtf(ss) > kEps ? coef_self / (norm_self * norm_self) : 0.f;

  T* out = grad_x + row * C;  // grad_x is contiguous [B, T, N, C]
  for (int64_t c = lane; c < C; c += 32) {
    const float v = coef_prev * to_float(prev[c * s.c]) + coef_next * to_float(next[c * s.c]) -
                    coef_self * to_float(self[c * s.c]);
    out[c] = from_float<T>(v);
  }
}

template <typename T>
bool can_vectorize(std::uintptr_t x, int64_t C, Strides4 s) {
  constexpr int V = kVec<T>;
  return aligned16(x) && s.c == 1 && C % V == 0 && s.b % V == 0 && s.t % V == 0 && s.n % V == 0;
}

unsigned int grid_for(int64_t rows) {
  return static_cast<unsigned int>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

template <typename T>
void launch_fwd(std::uintptr_t x, std::uintptr_t out, int64_t B, int64_t T_, int64_t N, int64_t C, int64_t lag,
                Strides4 s, cudaStream_t stream) {
  const int64_t rows = B * (T_ - lag) * N;
  if (rows == 0) return;
  const T* xp = reinterpret_cast<const T*>(x);
  float* op = reinterpret_cast<float*>(out);
  if (can_vectorize<T>(x, C, s)) {
    paired_similarity_fwd_kernel<T, true><<<grid_for(rows), 32 * kWarpsPerBlock, 0, stream>>>(xp, op, B, T_, N, C, lag, s);
  } else {
    paired_similarity_fwd_kernel<T, false><<<grid_for(rows), 32 * kWarpsPerBlock, 0, stream>>>(xp, op, B, T_, N, C, lag, s);
  }
  check_launch("vidtok paired_similarity_fwd");
}

template <typename T>
void launch_bwd(std::uintptr_t x, std::uintptr_t grad_out, std::uintptr_t grad_x, int64_t B, int64_t T_, int64_t N,
                int64_t C, int64_t lag, Strides4 s, cudaStream_t stream) {
  const int64_t rows = B * T_ * N;
  if (rows == 0) return;
  const T* xp = reinterpret_cast<const T*>(x);
  const float* gp = reinterpret_cast<const float*>(grad_out);
  T* gx = reinterpret_cast<T*>(grad_x);
  if (can_vectorize<T>(x, C, s)) {
    paired_similarity_bwd_kernel<T, true><<<grid_for(rows), 32 * kWarpsPerBlock, 0, stream>>>(xp, gp, gx, B, T_, N, C, lag, s);
  } else {
    paired_similarity_bwd_kernel<T, false><<<grid_for(rows), 32 * kWarpsPerBlock, 0, stream>>>(xp, gp, gx, B, T_, N, C, lag, s);
  }
  check_launch("vidtok paired_similarity_bwd");
}

}  // namespace

void paired_similarity_fwd(int dtype, std::uintptr_t x, std::uintptr_t out, int64_t B, int64_t T, int64_t N, int64_t C,
                           int64_t lag, int64_t sb, int64_t st, int64_t sn, int64_t sc, std::uintptr_t stream) {
  const Strides4 s{sb, st, sn, sc};
  auto cs = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32: return launch_fwd<float>(x, out, B, T, N, C, lag, s, cs);
    case kFloat16: return launch_fwd<__half>(x, out, B, T, N, C, lag, s, cs);
    case kBFloat16: return launch_fwd<__nv_bfloat16>(x, out, B, T, N, C, lag, s, cs);
    default: throw std::invalid_argument("paired_similarity_fwd: unsupported dtype code " + std::to_string(dtype));
  }
}

void paired_similarity_bwd(int dtype, std::uintptr_t x, std::uintptr_t grad_out, std::uintptr_t grad_x, int64_t B,
                           int64_t T, int64_t N, int64_t C, int64_t lag, int64_t sb, int64_t st, int64_t sn,
                           int64_t sc, std::uintptr_t stream) {
  const Strides4 s{sb, st, sn, sc};
  auto cs = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32: return launch_bwd<float>(x, grad_out, grad_x, B, T, N, C, lag, s, cs);
    case kFloat16: return launch_bwd<__half>(x, grad_out, grad_x, B, T, N, C, lag, s, cs);
    case kBFloat16: return launch_bwd<__nv_bfloat16>(x, grad_out, grad_x, B, T, N, C, lag, s, cs);
    default: throw std::invalid_argument("paired_similarity_bwd: unsupported dtype code " + std::to_string(dtype));
  }
}

}  // namespace vidtok

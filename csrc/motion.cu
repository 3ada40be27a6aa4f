// Block-matching motion estimation hot path, CUDA C++ side (vidtok.block_match).
//
// Exhaustive SAD search: block (i, j) of cur against every ref block displaced by (dy, dx),
// |dy|, |dx| <= radius, that lies inside the frame. Semantics: vidtok/reference/motion.py
// block_match (ties: smaller |dy| + |dx|, then the lower row-major candidate index; NaN never wins,
// except that a NaN zero-motion SAD gives motion 0 and cost NaN).
//
// One thread block per motion block. The cur block and the (block + 2r)^2 search window of ref are
// staged in shared memory once (zeros outside the frame: the SAD of a candidate that reaches there
// is computed but never considered); each thread owns groups of kSlots candidates that share dy and sit at consecutive
// shared-memory elements, so one ref load feeds kSlots absolute differences (a sliding register
// window). uint8 frames with block % 4 == 0 use packed words: 4 pixels per 32-bit element and one
// VABSDIFF4.U8.ACC (4 absolute differences plus the accumulation; checked in the sm_80/sm_90 SASS)
// per element pair; four copies of the window shifted by 0..3 bytes keep every load word-aligned.
// Every candidate's SAD is computed by one thread in a fixed order, and the block-wide argmin is a
// min over 64-bit keys (cost bits, |dy| + |dx|, index), so the result does not depend on how the
// reduction is ordered.
#include <algorithm>
#include <climits>
#include <cmath>
#include <type_traits>

#include "common.cuh"
#include "motion.h"

namespace vidtok {
namespace {

constexpr int kSlots = 4;        // candidates per thread group (consecutive shared-memory elements)
constexpr int kMaxThreads = 256;

struct Strides3 {
  int64_t b, h, w;
};

// Shared-memory layout of one thread block; computed on the host (layout_bytes), read by the kernel.
struct Layout {
  int side;       // S = block + 2 radius: rows and useful columns of the search window
  int row_elems;  // elements per cur row: block / lanes
  int groups;     // candidate groups per dy: sum over the lane phases s of ceil(count(s) / kSlots)
  int pitch;      // elements per window row: covers the overreach of the last group; an odd number
                  // of 32-bit words, so rows start in different banks
  int copy_stride;  // elements from one shifted copy of the window to the next: S * pitch, padded
                    // (packed layout) to 8 mod 32 words so the copies sit 8 banks apart; a warp's
                    // threads read all 4 copies at once (4-way bank conflicts at block 16, r = 8
                    // without the padding, 1.67-way with it, by a count over the warp's addresses)
  int raw_pitch;  // packed layout only: 32-bit words per row of the raw byte staging area
  int window_bytes, cur_bytes, raw_bytes;
};

int64_t round16(int64_t v) { return (v + 15) / 16 * 16; }

// Candidate columns ox = dx + radius in [0, 2r] with ox % lanes == s (lane phase s).
__host__ __device__ __forceinline__ int phase_count(int s, int radius, int lanes) {
  return s <= 2 * radius ? (2 * radius - s) / lanes + 1 : 0;
}

// Dynamic shared bytes for (block, radius) with `lanes` pixels per element of `elem_bytes`; fills
// *out when the total fits kBlockMatchSharedLimit (all fields then fit an int). 64-bit sizes: radius
// may be up to 2^15 - 1 (check_sizes), and the caller reports the size.
int64_t layout_bytes(int64_t block, int64_t radius, int lanes, int elem_bytes, Layout* out) {
  const int64_t side = block + 2 * radius, row_elems = block / lanes;
  const int64_t count0 = 2 * radius / lanes + 1;
  int64_t groups = 0;
  for (int s = 0; s < lanes; ++s) groups += (phase_count(s, int(radius), lanes) + kSlots - 1) / kSlots;
  // the last group of phase 0 reads elements up to ceil(count0 / kSlots) * kSlots + row_elems - 2
  const int64_t needed = (count0 + kSlots - 1) / kSlots * kSlots + row_elems - 1;
  const int64_t pitch = elem_bytes == 4 ? (needed | 1) : (((needed + 3) / 4) | 1) * 4;
  const int64_t copy_stride = lanes == 4 ? side * pitch + (8 - side * pitch % 32 + 32) % 32 : side * pitch;
  const int64_t raw_pitch = lanes == 4 ? pitch + 1 : 0;  // + 1: the funnel shift reads word q + 1
  const int64_t window = round16(lanes * copy_stride * elem_bytes);
  const int64_t cur = round16(block * row_elems * elem_bytes);
  const int64_t raw = round16(side * raw_pitch * 4);
  const int64_t total = window + cur + raw;
  if (out != nullptr && total <= kBlockMatchSharedLimit) {
    *out = Layout{int(side), int(row_elems), int(groups), int(pitch), int(copy_stride), int(raw_pitch),
                  int(window), int(cur), int(raw)};
  }
  return total;
}

// One step of the SAD: acc + |a - b| (elementwise over the 4 bytes of a packed word).
__device__ __forceinline__ uint32_t sad_step(uint32_t acc, uint32_t a, uint32_t b) {
  uint32_t d;
  asm("vabsdiff4.u32.u32.u32.add %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(acc));
  return d;
}
__device__ __forceinline__ uint32_t sad_step(uint32_t acc, uint8_t a, uint8_t b) {
  return __sad(int(a), int(b), acc);
}
__device__ __forceinline__ float sad_step(float acc, float a, float b) { return acc + fabsf(a - b); }

template <typename Elem, typename In>
__device__ __forceinline__ Elem to_elem(In v) {
  if constexpr (std::is_same_v<Elem, uint8_t>) {
    return v;
  } else {
    return to_float(v);
  }
}

// uint8 SADs are integers below 255 * 256^2 < 2^24: exact in fp32.
__device__ __forceinline__ float to_cost(uint32_t acc) { return float(acc); }
__device__ __forceinline__ float to_cost(float acc) { return acc; }

// (cost bits, |dy| + |dx|, index + 1) as one integer: the bits of a non-negative float order like
// the float, so the smallest key is the documented winner. NaN counts as +inf (never beats a
// number); a NaN zero-motion SAD gets key 0 and wins outright (the reference keeps motion 0 and cost
// NaN there). The order term cannot be 0 (+1), so key 0 means exactly that case. Fits 32 bits:
// n <= 218 under the shared-memory limit, so (4r + 1) n^2 + n^2 < 2^25.
__device__ __forceinline__ unsigned long long candidate_key(float c, int dy, int dx, int n, int radius) {
  if (isnan(c)) {
    if (dy == 0 && dx == 0) return 0ull;
    c = INFINITY;
  }
  const unsigned order = unsigned(abs(dy) + abs(dx)) * unsigned(n * n) + unsigned((dy + radius) * n + dx + radius) + 1u;
  return (static_cast<unsigned long long>(__float_as_uint(c)) << 32) | order;
}

__device__ __forceinline__ unsigned long long warp_min(unsigned long long v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const unsigned long long o = __shfl_xor_sync(0xffffffffu, v, offset);
    v = o < v ? o : v;
  }
  return v;
}

// Four packed pixels p[0], p[sw], p[2 sw], p[3 sw], the first in the low byte (as the window words).
__device__ __forceinline__ uint32_t pack4(const uint8_t* p, int64_t sw) {
  return uint32_t(p[0]) | uint32_t(p[sw]) << 8 | uint32_t(p[2 * sw]) << 16 | uint32_t(p[3 * sw]) << 24;
}

// In: the frames' element type. Elem: the shared-memory element (uint32_t: 4 packed uint8 pixels,
// uint8_t, or float for every float type). L: pixels per element. kRowElems: block / L when fixed at
// compile time (the common blocks 8 and 16: the row loop unrolls completely), 0 for any block.
template <typename In, typename Elem, int L, int kRowElems>
__global__ void __launch_bounds__(kMaxThreads)
    block_match_kernel(const In* __restrict__ cur, const In* __restrict__ ref, int16_t* __restrict__ motion,
                       float* __restrict__ cost, int64_t nblocks, int h, int w, int H, int W, int block, int radius,
                       Strides3 cs, Strides3 rs, Layout lay) {
  static_assert(L == 1 || (L == 4 && std::is_same_v<Elem, uint32_t>), "packed words hold 4 uint8 pixels");
  using Acc = std::conditional_t<std::is_same_v<Elem, float>, float, uint32_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ unsigned long long warp_best[kMaxThreads / 32];
  Elem* window = reinterpret_cast<Elem*>(smem);  // L copies of S rows x pitch, copy s shifted by s pixels
  Elem* cur_block = reinterpret_cast<Elem*>(smem + lay.window_bytes);  // block rows x row_elems
  const int n = 2 * radius + 1, S = lay.side, P = lay.pitch, bw = kRowElems > 0 ? kRowElems : lay.row_elems;
  constexpr int kUnroll = kRowElems > 0 ? kRowElems : 4;
  const int total_groups = n * lay.groups;
  const int tid = threadIdx.x, nthreads = blockDim.x;

  for (int64_t blk = blockIdx.x; blk < nblocks; blk += gridDim.x) {
    const int j = int(blk % w), i = int(blk / w % h);
    const int64_t b = blk / (int64_t(h) * w);
    const int y0 = i * block, x0 = j * block;
    const In* cb = cur + b * cs.b;
    const In* rb = ref + b * rs.b;

    for (int e = tid; e < block * bw; e += nthreads) {
      const int y = e / bw, x = e - y * bw;
      const In* p = cb + int64_t(y0 + y) * cs.h + int64_t(x0 + x * L) * cs.w;
      if constexpr (L == 4) {
        cur_block[e] = pack4(p, cs.w);
      } else {
        cur_block[e] = to_elem<Elem>(p[0]);
      }
    }
    if constexpr (L == 4) {
      // raw bytes of the window first (each pixel read from global once), then the 4 shifted copies
      unsigned char* raw = smem + lay.window_bytes + lay.cur_bytes;
      const int row_bytes = 4 * lay.raw_pitch;
      for (int e = tid; e < S * row_bytes; e += nthreads) {
        const int row = e / row_bytes, col = e - row * row_bytes;
        const int y = y0 - radius + row, x = x0 - radius + col;
        const bool inside = col < S && y >= 0 && y < H && x >= 0 && x < W;
        raw[e] = inside ? rb[int64_t(y) * rs.h + int64_t(x) * rs.w] : 0;
      }
      __syncthreads();
      const uint32_t* raw32 = reinterpret_cast<const uint32_t*>(raw);
      for (int e = tid; e < L * S * P; e += nthreads) {
        const int s = e / (S * P), rem = e - s * (S * P);
        const int row = rem / P, q = rem - row * P;
        const uint32_t* src = raw32 + row * lay.raw_pitch + q;
        window[s * lay.copy_stride + rem] = __funnelshift_r(src[0], src[1], 8 * s);  // bytes 4q + s .. 4q + s + 3
      }
    } else {
      for (int e = tid; e < S * P; e += nthreads) {
        const int row = e / P, col = e - row * P;
        const int y = y0 - radius + row, x = x0 - radius + col;
        const bool inside = col < S && y >= 0 && y < H && x >= 0 && x < W;
        window[e] = inside ? to_elem<Elem>(rb[int64_t(y) * rs.h + int64_t(x) * rs.w]) : Elem(0);
      }
    }
    __syncthreads();

    unsigned long long best = ~0ull;
    for (int g = tid; g < total_groups; g += nthreads) {
      // group g: dy = g / groups - radius; within a dy, phases s = 0..L-1 in turn, each split into
      // groups of kSlots consecutive elements q0 .. q0 + kSlots - 1 (candidate ox = s + L q)
      const int dyi = g / lay.groups;
      int gi = g - dyi * lay.groups, s = 0, count = phase_count(0, radius, L);
#pragma unroll
      for (int t = 0; t < L - 1; ++t) {
        const int in_phase = (count + kSlots - 1) / kSlots;
        if (gi < in_phase) break;
        gi -= in_phase;
        count = phase_count(++s, radius, L);
      }
      const int q0 = gi * kSlots;
      Acc acc[kSlots];
#pragma unroll
      for (int k = 0; k < kSlots; ++k) acc[k] = Acc(0);
      const Elem* wrow = window + s * lay.copy_stride + dyi * P + q0;
      const Elem* crow = cur_block;
      for (int y = 0; y < block; ++y, wrow += P, crow += bw) {
        Elem r[kSlots];  // r[k] = wrow[x + k]: slot k's ref element for cur element x
#pragma unroll
        for (int k = 0; k < kSlots - 1; ++k) r[k] = wrow[k];
#pragma unroll kUnroll
        for (int x = 0; x < bw; ++x) {
          r[kSlots - 1] = wrow[x + kSlots - 1];
          const Elem c = crow[x];
#pragma unroll
          for (int k = 0; k < kSlots; ++k) acc[k] = sad_step(acc[k], c, r[k]);
#pragma unroll
          for (int k = 0; k < kSlots - 1; ++k) r[k] = r[k + 1];
        }
      }
      const int dy = dyi - radius;
      const bool inside_y = y0 + dy >= 0 && y0 + dy + block <= H;
#pragma unroll
      for (int k = 0; k < kSlots; ++k) {
        const int dx = s + L * (q0 + k) - radius;
        // slots past the phase's last column, and candidates leaving the frame, are never tried
        if (inside_y && q0 + k < count && x0 + dx >= 0 && x0 + dx + block <= W) {
          const unsigned long long key = candidate_key(to_cost(acc[k]), dy, dx, n, radius);
          best = key < best ? key : best;
        }
      }
    }

    best = warp_min(best);
    if (tid % 32 == 0) warp_best[tid / 32] = best;
    __syncthreads();
    if (tid < 32) {
      best = tid < (nthreads + 31) / 32 ? warp_best[tid] : ~0ull;
      best = warp_min(best);
      if (tid == 0) {
        // best is never ~0: zero motion is always inside the frame
        float c = __int_as_float(0x7fc00000);  // key 0: NaN zero-motion SAD
        int dy = 0, dx = 0;
        if (best != 0ull) {
          const unsigned idx = (unsigned(best) - 1u) % unsigned(n * n);
          dy = int(idx / n) - radius;
          dx = int(idx % n) - radius;
          c = __uint_as_float(unsigned(best >> 32));
        }
        motion[2 * blk] = int16_t(dy);
        motion[2 * blk + 1] = int16_t(dx);
        cost[blk] = c;
      }
    }
    __syncthreads();  // the next block overwrites the shared window and warp_best
  }
}

struct Args {
  std::uintptr_t cur, ref, motion, cost;
  int64_t nblocks;
  int h, w, H, W, block, radius;
  Strides3 cs, rs;
};

template <typename In, typename Elem, int L, int kRowElems = 0>
void launch(const Args& a, int elem_bytes, cudaStream_t stream) {
  Layout lay;
  const int64_t bytes = layout_bytes(a.block, a.radius, L, elem_bytes, &lay);
  if (bytes > kBlockMatchSharedLimit) {
    throw std::invalid_argument("block_match: block = " + std::to_string(a.block) + ", radius = " +
                                std::to_string(a.radius) + " needs " + std::to_string(bytes) +
                                " bytes of shared memory for the search window, over the " +
                                std::to_string(kBlockMatchSharedLimit) + "-byte limit");
  }
  const int64_t groups = int64_t(2 * a.radius + 1) * lay.groups;
  const int threads = int(std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, (groups + 31) / 32 * 32)));
  const unsigned grid = unsigned(std::min<int64_t>(a.nblocks, INT_MAX));
  block_match_kernel<In, Elem, L, kRowElems><<<grid, threads, bytes, stream>>>(
      reinterpret_cast<const In*>(a.cur), reinterpret_cast<const In*>(a.ref), reinterpret_cast<int16_t*>(a.motion),
      reinterpret_cast<float*>(a.cost), a.nblocks, a.h, a.w, a.H, a.W, a.block, a.radius, a.cs, a.rs, lay);
  check_launch("vidtok block_match");
}

template <typename In>
void launch_float(const Args& a, cudaStream_t stream) {
  if (a.block == 16) return launch<In, float, 1, 16>(a, 4, stream);
  if (a.block == 8) return launch<In, float, 1, 8>(a, 4, stream);
  return launch<In, float, 1>(a, 4, stream);
}

void check_sizes(int64_t block, int64_t radius) {
  if (block < 1 || radius < 0 || radius > 32767) {
    throw std::invalid_argument("block_match: need block >= 1 and 0 <= radius <= 32767, got block = " +
                                std::to_string(block) + ", radius = " + std::to_string(radius));
  }
}

// The packed layout needs block % 4 == 0 and costs 4x the bytes of the byte layout (4 shifted copies
// of the window), so it is used when it fits and the byte layout otherwise.
bool use_packed(int64_t block, int64_t radius) {
  return block % 4 == 0 && layout_bytes(block, radius, 4, 4, nullptr) <= kBlockMatchSharedLimit;
}

}  // namespace

int64_t block_match_shared_bytes(int dtype, int64_t block, int64_t radius) {
  check_sizes(block, radius);
  switch (dtype) {
    case kUInt8:
      return use_packed(block, radius) ? layout_bytes(block, radius, 4, 4, nullptr)
                                       : layout_bytes(block, radius, 1, 1, nullptr);
    case kFloat32:
    case kFloat16:
    case kBFloat16:
      return layout_bytes(block, radius, 1, 4, nullptr);
    default:
      throw std::invalid_argument("block_match_shared_bytes: unsupported dtype code " + std::to_string(dtype));
  }
}

void block_match(int dtype, std::uintptr_t cur, std::uintptr_t ref, std::uintptr_t motion, std::uintptr_t cost,
                 int64_t B, int64_t H, int64_t W, int64_t block, int64_t radius, int64_t csb, int64_t csh,
                 int64_t csw, int64_t rsb, int64_t rsh, int64_t rsw, std::uintptr_t stream) {
  check_sizes(block, radius);
  if (B < 0 || H < 0 || W < 0 || H > INT_MAX || W > INT_MAX || H % block || W % block) {
    throw std::invalid_argument("block_match: need 0 <= H, W <= 2^31 - 1, multiples of block = " +
                                std::to_string(block) + ", got B = " + std::to_string(B) + ", H = " +
                                std::to_string(H) + ", W = " + std::to_string(W));
  }
  const int64_t h = H / block, w = W / block;
  const Args a{cur, ref, motion, cost, B * h * w, int(h), int(w), int(H), int(W), int(block), int(radius),
               Strides3{csb, csh, csw}, Strides3{rsb, rsh, rsw}};
  if (a.nblocks == 0) return;
  auto cs = reinterpret_cast<cudaStream_t>(stream);
  // blocks 16 and 8 (ViT patches, codec macroblocks) get a compile-time row length
  switch (dtype) {
    case kUInt8:
      if (use_packed(block, radius)) {
        if (block == 16) return launch<uint8_t, uint32_t, 4, 4>(a, 4, cs);
        if (block == 8) return launch<uint8_t, uint32_t, 4, 2>(a, 4, cs);
        return launch<uint8_t, uint32_t, 4>(a, 4, cs);
      }
      return launch<uint8_t, uint8_t, 1>(a, 1, cs);
    case kFloat32: return launch_float<float>(a, cs);
    case kFloat16: return launch_float<__half>(a, cs);
    case kBFloat16: return launch_float<__nv_bfloat16>(a, cs);
    default: throw std::invalid_argument("block_match: unsupported dtype code " + std::to_string(dtype));
  }
}

}  // namespace vidtok

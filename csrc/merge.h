// Host entry points of csrc/merge.cu. Pointers are device addresses; strides are in elements.
#pragma once
#include <cstdint>

namespace vidtok {

void paired_similarity_fwd(int dtype, std::uintptr_t x, std::uintptr_t out, int64_t B, int64_t T, int64_t N, int64_t C,
                           int64_t lag, int64_t sb, int64_t st, int64_t sn, int64_t sc, std::uintptr_t stream);

void paired_similarity_bwd(int dtype, std::uintptr_t x, std::uintptr_t grad_out, std::uintptr_t grad_x, int64_t B,
                           int64_t T, int64_t N, int64_t C, int64_t lag, int64_t sb, int64_t st, int64_t sn,
                           int64_t sc, std::uintptr_t stream);

}  // namespace vidtok

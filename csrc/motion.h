// Host entry points of csrc/motion.cu. Pointers are device addresses; strides are in elements.
#pragma once
#include <cstdint>

namespace vidtok {

// Dynamic shared memory one thread block of block_match may use: the 48 KiB every sm_80+ GPU grants
// without an opt-in (CUDA C++ Programming Guide, "Shared Memory"), less 1280 bytes for the static
// part: 64 bytes of reduction scratch plus the 1 KiB that the sm_90 cubin lists as static shared
// memory (cuobjdump --dump-resource-usage: SHARED 1088 on sm_90, 64 on sm_80). vidtok/motion.py
// mirrors this number and the layout in motion.cu.
constexpr int64_t kBlockMatchSharedLimit = 48 * 1024 - 1280;

// Dynamic shared memory block_match's launcher asks for with these arguments (the packed-uint8 layout
// when it fits, else the byte layout, for uint8; the fp32 layout for float types). May exceed
// kBlockMatchSharedLimit, in which case block_match throws.
int64_t block_match_shared_bytes(int dtype, int64_t block, int64_t radius);

// motion int16 [B, H/block, W/block, 2] (dy, dx) and cost fp32 [B, H/block, W/block], both
// contiguous, for cur, ref [B, H, W] of dtype code `dtype` (csrc/common.cuh) with any strides.
void block_match(int dtype, std::uintptr_t cur, std::uintptr_t ref, std::uintptr_t motion, std::uintptr_t cost,
                 int64_t B, int64_t H, int64_t W, int64_t block, int64_t radius, int64_t csb, int64_t csh,
                 int64_t csw, int64_t rsb, int64_t rsh, int64_t rsw, std::uintptr_t stream);

}  // namespace vidtok

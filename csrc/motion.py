"""Launchers of motion.cu: vidtok.block_match."""

from __future__ import annotations

import torch

from vidtok._numerics import dtype_name
from vidtok.csrc import DTYPE_CODES, module, stale_module_reasons, stream

# motion.cu stages each block's search window in shared memory, at most this much per thread block
# (motion.h kBlockMatchSharedLimit: the 48 KiB every sm_80+ GPU grants without an opt-in, less 1280
# bytes of static shared memory). Larger windows are left to Triton or the reference.
SHARED_LIMIT = 48 * 1024 - 1280
_SLOTS = 4  # motion.cu kSlots: candidates per thread group


def _layout_bytes(block: int, radius: int, lanes: int, elem_bytes: int) -> int:
    """motion.cu layout_bytes: ``lanes`` shifted copies of the window, the cur block, and (packed
    uint8) the raw staging rows, each rounded up to 16 bytes."""
    side, row_elems = block + 2 * radius, block // lanes
    count0 = 2 * radius // lanes + 1
    needed = -(-count0 // _SLOTS) * _SLOTS + row_elems - 1
    pitch = needed | 1 if elem_bytes == 4 else (((needed + 3) // 4) | 1) * 4
    copy_stride = side * pitch + (8 - side * pitch) % 32 if lanes == 4 else side * pitch  # copies 8 banks apart
    raw_pitch = pitch + 1 if lanes == 4 else 0

    def round16(v: int) -> int:
        return -(-v // 16) * 16

    return round16(lanes * copy_stride * elem_bytes) + round16(block * row_elems * elem_bytes) + round16(side * raw_pitch * 4)


def shared_bytes(dtype: torch.dtype, block: int, radius: int) -> int:
    """Shared memory the kernel needs per thread block (mirror of motion.cu block_match_shared_bytes):
    uint8 uses packed words (4 pixels per element, 4 shifted copies of the window) when block % 4 == 0
    and they fit, else one byte per pixel; float types use fp32."""
    if dtype == torch.uint8:
        if block % 4 == 0 and (packed := _layout_bytes(block, radius, 4, 4)) <= SHARED_LIMIT:
            return packed
        return _layout_bytes(block, radius, 1, 1)
    return _layout_bytes(block, radius, 1, 4)


def block_match_reasons(cur: torch.Tensor, ref: torch.Tensor, block: int, radius: int) -> list[str]:
    out = stale_module_reasons("block_match")
    need = shared_bytes(cur.dtype, block, radius)
    if need > SHARED_LIMIT:
        out.append(f"the CUDA kernel stages the (block + 2 radius)^2 search window in shared memory: block = {block}, "
                   f"radius = {radius} needs {need} bytes for {dtype_name(cur.dtype)} frames, over its "
                   f"{SHARED_LIMIT}-byte limit (use a smaller radius, or backend triton/reference)")
    return out


def block_match(cur: torch.Tensor, ref: torch.Tensor, block: int, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, W = cur.shape
    h, w = H // block, W // block
    motion = torch.empty((B, h, w, 2), device=cur.device, dtype=torch.int16)
    cost = torch.empty((B, h, w), device=cur.device, dtype=torch.float32)
    if cost.numel() > 0:
        with torch.cuda.device(cur.device):
            module().block_match(
                DTYPE_CODES[cur.dtype], cur.data_ptr(), ref.data_ptr(), motion.data_ptr(), cost.data_ptr(),
                B, H, W, block, radius, *cur.stride(), *ref.stride(), stream(cur),
            )
    return motion, cost

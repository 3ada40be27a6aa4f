"""Launchers of merge.cu: vidtok.paired_similarity's forward and backward."""

from __future__ import annotations

import torch

from vidtok.csrc import DTYPE_CODES, module, stale_module_reasons, stream


def paired_similarity_reasons(x: torch.Tensor, lag: int) -> list[str]:
    return stale_module_reasons("paired_similarity_fwd", "paired_similarity_bwd")


def paired_similarity(x: torch.Tensor, lag: int) -> torch.Tensor:
    B, T, N, C = x.shape
    out = torch.empty((B, T - lag, N), device=x.device, dtype=torch.float32)
    with torch.cuda.device(x.device):
        module().paired_similarity_fwd(
            DTYPE_CODES[x.dtype], x.data_ptr(), out.data_ptr(), B, T, N, C, lag, *x.stride(), stream(x)
        )
    return out


def paired_similarity_backward(grad: torch.Tensor, x: torch.Tensor, lag: int) -> torch.Tensor:
    B, T, N, C = x.shape
    grad = grad.to(torch.float32).contiguous()
    grad_x = torch.empty((B, T, N, C), device=x.device, dtype=x.dtype)
    with torch.cuda.device(x.device):
        module().paired_similarity_bwd(
            DTYPE_CODES[x.dtype], x.data_ptr(), grad.data_ptr(), grad_x.data_ptr(), B, T, N, C, lag, *x.stride(), stream(x)
        )
    return grad_x

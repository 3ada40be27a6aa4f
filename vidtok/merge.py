"""Temporal token merging: similarity of tokens across time and (in later issues) merging them.

Each op is a ``torch.library.custom_op`` in the ``vidtok`` namespace whose arguments include the
resolved backend name, so the choice made in Python is recorded in a traced graph and replayed as is.
The op bodies dispatch to ``vidtok.reference`` (any device), ``vidtok.kernels`` (Triton) or
``vidtok._C`` (CUDA C++).
"""

from __future__ import annotations

import torch

from vidtok import _backend
from vidtok import reference as ref
from vidtok._backend import FLOAT_DTYPES
from vidtok._validation import check_int, check_tensor
from vidtok.reference.merge import accumulation_dtype

__all__ = ["paired_similarity"]


# ---------------------------------------------------------------------------------------------------
# paired_similarity


def _paired_similarity_triton(x: torch.Tensor, lag: int) -> torch.Tensor:
    from vidtok.kernels import merge as kernels

    return kernels.paired_similarity_fwd(x, lag)


def _paired_similarity_backward_triton(grad: torch.Tensor, x: torch.Tensor, lag: int) -> torch.Tensor:
    from vidtok.kernels import merge as kernels

    return kernels.paired_similarity_bwd(grad, x, lag)


def _paired_similarity_cuda(x: torch.Tensor, lag: int) -> torch.Tensor:
    B, T, N, C = x.shape
    out = torch.empty((B, T - lag, N), device=x.device, dtype=torch.float32)
    with torch.cuda.device(x.device):
        _backend.cuda_module().paired_similarity_fwd(
            _backend.CUDA_DTYPE_CODES[x.dtype], x.data_ptr(), out.data_ptr(), B, T, N, C, lag, *x.stride(),
            _backend.cuda_stream(x),
        )
    return out


def _paired_similarity_backward_cuda(grad: torch.Tensor, x: torch.Tensor, lag: int) -> torch.Tensor:
    B, T, N, C = x.shape
    grad = grad.to(torch.float32).contiguous()
    grad_x = torch.empty((B, T, N, C), device=x.device, dtype=x.dtype)
    with torch.cuda.device(x.device):
        _backend.cuda_module().paired_similarity_bwd(
            _backend.CUDA_DTYPE_CODES[x.dtype], x.data_ptr(), grad.data_ptr(), grad_x.data_ptr(), B, T, N, C, lag,
            *x.stride(), _backend.cuda_stream(x),
        )
    return grad_x


_PAIRED_SIMILARITY = {
    "reference": ref.paired_similarity,
    "triton": _paired_similarity_triton,
    "cuda": _paired_similarity_cuda,
}
_PAIRED_SIMILARITY_BACKWARD = {
    "reference": ref.paired_similarity_backward,
    "triton": _paired_similarity_backward_triton,
    "cuda": _paired_similarity_backward_cuda,
}


@torch.library.custom_op("vidtok::paired_similarity", mutates_args=())
def _paired_similarity_op(x: torch.Tensor, lag: int, backend: str) -> torch.Tensor:
    return _PAIRED_SIMILARITY[backend](x, lag)


@_paired_similarity_op.register_fake
def _(x, lag, backend):
    B, T, N, _ = x.shape
    return x.new_empty((B, T - lag, N), dtype=accumulation_dtype(x.dtype))


@torch.library.custom_op("vidtok::paired_similarity_backward", mutates_args=())
def _paired_similarity_backward_op(grad: torch.Tensor, x: torch.Tensor, lag: int, backend: str) -> torch.Tensor:
    return _PAIRED_SIMILARITY_BACKWARD[backend](grad, x, lag)


@_paired_similarity_backward_op.register_fake
def _(grad, x, lag, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _paired_similarity_setup(ctx, inputs, output):
    x, lag, backend = inputs
    ctx.save_for_backward(x)
    ctx.lag = lag
    ctx.backend = backend


def _paired_similarity_grad(ctx, grad):
    (x,) = ctx.saved_tensors
    return _paired_similarity_backward_op(grad, x, ctx.lag, ctx.backend), None, None


_paired_similarity_op.register_autograd(_paired_similarity_grad, setup_context=_paired_similarity_setup)


def paired_similarity(x: torch.Tensor, lag: int = 1, *, backend: str | None = None) -> torch.Tensor:
    """Cosine similarity of every token with the same token ``lag`` frames earlier.

    Args:
        x: ``[B, T, N, C]`` tokens — B videos, T frames, N tokens per frame, C channels; float32,
            float16 or bfloat16, any strides (float64 runs on the reference backend, for gradcheck).
        lag: frames between the compared tokens, ``1 <= lag < T``.
        backend: "reference", "triton", "cuda" or "auto" (default: ``use_backend``/``VIDTOK_BACKEND``,
            else auto).

    Returns:
        float32 (float64 for float64 x) ``[B, T - lag, N]``: ``out[b, t, n] = cos(x[b, t + lag, n], x[b, t, n])`` computed as
        ``F.cosine_similarity``: dot / (max(|a|, 1e-8) * max(|b|, 1e-8)), accumulated in fp32. A zero
        token gives 0, not NaN; a NaN in a token gives NaN for the pairs it is in. Differentiable in x.

    This is the signal FrameFusion (Fu et al. 2024), DyCoke (Tao et al. 2025), PruneVid and vLLM's
    EVS threshold to find tokens that did not change between frames. One read of x; no host sync.
    """
    check_tensor("x", x, rank=4, layout="[B, T, N, C]", dtypes=FLOAT_DTYPES + (torch.float64,))
    T = x.shape[1]
    if T < 2:
        raise ValueError(f"x must have at least 2 frames to compare (x.shape[1] = T), got shape {tuple(x.shape)}")
    check_int("lag", lag, low=1, high=T - 1, why=f" for x with T = {T} frames")
    chosen = _backend.select("paired_similarity", x.device, x.dtype, backend)
    return _paired_similarity_op(x, lag, chosen)

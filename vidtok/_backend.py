"""Which implementation of an op runs, and why the others cannot.

Three backends implement every op: ``reference`` (pure PyTorch: the spec, the oracle of the tests and
the CPU path), ``triton`` (kernels/, installed as vidtok.kernels) and ``cuda`` (csrc/, the optional
pybind11 module vidtok._C). Every backend explains itself: ``reasons(backend, device, dtype)`` returns
the list of reasons it cannot run on such tensors (empty when it can), in the spirit of xformers'
``not_supported_reasons``.

The backend is chosen, in this order, by the op's ``backend=`` argument, the innermost
``use_backend(...)`` context, the ``VIDTOK_BACKEND`` environment variable, and otherwise "auto":
the first backend of the op's measured preference list for the device type that can run. A forced
backend that cannot run raises ``BackendUnavailableError`` listing every reason.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Iterator, Sequence

import torch

BACKENDS = ("reference", "triton", "cuda")

# dtype codes understood by csrc/common.cuh (enum DType).
CUDA_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.uint8: 3}  # uint8: block_match only
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# "auto" order per op and device type. No GPU measurement exists yet (issue 8): on CUDA the
# ahead-of-time compiled C++ kernel comes first because it has no JIT warm-up; update from
# bench/results/ once an H100 run is recorded. On CPU only the reference is auto-selected: the
# Triton interpreter is a correctness tool (~4 ms per program), never a fast path.
AUTO_ORDER: dict[str, dict[str, tuple[str, ...]]] = {
    "paired_similarity": {"cuda": ("cuda", "triton", "reference"), "cpu": ("reference",)},
    "match": {"cuda": ("triton", "reference"), "cpu": ("reference",)},
    "bipartite_merge": {"cuda": ("triton", "reference"), "cpu": ("reference",)},
    "temporal_merge": {"cuda": ("triton", "reference"), "cpu": ("reference",)},
    "frame_scores": {"cuda": ("triton", "reference"), "cpu": ("reference",)},
    "greedy_select": {"cuda": ("cuda", "reference"), "cpu": ("reference",)},  # persistent kernel; not yet measured on a GPU
    "dpp_select": {"cuda": ("cuda", "reference"), "cpu": ("reference",)},  # persistent kernel; not yet measured on a GPU
    "scene_boundaries": {"cuda": ("reference",), "cpu": ("reference",)},
    "sparse_attention": {"cuda": ("triton", "reference"), "cpu": ("reference",)},  # no CUDA C++ kernel
    "patch_delta": {"cuda": ("triton", "reference"), "cpu": ("reference",)},  # no CUDA C++ kernel
    "motion_gate": {"cuda": ("triton", "reference"), "cpu": ("reference",)},  # no CUDA C++ kernel
    "block_match": {"cuda": ("cuda", "triton", "reference"), "cpu": ("reference",)},  # not yet measured on a GPU
}
DEFAULT_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("reference",)}


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run on the given tensors; the message lists every reason."""


_forced: list[str] = []


def _check_name(name: str, what: str) -> str:
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"{what} must be one of {BACKENDS + ('auto',)}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend ("reference", "triton", "cuda" or "auto") for every vidtok op in the block."""
    _forced.append(_check_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _forced.pop()


def requested_backend(explicit: str | None = None) -> str:
    """The backend asked for: the op argument, else use_backend, else VIDTOK_BACKEND, else "auto"."""
    if explicit is not None:
        return _check_name(explicit, "backend")
    if _forced:
        return _forced[-1]
    return _check_name(os.environ.get("VIDTOK_BACKEND", "auto").strip().lower() or "auto", "VIDTOK_BACKEND")


# ---------------------------------------------------------------------------------------------------
# Availability of the optional parts, probed once.


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # any failure means the backend cannot run; say why
        return f"triton cannot be imported ({type(exc).__name__}: {exc}); pip install triton"
    return None


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1 at import time)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=None)
def _load_cuda_module():
    try:
        from vidtok import _C
    except ImportError as exc:
        return None, (
            f"vidtok._C is not built ({exc}); reinstall with nvcc and cmake on PATH "
            "(VIDTOK_BUILD_CUDA=1 pip install -e .)"
        )
    return _C, None


def cuda_module():
    """The compiled module vidtok._C; raises BackendUnavailableError if it is missing."""
    module, error = _load_cuda_module()
    if module is None:
        raise BackendUnavailableError(error)
    return module


def cuda_module_error() -> str | None:
    return _load_cuda_module()[1]


# ---------------------------------------------------------------------------------------------------
# Reasons a backend cannot run.


def reasons(backend: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Why ``backend`` cannot run on tensors of this device and dtype (empty list: it can)."""
    out: list[str] = []
    if backend == "reference":
        return out
    if backend in ("triton", "cuda") and dtype not in FLOAT_DTYPES:
        out.append(f"the {backend} kernels take float32, float16 or bfloat16, got {dtype}")
    if backend == "triton":
        if (err := triton_import_error()) is not None:
            out.append(err)
        if device.type == "cuda":
            if triton_interpreting():
                out.append("TRITON_INTERPRET=1 is set, so Triton cannot run on CUDA tensors")
            elif torch.cuda.get_device_capability(device) < (8, 0):
                out.append(f"Triton kernels need compute capability >= 8.0, got {torch.cuda.get_device_capability(device)}")
        elif device.type == "cpu":
            if not triton_interpreting():
                out.append("tensors are on the CPU and TRITON_INTERPRET=1 is not set")
            elif dtype == torch.bfloat16:
                out.append("the Triton interpreter computes bfloat16 wrongly; use float32 or float16 on the CPU")
        else:
            out.append(f"Triton kernels run on cuda tensors (or CPU under TRITON_INTERPRET=1), got {device.type}")
        return out
    if backend == "cuda":
        if (err := cuda_module_error()) is not None:
            out.append(err)
        if device.type != "cuda":
            out.append(f"the CUDA C++ kernels need cuda tensors, got {device.type}")
        elif torch.cuda.get_device_capability(device) < (8, 0):
            out.append(f"vidtok._C is built for sm_80 and sm_90, got {torch.cuda.get_device_capability(device)}")
        return out
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def auto_order(op: str, device: torch.device) -> Sequence[str]:
    table = AUTO_ORDER.get(op, DEFAULT_AUTO_ORDER)
    return table.get(device.type, ("reference",))


def select(
    op: str,
    device: torch.device,
    dtype: torch.dtype,
    backend: str | None = None,
    op_reasons: Callable[[str], list[str]] | None = None,
) -> str:
    """Resolve the backend that runs ``op`` on (device, dtype).

    ``op_reasons(backend)`` adds op-specific reasons (a head dimension a kernel lacks, say).
    """
    wanted = requested_backend(backend)

    def why(name: str) -> list[str]:
        return reasons(name, device, dtype) + (op_reasons(name) if op_reasons else [])

    if wanted != "auto":
        problems = why(wanted)
        if problems:
            raise BackendUnavailableError(
                f"vidtok.{op}: backend {wanted!r} cannot run on {device.type} {dtype} tensors: " + "; ".join(problems)
            )
        return wanted
    for name in auto_order(op, device):
        if not why(name):
            return name
    every = "; ".join(f"{name}: {', '.join(why(name))}" for name in BACKENDS)
    raise BackendUnavailableError(f"vidtok.{op}: no backend can run on {device.type} {dtype} tensors ({every})")


def cuda_stream(t: torch.Tensor) -> int:
    """The raw current stream of t's device, read on every call so stream contexts and graphs work."""
    return torch.cuda.current_stream(t.device).cuda_stream

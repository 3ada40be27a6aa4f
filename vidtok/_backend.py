"""Which implementation of an op runs, and why the others cannot: every op declared once, in ``OPS``.

A backend is a layer of vidtok, with one module per hot path (merge, motion, select, sparse):

    reference  vidtok.reference.<path>  pure PyTorch, written to be read: the spec, the tests' oracle
    triton     vidtok.kernels.<path>    Triton kernels and their launchers (kernels/ in the source tree)
    cuda       vidtok.csrc.<path>       launchers of the CUDA C++ kernels in vidtok._C (csrc/)
    cpu        vidtok.cpu.<path>        PyTorch tuned for CPUs (ATen's fused kernels, a cost model)

An op's record (``OpRecord``) names its hot path, its entry points (functions that every backend
module of the op defines, with one signature), the backends that implement it and the order in
which "auto" tries them on each device type. A backend missing from a record *is* "no kernel":
dispatch, ``python -m vidtok info``, ``vidtok.testing`` and the README's table all read the records.
Adding a backend to an op is one line here plus the module with the entry points.

Why a backend cannot run comes from three places, in the spirit of xformers' ``not_supported_reasons``:
the backend itself (``backend_reasons``: triton importable, the device, vidtok._C built), the record
(the op lacks the backend; the input dtype), and the backend's module, which may define
``<op>_reasons(*args)`` for what its kernels cannot take (a head dimension, a tile that does not fit
shared memory), called with the arguments of the op's first entry point.

The backend is chosen, in this order, by the op's ``backend=`` argument, the innermost
``use_backend(...)`` block, the ``VIDTOK_BACKEND`` environment variable, and otherwise "auto": the
first backend of the record's order for the device type that can run. A forced backend that cannot
run raises ``BackendUnavailableError`` with every reason.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from vidtok._numerics import FLOAT_DTYPES, REFERENCE_DTYPES, dtype_name

LAYERS = {
    "reference": "vidtok.reference",
    "triton": "vidtok.kernels",
    "cuda": "vidtok.csrc",
    "cpu": "vidtok.cpu",
}
BACKENDS = tuple(LAYERS)
TITLES = {"reference": "reference", "triton": "Triton", "cuda": "CUDA C++", "cpu": "CPU-tuned"}  # in tables
VIDEO_DTYPES = (torch.uint8,) + FLOAT_DTYPES


@dataclass(frozen=True)
class OpRecord:
    """One op: where its implementations live and which runs where.

    name: the public op (``vidtok.<name>``). path: its hot path, the module name in every layer.
    entries: the functions each backend module defines for it (forward first; backward, steps).
    backends: the backends that implement it. auto: device type -> the backends "auto" tries, in
    order (every other device type gets the reference). dtypes: the input dtypes the op takes;
    float64 only on the reference and cpu backends (the kernels compute in float32).
    """

    name: str
    path: str
    entries: tuple[str, ...]
    backends: tuple[str, ...]
    auto: dict
    dtypes: tuple = REFERENCE_DTYPES

    def module(self, backend: str) -> str:
        return f"{LAYERS[backend]}.{self.path}"

    def dtypes_of(self, backend: str) -> tuple:
        if backend in ("triton", "cuda"):
            return tuple(d for d in self.dtypes if d != torch.float64)
        return self.dtypes


# "auto" on CUDA puts an ahead-of-time compiled CUDA C++ kernel first (no JIT warm-up) until a GPU
# measurement says otherwise (bench/results/). On CPUs the Triton interpreter is a correctness tool
# (~4 ms per program), never a fast path.
_GPU_CUDA_FIRST = {"cuda": ("cuda", "triton", "reference"), "cpu": ("reference",)}
_GPU_TRITON = {"cuda": ("triton", "reference"), "cpu": ("reference",)}
_GPU_CUDA = {"cuda": ("cuda", "reference"), "cpu": ("reference",)}

OPS: dict[str, OpRecord] = {
    record.name: record
    for record in (
        OpRecord("paired_similarity", "merge", ("paired_similarity", "paired_similarity_backward"),
                 ("reference", "triton", "cuda"), _GPU_CUDA_FIRST),
        OpRecord("match", "merge", ("match",), ("reference", "triton"), _GPU_TRITON),
        OpRecord("bipartite_merge", "merge", ("bipartite_assignment", "merge_tokens"), ("reference", "triton"), _GPU_TRITON),
        OpRecord("temporal_merge", "merge", ("temporal_assignment", "merge_tokens"), ("reference", "triton"), _GPU_TRITON),
        OpRecord("merge_by_assignment", "merge", ("merge_tokens",), ("reference", "triton"), _GPU_TRITON),
        # the clustering runs in PyTorch everywhere; the merge step dispatches through merge_by_assignment
        OpRecord("connected_components_merge", "merge", ("components_assignment",), ("reference",), {}),
        OpRecord("dpc_knn_merge", "merge", ("dpc_knn_assignment",), ("reference",), {}),
        OpRecord("patch_delta", "motion", ("patch_delta",), ("reference", "triton"), _GPU_TRITON, VIDEO_DTYPES),
        OpRecord("motion_gate", "motion", ("motion_gate", "motion_gate_compensated"), ("reference", "triton"),
                 _GPU_TRITON, VIDEO_DTYPES),
        OpRecord("block_match", "motion", ("block_match",), ("reference", "triton", "cuda"), _GPU_CUDA_FIRST, VIDEO_DTYPES),
        OpRecord("frame_scores", "select", ("frame_scores",), ("reference", "triton"), _GPU_TRITON),
        OpRecord("greedy_select", "select", ("greedy_select",), ("reference", "cuda"), _GPU_CUDA),
        OpRecord("dpp_select", "select", ("dpp_select",), ("reference", "cuda"), _GPU_CUDA),
        OpRecord("scene_boundaries", "select", ("scene_boundaries",), ("reference",), {}),
        OpRecord("allocate_budget", "select", ("allocate_budget",), ("reference",), {}),
        OpRecord("topk_per_frame", "select", ("topk_per_frame",), ("reference", "triton", "cpu"),
                 {"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")}),
        OpRecord("sparse_attention", "sparse", ("sparse_attention", "sparse_attention_backward"),
                 ("reference", "triton", "cpu"), {"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")}),
        OpRecord("attention_received", "sparse", ("attention_received",), ("reference", "triton"), _GPU_TRITON),
    )
}


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run on the given tensors; the message lists every reason."""


_forced: list[str] = []


def _check_name(name: str, what: str) -> str:
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"{what} must be one of {BACKENDS + ('auto',)}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend ("reference", "triton", "cuda", "cpu" or "auto") for every vidtok op in the block."""
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
# What each backend needs, whatever the op.


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
def cuda_module_error() -> str | None:
    """Why vidtok._C cannot be imported (None: it can)."""
    try:
        importlib.import_module("vidtok._C")
    except ImportError as exc:
        return (f"vidtok._C is not built ({exc}); reinstall with nvcc and cmake on PATH "
                "(VIDTOK_BUILD_CUDA=1 pip install -e .)")
    return None


def _capability_reason(device: torch.device, what: str) -> list[str]:
    capability = torch.cuda.get_device_capability(device)
    return [f"{what} need compute capability >= 8.0 (sm_80), got sm_{capability[0]}{capability[1]}"] if capability < (8, 0) else []


def backend_reasons(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> list[str]:
    """Why ``backend`` cannot run on tensors of this device (and dtype) for any op; [] when it can."""
    if backend == "reference":
        return []
    if backend == "triton":
        out = [err] if (err := triton_import_error()) is not None else []
        if device.type == "cuda":
            if triton_interpreting():
                out.append("TRITON_INTERPRET=1 is set, so Triton cannot run on CUDA tensors")
            else:
                out += _capability_reason(device, "Triton kernels")
        elif device.type == "cpu":
            if not triton_interpreting():
                out.append("tensors are on the CPU and TRITON_INTERPRET=1 is not set")
            elif dtype == torch.bfloat16:
                out.append("the Triton interpreter computes bfloat16 wrongly; use float32 or float16 on the CPU")
        else:
            out.append(f"Triton kernels run on cuda tensors (or CPU under TRITON_INTERPRET=1), got {device.type}")
        return out
    if backend == "cuda":
        out = [err] if (err := cuda_module_error()) is not None else []
        if device.type != "cuda":
            out.append(f"the CUDA C++ kernels need cuda tensors, got {device.type}")
        else:
            out += _capability_reason(device, "the CUDA C++ kernels (built for sm_80 and sm_90)")
        return out
    if backend == "cpu":
        return [] if device.type == "cpu" else [f"the cpu backend runs on CPU tensors, got {device.type}"]
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


# ---------------------------------------------------------------------------------------------------
# What each op's backends can take.


def record(op: str) -> OpRecord:
    try:
        return OPS[op]
    except KeyError:
        raise ValueError(f"vidtok has no op {op!r}; its ops are {sorted(OPS)}") from None


def reasons(op: str, backend: str, device: torch.device, dtype: torch.dtype, args: tuple | None = None) -> list[str]:
    """Why ``backend`` cannot run ``op`` on tensors of this device and dtype ([] when it can); with
    ``args`` (the arguments of the op's first entry point) also what its kernels cannot take, so that
    a forced backend's error lists every reason."""
    rec = record(op)
    if backend not in rec.backends:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        gpu_path = [name for name in rec.auto.get("cuda", ()) if name != "reference"]
        where = f"its GPU path is {gpu_path[0]}" if gpu_path else "its reference runs on every device"
        return [f"vidtok.{op} has no {backend} kernel ({where})"]
    out = backend_reasons(backend, device, dtype)
    if dtype not in rec.dtypes_of(backend):
        out.append(f"the {backend} backend of vidtok.{op} takes {', '.join(map(dtype_name, rec.dtypes_of(backend)))}, "
                   f"got {dtype_name(dtype)}")
    if args is not None and not (backend == "triton" and triton_import_error() is not None):
        check = getattr(_module(rec.module(backend)), f"{op}_reasons", None)
        if check is not None:
            out += check(*args)
    return out


def auto_order(op: str, device: torch.device) -> tuple[str, ...]:
    return record(op).auto.get(device.type, ("reference",))


def choose(op: str, device: torch.device, dtype: torch.dtype, backend: str | None = None, args: tuple | None = None) -> str:
    """The backend that runs ``op`` on (device, dtype); ``args`` as for ``reasons``."""
    wanted = requested_backend(backend)
    if wanted != "auto":
        problems = reasons(op, wanted, device, dtype, args)
        if problems:
            raise BackendUnavailableError(
                f"vidtok.{op}: backend {wanted!r} cannot run on {device.type} {dtype} tensors: " + "; ".join(problems)
            )
        return wanted
    for name in auto_order(op, device):
        if not reasons(op, name, device, dtype, args):
            return name
    every = "; ".join(f"{name}: {', '.join(reasons(op, name, device, dtype, args))}" for name in BACKENDS)
    raise BackendUnavailableError(f"vidtok.{op}: no backend can run on {device.type} {dtype} tensors ({every})")


def implementation(op: str, backend: str, entry: str | None = None) -> Callable:
    """The function ``entry`` (default: the op's first entry point) of ``backend``'s module for ``op``."""
    rec = record(op)
    entry = rec.entries[0] if entry is None else entry
    if backend not in rec.backends or entry not in rec.entries:
        raise ValueError(f"vidtok.{op} declares no {backend} implementation of {entry!r}")
    return getattr(_module(rec.module(backend)), entry)


def _module(name: str):
    """A backend module: from sys.modules when ``load_backends`` imported it (a dict look-up, which
    torch.compile traces; it cannot trace an import), else imported now."""
    module = sys.modules.get(name)
    return module if module is not None else importlib.import_module(name)


def load_backends() -> None:
    """Import the module of every backend that can run here (``import vidtok`` does), so that choosing
    a backend under torch.compile never imports: the reference and cpu layers always, the CUDA C++
    launchers (which load vidtok._C only when called), and the Triton kernels when triton imports and
    a CUDA device or the interpreter can run them."""
    layers = ["reference", "cpu", "cuda"]
    if (triton_interpreting() or torch.cuda.is_available()) and triton_import_error() is None:
        layers.append("triton")
    for record in OPS.values():
        for backend in record.backends:
            if backend in layers:
                importlib.import_module(record.module(backend))

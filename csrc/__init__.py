"""vidtok's CUDA C++ backend, installed as ``vidtok.csrc``: launchers that take tensors and call the
kernels of the pybind11 module ``vidtok._C`` (built from the .cu files beside this one).

``vidtok._C`` includes no torch header: it takes raw pointers, sizes, strides in elements, a dtype code
and the current CUDA stream, so one build serves every torch version. These launchers are the only
code that talks to it. Importing this package imports neither vidtok._C nor any kernel.
"""

from __future__ import annotations

import torch

# dtype codes of csrc/common.cuh (enum DType); uint8 is block_match's only.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.uint8: 3}


def module():
    """The compiled module vidtok._C (the backend's reasons say why when it is missing)."""
    from vidtok import _C

    return _C


def stream(t: torch.Tensor) -> int:
    """The raw current stream of t's device, read on every call so stream contexts and graphs work."""
    return torch.cuda.current_stream(t.device).cuda_stream


def stale_module_reasons(*symbols: str) -> list[str]:
    """A vidtok._C built before a kernel existed lacks its symbol: say so (then "auto" falls back)."""
    try:
        built = module()
    except ImportError:
        return []  # the backend's own reasons already say it is not built
    missing = [name for name in symbols if not hasattr(built, name)]
    if missing:
        return [f"vidtok._C was built without {', '.join(missing)}; rebuild it (VIDTOK_BUILD_CUDA=1 pip install -e .)"]
    return []

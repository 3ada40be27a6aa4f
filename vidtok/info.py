"""``python -m vidtok info``: versions, devices, and which backends can run here and why the others cannot."""

from __future__ import annotations

import os
import platform

import torch

from vidtok import _backend

# Every public op and the dtype its availability is reported for.
OPS = ("paired_similarity", "match", "bipartite_merge", "temporal_merge", "sparse_attention", "frame_scores", "greedy_select", "dpp_select", "scene_boundaries", "patch_delta", "motion_gate", "block_match",)


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "not installed"


def report() -> str:
    import vidtok

    lines = [
        f"vidtok {vidtok.__version__} ({os.path.dirname(vidtok.__file__)})",
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"triton {_version('triton')}, numpy {_version('numpy')}",
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, "
        f"VIDTOK_BACKEND={os.environ.get('VIDTOK_BACKEND', 'auto')}",
    ]
    module, error = _backend._load_cuda_module()
    if module is None:
        lines.append(f"vidtok._C: {error}")
    else:
        runtime = module.cuda_runtime_version
        lines.append(
            f"vidtok._C: {module.__file__} (sm {module.cuda_archs}, CUDA runtime "
            f"{runtime // 1000}.{runtime % 1000 // 10}, static; sees {module.device_count()} device(s))"
        )
    from vidtok import sparse

    dtype_limits = {"sparse_attention": sparse.dtype_reasons}
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            lines.append(f"cuda:{i}: {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
            devices.append(torch.device("cuda", i))
    else:
        lines.append("cuda: no device visible to torch")
    for device in devices:
        for dtype in (torch.float32, torch.bfloat16):
            lines.append(f"backends on {device} {str(dtype).replace('torch.', '')}:")
            for name in _backend.BACKENDS:
                why = _backend.reasons(name, device, dtype)
                lines.append(f"  {name:<10} {'can run' if not why else 'cannot run: ' + '; '.join(why)}")
            for op in OPS:
                # the dtype limits an op adds to the generic checks (argument limits, such as head
                # dimensions or patch sizes, are in each op's docstring and its error messages)
                limits = dtype_limits.get(op)
                op_reasons = (lambda name, limits=limits: limits(name, device, dtype)) if limits else None
                try:
                    chosen = _backend.select(op, device, dtype, None, op_reasons)
                except _backend.BackendUnavailableError as exc:
                    chosen = f"none ({exc})"
                lines.append(f"  auto -> {op}: {chosen}")
    return "\n".join(lines)

"""``python -m vidtok info``: versions, devices, and which backends can run here and why the others
cannot, read from the op records in ``vidtok._backend``."""

from __future__ import annotations

import os
import platform

import torch

from vidtok import _backend

def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "not installed"


def ops_table() -> str:
    """A Markdown table of every op and the backends it has (what the README shows)."""
    names = _backend.BACKENDS
    lines = ["| op | " + " | ".join(_backend.TITLES[b] for b in names) + " |", "|---|" + "---|" * len(names)]
    for op, record in _backend.OPS.items():
        lines.append(f"| `{op}` | " + " | ".join("yes" if b in record.backends else "–" for b in names) + " |")
    return "\n".join(lines)


def report() -> str:
    import vidtok

    lines = [
        f"vidtok {vidtok.__version__} ({os.path.dirname(vidtok.__file__)})",
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"triton {_version('triton')}, numpy {_version('numpy')}",
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, "
        f"VIDTOK_BACKEND={os.environ.get('VIDTOK_BACKEND', 'auto')}",
    ]
    error = _backend.cuda_module_error()
    if error is not None:
        lines.append(f"vidtok._C: {error}")
    else:
        from vidtok import _C

        runtime = _C.cuda_runtime_version
        lines.append(
            f"vidtok._C: {_C.__file__} (sm {_C.cuda_archs}, CUDA runtime "
            f"{runtime // 1000}.{runtime % 1000 // 10}, static; sees {_C.device_count()} device(s))"
        )
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            lines.append(f"cuda:{i}: {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
            devices.append(torch.device("cuda", i))
    else:
        lines.append("cuda: no device visible to torch")
    lines.append("ops and their backends:")
    lines += ["  " + line for line in ops_table().splitlines()]
    for device in devices:
        for dtype in (torch.float32, torch.bfloat16):
            lines.append(f"backends on {device} {str(dtype).replace('torch.', '')}:")
            for name in _backend.BACKENDS:
                why = _backend.backend_reasons(name, device, dtype)
                lines.append(f"  {name:<10} {'can run' if not why else 'cannot run: ' + '; '.join(why)}")
            for op in _backend.OPS:
                # argument limits (head dimensions, patch sizes) are in each op's docstring and errors
                try:
                    chosen = _backend.choose(op, device, dtype, None)
                except _backend.BackendUnavailableError as exc:
                    chosen = f"none ({exc})"
                lines.append(f"  auto -> {op}: {chosen}")
    return "\n".join(lines)

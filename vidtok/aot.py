"""Compile every Triton kernel configuration for sm_80 and sm_90 without a GPU and read its resources.

``python -m vidtok aot`` prints the table (registers, spilled local memory, shared memory) for every
``AOT_CASES`` entry of vidtok.kernels, plus the kernels inside vidtok._C, read from the cubins with the
cuobjdump shipped in the triton wheel. tests/test_aot.py fails on spills or on shared memory over the
SM's limit. Must run with TRITON_INTERPRET unset: the interpreter flag reroutes code generation.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

# compute capability -> most shared memory one block may use (bytes)
ARCHS = {80: 163 * 1024, 90: 227 * 1024}
MAX_REGISTERS = 255


@dataclass
class Resources:
    kernel: str
    arch: str
    num_warps: int | None
    registers: int
    local_bytes: int
    shared_bytes: int


def aot_cases():
    import vidtok.kernels

    for info in pkgutil.iter_modules(vidtok.kernels.__path__):
        module = importlib.import_module(f"vidtok.kernels.{info.name}")
        yield from getattr(module, "AOT_CASES", [])


def cuobjdump() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def resource_usage(binary: Path) -> dict[str, dict[str, int]]:
    """{function: {"REG": .., "SHARED": .., "LOCAL": .., "STACK": ..}} from cuobjdump --dump-resource-usage."""
    text = subprocess.run(
        [str(cuobjdump()), "--dump-resource-usage", str(binary)], capture_output=True, text=True, check=True
    ).stdout
    usage, function = {}, None
    for line in text.splitlines():
        if m := re.match(r"\s*Function (\S+):", line):
            function = m.group(1)
        elif function and "REG:" in line:
            usage[function] = {k: int(v) for k, v in re.findall(r"(REG|SHARED|LOCAL|STACK):(\d+)", line)}
    return usage


def compile_case(case, arch: int) -> Resources:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(case.kernel, signature=case.signature, constexprs=case.constexprs)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": case.num_warps, "num_stages": case.num_stages}
    )
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        (usage,) = resource_usage(cubin).values()
    return Resources(
        case.name, f"sm_{arch}", case.num_warps, usage["REG"], usage["LOCAL"],
        max(usage.get("SHARED", 0), compiled.metadata.shared),
    )


def _demangle(name: str) -> str:
    try:
        return subprocess.run(["c++filt", name], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return name


def cuda_module_resources() -> list[Resources]:
    """The kernels inside vidtok._C (empty when the module is not built)."""
    try:
        from vidtok import _C
    except ImportError:
        return []
    return [
        Resources(_demangle(fn), f"sm_{_C.cuda_archs}", None, u["REG"], u["LOCAL"], u.get("SHARED", 0))
        for fn, u in sorted(resource_usage(Path(_C.__file__)).items())
    ]


def all_resources() -> list[Resources]:
    return [compile_case(case, arch) for case in aot_cases() for arch in ARCHS] + cuda_module_resources()


def markdown(rows: list[Resources]) -> str:
    lines = ["| kernel | arch | warps | registers | spilled (local) bytes | shared bytes |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {r.kernel} | {r.arch} | {r.num_warps or '-'} | {r.registers} | {r.local_bytes} | {r.shared_bytes} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def main(report: str | None = None, as_json: bool = False) -> str:
    import json

    rows = all_resources()
    text = json.dumps([asdict(r) for r in rows]) if as_json else markdown(rows)
    if report:
        Path(report).write_text(text)
    return text

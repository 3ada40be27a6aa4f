"""Compile every Triton kernel as its launcher really launches it, for sm_80 and sm_90, without a GPU.

``python -m vidtok aot`` runs every ``AOT_CASES`` entry of vidtok.kernels (a launcher called on meta
tensors of a realistic input), catches each Triton launch instead of running it, and compiles that
launch the way Triton's launcher would: the same constexprs and num_warps, and Triton's own
specialisation of the argument values (16-byte aligned pointers and integers divisible by 16 get
``tt.divisibility = 16``, integers equal to 1 become constants). It prints one row per kernel and
architecture: registers, stack bytes (spilled registers: ptxas puts spills in the stack frame, and
cuobjdump's LOCAL column stays 0), shared memory, whether the loops issue tensor-core MMAs (wgmma on
sm_90, mma.sync) and asynchronous copies (cp.async, cp.async.bulk, TMA) in the PTX, the matching SASS
instructions on sm_90, and why the kernel does not fit the SM (``problems``). The kernels inside
vidtok._C follow, read from its cubins. cuobjdump comes with the triton wheel. tests/test_aot.py
fails on a kernel over a limit unless it lists it as known. Must run with TRITON_INTERPRET unset: the
interpreter flag reroutes code generation.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

# compute capability -> most shared memory one block may use (bytes)
ARCHS = {80: 163 * 1024, 90: 227 * 1024}
MAX_REGISTERS = 255

# PTX instruction (prefix) -> what the table calls it, for the instructions inside loops
PTX_MMA = {"wgmma.mma_async": "wgmma", "mma.sync": "mma.sync"}
PTX_COPIES = {"cp.async.bulk.tensor": "TMA", "cp.async.bulk": "cp.async.bulk", "cp.async.": "cp.async"}
# SASS opcode (prefix) -> name: warpgroup MMA, warp MMA, async global->shared copy, TMA, bulk copy
SASS_OPS = {"HGMMA": "HGMMA", "HMMA": "HMMA", "LDGSTS": "LDGSTS", "UTMALDG": "UTMALDG", "UBLKCP": "UBLKCP"}


@dataclass
class Resources:
    case: str
    kernel: str
    arch: str
    num_warps: int | None
    registers: int
    stack_bytes: int
    local_bytes: int
    shared_bytes: int
    num_stages: int | None = None
    hints: str = "-"  # arguments specialised: divisible by 16 / constant 1
    loop_mma: list[str] = field(default_factory=list)
    loop_copies: list[str] = field(default_factory=list)
    sass: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def aot_cases():
    import vidtok.kernels

    for info in pkgutil.iter_modules(vidtok.kernels.__path__):
        module = importlib.import_module(f"vidtok.kernels.{info.name}")
        yield from getattr(module, "AOT_CASES", [])


@contextlib.contextmanager
def _catching_launches(launches: list):
    """Inside: ``kernel[grid](*args, **kwargs)`` appends (kernel, args, kwargs) and runs nothing."""
    from triton.runtime.jit import JITFunction

    run = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = record
    try:
        yield
    finally:
        JITFunction.run = run


def launches(case) -> list[tuple]:
    """(kernel, args, kwargs) of every Triton launch of ``case.launch()``, in order."""
    caught: list = []
    with _catching_launches(caught):
        case.launch()
    if not caught:
        raise RuntimeError(f"AOT case {case.name} launched no Triton kernel")
    return caught


def _specialise(kernel, args, kwargs, backend):
    """(signature, constexprs, attrs, options) exactly as triton.runtime.jit's launch builds them."""
    try:
        from triton.runtime.jit import create_function_from_signature

        pack_args = kernel._pack_args
    except (ImportError, AttributeError) as exc:
        import triton

        raise RuntimeError(f"vidtok.aot specialises like triton.runtime.jit's launch (create_function_from_signature, "
                           f"JITFunction._pack_args; written against triton 3.8); triton {triton.__version__} "
                           f"lays it out differently: {exc}") from exc
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


def _hints(kernel, signature: dict, constexprs: dict, attrs: dict) -> str:
    """"d16 N / one M": N arguments marked divisible by 16, M integer arguments made the constant 1."""
    divisible = sum(1 for v in attrs.values() if ["tt.divisibility", 16] in v)
    ones = sum(1 for (i,), v in constexprs.items()
               if not kernel.params[i].is_constexpr and v == 1 and not isinstance(v, bool))
    return f"d16 {divisible} / one {ones}"


def loop_instructions(ptx: str, kinds: dict[str, str]) -> list[str]:
    """Names (values of ``kinds``) of the PTX instructions that lie inside a loop: between a label and
    a later branch back to it."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"\s*(\$L__\w+):", line))}
    spans = []
    for j, line in enumerate(lines):
        if (m := re.search(r"\bbra(?:\.uni)?\s+(\$L__\w+);", line)) and labels.get(m.group(1), j) < j:
            spans.append((labels[m.group(1)], j))
    found = []
    for i, j in spans:
        for line in lines[i:j]:
            op = line.strip()
            for prefix, name in kinds.items():
                if op.startswith(prefix) or re.match(rf"@%p\d+\s+{re.escape(prefix)}", op):
                    if name not in found:
                        found.append(name)
                    break
    return sorted(found)


def cuobjdump() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def resource_usage(binary: Path) -> dict[tuple[str | None, str], dict[str, int]]:
    """{(arch, function): {"REG": .., "SHARED": .., "LOCAL": .., "STACK": ..}} from cuobjdump
    --dump-resource-usage; arch ("sm_90") from a fat binary's headers, None for a lone cubin."""
    text = subprocess.run(
        [str(cuobjdump()), "--dump-resource-usage", str(binary)], capture_output=True, text=True, check=True
    ).stdout
    usage, arch, function = {}, None, None
    for line in text.splitlines():
        if m := re.match(r"arch = (sm_\w+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            function = m.group(1)
        elif function and "REG:" in line:
            usage[arch, function] = {k: int(v) for k, v in re.findall(r"(REG|SHARED|LOCAL|STACK):(\d+)", line)}
    return usage


def sass_counts(binary: Path) -> dict[str, int]:
    """How many of each SASS_OPS instruction the cubin holds (cuobjdump --dump-sass)."""
    text = subprocess.run([str(cuobjdump()), "--dump-sass", str(binary)], capture_output=True, text=True).stdout
    opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", text)
    counts = Counter(name for op in opcodes for prefix, name in SASS_OPS.items() if op.startswith(prefix))
    return dict(sorted(counts.items()))


def problems(row: Resources) -> list[str]:
    """Why the kernel does not fit the SM it is compiled for ([] when it fits)."""
    out = []
    if row.registers > MAX_REGISTERS:
        out.append(f"{row.registers} registers > {MAX_REGISTERS}")
    if row.stack_bytes or row.local_bytes:
        out.append(f"spills ({row.stack_bytes} B stack, {row.local_bytes} B local)")
    m = re.match(r"sm_(\d+)", row.arch)
    limit = ARCHS.get(int(m.group(1))) if m else None
    if limit is not None and row.shared_bytes > limit:
        out.append(f"{row.shared_bytes} B shared > {limit} B")
    return out


def _kernel_name(kernel) -> str:
    return kernel.__name__.strip("_").removesuffix("_kernel")


def compiled_launches(case, arch: int) -> list[tuple[str, object]]:
    """(kernel name, triton's compiled kernel) for every Triton launch of ``case``, compiled for
    sm_``arch`` with the launch's specialisation (its ``asm`` holds the PTX and the cubin)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    out = []
    for kernel, args, kwargs in launches(case):
        signature, constexprs, attrs, options = _specialise(kernel, args, kwargs, backend)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
        compiled.vidtok_hints = _hints(kernel, signature, constexprs, attrs)
        compiled.vidtok_options = options
        out.append((_kernel_name(kernel), compiled))
    return out


def compile_case(case, arch: int) -> list[Resources]:
    """One row per Triton launch of ``case``, compiled for sm_``arch`` with the launch's specialisation."""
    rows = []
    for name, compiled in compiled_launches(case, arch):
        options = compiled.vidtok_options
        ptx = compiled.asm["ptx"]
        mma, copies = loop_instructions(ptx, PTX_MMA), loop_instructions(ptx, PTX_COPIES)
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "kernel.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            (usage,) = resource_usage(cubin).values()
            # the SASS (about a second per kernel) where it says more than the PTX: which MMA sm_90 runs
            sass = sass_counts(cubin) if arch == 90 and (mma or copies) else {}
        row = Resources(
            case.name, name, f"sm_{arch}", options.num_warps, usage["REG"], usage.get("STACK", 0),
            usage["LOCAL"], max(usage.get("SHARED", 0), compiled.metadata.shared), options.num_stages,
            compiled.vidtok_hints, mma, copies, sass,
        )
        row.problems = problems(row)
        rows.append(row)
    return rows


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
    rows = []
    for (arch, fn), u in sorted(resource_usage(Path(_C.__file__)).items()):
        row = Resources("vidtok._C", _demangle(fn), arch or f"sm_{_C.cuda_archs}", None, u["REG"], u.get("STACK", 0),
                        u["LOCAL"], u.get("SHARED", 0))
        row.problems = problems(row)
        rows.append(row)
    return rows


def _compile_nth(index: int, arch: int) -> list[Resources]:
    return compile_case(list(aot_cases())[index], arch)


def all_resources(workers: int | None = None) -> list[Resources]:
    """Every case for every arch (in parallel processes: one per CPU, at most 8), then vidtok._C."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    tasks = [(i, arch) for i in range(len(list(aot_cases()))) for arch in ARCHS]
    workers = workers or min(8, os.cpu_count() or 1)
    if workers == 1:
        rows = [_compile_nth(i, arch) for i, arch in tasks]
    else:
        # spawn: a fresh interpreter per worker, nothing inherited from this one's threads
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = list(pool.map(_compile_nth, *zip(*tasks)))
    return [row for case_rows in rows for row in case_rows] + cuda_module_resources()


def markdown(rows: list[Resources]) -> str:
    import triton

    over = [r for r in rows if r.problems]
    limits = ", ".join(f"{limit // 1024} KB on sm_{arch}" for arch, limit in ARCHS.items())
    lines = [
        "# Kernel resources (`python -m vidtok aot`)",
        "",
        "Every Triton kernel as its launcher launches it on a realistic input (the AOT_CASES of "
        f"vidtok.kernels), compiled by triton {triton.__version__} for sm_80 and sm_90 with that launch's "
        "specialisation (\"specialised\": arguments marked divisible by 16 / integers made the constant 1), "
        "then the kernels of vidtok._C. Stack bytes are spilled registers. \"in loops\": instructions inside "
        "a loop of the PTX (wgmma, mma.sync; cp.async, cp.async.bulk, TMA); SASS instruction counts on "
        f"sm_90 where the PTX has either. Limits: {MAX_REGISTERS} registers, no spills, shared memory {limits}.",
        "",
        f"Over a limit: {len(over)} of {len(rows)} rows." if over else f"All {len(rows)} rows fit.",
        *(f"- **{r.case} / {r.kernel} / {r.arch}**: {'; '.join(r.problems)}" for r in over),
        "",
        "| case | kernel | arch | warps | stages | specialised | registers | stack (spills) B | shared B "
        "| MMA in loops | async copies in loops | SASS | fits |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sass = ", ".join(f"{k} {v}" for k, v in r.sass.items()) or "-"
        fits = "yes" if not r.problems else "**NO: " + "; ".join(r.problems) + "**"
        lines.append(
            f"| {r.case} | {r.kernel} | {r.arch} | {r.num_warps or '-'} | {r.num_stages or '-'} | {r.hints} "
            f"| {r.registers} | {r.stack_bytes + r.local_bytes} | {r.shared_bytes} | {', '.join(r.loop_mma) or '-'} "
            f"| {', '.join(r.loop_copies) or '-'} | {sass} | {fits} |"
        )
    return "\n".join(lines) + "\n"


def main(report: str | None = None, as_json: bool = False) -> str:
    import json

    rows = all_resources()
    text = json.dumps([asdict(r) for r in rows]) if as_json else markdown(rows)
    if report:
        Path(report).write_text(text)
    return text

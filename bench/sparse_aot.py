"""Compile vidtok's sparse attention kernels for sm_90 (and sm_80) as a launch specialises them, and
report what their hot loops use.

At launch Triton specialises pointer and integer arguments that are multiples of 16
(``tt.divisibility``) and integers equal to 1 (constants). This script compiles every sparse
attention ``AOT_CASES`` entry with the hints a typical input gets -- 16-byte aligned pointers; N, the
strides, D and H multiples of 16; one key/value head per query head and a plan shared by every head
(GROUP = PLAN_H = 1), or PLAN_H = H = 16 for a per-head plan -- and prints, per kernel and arch,
registers, spilled (local) bytes, stack frame bytes (spills of a kernel that makes calls land
there, not in LOCAL), shared memory, and whether the PTX uses Hopper warpgroup MMAs (wgmma),
Ampere MMAs (mma.sync) and asynchronous copies (cp.async, or TMA's cp.async.bulk), and whether
its divisions are IEEE (div.rn) or approximate (div.full / div.approx).

    TRITON_INTERPRET=0 python bench/sparse_aot.py [--arch 90] [--per-head] [-k FILTER] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from pathlib import Path

HINTED_INTS = {"N", "H", "Hk", "D", "nQ", "nK", "sls_b"}


def compile_hinted(case, arch: int, per_head: bool):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = case.kernel.arg_names
    signature = dict(case.signature)
    constexprs = dict(case.constexprs)
    for name in ("GROUP", "PLAN_H"):
        if name in signature and not (per_head and name == "PLAN_H"):
            signature[name] = "constexpr"  # a launch with the value 1 makes it a constant
            constexprs[name] = 1
    attrs = {}
    for i, name in enumerate(names):
        ty = signature.get(name)
        if ty is None or ty == "constexpr":
            continue
        if ty.startswith("*") or name in HINTED_INTS or re.fullmatch(r"s(q|k|v)_[bhn]", name) or (per_head and name == "PLAN_H"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(case.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": case.num_warps, "num_stages": case.num_stages})


def report(case, arch: int, per_head: bool) -> dict:
    from vidtok.aot import resource_usage

    compiled = compile_hinted(case, arch, per_head)
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        (usage,) = resource_usage(cubin).values()
    return {
        "kernel": case.name, "arch": f"sm_{arch}", "warps": case.num_warps, "registers": usage["REG"],
        "spilled": usage["LOCAL"], "stack": usage.get("STACK", 0), "shared": max(usage.get("SHARED", 0), compiled.metadata.shared),
        "wgmma": ptx.count("wgmma.mma_async"), "mma.sync": len(re.findall(r"\bmma\.sync", ptx)),
        "cp.async": len(re.findall(r"cp\.async\.(?:ca|cg)", ptx)), "bulk/TMA": ptx.count("cp.async.bulk"),
        "div.rn": len(re.findall(r"div\.rn\.f32", ptx)), "div approx": len(re.findall(r"div\.(?:full|approx)\.f32", ptx)),
    }


def main():
    os.environ.setdefault("TRITON_INTERPRET", "0")
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", type=int, action="append")
    parser.add_argument("--per-head", action="store_true")
    parser.add_argument("-k", default="")
    parser.add_argument("--out")
    args = parser.parse_args()
    from vidtok.kernels.sparse import AOT_CASES

    rows = [report(c, arch, args.per_head) for c in AOT_CASES if args.k in c.name for arch in (args.arch or [90])]
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()

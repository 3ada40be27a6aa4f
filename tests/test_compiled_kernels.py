"""What the compiled Triton kernels promise, read from their PTX for sm_90 (no GPU needed): the kernels
whose results vidtok promises to agree with the reference (cosine similarities, merged means, frame
scores, motion deltas) divide and take square roots with IEEE rounding (div.rn, sqrt.rn), never with
the approximate instructions Triton emits for ``/`` and ``tl.sqrt``; and the motion gate reads a
16-pixel uint8 patch row with one 16-byte load.

The Triton interpreter computes IEEE division either way, so only the compiled code shows these. The
compiles run in a separate interpreter with TRITON_INTERPRET=0 (this session sets it), with the
specialisation a launch gives contiguous tensors: pointers and the integer arguments that are
multiples of 16 marked divisible by 16.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

# (module, AOT case name): the kernels with a promise of agreement, one configuration each (the
# compensated gate shares the gate's reduction, merge_tokens' mean its weighted mean's division)
AGREEING = [
    ("merge", "paired_similarity_fwd-fp32-contiguous"),
    ("merge", "paired_similarity_bwd-fp32-contiguous"),
    ("merge", "match-fp32-contiguous"),
    ("merge", "merge_tokens-fp32-wmean"),
    ("merge", "window_links-fp32-contiguous"),
    ("select", "frame_scores-fp32-query-contiguous"),
    ("motion", "motion_gate-u8-p16-ts1-mean_abs-contiguous"),
    ("motion", "motion_gate-u8-p16-ts1-l2-contiguous"),
]
APPROXIMATE = ("div.full.f32", "div.approx", "sqrt.approx", "rcp.approx", "rsqrt.approx")
# what a contiguous 224 x 224 RGB clip gives a launch (the divisible ones get the hint)
SAMPLE_ARGUMENTS = {"s_b": 16 * 3 * 224 * 224, "s_t": 3 * 224 * 224, "s_c": 224 * 224, "s_h": 224, "ph": 16, "rows": 48}

COMPILE = textwrap.dedent("""
    import importlib, json, re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    wanted, sample = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    out = {}
    for module, name in wanted:
        (case,) = [c for c in importlib.import_module(f"vidtok.kernels.{module}").AOT_CASES if c.name == name]
        attrs = {}
        for index, arg in enumerate(case.kernel.arg_names):
            kind = case.signature.get(arg, "constexpr")
            if kind.startswith("*") or (kind != "constexpr" and sample.get(arg, 1) % 16 == 0):
                attrs[(index,)] = [["tt.divisibility", 16]]
        source = ASTSource(case.kernel, signature=case.signature, constexprs=case.constexprs, attrs=attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": case.num_warps, "num_stages": case.num_stages})
        ptx = compiled.asm["ptx"]
        out[name] = {"ops": sorted(set(re.findall(r"\\b(?:div|sqrt|rcp|rsqrt)\\.[a-z0-9.]+", ptx))),
                     "loads": sorted(set(re.findall(r"ld\\.global[a-z0-9.]*", ptx)))}
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def compiled():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run(
        [sys.executable, "-c", COMPILE, json.dumps(AGREEING), json.dumps(SAMPLE_ARGUMENTS)],
        capture_output=True, text=True, env=env, timeout=900, cwd=Path.home(),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


@pytest.mark.parametrize("module,name", AGREEING, ids=[name for _, name in AGREEING])
def test_division_and_square_root_are_ieee(module, name, compiled):
    ops = compiled[name]["ops"]
    assert not [op for op in ops if op.startswith(APPROXIMATE)], f"{name} uses approximate float ops: {ops}"
    assert any(op.startswith(("div.rn.f32", "sqrt.rn.f32")) for op in ops), f"{name}: no IEEE division or square root: {ops}"


def test_motion_gate_reads_uint8_patch_rows_with_16_byte_loads(compiled):
    loads = compiled["motion_gate-u8-p16-ts1-mean_abs-contiguous"]["loads"]
    assert "ld.global.v4.b32" in loads, loads
    assert not [op for op in loads if op.endswith((".b8", ".u8", ".b16", ".u16"))], loads

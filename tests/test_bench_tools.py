"""The benchmark tooling works end to end: `python -m vidtok bench --quick` runs the suite and renders it."""

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
    # runs of two devices are refused, not mixed into one table
    other = dict(data, machine_info=dict(data["machine_info"], vidtok_device="another device"))
    parts[1].write_text(json.dumps(other))
    result = subprocess.run([*render, *map(str, parts)], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "one device" in result.stderr


def test_device_session_script_keeps_to_its_budget(tmp_path):
    """bench/gpu_session.sh with too small a budget skips every stage, says so, and still returns its
    summary and packed work folder in $OUT (the stages themselves need a GPU)."""
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OUT": str(out)}
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_session.sh"), "25", "build", "tests", "nonsense"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert "build: skipped" in summary and "tests: skipped" in summary and "unknown stage nonsense" in summary
    assert "total" in summary.splitlines()[-1]
    with tarfile.open(out / "gpu-session.tar.gz") as tar:
        assert "./summary.txt" in tar.getnames()

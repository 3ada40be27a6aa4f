"""The benchmark tooling works end to end: `python -m vidtok bench --quick` runs the suite and renders it."""

import json
import subprocess
import sys
from pathlib import Path


def test_bench_quick_writes_json_markdown_and_png(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "vidtok", "bench", "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=Path.home(),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (json_path,) = tmp_path.glob("*.json")
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

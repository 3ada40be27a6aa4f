"""Render pytest-benchmark JSON files under bench/results/ into a Markdown table and a PNG chart.

    python bench/render.py [bench/results/<device>.json ...]
    python bench/render.py --merge OUT.json IN.json [IN.json ...]

``--merge`` first writes OUT.json: the benchmarks of every IN.json (runs of parts of bench/ on one
device, e.g. bench/gpu_session.sh's stages, one JSON each) under the first one's machine and commit
info, then renders OUT.json; an IN.json that is not a complete run is left out with a message.
For each JSON file: <name>.md (one table per benchmark group: median time, achieved GB/s, fraction
of the device's measured copy bandwidth, speed-up over the eager baseline of the same group) and
<name>.png (the same speed-ups as bars).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _impl(bench: dict) -> str:
    return bench["param"].rsplit("-", 1)[-1] if "param" in bench else bench["name"]


def load(path: Path):
    data = json.loads(path.read_text())
    groups = defaultdict(list)
    for bench in data["benchmarks"]:
        groups[bench["group"]].append(bench)
    return data["machine_info"], data.get("commit_info", {}), groups


def _baseline(benches):
    """The eager baseline's seconds per call in a group (the impl whose name starts with "eager")."""
    return next((b["extra_info"]["seconds_per_call"] for b in benches if _impl(b).startswith("eager")), None)


def markdown(path: Path) -> str:
    machine, commit, groups = load(path)
    lines = [
        f"# {path.stem}",
        "",
        f"Device: **{machine.get('vidtok_device')}**; measured copy bandwidth "
        f"{machine.get('copy_bandwidth_GBps')} GB/s; torch {machine.get('torch')}, triton {machine.get('triton')}; "
        f"commit {(machine.get('git_commit') or commit.get('id') or '?')[:10]}.",
        "",
    ]
    for group, benches in groups.items():
        base = _baseline(benches)
        lines += [f"## {group}", "", "| implementation | median | GB/s | of copy bandwidth | vs eager |", "|---|---|---|---|---|"]
        for b in sorted(benches, key=lambda b: b["extra_info"]["seconds_per_call"]):
            info = b["extra_info"]
            seconds = info["seconds_per_call"]
            speedup = f"{base / seconds:.2f}x" if base else "-"
            lines.append(
                f"| {_impl(b)} | {seconds * 1e3:.3f} ms | {info['GBps']:.1f} | "
                f"{info['fraction_of_copy_bandwidth']:.0%} | {speedup} |"
            )
        lines.append("")
    return "\n".join(lines)


def chart(path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    machine, _, groups = load(path)
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 2.2 * len(groups) + 0.8), squeeze=False)
    for ax, (group, benches) in zip(axes[:, 0], groups.items()):
        names = [_impl(b) for b in benches]
        fractions = [b["extra_info"]["fraction_of_copy_bandwidth"] for b in benches]
        colors = ["tab:gray" if n.startswith("eager") else "tab:blue" for n in names]
        ax.barh(names, fractions, color=colors)
        ax.set_title(group, fontsize=9)
        ax.set_xlim(0, max(1.0, max(fractions) * 1.1))
        ax.tick_params(labelsize=8)
    axes[-1, 0].set_xlabel("achieved bandwidth / measured copy bandwidth (higher is better)")
    fig.suptitle(str(machine.get("vidtok_device")), fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def merge(out: Path, paths: list[Path]) -> None:
    """Write ``out``: the first JSON of ``paths`` with the benchmarks of all of them. A file that is
    not a benchmark run (a run killed while writing it) is left out with a message, not fatal."""
    runs = []
    for path in paths:
        try:
            run = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"--merge: left out {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        if not isinstance(run, dict) or not {"machine_info", "benchmarks"} <= run.keys():
            print(f"--merge: left out {path}: not a pytest-benchmark run", file=sys.stderr)
            continue
        runs.append(run)
    if not runs:
        raise SystemExit("--merge: none of the inputs is a benchmark run")
    devices = {run["machine_info"].get("vidtok_device") for run in runs}
    if len(devices) != 1:
        raise SystemExit(f"--merge takes runs of one device, got {sorted(map(str, devices))}")
    merged = dict(runs[0], benchmarks=[bench for run in runs for bench in run["benchmarks"]])
    out.write_text(json.dumps(merged, indent=1))


def main(paths: list[str]) -> None:
    if paths[:1] == ["--merge"]:
        if len(paths) < 3:
            raise SystemExit("usage: render.py --merge OUT.json IN.json [IN.json ...]")
        merge(Path(paths[1]), [Path(p) for p in paths[2:]])
        paths = paths[1:2]
    files = [Path(p) for p in paths] or sorted(RESULTS.glob("*.json"))
    for path in files:
        md = path.with_suffix(".md")
        md.write_text(markdown(path))
        chart(path, path.with_suffix(".png"))
        print(f"wrote {md} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main(sys.argv[1:])

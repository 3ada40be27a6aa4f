"""Render pytest-benchmark JSON files under bench/results/ into a Markdown table and a PNG chart.

    python bench/render.py [bench/results/<device>.json ...]
    python bench/render.py --merge OUT.json IN.json [IN.json ...]

``--merge`` first writes OUT.json: the benchmarks of every IN.json (runs of parts of bench/ on one
device, e.g. bench/gpu_session.sh's stages, one JSON each) under the first one's machine and commit
info, then renders OUT.json; an IN.json that is not a complete run is left out with a message.
For each JSON file: <name>.md (one table per benchmark group: median time, achieved GB/s, fraction
of the device's measured copy bandwidth, speed-up over the eager baseline of the same group) and
<name>.png (one panel per op: every implementation's time per call, with its speed-up over eager).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _impl(bench: dict) -> str:
    """The implementation a benchmark timed: its ``impl`` parameter (names may hold hyphens)."""
    params = bench.get("params") or {}
    if "impl" in params:
        return str(params["impl"])
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


def _op(group: str) -> str:
    """The op a benchmark group measures: its name before the shape ("bipartite_merge B=16 ..." -> "bipartite_merge")."""
    return group.split(" ", 1)[0]


def chart(path: Path, out: Path) -> None:
    """Write ``figure(path)`` to ``out``."""
    import matplotlib.pyplot as plt

    fig = figure(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def figure(path: Path):
    """One panel per op; in it every group (shape) as a block of bars, one per implementation: the median
    time per call on a log axis (so no bar is empty, whatever the device), labelled with the time and
    the speed-up over the group's eager baseline. Eager PyTorch grey, vidtok blue, others orange."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    machine, _, groups = load(path)
    ops = defaultdict(list)
    for group, benches in groups.items():
        ops[_op(group)].append((group, benches))
    heights = [sum(len(benches) + 1 for _, benches in blocks) for blocks in ops.values()]
    fig, axes = plt.subplots(len(ops), 1, figsize=(10, 0.22 * sum(heights) + 1.2 * len(ops) + 0.6), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (op, blocks) in zip(axes[:, 0], ops.items()):
        labels, times, colors, notes = [], [], [], []
        for group, benches in blocks:
            base = _baseline(benches)
            shape = group[len(op):].strip()
            for b in sorted(benches, key=lambda b: b["extra_info"]["seconds_per_call"]):
                seconds = b["extra_info"]["seconds_per_call"]
                name = _impl(b)
                labels.append(f"{shape}  {name}")
                times.append(seconds * 1e3)
                colors.append("tab:gray" if name.startswith("eager") else "tab:blue" if name.startswith("vidtok") else "tab:orange")
                notes.append(f"{seconds * 1e3:.3g} ms" + (f"  ({base / seconds:.2f}x eager)" if base and not name.startswith("eager") else ""))
            labels.append("")  # a gap between groups
            times.append(float("nan"))
            colors.append("white")
            notes.append("")
        y = list(range(len(labels)))[::-1]
        ax.barh(y, times, color=colors)
        ax.set_yticks(y, labels, fontsize=7)
        ax.set_xscale("log")
        finite = [t for t in times if t == t]
        ax.set_xlim(min(finite) / 2, max(finite) * 20)  # room for the labels right of the bars
        for yi, t, note in zip(y, times, notes):
            if note:
                ax.text(t * 1.1, yi, note, va="center", fontsize=7)
        ax.set_title(op, fontsize=9, loc="left")
        ax.tick_params(axis="x", labelsize=7)
    axes[-1, 0].set_xlabel("median time per call, ms (log scale; lower is better)", fontsize=8)
    fig.suptitle(f"{machine.get('vidtok_device')}: vidtok (blue) beside eager PyTorch (grey) and other libraries (orange)",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    return fig


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

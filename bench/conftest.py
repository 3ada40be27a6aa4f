"""Benchmark harness shared by bench/bench_*.py (pytest-benchmark).

Every benchmark times one implementation per test (vidtok's and its baselines side by side in one
group, in one run), synchronises CUDA before reading the clock, and records in ``extra_info`` the
bytes it must move and the FLOPs it must do, the achieved GB/s (TFLOP/s) from the median, and the
fraction of this device's measured copy bandwidth — the practical floor for a memory-bound op.

Run: ``pytest bench/ --benchmark-json=bench/results/<device>.json`` then ``python bench/render.py``.
"""

from __future__ import annotations

import os
import platform
import subprocess

import pytest
import torch

if not torch.cuda.is_available():
    # Benchmarks never run Triton in the interpreter: on the CPU only the reference and cpu backends are timed.
    os.environ.pop("TRITON_INTERPRET", None)


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({os.cpu_count()} threads, torch {torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_COPY_BANDWIDTH: dict[str, float] = {}


def copy_bandwidth(device: torch.device) -> float:
    """Measured device copy bandwidth in bytes/s (read + write of a 512 MiB buffer, best of 5)."""
    key = str(device)
    if key not in _COPY_BANDWIDTH:
        import time

        n = 512 * 2**20 // 4
        src = torch.ones(n, device=device)
        dst = torch.empty_like(src)
        best = float("inf")
        for _ in range(6):
            synchronize(device)
            start = time.perf_counter()
            dst.copy_(src)
            synchronize(device)
            best = min(best, time.perf_counter() - start)
        _COPY_BANDWIDTH[key] = 2 * src.numel() * 4 / best
    return _COPY_BANDWIDTH[key]


def pytest_benchmark_update_machine_info(config, machine_info):
    device = bench_device()
    machine_info["vidtok_device"] = device_name(device)
    machine_info["torch"] = torch.__version__
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except ImportError:
        machine_info["triton"] = None
    machine_info["copy_bandwidth_GBps"] = round(copy_bandwidth(device) / 1e9, 1)
    try:
        machine_info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=os.path.dirname(__file__)
        ).stdout.strip()
    except OSError:
        machine_info["git_commit"] = None


@pytest.fixture
def device() -> torch.device:
    return bench_device()


@pytest.fixture
def measure(benchmark, device):
    """measure(fn, bytes_moved=..., flops=0, iterations=...) times fn() and records roofline figures."""

    def run(fn, *, bytes_moved: int, flops: int = 0, iterations: int | None = None, rounds: int | None = None):
        fn()  # warm-up: JIT compiles, allocator, caches
        synchronize(device)

        def target():
            for _ in range(iterations_):
                fn()
            synchronize(device)

        # GPU: several launches per timed round so the sync is amortised; CPU: one call per round.
        iterations_ = iterations or (20 if device.type == "cuda" else 1)
        benchmark.pedantic(target, rounds=rounds or (20 if device.type == "cuda" else 5), warmup_rounds=1)
        seconds = benchmark.stats.stats.median / iterations_
        peak = copy_bandwidth(device)
        info = benchmark.extra_info
        info["device"] = device_name(device)
        info["seconds_per_call"] = seconds
        info["bytes_moved"] = bytes_moved
        info["flops"] = flops
        info["GBps"] = bytes_moved / seconds / 1e9
        info["fraction_of_copy_bandwidth"] = bytes_moved / seconds / peak
        if flops:
            info["TFLOPps"] = flops / seconds / 1e12
        return seconds

    return run

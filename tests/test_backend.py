"""Backend selection: argument > use_backend > VIDTOK_BACKEND > auto, and errors that say why."""

import os
import subprocess
import sys

import pytest
import torch

import vidtok
from vidtok import _backend


def _x():
    return torch.randn(1, 3, 2, 4)


def _ran_with(monkeypatch, **call_kwargs):
    """Which backend name reached the op."""
    seen = []
    real = _backend.choose

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(_backend, "choose", spy)
    vidtok.paired_similarity(_x(), **call_kwargs)
    return seen[-1]


def test_auto_on_cpu_picks_reference(monkeypatch):
    assert _ran_with(monkeypatch) == "reference"


@pytest.mark.skipif(not _backend.triton_interpreting(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
def test_precedence_argument_context_environment(monkeypatch):
    monkeypatch.setenv("VIDTOK_BACKEND", "triton")
    assert _ran_with(monkeypatch) == "triton"
    with vidtok.use_backend("reference"):
        assert _ran_with(monkeypatch) == "reference"
        with vidtok.use_backend("triton"):
            assert _ran_with(monkeypatch) == "triton"
        assert _ran_with(monkeypatch) == "reference"
        assert _ran_with(monkeypatch, backend="triton") == "triton"
    assert _ran_with(monkeypatch) == "triton"


def test_use_backend_restores_on_error(monkeypatch):
    with pytest.raises(RuntimeError, match="boom"):
        with vidtok.use_backend("cuda"):
            raise RuntimeError("boom")
    assert _ran_with(monkeypatch) == "reference"


def test_forced_backend_that_cannot_run_lists_every_reason(monkeypatch):
    monkeypatch.setattr(_backend, "cuda_module_error", lambda: "vidtok._C is not built (test)")
    with vidtok.use_backend("cuda"):
        with pytest.raises(vidtok.BackendUnavailableError) as info:
            vidtok.paired_similarity(_x())
    message = str(info.value)
    assert "backend 'cuda' cannot run on cpu torch.float32" in message
    assert "vidtok._C is not built (test)" in message and "need cuda tensors, got cpu" in message


def test_bad_names():
    with pytest.raises(ValueError, match="use_backend"):
        with vidtok.use_backend("gpu"):
            pass


def test_bad_environment_variable(monkeypatch):
    monkeypatch.setenv("VIDTOK_BACKEND", "fastest")
    with pytest.raises(ValueError, match="VIDTOK_BACKEND must be one of"):
        vidtok.paired_similarity(_x())


def test_triton_reasons_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _backend.backend_reasons("triton", torch.device("cpu"), torch.float32) == [
        "tensors are on the CPU and TRITON_INTERPRET=1 is not set"
    ]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "bfloat16 wrongly" in _backend.backend_reasons("triton", torch.device("cpu"), torch.bfloat16)[0]
    assert _backend.backend_reasons("triton", torch.device("cpu"), torch.float16) == []


def _run(code, *args, **env):
    """Run code in a fresh interpreter outside the repository (so its folders are not on sys.path)."""
    return subprocess.run(
        [sys.executable, *(("-c", code) if code else args)], capture_output=True, text=True, env={**os.environ, **env}, timeout=300,
        cwd=os.path.expanduser("~"),
    )


def test_import_and_info_without_the_cuda_module():
    """A missing vidtok._C never breaks `import vidtok`; info says why the cuda backend cannot run."""
    code = (
        "import sys; sys.modules['vidtok._C'] = None\n"  # makes `from vidtok import _C` raise ImportError
        "import torch, vidtok\n"
        "print(vidtok.paired_similarity(torch.ones(1, 2, 1, 3)).item())\n"
        "from vidtok.info import report; print(report())\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "1.0"
    assert "vidtok._C: vidtok._C is not built" in result.stdout
    assert "cuda       cannot run: vidtok._C is not built" in result.stdout


def test_info_command_lists_every_backend():
    result = _run(None, "-m", "vidtok", "info")
    assert result.returncode == 0, result.stderr
    for name in vidtok.BACKENDS:
        assert f"  {name:<10} " in result.stdout
    assert "auto -> paired_similarity: reference" in result.stdout
    assert "auto -> sparse_attention: cpu" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, import vidtok loads the Triton kernels it can run")
def test_import_loads_triton_only_when_it_can_run():
    """Without a GPU and without the interpreter, neither ``import vidtok`` nor importing the
    vidtok.kernels package imports triton (its kernels could not run); with the interpreter
    ``import vidtok`` loads them, so that choosing a backend under torch.compile never imports."""
    code = "import sys, vidtok.kernels; print(sorted(m for m in sys.modules if 'triton' in m.split('.')[0]))"
    result = _run(code, TRITON_INTERPRET="0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", "importing vidtok must not import triton when no kernel can run"
    loaded = _run("import sys, vidtok; print('vidtok.kernels.sparse' in sys.modules)", TRITON_INTERPRET="1")
    assert loaded.returncode == 0 and loaded.stdout.strip() == "True", loaded.stderr


def test_kernels_folder_is_vidtok_kernels():
    where = _run("import kernels; print(kernels.__file__)")  # (outside the repository root)
    assert where.returncode != 0 or "site-packages" in where.stdout, (
        f"the repository's kernels/ must not be installed as a top-level package: {where.stdout}"
    )

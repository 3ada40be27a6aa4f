"""Test session setup.

Without a GPU, Triton kernels are checked in Triton's CPU interpreter: TRITON_INTERPRET must be set
before any @triton.jit kernel is defined, so it is set here, before test modules import vidtok.
With a GPU the kernels run for real on CUDA tensors and the interpreter stays off.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    """Each test starts from backend "auto", whatever the caller's VIDTOK_BACKEND says."""
    monkeypatch.delenv("VIDTOK_BACKEND", raising=False)


@pytest.fixture
def nan_allowed():
    """For the tests of an op's documented NaN behaviour: the ops that decide what to keep refuse NaN
    unless inside vidtok.allow_nan()."""
    import vidtok

    with vidtok.allow_nan():
        yield

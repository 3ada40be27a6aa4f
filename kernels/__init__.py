"""vidtok's Triton kernels, installed as ``vidtok.kernels``.

Importing this package does nothing: each module holds ``@triton.jit`` kernels, their launchers (taking
tensors) and ``AOT_CASES``, every configuration the launchers can pick, which tests/test_aot.py compiles
for sm_80 and sm_90 without a GPU. Ops, validation and autograd live in vidtok/, never here.
"""

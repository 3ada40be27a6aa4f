"""vidtok's Triton kernels, installed as ``vidtok.kernels``.

Importing this package does nothing: each module (merge, motion, select, sparse) holds ``@triton.jit``
kernels, their launchers (taking tensors; the entry points that ``vidtok._backend`` names) and
``AOT_CASES``, every configuration the launchers can pick, which ``python -m vidtok aot`` compiles for
sm_80 and sm_90 without a GPU. Ops, validation and autograd live in vidtok/, never here; the kernels
import only vidtok's bottom layers (``vidtok._numerics``, ``vidtok.reference``).
"""

if __name__ == "kernels":
    # Python was started in vidtok's source tree, whose kernels/ folder then shadows the PyPI package
    # of the same name (Hugging Face's ``kernels``, which transformers imports). Load that one in
    # this module's place, or fail as a missing module would.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels' (vidtok's kernels/ folder is vidtok.kernels)", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)

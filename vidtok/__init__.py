"""vidtok: fused GPU kernels that cut the visual token count of video transformers and video LLMs.

One import gives every op as a torch op (``torch.ops.vidtok.*``) with a pure-PyTorch reference, a
Triton kernel and a CUDA C++ kernel; see ``python -m vidtok info`` for which can run here.
"""

from vidtok._backend import BACKENDS, BackendUnavailableError, use_backend
from vidtok.merge import paired_similarity

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendUnavailableError", "paired_similarity", "use_backend", "__version__"]

"""Pure-PyTorch references: the spec of every vidtok op, the oracle of the tests and the CPU path.

Written to be read: vectorised tensor code, fp32 accumulation, low-precision inputs upcast first.
The same four names as the rest of the package: merge, motion, select, sparse.
"""

from vidtok.reference.merge import paired_similarity, paired_similarity_backward

__all__ = ["paired_similarity", "paired_similarity_backward"]

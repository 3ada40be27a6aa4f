"""vidtok's cpu backend: PyTorch tuned for CPUs, where the readable reference is too slow to use.

One module per hot path that has such a path (today: sparse, and select for topk_per_frame), with the same entry points as
vidtok.reference; "auto" prefers it on CPU tensors for the ops whose record in vidtok._backend lists it.
"""

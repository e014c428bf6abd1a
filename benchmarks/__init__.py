"""Side-by-side benchmarks of jaxlinear against its peers: ``python -m benchmarks --help``.

Nothing here imports JAX at package import time: ``benchmarks.__main__`` sets the
environment (``XLA_FLAGS``, GPU memory preallocation) first, and the PyTorch worker
process never imports JAX at all.
"""

"""Numba kernels behind lowprec's public functions.

Installed as ``lowprec.kernels`` (the source folder is the top-level ``kernels/``).
Nothing here validates its inputs: the public layer in ``lowprec`` does that and
hands over arrays of the exact dtypes and layouts each kernel documents.
"""

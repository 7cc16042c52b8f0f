"""Test-wide settings, applied before JAX starts.

JAX runs on the CPU. Where the accelerators' compilers are installed (the
CUDA plugin, libtpu), they are used ahead of time only: without these
settings the CUDA plugin would try to start on a GPU that is not there, and
libtpu would refuse a second process (a notebook's kernel, a subprocess).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

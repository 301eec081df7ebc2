"""Test support shared by the test modules: the stand-in cupy, host-built kernels, comparisons.

Test modules import from here (``from support.standin import ...``), never from each other.
"""

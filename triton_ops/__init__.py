"""Triton kernels and their launchers, installed as ``fastgen_kernels.triton_ops``.

Kernels and launchers only: no autograd, no dispatch (those live in fastgen_kernels/ops). Each
launcher takes the same arguments and returns the same outputs as the op's reference backend.
Importing a module here needs the ``triton`` package.
"""

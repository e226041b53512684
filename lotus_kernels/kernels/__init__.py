"""Triton kernels, one file per op (kernel + launcher + ``*_ref``), named as the op in ``lotus_kernels.ops``.

The bottom layer: kernels import only ``layouts`` (for their references) and
``_shared``, never ``ops``; the ops import a kernel file when they first run,
so importing lotus_kernels never imports triton.
"""

"""Triton kernels, one file per kernel (kernel + wrapper + *_ref).

Kernel backends register with lotus_kernels.backends when their module is imported.
"""

"""Functional attention kernels (no modules, no parameters)."""

from .kernel import AttentionKernel, KernelCall

__all__ = ["AttentionKernel", "KernelCall"]

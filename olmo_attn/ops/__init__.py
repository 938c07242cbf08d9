"""Functional attention kernels (no modules, no parameters).

``kernel`` (the ``AttentionKernel`` protocol), ``masking`` (index vectors + tile classification),
``blockwise`` (pure-torch flash-style kernel), ``dropout`` (counter-based keep mask), ``sdpa`` and
``flex`` (PyTorch's fused kernels), ``torch_kernel`` (the dispatcher and ``TorchKernel``).
"""

from .kernel import AttentionKernel, KernelCall

__all__ = ["AttentionKernel", "KernelCall"]

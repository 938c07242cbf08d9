"""Float64 ground truth for the OLMo-core attention family (independent of ``olmo_attn``).

Submodules (NumPy float64 in and out): :mod:`~reference.attention` (masked SDPA + lse),
:mod:`~reference.kv_cache`, :mod:`~reference.rope`, :mod:`~reference.norms`,
:mod:`~reference.gating`, :mod:`~reference.modules` (whole-module forwards),
:mod:`~reference.configs` (config arithmetic), :mod:`~reference.cp_layouts` (context-parallel
layouts), :mod:`~reference.gated_deltanet`; and :mod:`~reference.twins`, float64 torch twins of
the differentiable operators for reference gradients (imported lazily: it needs torch).
"""

from reference import attention, configs, cp_layouts, gated_deltanet, gating, kv_cache, modules, norms, rope

__all__ = [
    "attention",
    "configs",
    "cp_layouts",
    "gated_deltanet",
    "gating",
    "kv_cache",
    "modules",
    "norms",
    "rope",
    "twins",
]


def __getattr__(name: str):
    if name == "twins":
        import importlib

        return importlib.import_module("reference.twins")
    raise AttributeError(f"module 'reference' has no attribute {name!r}")

"""The one capability table.

Each backend declares, as data, what it supports. ``AttentionBackend.assert_*``, automatic backend
choice, every "not supported" error, ``olmo-attn info`` and the conformance case matrix read this
table and nothing else.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from ..config import StrEnum
from ..exceptions import BackendUnavailableError, UnsupportedFeatureError
from ..hardware import DeviceInfo, info_for, package_status


class Feature(StrEnum):
    """Features a backend may have. Conformance builds one case family per feature."""

    causal = "causal"
    non_causal = "non_causal"  # kernel level only: the modules are always causal
    gqa = "gqa"  # grouped / multi-query heads without materialising repeated K/V
    sliding_window = "sliding_window"
    documents = "documents"  # intra-document masking with one segmentation (cu_doc_lens)
    documents_qk = "documents_qk"  # separate query / key segmentations (llama3 CP)
    documents_window = "documents_window"  # documents and a sliding window in one call
    kv_cache = "kv_cache"
    kv_cache_leftpad = "kv_cache_leftpad"
    packed_qkv = "packed_qkv"
    ring_cp = "ring_cp"
    ulysses_cp = "ulysses_cp"
    dropout = "dropout"
    deterministic = "deterministic"  # bit-identical backward on repeated runs
    lse = "lse"  # kernel returns the log-sum-exp (needed by our ring attention)
    custom_scale = "custom_scale"


ALL_DTYPES = frozenset({torch.float32, torch.float64, torch.bfloat16, torch.float16})
HALF_DTYPES = frozenset({torch.bfloat16, torch.float16})
SM = tuple[int, int]
# ``head_dim_max`` of a backend that computes any head dim (the torch backend: SDPA's math kernel,
# FlexAttention for powers of two, the blockwise kernel otherwise)
ANY_HEAD_DIM = sys.maxsize


@dataclass(frozen=True)
class BackendSpec:
    """What one backend supports, where it runs, and how to get it."""

    name: str
    class_name: str
    module: str | None  # module whose import proves the package is there (None: always there)
    distribution: str | None  # PyPI distribution for the version / install hint
    install: str  # how a user gets it
    devices: frozenset[str]  # "cpu" and/or "cuda"
    sm_min: SM | None = None  # inclusive compute-capability range on CUDA
    sm_max: SM | None = None
    dtypes: frozenset[torch.dtype] = ALL_DTYPES
    head_dim_max: int = 256
    head_dim_multiple: int = 1
    features: frozenset[Feature] = frozenset()
    ring_strategies: tuple[str, ...] = ()  # load balancers its ring CP can run
    # where a feature needs a second package (flash_2's ring via ring-flash-attn is optional for us)
    feature_modules: dict[Feature, str] = field(default_factory=dict)
    # where this project's conformance passed on real hardware: "any", or device tags ("cpu", "sm_90")
    verified_on: frozenset[str] = frozenset()
    alternative_modules: tuple[str, ...] = ()  # other import names that also provide it
    # largest head_dim with a deterministic backward (None: every head_dim it takes)
    deterministic_head_dim_max: int | None = None
    notes: str = ""

    @property
    def verified_on_hardware(self) -> bool:
        """Verified on some hardware (see :meth:`verified_for` for one device)."""
        return bool(self.verified_on)

    def verified_for(self, arch: str | None) -> bool:
        """Conformance passed on this device tag (``"cpu"``, ``"sm_90"``; ``None``: on any device)."""
        return "any" in self.verified_on or (arch in self.verified_on if arch else self.verified_on_hardware)

    def supports_head_dim(self, head_dim: int) -> bool:
        """``head_dim`` is a multiple of ``head_dim_multiple`` and at most ``head_dim_max``."""
        return head_dim <= self.head_dim_max and head_dim % self.head_dim_multiple == 0

    def supports_deterministic(self, head_dim: int) -> bool:
        """A bit-reproducible backward at this ``head_dim``."""
        limit = self.deterministic_head_dim_max
        return Feature.deterministic in self.features and (limit is None or head_dim <= limit)

    def head_dim_text(self) -> str:
        """``"any"``, or ``"≤ 256"`` (``", multiple of 8"`` where it needs one)."""
        if self.head_dim_max >= ANY_HEAD_DIM:
            text = "any"
        else:
            text = f"≤ {self.head_dim_max}"
        return text if self.head_dim_multiple == 1 else f"{text}, multiple of {self.head_dim_multiple}"

    def verified_text(self) -> str:
        if "any" in self.verified_on:
            return "yes"
        return ", ".join(sorted(self.verified_on)) if self.verified_on else "not verified on hardware here"

    def arch_ok(self, dev: DeviceInfo) -> bool:
        if dev.type not in self.devices:
            return False
        if dev.type == "cuda" and dev.sm is not None:
            if self.sm_min is not None and dev.sm < self.sm_min:
                return False
            if self.sm_max is not None and dev.sm > self.sm_max:
                return False
        return True

    def arch_text(self) -> str:
        parts = []
        if "cpu" in self.devices:
            parts.append("CPU")
        if "cuda" in self.devices:
            lo = f"sm_{self.sm_min[0]}{self.sm_min[1]}" if self.sm_min else "any"
            hi = f"sm_{self.sm_max[0]}{self.sm_max[1]}" if self.sm_max else "newer"
            parts.append("CUDA" if not (self.sm_min or self.sm_max) else f"CUDA {lo}–{hi}")
        return " / ".join(parts)


_F = Feature
_EVERYTHING = frozenset(Feature)

TABLE: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec(
            name="torch",
            class_name="TorchAttentionBackend",
            module=None,
            distribution="torch",
            install="included (PyTorch)",
            devices=frozenset({"cpu", "cuda"}),
            head_dim_max=ANY_HEAD_DIM,  # head dims the flash kernels refuse (e.g. 288) run here
            features=_EVERYTHING - {_F.deterministic},
            ring_strategies=("zig_zag", "llama3"),
            verified_on=frozenset({"any"}),
            notes="SDPA (cuDNN/flash) for plain masks, FlexAttention on CUDA and a blockwise kernel on CPU "
            "for windows, documents and KV cache; never a dense T×T mask",
        ),
        BackendSpec(
            name="flash_2",
            class_name="FlashAttention2Backend",
            module="flash_attn.flash_attn_interface",  # not bare flash_attn: flash-attn-4 alone installs the namespace
            distribution="flash-attn",
            install="pip install flash-attn --no-build-isolation (>= 2.7; Ampere sm_80 or newer NVIDIA GPU)",
            devices=frozenset({"cuda"}),
            sm_min=(8, 0),
            dtypes=HALF_DTYPES,
            head_dim_max=256,
            head_dim_multiple=8,
            features=_EVERYTHING,
            ring_strategies=("zig_zag", "llama3"),
            # conformance/reports/NVIDIA_H200-2026-12-03-gpu-torch-flash_2-flash_3.md
            verified_on=frozenset({"sm_90"}),
            notes="adapter written against flash-attn 2.8.3: flash_attn_func / varlen / qkvpacked / "
            "with_kvcache (cache_leftpad); LSE kernel _wrapped_flash_attn_{forward,backward}; ring CP via "
            "ring-flash-attn when installed (zig-zag without window, llama3), else our LSE ring; verified on "
            "sm_90 (H200, the offline subset build of scripts/flash2/build.sh: every gpu-tier case, pairwise "
            "with torch and flash_3, containment included), not on sm_80/sm_100; ring CP not run on GPUs",
        ),
        BackendSpec(
            name="flash_3",
            class_name="FlashAttention3Backend",
            module="flash_attn_interface",
            alternative_modules=("flash_attn_3.flash_attn_interface",),
            distribution="flash_attn_3",
            install="build flash-attn's hopper/ directory (cd hopper && python setup.py install) on an H100/H800",
            devices=frozenset({"cuda"}),
            sm_min=(9, 0),
            sm_max=(9, 0),
            dtypes=HALF_DTYPES,
            head_dim_max=256,
            head_dim_multiple=8,
            features=_EVERYTHING - {_F.dropout},
            ring_strategies=("zig_zag", "llama3"),
            # FA3's 256 kernel has no deterministic variant (hopper/flash_bwd_launch_template.h:
            # ``Deterministic_ && kHeadDim < 256``) and runs head dims above 192 — and above 128 in
            # builds without the 192 kernel, like scripts/flash3/build.sh's; asked for one, FA3 3.0.0
            # segfaulted in the backward on the H200 (scripts/flash3/probe.py; 64 and 128 passed)
            deterministic_head_dim_max=128,
            # conformance/reports/NVIDIA_H200-2026-12-03-gpu-torch-flash_2-flash_3.md
            verified_on=frozenset({"sm_90"}),
            notes="Hopper only, no dropout; deterministic backward up to head_dim 128; adapter written against "
            "flash-attn 2.8.3's hopper/flash_attn_interface.py and FA3 3.0.0's custom ops; KV cache through "
            "the gathered visible slots (flash_attn_with_kvcache leaked NaN from unused slots on the H200); "
            "ring CP through our LSE ring on _flash_attn_forward/_backward; verified on sm_90 (H200, the "
            "offline subset build of scripts/flash3/build.sh: every gpu-tier case except containment, "
            "pairwise with torch and flash_2); ring CP not run on GPUs",
        ),
        BackendSpec(
            name="flash_4",
            class_name="FlashAttention4Backend",
            module="flash_attn.cute",
            distribution="flash-attn-4",
            install="pip install flash-attn-4 (CuTe DSL; Hopper sm_90 or Blackwell sm_100-sm_103)",
            devices=frozenset({"cuda"}),
            sm_min=(9, 0),
            sm_max=(10, 3),
            dtypes=HALF_DTYPES,
            head_dim_max=256,
            head_dim_multiple=8,
            features=_EVERYTHING - {_F.dropout},
            ring_strategies=("zig_zag", "llama3"),
            verified_on=frozenset({"sm_90"}),  # conformance/reports/NVIDIA_H200-2026-11-26.md
            notes="adapter written against flash-attn-4 4.0.0b36; head_dim 8-256 on sm_90, 8-128 or 256 on "
            "sm_100 (checked at construction); KV cache honours cache_leftpad (the visible slots gathered "
            "into varlen segments: the cache-view path leaked NaN from unused slots on the H200); ring CP through our LSE ring on _flash_attn_fwd/_bwd; deterministic "
            "backward on sm_90 and sm_100; verified on sm_90 (H200: every gpu-tier case, pairwise with torch, "
            "ring and Ulysses CP over NCCL), not yet on sm_100",
        ),
        BackendSpec(
            name="te",
            class_name="TEAttentionBackend",
            module="transformer_engine.pytorch",
            distribution="transformer-engine",
            install='pip install --no-build-isolation "transformer_engine[pytorch]" (Ampere sm_80 or newer; Hopper recommended)',
            devices=frozenset({"cuda"}),
            sm_min=(8, 0),
            dtypes=HALF_DTYPES,
            head_dim_max=256,
            head_dim_multiple=8,
            features=_EVERYTHING
            - {
                _F.kv_cache,
                _F.kv_cache_leftpad,
                _F.lse,
                _F.documents_qk,
                _F.non_causal,  # no kernel-level entry point: TE returns no LSE
                _F.deterministic,  # decided by TE at construction (NVTE_ALLOW_NONDETERMINISTIC_ALGO)
                # thd + padding_causal + window on the H200 (TE 2.20.2): forward
                # right, dq / dk / dv wrong by up to 8.9 and NaN (head_dim 256, fp16, MHA/GQA/MQA:
                # conformance/reports/NVIDIA_H200-2026-12-03-te-torch-flash_4.md)
                _F.documents_window,
            },
            ring_strategies=("zig_zag",),
            # conformance/reports/NVIDIA_H200-2026-12-03-te-torch-flash_4.md
            verified_on=frozenset({"sm_90"}),
            notes="adapter written against Transformer Engine 2.20.2 (TE chose cuDNN FusedAttention on the "
            "H200); DotProductAttention bshd, thd + cu_seqlens for documents; documents together with a "
            "sliding window refused (TE's backward was wrong there on the H200); verified on sm_90 (H200: "
            "every gpu-tier case it claims, pairwise with torch and flash_4), not on sm_80/sm_100; ring CP "
            "through TE's p2p ring "
            "(zig-zag layout, no window/documents); Ulysses through our all-to-all; CP not run on GPUs",
        ),
    )
}


def get_spec(name: str) -> BackendSpec:
    try:
        return TABLE[str(name)]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(TABLE)}") from None


def unavailable_reason(name: str, device: torch.device | str | None = None) -> str | None:
    """``None`` if backend ``name`` can run on ``device`` here, else the exact reason."""
    spec = get_spec(name)
    dev = info_for(device)
    if spec.module is not None:
        status = package_status(spec.module, spec.distribution)
        if not status:
            for alt in spec.alternative_modules:
                if package_status(alt, spec.distribution):
                    status = package_status(alt, spec.distribution)
                    break
        if not status:
            return f"{spec.module} {status.reason}; install with: {spec.install}"
    if not spec.arch_ok(dev):
        return (
            f"backend '{name}' needs {spec.arch_text()}, but this is {dev.type} {dev.name} ({dev.arch}); "
            f"on this device use: {', '.join(n for n, s in TABLE.items() if _runs_here(s, dev)) or 'torch'}"
        )
    return None


def _runs_here(spec: BackendSpec, dev: DeviceInfo) -> bool:
    """Package importable and architecture supported (no message, so no recursion through it)."""
    modules = () if spec.module is None else (spec.module, *spec.alternative_modules)
    return (not modules or any(package_status(m, spec.distribution) for m in modules)) and spec.arch_ok(dev)


def is_available(name: str, device: torch.device | str | None = None) -> bool:
    return unavailable_reason(name, device) is None


def available_backends(device: torch.device | str | None = None) -> list[str]:
    return [n for n in TABLE if unavailable_reason(n, device) is None]


def as_feature(feature: Feature | str) -> Feature:
    """``feature`` as a :class:`Feature` (no Enum call when it already is one: Dynamo 2.11 cannot
    trace that call inside a compiled forward)."""
    return feature if isinstance(feature, Feature) else Feature(feature)


def supporting(feature: Feature | str, device: torch.device | str | None = None) -> list[str]:
    """Backends whose table entry has ``feature`` (available here or not)."""
    f = as_feature(feature)
    return [n for n, s in TABLE.items() if f in s.features]


def assert_available(name: str, device: torch.device | str | None = None) -> None:
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise BackendUnavailableError(f"attention backend '{name}' is unavailable: {reason}")


def assert_feature(name: str, feature: Feature | str, detail: str = "") -> None:
    """Raise :class:`UnsupportedFeatureError` naming the backends that do support ``feature``."""
    spec = get_spec(name)
    f = as_feature(feature)
    if f in spec.features:
        return
    others = [n for n in supporting(f) if n != name]
    raise UnsupportedFeatureError(
        f"attention backend '{name}' does not support {f.value.replace('_', ' ')}{detail}; "
        f"backends that do: {', '.join(others) or 'none'}"
    )


def assert_dtype(name: str, dtype: torch.dtype) -> None:
    spec = get_spec(name)
    if dtype not in spec.dtypes:
        ok = sorted(str(d).replace("torch.", "") for d in spec.dtypes)
        raise UnsupportedFeatureError(
            f"attention backend '{name}' does not support dtype {dtype}; it needs one of {ok} "
            "(run the model under torch.autocast, or choose backend='torch')"
        )


def assert_head_dim(name: str, head_dim: int) -> None:
    spec = get_spec(name)
    if not spec.supports_head_dim(head_dim):
        raise UnsupportedFeatureError(
            f"attention backend '{name}' does not support head_dim={head_dim}; it needs a multiple of "
            f"{spec.head_dim_multiple} up to {spec.head_dim_max} (backend='torch' or backend=None takes "
            "any head_dim)"
        )

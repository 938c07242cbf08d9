"""The environment fingerprint and the capability table as the harness shows them.

Built on :mod:`olmo_attn.hardware` (cached device and package detection, the one place that asks)
and :mod:`olmo_attn.backends.capabilities` (the one table). ``olmo-attn info`` prints it; every
report embeds it.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from olmo_attn.backends import capabilities as caps
from olmo_attn.hardware import device_info, package_status

# optional packages that are not rows of the attention capability table but that the fingerprint
# reports: (label, import name, distribution name(s) to read the version from)
EXTRA_PACKAGES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("ring-flash-attn", "ring_flash_attn", ("ring-flash-attn", "ring_flash_attn")),
    ("flash-linear-attention", "fla", ("flash-linear-attention", "fla-core")),
)

NOT_VERIFIED = "not verified on this hardware"


@dataclass(frozen=True)
class BackendRow:
    """One backend in the fingerprint: version or the exact reason it cannot run here."""

    name: str
    available: bool
    version: str | None
    reason: str | None
    verified_on_hardware: bool
    devices: str
    dtypes: list[str]
    head_dim_max: int
    features: list[str]
    ring_strategies: list[str]
    notes: str = ""
    head_dims: str = ""  # "any", or "≤ 256, multiple of 8"

    @property
    def status(self) -> str:
        if not self.available:
            return f"unavailable: {self.reason}"
        return "available" + ("" if self.verified_on_hardware else f" ({NOT_VERIFIED})")


@dataclass(frozen=True)
class Fingerprint:
    """Where a conformance run happened."""

    device: str  # "cpu" | "cuda"
    device_name: str
    arch: str  # "sm_90" | "cpu"
    gpu_count: int
    driver: str | None
    cuda: str | None
    torch: str
    python: str
    platform: str
    cpu: str
    cpu_count: int
    backends: list[BackendRow] = field(default_factory=list)
    packages: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["backends"] = [dict(asdict(b), status=b.status) for b in self.backends]
        return d


def merge_fingerprints(fps: list[Fingerprint]) -> Fingerprint:
    """One machine's fingerprint from runs on it with different installs (e.g. a package added between
    two device calls): each backend/package as seen where it was available, the largest GPU count,
    verification as the capability table states it for the machine's architecture."""
    base = fps[0]
    rows: dict[str, BackendRow] = {}
    packages: dict[str, dict[str, Any]] = {}
    for fp in fps:
        for b in fp.backends:
            if b.name not in rows or (b.available and not rows[b.name].available):
                rows[b.name] = b
        for name, info in fp.packages.items():
            if name not in packages or (info.get("version") and not packages[name].get("version")):
                packages[name] = info
    backends = [
        replace(b, verified_on_hardware=caps.get_spec(b.name).verified_for(base.arch))
        if b.name in caps.TABLE
        else b
        for b in rows.values()
    ]
    return replace(base, gpu_count=max(fp.gpu_count for fp in fps), backends=backends, packages=packages)


def _nvidia_driver() -> str | None:
    """The NVIDIA driver version (``nvidia-smi``), or None without one."""
    if not torch.cuda.is_available():
        return None
    try:
        res = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    line = res.stdout.strip().splitlines()
    return line[0].strip() if res.returncode == 0 and line else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def backend_row(name: str, device: str | None = None) -> BackendRow:
    """The fingerprint row of table backend ``name`` on ``device`` (default: the machine's best)."""
    spec = caps.get_spec(name)
    reason = caps.unavailable_reason(name, device)
    version: str | None = None
    if spec.module is None:
        version = torch.__version__
    else:
        st = package_status(spec.module, spec.distribution)
        if not st:
            for alt in spec.alternative_modules:
                alt_st = package_status(alt, spec.distribution)
                if alt_st:
                    st = alt_st
                    break
        version = st.version if st else None
    return BackendRow(
        name=name,
        available=reason is None,
        version=version,
        reason=reason,
        verified_on_hardware=spec.verified_for(device_info(device).arch),  # on this machine's arch
        devices=spec.arch_text(),
        dtypes=sorted(_dtype_name(d) for d in spec.dtypes),
        head_dim_max=spec.head_dim_max,
        head_dims=spec.head_dim_text(),
        features=sorted(f.value for f in spec.features),
        ring_strategies=list(spec.ring_strategies),
        notes=spec.notes,
    )


def extra_package_rows() -> dict[str, dict[str, Any]]:
    """Version or exact reason for the non-table optional packages (ring-flash-attn, fla)."""
    out: dict[str, dict[str, Any]] = {}
    for label, module, dists in EXTRA_PACKAGES:
        st = package_status(module, dists[0])
        version = st.version
        if st and version is None:
            for d in dists[1:]:
                alt = package_status(module, d)
                if alt.version:
                    version = alt.version
                    break
        out[label] = {
            "module": module,
            "available": bool(st),
            "version": version,
            "reason": st.reason,
            "verified_on_hardware": False,
        }
    return out


def fingerprint(device: str | None = None) -> Fingerprint:
    """Fingerprint this machine (``device``: "cpu", "cuda" or None for the best one here)."""
    dev = device_info(device)
    return Fingerprint(
        device=dev.type,
        device_name=dev.name,
        arch=dev.arch,
        gpu_count=torch.cuda.device_count() if torch.cuda.is_available() else 0,
        driver=_nvidia_driver(),
        cuda=torch.version.cuda,
        torch=torch.__version__,
        python=sys.version.split()[0],
        platform=platform.platform(),
        cpu=_cpu_name(),
        cpu_count=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1),
        backends=[backend_row(n, device) for n in caps.TABLE],
        packages=extra_package_rows(),
    )


def format_fingerprint(fp: Fingerprint) -> list[str]:
    """Plain-text lines describing ``fp`` (used by ``olmo-attn info`` and the Markdown report)."""
    name = fp.cpu if fp.device == "cpu" else fp.device_name
    lines = [
        f"device: {fp.device} {name} ({fp.arch})" + (f", {fp.gpu_count} GPU(s)" if fp.gpu_count else ""),
        f"driver: {fp.driver or 'n/a'}   CUDA: {fp.cuda or 'n/a'}   torch: {fp.torch}   python: {fp.python}",
        f"cpu: {fp.cpu} ({fp.cpu_count} cores)   platform: {fp.platform}",
    ]
    return lines


def capability_rows(fp: Fingerprint) -> list[dict[str, str]]:
    """One row per backend/package: name, version, status (availability / verification), what it supports."""
    rows = []
    for b in fp.backends:
        rows.append(
            {
                "backend": b.name,
                "version": b.version or "-",
                "status": "available" if b.available else f"unavailable: {b.reason}",
                "verified": "yes" if b.verified_on_hardware else NOT_VERIFIED,
                "runs on": b.devices,
                "dtypes": ", ".join(b.dtypes),
                "head_dim": b.head_dims or f"<= {b.head_dim_max}",
                "features": ", ".join(b.features),
            }
        )
    for label, p in fp.packages.items():
        rows.append(
            {
                "backend": label,
                "version": p["version"] or "-",
                "status": "available" if p["available"] else f"unavailable: {p['reason']}",
                "verified": NOT_VERIFIED,
                "runs on": "CUDA",
                "dtypes": "",
                "head_dim": "",
                "features": "ring CP kernels" if label == "ring-flash-attn" else "Gated DeltaNet kernels",
            }
        )
    return rows

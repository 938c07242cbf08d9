"""What the harness tests: one :class:`Subject` per attention backend, plus a registry hook.

The shipped subjects are the rows of :data:`olmo_attn.backends.capabilities.TABLE`; their
capabilities *are* the table entries. :func:`register_subject` adds more (the harness's own tests
register deliberately wrong backends through it; a third-party backend can be checked the same way).
A registered subject carries its own :class:`BackendSpec`, so the case matrix is still generated
from a capability declaration, never from a second list.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from olmo_attn.backends import capabilities as caps
from olmo_attn.backends.capabilities import BackendSpec

BackendFactory = Callable[
    ..., Any
]  # (head_dim, n_heads, n_kv_heads, scale, dropout_p, window_size) -> backend
ModuleHook = Callable[[torch.nn.Module], torch.nn.Module]

# the backend module of each table entry (mirrors AttentionBackendName.get_class)
_BACKEND_MODULES = {
    "torch": "olmo_attn.backends.torch_backend",
    "flash_2": "olmo_attn.backends.flash2",
    "flash_3": "olmo_attn.backends.flash3",
    "flash_4": "olmo_attn.backends.flash4",
    "te": "olmo_attn.backends.te",
}


@dataclass(frozen=True)
class Subject:
    """One backend under test.

    Attributes:
        name: the row name in reports (a table name, or a registered test name).
        spec: its capabilities; cases are generated from ``spec.features`` / ``dtypes`` / head dims.
        backend_factory: builds an ``AttentionBackend``-compatible module with the keyword arguments of
            ``AttentionBackendName.build`` (``head_dim, n_heads, n_kv_heads, scale, dropout_p,
            window_size``).
        table_name: the ``AttentionBackendName`` modules are built with (``Attention(backend=...)``);
            a registered subject then has its ``backend_factory`` product swapped in, and
            ``module_hook`` (if any) applied to the built module.
        module_hook: test-only hook to alter a built ``Attention``/``FusedAttention``/... module.
        availability: ``device -> None | reason``; default: the capability table's
            ``unavailable_reason`` plus the backend module's import.
        shipped: True for the table's own backends.
    """

    name: str
    spec: BackendSpec
    backend_factory: BackendFactory
    table_name: str = "torch"
    module_hook: ModuleHook | None = None
    availability: Callable[[str], str | None] | None = None
    shipped: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def verified_on_hardware(self) -> bool:
        return bool(self.spec.verified_on_hardware)

    def verified_for(self, arch: str | None) -> bool:
        """The table lists this backend as verified on device tag ``arch`` (``None``: on any)."""
        return self.spec.verified_for(arch)

    def unavailable_reason(self, device: str) -> str | None:
        """``None`` if this subject can run on ``device`` ("cpu" / "cuda"), else the exact reason."""
        if device == "cuda" and not torch.cuda.is_available():
            return "no CUDA device on this machine (torch.cuda.is_available() is False)"
        if self.availability is not None:
            return self.availability(device)
        return None

    def build_backend(self, **kwargs: Any) -> Any:
        return self.backend_factory(**kwargs)


def _import_reason(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as e:  # a missing or broken backend module is a skip reason, shown verbatim
        return f"{module} does not import: {type(e).__name__}: {e}"
    return None


def _table_subject(name: str) -> Subject:
    spec = caps.TABLE[name]

    def factory(**kwargs: Any) -> Any:
        from olmo_attn.backends.base import AttentionBackendName

        return AttentionBackendName(name).build(**kwargs)

    def availability(device: str) -> str | None:
        if device not in spec.devices:
            return f"backend '{name}' does not run on {device} (its table entry says {spec.arch_text()})"
        reason = caps.unavailable_reason(name, "cuda" if device == "cuda" else "cpu")
        if reason is not None:
            return reason
        return _import_reason(_BACKEND_MODULES[name])

    return Subject(
        name=name,
        spec=spec,
        backend_factory=factory,
        table_name=name,
        availability=availability,
        shipped=True,
    )


_REGISTERED: dict[str, Subject] = {}


def register_subject(subject: Subject) -> None:
    """Add ``subject`` to every later case matrix (replacing one of the same name)."""
    if subject.name in caps.TABLE:
        raise ValueError(
            f"subject name {subject.name!r} is a capability-table backend; register it under another name"
        )
    _REGISTERED[subject.name] = subject


def unregister_subject(name: str) -> None:
    _REGISTERED.pop(name, None)


@contextlib.contextmanager
def registered(*subjects: Subject) -> Iterator[None]:
    """Register ``subjects`` for the duration of a ``with`` block."""
    for s in subjects:
        register_subject(s)
    try:
        yield
    finally:
        for s in subjects:
            unregister_subject(s.name)


def all_subjects() -> list[Subject]:
    """The capability table's backends in table order, then registered ones in registration order."""
    return [_table_subject(n) for n in caps.TABLE] + list(_REGISTERED.values())


def get_subject(name: str) -> Subject:
    for s in all_subjects():
        if s.name == name:
            return s
    raise ValueError(
        f"unknown backend {name!r} for --backends; choose among {[s.name for s in all_subjects()]}"
    )


def gdn_unavailable_reason(impl: str, device: str) -> str | None:
    """Why Gated DeltaNet implementation ``impl`` (``torch``, ``triton``, ``fla``: the gdn family's rows)
    cannot run on ``device`` here (None: it can)."""
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device on this machine (torch.cuda.is_available() is False)"
    if impl == "torch":
        return None
    if impl == "triton":
        from olmo_attn.recurrent.triton_chunk import triton_available

        if device != "cuda":
            return "our Triton kernels run on CUDA here (on CPU only under TRITON_INTERPRET=1, in the tests)"
        return None if triton_available() else "triton is not importable"
    from olmo_attn.recurrent.fla import fla_kernel_usable

    ok_, reason = fla_kernel_usable(torch.device(device), torch.bfloat16, backward=True)
    return None if ok_ else reason

"""What the three attention modules share: argument checks, weight initialisation, backend
ownership (:class:`BackendMixin`), RoPE rows under ``torch.compile`` and the tensor-parallel styles."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ..backends.base import AttentionBackend, AttentionBackendName
from ..backends.capabilities import Feature
from ..exceptions import ConfigurationError

if TYPE_CHECKING:
    pass


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def choice_dtype(param_dtype: torch.dtype) -> torch.dtype | None:
    """Activation dtype to choose a backend for: half-precision parameters mean half-precision
    activations; float32 parameters usually run under autocast, so the dtype is left open (the
    module re-chooses at the first forward if the activations turn out to be float32)."""
    return param_dtype if param_dtype in (torch.bfloat16, torch.float16) else None


def resolve_backend_name(
    backend: AttentionBackendName | str | None, use_flash: bool | None
) -> AttentionBackendName | None:
    """Coerce ``backend`` and apply the deprecated ``use_flash`` alias (the first steps of backend selection)."""
    if backend is not None and not isinstance(backend, AttentionBackendName):
        try:
            backend = AttentionBackendName(backend)
        except ValueError:
            raise ConfigurationError(
                f"backend={backend!r} is not an attention backend; choose one of "
                f"{[b.value for b in AttentionBackendName]} (or None for automatic choice)"
            ) from None
    if use_flash:
        if backend is not None and backend != AttentionBackendName.flash_2:
            raise ConfigurationError(
                f"use_flash=True conflicts with backend='{backend}'; use_flash is a deprecated alias "
                "for backend='flash_2': drop use_flash"
            )
        if backend is None:
            warnings.warn(
                "'use_flash' is deprecated, use backend='flash_2' instead",
                DeprecationWarning,
                stacklevel=3,
            )
            backend = AttentionBackendName.flash_2
    return backend


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigurationError(f"{name}={value!r} must be a positive int")
    return value


def init_linear(m: nn.Linear, std: float, generator: torch.Generator | None) -> None:
    """Truncated normal (mean 0, ``std``, cut at ±3·std) weight, zero bias; DTensor-aware."""
    init_trunc_normal(m.weight, std, generator)
    if m.bias is not None:
        with torch.no_grad():
            m.bias.zero_()


def init_trunc_normal(p: torch.Tensor, std: float, generator: torch.Generator | None) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if not isinstance(p, DTensor):
            nn.init.trunc_normal_(p, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)
            return
        # initialise the full tensor (same RNG draws as unsharded), then keep this rank's shard
        full = torch.zeros(p.shape, dtype=p.dtype, device=p.device)
        nn.init.trunc_normal_(full, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)
        full = distribute_tensor(full, p.device_mesh, p.placements)  # rank 0's draw, sharded
        p.to_local().copy_(full.to_local())


def init_method_name(init_method: Any) -> str:
    name = str(getattr(init_method, "value", init_method))
    valid = ("normal", "normalized", "llama", "llama_depth", "fan_in")
    if name not in valid:
        raise ValueError(f"init_method={init_method!r} is not one of {list(valid)}")
    return name


# ---------------------------------------------------------------------------------------------
# backend ownership shared by the three modules
# ---------------------------------------------------------------------------------------------
class BackendMixin:
    """Builds the backend, explicitly or by automatic choice, and re-chooses an automatically
    chosen backend when the actual inputs (device type / dtype) are outside its capabilities."""

    backend: AttentionBackend
    _backend_kwargs: dict[str, Any]
    _backend_features: tuple[Feature, ...]
    _backend_auto: bool

    def _setup_backend(
        self,
        name: AttentionBackendName | None,
        *,
        features: Iterable[Feature],
        param_dtype: torch.dtype,
        head_dim: int,
        **backend_kwargs: Any,
    ) -> None:
        from ..backends.registry import select_backend

        self._backend_features = tuple(features)
        self._backend_kwargs = dict(head_dim=head_dim, **backend_kwargs)
        # a named backend that cannot run here falls back to the automatic choice with a warning
        # (OLMO_ATTN_STRICT_BACKEND=1: BackendUnavailableError); the choice is logged at INFO
        choice = select_backend(
            name,
            self._backend_features,
            device=default_device(),
            dtype=choice_dtype(param_dtype),
            head_dim=head_dim,
        )
        self._backend_auto = choice.auto
        self.backend = self._build_backend(AttentionBackendName(choice.name))

    def _build_backend(self, name: AttentionBackendName) -> AttentionBackend:
        name.assert_supported()  # BackendUnavailableError naming the package / hardware and the fix
        cls = name.get_class()
        for feature in self._backend_features:  # UnsupportedFeatureError naming backends that have it
            cls.assert_supports(feature)
        return name.build(**self._backend_kwargs)

    def _backend_for(self, x: torch.Tensor) -> AttentionBackend:
        """The backend to run ``x`` (activations, any layout) on; re-chooses an automatic one."""
        backend = self.backend
        if not self._backend_auto or backend.cp_enabled:
            return backend
        spec = backend.spec()
        if x.device.type in spec.devices and x.dtype in spec.dtypes:
            return backend
        from ..backends.registry import choose_backend

        name = AttentionBackendName(
            choose_backend(
                self._backend_features,
                device=x.device,
                dtype=x.dtype,
                head_dim=self._backend_kwargs["head_dim"],
            )
        )
        new = self._build_backend(name)
        new.train(backend.training)
        self.backend = new
        return new


def traced_rope_rows(
    rope: nn.Module, positions: torch.Tensor, n_rows: int, x: torch.Tensor
) -> dict[str, torch.Tensor]:
    """While ``torch.compile`` traces: the RoPE table rows of ``positions [N]`` (a device tensor,
    every value below ``n_rows``), as the ``pos_sin``/``pos_cos`` (or ``freqs_cis``) keywords of
    ``rope``; row ``j`` belongs to token ``j``. The same tables and rows the module builds itself
    from host positions, so the rotation is the same, without reading a position on the host."""
    from ..rope import _compute_dtype, _table_dtype

    dtype = _table_dtype(_compute_dtype(x.dtype, rope.full_precision))
    tables = rope._get_rotary_embedding(n_rows, x.device, dtype)
    if isinstance(tables, torch.Tensor):  # complex RoPE: freqs_cis
        (rows,) = rope._gather_rows([tables], positions, x.device)
        return {"freqs_cis": rows}
    sin, cos = rope._gather_rows(list(tables), positions, x.device)
    return {"pos_sin": sin, "pos_cos": cos}


def sequence_parallel(output_layout: Any) -> Any:
    """torch's ``SequenceParallel`` (input sharded on the sequence, replicated parameters) whose
    output is re-laid-out as ``output_layout`` and returned as a local tensor."""
    from functools import partial

    from torch.distributed.tensor import distribute_module
    from torch.distributed.tensor.parallel import SequenceParallel

    class _SequenceParallelTo(SequenceParallel):
        def __init__(self, layout: Any):
            super().__init__(sequence_dim=1, use_local_output=True)
            self.layout = layout

        @staticmethod
        def _to_layout(layout: Any, mod: nn.Module, outputs: Any, device_mesh: Any) -> torch.Tensor:
            if outputs.placements != (layout,):
                outputs = outputs.redistribute(placements=(layout,))
            return outputs.to_local()

        def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
            return distribute_module(
                module,
                device_mesh,
                self._replicate_module_fn,
                partial(self._prepare_input_fn, self.sequence_sharding),
                partial(self._to_layout, self.layout),
            )

    return _SequenceParallelTo(output_layout)


def tp_styles(float8_enabled: bool) -> tuple[Any, Any, Any]:
    """``(rowwise, colwise, prepare_module_input)`` parallel styles, float8 variants via torchao."""
    if not float8_enabled:
        from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel

        return RowwiseParallel, ColwiseParallel, PrepareModuleInput
    try:
        from torchao.float8.float8_tensor_parallel import (
            Float8ColwiseParallel,
            Float8RowwiseParallel,
            PrepareFloat8ModuleInput,
        )
    except ImportError as e:
        raise ImportError(
            "float8_enabled=True needs torchao (pip install torchao); or call apply_tp(float8_enabled=False)"
        ) from e
    return Float8RowwiseParallel, Float8ColwiseParallel, PrepareFloat8ModuleInput

"""``SequenceMixer`` / ``SequenceMixerConfig``: the common base of attention and recurrent mixers."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch.nn as nn

from .config import Config, Registrable
from .exceptions import ConfigurationError

if TYPE_CHECKING:
    from .buffer_cache import BufferCache

M = TypeVar("M", bound="SequenceMixer")


class SequenceMixer(nn.Module):
    """A layer that mixes information along the sequence (attention, Gated DeltaNet)."""

    def apply_tp(
        self,
        tp_mesh: Any,
        input_layout: Any = None,
        output_layout: Any = None,
        use_local_output: bool = True,
        float8_enabled: bool = False,
    ) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support tensor parallelism")

    def apply_cp(self, cp_mesh: Any, ring: Any = None, uly: Any = None) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support context parallelism")

    def num_flops_per_token(self, seq_len: int) -> int:
        raise NotImplementedError

    def init_weights(
        self,
        *,
        init_method: Any,
        d_model: int,
        block_idx: int,
        num_blocks: int,
        std: float = 0.02,
        generator: Any = None,
    ) -> None:
        raise NotImplementedError


@dataclasses.dataclass
class SequenceMixerConfig(Config, Registrable, Generic[M]):
    """Registrable config of a sequence mixer; ``type`` names the registered subclass."""

    def num_params(self, d_model: int) -> int:
        raise NotImplementedError

    def build(
        self,
        d_model: int,
        *,
        layer_idx: int,
        n_layers: int,
        init_device: str = "cpu",
        cache: BufferCache | None = None,
    ) -> M:
        raise NotImplementedError

    @classmethod
    def from_dict(cls, data: dict[str, Any]):  # type: ignore[override]
        """Build the registered subclass named by ``data["type"]`` (or ``cls`` itself)."""
        data = dict(data)
        name = data.get("type")
        target: type = cls
        if name is not None and cls is SequenceMixerConfig:
            target = cls.resolve(name)
            if target.__dict__.get("from_dict") is not None:  # the subclass's own loader
                return target.from_dict(data)
        elif name is not None and getattr(cls, "_registered_name", name) != name:
            raise ConfigurationError(
                f"{cls.__name__}.from_dict got type={name!r}, expected {cls._registered_name!r}"
            )
        return Config.from_dict.__func__(target, data)  # type: ignore[attr-defined]

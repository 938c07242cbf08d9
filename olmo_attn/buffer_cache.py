"""``BufferCache``: tensors shared between modules without registering them as module buffers.

OLMo-core keeps RoPE tables and backend masks out of ``nn.Module`` buffers so that FSDP neither
shards nor synchronises them. A cache is a mapping of namespaces to ``{key: tensor}``;
:meth:`BufferCache.with_namespace` returns a view over the *same* storage that reads and writes
only one namespace, so identically configured modules share buffers and differently configured ones
do not.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, MutableMapping

import torch


class BufferCache(MutableMapping[str, torch.Tensor]):
    """A namespaced ``str -> Tensor`` mapping; a fresh cache uses namespace ``""``.

    Args:
        namespace: the namespace this view reads and writes.
    """

    def __init__(self, namespace: str = ""):
        self._data: defaultdict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        self._namespace = namespace

    @property
    def namespace(self) -> str:
        return self._namespace

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._data[self._namespace][key]

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self._data[self._namespace][key] = value

    def __delitem__(self, key: str) -> None:
        del self._data[self._namespace][key]

    def __iter__(self) -> Iterator[str]:
        # a snapshot, so callers may write while iterating
        yield from list(self._data[self._namespace].keys())

    def __len__(self) -> int:
        return len(self._data[self._namespace])

    def __repr__(self) -> str:
        return f"BufferCache(namespace={self._namespace!r}, keys={sorted(self)})"

    def get_for_device(self, key: str, device: torch.device | str) -> torch.Tensor | None:
        """The tensor under ``key`` on ``device`` (moved there and re-stored if needed), or ``None``."""
        tensor = self.get(key)
        if tensor is None:
            return None
        device = torch.device(device)
        if tensor.device != device:
            tensor = tensor.to(device)
            self[key] = tensor
        return tensor

    def with_namespace(self, namespace: str) -> BufferCache:
        """A view over the same storage that reads and writes only ``namespace``."""
        out = BufferCache(namespace=namespace)
        out._data = self._data
        return out

    def namespaces(self) -> list[str]:
        """Every namespace that holds at least one tensor."""
        return sorted(ns for ns, d in self._data.items() if d)

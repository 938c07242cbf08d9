"""Config base class, ``StrEnum`` and ``DType``.

Configs are dataclasses with ``as_dict`` / ``from_dict`` and JSON / YAML round trips. ``from_dict``
accepts the dict shape OLMo-core configs serialise to: a ``_CLASS_`` key (the class path) is
ignored when the target class is known, and registrable configs carry a ``type`` discriminator.

``as_config_dict`` writes the dict OLMo-core puts into checkpoints and experiment configs. For the
configs that have an OLMo-core twin with the same fields (attention, gate, sliding window, RoPE and
its scalings, layer norm) its ``_CLASS_`` names OLMo-core's class, so that
``olmo_core.nn.attention.AttentionConfig.from_dict(ours.as_config_dict())`` rebuilds the config in
OLMo-core, and our ``from_dict`` reads the same dict back. ``as_dict(include_class_name=True)`` keeps
our own class paths.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from typing import Any, ClassVar, TypeVar

import torch

from .exceptions import ConfigurationError, ConfigValueError, InvalidEnumValueError

C = TypeVar("C", bound="Config")

# our config classes whose OLMo-core twin takes the same fields: ``as_config_dict`` names the twin
OLMO_CORE_CLASS_PATHS: dict[str, str] = {
    **{
        f"olmo_attn.attention.config.{n}": f"olmo_core.nn.attention.{n}"
        for n in ("AttentionConfig", "SlidingWindowAttentionConfig", "GateConfig")
    },
    **{
        f"olmo_attn.rope.{n}": f"olmo_core.nn.rope.{n}"
        for n in (
            "RoPEConfig",
            "ABFRoPEScalingConfig",
            "PIRoPEScalingConfig",
            "StepwiseRoPEScalingConfig",
            "YaRNRoPEScalingConfig",
        )
    },
    "olmo_attn.norm.LayerNormConfig": "olmo_core.nn.layer_norm.LayerNormConfig",
}


class StrEnum(str, enum.Enum):
    """String-valued enum: members equal their value and ``str(member) == member.value``."""

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return f"'{self.value}'"

    @classmethod
    def _missing_(cls, value: object) -> StrEnum:
        # Enum.__call__ re-raises what _missing_ raises: a typed error listing the valid values
        raise InvalidEnumValueError(
            f"{value!r} is not a valid {cls.__name__}; valid values are {[m.value for m in cls]}",
            enum_cls=cls,
            value=value,
        )


class DType(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float64 = "float64"

    @classmethod
    def from_pt(cls, dtype: torch.dtype) -> DType:
        for member in cls:
            if member.as_pt() == dtype:
                return member
        raise ConfigValueError(f"dtype={dtype} has no DType member; use one of {[m.value for m in cls]}")

    def as_pt(self) -> torch.dtype:
        return getattr(torch, self.value)


def _is_config_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(tp: Any, value: Any) -> Any:
    """Convert ``value`` (plain JSON data) to the annotated type ``tp``."""
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        for arg in args:  # first that accepts the value without error
            try:
                return _coerce(arg, value)
            except (TypeError, ValueError, ConfigurationError):
                continue
        return value
    if origin in (list, tuple, typing.List, typing.Tuple):  # noqa: UP006
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        items = [_coerce(inner, v) for v in value]
        return items if origin in (list, typing.List) else tuple(items)  # noqa: UP006
    if origin is dict:
        _, vt = typing.get_args(tp) or (Any, Any)
        return {k: _coerce(vt, v) for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return value if isinstance(value, tp) else tp(value)
    if _is_config_type(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return tp.from_dict(value) if hasattr(tp, "from_dict") else tp(**value)
    if tp is torch.dtype and isinstance(value, str):
        return DType(value.replace("torch.", "")).as_pt()
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _to_plain(
    value: Any, *, exclude_none: bool, include_class_name: bool, json_safe: bool, recurse: bool
) -> Any:
    if isinstance(value, Config):
        if not recurse:
            return value
        return value.as_dict(
            exclude_none=exclude_none,
            include_class_name=include_class_name,
            json_safe=json_safe,
            recurse=True,
        )
    if isinstance(value, enum.Enum):
        return value.value if json_safe else value
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "") if json_safe else value
    if isinstance(value, (list, tuple)):
        out = [
            _to_plain(
                v,
                exclude_none=exclude_none,
                include_class_name=include_class_name,
                json_safe=json_safe,
                recurse=recurse,
            )
            for v in value
        ]
        return out if (json_safe or isinstance(value, list)) else tuple(out)
    if isinstance(value, dict):
        return {
            k: _to_plain(
                v,
                exclude_none=exclude_none,
                include_class_name=include_class_name,
                json_safe=json_safe,
                recurse=recurse,
            )
            for k, v in value.items()
        }
    return value


def _olmo_core_class_paths(value: Any) -> Any:
    """``value`` with every ``_CLASS_`` of :data:`OLMO_CORE_CLASS_PATHS` replaced by OLMo-core's path."""
    if isinstance(value, dict):
        out = {k: _olmo_core_class_paths(v) for k, v in value.items()}
        path = out.get(Config.CLASS_NAME_FIELD)
        if isinstance(path, str) and path in OLMO_CORE_CLASS_PATHS:
            out[Config.CLASS_NAME_FIELD] = OLMO_CORE_CLASS_PATHS[path]
        return out
    if isinstance(value, list):
        return [_olmo_core_class_paths(v) for v in value]
    return value


_HINTS: dict[type, dict[str, Any]] = {}


def _field_hints(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints(cls)``, cached per class (``{}`` when a hint cannot be resolved)."""
    hints = _HINTS.get(cls)
    if hints is None:
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # unresolvable forward reference: skip the generic checks
            hints = {}
        _HINTS[cls] = hints
    return hints


def _hint_members(tp: Any) -> list[Any]:
    """The alternatives of a ``Union`` / ``Optional`` hint (``[tp]`` otherwise)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(tp) if a is not type(None)]
    return [tp]


def _enum_of(tp: Any) -> type[enum.Enum] | None:
    for arg in _hint_members(tp):
        if isinstance(arg, type) and issubclass(arg, enum.Enum):
            return arg
    return None


def _config_of(tp: Any) -> type | None:
    for arg in _hint_members(tp):
        if _is_config_type(arg):
            return arg
    return None


def _name_enum_error(self: Any, err: InvalidEnumValueError) -> InvalidEnumValueError:
    """Re-raise ``err`` naming the field of ``self`` that holds the rejected value."""
    if err.field is not None:
        return err
    cls = type(self)
    for f in dataclasses.fields(self):
        tp = _field_hints(cls).get(f.name)
        value = getattr(self, f.name, None)
        if tp is not None and _enum_of(tp) is err.enum_cls and value == err.value:
            return InvalidEnumValueError(
                f"{cls.__name__}.{f.name}={err.value!r} is not a valid {err.enum_cls.__name__}; valid "
                f"values are {[m.value for m in err.enum_cls]}",
                enum_cls=err.enum_cls,
                value=err.value,
                field=f"{cls.__name__}.{f.name}",
            )
    return err


def _build_nested(self: Any) -> None:
    """Turn dict values of config-typed fields into configs (so nested values are checked now)."""
    cls = type(self)
    for f in dataclasses.fields(self):
        value = getattr(self, f.name, None)
        if not isinstance(value, dict):
            continue
        sub = _config_of(_field_hints(cls).get(f.name, Any))
        if sub is None:
            continue
        try:
            built = sub.from_dict(value) if hasattr(sub, "from_dict") else sub(**value)
        except InvalidEnumValueError as e:
            raise InvalidEnumValueError(
                f"{cls.__name__}.{f.name}: {e}", enum_cls=e.enum_cls, value=e.value, field=e.field
            ) from None
        object.__setattr__(self, f.name, built)


def _check_enum_fields(self: Any) -> None:
    """Convert string values of enum-typed fields to members; a typo names the field."""
    cls = type(self)
    for f in dataclasses.fields(self):
        value = getattr(self, f.name, None)
        if not isinstance(value, str):
            continue
        enum_cls = _enum_of(_field_hints(cls).get(f.name, Any))
        if enum_cls is None or isinstance(value, enum_cls):
            continue
        if str in _hint_members(_field_hints(cls)[f.name]):
            continue  # the field also accepts plain strings
        try:
            object.__setattr__(self, f.name, enum_cls(value))
        except InvalidEnumValueError as e:
            raise _name_enum_error(self, e) from None


def _wrap_post_init(fn: Any) -> Any:
    def __post_init__(self: Any, *args: Any, **kwargs: Any) -> None:
        _build_nested(self)
        try:
            fn(self, *args, **kwargs)
        except InvalidEnumValueError as e:
            raise _name_enum_error(self, e) from None
        _check_enum_fields(self)

    __post_init__.__wrapped__ = fn  # type: ignore[attr-defined]
    __post_init__.__doc__ = fn.__doc__
    __post_init__.__qualname__ = getattr(fn, "__qualname__", "__post_init__")
    return __post_init__


@dataclasses.dataclass
class Config:
    """Base class of every config: a dataclass with dict / JSON / YAML round trips."""

    CLASS_NAME_FIELD: ClassVar[str] = "_CLASS_"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # every config's __post_init__ first builds nested dicts into configs, and afterwards
        # converts enum-typed string fields: a typo is an InvalidEnumValueError naming the field
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is not None and not hasattr(own, "__wrapped__"):
            cls.__post_init__ = _wrap_post_init(own)  # type: ignore[method-assign]

    def __post_init__(self) -> None:
        _build_nested(self)
        _check_enum_fields(self)

    def as_dict(
        self,
        *,
        exclude_none: bool = False,
        exclude_private_fields: bool = False,
        include_class_name: bool = False,
        json_safe: bool = False,
        recurse: bool = True,
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if include_class_name:
            out[self.CLASS_NAME_FIELD] = f"{type(self).__module__}.{type(self).__qualname__}"
        for field in dataclasses.fields(self):
            if exclude_private_fields and field.name.startswith("_"):
                continue
            value = getattr(self, field.name)
            if exclude_none and value is None:
                continue
            out[field.name] = _to_plain(
                value,
                exclude_none=exclude_none,
                include_class_name=include_class_name,
                json_safe=json_safe,
                recurse=recurse,
            )
        return out

    def as_config_dict(self) -> dict[str, Any]:
        """The JSON-safe dict OLMo-core writes into checkpoints and experiment configs.

        ``_CLASS_`` names OLMo-core's class where one with the same fields exists
        (:data:`OLMO_CORE_CLASS_PATHS`), so OLMo-core's ``from_dict`` reads the dict as well as ours.
        """
        return _olmo_core_class_paths(
            self.as_dict(
                exclude_none=True, exclude_private_fields=True, include_class_name=True, json_safe=True
            )
        )

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        data = {k: v for k, v in data.items() if k != cls.CLASS_NAME_FIELD}
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigurationError(
                f"{cls.__name__}.from_dict: unknown field(s) {unknown}; valid fields are {sorted(names)}"
            )
        kwargs: dict[str, Any] = {}
        for k, v in data.items():
            try:
                kwargs[k] = _coerce(hints.get(k, Any), v)
            except InvalidEnumValueError as e:
                if e.field is not None:
                    raise
                raise InvalidEnumValueError(
                    f"{cls.__name__}.{k}={v!r} is not a valid {e.enum_cls.__name__}; valid values are "
                    f"{[m.value for m in e.enum_cls]}",
                    enum_cls=e.enum_cls,
                    value=v,
                    field=f"{cls.__name__}.{k}",
                ) from None
        return cls(**kwargs)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.as_dict(json_safe=True, exclude_none=True), **kwargs)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        return cls.from_dict(json.loads(text))

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.as_dict(json_safe=True, exclude_none=True), sort_keys=False)

    @classmethod
    def from_yaml(cls: type[C], text: str) -> C:
        import yaml

        return cls.from_dict(yaml.safe_load(text))

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)


class Registrable:
    """Mixin for config families with a ``type`` discriminator (``SequenceMixerConfig``).

    ``@Base.register("attention")`` records a subclass; ``Base.from_dict({"type": "attention", ...})``
    builds it. Subclasses' ``from_dict`` ignores a matching ``type`` key.
    """

    _registry: ClassVar[dict[str, type]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "_registry" not in cls.__dict__ and not any("_registry" in b.__dict__ for b in cls.__mro__[1:]):
            cls._registry = {}

    @classmethod
    def register(cls, name: str):
        def deco(sub: type) -> type:
            cls._registry[name] = sub
            sub._registered_name = name  # type: ignore[attr-defined]
            return sub

        return deco

    @classmethod
    def resolve(cls, name: str) -> type:
        try:
            return cls._registry[name]
        except KeyError:
            raise ConfigurationError(
                f"unknown {cls.__name__} type={name!r}; registered types are {sorted(cls._registry)}"
            ) from None

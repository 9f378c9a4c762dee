"""Model registry: ``@register_model("name", Config)`` and ``create_model(name, cfg, info)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from aftrec.errors import ConfigError

if TYPE_CHECKING:
    from aftrec.data.dataset import DataInfo
    from aftrec.models.base import RetrievalModel

_MODELS: dict[str, tuple[type[RetrievalModel], type[Any]]] = {}
M = TypeVar("M", bound="type[RetrievalModel]")


def register_model(name: str, config_cls: type[Any]) -> Callable[[M], M]:
    def deco(cls: M) -> M:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = (cls, config_cls)
        cls.name = name
        return cls

    return deco


def _ensure_loaded() -> None:
    import aftrec.models  # noqa: F401  (registers the built-in models)


def available_models() -> list[str]:
    _ensure_loaded()
    return sorted(_MODELS)


def _entry(name: str) -> tuple[type[RetrievalModel], type[Any]]:
    _ensure_loaded()
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(sorted(_MODELS))}")
    return _MODELS[name]


def model_class(name: str) -> type[RetrievalModel]:
    return _entry(name)[0]


def model_config_class(name: str) -> type[Any]:
    return _entry(name)[1]


def create_model(name: str, cfg: Any, info: DataInfo, history_len: int) -> RetrievalModel:
    cls, _ = _entry(name)
    return cls(cfg, info, history_len)

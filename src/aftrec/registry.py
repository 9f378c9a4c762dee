"""Model registry: ``@register_model("name", Config, ...)`` and ``create_model(name, cfg, info)``.

A registration holds every fact about a model that is not its computation: its config class,
its row name in the paper's tables, the tiny settings ``aftrec reproduce --quick`` trains it
with, the model keys its config declares inert, and the settings ``aftrec tune`` searches
(:attr:`Registration.search_space`). Built-in models register when ``aftrec.models`` is
imported, which the registry does lazily on first use; so do the modules of models kept
outside the package (:func:`model_modules`): those named by the ``aftrec.models`` entry
points of installed distributions and by the ``AFTREC_MODELS`` environment variable.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any, TypeVar

from aftrec.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """A tuned setting's range for ``aftrec tune``: a number in [low, high], drawn on a log
    scale when ``log`` (learning rates, weights), and an integer when ``integer``."""

    low: float
    high: float
    log: bool = False
    integer: bool = False

    def __post_init__(self) -> None:
        if not self.low < self.high or (self.log and self.low <= 0):
            raise ValueError(f"bad range [{self.low}, {self.high}] (log={self.log})")


#: what every trainable model tunes (``trainable = True``): Adam's learning rate and weight
#: decay (the decay on a log scale from 1e-8, which is none in effect)
TRAINED: Mapping[str, Range] = {
    "train.lr": Range(1e-4, 1e-2, log=True),
    "train.weight_decay": Range(1e-8, 1e-3, log=True),
}
#: the dropout rate, for the registrations whose config has ``dropout``
DROPOUT: Mapping[str, Range] = {"model.dropout": Range(0.0, 0.5)}

if TYPE_CHECKING:
    from aftrec.data.dataset import DataInfo
    from aftrec.models.base import RetrievalModel


@dataclass(frozen=True)
class Registration:
    name: str
    model: type[RetrievalModel]
    config: type[Any]
    #: the model's row name in the paper's Tables 2 and 3, and the row's position there (the
    #: report lists the names in that order); None for models the paper does not report
    paper_name: str | None = None
    paper_row: int | None = None
    #: ``aftrec reproduce --quick``: model-config overrides that make the model tiny
    quick: Mapping[str, str] = field(default_factory=dict)
    #: model keys that do not change what this registration computes: never read (G's keys for
    #: a model without G) or read for memory only (a scoring block's size): a saved run whose
    #: config differs only in them is the same run
    inert_keys: tuple[str, ...] = ()
    #: ``aftrec tune``: the model's own tuned settings (config key -> range), searched beside
    #: :data:`TRAINED` for a trainable model (:attr:`search_space`)
    tune: Mapping[str, Range] = field(default_factory=dict)
    #: ``--set`` pairs every trial and every tuned run carries (EASE: ``model.l2_grid=[]``, so
    #: that the drawn L2 is fitted instead of the grid)
    tune_fixed: tuple[str, ...] = ()

    @property
    def search_space(self) -> dict[str, Range]:
        """Config key -> range of every setting ``aftrec tune`` searches for this model;
        empty for a model with nothing to tune (pop: one trial is the whole study)."""
        return {**(TRAINED if self.model.trainable else {}), **self.tune}

    @property
    def deterministic(self) -> bool:
        """Fitted in closed form: one run stands for every seed."""
        return not self.model.trainable


_MODELS: dict[str, Registration] = {}
M = TypeVar("M", bound="type[RetrievalModel]")


def register_model(
    name: str,
    config_cls: type[Any],
    *,
    paper_name: str | None = None,
    paper_row: int | None = None,
    quick: Mapping[str, str] | None = None,
    inert_keys: tuple[str, ...] = (),
    tune: Mapping[str, Range] | None = None,
    tune_fixed: tuple[str, ...] = (),
) -> Callable[[M], M]:
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = [k for k in tune or {} if k.startswith("model.") and k[6:] not in fields]
    if unknown:
        raise RegistrationError(f"model {name!r}: tuned key(s) {unknown} are not in its config")

    def deco(cls: M) -> M:
        known = _MODELS.get(name)
        # the same class defined again (its module reloaded, a notebook cell run twice)
        # replaces its registration; another class under a taken name is refused
        if known is not None and _where(known.model) != _where(cls):
            raise RegistrationError(
                f"model {name!r} is registered twice: by {'.'.join(_where(known.model))} and "
                f"{'.'.join(_where(cls))}; give one of them another name"
            )
        _MODELS[name] = Registration(
            name, cls, config_cls, paper_name, paper_row, dict(quick or {}), inert_keys,
            dict(tune or {}), tune_fixed,
        )  # fmt: skip
        cls.name = name
        return cls

    return deco


#: the entry-point group, and the environment variable, naming modules of models kept outside
#: the package
ENTRY_POINTS = "aftrec.models"
ENV = "AFTREC_MODELS"
_loaded: str | None = None  # the $AFTREC_MODELS the models were loaded with


class RegistrationError(ConfigError, ValueError):
    """A registration refused: a name taken by another class, tuned keys not in the config
    (a ``ValueError`` as well, as :func:`register_model` raised before)."""


def model_modules() -> list[tuple[str, str, Callable[[], Any]]]:
    """(where it is named, what, how to load it) of every module of models kept outside the
    package: the ``aftrec.models`` entry points of installed distributions
    (``name = "pkg.module"``, or ``"pkg.module:attr"``), then the comma-separated modules of
    ``$AFTREC_MODELS`` (found on ``sys.path``)."""
    found: list[tuple[str, str, Callable[[], Any]]] = [
        (f"entry point {ep.name!r} of {ep.dist.name if ep.dist else 'a distribution'}",
         ep.value, ep.load)
        for ep in metadata.entry_points(group=ENTRY_POINTS)
    ]  # fmt: skip
    named = (m.strip() for m in os.environ.get(ENV, "").split(","))
    return found + [
        (f"${ENV}", module, functools.partial(importlib.import_module, module))
        for module in named
        if module
    ]


def _ensure_loaded() -> None:
    """Register the built-in models, then those of :func:`model_modules`. By name, at first
    use (and again when ``$AFTREC_MODELS`` has changed since): the registry sits below the
    models in the layers (each model imports :func:`register_model`)."""
    global _loaded
    wanted = os.environ.get(ENV, "")
    if _loaded == wanted:
        return
    importlib.import_module("aftrec.models")
    for where, what, load in model_modules():
        try:
            load()
        except RegistrationError:
            raise  # its own message names both classes
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ConfigError(
                f"cannot import model module {what!r} ({where}): "
                f"{type(exc).__name__}{': ' + first if first else ''}"
            ) from exc
    _loaded = wanted


def _where(cls: type) -> tuple[str, str]:
    return cls.__module__, cls.__qualname__


def available_models() -> list[str]:
    _ensure_loaded()
    return sorted(_MODELS)


def registration(name: str) -> Registration:
    _ensure_loaded()
    if name not in _MODELS:
        raise ConfigError(
            f"unknown model {name!r}; available: {', '.join(sorted(_MODELS))} (a model "
            f"outside aftrec is found through ${ENV} or an {ENTRY_POINTS!r} entry point: "
            "docs/models.md)"
        )
    return _MODELS[name]


def model_class(name: str) -> type[RetrievalModel]:
    return registration(name).model


def model_config_class(name: str) -> type[Any]:
    return registration(name).config


def create_model(name: str, cfg: Any, info: DataInfo, history_len: int) -> RetrievalModel:
    return registration(name).model(cfg, info, history_len)

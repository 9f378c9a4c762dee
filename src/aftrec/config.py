"""Run configuration: frozen dataclasses, loaded from YAML plus ``key=value`` overrides.

A run's config has four sections::

    model:   {name: two-tower, dim: 64, ...}   # keys of the model's own config dataclass
    data:    {history_len: 50, n_negatives: 8}
    train:   {epochs: 20, batch_size: 256, lr: 0.001, ...}
    runtime: {threads: null, device: cpu, eval_batch_size: 1024, tracker: none,
              checkpoint_minutes: 10}  # how it runs, not what it computes

The runtime keys (``threads``, ``device``, ``eval_batch_size``, ``tracker``,
``checkpoint_minutes``) are also accepted
under ``train``, where earlier versions kept them and where ``RUN/config.yaml`` still holds
them (:func:`dump`).

Unknown sections or keys raise :class:`ConfigError` naming the key; nothing returns ``None``
for a key that does not exist. The resolved config is written into every run directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import reprlib
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import yaml

from aftrec.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Bound:
    """The range of a numeric config field, declared in its type:
    ``dim: Annotated[int, Bound(low=1)]``; ``None`` leaves that side open."""

    low: float | None = None  # value >= low
    above: float | None = None  # value > above
    below: float | None = None  # value < below


#: the usual field types: a count of at least one, a weight of at least zero, a positive
#: number, a rate in [0, 1) (dropout, mask ratios), and the shared sampled losses
#: at most 2**31 - 1 of anything a run holds or loops over (a larger count overflowed inside
#: torch or numpy with a traceback, where the memory needed would be refused anyway)
MAX_COUNT = 2**31 - 1
Count = Annotated[int, Bound(low=1, below=MAX_COUNT + 1)]
Weight = Annotated[float, Bound(low=0.0)]
Positive = Annotated[float, Bound(above=0)]
Rate = Annotated[float, Bound(low=0.0, below=1)]
Loss = Literal["softmax", "bce"]
#: where a run's config and epoch figures are also sent (:mod:`aftrec.training.tracking`)
TrackerKind = Literal["none", "tensorboard", "mlflow"]
Precision = Literal["fp32", "bf16"]
#: the device kinds a run may ask for (``cuda:N`` for one of several GPUs)
DEVICES = ("cpu", "cuda", "mps")


def check_fields(cfg: Any, section: str) -> None:
    """Raise :class:`ConfigError` naming the first field of ``cfg`` outside the bound or the
    choices (``Literal``) its type declares; ``None`` passes an optional field."""
    hints = typing.get_type_hints(type(cfg), include_extras=True)
    for f in fields(cfg):
        value, key = getattr(cfg, f.name), f"{section}.{f.name}"
        for tp in _alternatives(hints[f.name]):
            if typing.get_origin(tp) is typing.Literal and value not in typing.get_args(tp):
                choices = ", ".join(map(str, typing.get_args(tp)))
                raise ConfigError(f"config key {key} must be one of {choices}; got {_shown(value)}")
            for bound in getattr(tp, "__metadata__", ()):
                if isinstance(bound, Bound) and value is not None:
                    _check_bound(value, bound, key)


def _alternatives(tp: Any) -> tuple[Any, ...]:
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        return typing.get_args(tp)
    return (tp,)


def _check_bound(value: Any, bound: Bound, key: str) -> None:
    if bound.low is not None and value < bound.low:
        raise ConfigError(f"config key {key} must be >= {bound.low}, got {_shown(value)}")
    if bound.above is not None and value <= bound.above:
        raise ConfigError(f"config key {key} must be > {bound.above}, got {value}")
    if bound.below is not None and value >= bound.below:
        raise ConfigError(f"config key {key} must be < {bound.below}, got {value}")


@dataclass(frozen=True)
class Checked:
    """Base of the config dataclasses: the bounds and choices declared in the field types are
    checked on construction (:func:`check_fields`), then :meth:`validate` checks what involves
    several fields."""

    SECTION: ClassVar[str] = "model"

    def __post_init__(self) -> None:
        check_fields(self, self.SECTION)
        self.validate()

    def validate(self) -> None:
        """Checks across fields; none by default."""


@dataclass(frozen=True)
class DataConfig(Checked):
    SECTION: ClassVar[str] = "data"
    history_len: Count = 50  # last behaviours per domain (section 5.3)
    n_negatives: Annotated[int, Bound(low=0, below=MAX_COUNT + 1)] = (
        8  # sampled unclicked items per positive
    )


@dataclass(frozen=True)
class TrainConfig(Checked):
    SECTION: ClassVar[str] = "train"
    epochs: Count = 20
    batch_size: Count = 256  # section 5.3
    lr: Weight = 1e-3
    weight_decay: Weight = 0.0
    patience: Count = 3  # epochs without validation improvement before stopping
    valid_metric: str = "recall@50"  # averaged over domains, on the validation split
    seed: Annotated[int, Bound(low=0, below=2**63)] = 0  # numpy's and torch's seeds
    max_batches_per_epoch: Count | None = None  # cap for quick runs
    # data-parallel training (torchrun): user shards per global batch; None = one per rank
    data_shards: Count | None = None
    valid_users: Count | None = None  # validate on a fixed sample of this many users per domain
    sparse_embeddings: bool = False  # sparse gradients + lazy Adam for embedding tables
    # the loss's forward pass in float32, or under bfloat16 autocast (weights, optimiser state,
    # gradients and evaluation stay float32): aftrec.training.steps.precision_context
    precision: Precision = "fp32"

    #: keys added after runs were saved, with the values those runs computed with
    LEGACY_VALUES: ClassVar[dict[str, object]] = {"precision": "fp32"}

    def validate(self) -> None:
        self.valid_metric_n()  # checked when the config loads, not after the first epoch

    def valid_metric_n(self) -> tuple[str, int]:
        """``valid_metric`` (``recall@50``, ``ndcg@20``) and its cut-off N."""
        name, _, n = self.valid_metric.partition("@")
        if name not in ("recall", "ndcg") or not (n.isascii() and n.isdecimal()) or int(n) < 1:
            raise ConfigError(
                f"train.valid_metric must look like recall@50 or ndcg@20, got {self.valid_metric!r}"
            )
        return f"{name}@{int(n)}", int(n)  # recall@0050 is recall@50, the evaluator's key


@dataclass(frozen=True)
class RuntimeConfig(Checked):
    """How a run uses the machine. Free to differ between invocations of the same run (a
    resumed run, ``aftrec reproduce`` comparing a saved run with the one asked for): nothing
    here changes what a run computes."""

    SECTION: ClassVar[str] = "runtime"
    threads: Count | None = None  # torch intra-op threads; None = torch's default
    device: str = "cpu"
    eval_batch_size: Count = 1024  # users per evaluation batch
    tracker: TrackerKind = "none"  # also send the config and epoch figures to TensorBoard/MLflow
    # a mid-epoch last.pt after this many minutes of an epoch's training (every rank's part
    # under torchrun): a killed run loses at most that much; None = at epoch ends only
    checkpoint_minutes: Positive | None = 10.0

    def validate(self) -> None:
        kind, colon, index = self.device.partition(":")
        number = index.isascii() and index.isdecimal()
        if kind not in DEVICES or (colon and (kind == "cpu" or not number)):
            raise ConfigError(
                f"runtime.device must be cpu, cuda, cuda:N or mps, got {self.device!r}"
            )


#: the runtime keys, also accepted under ``train`` where they used to be (saved runs,
#: ``--set train.threads=1``) and where ``train.tracker`` is documented
RUNTIME_KEYS = tuple(f.name for f in fields(RuntimeConfig))


@dataclass(frozen=True)
class RunConfig:
    model_name: str
    model: Any  # the model's own frozen config dataclass
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": {"name": self.model_name, **dataclasses.asdict(self.model)},
            "data": dataclasses.asdict(self.data),
            "train": dataclasses.asdict(self.train),
            "runtime": dataclasses.asdict(self.runtime),
        }


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check / convert a YAML value to the dataclass field type."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        given = [arg for arg in args if arg is not type(None)]
        if len(given) == 1:  # X | None: X's own message
            return _coerce(value, given[0], key)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key {key!r}: {_shown(value)} is not a valid {tp}")
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key {key!r}: expected a list, got {_shown(value)}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        return tuple(_coerce(v, inner, key) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r}: expected true or false, got {_shown(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r}: expected an integer, got {_shown(value)}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer beyond any float
                number = math.inf
            if not math.isfinite(number):  # NaN passes every bound check: refuse it here
                raise ConfigError(
                    f"config key {key!r}: expected a finite number, got {_shown(value)}"
                )
            if 0 < abs(number) < sys.float_info.min:  # training flushes it to zero
                raise ConfigError(
                    f"config key {key!r}: {number!r} is below the smallest normal number "
                    f"({sys.float_info.min:.1e}), which training reads as 0"
                )
            return number
        raise ConfigError(f"config key {key!r}: expected a number, got {_shown(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key {key!r}: expected a string, got {_shown(value)}")
    return value


def build(cls: type[T], values: dict[str, Any], section: str) -> T:
    """Instantiate a config dataclass from a mapping, rejecting unknown keys."""
    if not isinstance(values, dict):
        raise ConfigError(f"config section {section!r} must be a mapping, got {_shown(values)}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        valid = (
            f"valid keys in {section!r}: {', '.join(sorted(known))}"
            if known
            else f"{section!r} has no settings here"
        )
        raise ConfigError(
            f"unknown config key(s) {', '.join(f'{section}.{k}' for k in unknown)}; {valid}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config section {section!r}: {exc}") from exc


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's core schema for numbers and booleans, the one
    every other config language follows: ``1e-3`` is a number (YAML 1.1 wants ``1.0e-3``),
    ``010`` is ten (1.1: octal eight), ``1:30`` is text (1.1: ninety), and only
    ``true``/``false`` are booleans (1.1: ``yes``, ``on``, ``off``...). A key given twice in
    one mapping is refused: which one wins is the kind of question a config must not leave
    open."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_BOOL, _INT, _FLOAT = (f"tag:yaml.org,2002:{t}" for t in ("bool", "int", "float"))
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    _INT, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789")
)
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+\.[0-9]*)(?:[eE][-+]?[0-9]+)?|[-+]?[0-9]+[eE][-+]?[0-9]+"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node))
    if text.startswith(("0o", "0x")):
        return int(text[2:], 8 if text[1] == "o" else 16)
    return int(text, 10)


_Loader.add_constructor(_INT, _construct_int)

#: the most bytes of a config file read (a config is a few hundred)
MAX_CONFIG_BYTES = 1 << 20


def _shown(value: Any) -> str:
    """``repr(value)`` cut short: an error message quotes a value, not a megabyte of it (nor
    the exponential expansion of YAML aliases)."""
    return _REPR.repr(value)


_REPR = reprlib.Repr()  # keyword arguments only from Python 3.12
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple = 2, 4, 4, 4
_REPR.maxstring, _REPR.maxother = 80, 80


def _load_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader: no Python objects
    except RecursionError as exc:  # nesting thousands deep
        raise ValueError("nested too deeply") from exc


def parse_overrides(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """``["train.lr=0.01"]`` -> ``{"train": {"lr": 0.01}}``; values are parsed as YAML."""
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"override {pair!r} must look like section.key=value")
        try:
            value = _load_yaml(raw)
        except (yaml.YAMLError, ValueError) as exc:
            said = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"override {pair!r}: the value is not valid YAML ({said})") from exc
        out.setdefault(section, {})[name] = value
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: above {MAX_CONFIG_BYTES} bytes; a config is a few hundred")
        loaded = _load_yaml(raw.decode())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a YAML text file (not UTF-8: {exc.reason})") from exc
    except (yaml.YAMLError, ValueError) as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections")
    for section, values in loaded.items():
        names = [section, *(values if isinstance(values, dict) else ())]
        odd = next((k for k in names if not isinstance(k, str)), None)
        if odd is not None:
            raise ConfigError(f"{path}: config keys are names, got {_shown(odd)}")
        if values is not None and not isinstance(values, dict):
            raise ConfigError(
                f"{path}: config section {section!r} must be a mapping, got {_shown(values)}"
            )
    return loaded


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in over.items():
        if isinstance(values, dict) and isinstance(out.get(section), dict):
            out[section] = {**out[section], **values}
        else:
            out[section] = values
    return out


def resolve(
    model_name: str | None,
    yaml_path: Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> RunConfig:
    """Defaults <- ``base`` <- YAML file <- ``--set`` overrides; then validate every key."""
    from aftrec.registry import model_config_class

    layers = [base or {}, read_yaml(yaml_path) if yaml_path else {}]
    raw: dict[str, Any] = {}
    for layer in [*layers, parse_overrides(overrides or [])]:
        raw = merge(raw, runtime_moved(layer))
    unknown = sorted(set(raw) - {"model", "data", "train", "runtime"})
    if unknown:
        raise ConfigError(
            f"unknown config section(s) {unknown}; valid: model, data, train, runtime"
        )
    model_section = dict(raw.get("model") or {})
    name = model_section.pop("name", None)
    if model_name is not None and name is not None and name != model_name:
        raise ConfigError(
            f"--model {model_name!r} disagrees with model.name {name!r} in the config"
        )
    name = model_name or name
    if not name:
        raise ConfigError("no model given: pass --model NAME or set model.name in the config")
    if not isinstance(name, str):
        raise ConfigError(f"model.name must be a model's name, got {name!r}")
    return RunConfig(
        model_name=name,
        model=build(model_config_class(name), model_section, "model"),
        data=build(DataConfig, raw.get("data") or {}, "data"),
        train=build(TrainConfig, raw.get("train") or {}, "train"),
        runtime=build(RuntimeConfig, raw.get("runtime") or {}, "runtime"),
    )


def runtime_moved(layer: dict[str, Any]) -> dict[str, Any]:
    """One config layer with the :data:`RUNTIME_KEYS` given under ``train`` moved to
    ``runtime`` (a key given in both places keeps its ``runtime`` value)."""
    train = layer.get("train")
    if not isinstance(train, dict) or not any(k in train for k in RUNTIME_KEYS):
        return layer
    moved = {k: train[k] for k in RUNTIME_KEYS if k in train}
    runtime = layer.get("runtime")
    runtime = {**moved, **runtime} if isinstance(runtime, dict) else moved
    rest = {k: v for k, v in train.items() if k not in RUNTIME_KEYS}
    return {**layer, "train": rest, "runtime": runtime}


def runtime_overrides(cfg: RunConfig) -> list[str]:
    """``cfg``'s runtime keys as ``--set`` pairs: what a resumed run takes from the command
    that resumes it (``aftrec reproduce`` and ``aftrec tune`` resume their runs with them)."""
    runtime = dataclasses.asdict(cfg.runtime)
    return [f"runtime.{k}={json.dumps(runtime[k])}" for k in RUNTIME_KEYS]


def dump(cfg: RunConfig) -> str:
    """``RUN/config.yaml``. The runtime keys are written under ``train``, the layout of the
    run directories of earlier versions, which every version reads (:func:`runtime_moved`)."""
    plain = cfg.to_dict()
    runtime = plain.pop("runtime")
    return yaml.safe_dump({**plain, "train": {**plain["train"], **runtime}}, sort_keys=False)


def plain_json(obj: Any) -> Any:
    """JSON round trip: tuples become lists, so saved and fresh configs compare equal."""
    return json.loads(json.dumps(obj))


def with_legacy_values(saved: dict[str, Any]) -> dict[str, Any]:
    """A run config saved by an earlier version, with every key it predates at the value that
    keeps what the run computed (``LEGACY_VALUES`` on the config classes, e.g. AFT's generator
    switches), not at today's default: a resumed or evaluated run goes on as it began. A config
    of this version names every key and comes back as it was."""
    from aftrec.registry import available_models, registration

    moved = runtime_moved(saved)
    model, train = moved.get("model") or {}, moved.get("train") or {}
    if not isinstance(model, dict) or not isinstance(train, dict):
        return moved  # not a config: resolve says what is wrong with it
    name = model.get("name")
    if isinstance(name, str) and name in available_models():
        model = {**getattr(registration(name).config, "LEGACY_VALUES", {}), **model}
    return {**moved, "model": model, "train": {**TrainConfig.LEGACY_VALUES, **train}}


def run_identity(cfg: dict[str, Any]) -> dict[str, Any]:
    """A run config (:meth:`RunConfig.to_dict`, or a saved one) without its ``runtime``
    section (how the run used the machine; saved runs of earlier versions hold those keys
    under ``train``) and without the model keys its registration declares inert
    (``inert_keys``, e.g. G's keys for ``aft-d``), for "same run?" comparisons. A model fitted
    in closed form (pop, EASE) reads one ``train`` key, the validation metric it picks a
    setting by: the others (epochs, learning rate, ...) are inert for it."""
    from aftrec.registry import available_models, registration

    # keys the config gained later at the values a run saved before computed with
    plain = with_legacy_values(plain_json(runtime_moved(cfg)))
    plain.pop("runtime", None)
    model, train = plain.get("model", {}), plain.get("train", {})
    name = model.get("name")
    if name in available_models():
        reg = registration(name)
        model = {k: v for k, v in model.items() if k not in reg.inert_keys}
        if not reg.model.trainable:
            train = {k: v for k, v in train.items() if k == "valid_metric"}
    return {**plain, "model": model, "train": train}

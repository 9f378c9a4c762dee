"""aftrec: multi-domain recommendation for the matching stage.

Built around AFT, "Adversarial Feature Translation for Multi-domain Recommendation"
(Hao et al., KDD 2021), with leakage-free multi-domain data preparation and
full-ranking per-domain evaluation.

The Python API (:mod:`aftrec.api`) is what the ``aftrec`` commands run::

    data = aftrec.prepare("data/syn", dataset="synthetic")
    run = aftrec.train(data, "two-tower", "runs/tt").run
    aftrec.evaluate(run).average
    aftrec.recommend(run, n=10)
    aftrec.export(run, "bundles/tt")
    aftrec.Recommender.load("bundles/tt").recommend(user="u1", n=10)

Names are imported on first use (the layers below import ``aftrec`` for its version), so
``import aftrec`` loads neither torch nor pandas.
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType
from typing import TYPE_CHECKING, Any

from aftrec.errors import (
    AftrecError,
    CheckpointError,
    ConfigError,
    DataError,
    OutputError,
    Stopped,
    TrainingError,
)

if TYPE_CHECKING:
    from aftrec.api import evaluate, export, prepare, recommend, train
    from aftrec.data.sources.synthetic import SyntheticConfig
    from aftrec.data.split import SplitConfig
    from aftrec.evaluation.evaluate import EvalResult
    from aftrec.serving.recommender import Recommendation, Recommender
    from aftrec.training.trainer import TrainResult

__version__ = "0.1.0"

_WHERE = {
    **{name: "aftrec.api" for name in ("prepare", "train", "evaluate", "recommend", "export")},
    "SyntheticConfig": "aftrec.data.sources.synthetic",
    "SplitConfig": "aftrec.data.split",
    "EvalResult": "aftrec.evaluation.evaluate",
    "Recommendation": "aftrec.serving.recommender",
    "Recommender": "aftrec.serving.recommender",
    "TrainResult": "aftrec.training.trainer",
}


if not TYPE_CHECKING:  # a type checker sees the imports above, and a typo as a typo

    def __getattr__(name: str) -> Any:
        if name in _WHERE:
            return getattr(import_module(_WHERE[name]), name)
        raise AttributeError(f"module 'aftrec' has no attribute {name!r}")


def __dir__() -> list[str]:
    """What tab completion offers: the public API (``__all__``, names imported on first use
    included), the module's dunders and the subpackages loaded so far; not its helpers."""
    loaded = {n for n, v in globals().items() if isinstance(v, ModuleType) or n.startswith("__")}
    return sorted({*__all__, *loaded})


__all__ = [
    "AftrecError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "EvalResult",
    "OutputError",
    "Recommendation",
    "Recommender",
    "SplitConfig",
    "Stopped",
    "SyntheticConfig",
    "TrainResult",
    "TrainingError",
    "__version__",
    "evaluate",
    "export",
    "prepare",
    "recommend",
    "train",
]

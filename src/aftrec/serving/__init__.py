"""Serving: export a trained model to a retrieval bundle and answer top-N requests from it.

``Recommender.load(BUNDLE).recommend(user=..., domain=..., n=200)`` in process, or
``aftrec serve --bundle BUNDLE`` over HTTP (:mod:`aftrec.serving.api`); bundles are written
by ``aftrec export`` (:mod:`aftrec.serving.bundle`); nearest-neighbour search is
:mod:`aftrec.serving.index`. See docs/serving.md.

Names are imported on first use, so that building the CLI parser does not load torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aftrec.serving.bundle import BundleError, export_run, load_bundle, write_bundle
    from aftrec.serving.index import ExactIndex, FaissIndex, IndexSpec
    from aftrec.serving.recommender import Query, Recommendation, Recommender, RequestError

_WHERE = {
    "BundleError": "bundle",
    "export_run": "bundle",
    "load_bundle": "bundle",
    "write_bundle": "bundle",
    "ExactIndex": "index",
    "FaissIndex": "index",
    "IndexSpec": "index",
    "Query": "recommender",
    "Recommendation": "recommender",
    "Recommender": "recommender",
    "RequestError": "recommender",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f"aftrec.serving.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'aftrec.serving' has no attribute {name!r}")


__all__ = [
    "BundleError",
    "ExactIndex",
    "FaissIndex",
    "IndexSpec",
    "Query",
    "Recommendation",
    "Recommender",
    "RequestError",
    "export_run",
    "load_bundle",
    "write_bundle",
]

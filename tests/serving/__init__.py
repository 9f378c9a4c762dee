"""Helpers shared by the serving tests: a trained tiny run and bundles, each made once per
session (training and export take a few seconds), and a model with a generator."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aftrec.config import resolve
from aftrec.data.dataset import Dataset
from aftrec.data.loader import Batch
from aftrec.models.base import Channel
from aftrec.models.two_tower import TwoTower, TwoTowerConfig, masked_mean
from aftrec.serving.bundle import contents_from_model, export_run, write_bundle
from aftrec.serving.index import IndexSpec
from aftrec.training.trainer import train
from tests.conftest import FAST

_CACHE: dict[str, Path] = {}


def trained_run(root: Path, data_dir: Path, model: str = "two-tower") -> Path:
    """A FAST run of ``model`` on the tiny dataset (trained once per session)."""
    key = f"run:{model}"
    if key not in _CACHE:
        out = root / f"run-{model}"
        sets = FAST if model != "pop" else [s for s in FAST if not s.startswith("model.")]
        train(data_dir, resolve(model, None, sets), out, progress=False)
        _CACHE[key] = out
    return _CACHE[key]


def exported(root: Path, data_dir: Path, model: str = "two-tower", **spec: Any) -> Path:
    """A bundle of :func:`trained_run` (once per session and index spec)."""
    key = f"bundle:{model}:{sorted(spec.items())}"
    if key not in _CACHE:
        out = root / f"bundle-{model}-{len(_CACHE)}"
        export_run(trained_run(root, data_dir, model), out, IndexSpec(**spec))
        _CACHE[key] = out
    return _CACHE[key]


class TwoTowerWithGenerator(TwoTower):
    """A stand-in for AFT's two networks: the two-tower encoder serves the main channel and a
    second, mean-pooling "generator" with its own item table serves the trial channel."""

    def __init__(self, cfg: TwoTowerConfig, info: Any, history_len: int) -> None:
        super().__init__(cfg, info, history_len)
        self.gen_emb = nn.Embedding(info.n_items + 1, cfg.dim, padding_idx=info.pad)
        self.gen_domain = nn.Embedding(info.n_domains, cfg.dim)

    def trial_vectors(self, batch: Batch, domain: int) -> torch.Tensor:
        pooled = masked_mean(self.gen_emb(batch.history), batch.history != self.info.pad)
        return pooled.sum(1) + self.gen_domain.weight[domain]  # (B, dim)

    def trial_item_vectors(self, domain: int) -> torch.Tensor:
        lo, hi = self.info.domain_range(domain)
        return self.gen_emb.weight[lo:hi]

    def serving_channels(self) -> dict[str, Channel]:
        return {
            **super().serving_channels(),
            "trial": Channel(self.trial_vectors, self.trial_item_vectors),
        }


def trial_bundle(root: Path, data: Dataset) -> Path:
    """A bundle of an untrained :class:`TwoTowerWithGenerator` (once per session)."""
    if "trial" not in _CACHE:
        torch.manual_seed(0)
        model = TwoTowerWithGenerator(TwoTowerConfig(dim=16), data.info, 8)
        model.name = "two-tower-with-generator"
        out = root / "bundle-trial"
        write_bundle(contents_from_model(model, data, 8), out)
        _CACHE["trial"] = out
    return _CACHE["trial"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def running(app: Any, http: str = "auto") -> Iterator[str]:
    """Serve ``app`` with uvicorn (``http``: its parser) on a free loopback port in a thread;
    yields the base URL."""
    from aftrec.serving.api import serving_in_thread

    with serving_in_thread(app, http=http) as url:
        yield url

"""Shared fixtures: a tiny synthetic multi-domain dataset, prepared once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aftrec.data.dataset import Dataset
from aftrec.data.prepare import prepare
from aftrec.data.sources.synthetic import SyntheticConfig, generate

TINY = SyntheticConfig(
    n_users=300, n_domains=3, items_per_domain=80, n_interactions=9_000, n_topics=6, seed=7
)
#: settings that make a training run take a second or two
FAST = [
    "train.epochs=2",
    "train.max_batches_per_epoch=6",
    "train.batch_size=64",
    "model.dim=16",
    "data.history_len=8",
]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare(generate(TINY), out, source={"kind": "synthetic"})
    return out


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path) -> Dataset:
    return Dataset(tiny_dir)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    """Tiny test tensors gain nothing from intra-op threads, and on a shared 2-core machine
    two threads per process oversubscribe the cores."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A module's own dataset prepared through the CLI from a small valid log
    (:func:`tests.inputs.prepare_valid_log`)."""
    from tests.inputs import prepare_valid_log

    return prepare_valid_log(tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="module")
def trained(prepared: Path) -> Path:
    """A tiny two-tower run on :func:`prepared`, free to be read, not damaged."""
    from tests.inputs import train_tiny

    return train_tiny(prepared)

"""One test over every registered model: builds, scores, finite loss, loss falls on a batch."""

import numpy as np
import pytest
import torch

from aftrec.config import resolve
from aftrec.data.dataset import Dataset
from aftrec.data.histories import HistoryIndex
from aftrec.data.loader import TrainLoader, make_batch
from aftrec.errors import ConfigError
from aftrec.registry import available_models, create_model, register_model
from aftrec.training.steps import make_step


@pytest.mark.parametrize("name", available_models())
def test_model_contract(name: str, tiny: Dataset) -> None:
    torch.manual_seed(0)
    cfg = resolve(name, overrides=["data.history_len=6"])
    model = create_model(name, cfg.model, tiny.info, cfg.data.history_len)
    users = np.arange(5)
    index = HistoryIndex(tiny.train, tiny.info)
    if not model.trainable:
        model.fit(tiny.train)
    model.eval()
    for d in range(tiny.info.n_domains):
        batch = make_batch(tiny.info, index, users, np.full(5, d), 6)
        scores = model.score(batch, d)
        assert scores.shape == (5, tiny.info.domain_size(d))
        assert torch.isfinite(scores).all()
        if model.dot_product:
            u, v = model.user_vectors(batch, d), model.item_vectors(d)
            torch.testing.assert_close(scores, u @ v.T)
    if not model.trainable:
        return
    loader = TrainLoader(tiny.train, tiny.info, 6, batch_size=64, n_negatives=4)
    batch = next(loader.epoch(np.random.default_rng(0)))
    step = make_step(model, cfg.train)
    first = step(batch)["loss"]
    assert np.isfinite(first)
    for _ in range(30):
        last = step(batch)["loss"]
    assert np.isfinite(last) and last < first


def test_duplicate_registration_raises() -> None:
    from aftrec.models.popularity import PopularityConfig

    with pytest.raises(ConfigError, match="registered twice"):
        register_model("pop", PopularityConfig)(type("X", (), {}))  # type: ignore[arg-type]


def test_a_model_defined_again_replaces_its_registration() -> None:
    """A notebook cell (or a reloaded module) defining the same model again: the same
    module and name replace the registration, as the docs' example is run twice."""
    from aftrec import registry
    from aftrec.models.popularity import Popularity, PopularityConfig

    def define() -> type:
        class Again(Popularity):
            pass

        return Again

    first, second = define(), define()
    try:
        register_model("again-test", PopularityConfig)(first)
        register_model("again-test", PopularityConfig)(second)
        assert registry.registration("again-test").model is second
    finally:
        registry._MODELS.pop("again-test", None)

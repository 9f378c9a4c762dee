"""FM, AFM and AutoInt (single and multi): full-ranking scores agree with the training path,
single-domain variants see only the target domain, chunking does not change scores."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from aftrec.config import resolve
from aftrec.data.dataset import Dataset
from aftrec.data.histories import HistoryIndex
from aftrec.data.loader import Batch, make_batch
from aftrec.errors import ConfigError
from aftrec.models.base import RetrievalModel, score_in_chunks
from aftrec.models.losses import sampled_loss
from aftrec.registry import create_model

FAMILIES = ("fm", "afm", "autoint")
NAMES = tuple(f"{f}-{v}" for f in FAMILIES for v in ("single", "multi"))
L = 6  # history length
#: small sizes keep the file fast; every code path is the same as at the defaults
SMALL = {
    "fm": ["model.dim=8"],
    "afm": ["model.dim=8", "model.attention=4"],
    "autoint": ["model.dim=8", "model.layers=2", "model.heads=2", "model.head_dim=4"],
}


def build(name: str, tiny: Dataset, *overrides: str) -> RetrievalModel:
    cfg = resolve(name, overrides=[*SMALL[name.split("-")[0]], *overrides])
    return create_model(name, cfg.model, tiny.info, L)


def randomise(model: RetrievalModel, std: float = 0.3) -> RetrievalModel:
    """Larger weights than at init, so that a wrong term cannot hide below the tolerance."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from intra-op threads, and on a busy machine every parallel
    op waits for a descheduled worker (x15 slower blocks here); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def index(tiny: Dataset) -> HistoryIndex:
    return HistoryIndex(tiny.train, tiny.info)


def domain_batch(tiny: Dataset, index: HistoryIndex, d: int, k: int = 5) -> Batch:
    """Users 0..5 with target domain d, a positive and k negatives drawn from domain d."""
    rng = np.random.default_rng(d)
    users = np.arange(6)
    lo, hi = tiny.info.domain_range(d)
    items = rng.integers(lo, hi, size=(len(users), 1 + k))
    return make_batch(
        tiny.info, index, users, np.full(len(users), d), L, pos=items[:, 0], neg=items[:, 1:]
    )


@pytest.mark.parametrize("name", NAMES)
def test_shapes(name: str, tiny: Dataset, index: HistoryIndex) -> None:
    model = build(name, tiny).eval()
    for d in range(tiny.info.n_domains):
        batch = domain_batch(tiny, index, d, k=3)
        scores = model.score(batch, d)
        assert scores.shape == (6, tiny.info.domain_size(d))
        assert torch.isfinite(scores).all()
        assert batch.pos is not None and batch.neg is not None
        items = torch.cat([batch.pos.unsqueeze(1), batch.neg], dim=1)  # (B, 4)
        assert model.score_items(batch, items).shape == (6, 4)  # type: ignore[operator]


@pytest.mark.parametrize("user_field", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_score_matches_training_path(
    name: str, user_field: bool, tiny: Dataset, index: HistoryIndex
) -> None:
    """Full ranking (matrix products, factorised attention, chunks) against the per-candidate
    forward that ``loss`` uses, in float64 with random weights."""
    torch.manual_seed(0)
    model = randomise(build(name, tiny, f"model.user_field={str(user_field).lower()}"))
    model = model.double().eval()
    for d in range(tiny.info.n_domains):
        batch = domain_batch(tiny, index, d)
        assert batch.pos is not None and batch.neg is not None
        lo, _ = tiny.info.domain_range(d)
        with torch.no_grad():
            full = model.score(batch, d)  # (B, n_d)
            items = torch.cat([batch.pos.unsqueeze(1), batch.neg], dim=1)  # (B, 1 + K)
            cand = model.score_items(batch, items)  # type: ignore[operator]
            loss = model.loss(batch)["loss"]
        expected = full.gather(1, items - lo)
        torch.testing.assert_close(cand, expected, rtol=1e-10, atol=1e-10)
        want = sampled_loss(expected[:, 0], expected[:, 1:], model.cfg.loss)
        torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-10)


def assert_same_function(
    got: torch.Tensor, want: torch.Tensor, params: list[torch.nn.Parameter]
) -> None:
    """Equal logits, and equal gradients of every parameter for a loss that weighs each logit
    differently (a parameter neither path reads has no gradient in either)."""
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    weights = torch.randn_like(want)
    g_want = torch.autograd.grad((want * weights).sum(), params, allow_unused=True)
    g_got = torch.autograd.grad((got * weights).sum(), params, allow_unused=True)
    for a, b in zip(g_got, g_want, strict=True):
        if b is None:
            assert a is None or not a.any()
        else:
            assert a is not None
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


#: dropout on where the model has it, so that the two paths must draw the same masks
TRAINING = {"afm": ["model.dropout=0.3"], "autoint": []}


@pytest.mark.parametrize("user_field", [False, True])
@pytest.mark.parametrize("name", ["afm-single", "afm-multi", "autoint-single", "autoint-multi"])
def test_training_path_is_the_paper_equations_as_written(
    name: str, user_field: bool, tiny: Dataset, index: HistoryIndex
) -> None:
    """``score_items`` computes what does not depend on the candidate once per user (AFM: the
    user fields' pairs and their attention logits; AutoInt: the first layer's projections and
    F_u x F_u attention); ``reference_items`` is the paper's equations over the fields of every
    (user, candidate). Same logits and same gradient of every parameter, float64, random
    weights, training mode."""
    torch.manual_seed(0)
    extra = TRAINING[name.split("-")[0]]
    model = randomise(build(name, tiny, *extra, f"model.user_field={str(user_field).lower()}"))
    model = model.double().train()
    params = [p for p in model.parameters() if p.requires_grad]
    for d in range(tiny.info.n_domains):
        batch = domain_batch(tiny, index, d)
        assert batch.pos is not None and batch.neg is not None
        items = torch.cat([batch.pos.unsqueeze(1), batch.neg], dim=1)  # (B, 1 + K)
        torch.manual_seed(d)
        want = model.reference_items(batch, items)  # type: ignore[operator]
        torch.manual_seed(d)
        got = model.score_items(batch, items)  # type: ignore[operator]
        assert_same_function(got, want, params)


def other_domain_changed(tiny: Dataset, batch: Batch, d: int) -> Batch:
    """``batch`` with the history of every domain but ``d`` replaced by random items of it."""
    history = batch.history.clone()
    gen = torch.Generator().manual_seed(1)
    for other in range(tiny.info.n_domains):
        if other != d:
            lo, hi = tiny.info.domain_range(other)
            history[:, other] = torch.randint(lo, hi, history[:, other].shape, generator=gen)
    return Batch(batch.users, history, batch.counts, batch.domain, batch.pos, batch.neg)


@pytest.mark.parametrize("user_field", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_single_domain_variants_ignore_other_domains(
    family: str, user_field: bool, tiny: Dataset, index: HistoryIndex
) -> None:
    flag = f"model.user_field={str(user_field).lower()}"
    for variant in ("single", "multi"):
        torch.manual_seed(0)
        model = randomise(build(f"{family}-{variant}", tiny, flag), std=0.2).eval()
        for d in range(tiny.info.n_domains):
            batch = domain_batch(tiny, index, d)
            changed = other_domain_changed(tiny, batch, d)
            with torch.no_grad():
                before, after = model.score(batch, d), model.score(changed, d)
            if variant == "single":
                torch.testing.assert_close(after, before, rtol=0, atol=0)
            else:
                assert (after - before).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["afm-single", "afm-multi", "autoint-single", "autoint-multi"])
def test_chunking_does_not_change_scores(name: str, tiny: Dataset, index: HistoryIndex) -> None:
    torch.manual_seed(0)
    whole = randomise(build(name, tiny, "model.chunk_floats=1000000000")).double().eval()
    batch = domain_batch(tiny, index, 1)
    with torch.no_grad():
        expected = whole.score(batch, 1)
        # 1: one (user, item) per block; 3000: slices of items, then a few users per block
        for chunk in (1, 3000, 20000):
            model = build(name, tiny, f"model.chunk_floats={chunk}").double().eval()
            model.load_state_dict(whole.state_dict())
            torch.testing.assert_close(model.score(batch, 1), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("budget", [1, 7, 50, 10_000])
def test_score_in_chunks_covers_the_grid_once(budget: int) -> None:
    seen = torch.zeros(5, 13, dtype=torch.long)

    def fn(users: slice, items: slice) -> torch.Tensor:
        block = seen[users, items]
        assert block.numel() * 2 <= max(budget, 2)  # 2 floats per pair
        block += 1
        return torch.arange(13.0)[items].expand(block.shape[0], -1)

    out = score_in_chunks(fn, 5, 13, floats_per_pair=2, budget=budget)
    assert (seen == 1).all()
    torch.testing.assert_close(out, torch.arange(13.0).expand(5, -1))


@pytest.mark.parametrize("name", NAMES)
def test_softmax_loss_with_user_field_falls(name: str, tiny: Dataset, index: HistoryIndex) -> None:
    """The options the registry-wide test does not reach: user field, softmax loss."""
    torch.manual_seed(0)
    model = build(name, tiny, "model.user_field=true", "model.loss=softmax")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = domain_batch(tiny, index, 0)
    model.train()
    losses = []
    for _ in range(15):
        loss = model.loss(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


@pytest.mark.parametrize(
    ("name", "override"),
    [
        ("fm-single", "model.dim=0"),
        ("fm-multi", "model.loss=mse"),
        ("afm-single", "model.attention=0"),
        ("afm-multi", "model.dropout=1.0"),
        ("autoint-single", "model.heads=0"),
        ("autoint-multi", "model.chunk_floats=0"),
    ],
)
def test_invalid_config_raises(name: str, override: str) -> None:
    with pytest.raises(ConfigError, match=override.split("=")[0].split(".")[1]):
        resolve(name, overrides=[override])

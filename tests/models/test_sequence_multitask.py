"""The sequence and multi-task competitors: bert4rec-single, atrank, sasrec, shared-bottom,
mmoe and snr (shapes, what each reads, masks, gates, routing, degenerate input, training)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from aftrec.config import resolve
from aftrec.data.dataset import Dataset
from aftrec.data.histories import HistoryIndex
from aftrec.data.loader import Batch, TrainLoader, make_batch
from aftrec.errors import ConfigError
from aftrec.models.atrank import ATRank, vanilla_attention
from aftrec.models.base import RetrievalModel
from aftrec.models.bert4rec import BERT4Rec
from aftrec.models.multitask import SNR, MMoE
from aftrec.models.sasrec import SASRec, attention_mask, merge_histories
from aftrec.registry import available_models, create_model
from aftrec.training.steps import make_step

NAMES = ["bert4rec-single", "atrank", "sasrec", "shared-bottom", "mmoe", "snr"]
L = 6
DIM = 16


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from more threads, and lose a lot on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def index(tiny: Dataset) -> HistoryIndex:
    return HistoryIndex(tiny.train, tiny.info)


def build(name: str, tiny: Dataset, *overrides: str) -> RetrievalModel:
    torch.manual_seed(0)
    cfg = resolve(name, overrides=[f"data.history_len={L}", f"model.dim={DIM}", *overrides])
    model = create_model(name, cfg.model, tiny.info, cfg.data.history_len)
    model.eval()
    return model


def eval_batch(tiny: Dataset, index: HistoryIndex, domain: int, n: int = 8) -> Batch:
    return make_batch(tiny.info, index, np.arange(n), np.full(n, domain), L)


def train_batch(tiny: Dataset, size: int = 64) -> Batch:
    loader = TrainLoader(tiny.train, tiny.info, L, batch_size=size, n_negatives=4)
    return next(loader.epoch(np.random.default_rng(0)))


def test_all_registered() -> None:
    assert set(NAMES) <= set(available_models())


@pytest.mark.parametrize("name", NAMES)
def test_shapes(name: str, tiny: Dataset, index: HistoryIndex) -> None:
    model = build(name, tiny)
    for d in range(tiny.info.n_domains):
        batch = eval_batch(tiny, index, d)
        u, v = model.user_vectors(batch, d), model.item_vectors(d)
        assert u.shape == (8, DIM)
        assert v.shape == (tiny.info.domain_size(d), DIM)
        assert model.score(batch, d).shape == (8, tiny.info.domain_size(d))
    out = model.loss(train_batch(tiny, 16))
    assert out["loss"].shape == ()


@pytest.mark.parametrize("name", NAMES)
def test_padding_only_histories_give_finite_vectors(name: str, tiny: Dataset) -> None:
    model = build(name, tiny)
    batch = train_batch(tiny, 8)
    empty = replace(
        batch,
        history=torch.full_like(batch.history, tiny.info.pad),
        counts=torch.zeros_like(batch.counts),
    )
    for d in range(tiny.info.n_domains):
        assert torch.isfinite(model.user_vectors(empty, d)).all()
    model.train()
    assert torch.isfinite(model.loss(empty)["loss"])


@pytest.mark.parametrize("name", NAMES)
def test_a_few_steps_lower_the_loss(name: str, tiny: Dataset) -> None:
    model = build(name, tiny)
    batch = train_batch(tiny, 32)
    step = make_step(model, resolve(name, overrides=["train.lr=0.01"]).train)
    with torch.no_grad():
        model.eval()
        before = float(model.loss(batch)["loss"])
    for _ in range(8):
        step(batch)
    with torch.no_grad():
        model.eval()
        after = float(model.loss(batch)["loss"])
    assert np.isfinite(after) and after < before


def test_bert4rec_reads_only_the_target_domain(tiny: Dataset, index: HistoryIndex) -> None:
    model = build("bert4rec-single", tiny)
    batch = eval_batch(tiny, index, 0)
    changed = batch.history.clone()
    changed[:, 1:] = torch.randint(0, tiny.info.n_items, changed[:, 1:].shape)
    other = replace(batch, history=changed, counts=batch.counts * 3)
    torch.testing.assert_close(model.user_vectors(other, 0), model.user_vectors(batch, 0))
    changed[:, 0, -1] = (changed[:, 0, -1] + 1) % tiny.info.domain_size(0)
    moved = replace(batch, history=changed)
    assert not torch.allclose(model.user_vectors(moved, 0), model.user_vectors(batch, 0))


def test_bert4rec_cloze_masks_only_behaviours(tiny: Dataset) -> None:
    model = build("bert4rec-single", tiny)
    assert isinstance(model, BERT4Rec)
    seq = torch.full((4, L), tiny.info.pad)
    seq[:, -3:] = torch.arange(3)
    u, h, where = model.encode(seq, mask_prob=0.9)
    assert u.shape == (4, DIM) and h.shape == (len(where), DIM)
    cut = model.cut_history(seq)
    assert cut.shape == (4, 3)  # the padding-only columns are cut
    assert (cut[where[:, 0], where[:, 1]] != tiny.info.pad).all()


def test_sasrec_is_causal(tiny: Dataset, index: HistoryIndex) -> None:
    model = build("sasrec", tiny, "model.order=rate")
    assert isinstance(model, SASRec)
    batch = eval_batch(tiny, index, 0, n=1)
    out, valid = model.encode(batch)  # (1, S, d)
    merged = merge_histories(batch.history, batch.counts, tiny.info.pad, "rate", model.max_len)
    k = int(valid[0].nonzero()[valid[0].sum() // 2])  # a behaviour in the middle
    flat = int(merged.index[0, k])
    changed = batch.history.clone().flatten(1)
    changed[0, flat] = (changed[0, flat] + 1) % tiny.info.n_items
    out2, _ = model.encode(replace(batch, history=changed.view_as(batch.history)))
    torch.testing.assert_close(out2[:, :k], out[:, :k])  # the past does not see the future
    assert not torch.allclose(out2[:, k], out[:, k])


def test_sasrec_last_only_matches_the_full_encoder(tiny: Dataset, index: HistoryIndex) -> None:
    model = build("sasrec", tiny)
    assert isinstance(model, SASRec)
    batch = eval_batch(tiny, index, 2, n=20)
    full, _ = model.encode(batch)
    last, _ = model.encode(batch, last_only=True)
    assert last.shape == (len(batch), 1, full.shape[-1])  # no (B, S, d) of zeros around it
    torch.testing.assert_close(last[:, -1], full[:, -1])


def test_atrank_vanilla_attention_equals_torch() -> None:
    """One query per row against ``nn.MultiheadAttention`` with a zero key and key padding,
    forward and gradients; a row without behaviours reads only the zero key."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True, add_zero_attn=True).double()
    nn.init.normal_(mha.in_proj_bias, std=0.1)
    q = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
    h = torch.randn(6, 9, 16, dtype=torch.float64, requires_grad=True)
    valid = torch.rand(6, 9) < 0.6
    valid[0] = False
    ref = mha(q.unsqueeze(1), h, h, key_padding_mask=~valid, need_weights=False)[0][:, 0]
    new = vanilla_attention(mha, q, h, valid)
    torch.testing.assert_close(new, ref)
    torch.testing.assert_close(new[0], mha.out_proj.bias)  # the zero value, projected
    g_new = torch.autograd.grad(new.square().sum(), [q, h, *mha.parameters()])
    g_ref = torch.autograd.grad(ref.square().sum(), [q, h, *mha.parameters()])
    for a, b in zip(g_new, g_ref, strict=True):
        torch.testing.assert_close(a, b)


def test_atrank_reads_each_chunk_as_the_whole_grid(tiny: Dataset) -> None:
    """The blocks and the vanilla attention run chunk by chunk (rows of similar length, each
    cut to its longest): the user vectors and their gradients equal one pass of the blocks
    over the whole (B, S) grid read by the vanilla attention over every position."""
    model = build("atrank", tiny).double()
    assert isinstance(model, ATRank)
    batch = train_batch(tiny, size=70)  # three chunks of 32 rows, uneven lengths
    merged = merge_histories(batch.history, batch.counts, tiny.info.pad, "blocks")
    lengths = merged.valid.sum(1)
    assert len(set(lengths.tolist())) > 3 and bool((lengths == 0).any())  # and rows without any
    domain = batch.domain

    def whole_grid() -> torch.Tensor:
        grid = model.tokens(batch.history, merged)  # (B, S, d), the batch's order
        h = model.norm(model.encoder(grid, attention_mask(merged.valid, causal=False)))
        q = model.query_emb(domain)
        return model.mlp(torch.cat([vanilla_attention(model.vanilla, q, h, merged.valid), q], 1))

    ref, new = whole_grid(), model.user_tower(batch, domain)
    torch.testing.assert_close(new, ref)
    weights = torch.randn_like(ref)
    params = list(model.parameters())
    g_ref = torch.autograd.grad((ref * weights).sum(), params, allow_unused=True)
    g_new = torch.autograd.grad((new * weights).sum(), params, allow_unused=True)
    for a, b in zip(g_new, g_ref, strict=True):
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            torch.testing.assert_close(a, b)


def test_atrank_tokens_at_the_behaviours_equal_the_grid(tiny: Dataset, index: HistoryIndex) -> None:
    """``f_i([e; t])`` computed at the behaviours only equals the whole-grid computation at
    every behaviour, forward and gradients; padding is zero."""
    model = build("atrank", tiny)
    assert isinstance(model, ATRank)
    batch = eval_batch(tiny, index, 1, n=20)
    merged = merge_histories(batch.history, batch.counts, tiny.info.pad, "blocks")
    valid = merged.valid.unsqueeze(-1)
    assert not bool(merged.valid.all())
    d = model.cfg.dim
    items, domains = merged.take(batch.history), merged.domains
    item = torch.einsum("bsd,bsdo->bso", model.item_emb(items), model.proj_weight[domains, :d])
    time = torch.einsum(
        "bsd,bsdo->bso", model.recency_emb(merged.recency), model.proj_weight[domains, d:]
    )
    ref = (item + time + model.proj_bias[domains]) * valid
    new = model.tokens(batch.history, merged)
    torch.testing.assert_close(new, ref)
    weights = torch.randn_like(ref)
    params = [model.item_emb.weight, model.recency_emb.weight, model.proj_weight]
    g_new = torch.autograd.grad((new * weights).sum(), params)
    g_ref = torch.autograd.grad((ref * weights).sum(), params)
    for a, b in zip(g_new, g_ref, strict=True):
        torch.testing.assert_close(a, b)


def test_sasrec_tokens_at_the_behaviours_equal_the_grid(tiny: Dataset, index: HistoryIndex) -> None:
    """The input tokens computed at the behaviours only and placed into the grid equal the
    whole-grid computation ``(e sqrt(d) + p + e_domain) * valid``, forward and gradients."""
    model = build("sasrec", tiny)
    assert isinstance(model, SASRec)
    model.eval()  # dropout off: the two draw different numbers of decisions
    batch = eval_batch(tiny, index, 1, n=20)
    merged = merge_histories(batch.history, batch.counts, tiny.info.pad, "rate", model.max_len)
    assert not bool(merged.valid.all())  # some padding in the grid
    items, s = merged.take(batch.history), merged.index.shape[1]
    positions = torch.arange(model.max_len - s, model.max_len)
    ref = model.item_emb(items) * model.cfg.dim**0.5 + model.pos_emb(positions)
    ref = (ref + model.domain_emb(merged.domains)) * merged.valid.unsqueeze(-1)
    new = model.embed(batch.history, merged)
    torch.testing.assert_close(new, ref)
    order = torch.randperm(len(batch))
    torch.testing.assert_close(model.embed(batch.history, merged, order), ref[order])
    weights = torch.randn_like(ref)
    params = [model.item_emb.weight, model.pos_emb.weight, model.domain_emb.weight]
    g_new = torch.autograd.grad((new * weights).sum(), params)
    g_ref = torch.autograd.grad((ref * weights).sum(), params)
    for a, b in zip(g_new, g_ref, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["bert4rec-single", "atrank", "sasrec"])
def test_vectors_do_not_depend_on_the_rest_of_the_batch(
    name: str, tiny: Dataset, index: HistoryIndex
) -> None:
    """Padding cut to the longest row and attention by chunks of rows are exact."""
    model = build(name, tiny)
    batch = eval_batch(tiny, index, 1, n=40)  # two chunks of rows, uneven lengths
    together = model.user_vectors(batch, 1)
    for i in (0, 7, 39):
        one = replace(
            batch,
            users=batch.users[i : i + 1],
            history=batch.history[i : i + 1],
            counts=batch.counts[i : i + 1],
            domain=batch.domain[i : i + 1],
        )
        torch.testing.assert_close(model.user_vectors(one, 1), together[i : i + 1])


def test_sasrec_uses_the_order(tiny: Dataset, index: HistoryIndex) -> None:
    model = build("sasrec", tiny)
    batch = eval_batch(tiny, index, 0, n=30)
    rows = (batch.history[:, 0, -2:] != tiny.info.pad).all(1)  # two behaviours in domain 0
    assert rows.sum() >= 5
    swapped = batch.history.clone()
    swapped[:, 0, -2:] = swapped[:, 0, -2:].flip(-1)  # same items, last two swapped
    u = model.user_vectors(batch, 0)[rows]
    u_swapped = model.user_vectors(replace(batch, history=swapped), 0)[rows]
    assert (u - u_swapped).abs().amax(1).gt(1e-4).all()


def test_merge_by_rate_interleaves_by_expected_time() -> None:
    pad = 99
    history = torch.tensor([[[pad, 1, 2, 3], [pad, pad, 11, 12]]])  # (1, D=2, L=4)
    # 100 behaviours in domain 0 (last three kept), 3 in domain 1 (last two kept): the last
    # three of domain 0 are more recent than both of domain 1 under an even spread
    merged = merge_histories(history, torch.tensor([[100, 3]]), pad, "rate")
    assert merged.take(history).tolist() == [[11, 12, 1, 2, 3]]
    assert merged.domains.tolist() == [[1, 1, 0, 0, 0]]
    assert merged.recency.tolist() == [[1, 0, 2, 1, 0]]
    # same counts: the domains alternate, domain order breaking ties
    merged = merge_histories(history, torch.tensor([[3, 3]]), pad, "rate")
    assert merged.take(history).tolist() == [[1, 2, 11, 3, 12]]
    blocks = merge_histories(history, torch.tensor([[3, 2]]), pad, "blocks", max_len=4)
    assert blocks.take(history).tolist() == [[2, 3, 11, 12]]  # cut to the last max_len
    times = torch.tensor([[[0.0, 1, 5, 9], [0, 0, 2, 7]]])
    timed = merge_histories(history, torch.tensor([[3, 2]]), pad, "time", times=times)
    assert timed.take(history).tolist() == [[1, 11, 2, 12, 3]]
    assert timed.valid.all()


def test_merge_keeps_one_position_when_everything_is_padding() -> None:
    history = torch.full((2, 3, 4), 7)
    merged = merge_histories(history, torch.zeros(2, 3, dtype=torch.long), 7)
    assert merged.index.shape == (2, 1) and not merged.valid.any()


def test_attention_mask_never_blocks_a_whole_row() -> None:
    valid = torch.tensor([[False, False, True, True], [False, False, False, False]])
    for causal in (True, False):
        blocked = attention_mask(valid, causal=causal)  # (2, 4, 4)
        assert blocked.shape == (2, 4, 4)
        assert (~blocked).any(-1).all()  # every query reads at least itself
        assert blocked[0, 2:, :2].all()  # behaviours never read padding
    assert attention_mask(valid, causal=True)[0, 2, 3]  # nor the future


def test_sasrec_time_order_reads_history_time(tiny: Dataset, index: HistoryIndex) -> None:
    model = build("sasrec", tiny, "model.order=time")
    batch = eval_batch(tiny, index, 1)
    assert batch.history_time is not None  # the loader carries behaviour times
    with pytest.raises(ValueError, match="history_time"):
        model.user_vectors(replace(batch, history_time=None), 1)
    times = torch.rand(batch.history.shape, dtype=torch.float64)
    u = model.user_vectors(replace(batch, history_time=times), 1)
    assert torch.isfinite(u).all()
    assert not torch.allclose(u, model.user_vectors(replace(batch, history_time=-times), 1))


def test_mmoe_gates_sum_to_one_per_domain(tiny: Dataset, index: HistoryIndex) -> None:
    model = build("mmoe", tiny, "model.n_experts=3")
    assert isinstance(model, MMoE)
    gates = model.gate_weights(model.features(eval_batch(tiny, index, 0)))
    assert gates.shape == (8, tiny.info.n_domains, 3)
    assert (gates >= 0).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(8, tiny.info.n_domains))


def test_snr_routing(tiny: Dataset, index: HistoryIndex) -> None:
    model = build("snr", tiny, "model.n_lower=2", "model.hidden=24")
    assert isinstance(model, SNR)
    n_dom = tiny.info.n_domains
    assert model.trans.shape == (n_dom, 2, 24, 24)  # W_ij: lower i -> upper j
    z = model.codes()
    assert z.shape == (n_dom, 2) and ((z >= 0) & (z <= 1)).all()
    torch.testing.assert_close(model.codes(), z)  # deterministic in eval
    model.train()
    torch.manual_seed(1)
    samples = torch.stack([model.codes() for _ in range(20)])
    assert samples.shape == (20, n_dom, 2) and samples.std(0).gt(0).any()
    assert ((samples >= 0) & (samples <= 1)).all()
    x = model.features(eval_batch(tiny, index, 0))
    assert model.task_inputs(x).shape == (8, n_dom, 24)
    out = model.loss(train_batch(tiny, 16))
    assert out["l0"] > 0
    torch.testing.assert_close(out["loss"], out["rec"] + out["l0"])
    with torch.no_grad():  # a closed connection cuts its sub-network off
        model.log_alpha[:, 0] = -20.0
    model.eval()
    assert (model.codes()[:, 0] == 0).all()


@pytest.mark.parametrize(
    ("name", "override", "match"),
    [
        ("sasrec", "model.heads=3", "divisible"),
        ("atrank", "model.heads=5", "divisible"),
        ("bert4rec-single", "model.mask_prob=1.0", "mask_prob"),
        ("sasrec", "model.order=random", "order"),
        ("sasrec", "model.max_len=0", "max_len"),
        ("mmoe", "model.n_experts=0", "n_experts"),
        ("snr", "model.n_lower=0", "n_lower"),
        ("shared-bottom", "model.loss=hinge", "loss"),
    ],
)
def test_bad_configs_raise(name: str, override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        resolve(name, overrides=["model.dim=16", override])

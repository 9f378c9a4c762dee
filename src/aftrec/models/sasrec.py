"""SASRec on the merged multi-domain behaviour sequence.

"Self-Attentive Sequential Recommendation" (Wang-Cheng Kang and Julian McAuley, ICDM 2018),
section III: item embeddings plus learned positions (III-A), stacked causal self-attention
blocks with point-wise feed-forward layers, residual connections, layer normalisation and
dropout (III-B to III-D), and a prediction layer that shares the item embeddings (III-E).

Here the sequence is the user's behaviours of *all* domains merged into one, each behaviour
carrying a domain embedding; the output at the last (most recent) position plus an embedding of
the target domain is the user vector, scored against the shared item embeddings by inner
product. SASRec trains every position on its next item; the shared loader gives one target per
example, so the loss is the shared sampled loss on the last position only (every training
interaction is a target of its own example, so each position is supervised over an epoch).

The merge in time. A :class:`~aftrec.data.loader.Batch` holds per-domain right-aligned
histories with their behaviour times (``history_time``); ``order`` chooses how to interleave:

* ``"time"``: the true order, from ``Batch.history_time`` (B, D, L). Not the default yet:
  exported serving encoders take (history, counts) only, without times;
* ``"rate"`` (default): assume each domain's behaviours are spread evenly
  over the user's
  history, so the behaviour ``r`` places from the end of a domain with ``n`` behaviours before
  the query (``Batch.counts``, not clipped to L) sits at the expected uniform order statistic
  ``(n - r) / (n + 1)`` of the user's time line; sort on that. A user with 100 comedies and
  10 romances gets the last 50 comedies interleaved with the last 5 romances, not the last 10;
* ``"blocks"``: domain blocks one after the other, in domain order (the crude merge).

The merged sequence keeps its most recent ``max_len`` behaviours (SASRec's n; 200 for ML-1M in
the paper). Attention runs on chunks of rows of similar length (:func:`by_length`): merged
sequences are long (up to D x L) and their lengths uneven, and the cost of the padding would
dominate. :func:`merge_histories`, :func:`attention_mask`, :func:`by_length` and
:func:`transformer_encoder` are shared with :mod:`aftrec.models.atrank` and
:mod:`aftrec.models.bert4rec`.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from aftrec.config import Checked, Count, Loss, Rate
from aftrec.data.dataset import DataInfo
from aftrec.data.loader import Batch
from aftrec.errors import ConfigError
from aftrec.models.base import UserTowerModel
from aftrec.models.transformer import Dropout, TransformerEncoder
from aftrec.registry import DROPOUT, register_model

Order = Literal["rate", "blocks", "time"]
ORDERS: tuple[str, ...] = typing.get_args(Order)
#: rows per attention chunk in :func:`by_length`
ROWS_PER_CHUNK = 32


#: ``aftrec reproduce --quick``: the tiny settings of this file's models
QUICK = {"dim": "16", "ff_dim": "32", "heads": "2", "layers": "1"}


def check_transformer(cfg: Any) -> None:
    """The check across fields shared by the attention models' configs: the heads split
    ``dim`` evenly (the bounds are in the field types)."""
    if cfg.dim % cfg.heads:
        raise ConfigError(
            f"config key model.dim ({cfg.dim}) must be divisible by model.heads ({cfg.heads})"
        )


@dataclass(frozen=True)
class SASRecConfig(Checked):
    dim: Count = 64  # section 5.3 of the AFT paper
    heads: Count = 1  # SASRec uses single-head attention
    layers: Count = 2  # b = 2 blocks (SASRec section IV-B)
    ff_dim: Count = 64  # SASRec's point-wise feed-forward keeps d -> d
    dropout: Rate = 0.2  # SASRec's rate for ML-1M
    attn_dropout: Rate = 0.2  # on the attention weights, as SASRec's code does
    max_len: Count = 200  # SASRec's n for ML-1M; the merged sequence is cut to its last max_len
    order: Order = "rate"  # merge of the domains in time, see the module docstring
    loss: Loss = "softmax"  # "softmax" over [positive, negatives] or "bce"

    def validate(self) -> None:
        check_transformer(self)


@dataclass(frozen=True)
class Merged:
    """Behaviours of all domains as one right-aligned sequence (padding first)."""

    index: torch.Tensor  # (B, S) long, flat position d * L + j in the (D, L) history
    valid: torch.Tensor  # (B, S) bool, a behaviour (not padding)
    length: int  # L of the per-domain history

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, L, ...) per-domain values -> (B, S, ...) in merged order."""
        flat = x.flatten(1, 2)  # (B, D L, ...)
        idx = self.index.view(*self.index.shape, *([1] * (flat.dim() - 2)))
        return flat.gather(1, idx.expand(-1, -1, *flat.shape[2:]))

    @property
    def domains(self) -> torch.Tensor:
        """(B, S) domain of each position."""
        return self.domain_of(self.index)

    @property
    def recency(self) -> torch.Tensor:
        """(B, S) rank from the end inside its own domain (0 = the domain's latest behaviour)."""
        return self.recency_of(self.index)

    def domain_of(self, flat: torch.Tensor) -> torch.Tensor:
        """The domain of flat positions ``d * L + j``."""
        return torch.div(flat, self.length, rounding_mode="floor")

    def recency_of(self, flat: torch.Tensor) -> torch.Tensor:
        """The rank from the end inside its domain of flat positions ``d * L + j``."""
        return self.length - 1 - flat % self.length

    def behaviours(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The behaviours (not padding): their (N,) rows and columns in the (B, S) grid and
        their (N,) flat positions ``d * L + j`` in the (D, L) history."""
        rows, cols = self.valid.nonzero(as_tuple=True)
        return rows, cols, self.index[rows, cols]

    def place(
        self,
        values: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        order: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(N, d) values at the behaviours -> (B, S, d) grid, zero at padding; with ``order``
        (B,), grid row r is the batch's row ``order[r]``."""
        slot = rows if order is None else torch.argsort(order)[rows]
        b, s = self.index.shape
        grid = values.new_zeros(b, s, values.shape[1])
        grid[slot, cols] = values  # in place: the zeros need no gradient, and no copy of them
        return grid


def merge_histories(
    history: torch.Tensor,
    counts: torch.Tensor,
    pad: int,
    order: str = "rate",
    max_len: int | None = None,
    times: torch.Tensor | None = None,
) -> Merged:
    """Merge (B, D, L) right-aligned per-domain histories into (B, S) sequences, oldest first.

    Padding goes to the front and is cut so that S is the longest row of the batch (at least 1,
    at most ``max_len``): a model whose padding tokens neither attend to nor are attended by
    behaviours gives the same outputs on the cut sequence.
    """
    b, n_dom, length = history.shape
    valid = history != pad  # (B, D, L)
    if order == "rate":
        n = torch.maximum(counts, valid.sum(-1)).to(torch.float32).unsqueeze(-1)  # (B, D, 1)
        rank = torch.arange(length - 1, -1, -1, device=history.device, dtype=torch.float32)
        key = (n - rank) / (n + 1)  # (B, D, L), expected uniform order statistic
    elif order == "blocks":
        key = torch.arange(n_dom * length, device=history.device, dtype=torch.float32)
        key = key.view(1, n_dom, length).expand(b, -1, -1)
    elif order == "time":
        if times is None:
            raise ValueError("order 'time' needs the batch's history_time (B, D, L)")
        key = times.to(torch.float64)
    else:
        raise ValueError(f"unknown order {order!r}; expected one of {ORDERS}")
    key = torch.where(valid, key, torch.full_like(key, -math.inf)).flatten(1)  # (B, D L)
    index = torch.argsort(key, dim=1, stable=True)  # (B, D L), padding first
    keep = int(valid.flatten(1).sum(1).max().clamp(min=1))
    if max_len is not None:
        keep = min(keep, max_len)
    index = index[:, -keep:]  # (B, S)
    return Merged(index=index, valid=valid.flatten(1).gather(1, index), length=length)


def attention_mask(valid: torch.Tensor, causal: bool) -> torch.Tensor:
    """(B, S) valid positions -> (B, S, S) boolean mask, True where attention is barred.

    A query sees the behaviours (at or before itself when ``causal``) and always itself, so a
    padding position attends only to itself and no row is fully masked (no NaN); behaviours
    never see padding.
    """
    s = valid.shape[1]
    eye = torch.eye(s, dtype=torch.bool, device=valid.device)
    allowed = valid.unsqueeze(1) | eye  # (B, S, S): query i may read key j
    if causal:
        allowed = allowed & torch.ones(s, s, dtype=torch.bool, device=valid.device).tril()
    return ~allowed


def length_order(valid: torch.Tensor) -> torch.Tensor:
    """(B,) the rows of a (B, S) ``valid`` from the shortest sequence to the longest: the order
    in which :func:`by_length` chunks them."""
    return torch.argsort(valid.sum(1), stable=True)


def by_length(
    fn: Callable[..., torch.Tensor],
    x: torch.Tensor,
    valid: torch.Tensor,
    rows: int = ROWS_PER_CHUNK,
    width: int | None = None,
    order: torch.Tensor | None = None,
    extra: Sequence[torch.Tensor] = (),
    reorder: bool = True,
) -> torch.Tensor:
    """``fn(x, valid)`` on (B, S, d) right-aligned sequences, run on chunks of ``rows`` rows of
    similar length, each cut to its own longest row (at least 1 position), so that attention
    costs about the sum of the squared lengths instead of B times the longest squared. The
    outputs (``fn`` may return only the last positions), left-padded with zeros to ``width``
    positions (default S), are returned in the batch's order: (B, width, d). A caller that
    needs the last position only passes ``width=1``, and no (B, S, d) tensor of zeros is
    built, gathered and differentiated through. A caller that builds ``x`` row by row can lay
    its rows out in :func:`length_order` directly and pass that ``order`` (``valid`` stays in
    the batch's order): then ``x`` is not gathered again. ``extra``: per-row (B, ...) tensors
    laid out as ``x``, each chunk's rows passed to ``fn`` after its ``valid``
    (``fn(x, valid, *extra)``). ``reorder=False`` returns the rows in ``order`` instead of the
    batch's (for a caller that reads a few positions: it indexes them through
    ``argsort(order)`` without a gather of the whole output). Exact for an ``fn``
    whose padding neither attends nor is attended (and which ignores absolute positions or
    counts them from the end)."""
    s = x.shape[1]
    width = s if width is None else width
    lengths = valid.sum(1)
    if order is None:
        order = length_order(valid)
        # one gather, then contiguous chunks: the backward pass scatters into x once (indexing
        # x per chunk would zero-fill a gradient of x's full size for every chunk)
        x = x[order]
        extra = [e[order] for e in extra]
    if torch.jit.is_tracing():
        # a traced loop is unrolled at the example's number of chunks, and each cut frozen at
        # the example's length: a traced encoder (serving) runs the batch as one chunk, uncut,
        # which is exact for any batch size
        out = fn(x, valid[order], *extra)
        out = F.pad(out, (0, 0, width - out.shape[1], 0))
    else:
        pieces = []
        chunks = [e.split(rows) for e in extra]
        parts = (x.split(rows), valid[order].split(rows), lengths[order].split(rows))
        for i, (xc, vc, lc) in enumerate(zip(*parts, strict=True)):
            keep = max(1, int(lc.max()))
            more = [c[i] for c in chunks]
            piece = fn(xc[:, s - keep :], vc[:, s - keep :], *more)  # (n, keep or fewer, d)
            assert piece.shape[1] <= width, "fn returned more positions than width"
            pieces.append(F.pad(piece, (0, 0, width - piece.shape[1], 0)))  # right-aligned
        out = torch.cat(pieces)
    return out[torch.argsort(order)] if reorder else out


def transformer_encoder(cfg: Any, activation: str = "relu") -> TransformerEncoder:
    """``cfg.layers`` pre-norm Transformer blocks (multi-head self-attention and point-wise
    feed-forward, each with residual, layer norm and dropout ``cfg.dropout``; dropout
    ``cfg.attn_dropout`` on the attention weights); the caller adds a final layer norm.
    ``nn.TransformerEncoder``'s function, parameter names and initialisation, with cheaper
    dropout draws (:mod:`aftrec.models.transformer`)."""
    return TransformerEncoder(
        cfg.dim, cfg.heads, cfg.layers, cfg.ff_dim, cfg.dropout, cfg.attn_dropout,
        norm_first=True, activation=activation,
    )  # fmt: skip


@register_model("sasrec", SASRecConfig, quick=QUICK, tune=DROPOUT)
class SASRec(UserTowerModel):
    def __init__(self, cfg: SASRecConfig, info: DataInfo, history_len: int) -> None:
        super().__init__(cfg, info, history_len)
        d = cfg.dim
        self.max_len = min(cfg.max_len, info.n_domains * history_len)
        self.item_emb = nn.Embedding(info.n_items + 1, d, padding_idx=info.pad)  # M of III-A
        self.pos_emb = nn.Embedding(self.max_len, d)  # P of III-A, counted from the end
        self.domain_emb = nn.Embedding(info.n_domains, d)  # domain of each behaviour
        self.target_emb = nn.Embedding(info.n_domains, d)  # added to the last output
        self.drop = Dropout(cfg.dropout)
        self.encoder = transformer_encoder(cfg)
        self.norm = nn.LayerNorm(d)
        nn.init.normal_(self.item_emb.weight, std=0.05)
        nn.init.normal_(self.pos_emb.weight, std=0.05)
        nn.init.normal_(self.domain_emb.weight, std=0.05)
        nn.init.normal_(self.target_emb.weight, std=0.05)
        with torch.no_grad():
            self.item_emb.weight[info.pad].zero_()

    def encode(self, batch: Batch, last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, d) outputs of the causal blocks over the merged sequence (unspecified at
        padding positions), and (B, S) valid. With ``last_only`` only the last position's
        output is computed and returned, (B, 1, d): the last block then runs one query."""
        cfg: SASRecConfig = self.cfg
        merged = merge_histories(
            batch.history,
            batch.counts,
            self.info.pad,
            cfg.order,
            self.max_len,
            getattr(batch, "history_time", None),
        )
        order = length_order(merged.valid)
        x = self.embed(batch.history, merged, order)  # (B, S, d), rows in `order`
        blocks = self._last_output if last_only else self._blocks
        width = 1 if last_only else None
        return by_length(blocks, x, merged.valid, width=width, order=order), merged.valid

    def embed(
        self, history: torch.Tensor, merged: Merged, order: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, S, d) input tokens (III-A): ``Dropout(e_item sqrt(d) + p_position + e_domain)``
        at the behaviours, zero at padding. Computed at the behaviours only (a third to a half
        of the merged grid on ML-1M), then placed into the grid; with ``order`` (B,), the
        grid's rows are the batch's rows in that order."""
        rows, cols, flat = merged.behaviours()  # (N,) each
        items = history.flatten(1)[rows, flat]  # (N,)
        tok = self.item_emb(items) * math.sqrt(self.cfg.dim)
        s = merged.index.shape[1]
        tok = tok + self.pos_emb(cols + (self.max_len - s))  # positions counted from the end
        tok = tok + self.domain_emb(merged.domain_of(flat))
        return merged.place(self.drop(tok), rows, cols, order)

    def _blocks(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        mask = attention_mask(valid, causal=True)  # (B, S, S)
        return self.norm(self.encoder(x, mask))  # (B, S, d)

    def _last_output(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, 1, d): what :meth:`_blocks` gives at the last position, the last block computing
        that query only (causal, so no other position needs it)."""
        mask = attention_mask(valid, causal=True)  # (B, S, S)
        return self.norm(self.encoder(x, mask, last_only=True))  # (B, 1, d)

    def user_tower(self, batch: Batch, domain: torch.Tensor) -> torch.Tensor:
        out, _ = self.encode(batch, last_only=True)
        return out[:, -1] + self.target_emb(domain)  # (B, d)

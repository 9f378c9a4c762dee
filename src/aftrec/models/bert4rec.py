"""BERT4Rec on the target domain only (the paper's "BERT4Rec (single)").

"BERT4Rec: Sequential Recommendation with Bidirectional Encoder Representations from
Transformer" (Sun, Liu, Wu, Pei, Lin, Ou and Jiang, CIKM 2019), section 3: item embeddings
plus learned positions (3.5), stacked bidirectional Transformer layers with GELU feed-forward
(3.3-3.4), and the output layer ``GELU(h W^P + b^P)`` scored against the shared item
embeddings (3.5, Eq. 7).

Only the behaviours of the target domain are read (section 5.2 of the AFT paper); the other
domains of the batch are ignored.

Training, the Cloze task of section 3.6 in the form the shared loader allows:

* a [MASK] token is appended after the target domain's history; its output is the user vector
  and it predicts the example's target item (the paper's "mask the last item" samples, which
  are also how BERT4Rec predicts at test time: append [MASK] and read its output);
* with ``mask_prob`` > 0, each history behaviour is also replaced by [MASK] with probability
  ``mask_prob`` (the paper's rho; 0.2 for ML-1M) and its output must recover the original item.

Every prediction (the appended [MASK] and the masked history positions) is scored by the
shared sampled loss against the example's own sampled negatives (items of the target domain
the user did not click in training, so also negatives for the masked positions), averaged over
predictions. Departures from the paper: sampled negatives instead of a full softmax; no
output bias ``b^O`` (the score must be an inner product to be served by a nearest-neighbour
index); and pre-norm layers, ``x + Dropout(sublayer(LN(x)))`` with a final layer norm, where
section 3.3 prints post-norm ``LN(x + Dropout(sublayer(x)))``: the blocks SASRec uses
(:func:`aftrec.models.sasrec.transformer_encoder`), which train without a learning-rate
warm-up. The appended [MASK] always attends, so a user without target-domain behaviours still
gets a finite vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aftrec.config import Checked, Count, Loss, Rate
from aftrec.data.dataset import DataInfo
from aftrec.data.loader import Batch
from aftrec.models.base import RetrievalModel
from aftrec.models.losses import sampled_loss
from aftrec.models.sasrec import by_length, check_transformer, length_order, transformer_encoder
from aftrec.models.transformer import Dropout
from aftrec.registry import DROPOUT, register_model

#: ``aftrec reproduce --quick``: the tiny settings of this file's models
QUICK = {"dim": "16", "ff_dim": "32", "heads": "2", "layers": "1"}


@dataclass(frozen=True)
class BERT4RecConfig(Checked):
    dim: Count = 64  # section 5.3 of the AFT paper (BERT4Rec used d = 64 too)
    heads: Count = 2  # BERT4Rec's h = 2
    layers: Count = 2  # BERT4Rec's L = 2
    ff_dim: Count = 256  # 4 d, BERT4Rec section 3.3
    dropout: Rate = 0.1
    attn_dropout: Rate = 0.1  # on the attention weights, as in BERT
    mask_prob: Rate = 0.2  # BERT4Rec's rho for ML-1M; 0 = only the appended [MASK]
    loss: Loss = "softmax"  # "softmax" over [positive, negatives] or "bce"

    def validate(self) -> None:
        check_transformer(self)


@register_model(
    "bert4rec-single",
    BERT4RecConfig,
    paper_name="BERT4Rec (single)",
    paper_row=4,
    quick=QUICK,
    tune=DROPOUT,
)
class BERT4Rec(RetrievalModel):
    needs_negatives = True  # the sampled loss on the loader's negatives

    def __init__(self, cfg: BERT4RecConfig, info: DataInfo, history_len: int) -> None:
        super().__init__(cfg, info, history_len)
        d = cfg.dim
        self.item_emb = nn.Embedding(info.n_items + 1, d, padding_idx=info.pad)  # E, shared
        self.mask_token = nn.Parameter(torch.zeros(d))  # [MASK]
        self.pos_emb = nn.Embedding(history_len + 1, d)  # P, counted from the end
        self.drop = Dropout(cfg.dropout)
        self.encoder = transformer_encoder(cfg, activation="gelu")
        self.norm = nn.LayerNorm(d)
        self.head = nn.Sequential(nn.Linear(d, d), nn.GELU())  # GELU(h W^P + b^P), Eq. 7
        nn.init.normal_(self.item_emb.weight, std=0.05)
        nn.init.normal_(self.mask_token, std=0.05)
        nn.init.normal_(self.pos_emb.weight, std=0.05)
        with torch.no_grad():
            self.item_emb.weight[info.pad].zero_()

    def encode(
        self, seq: torch.Tensor, mask_prob: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the encoder on (B, L) right-aligned target-domain histories plus [MASK].

        Returns the (B, d) user vectors (output of the appended [MASK]), the (M, d) outputs of
        the randomly masked history positions and their (M, 2) (row, column) positions in the
        cut sequence, whose items are ``cut_history(seq)[row, column]``.
        """
        seq = self.cut_history(seq)  # (B, S)
        b, s = seq.shape
        valid = seq != self.info.pad
        cloze = torch.zeros_like(valid)  # (B, S), history positions replaced by [MASK]
        if mask_prob > 0:
            cloze = valid & (torch.rand(b, s, device=seq.device) < mask_prob)
        masked = torch.cat([cloze, cloze.new_ones(b, 1)], dim=1)  # (B, S + 1), [MASK] last
        tokens = torch.cat([seq, seq.new_full((b, 1), self.info.pad)], dim=1)
        attend = torch.cat([valid, valid.new_ones(b, 1)], dim=1)  # the [MASK] always attends
        order = length_order(attend)  # the grid is built in by_length's order of rows
        tokens, masked = tokens[order], masked[order]
        if self.item_emb.sparse:  # sparse gradients for the item table: look it up itself
            x = torch.where(masked.unsqueeze(-1), self.mask_token, self.item_emb(tokens))
        else:  # [MASK] as one more row of the item table: one lookup, not a lookup and a select
            table = torch.cat([self.item_emb.weight, self.mask_token.unsqueeze(0)])
            mask_id = self.item_emb.num_embeddings
            x = F.embedding(tokens.masked_fill(masked, mask_id), table, self.info.pad)
        positions = torch.arange(self.history_len - s, self.history_len + 1, device=seq.device)
        x = self.drop(x + self.pos_emb(positions))  # (B, S + 1, d)
        out = by_length(self._blocks, x, attend, order=order, reorder=False)  # rows in `order`
        slot = torch.argsort(order)  # (B,): where each batch row lies in `out`
        where = cloze.nonzero()  # (M, 2)
        # the B + M positions read, every appended [MASK] then the masked behaviours, as flat
        # indices into `out`: one gather, and the row-wise output layer on those rows only
        row = torch.cat([slot, slot[where[:, 0]]])
        col = torch.cat([slot.new_full((b,), s), where[:, 1]])
        picked = self.head(out.flatten(0, 1)[row * (s + 1) + col])
        return picked[:b], picked[b:], where

    def _blocks(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        return self.norm(self.encoder(x, (~attend).unsqueeze(1)))  # (B, S, d), padding unread

    def cut_history(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, S): the last ``history_len`` columns, then padding-only columns cut."""
        seq = seq[:, -self.history_len :]
        keep = int((seq != self.info.pad).sum(1).max()) if seq.numel() else 0
        return seq[:, seq.shape[1] - keep :]

    def user_vectors(self, batch: Batch, domain: int) -> torch.Tensor:
        u, _, _ = self.encode(batch.history[:, domain])
        return u

    def item_vectors(self, domain: int) -> torch.Tensor:
        return self.domain_rows(self.item_emb.weight, domain)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        assert batch.pos is not None and batch.neg is not None, "training batches carry items"
        rows = torch.arange(len(batch), device=batch.history.device)
        seq = batch.history[rows, batch.domain]  # (B, L), target domain only
        mask_prob = self.cfg.mask_prob if self.training else 0.0
        u, h_cloze, where = self.encode(seq, mask_prob)  # (B, d), (M, d), (M, 2)
        targets = torch.cat([batch.pos, self.cut_history(seq)[where[:, 0], where[:, 1]]])
        h = torch.cat([u, h_cloze])  # (B + M, d)
        negs = torch.cat([batch.neg, batch.neg[where[:, 0]]])  # (B + M, K)
        pos = (h * self.item_emb(targets)).sum(-1)  # (B + M,)
        neg = torch.einsum("nd,nkd->nk", h, self.item_emb(negs))  # (B + M, K)
        return {"loss": sampled_loss(pos, neg, self.cfg.loss)}

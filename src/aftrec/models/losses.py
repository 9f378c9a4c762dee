"""Losses over a positive and its sampled negatives, shared by the models.

``pos`` is (B,) logits of the clicked items, ``neg`` (B, K) logits of the K unclicked items
sampled from the same target domain (the loader's negatives).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aftrec.errors import ConfigError

LOSSES = ("softmax", "bce")


def sampled_loss(pos: torch.Tensor, neg: torch.Tensor, kind: str = "softmax") -> torch.Tensor:
    """``softmax``: -log(exp(s_pos) / (exp(s_pos) + sum_k exp(s_neg_k))), averaged over B.

    ``bce``: -(log sigmoid(s_pos) + sum_k log(1 - sigmoid(s_neg_k))) / (1 + K), averaged over B
    (the CTR-style objective of AFT's Eq. 13 with real negatives only).
    """
    if kind == "softmax":
        logits = torch.cat([pos.unsqueeze(1), neg], dim=1)  # (B, 1 + K)
        return -F.log_softmax(logits, dim=1)[:, 0].mean()
    if kind == "bce":
        logits = torch.cat([pos.unsqueeze(1), neg], dim=1)
        labels = torch.zeros_like(logits)
        labels[:, 0] = 1.0
        return F.binary_cross_entropy_with_logits(logits, labels)
    raise ConfigError(f"unknown loss {kind!r}; expected one of {LOSSES}")

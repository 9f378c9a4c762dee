"""Is AFT's generator alive? Per-epoch health of the fakes (or mined hard negatives).

"Adversarial Feature Translation for Multi-domain Recommendation" (Hao et al., KDD 2021),
section 3.4 wants G's fakes "high-quality and diversified": hard for D, different from the
user's real clicks, and personal. A GAN can fail while the end metric still looks plausible
(G collapsing onto a handful of popular items that D then learns to reject), so every
training step feeds what it already computed into :class:`FakeHealth`, and the trainer logs
:meth:`FakeHealth.summary` once per epoch in ``log.jsonl`` under ``"health"``:

* ``distinct`` / ``distinct_share`` per domain: how many of the domain's items were a fake at
  least once in the epoch, as a count and as a share of the domain's items;
  ``distinct_share_min`` is the smallest share over domains;
* ``pop_pct``: the fakes' mean popularity percentile within their domain (training clicks;
  100 = the most clicked item, ties counted half);
* ``reward_mean`` / ``reward_std``: the reward ``Q = p_d(e|u)`` of Eq. 14 on the fakes;
* ``advantage_abs``: the mean ``|Q - b|`` that REINFORCE multiplies the log-probability with
  (``Q`` itself for the printed form): 0 means G gets no signal;
* ``fn_rate``: the share of fakes that are one of the user's validation clicks (false
  negatives), beside ``fn_rate_random``, the same share for the batch's random unclicked
  negatives;
* ``top10_in_d_top50``: the share of D's top-50 slots, over the last batch's rows ranked with
  the end-of-epoch D, held by the epoch's 10 most frequent fakes of the row's domain (the one
  ranking pass per epoch; nothing extra per batch).

All counters are tensors updated without autograd; a summary resets them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from aftrec.data.dataset import DataInfo, Interactions
from aftrec.data.loader import Batch
from aftrec.models.aft.topk import Exclusions, domain_top_k


def popularity_percentile(item: np.ndarray, info: DataInfo) -> np.ndarray:
    """(n_items,) percentile of each item's click count within its domain, in [0, 100]:
    ``100 (#{items of the domain with fewer clicks} + #{with as many} / 2) / n_d``."""
    counts = np.bincount(item, minlength=info.n_items)[: info.n_items]
    out = np.zeros(info.n_items)
    for d in range(info.n_domains):
        lo, hi = info.domain_range(d)
        c = counts[lo:hi]
        ranked = np.sort(c)
        below = np.searchsorted(ranked, c, side="left")
        ties = np.searchsorted(ranked, c, side="right") - below
        out[lo:hi] = 100.0 * (below + 0.5 * ties) / max(hi - lo, 1)
    return out


def pair_keys(user: np.ndarray, item: np.ndarray, n_items: int) -> torch.Tensor:
    """Sorted unique ``user * n_items + item`` keys, for membership tests by binary search."""
    keys = user.astype(np.int64) * n_items + item.astype(np.int64)
    return torch.from_numpy(np.unique(keys))


def is_member(keys: torch.Tensor, users: torch.Tensor, items: torch.Tensor, n: int) -> torch.Tensor:
    """(B, m) bool: is (users[b], items[b, j]) one of the sorted ``keys``?"""
    query = (users[:, None].cpu() * n + items.cpu()).flatten()
    if len(keys) == 0:
        return torch.zeros(items.shape, dtype=torch.bool)
    pos = torch.searchsorted(keys, query).clamp(max=len(keys) - 1)
    return (keys[pos] == query).view(items.shape)


class FakeHealth:
    def __init__(self, info: DataInfo, train: Interactions, valid: Interactions | None) -> None:
        self.info = info
        self.percentile = torch.from_numpy(popularity_percentile(train.item, info)).float()
        self.valid_keys = (
            pair_keys(valid.user, valid.item, info.n_items)
            if valid is not None
            else torch.zeros(0, dtype=torch.long)
        )
        self.reset()

    def reset(self) -> None:
        self.counts = torch.zeros(self.info.n_items, dtype=torch.long)
        self.n = 0  # valid fakes
        self.pct_sum = self.reward_sum = self.reward_sq = self.adv_abs = 0.0
        self.fn, self.fn_random, self.n_random = 0, 0, 0
        self.last: Batch | None = None

    #: the running sums of an epoch (:meth:`state_dict`), besides the counts and the last batch
    SUMS = ("n", "pct_sum", "reward_sum", "reward_sq", "adv_abs", "fn", "fn_random", "n_random")

    def state_dict(self) -> dict[str, Any]:
        """The epoch's observations so far, as tensors and numbers (a mid-epoch checkpoint)."""
        last = None if self.last is None else dataclasses.asdict(self.last)
        sums = {k: getattr(self, k) for k in self.SUMS}
        return {"counts": self.counts.clone(), "last": last, **sums}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = state["counts"].clone()
        self.last = None if state["last"] is None else Batch(**state["last"])
        for k in self.SUMS:
            setattr(self, k, state[k])

    @torch.no_grad()
    def observe(
        self,
        batch: Batch,
        fakes: torch.Tensor,
        valid: torch.Tensor,
        reward: torch.Tensor,
        advantage: torch.Tensor,
    ) -> None:
        """One step's (B, k) fakes, validity, reward Q and the REINFORCE multiplier."""
        v = valid.cpu()
        ids = fakes.cpu()[v]
        self.counts += torch.bincount(ids, minlength=self.info.n_items)[: self.info.n_items]
        self.n += int(v.sum())
        self.pct_sum += float(self.percentile[ids].sum())
        q = reward.detach().cpu()[v].double()
        self.reward_sum += float(q.sum())
        self.reward_sq += float((q * q).sum())
        self.adv_abs += float(advantage.detach().cpu()[v].abs().sum())
        n = self.info.n_items
        self.fn += int((is_member(self.valid_keys, batch.users, fakes, n) & v).sum())
        if batch.neg is not None and batch.neg.numel():
            self.fn_random += int(is_member(self.valid_keys, batch.users, batch.neg, n).sum())
            self.n_random += batch.neg.numel()
        self.last = batch

    @torch.no_grad()
    def summary(
        self,
        user_vectors: torch.Tensor | None,
        item_table: torch.Tensor,
        exclude: Exclusions | None,
        offsets: torch.Tensor,
        chunk: int,
        depth: int = 50,
    ) -> dict[str, Any]:
        """The epoch's health (see the module docstring), then reset. ``user_vectors`` are D's
        u_t of :attr:`last` (or None to skip the top-50 share), ranked against ``item_table``
        with ``exclude`` (the rows' clicks) left out, ``chunk`` items at a time."""
        info, n = self.info, max(self.n, 1)
        distinct: dict[str, int] = {}
        share: dict[str, float] = {}
        for d, name in enumerate(info.domains):
            lo, hi = info.domain_range(d)
            distinct[name] = int((self.counts[lo:hi] > 0).sum())
            share[name] = round(distinct[name] / max(hi - lo, 1), 4)
        mean = self.reward_sum / n
        out: dict[str, Any] = {
            "fakes": self.n,
            "distinct": distinct,
            "distinct_share": share,
            "distinct_share_min": min(share.values()) if share else 0.0,
            "pop_pct": round(self.pct_sum / n, 2),
            "reward_mean": mean,
            "reward_std": max(self.reward_sq / n - mean * mean, 0.0) ** 0.5,
            "advantage_abs": self.adv_abs / n,
            "fn_rate": self.fn / n,
            "fn_rate_random": self.fn_random / max(self.n_random, 1),
        }
        if user_vectors is not None and self.last is not None and exclude is not None:
            out["top10_in_d_top50"] = self._top_share(
                user_vectors, item_table, exclude, offsets, chunk, depth
            )
        self.reset()
        return out

    def _top_share(
        self,
        u: torch.Tensor,
        table: torch.Tensor,
        exclude: Exclusions,
        offsets: torch.Tensor,
        chunk: int,
        depth: int,
    ) -> float:
        assert self.last is not None
        domain = self.last.domain
        frequent = torch.zeros(self.info.n_items + 1, dtype=torch.bool)
        for d in range(self.info.n_domains):  # the domain's 10 most frequent fakes
            lo, hi = self.info.domain_range(d)
            c = self.counts[lo:hi]
            top = c.topk(min(10, hi - lo)).indices
            frequent[lo + top[c[top] > 0]] = True
        k = min(depth, int((offsets[1:] - offsets[:-1]).min()))
        items, scores, _ = domain_top_k(u, table, domain, offsets, exclude, k, chunk)
        held = frequent[items.cpu().clamp(max=self.info.n_items)] & torch.isfinite(scores.cpu())
        return float(held.sum(1).double().mean() / k)

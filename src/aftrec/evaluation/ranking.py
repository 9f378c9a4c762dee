"""Full ranking inside one domain, shared by evaluation and ``aftrec recommend``.

For a batch of users the model scores every item of the target domain, the items the user
already clicked in the behaviours it may see are masked out, and the top ``k`` are taken with
one ``torch.topk``, ties by position (:func:`top_k`). A NaN score is refused (a diverged
model); an infinite one ranks as such. Batches are sized so that a (users x items) score
matrix stays within a fixed number of elements, whatever the catalogue size.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from aftrec.data.dataset import DataInfo
from aftrec.data.histories import HistoryIndex
from aftrec.data.loader import make_batch
from aftrec.errors import TrainingError
from aftrec.models.base import RetrievalModel

MAX_SCORE_ELEMENTS = 1 << 24  # ~16M scores per batch (64 MB in float32)


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, n) -> (B, k) positions of the ``k`` best scores, best first, ties by the lower
    position, at the cut too: a defined order (``torch.topk`` leaves tied scores in an order
    of its own, which changes with ``k`` and ``n``), which the serving indexes follow
    (:func:`aftrec.serving.index.exact_top_k`), so that a tie decides alike in evaluation,
    ``aftrec recommend`` and a bundle. One ``topk``, then two passes over the rows whose
    ties reach past the cut (popularity's equal counts, say)."""
    values, idx = torch.topk(scores, k, dim=1)
    if k == 0:
        return idx
    kth = values[:, -1:]  # (B, 1)
    tied = scores == kth  # (B, n)
    room = k - (scores > kth).sum(1, keepdim=True)  # tied items that fit
    cut = tied.sum(1, keepdim=True) > room  # (B, 1) some tied item is left out
    if bool(cut.any()):
        rows = cut[:, 0]
        keep = (scores[rows] > kth[rows]) | (tied[rows] & (tied[rows].cumsum(1) <= room[rows]))
        idx = idx.clone()
        idx[rows] = keep.nonzero()[:, 1].view(-1, k)  # ascending positions
    # by score, ties by position: sort by position, then stably by score
    idx = idx.sort(dim=1).values
    order = scores.gather(1, idx).sort(dim=1, descending=True, stable=True).indices
    return idx.gather(1, order)


@dataclass
class RankedBatch:
    users: np.ndarray  # (B,) user indices
    scores: torch.Tensor  # (B, n_d) raw scores of every item of the domain
    seen: torch.Tensor  # (B, n_d) bool, clicked in the visible history (masked out)
    top_items: torch.Tensor  # (B, k) positions inside the domain, best first (seen items
    # last, where the domain has fewer than k unseen ones)
    top_scores: torch.Tensor  # (B, k) their scores, as the model gave them

    def top_unseen(self) -> torch.Tensor:
        """(B, k) bool: which of ``top_items`` the user has not seen (the list proper)."""
        return ~self.seen.gather(1, self.top_items)


def dense_mask(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[torch.from_numpy(rows), torch.from_numpy(np.asarray(cols, dtype=np.int64))] = True
    return mask


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's tensors live (CPU for a model without any)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def rank_domain(
    model: RetrievalModel,
    info: DataInfo,
    history: HistoryIndex,
    users: np.ndarray,
    domain: int,
    k: int,
    batch_size: int = 1024,
    history_len: int = 50,
) -> Iterator[RankedBatch]:
    """Yield the top-``k`` unseen items of ``domain`` for ``users``, batch by batch."""
    n_d = info.domain_size(domain)
    k = min(k, n_d)
    step = max(1, min(batch_size, MAX_SCORE_ELEMENTS // max(n_d, 1)))
    model.eval()
    device = model_device(model)
    with torch.inference_mode():
        for start in range(0, len(users), step):
            u = np.asarray(users[start : start + step], dtype=np.int64)
            domains = np.full(len(u), domain, dtype=np.int64)
            batch = make_batch(info, history, u, domains, history_len).to(device)
            scores = model.score(batch, domain).float().cpu()  # (B, n_d)
            nan = torch.isnan(scores).any(dim=1)
            if nan.any():  # topk would rank NaN first; a mean would quietly skip the users
                raise TrainingError(
                    f"the model scores NaN for {int(nan.sum())} of {len(u)} users in domain "
                    f"{info.domains[domain]!r} (user index {int(u[int(nan.int().argmax())])} "
                    "first): its weights diverged; nothing was ranked"
                )
            seen = dense_mask(*history.seen_mask(u, domain), (len(u), n_d))
            # -inf marks the seen items only: an unseen item the model scores -inf still ranks
            # above them (it is lifted to the lowest finite score for the ranking alone)
            lowest = torch.finfo(scores.dtype).min
            ranked = scores.clamp(min=lowest).masked_fill(seen, float("-inf"))
            top_items = top_k(ranked, k)
            yield RankedBatch(u, scores, seen, top_items, scores.gather(1, top_items))

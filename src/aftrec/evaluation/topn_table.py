"""``aftrec recommend``: a trained run's top-N lists per (user, domain) as one table, in long
form with the original ids (offline, from the run; the online, in-process recommender that
serves a bundle is :mod:`aftrec.serving.recommender`).

Columns: ``user, domain, item, rank, score`` (rank starts at 1). By default every test user
gets a list for each domain where they have held-out positives; ``users`` / ``domains``
choose explicitly (then every chosen user gets every chosen domain). The input is the whole
training history (train + validation) and those items are excluded from the lists.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

from aftrec.arrays import unique
from aftrec.data.dataset import Dataset
from aftrec.data.histories import HistoryIndex
from aftrec.errors import DataError
from aftrec.evaluation.ranking import rank_domain
from aftrec.models.base import RetrievalModel
from aftrec.outputs import atomic_write_bytes


def recommend(
    model: RetrievalModel,
    data: Dataset,
    history_len: int,
    n: int,
    users: list[str] | None = None,
    domains: list[str] | None = None,
    batch_size: int = 1024,
) -> pd.DataFrame:
    if n < 1:
        raise DataError(f"--n must be at least 1, got {n}")
    info = data.info
    history = HistoryIndex(data.train_valid, info)
    chosen_users = None if users is None else data.user_index(users)
    chosen_domains = (  # each domain once, in the order given, as each user gets one list
        range(info.n_domains)
        if domains is None
        else data.domain_index(list(dict.fromkeys(domains)))
    )
    item_ids = data.items["item"].to_numpy()
    user_ids = data.users["user"].to_numpy()
    frames = []
    for d in chosen_domains:
        if chosen_users is not None:
            u = unique(chosen_users)
        elif domains is None:
            u = unique(data.test.user[data.test.domain == d])
        else:
            u = unique(data.test.user)
        if len(u) == 0:
            continue
        lo, _ = info.domain_range(d)
        for rb in rank_domain(model, info, history, u, d, n, batch_size, history_len):
            k = rb.top_items.shape[1]
            ok = rb.top_unseen().numpy().ravel()  # fewer unseen items than n
            frames.append(
                pd.DataFrame(
                    {
                        "user": np.repeat(user_ids[rb.users], k)[ok],
                        "domain": info.domains[d],
                        "item": item_ids[rb.top_items.numpy().ravel() + lo][ok],
                        "rank": np.tile(np.arange(1, k + 1), len(rb.users))[ok],
                        "score": rb.top_scores.numpy().ravel()[ok],
                    }
                )
            )
    if not frames:
        return pd.DataFrame(columns=["user", "domain", "item", "rank", "score"])
    return pd.concat(frames, ignore_index=True)


def check_table_path(path: Path) -> None:
    """A table's ``path`` ends in .csv, .parquet or .pq (checked before any ranking)."""
    if Path(path).suffix.lower() not in (".csv", ".parquet", ".pq"):
        raise DataError(f"{path}: output must end in .csv or .parquet")


def write_table(frame: pd.DataFrame, path: Path) -> None:
    """Write CSV or Parquet by suffix, atomically."""
    check_table_path(path)
    buf = io.BytesIO()
    if path.suffix.lower() in (".parquet", ".pq"):
        frame.to_parquet(buf, index=False)
    else:
        buf.write(frame.to_csv(index=False).encode())
    atomic_write_bytes(path, buf.getvalue())

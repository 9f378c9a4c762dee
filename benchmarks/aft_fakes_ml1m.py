"""How often are AFT's fake clicks items the user clicks later? (issue: AFT quality on ML-1M)

AFT's generator proposes the top-k items of the target domain (Eq. 5), excluding the user's
training clicks (section 3.4), and the discriminator learns to score them as unclicked
(Eq. 13). Items the user clicks *after* the training period (the validation and test
positives) cannot be excluded without leaking them, so every such item among the fakes is a
false negative that D is taught to push down: exactly the items Recall@N counts.

For trained runs, this script ranks each domain's items for every user with a held-out
positive in it, with the user's training history as input and the training clicks excluded,
as when fakes are drawn, and reports the share of the top-k that are held-out positives
(validation or test) of that user and domain:

* G's top-k (the fakes; the generator at inference, i.e. without the mask),
* D's top-k of the same run (what HNM's skipped band protects against),
* k items drawn uniformly from the unclicked items (a random negative's chance).

Run: ``python benchmarks/aft_fakes_ml1m.py --runs results/ml-1m/runs/aft/seed0
results/ml-1m/runs/aft-d/seed0`` (runs need ``best.pt``); writes
benchmarks/results/aft_fakes_ml1m.json and a table in ``.md``, with each run's test average
Recall@50 where the run has a ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from _common import RESULTS, machine
from aftrec.arrays import unique
from aftrec.data.dataset import Dataset, Interactions
from aftrec.data.histories import HistoryIndex
from aftrec.data.loader import Batch
from aftrec.evaluation.ranking import rank_domain
from aftrec.models.aft.model import AFT
from aftrec.training.rundir import load_run


class GeneratorScorer(torch.nn.Module):
    """G's Eq. 5 scores ``h_t . e`` over a domain, in the evaluator's ``score`` interface."""

    def __init__(self, model: AFT) -> None:
        super().__init__()
        self.model = model

    def score(self, batch: Batch, domain: int) -> torch.Tensor:
        return self.model.trial_vectors(batch, domain) @ self.model.trial_item_vectors(domain).T


def heldout_keys(data: Dataset) -> np.ndarray:
    """Sorted ``user * n_items + item`` of every validation and test positive."""
    parts = [data.valid, data.test]
    n = data.info.n_items
    return np.sort(np.concatenate([p.user.astype(np.int64) * n + p.item for p in parts]))


def share_heldout(
    scorer: torch.nn.Module | AFT,
    data: Dataset,
    history: HistoryIndex,
    heldout: Interactions,
    keys: np.ndarray,
    k: int,
    history_len: int,
) -> dict[str, float]:
    """Per domain: the share of the top-``k`` unseen items that are held-out positives."""
    info = data.info
    out: dict[str, float] = {}
    hits = total = 0
    for d, name in enumerate(info.domains):
        users = unique(heldout.user[heldout.domain == d])
        lo, _ = info.domain_range(d)
        h = t = 0
        for rb in rank_domain(scorer, info, history, users, d, k, 1024, history_len):  # type: ignore[arg-type]
            items = rb.top_items.numpy().astype(np.int64) + lo
            key = rb.users.astype(np.int64)[:, None] * info.n_items + items
            pos = np.searchsorted(keys, key)
            found = keys[np.minimum(pos, len(keys) - 1)] == key
            h += int(found.sum())
            t += found.size
        out[name] = h / t
        hits, total = hits + h, total + t
    out["all"] = hits / total
    return out


def random_share(data: Dataset, heldout: Interactions) -> dict[str, float]:
    """Expected share for items drawn uniformly from the user's unclicked items of the domain:
    (held-out positives) / (domain size - training clicks), averaged over the (user, domain)
    pairs with a held-out positive, weighted as the ranked lists are (equally)."""
    info = data.info
    out: dict[str, float] = {}
    num = den = 0.0
    for d, name in enumerate(info.domains):
        users, held = np.unique(heldout.user[heldout.domain == d], return_counts=True)
        train_users, clicked = np.unique(
            data.train.user[data.train.domain == d], return_counts=True
        )
        seen = np.zeros(info.n_users, dtype=np.int64)
        seen[train_users] = clicked
        share = held / (info.domain_size(d) - seen[users])
        out[name] = float(share.mean())
        num, den = num + float(share.sum()), den + len(share)
    out["all"] = num / den
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, nargs="+", required=True)
    ap.add_argument("--k", type=int, default=5, help="top-k (AFT's n_fakes, 5)")
    ap.add_argument("--out", type=Path, default=RESULTS / "aft_fakes_ml1m.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    results: dict[str, object] = {"k": args.k, "machine": machine(), "runs": {}}
    baseline: dict[str, float] | None = None
    for run in args.runs:
        cfg, data, model = load_run(run, "best")
        history = HistoryIndex(data.train, data.info)  # what the fakes see and exclude
        heldout = Interactions.concat([data.valid, data.test])
        keys = heldout_keys(data)
        if baseline is None:
            baseline = random_share(data, heldout)
        row: dict[str, dict[str, float]] = {}
        row["D top-k"] = share_heldout(
            model, data, history, heldout, keys, args.k, cfg.data.history_len
        )
        if isinstance(model, AFT) and model.has_generator:
            row["G top-k (fakes)"] = share_heldout(
                GeneratorScorer(model), data, history, heldout, keys, args.k, cfg.data.history_len
            )
        metrics = run / "metrics.json"  # the run's test evaluation, if it has one
        test = json.loads(metrics.read_text())["average"] if metrics.is_file() else {}
        results["runs"][str(run)] = {"held-out share": row, "test average": test}  # type: ignore[index]
        for what, share in row.items():
            print(f"{run}  {what:16s} held-out share {share['all']:.3f}  " + "  ".join(
                f"{d} {v:.3f}" for d, v in share.items() if d != "all"))  # fmt: skip
    assert baseline is not None
    results["uniform unclicked"] = baseline
    print(f"uniform unclicked item: held-out share {baseline['all']:.4f}")
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    table = [
        "| run | G's top-k (the fakes) | D's top-k | test avg r@50 |",
        "|---|---|---|---|",
    ]
    for run, res in results["runs"].items():  # type: ignore[attr-defined]
        share, test = res["held-out share"], res["test average"]
        g = share.get("G top-k (fakes)", {}).get("all")
        table.append(
            f"| `{run}` | {'–' if g is None else f'{g:.3f}'} | {share['D top-k']['all']:.3f} | "
            + (f"{test['recall@50']:.4f} |" if "recall@50" in test else "– |")
        )
    table.append(f"| uniform unclicked item | {baseline['all']:.4f} | | |")
    args.out.with_suffix(".md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()

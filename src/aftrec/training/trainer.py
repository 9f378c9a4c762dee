"""The epoch loop: train, validate, keep the best, stop early, checkpoint atomically.

It writes a run directory (:mod:`aftrec.training.rundir`: ``config.yaml``, ``run.json``,
``last.pt``, ``best.pt``, ``log.jsonl``).

``--resume`` continues from ``last.pt`` with the saved config and counters; every epoch's
randomness (order, negatives, dropout) is seeded from (seed, epoch, rank), so a run killed
between two epochs ends where an uninterrupted one would have.

Under torchrun the same loop runs data-parallel (:mod:`aftrec.training.distributed`): each
rank trains on its own user shards, DDP averages the gradients, and rank 0 alone validates,
writes the log and the checkpoints; the run directory must be on storage every rank sees.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from aftrec.config import RunConfig
from aftrec.data.dataset import Dataset
from aftrec.data.loader import ShardedLoader
from aftrec.data.shards import load_shards
from aftrec.errors import CheckpointError, ConfigError
from aftrec.evaluation.evaluate import Evaluator
from aftrec.models.base import RetrievalModel
from aftrec.registry import create_model
from aftrec.training import checkpoint, rundir
from aftrec.training.distributed import SINGLE, Context, peak_rss_mib, shards_of
from aftrec.training.optim import use_sparse_embeddings
from aftrec.training.steps import make_step

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run: Path
    best_epoch: int
    best_metric: float
    epochs_run: int
    seconds: float
    examples_per_second: float
    stopped_early: bool
    peak_rss_mib: list[float] = dataclasses.field(default_factory=list)  # per rank


def _metric_name(cfg: RunConfig) -> tuple[str, int]:
    name, _, n = cfg.train.valid_metric.partition("@")
    if name not in ("recall", "ndcg") or not n.isdigit():
        raise ConfigError(
            "train.valid_metric must look like recall@50 or ndcg@20, "
            f"got {cfg.train.valid_metric!r}"
        )
    return cfg.train.valid_metric, int(n)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The torch seed of one rank's epoch: dropout and masks are reproducible per epoch."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def train(
    data_dir: Path,
    cfg: RunConfig | None,
    out: Path,
    resume: bool = False,
    progress: bool = True,
    ctx: Context = SINGLE,
    resume_set: list[str] | None = None,
) -> TrainResult:
    """Train (or resume) a run; under torchrun pass the :func:`distributed.init` context.

    ``resume_set`` overrides the saved config of a resumed run (the CLI allows only
    ``train.epochs``, to train a finished run for longer)."""
    out = Path(out)
    progress = progress and ctx.main
    if resume:
        if cfg is not None:
            raise ConfigError("--resume continues with the run's saved config; drop --config/--set")
        cfg = rundir.load_run_config(out, resume_set)
        state: dict[str, Any] | None = checkpoint.load(out / rundir.LAST)
        if resume_set and ctx.main:
            rundir.write_config(out, cfg)
        if ctx.main:  # left by a process killed
            rundir.remove_temporaries(out)
    else:
        assert cfg is not None
        if (out / rundir.LAST).exists() or (out / rundir.BEST).exists():
            raise ConfigError(f"{out} already holds a run; pass --resume or choose another --out")
        state = None
    metric, metric_n = _metric_name(cfg)
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)

    n_shards = tc.data_shards or ctx.world
    local = load_shards(Path(data_dir), n_shards, shards_of(ctx, n_shards))
    model = create_model(cfg.model_name, cfg.model, local.info, cfg.data.history_len)
    model.to(tc.device)
    # rank 0 validates. With train.valid_users it samples the users of its own partitions
    # (whose histories it holds), so no rank reads the whole log; else it reads everything.
    own = local.complete or not ctx.main or tc.valid_users is not None
    full = local.dataset if own else Dataset(Path(data_dir))
    evaluator = Evaluator(full, cfg.data.history_len, tc.eval_batch_size)
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
    if not resume and ctx.main:
        rundir.write_config(out, cfg)
        rundir.write_meta(out, data_dir, cfg.model_name)
    started = time.perf_counter()

    if not model.trainable:
        if state is not None and state.get("done"):
            log.info("run %s already finished", out)
            return TrainResult(out, 0, float(state["metric"]), 0, 0.0, 0.0, False)
        result = None
        if ctx.main:  # closed form: one process fits, the others wait
            result = _fit_closed_form(cfg, full, evaluator, out, metric, metric_n, started)
        return ctx.broadcast(result)

    if tc.sparse_embeddings:
        use_sparse_embeddings(model, min_rows=local.info.n_items)
    model.prepare_training(local.train, local.dataset.valid)  # fresh and resumed
    loader = ShardedLoader(
        local.shards, local.info, cfg.data.history_len, tc.batch_size, cfg.data.n_negatives,
        n_shards, local.n_examples, tc.seed,
    )  # fmt: skip
    step = make_step(model, tc, ctx)
    epoch, best, best_epoch, bad_epochs = 0, float("-inf"), -1, 0
    if state is not None:
        if state.get("done") and (state.get("stopped_early") or state["epoch"] >= tc.epochs):
            log.info("run %s already finished", out)
            return TrainResult(
                out,
                state["best_epoch"],
                state["best_metric"],
                state["epoch"],
                0.0,
                0.0,
                state.get("stopped_early", False),
            )
        try:
            model.load_state_dict(state["model"])
            step.load_state_dict(state["step"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{out / rundir.LAST}: does not fit this run: {exc}") from exc
        epoch, best, best_epoch, bad_epochs = (
            state["epoch"],
            state["best_metric"],
            state["best_epoch"],
            state["bad_epochs"],
        )

    has_valid = int(sum(local.dataset.meta["counts"]["valid"].values())) > 0
    examples, train_seconds, stopped_early = 0, 0.0, False
    while epoch < tc.epochs:
        t0 = time.perf_counter()
        totals: dict[str, float] = {}
        n_batches = epoch_examples = 0
        torch.manual_seed(epoch_seed(tc.seed, epoch, ctx.rank))
        batches = loader.epoch(epoch, tc.max_batches_per_epoch)
        total = (
            len(loader)
            if tc.max_batches_per_epoch is None
            else min(len(loader), tc.max_batches_per_epoch)
        )
        bar = tqdm(
            batches,
            total=total,
            desc=f"epoch {epoch + 1}/{tc.epochs}",
            unit="batch",
            disable=not progress,
            leave=False,
        )
        for batch in bar:
            losses = step(batch if tc.device == "cpu" else batch.to(tc.device))
            if not all(np.isfinite(v) for v in losses.values()):
                raise FloatingPointError(f"non-finite loss at epoch {epoch + 1}: {losses}")
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + v
            n_batches += 1
            epoch_examples += len(batch)
            if n_batches % 20 == 0:
                bar.set_postfix({k: f"{v / n_batches:.4f}" for k, v in totals.items()})
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds
        epoch += 1
        # the ranks' mean losses and example counts (one small gather per epoch)
        per_rank = ctx.gather((totals, n_batches, epoch_examples, peak_rss_mib()))
        epoch_examples = sum(r[2] for r in per_rank)  # over all ranks
        examples += epoch_examples
        entry: dict[str, Any] = {
            "epoch": epoch,
            **{
                k: sum(r[0][k] for r in per_rank) / max(sum(r[1] for r in per_rank), 1)
                for k in totals
            },
        }
        health = model.epoch_health()  # this rank's (rank 0's is logged)
        if health is not None:
            entry["health"] = health
        entry["ranks"] = ctx.world
        entry["peak_rss_mib"] = [round(r[3], 1) for r in per_rank]  # one per rank
        if not ctx.main:  # rank 0 validates and checkpoints; the others wait for its verdict
            stopped_early = ctx.broadcast(None)
            if stopped_early:
                break
            continue
        t_valid = time.perf_counter()
        if has_valid:
            value = evaluator.evaluate(
                model, "valid", ns=(metric_n,), progress=False, max_users=tc.valid_users
            ).average[metric]
        else:
            value = -float(epoch)  # no validation part: the last epoch is the best
        entry[f"valid_{metric}"] = value
        entry["examples_per_second"] = epoch_examples / max(epoch_seconds, 1e-9)
        # wall time of this epoch's training and validation (summed up to the best epoch:
        # the time to the best validation epoch, resumed runs included)
        entry["train_seconds"] = round(epoch_seconds, 3)
        entry["valid_seconds"] = round(time.perf_counter() - t_valid, 3)
        entry["peak_rss_mib"][0] = round(peak_rss_mib(), 1)  # rank 0's, validation included
        if value > best:
            best, best_epoch, bad_epochs = value, epoch, 0
            checkpoint.save(
                {"model": model.state_dict(), "epoch": epoch, "metric": value}, out / rundir.BEST
            )
        else:
            bad_epochs += 1
        stopped_early = bad_epochs >= tc.patience
        done = stopped_early or epoch >= tc.epochs
        checkpoint.save(
            {
                "model": model.state_dict(),
                "step": step.state_dict(),
                "epoch": epoch,
                "best_metric": best,
                "best_epoch": best_epoch,
                "bad_epochs": bad_epochs,
                "done": done,
                "stopped_early": stopped_early,
            },
            out / rundir.LAST,
        )
        rundir.append_log(out, entry)
        msg = ", ".join(
            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
            for k, v in entry.items()
            if k != "health"
        )
        if health is not None:  # the full record is in log.jsonl
            msg += ", fakes distinct share (min over domains)={:.3f}, |Q-b|={:.2e}".format(
                health["distinct_share_min"], health["advantage_abs"]
            )
        tqdm.write(msg) if progress else log.info(msg)
        ctx.broadcast(stopped_early)
        if stopped_early:
            break
    seconds = time.perf_counter() - started
    best_epoch, best = ctx.broadcast((best_epoch, best))
    peaks = [round(p, 1) for p in ctx.gather(peak_rss_mib())]
    return TrainResult(
        out, best_epoch, best, epoch, seconds, examples / max(train_seconds, 1e-9),
        stopped_early, peaks,
    )  # fmt: skip


def _fit_closed_form(
    cfg: RunConfig,
    data: Dataset,
    evaluator: Evaluator,
    out: Path,
    metric: str,
    metric_n: int,
    started: float,
) -> TrainResult:
    """Fit every point of the model's search space, keep the best on validation."""
    best: tuple[float, RetrievalModel, Any] | None = None
    model = create_model(cfg.model_name, cfg.model, data.info, cfg.data.history_len)
    for params in model.search_space():
        model_cfg = dataclasses.replace(cfg.model, **params)
        model = create_model(cfg.model_name, model_cfg, data.info, cfg.data.history_len)
        model.fit(data.train)
        value = evaluator.evaluate(model, "valid", ns=(metric_n,), progress=False).average[metric]
        rundir.append_log(out, {"epoch": 0, **params, f"valid_{metric}": value})
        if best is None or value > best[0]:
            best = (value, model, model_cfg)
    assert best is not None
    value, model, model_cfg = best
    rundir.write_config(out, dataclasses.replace(cfg, model=model_cfg))
    payload = {"model": model.state_dict(), "epoch": 0, "metric": value}
    checkpoint.save(payload, out / rundir.BEST)
    checkpoint.save({**payload, "done": True}, out / rundir.LAST)
    return TrainResult(out, 0, value, 0, time.perf_counter() - started, 0.0, False)


__all__ = ["TrainResult", "train"]

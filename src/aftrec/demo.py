"""``aftrec demo`` (``make demo``): the whole product end to end, each step one timed line.

1. ``prepare``: MovieLens-100K (``dataset="ml-1m"`` for ML-1M) into ``OUT/data``;
2. ``train``: ``two-tower``, ``aft-d`` and ``aft`` to early stopping (or the epoch cap),
   ``pop`` and EASE fitted in closed form, two at a time: an ``aftrec reproduce`` with one
   seed and ``OUT`` as its report directory, so a demo cut short resumes where it stopped and
   a finished one reuses its runs; the step's line says how each run ended, as it recorded;
3. ``compare``: one per-domain test Recall@50 table of every model, best average first, and
   the same as a bar chart, ``OUT/demo_recall50.png`` (:data:`CHART`; the report's own
   ``OUT/recall50.png``, mean and std over seeds, stays as the report wrote it);
4. ``export``: the best dot-product model as a serving bundle, ``OUT/bundle``;
5. ``serve``: the bundle over HTTP on a free loopback port, in a thread;
6. ``ask``: ``POST /recommend`` for a known user and for a new user given by behaviours in
   another domain (the cross-domain path AFT exists for);
7. ``stop``: the server stops.

The layers below do the work (:mod:`aftrec.api`, :mod:`aftrec.experiments.reproduce`,
:mod:`aftrec.serving`); this module chooses, times and prints.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aftrec import api
from aftrec.errors import ConfigError

if TYPE_CHECKING:
    from aftrec.data.dataset import Dataset
    from aftrec.data.sources.synthetic import SyntheticConfig
    from aftrec.experiments.plan import ReproduceSpec

#: trained in this order, the longest first, so that the two workers finish together
MODELS = ("aft", "aft-d", "two-tower", "ease", "pop")
DATASETS = ("ml-100k", "ml-1m", "synthetic")
METRIC = "recall@50"
#: step 3's chart in OUT: not ``recall50.png``, the report's chart that report.md embeds
CHART = "demo_recall50.png"


@dataclass(frozen=True)
class DemoSpec:
    """What ``aftrec demo`` runs. ``out`` defaults to ``runs/demo/DATASET``."""

    dataset: str = "ml-100k"
    out: Path | None = None
    jobs: int = 2
    models: tuple[str, ...] = MODELS
    #: ``aftrec reproduce --set`` pairs (``[MODEL:]KEY=VALUE``), e.g. tiny settings in a test
    overrides: tuple[str, ...] = ()
    synthetic: SyntheticConfig | None = None  # with dataset="synthetic"
    n: int = 5  # items per answer
    progress: bool = False  # reproduce's progress bar (on a terminal)

    @property
    def folder(self) -> Path:
        return self.out if self.out is not None else Path("runs/demo") / self.dataset


@dataclass
class DemoResult:
    """What the demo produced: the table's rows (model, {domain or "average": recall@50}),
    best first, and the files and answers."""

    rows: list[tuple[str, dict[str, float]]]
    report: Path
    chart: Path
    bundle: Path
    served: str  # the model served
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)  # known / new -> body


class _Steps:
    """Numbered, timed step lines: ``[3/7] compare    0.4s  ...``."""

    def __init__(self, total: int, echo: Callable[[str], None]) -> None:
        self.total, self.echo, self.done = total, echo, 0

    @contextmanager
    def step(self, name: str) -> Iterator[list[str]]:
        """Yields a list: the step puts its one-line summary first, indented lines after."""
        lines: list[str] = []
        t0 = time.perf_counter()
        yield lines
        self.done += 1
        took = _duration(time.perf_counter() - t0)
        head, *rest = lines or [""]
        self.echo(f"[{self.done}/{self.total}] {name:8s} {took:>6s}  {head}")
        for line in rest:
            self.echo(f"      {line}")


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    return f"{int(seconds // 60)}m{round(seconds % 60):02d}s"


@contextmanager
def _quiet(names: Sequence[str] = ("aftrec", "faiss")) -> Iterator[None]:
    """INFO lines off (what prepare dropped, which FAISS build loaded, ...): the steps say
    what happened. Left on with ``-v`` (DEBUG)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        if logging.DEBUG < lg.getEffectiveLevel() < logging.WARNING:
            lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def run_demo(spec: DemoSpec, echo: Callable[[str], None] = print) -> DemoResult:
    """Run the seven steps (module docstring), printing each with ``echo``."""
    if spec.dataset not in DATASETS:
        raise ConfigError(f"demo dataset {spec.dataset!r}: choose one of {', '.join(DATASETS)}")
    out = spec.folder
    _check_before_preparing(spec, out)
    steps = _Steps(7, echo)
    with _quiet(), _held_folder(out):
        with steps.step("prepare") as lines:
            data_dir = _prepare(spec, out / "data", lines)
        with steps.step("train") as lines:
            report, runs = _train(spec, data_dir, out, lines)
        with steps.step("compare") as lines:
            rows = _compare(runs, lines)
            chart = _chart(rows, out / CHART)
            lines[0] += f"; chart {chart}"
        with steps.step("export") as lines:
            served, bundle = _export(rows, runs, out / "bundle", lines)
        result = DemoResult(rows, report, chart, bundle, served)
        _serve_and_ask(spec, data_dir, bundle, served, steps, result)
    return result


@contextmanager
def _held_folder(out: Path) -> Iterator[None]:
    """Create ``out`` and hold its report lock for the whole demo, so that a second demo (or
    an ``aftrec reproduce``) on the folder is refused before step 1, not at step 2 after
    preparing the same data beside this one.

    A demo stopped (Ctrl-C, SIGTERM) or failed before anything was in ``out`` leaves no
    folder behind: the lock file it created is removed while still held (a process that
    opened it meanwhile locks the file then at the path, :func:`aftrec.outputs.held`), and
    so are the folders this call created that are empty. A folder that was there before
    stays, and so does one with anything in it (prepared data, runs: what the next call
    reuses)."""
    from aftrec.errors import OutputError
    from aftrec.experiments.reproduce import LOCK, report_lock
    from aftrec.outputs import output_error

    created = [p for p in (out, *out.parents) if not p.exists()]  # deepest first
    lock = out / LOCK
    ours = not lock.exists()
    try:
        with ExitStack() as stack:
            for attempt in range(3):
                made = [p for p in (out, *out.parents) if not p.exists()]
                created += [p for p in made if p not in created]  # deepest first still
                ours = ours or bool(made)  # a folder made again holds no lock of another's
                try:
                    out.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise output_error(out, exc) from exc
                try:
                    stack.enter_context(report_lock(out))
                    break
                except OutputError:
                    # another demo, stopped before anything was in the folder, removed it
                    # between the two calls: make it again (busy or unwritable: refused)
                    if out.is_dir() or attempt == 2:
                        raise
            try:
                yield
            except BaseException:
                if ours and [p.name for p in out.iterdir()] == [LOCK]:
                    lock.unlink()
                raise
    except BaseException:
        for folder in created:
            try:
                folder.rmdir()  # only if empty
            except FileNotFoundError:  # not created yet
                continue
            except OSError:  # not empty, and so are the folders above it
                break
        raise


def _reproduce_spec(spec: DemoSpec, data_dir: Path, out: Path) -> ReproduceSpec:
    """Step 2's reproduction: one seed of the demo's models, ``out`` its report directory."""
    from aftrec.experiments.plan import ReproduceSpec

    return ReproduceSpec(
        data=data_dir, out=out, seeds=1, models=spec.models, overrides=spec.overrides,
        ablations=False, sweeps=False, progress=spec.progress, jobs=spec.jobs,
    )  # fmt: skip


def _check_before_preparing(spec: DemoSpec, out: Path) -> None:
    """What step 2 would refuse (``--jobs``, ``--set``, an ``--out`` that is a run, a dataset
    or a bundle) is refused before step 1 writes the data into ``out``."""
    from aftrec.experiments.plan import make_plan
    from aftrec.experiments.reproduce import check_report_dir

    check_report_dir(out)
    make_plan(_reproduce_spec(spec, out / "data", out))


# --------------------------------------------------------------------------- 1. prepare
def _prepare(spec: DemoSpec, data_dir: Path, lines: list[str]) -> Path:
    from aftrec.data.prepared import read_meta

    if (data_dir / "meta.json").is_file():
        meta = read_meta(data_dir)
        if meta["source"].get("kind") != spec.dataset:
            raise ConfigError(
                f"{data_dir} holds {meta['source'].get('kind')}, not {spec.dataset}; "
                "choose another --out"
            )
        verb = "reused"
    else:
        api.prepare(data_dir, dataset=spec.dataset, synthetic=spec.synthetic, force=True)
        meta = read_meta(data_dir)
        verb = "prepared"
    positives = sum(sum(per.values()) for per in meta["counts"].values())
    lines.append(
        f"{verb} {spec.dataset}: {meta['n_users']:,} users, {meta['n_items']:,} items, "
        f"{positives:,} positives in {len(meta['domains'])} domains "
        f"({', '.join(meta['domains'])}) -> {data_dir}"
    )
    return data_dir


# --------------------------------------------------------------------------- 2. train
def _train(
    spec: DemoSpec, data_dir: Path, out: Path, lines: list[str]
) -> tuple[Path, dict[str, Path]]:
    from aftrec.experiments.plan import make_plan, read_json
    from aftrec.experiments.reproduce import reproduce
    from aftrec.registry import registration
    from aftrec.training.rundir import epoch_log

    rspec = _reproduce_spec(spec, data_dir, out)
    runs = {m: make_plan(rspec).runs[(m, 0)] for m in spec.models}
    summary = reproduce(rspec, locked=True)  # run_demo holds the lock
    epochs = []
    ended = dict.fromkeys(ENDINGS, 0)
    for model, run in runs.items():
        if read_json(run / "metrics.json") is not None:  # else failed, counted below
            ended[_ending(model, run)] += 1
        log = epoch_log(run)
        seconds = (read_json(run / "reproduce.json") or {}).get("train_seconds")
        if not registration(model).deterministic and log and seconds is not None:
            plural = "s" if len(log) > 1 else ""
            epochs.append(f"{model} {len(log)} epoch{plural} {_duration(seconds)}")
    done = f"{summary.trained} trained"
    done += f", {summary.reused} reused" if summary.reused else ""
    done += f", {summary.failed} FAILED (see the report)" if summary.failed else ""
    how = ", ".join(f"{n} {ending}" for ending, n in ended.items() if n)
    lines.append(
        f"{len(runs)} models, {spec.jobs} at a time" + (f": {how}" if how else "")
        + f" ({done}) -> {summary.report}"
    )  # fmt: skip
    if epochs:
        lines.append("; ".join(epochs))
    return summary.report, runs


#: how a finished run of step 2 ended, in the order the step's line counts them
ENDINGS = ("to early stopping", "at the epoch cap", "fitted in closed form", "finished")


def _ending(model: str, run: Path) -> str:
    """One of :data:`ENDINGS` for a finished run: what its ``last.pt`` recorded, not what the
    config asked for (``train.epochs=1`` ends every run at the cap); "finished" where no
    ``last.pt`` says (a report directory copied without its checkpoints)."""
    from aftrec.registry import registration
    from aftrec.training.rundir import stopped_early

    if registration(model).deterministic:
        return "fitted in closed form"
    early = stopped_early(run)
    if early is None:
        return "finished"
    return "to early stopping" if early else "at the epoch cap"


# --------------------------------------------------------------------------- 3. compare
def _compare(runs: dict[str, Path], lines: list[str]) -> list[tuple[str, dict[str, float]]]:
    from aftrec.evaluation.evaluate import metric_value
    from aftrec.experiments.plan import read_json

    rows = []
    for model, run in runs.items():
        metrics = read_json(run / "metrics.json")
        if metrics is None:  # failed: the report says why
            continue
        per = {d: metric_value(v[METRIC]) for d, v in metrics["domains"].items()}
        rows.append((model, {**per, "average": metric_value(metrics["average"][METRIC])}))
    if not rows:
        raise ConfigError("no model finished training; see the report for the failures")
    rows.sort(key=lambda row: -row[1]["average"])
    names = list(rows[0][1])
    width = max(len(m) for m, _ in rows)
    cols = [max(len(n), 6) for n in names]
    lines.append(f"test {METRIC.replace('recall', 'Recall')} per domain, best average first")
    header = "  ".join(f"{n:>{w}s}" for n, w in zip(names, cols, strict=True))
    lines.append(f"{'model':{width}s}  {header}")
    for model, per in rows:
        cells = "  ".join(f"{per[n]:>{w}.4f}" for n, w in zip(names, cols, strict=True))
        lines.append(f"{model:{width}s}  {cells}")
    return rows


def _chart(rows: list[tuple[str, dict[str, float]]], path: Path) -> Path:
    """Grouped bars: one group per domain and the average, one bar per model (table order)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from aftrec.outputs import atomic_write_bytes, plot_text

    names = list(rows[0][1])
    x = np.arange(len(names))
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=100)
    for i, (model, per) in enumerate(rows):
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, [per[n] for n in names], width, label=model)
    ax.set_xticks(x, [plot_text(n) for n in names])
    ax.set_ylabel(f"test {METRIC.replace('recall', 'Recall')}")
    ax.set_ylim(0.0, min(1.0, max(v for _, per in rows for v in per.values()) + 0.12))
    ax.legend(ncol=len(rows), fontsize=8, loc="upper center", frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


# --------------------------------------------------------------------------- 4. export
def _export(
    rows: list[tuple[str, dict[str, float]]], runs: dict[str, Path], bundle: Path,
    lines: list[str],
) -> tuple[str, Path]:  # fmt: skip
    from aftrec.registry import model_class

    servable = [m for m, _ in rows if model_class(m).dot_product]
    if not servable:
        raise ConfigError("no dot-product model finished training: nothing to serve")
    model = servable[0]
    api.export(runs[model], bundle, force=True)
    rank = "the best model" if model == rows[0][0] else "the best dot-product model"
    lines.append(f"{model}, {rank}, as a serving bundle -> {bundle}")
    return model, bundle


# --------------------------------------------------------------------------- 5-7. serve, ask, stop
def _serve_and_ask(
    spec: DemoSpec, data_dir: Path, bundle: Path, served: str, steps: _Steps, result: DemoResult
) -> None:
    from aftrec.data.dataset import Dataset
    from aftrec.serving.api import create_app, serving_in_thread
    from aftrec.serving.recommender import Recommender

    data = Dataset(data_dir)
    known, new = _known_user(data, spec.n), _new_user(data, spec.n)
    with ExitStack() as stack:
        with steps.step("serve") as lines:
            app = create_app(Recommender.load(bundle))
            url = stack.enter_context(serving_in_thread(app))
            lines.append(f"{served} bundle on {url}")
        with steps.step("ask") as lines:
            lines.append("POST /recommend for a known user and for a new one")
            for name, (request, show) in {"known": known, "new": new}.items():
                body, ms = _post(url + "/recommend", request)
                result.answers[name] = body
                lines.extend(show(body, ms))
        with steps.step("stop") as lines:
            stack.close()
            lines.append("the server stopped")


Shown = tuple[dict[str, Any], Callable[[dict[str, Any], float], list[str]]]


def _known_user(data: Dataset, n: int) -> Shown:
    """The first user with at least ``n`` test clicks in one domain, asked for that domain;
    the answer shows which recommendations the user then clicked."""
    import numpy as np

    test = data.test
    domains = data.info.domains
    counts = np.zeros((data.info.n_users, len(domains)), dtype=np.int64)
    np.add.at(counts, (test.user, test.domain), 1)
    users = np.flatnonzero(counts.max(axis=1) >= min(n, counts.max()))
    u = int(users[0])
    d = int(counts[u].argmax())
    user = str(data.users["user"].iloc[u])
    names = data.items["item"].to_numpy()
    clicked = {str(names[i]) for i in test.item[(test.user == u) & (test.domain == d)]}
    request = {"user": user, "domain": domains[d], "n": n}

    def show(body: dict[str, Any], ms: float) -> list[str]:
        res = body["results"][0]
        hits = sum(item in clicked for item in res["items"])
        return [
            f"known user {user}, top {n} in {res['domain']} ({res['path']}, {ms:.1f} ms; "
            f"* = clicked later, in the test period: {hits} of {n}):",
            "  " + "; ".join(("*" if i in clicked else "") + i for i in res["items"]),
        ]

    return request, show


def _new_user(data: Dataset, n: int) -> Shown:
    """A user the model never saw, given by the three most popular training items of the
    first domain, asked for the last domain: a cross-domain answer."""
    import numpy as np

    train = data.train
    domains = data.info.domains
    first = train.item[train.domain == 0]
    liked = np.bincount(first, minlength=data.info.n_items).argsort()[::-1][:3]
    names = data.items["item"].to_numpy()
    items = [str(names[i]) for i in liked]
    request = {"behaviours": {domains[0]: items}, "domain": domains[-1], "n": n}

    def show(body: dict[str, Any], ms: float) -> list[str]:
        res = body["results"][0]
        return [
            f"new user who liked {'; '.join(items)} in {domains[0]}, top {n} in "
            f"{res['domain']} ({res['path']}, {ms:.1f} ms):",
            "  " + "; ".join(res["items"]),
        ]

    return request, show


def _post(url: str, request: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """POST JSON to the local server (no proxy: it is on loopback); the body and the ms."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(
        url, json.dumps(request).encode(), {"Content-Type": "application/json"}
    )
    t0 = time.perf_counter()
    with opener.open(req, timeout=60) as response:
        body: dict[str, Any] = json.loads(response.read())
    return body, (time.perf_counter() - t0) * 1000


__all__ = ["CHART", "MODELS", "DemoResult", "DemoSpec", "run_demo"]

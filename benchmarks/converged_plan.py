"""The converged, tuned comparison's plan, one resumable command: tune on ML-100K, then the
converged reports.

Run: ``python benchmarks/converged_plan.py`` (``--dry-run`` prints the commands as they stand,
trains nothing). The steps, in order (``benchmarks/results/budget_plan.md``):

1. ``tune``: every model's Optuna study on ML-100K's validation split, 12 trials, epoch cap 30
   (``benchmarks/tune_preset.py``, two studies at a time);
2. ``ml-100k``: the ML-100K report with the tuned settings: every model on 5 seeds, Table 6's
   ablations on 5 (3 until the G question needed more) and the Fig. 3 sweeps on 3, epoch cap 50,
   into ``results/ml-100k-tuned-report``;
3. ``ml-1m``: the ML-1M report with the settings tuned on ML-100K: every model on 3 seeds, the
   paper's three AFT rows on 5, Table 6 on 1, no sweeps, epoch cap 30, validation on 1,000
   users, into ``results/ml-1m-tuned-report``;
4. ``compare``: ``benchmarks/compare_paper.py`` on that report, against the paper's rankings
   and, with ``--before``, against the budgeted report it replaces (``results/ml-1m``), into
   ``benchmarks/results/reproduce_vs_paper_tuned.md`` (seconds).

``--status`` says where the plan stands without training anything: per study, its finished
trials of the budget and the trial under way; per report, the runs under way, its finished
runs of the planned ones by model, and the one-thread hours the unfinished ones will take at
the mean of that model's finished runs in the same report (on ML-100K, before any has
finished, at its best tuning trial's time; on ML-1M, at its ML-100K runs' mean times the
median ML-1M / ML-100K ratio of the models finished in both).

Every step is resumable (a finished study trains nothing; ``aftrec reproduce`` reuses finished
runs and resumes half-trained ones), so the same command, run again in a later sitting, passes
over the finished steps (every study complete; every run of a report finished and its
``results.json`` holding each run's metrics as its ``metrics.json`` has them: not run again,
so a report keeps the header of the invocation that finished it) and goes on where the last
one stopped, and the machine never waits for someone to start the next step. A report step
starts only once every study is complete (the tune step before it returned), and its
``--tuned`` list is read then. Two
runs at a time with one torch thread each, as on this project's 2-core machine. A step that
fails stops the plan with one line and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aftrec.experiments.plan import Plan

ROOT = Path(__file__).resolve().parent.parent
TUNED = Path("results/ml-100k-tuned")
#: the paper's AFT rows: 5 seeds on ML-1M, where the others (``aft-paper`` too) have 3
AFT_ROWS = ("aft", "aft-d", "aft-hnm")
EVERY_RUN = ("--jobs", "2", "--set", "train.threads=1")
#: fitted, not trained: their seconds do not scale with an epoch's size
CLOSED_FORM = ("pop", "ease")


def tuned_dirs() -> list[str]:
    """The tuning studies (those with a ``best.json``), one directory per model, relative to
    the repository root."""
    return sorted(str(p.parent.relative_to(ROOT)) for p in (ROOT / TUNED).glob("*/best.json"))


def steps() -> dict[str, list[str]]:
    """Each step's command line, from the repository root, with the studies there are now."""
    py = sys.executable
    aftrec = [py, "-m", "aftrec", "reproduce"]
    tuned = ["--tuned", *tuned_dirs()]
    model_seeds = ["--model-seeds", *(f"{m}=5" for m in AFT_ROWS)]
    return {
        "tune": [
            py, "benchmarks/tune_preset.py", "--data", "data/ml-100k", "--out", str(TUNED),
            "--trials", "12", "--jobs", "2", "--set", "train.epochs=30",
        ],
        "ml-100k": [
            *aftrec, "--data", "data/ml-100k", "--out", "results/ml-100k-tuned-report",
            *tuned, "--seeds", "5", "--sweep-seeds", "3", "--ablation-seeds", "5", "--quiet",
            *EVERY_RUN, "train.epochs=50",
        ],
        "ml-1m": [
            *aftrec, "--data", "data/ml-1m", "--out", "results/ml-1m-tuned-report", *tuned,
            "--seeds", "3", *model_seeds, "--ablation-seeds", "1", "--skip", "sweeps", "--quiet",
            *EVERY_RUN, "train.epochs=30", "train.valid_users=1000",
        ],
        "compare": [
            py, "benchmarks/compare_paper.py", "results/ml-1m-tuned-report",
            "--before", "results/ml-1m", "--out", "benchmarks/results/reproduce_vs_paper_tuned.md",
        ],
    }  # fmt: skip


def study_status() -> list[str]:
    """One line per tuning study of :data:`tune_preset.ORDER`: finished trials of the budget."""
    lines, complete, total = studies()
    return [f"tune: {complete} of {total} studies complete", *lines]


def studies_complete() -> bool:
    """Every study of :data:`tune_preset.ORDER` has its budget of finished trials."""
    _, complete, total = studies()
    return complete == total


def studies() -> tuple[list[str], int, int]:
    """Each study's line for :func:`study_status`, the complete studies and all of them."""
    import csv
    import json

    from tune_preset import ORDER

    budget = int(steps()["tune"][steps()["tune"].index("--trials") + 1])
    lines, complete = [], 0
    for model in ORDER:
        folder = ROOT / TUNED / model
        best = folder / "best.json"
        rows = list(csv.DictReader((folder / "trials.csv").open())) if best.is_file() else []
        done = sum(r["state"] in ("complete", "fail") for r in rows)
        want = budget if not best.is_file() or json.loads(best.read_text())["space"] else 1
        complete += done >= want
        now = ""
        if done < want:  # a trial folder past the finished ones is the trial under way
            under_way = sorted((folder / "trials").glob("[0-9][0-9][0-9]"))[done:]
            now = "".join(f", trial {t.name} at epoch {epochs_done(t)}" for t in under_way)
        lines.append(f"  {model}: {done} of {want} trial(s){now}")
    return lines, complete, len(ORDER)


def epochs_done(run: Path) -> int:
    """The epochs a run has logged (``log.jsonl`` lines)."""
    log = run / "log.jsonl"
    return sum(1 for line in log.open() if line.strip()) if log.is_file() else 0


def plan_of(argv: list[str]) -> Plan:
    """The :class:`aftrec.experiments.plan.Plan` a report step's command line makes."""
    from aftrec.experiments.plan import make_plan
    from aftrec.experiments.reproduce import add_parser, spec_from_args

    parser = argparse.ArgumentParser(prog="aftrec")
    add_parser(parser.add_subparsers())
    return make_plan(spec_from_args(parser.parse_args(argv[3:])))  # after "PY -m aftrec"


def report_complete(argv: list[str]) -> bool:
    """Every run of a report step finished and its ``results.json`` written from them (each
    run's recorded metrics equal its ``metrics.json``): the step is done, and running it
    again would only rewrite the report's header with an invocation that trained nothing.
    Compared by content, not by file times, which a fresh checkout sets in any order."""
    from aftrec.experiments.execute import is_finished

    plan = plan_of(argv)
    results = Path(plan.spec.out) / "results.json"
    if not results.is_file() or not all(is_finished(job.run) for job in plan.jobs.values()):
        return False
    try:
        entries = json.loads(results.read_text())["entries"].values()
        recorded = {
            str(Path(seed["run"])): seed["metrics"]
            for entry in entries
            for seed in entry["seeds"].values()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return all(
        recorded.get(str(job.run)) == json.loads((job.run / "metrics.json").read_text())
        for job in plan.jobs.values()
    )


def report_status(
    name: str, argv: list[str], other: dict[str, float] | None = None
) -> tuple[list[str], dict[str, float]]:
    """The finished runs of a report step, by model, and the hours the others will take; and
    each model's mean seconds per finished run. A model with no finished run here is timed,
    in order, by its best tuning trial (on the tuning's own data), or by its mean in
    ``other`` (another report's) times the median ratio between the two reports over the
    trained models finished in both."""
    import json
    from collections import defaultdict

    from aftrec.experiments.execute import is_finished, train_seconds

    plan = plan_of(argv)
    finished: dict[str, list[float]] = defaultdict(list)
    waiting: dict[str, int] = defaultdict(int)
    started: list[str] = []
    for job in plan.jobs.values():
        if is_finished(job.run):
            meta = json.loads((job.run / "reproduce.json").read_text())
            trained = train_seconds(job.run, meta["train_seconds"]) or 0.0
            finished[job.model].append(trained + meta["eval_seconds"])
        else:
            waiting[job.model] += 1
            if (job.run / "log.jsonl").is_file() or (job.run / "last.pt").is_file():
                started.append(
                    f"{job.run.relative_to(plan.spec.out)} at epoch {epochs_done(job.run)}"
                )
    models = sorted(set(finished) | set(waiting))
    done = sum(len(v) for v in finished.values())
    means = {m: sum(v) / len(v) for m, v in finished.items()}
    # on the tuning's own data, a model's best trial times a run until one of its own has
    tuned_here = Path(plan.spec.data).resolve() == (ROOT / "data/ml-100k").resolve()
    ratios = sorted(
        means[m] / other[m] for m in means if other and m in other and m not in CLOSED_FORM
    )  # fmt: skip
    ratio = ratios[len(ratios) // 2] if ratios else None
    hours, scaled, unknown, lines = 0.0, [], [], []
    for m in models:
        secs = finished.get(m, [])
        each = means.get(m) or (best_trial_seconds(m) if tuned_here else None)
        if each is None and ratio is not None and other and m in other:
            each = other[m] * ratio
            scaled.append(m)
        if waiting[m] and each is not None:
            hours += waiting[m] * each / 3600
        elif waiting[m]:
            unknown.append(m)
        lines.append(f"  {m}: {len(secs)} of {len(secs) + waiting[m]} run(s)")
    left = (
        "no run to time yet" if len(unknown) == len(models) else
        f"about {hours:.1f} one-thread hours left"
        + (f"; {len(scaled)} model(s) timed by their other-report runs x {ratio:.1f}, the median "
           f"ratio of {len(ratios)} models run in both ({ratios[0]:.1f}-{ratios[-1]:.1f})"
           if scaled and ratio else "")
        + (f"; {', '.join(unknown)} with no run to time yet" if unknown else "")
    )  # fmt: skip
    now = [f"  under way: {', '.join(started)}"] if started else []
    return [f"{name}: {done} of {len(plan.jobs)} runs finished ({left})", *now, *lines], means


def best_trial_seconds(model: str) -> float | None:
    """The training seconds of ``model``'s best tuning trial (None: no finished study)."""
    import csv
    import json

    best = ROOT / TUNED / model / "best.json"
    if not best.is_file():
        return None
    number = json.loads(best.read_text())["best_trial"]
    for row in csv.DictReader((best.parent / "trials.csv").open()):
        if int(row["trial"]) == number and row["seconds"]:
            return float(row["seconds"])
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run none")
    parser.add_argument("--status", action="store_true", help="where the plan stands; run none")
    parser.add_argument(
        "--hours", type=float, default=None, metavar="H",
        help="the time this sitting has: the report steps start only runs expected to end "
        "within it (`aftrec reproduce --hours`), and the plan stops when none fits",
    )  # fmt: skip
    args = parser.parse_args()
    deadline = None if args.hours is None else time.time() + args.hours * 3600
    if args.status:
        lines = study_status()
        if tuned_dirs():
            small, means = report_status("ml-100k", steps()["ml-100k"])
            lines += small + report_status("ml-1m", steps()["ml-1m"], means)[0]
        compared = ROOT / steps()["compare"][-1]
        lines.append(f"compare: {compared.relative_to(ROOT)} " + (
            "written" if compared.is_file() else "not written yet"))  # fmt: skip
        print("\n".join(lines))
        return
    for name in steps():
        argv = steps()[name]  # after the steps before it: the studies they finished
        print(f"{time.strftime('%H:%M:%S')} step {name}: {shlex.join(argv)}", flush=True)
        if args.dry_run:
            continue
        if name != "tune" and not tuned_dirs():
            sys.exit(f"step {name}: no tuning study in {TUNED}")
        if (name == "tune" and studies_complete()) or (
            name in ("ml-100k", "ml-1m") and report_complete(argv)
        ):
            print(f"{time.strftime('%H:%M:%S')} step {name} complete: passed over", flush=True)
            continue
        t0 = time.time()
        limited = deadline is not None and name in ("ml-100k", "ml-1m")
        if limited:
            assert deadline is not None
            argv = [*argv, "--hours", f"{max(deadline - t0, 1.0) / 3600:.4f}"]
        code = subprocess.run(argv, cwd=ROOT, check=False).returncode
        if code != 0:
            sys.exit(f"step {name} failed (exit {code}); run this command again to resume it")
        if limited and not report_complete(argv):
            sys.exit(f"step {name}: --hours left runs for a later sitting; run this again then")
        print(f"{time.strftime('%H:%M:%S')} step {name} done ({(time.time() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main()

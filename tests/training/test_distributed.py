"""Data-parallel training: two gloo ranks started by torchrun match one process.

Two ranks holding one user shard each, with DDP averaging their gradients, must take the same
steps as a single process that builds each global batch from the same two shards
(``train.data_shards=2``). The runs are real ``aftrec train`` processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aftrec.data.dataset import Dataset
from aftrec.data.loader import ShardedLoader
from aftrec.data.shards import load_shards
from aftrec.data.sources.synthetic import generate
from aftrec.data.stream import prepare_streaming
from aftrec.errors import ConfigError
from aftrec.training import checkpoint, rundir
from aftrec.training.distributed import Context, shards_of


@pytest.fixture(scope="module")
def partitioned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny log prepared by the streaming path into 4 partitions."""
    from tests.conftest import TINY

    root = tmp_path_factory.mktemp("partitioned")
    raw = generate(TINY)
    raw.interactions.to_parquet(root / "log.parquet")
    raw.items.to_parquet(root / "items.parquet")
    return prepare_streaming(
        root / "log.parquet", root / "items.parquet", root / "data", partition_rows=2_500
    )


COMMON = [
    "train.epochs=2",
    "train.max_batches_per_epoch=5",
    "train.batch_size=64",
    "train.data_shards=2",
    "train.threads=1",
    "data.history_len=8",
    "model.dim=16",
]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path("src").resolve())}


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def train(data: Path, out: Path, model: str, sets: list[str], ranks: int) -> str:
    args = ["train", "--data", str(data), "--model", model, "--out", str(out), "--quiet",
            "--set", *sets]  # fmt: skip
    if ranks == 1:
        return run([sys.executable, "-m", "aftrec.cli", *args]).stdout
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={ranks}", "-m", "aftrec.cli"]  # fmt: skip
    return run([*torchrun, *args]).stdout


def weights(run_dir: Path, which: str = "last") -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = checkpoint.load(run_dir / f"{which}.pt")["model"]
    return state


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("sparse", [False, True])
def test_two_ranks_match_one_process_with_the_same_global_batches(
    tiny_dir: Path, tmp_path: Path, sparse: bool
) -> None:
    # dropout draws differ per rank by design; sparse: lazy Adam on sparse table gradients
    sets = [*COMMON, "model.dropout=0", f"train.sparse_embeddings={str(sparse).lower()}"]
    one, two = tmp_path / "one", tmp_path / "two"
    train(tiny_dir, one, "two-tower", sets, ranks=1)
    stdout = train(tiny_dir, two, "two-tower", sets, ranks=2)
    assert "peak memory per rank" in stdout
    assert_same_weights(one, two)
    # they also took different steps from a plain run: the comparison has teeth
    plain = tmp_path / "plain"
    train(tiny_dir, plain, "two-tower", [*sets, "train.data_shards=1"], ranks=1)
    wa, wp = weights(one), weights(plain)
    assert any(not torch.allclose(wa[k], wp[k], atol=1e-4) for k in wa)
    log = [line for line in (two / "log.jsonl").read_text().splitlines() if line]
    assert len(log) == 2 and '"ranks": 2' in log[0]


def test_ranks_read_their_own_partitions(partitioned: Path, tmp_path: Path) -> None:
    """On a partitioned dataset each rank loads only its partitions, the shards are whole
    partitions, and two ranks still take the steps of one process given the same shards."""
    whole = load_shards(partitioned, 2, [0, 1])
    assert whole.complete and len(whole.dataset.meta["partitions"]) == 4
    halves = [load_shards(partitioned, 2, [s]) for s in (0, 1)]
    for s, half in enumerate(halves):
        assert not half.complete
        ranges = [p["users"] for i, p in enumerate(half.dataset.meta["partitions"]) if i % 2 == s]
        inside = np.zeros(whole.info.n_users, dtype=bool)
        for lo, hi in ranges:
            inside[lo:hi] = True
        assert inside[half.dataset.train.user].all()  # read nothing of the other rank's
        np.testing.assert_array_equal(half.shards[s].user, whole.shards[s].user)
    sets = [*COMMON, "model.dropout=0"]
    one, two = tmp_path / "one", tmp_path / "two"
    train(partitioned, one, "two-tower", sets, ranks=1)
    train(partitioned, two, "two-tower", sets, ranks=2)
    assert_same_weights(one, two)


def test_the_validation_sample_follows_the_shards_not_the_ranks(
    partitioned: Path, tmp_path: Path
) -> None:
    """``train.valid_users`` samples the users of shard 0, which rank 0 always holds: one
    process and two ranks with the same ``train.data_shards`` validate on the same users, so
    their validation values (and early stopping) agree; before, rank 0 sampled among its own
    partitions and the single process among all users."""
    sets = [*COMMON, "model.dropout=0", "train.valid_users=20"]
    one, two = tmp_path / "one", tmp_path / "two"
    train(partitioned, one, "two-tower", sets, ranks=1)
    train(partitioned, two, "two-tower", sets, ranks=2)
    logs = [
        [json.loads(x)["valid_recall@50"] for x in (r / "log.jsonl").read_text().splitlines()]
        for r in (one, two)
    ]
    assert len(logs[0]) == 2
    np.testing.assert_allclose(logs[0], logs[1], rtol=1e-4)


def test_a_closed_form_model_fits_on_the_whole_data_on_two_ranks(
    partitioned: Path, tmp_path: Path
) -> None:
    """Rank 0 fits it alone, on every partition: with ``train.valid_users`` it held only its
    own, and popularity counted the clicks of half the users."""
    sets = ["train.data_shards=2", "train.threads=1", "train.valid_users=20"]
    one, two = tmp_path / "one", tmp_path / "two"
    train(partitioned, one, "pop", sets, ranks=1)
    said = train(partitioned, two, "pop", sets, ranks=2)
    wa, wb = weights(one, "best"), weights(two, "best")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert "trained" in said and "memory" not in said  # "peak memory per rank [] MiB" before


def test_after_a_failed_call_under_torchrun_no_call_joins_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A call that failed on one rank may have left another inside it: a next call of the
    same script would join the group and wait on that rank for the hour of the timeout."""
    from aftrec.errors import TrainingError
    from aftrec.training import distributed

    monkeypatch.setattr(distributed, "_out_of_step", False)
    distributed.shutdown(Context(rank=0, world=2), clean=False)
    for key, value in {
        "WORLD_SIZE": "2",
        "RANK": "0",
        "MASTER_ADDR": "x",
        "MASTER_PORT": "1",
    }.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(TrainingError, match="ranks may be out of step: end the job"):
        distributed.init()


API_TWICE = """
import sys
import aftrec

data, out = sys.argv[1:]
sets = SETS
first = aftrec.train(data, "two-tower", out + "/a", overrides=[*sets, "train.epochs=1"])
again = aftrec.train(None, None, out + "/a", overrides=["train.epochs=2"], resume=True)
other = aftrec.train(data, "pop", out + "/b", overrides=["train.threads=1"])
if first.rank == 0:
    print("epochs", first.epochs_run, again.epochs_run, "pop", other.run.name)
"""


def test_one_script_trains_several_times_under_torchrun(tiny_dir: Path, tmp_path: Path) -> None:
    """``aftrec.train`` called three times by each rank of one torchrun (train, resume, another
    model): each call joined a new process group on torchrun's store and hung or failed to
    connect from the second on."""
    script = tmp_path / "twice.py"
    sets = [s for s in COMMON if not s.startswith("train.epochs")]
    script.write_text(API_TWICE.replace("SETS", repr(sets)))
    job = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(script), str(tiny_dir), str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = job.communicate(timeout=300)
    finally:  # a hung job: its ranks too, not torchrun alone
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.communicate()
    assert job.returncode == 0, stderr[-3000:]
    assert stdout.strip().splitlines()[-1] == "epochs 1 2 pop b"


def test_without_partitions_the_validation_sample_is_drawn_from_every_user(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every rank holds the whole dataset: the sample of ``train.valid_users`` is the one of
    a run without shards, the same on any number of ranks, as before shard 0 was asked."""
    from aftrec.config import resolve
    from aftrec.training import trainer

    def asked(*a: object, **kw: object) -> None:
        raise AssertionError("sampled among shard 0 on a dataset without partitions")

    monkeypatch.setattr(trainer, "_shard_zero", asked)
    cfg = resolve("two-tower", overrides=[*COMMON, "train.valid_users=20", "train.epochs=1"])
    trainer.train(tiny_dir, cfg, tmp_path / "run", progress=False)


def test_validation_users_are_those_of_shard_zero(partitioned: Path) -> None:
    from aftrec.training.distributed import SINGLE
    from aftrec.training.trainer import _shard_zero

    local = load_shards(partitioned, 2, [0, 1])
    users = _shard_zero(local, local.dataset, SINGLE)
    valid = local.dataset.fit_and_targets("valid")[1]
    assert len(users) and (local.shard_of(users) == 0).all()
    assert set(users) == set(valid.user[local.shard_of(valid.user) == 0])
    assert len(users) < len(set(valid.user))  # the other shard's users are left out
    # shard 0 without a validation positive: refused in one line, before training
    elsewhere = dataclasses.replace(local, starts=np.array([-1, 0]))  # every user in shard 1
    with pytest.raises(ConfigError, match="shard 0 of 2, and they hold no validation positive"):
        _shard_zero(elsewhere, local.dataset, SINGLE)


def test_resume_on_another_number_of_ranks(tiny_dir: Path, tmp_path: Path) -> None:
    """Two ranks train one epoch; one process resumes for a second: same as two straight."""
    sets = [*COMMON, "model.dropout=0"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(tiny_dir, straight, "two-tower", sets, ranks=1)
    train(tiny_dir, split, "two-tower", [*sets, "train.epochs=1"], ranks=2)
    run([sys.executable, "-m", "aftrec.cli", "train", "--out", str(split), "--resume", "--quiet",
         "--set", "train.epochs=2"])  # fmt: skip
    assert_same_weights(straight, split)
    # and it did resume: epoch 1 is the two ranks', epoch 2 the one process's (a run trained
    # again from the start would give the same weights, seeded as it is)
    log = [json.loads(line) for line in (split / "log.jsonl").read_text().splitlines()]
    assert [(e["epoch"], e["ranks"]) for e in log] == [(1, 2), (2, 1)]


#: ``aftrec.cli`` with every training step counted and ACTION taken at step STOP of the
#: process: ``raise SystemExit(3)`` stops it as a kill would (each rank at the same batch)
STOPPING_CLI = """
import dataclasses
import json
import os
import signal
import sys
from aftrec.cli import main
from aftrec.training import trainer

make_step, calls = trainer.make_step, []

def stopping(*args, **kwargs):
    step = make_step(*args, **kwargs)

    def call(batch):
        calls.append(1)
        if len(calls) == STOP:
            ACTION
        return step(batch)

    call.state_dict, call.load_state_dict = step.state_dict, step.load_state_dict
    return call

trainer.make_step = stopping
sys.exit(main(sys.argv[1:]))
"""


def _two_ranks_of(script: Path, data: Path, out: Path, sets: list[str]) -> str:
    """``script`` (a :data:`STOPPING_CLI`) training ``out`` on two ranks, expected to fail:
    its stderr."""
    stopped = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(script), "train", "--data", str(data), "--model", "two-tower", "--out", str(out),
         "--quiet", "--set", *sets],
        capture_output=True, text=True, timeout=600, env=ENV,
    )  # fmt: skip
    assert stopped.returncode != 0
    return stopped.stderr


def _resume_on_two_ranks_as(straight: Path, cut: Path) -> None:
    """``cut`` resumed on two ranks ends with ``straight``'s weights and optimiser state."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node=2", "-m", "aftrec.cli"]  # fmt: skip
    run([*torchrun, "train", "--out", str(cut), "--resume", "--quiet"])
    full, resumed = checkpoint.load(straight / "last.pt"), checkpoint.load(cut / "last.pt")
    assert "partial" not in resumed and resumed["epoch"] == full["epoch"]
    for k, v in full["model"].items():
        torch.testing.assert_close(v, resumed["model"][k], rtol=0, atol=0, msg=k)
    assert str(full["step"]) == str(resumed["step"])


def test_a_data_parallel_run_killed_inside_an_epoch_resumes_exactly(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """Two ranks with a mid-epoch last.pt after every batch, stopped at the third batch of
    their second epoch, resume on two ranks from the second: the weights, optimiser state and
    log of a run never stopped (dropout on, so each rank's random state must come back). One
    process cannot go on from a two-rank epoch: one clear line."""
    sets = [*COMMON, "runtime.checkpoint_minutes=1.0e-9", "train.patience=10"]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    train(tiny_dir, straight, "two-tower", sets, ranks=2)
    script = tmp_path / "stopping_cli.py"
    # 5 batches per epoch: the 3rd of epoch 2
    script.write_text(STOPPING_CLI.replace("STOP", "8").replace("ACTION", "raise SystemExit(3)"))
    _two_ranks_of(script, tiny_dir, cut, sets)
    state = checkpoint.load(cut / "last.pt")
    assert state["epoch"] == 1 and not state["done"]
    assert [part["batches"] for part in state["partial"]["ranks"]] == [2, 2]

    alone = subprocess.run(
        [sys.executable, "-m", "aftrec.cli", "train", "--out", str(cut), "--resume", "--quiet"],
        capture_output=True, text=True, timeout=600, env=ENV,
    )  # fmt: skip
    assert alone.returncode == 2
    assert alone.stderr.strip().splitlines() == [
        f"error: {cut} was stopped inside epoch 2 by 2 ranks, and only as many can go on from "
        "there: resume it with 2 ranks"
    ]

    _resume_on_two_ranks_as(straight, cut)
    timing = {"examples_per_second", "train_seconds", "valid_seconds", "peak_rss_mib"}
    logs = [rundir.epoch_log(r) for r in (straight, cut)]
    assert len(logs[0]) == 2
    for a, b in zip(*logs, strict=True):
        assert {k: v for k, v in a.items() if k not in timing} == {
            k: v for k, v in b.items() if k not in timing
        }


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_batch(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """SIGTERM to rank 0 alone during the 3rd batch of epoch 2, no mid-epoch checkpoint due:
    both ranks finish that batch, last.pt holds both ranks' parts there, and two ranks resume
    to the weights of a run never stopped."""
    sets = [*COMMON, "runtime.checkpoint_minutes=null", "train.patience=10"]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    train(tiny_dir, straight, "two-tower", sets, ranks=2)
    script = tmp_path / "signalling_cli.py"
    action = 'os.environ["RANK"] == "0" and os.kill(os.getpid(), signal.SIGTERM)'
    script.write_text(STOPPING_CLI.replace("STOP", "8").replace("ACTION", action))
    stderr = _two_ranks_of(script, tiny_dir, cut, sets)
    assert "stopped by SIGTERM inside epoch 2, after batch 3;" in stderr
    state = checkpoint.load(cut / "last.pt")
    assert state["epoch"] == 1
    assert [part["batches"] for part in state["partial"]["ranks"]] == [3, 3]
    _resume_on_two_ranks_as(straight, cut)


def _stopped_at_batch_3_saving_with(save_last: str, data: Path, out: Path) -> str:
    """SIGTERM to rank 0 during the 3rd batch of the first epoch, with ``trainer._save_last``
    replaced by the function ``save_last`` defines (given the original as ``save_last``):
    the two ranks' stderr."""
    action = 'os.environ["RANK"] == "0" and os.kill(os.getpid(), signal.SIGTERM)'
    code = STOPPING_CLI.replace("STOP", "3").replace("ACTION", action)
    patch = f"save_last = trainer._save_last\n{save_last}trainer._save_last = patched\n"
    script = out.parent / f"{out.name}_cli.py"
    script.write_text(
        code.replace("trainer.make_step = stopping\n", f"trainer.make_step = stopping\n{patch}")
    )
    return _two_ranks_of(script, data, out, [*COMMON, "runtime.checkpoint_minutes=null"])


def test_a_stop_inside_an_epoch_waits_for_rank_zero_to_write_last_pt(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """Rank 0's write of last.pt is slow (a large model): rank 1 waits for the file before it
    stops. It stopped at once, torchrun then stopped rank 0 in the middle of the write with
    a second SIGTERM, and the new run's folder was removed, while rank 1 said that last.pt
    held the batch."""
    cut = tmp_path / "cut"
    slow = (
        "def patched(*args, **kwargs):\n"
        "    import time\n"
        "    time.sleep(4)\n"
        "    return save_last(*args, **kwargs)\n"
    )
    stderr = _stopped_at_batch_3_saving_with(slow, tiny_dir, cut)
    assert "stopped by SIGTERM inside epoch 1, after batch 3;" in stderr
    state = checkpoint.load(cut / "last.pt")
    assert state["epoch"] == 0
    assert [part["batches"] for part in state["partial"]["ranks"]] == [3, 3]


def test_a_stop_whose_write_fails_on_rank_zero_says_so_on_every_rank(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """Rank 0 cannot write the mid-epoch last.pt (a full disk): rank 1 says so, instead of
    saying that last.pt holds the batch."""
    cut = tmp_path / "cut"
    failing = (
        "from aftrec.errors import OutputError\n"
        "def patched(*args, **kwargs):\n"
        "    raise OutputError('cannot write last.pt: No space left on device')\n"
    )
    stderr = _stopped_at_batch_3_saving_with(failing, tiny_dir, cut)
    assert "error: cannot write last.pt: No space left on device" in stderr
    said = f"error: {cut / 'last.pt'}: rank 0 did not write it: cannot write last.pt: No space"
    assert said in stderr
    assert "holds it" not in stderr


@pytest.mark.parametrize(
    "schedule", ["", "model.g_every=2", "model.d_every=2", "model.d_every=2 model.g_every=3"]
)
def test_aft_trains_on_two_ranks(tiny_dir: Path, tmp_path: Path, schedule: str) -> None:
    """Sparse item tables too, when one network trains alone on some batches (DDP's reducer
    failed on the other network's table, left without a gradient)."""
    out = tmp_path / "aft"
    sets = [*COMMON, "train.epochs=1", "model.g_layers=1", "train.sparse_embeddings=true"]
    train(tiny_dir, out, "aft", [*sets, *schedule.split()], ranks=2)
    state = checkpoint.load(out / "best.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_aft_d_on_two_ranks_matches_one_process_batch_norm_included(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """ConvE's batch norm takes the global batch's statistics on two ranks, as one process
    does over the same global batch: the weights and the running statistics agree."""
    sets = [*COMMON, "train.epochs=1", "model.dropout=0"]
    one, two = tmp_path / "one", tmp_path / "two"
    train(tiny_dir, one, "aft-d", sets, ranks=1)
    train(tiny_dir, two, "aft-d", sets, ranks=2)
    assert any("running_var" in k for k in weights(two))
    assert_same_weights(one, two)


def test_shards_split_users_and_batches_concatenate(tiny: Dataset, tiny_dir: Path) -> None:
    both = load_shards(tiny_dir, 2, [0, 1])
    users = [set(both.shards[s].user.tolist()) for s in (0, 1)]
    assert not users[0] & users[1]
    assert len(both.shards[0]) + len(both.shards[1]) == len(tiny.train)
    halves = [load_shards(tiny_dir, 2, [s]) for s in (0, 1)]

    def loader(local_: object, shards: dict) -> ShardedLoader:  # type: ignore[type-arg]
        return ShardedLoader(shards, tiny.info, 8, 64, 4, 2, both.n_examples, seed=3)

    whole = list(loader(both, both.shards).epoch(0, 4))
    parts = [list(loader(h, h.shards).epoch(0, 4)) for h in halves]
    for b, p0, p1 in zip(whole, *parts, strict=True):
        torch.testing.assert_close(b.users, torch.cat([p0.users, p1.users]))
        torch.testing.assert_close(b.neg, torch.cat([p0.neg, p1.neg]))
        assert len(b) == 64
    # every rank takes ceil(n_examples / batch) steps whatever its shard's size
    assert len(loader(both, both.shards)) == -(-both.n_examples // 64)


def test_bad_shard_settings_are_config_errors(tiny: Dataset, tiny_dir: Path) -> None:
    with pytest.raises(ConfigError, match="multiple of the number of ranks"):
        shards_of(Context(rank=0, world=2), 3)
    local = load_shards(tiny_dir, 3, [0, 1, 2])
    with pytest.raises(ConfigError, match="batch_size=64 must be a multiple"):
        ShardedLoader(local.shards, tiny.info, 8, 64, 4, 3, local.n_examples, seed=0)
    assert np.all(np.diff(local.train.user) >= 0)


def test_a_rank_without_its_cuda_device_is_a_config_error_before_nccl(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aftrec.training import distributed

    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1"}
    for key, value in {**env, "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one device: rank 1 has none
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    joined: list[str] = []
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: joined.append("x"))
    said = r"rank 1 needs CUDA device 1 \(LOCAL_RANK\), and this torch build sees 1"
    with pytest.raises(ConfigError, match=said):
        distributed.init("cuda")
    assert joined == []  # refused before any process group was asked for


FAILING_RANK_CLI = """
import os
import signal
import sys
from aftrec.cli import main
from aftrec.training import trainer

argv = sys.argv[1:]
CHANGE
sys.exit(main(argv))
"""


def _torchrun_script(
    tmp_path: Path, change: str, args: list[str]
) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "cli.py"
    script.write_text(FAILING_RANK_CLI.replace("CHANGE", change))
    # torchrun looks at its ranks every 5 s, not 0.1 s: on a loaded machine it saw a dead rank
    # and SIGTERMed the other before that one had met the closed connection and said so
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "--monitor-interval=5", str(script), *args],
        capture_output=True, text=True, timeout=600, env=ENV,
    )  # fmt: skip


def _ranks_said(stderr: str) -> list[str]:
    """The ``error:`` and ``stopped`` lines the ranks wrote (two ranks' lines may run into
    one another) and the tracebacks torchrun relays from them (``[rankN]: Traceback``); not
    torchrun's own report."""
    said = re.findall(r"(?:error: |stopped by ).*?(?=error: |stopped by |$)", stderr, re.M)
    return said + re.findall(r"\[rank\d+\]: Traceback", stderr)


def test_ranks_started_with_other_configs_are_refused_in_one_line(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """A rank given another --set trained other steps, saved as rank 0's, or hung."""
    change = 'if os.environ["RANK"] == "1":\n    argv += ["--set", "train.lr=0.05"]'
    args = ["train", "--data", str(tiny_dir), "--model", "two-tower", "--out",
            str(tmp_path / "run"), "--quiet", "--set", *COMMON]  # fmt: skip
    done = _torchrun_script(tmp_path, change, args)
    assert done.returncode != 0
    said = _ranks_said(done.stderr)
    refusal = ("error: rank 1 was started with another config than rank 0 (train.lr differ): "
               "start every rank with the same config and --set")  # fmt: skip
    assert said == [refusal] * 2, said


def test_a_rank_that_dies_leaves_the_others_one_line(tiny_dir: Path, tmp_path: Path) -> None:
    """The surviving rank's collective fails on the closed connection: one line, not gloo's
    traceback."""
    change = (
        "step = trainer.make_step\n"
        "def dying(*a, **kw):\n"
        "    inner = step(*a, **kw)\n"
        "    def call(batch):\n"
        '        if os.environ["RANK"] == "1":\n'
        "            os._exit(3)\n"
        "        return inner(batch)\n"
        "    call.state_dict, call.load_state_dict = inner.state_dict, inner.load_state_dict\n"
        "    return call\n"
        "trainer.make_step = dying"
    )
    args = ["train", "--data", str(tiny_dir), "--model", "two-tower", "--out",
            str(tmp_path / "run"), "--quiet", "--set", *COMMON]  # fmt: skip
    done = _torchrun_script(tmp_path, change, args)
    assert done.returncode != 0
    assert _ranks_said(done.stderr) == [
        "error: rank 0: another rank of this torchrun job failed or was stopped (its own "
        "message says why), so this one stops too"
    ], done.stderr[-3000:]
    assert "pair.cc" not in done.stderr


def test_a_signal_during_the_last_validation_completes_every_rank(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """SIGTERM to rank 0 while it validates the last epoch: the run is complete, and every
    rank says so (the others waited at a barrier rank 0 never reached, and failed)."""
    change = (
        "validate = trainer._validate\n"
        "def signalled(*a, **kw):\n"
        '    if a[3] == 2 and os.environ["RANK"] == "0":\n'
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return validate(*a, **kw)\n"
        "trainer._validate = signalled"
    )
    out = tmp_path / "run"
    args = ["train", "--data", str(tiny_dir), "--model", "two-tower", "--out", str(out),
            "--quiet", "--set", *COMMON]  # fmt: skip
    done = _torchrun_script(tmp_path, change, args)
    said = _ranks_said(done.stderr)
    assert said == [f"stopped by SIGTERM after its last epoch: {out} is complete"] * 2, done.stderr[
        -3000:
    ]


def test_a_table_used_densely_is_one_line_on_two_ranks(tiny_dir: Path, tmp_path: Path) -> None:
    """DDP's reducer finds it in the backward pass, before the optimiser that says so."""
    args = ["train", "--data", str(tiny_dir), "--model", "atrank", "--out",
            str(tmp_path / "run"), "--quiet", "--set", *COMMON,
            "train.sparse_embeddings=true"]  # fmt: skip
    done = _torchrun_script(tmp_path, "", args)
    said = _ranks_said(done.stderr)
    assert len(said) == 2 and all("uses an embedding table densely" in s for s in said), (
        done.stderr[-3000:]
    )

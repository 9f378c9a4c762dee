"""Checkpoints: a write that fails while torch.save streams the file is one clear error, and
the previous checkpoint stays."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import torch

from aftrec import outputs
from aftrec.errors import OutputError
from aftrec.training import checkpoint


class _FullAfter:
    """A file whose writes fail with ENOSPC once ``room`` bytes are written."""

    def __init__(self, fh: BinaryIO, room: int) -> None:
        self._fh, self.room = fh, room

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self._fh.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


def test_a_full_disk_while_saving_is_an_output_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.save turned the write's OSError into "RuntimeError: [enforce fail at
    inline_container.cc] . unexpected pos ...", a traceback."""
    path = tmp_path / "last.pt"
    checkpoint.save({"model": {"w": torch.ones(3)}}, path)
    atomic_file = outputs.atomic_file

    @contextmanager
    def full(out: Path) -> Iterator[Any]:
        with atomic_file(out) as fh:
            yield _FullAfter(fh, room=1000)

    monkeypatch.setattr(outputs, "atomic_file", full)
    with pytest.raises(OutputError) as info:
        checkpoint.save({"model": {"w": torch.zeros(100_000)}}, path)
    assert str(info.value) == f"cannot write {path}: No space left on device"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left
    torch.testing.assert_close(checkpoint.load(path)["model"]["w"], torch.ones(3))


def test_another_error_of_torch_save_is_its_own(tmp_path: Path) -> None:
    class Unpicklable:
        def __reduce__(self) -> Any:
            raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError, match="cannot pickle this"):
        checkpoint.save({"model": {}, "odd": Unpicklable()}, tmp_path / "last.pt")
    assert not list(tmp_path.iterdir())


def test_a_file_torch_cannot_unpickle_is_named_without_torchs_advice(tmp_path: Path) -> None:
    """A pickle of another program: torch's message advised loading it with
    ``weights_only=False``, which runs the file's code, cut in the middle."""
    import pickle

    from aftrec.errors import CheckpointError

    path = tmp_path / "last.pt"
    torch.save({"model": {}, "thing": Path("x")}, path)  # a type weights_only refuses
    with pytest.raises(CheckpointError) as refused:
        checkpoint.load(path)
    said = str(refused.value)
    assert said == (
        f"{path}: not a checkpoint aftrec wrote: it holds a {type(Path('x')).__module__}."
        f"{type(Path('x')).__qualname__}, and aftrec saves tensors and plain values only; not "
        "loaded (its code would run)"
    )
    assert "weights_only" not in said
    assert isinstance(refused.value.__cause__, pickle.UnpicklingError)


def test_a_damaged_pickle_is_corrupt(tmp_path: Path) -> None:
    """A file that is a pickle torch cannot read, with no type to name, is damaged."""
    from aftrec.errors import CheckpointError

    path = tmp_path / "last.pt"
    path.write_bytes(b"\x80\x02}q\x00X\x05\x00\x00\x00modelq\x01\x8c")  # cut short
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        checkpoint.load(path)


def test_a_run_saved_before_a_key_existed_loads_it_at_the_value_it_computed_with(
    tmp_path: Path,
) -> None:
    """An AFT run saved before G's switches existed resumes (and is evaluated) with the values
    it trained with, not today's defaults; a config of this version loads as it was saved."""
    import yaml

    from aftrec.config import dump, resolve
    from aftrec.models.aft.model import AFTConfig
    from aftrec.training.rundir import CONFIG, load_run_config

    now = resolve("aft", overrides=["train.epochs=3"])
    (tmp_path / CONFIG).write_text(dump(now))
    assert load_run_config(tmp_path) == now
    old = yaml.safe_load(dump(now))
    for key in AFTConfig.LEGACY_VALUES:
        del old["model"][key]
    del old["train"]["precision"]
    (tmp_path / CONFIG).write_text(yaml.safe_dump(old))
    cfg = load_run_config(tmp_path, ["train.epochs=4"])
    assert {k: getattr(cfg.model, k) for k in AFTConfig.LEGACY_VALUES} == AFTConfig.LEGACY_VALUES
    assert cfg.model.g_temperature == 1.0 != AFTConfig().g_temperature
    assert (cfg.train.precision, cfg.train.epochs) == ("fp32", 4)


def test_a_run_without_a_fingerprint_says_its_data_cannot_be_checked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run of an earlier version recorded no fingerprint: the check passes, and says so."""
    import json

    from aftrec.training.rundir import check_data

    run, data = tmp_path / "run", tmp_path / "data"
    run.mkdir()
    data.mkdir()
    (run / "run.json").write_text(json.dumps({"data": str(data)}))
    (data / "meta.json").write_text("{}")
    check_data(run, data)
    assert "recorded no fingerprint of its dataset" in caplog.text
    caplog.clear()
    check_data(run, data, warn=False)
    assert not caplog.text

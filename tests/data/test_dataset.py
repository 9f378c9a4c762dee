"""The prepared dataset reads each part when it is first used, and only then."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from aftrec.data.dataset import Dataset
from aftrec.errors import DataError


def test_the_test_part_is_read_only_when_asked(tiny_dir: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "no-test"
    shutil.copytree(tiny_dir, data_dir)
    (data_dir / "test.parquet").unlink()
    data = Dataset(data_dir)
    whole = Dataset(tiny_dir)
    np.testing.assert_array_equal(data.train.item, whole.train.item)
    np.testing.assert_array_equal(data.valid.user, whole.valid.user)
    assert list(data.parts) == ["train", "valid", "test"]
    with pytest.raises(DataError, match="unreadable"):
        _ = data.test

"""Fixtures of the serving tests: the folder their runs and bundles share, and the default
bundle (a two-tower run exported once per session, see :func:`tests.serving.exported`)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "serving"


@pytest.fixture(scope="module")
def bundle(root: Path, tiny_dir: Path) -> Path:
    pytest.importorskip("faiss")
    from tests.serving import exported

    return exported(root, tiny_dir)

"""Folders for module-scoped fixtures that write a lot."""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Iterator

import pytest


@contextlib.contextmanager
def scratch(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Path]:
    """A folder for a module-scoped fixture, removed when the fixture ends. pytest keeps factory folders
    to the end of the session (and passing tests' folders not at all: pyproject.toml's retention
    policy), so a fixture that writes checkpoints of ~100 MB to GBs of work yields through this one."""
    path = tmp_path_factory.mktemp(name)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)

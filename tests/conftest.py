import os
from pathlib import Path

import pytest

# Tests are CPU-sized; keep thread pools small so parallel test processes do not thrash 2 cores: one
# thread each in a pytest-xdist worker (`make test` runs one per core; a worker inherits the controller's
# environment, so this overrides), two in a plain pytest run.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
else:
    os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
REALCXR = REPO.parent / "shared" / "realcxr"


@pytest.fixture
def realcxr() -> Path:
    if not REALCXR.is_dir():
        pytest.skip(f"real radiographs not found at {REALCXR} (they live in the team's shared/ folder)")
    return REALCXR

"""pytest fixtures for the Ray Serve tests: one Stack (three ult nodes, each a real ultd and a Ray node of a
local cluster, with Ray Serve running both routers) shared by the whole session, stopped at its end."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import Stack  # noqa: E402


@pytest.fixture(scope="session")
def stack():
    work = Path(tempfile.mkdtemp(prefix="ult-ray-tests-"))
    s = Stack(work, nodes=3, ceiling=os.environ.get("ULT_RAY_CEILING", "700MiB"))
    try:
        s.start()
        yield s
    finally:
        s.close()
        if os.environ.get("ULT_RAY_KEEP"):
            print(f"kept the nodes' logs in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

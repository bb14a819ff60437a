"""Where the real shared datasets are: ``<repo>/../shared/data`` (CI: ``<clone>/../shared``), or
``$DFX_SHARED_DATA`` for a checkout that sits elsewhere (a git worktree). Tests that need them skip
with a reason when they are absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA = Path(os.environ.get("DFX_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def needs(name: str):
    """Skip unless the shared dataset ``name`` is present."""
    return pytest.mark.skipif(not (DATA / name).is_dir(), reason=f"{DATA / name} (shared real data) is not present")

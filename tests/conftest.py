"""Shared fixtures: a tiny ImageFolder dataset, a tiny recipe, an isolated cache and cwd."""

from __future__ import annotations

import contextlib
import io
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dfx.data.embedded import generate_shapes_cls

TINY_RECIPE = """\
task: classification
model:
  name: vit_tiny_patch16_224
  kwargs: {{img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2, mlp_ratio: 2.0}}
data:
  root: {root}
  image_size: 32
train:
  epochs: 2
  batch_size: 8
  lr: 1.0e-3
  warmup_epochs: 0
  seed: 0
  num_workers: 0
  log_every: 2
eval:
  batch_size: 16
"""


def run_dfx(*args) -> subprocess.CompletedProcess:
    """``dfx ARGS`` run in this process through the real entry point (``dfx.cli.main``: argument
    rewriting, Typer's parse errors, the one-JSON-object and exit-code contract), with stdout and
    stderr captured; a few seconds cheaper per call than a fresh ``python -m dfx`` (no torch import)."""
    from dfx.cli import main

    argv, handler = sys.argv, signal.getsignal(signal.SIGTERM)
    sys.argv = ["dfx", *map(str, args)]
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
        signal.signal(signal.SIGTERM, handler)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Every test runs in its own folder (runs/ lands there) with its own dfx and HF caches."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DFX_HOME", str(tmp_path / "dfx-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A 6-class ImageFolder tree: 8 train and 4 val images per class (48 / 24)."""
    root = tmp_path_factory.mktemp("tiny-shapes")
    generate_shapes_cls(root, seed=0, train_per_class=8, val_per_class=4)
    return root


@pytest.fixture
def tiny_recipe(tmp_path, tiny_data) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(textwrap.dedent(TINY_RECIPE.format(root=tiny_data)))
    return path

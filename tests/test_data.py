"""Embedded data: deterministic generation, checksum-verified cache, ImageFolder errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from dfx.data.cache import MANIFEST, ensure_dataset, tree_checksum, verify
from dfx.data.classification import image_folder
from dfx.data.embedded import generate_shapes_cls
from dfx.data.seeded import SeededDataset
from dfx.data.shapes import CLS_SHAPES
from dfx.errors import RunError, UsageError


def test_shapes_cls_is_deterministic_and_varied(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_shapes_cls(a, seed=0, train_per_class=3, val_per_class=2)
    generate_shapes_cls(b, seed=0, train_per_class=3, val_per_class=2)
    generate_shapes_cls(c, seed=1, train_per_class=3, val_per_class=2)
    assert tree_checksum(a) == tree_checksum(b)
    assert tree_checksum(a)[0] != tree_checksum(c)[0]
    assert tree_checksum(a)[1] == len(CLS_SHAPES) * 5
    images = [np.asarray(Image.open(p)) for p in sorted((a / "train").rglob("*.png"))]
    assert all(im.shape == (32, 32, 3) for im in images)
    # no two images alike, and not flat colour
    assert len({im.tobytes() for im in images}) == len(images)
    assert min(float(im.std()) for im in images) > 5


def test_cache_generates_once_verifies_and_regenerates_when_corrupt(tmp_path, monkeypatch):
    monkeypatch.setenv("DFX_HOME", str(tmp_path / "home"))
    calls = []

    def generate(folder):
        calls.append(folder)
        generate_shapes_cls(folder, train_per_class=1, val_per_class=1)
        return {"note": "test"}

    root = ensure_dataset("tiny-v1", generate)
    assert verify(root) and json.loads((root / MANIFEST).read_text())["note"] == "test"
    assert ensure_dataset("tiny-v1", generate) == root and len(calls) == 1  # cached
    victim = next((root / "train").rglob("*.png"))
    victim.write_bytes(b"corrupted")
    assert not verify(root)
    ensure_dataset("tiny-v1", generate)
    assert len(calls) == 2 and verify(root)
    assert not list(root.parent.glob(".tiny-v1.tmp-*"))  # no temporary folders left behind


def test_image_folder_errors_name_the_layout(tmp_path):
    with pytest.raises(UsageError, match=r"expected .*/train/<class>/<image>"):
        image_folder(tmp_path, "train")
    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "train" / "a" / "x.png")
    (tmp_path / "val" / "b").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "val" / "b" / "y.png")
    with pytest.raises(UsageError, match="classes not in train/: b"):
        image_folder(tmp_path, "val", classes=["a"])


def test_seeded_dataset_depends_only_on_seed_epoch_index():
    import torch

    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(2)

    ds = SeededDataset(Noise(), seed=3)
    first = [ds[i] for i in range(4)]
    torch.rand(10)  # global RNG use elsewhere does not matter
    assert all(torch.equal(x, ds[i]) for i, x in enumerate(first))
    state = torch.get_rng_state()
    ds[0]
    assert torch.equal(state, torch.get_rng_state())  # and the global RNG is left untouched
    ds.set_epoch(1)
    assert not torch.equal(first[0], ds[0])


def _ensure_in_child(name: str, marks: str, start, results) -> None:
    """One of several processes asking for the same corrupt cached dataset at once."""
    def generate(folder):
        with open(marks, "a") as f:  # one line per regeneration
            f.write(f"{os.getpid()}\n")
        generate_shapes_cls(folder, train_per_class=1, val_per_class=1)
        return {}

    start.wait()
    try:
        root = ensure_dataset(name, generate, log=lambda msg: None)
        results.put(("ok", verify(root)))
    except BaseException as e:  # reported to the parent, which fails the test
        results.put(("error", f"{type(e).__name__}: {e}"))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_concurrent_processes_never_delete_a_dataset_another_reads(tmp_path, monkeypatch):
    import multiprocessing

    monkeypatch.setenv("DFX_HOME", str(tmp_path / "home"))
    root = ensure_dataset("race-v1", lambda folder: generate_shapes_cls(folder, train_per_class=1, val_per_class=1)
                          or {})
    next((root / "val").rglob("*.png")).write_bytes(b"corrupted")
    marks = tmp_path / "regenerations.txt"
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Event(), ctx.Queue()
    workers = [ctx.Process(target=_ensure_in_child, args=("race-v1", str(marks), start, results)) for _ in range(3)]
    for worker in workers:
        worker.start()
    start.set()
    outcomes = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert outcomes == [("ok", True)] * 3
    assert len(marks.read_text().split()) == 1  # one process regenerated; the others waited and reused it
    assert sorted(p.name for p in root.parent.iterdir() if p.name.startswith(".race-v1")) == [".race-v1.lock"]


def test_an_unwritable_dfx_home_is_named(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.write_text("a file where the cache folder should be")  # stands in for a read-only folder (tests run as root)
    monkeypatch.setenv("DFX_HOME", str(home))
    with pytest.raises(RunError, match=rf"cannot write dataset tiny-v1 into {home / 'datasets'}: .*; set DFX_HOME to a "
                                       "writable folder"):
        ensure_dataset("tiny-v1", lambda folder: {})

"""Two CPU processes (gloo) train to the same weights as one process with the same global batch."""

from __future__ import annotations

import json
import re
import shutil
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


@pytest.mark.slow
def test_two_gloo_processes_match_a_single_process(tiny_recipe, tmp_path):
    # SGD: the update is linear in the gradient, so float noise in gradients that are zero in exact
    # arithmetic (e.g. the attention key bias) is not amplified the way Adam normalisation does
    args = ["train", str(tiny_recipe), "train.epochs=2", "train.batch_size=8", "train.optimizer=sgd", "train.lr=0.05",
            "--json", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "dfx", *args, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr
    double = subprocess.run([sys.executable, "-m", "dfx", *args, "--out", str(tmp_path / "two"), "--nproc-per-node", "2"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert double.returncode == 0, double.stderr
    # one JSON object from rank 0 only
    lines = [line for line in double.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert Path(result["run_dir"]) == tmp_path / "two"

    a = load_file(str(tmp_path / "one" / "checkpoints" / "last.safetensors"))
    b = load_file(str(tmp_path / "two" / "checkpoints" / "last.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    # evaluation is sharded over the ranks and merged: the same numbers as one process
    single_metrics = json.loads(single.stdout)["metrics"]
    assert result["metrics"]["top1"] == single_metrics["top1"]
    assert abs(result["metrics"]["loss"] - single_metrics["loss"]) < 1e-4


@pytest.mark.slow
def test_the_first_failing_rank_is_reported_with_its_exit_code(tiny_recipe, tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    bad = data / "train" / "circle" / "00000.png"
    bad.write_bytes(b"not a png")
    result = subprocess.run([sys.executable, "-m", "dfx", "train", str(tiny_recipe), f"data.root={data}",
                             "--nproc-per-node", "2", "--device", "cpu", "--json"], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 2, result.stderr  # a bad-data usage error, whichever rank met it
    payload = json.loads(result.stdout)  # exactly one JSON object, from the launcher
    assert payload["exit_code"] == 2
    assert re.fullmatch(r"rank [01]: cannot read image .*circle/00000\.png: .*", payload["error"]), payload

"""The command line: --json contract, exit codes, one-line errors, dry runs, eval and bench."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_dfx as dfx  # in-process, through the real entry point


def dfx_process(*args: str) -> subprocess.CompletedProcess:
    """A real ``python -m dfx`` process: what shell scripts see."""
    return subprocess.run([sys.executable, "-m", "dfx", *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ), timeout=600)


def test_version_and_help_list_the_commands():
    result = dfx("--version")
    assert result.returncode == 0 and result.stdout.strip().startswith("dfx 0.")
    result = dfx("--help")
    assert result.returncode == 0
    for command in ("train", "eval", "bench"):
        assert command in result.stdout


@pytest.mark.slow
def test_train_json_then_eval_json(tiny_recipe):
    """The --json / exit-code contract as a shell script sees it: real processes."""
    result = dfx_process("train", tiny_recipe, "train.epochs=1", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)  # exactly one JSON object on stdout
    assert result.stdout.strip().count("\n") == 0
    assert set(payload) == {"run_dir", "metrics", "best", "epochs", "stopped_early", "elapsed_s"}
    assert set(payload["metrics"]) == {"top1", "top5", "loss"} and payload["epochs"] == 1
    assert "epoch 1/1" in result.stderr  # progress went to stderr (plain lines: not a TTY)

    evaluated = dfx_process("eval", payload["run_dir"], "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads(evaluated.stdout)["metrics"]
    assert metrics["top1"] == pytest.approx(payload["best"]["top1"])


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["train", "missing.yaml"], 2, "recipe file not found: missing.yaml"),
        (["train", "{recipe}", "train.epochz=3"], 2, "did you mean epochs?"),
        (["train", "{recipe}", "train.epochs=many"], 2, "train.epochs: expected int"),
        (["train", "{recipe}", "--device", "cuda"], 2, "no CUDA GPU is available"),
        (["eval", "no-such-run"], 2, "no such run directory or checkpoint file"),
        (["bench", "--model", "not_a_model_at_all"], 2, "--model 'not_a_model_at_all'"),
    ],
)
def test_errors_are_one_line_with_the_right_exit_code(tiny_recipe, args, code, message):
    if "cuda" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    args = [a.format(recipe=tiny_recipe) for a in args]
    result = dfx(*args, "--json")
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    payload = json.loads(result.stdout)
    assert payload["exit_code"] == code and message in payload["error"]


def test_dry_run_prints_the_resolved_recipe(tiny_recipe):
    result = dfx("train", tiny_recipe, "train.lr=0.5", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert resolved["train"]["lr"] == 0.5 and resolved["train"]["weight_decay"] == 0.05  # default filled in
    assert not Path("runs").exists()
    plain = dfx("train", tiny_recipe, "--dry-run")
    assert plain.returncode == 0 and "task: classification" in plain.stdout


def test_bare_resume_means_latest(tiny_recipe):
    from dfx.cli import _resume_flag

    assert _resume_flag(["train", "r.yaml", "--resume"]) == ["train", "r.yaml", "--resume=latest"]
    assert _resume_flag(["train", "r.yaml", "--resume", "--json"])[2] == "--resume=latest"
    assert _resume_flag(["train", "r.yaml", "--resume", "train.epochs=3"])[2] == "--resume=latest"
    assert _resume_flag(["train", "--resume", "r.yaml"])[1] == "--resume=latest"
    assert _resume_flag(["train", "r.yaml", "--resume", "runs/x"]) == ["train", "r.yaml", "--resume", "runs/x"]


def test_bench_reports_latency_flops_and_memory():
    result = dfx("bench", "--model", "vit_tiny_patch16_224", "--image-size", "64", "--warmup", "1", "--repeats", "3",
                 "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("latency_ms", "latency_p90_ms", "throughput", "params_m", "gflops", "peak_mem_mb", "device", "dtype",
                "torch"):
        assert key in report, key
    assert report["params_m"] == pytest.approx(5.683, abs=0.001)  # 5.717 M at 224 px, smaller pos. embedding
    # ViT-Ti at 64 px: 17 tokens through 12 blocks of 0.4449 M linear weights each, 2 FLOPs per
    # multiply-add (0.1815 GFLOPs), plus the patch embedding and attention (~0.01 GFLOPs)
    linear = 2 * 17 * 12 * (192 * 576 + 192 * 192 + 2 * 192 * 768) / 1e9
    assert linear < report["gflops"] < linear * 1.1
    assert report["latency_p90_ms"] >= report["latency_ms"] > 0


def test_flop_count_includes_fused_cpu_attention():
    import timm
    import torch

    from dfx.measure import count_flops

    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2).eval()
    fused = count_flops(model, torch.randn(1, 3, 64, 64))
    for block in model.blocks:
        block.attn.fused_attn = False  # explicit matmuls, which every counter sees
    assert fused == count_flops(model, torch.randn(1, 3, 64, 64))
    # attention: 2 matmuls of 17x17x192 per block, 2 FLOPs per multiply-add
    assert fused - 2 * 17 * 2 * (192 * 576 + 192 * 192 + 2 * 192 * 768) >= 2 * 2 * 2 * 17 * 17 * 192


@pytest.mark.parametrize("args, message", [
    (["train"], "Missing argument 'recipe'"),
    (["trian", "x.yaml"], "No such command 'trian'"),
    (["train", "x.yaml", "--bogus"], "No such option: --bogus"),
])
def test_typer_usage_errors_keep_the_json_contract(args, message):
    result = dfx(*args, "--json")
    assert result.returncode == 2, result.stderr
    payload = json.loads(result.stdout)  # exactly one JSON object
    assert payload["exit_code"] == 2 and message in payload["error"]
    assert result.stderr.count("\n") == 1 and message in result.stderr


def test_error_text_is_never_read_as_markup(tmp_path):
    for name in (tmp_path / "a[/x]" / "missing.yaml", tmp_path / "[red]missing[/red].yaml"):
        result = dfx("train", name, "--json")
        assert result.returncode == 2, result.stderr
        assert json.loads(result.stdout) == {"error": f"recipe file not found: {name}", "exit_code": 2}
        assert f"recipe file not found: {name}" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_sigterm_stops_cleanly_with_one_json_object(tiny_recipe, tmp_path):
    import signal

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "dfx", "train", str(tiny_recipe), "train.epochs=500", "--out",
                             str(run), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # wait until training steps are running
        if "step" in line:
            break
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    payload = json.loads(stdout)
    assert payload["exit_code"] == 143 and "SIGTERM" in payload["error"] and "--resume" in payload["error"]
    assert (run / "recipe.yaml").is_file() and not [p for p in run.rglob("*") if ".tmp-" in p.name]


def test_recipes_lists_every_shipped_recipe_with_its_task_and_header():
    from typer.testing import CliRunner

    from dfx.cli import app

    result = CliRunner().invoke(app, ["recipes", str(Path(__file__).resolve().parents[1] / "recipes"), "--json"])
    assert result.exit_code == 0, result.output
    listed = {Path(r["path"]).name: r for r in json.loads(result.stdout)["recipes"]}
    assert listed["hdetr.yaml"]["task"] == "detection"
    assert listed["deformable-detr-shapes.yaml"]["task"] == "detection"  # through its _base_
    assert listed["hdetr.yaml"]["summary"].startswith("H-Deformable-DETR, ResNet-50, COCO")
    shipped = {p.name for p in (Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml")}
    assert set(listed) == shipped


def test_shared_options_show_their_choices_and_bad_choices_exit_2():
    from typer.testing import CliRunner

    from dfx.cli import app

    runner = CliRunner()
    assert "<float32|float16|bfloat16>" in runner.invoke(app, ["bench", "--help"], env={"COLUMNS": "200"}).output
    bad = runner.invoke(app, ["bench", "--dtype", "half"])
    assert bad.exit_code == 2 and "'half' is not one of" in bad.output

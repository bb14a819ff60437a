"""`dfx cluster` and `dfx bench --cluster-ratio`: reports, their arithmetic, and bad input (exit code 2).

A tiny segmentation run (64x64 images, an 8x8 token grid, 2 blocks) is trained once for the module.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import run_dfx
from dfx.cli import app
from dfx.cluster.analysis import feature_fidelity
from dfx.cluster_report import cluster_report, wrap_model
from dfx.data.embedded import generate_shapes_seg
from dfx.errors import UsageError

# 64x64 images in 8x8 patches: an 8x8 token grid, 2 blocks of width 32
MODEL = {"name": "vit_tiny_patch16_224",
         "kwargs": {"img_size": 64, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}}
FAST = ["--warmup", "0", "--repeats", "1"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-seg")
    generate_shapes_seg(root, train_images=16, val_images=6)
    return root


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory, tiny_root):
    from dfx.engine import train

    from dfx.recipe import build_recipe

    folder = tmp_path_factory.mktemp("seg-run")
    recipe = build_recipe({"task": "segmentation", "model": MODEL, "data": {"root": str(tiny_root)},
                           "train": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0, "num_workers": 0}},
                          name="tiny-seg")
    return train(recipe, out=folder / "run", device="cpu", quiet=True)["run_dir"]


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result, (json.loads(result.stdout) if result.stdout.strip() else None)


def test_cluster_report_on_a_segmentation_run(seg_run):
    report = cluster_report(seg_run, cluster_ratio=0.5, images=3, warmup=0, repeats=1, device="cpu")
    assert report["grid"] == [8, 8] and report["clustered_grid"] == [6, 6]  # round(8·√0.5) = 6
    assert report["settings"] == {"cluster_ratio": 0.5, "alpha": 1, "depth": 2, "iters": 5, "temperature": 0.02,
                                  "window": 5, "k": 20, "temperature_mode": "fixed"}
    assert report["weights"] == "trained" and report["metric"] == "mIoU"
    base, clustered = report["baseline"], report["clustered"]
    assert report["metric_drop"] == pytest.approx((base["mIoU"] - clustered["mIoU"]) * 100)
    # (on a model this small clustering costs more FLOPs than it saves: gflops are only checked for consistency)
    assert 0 <= clustered["mIoU"] <= 1 and 0 < clustered["gflops"]
    assert report["flops_ratio"] == pytest.approx(base["gflops"] / clustered["gflops"])
    assert report["speedup"] == pytest.approx(base["latency_ms"] / clustered["latency_ms"])
    fidelity = report["fidelity"]
    assert fidelity["tokens"] == 3 * 64 and -1 <= fidelity["cosine_min"] <= fidelity["cosine_mean"] <= 1


def test_feature_fidelity_is_the_cosine_of_the_patch_tokens(seg_run):
    from dfx.engine.evaluation import load_model

    _, _, model, _ = load_model(seg_run)
    clustered = wrap_model(model, 0.5)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    fidelity = feature_fidelity(model, clustered, images, batch=1)
    with torch.no_grad():
        reference = model.backbone.forward_features(images)[:, 1:].double()
        reconstructed = clustered.backbone.forward_features(images)[:, 1:].double()
    cosine = (reference * reconstructed).sum(-1) / (reference.norm(dim=-1) * reconstructed.norm(dim=-1))
    assert fidelity["cosine_mean"] == pytest.approx(float(cosine.mean()))
    assert fidelity["cosine_min"] == pytest.approx(float(cosine.min()))
    assert fidelity["tokens"] == 2 * 64


def test_assignment_sharpness_against_timm_intermediates(seg_run):
    from dfx.cluster.analysis import assignment_sharpness
    from dfx.engine.evaluation import load_model

    _, _, model, _ = load_model(seg_run)
    clustered = wrap_model(model, 0.5, temperature=3.0)  # alpha 1 of 2, 8x8 -> 6x6
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    result = assignment_sharpness(clustered, images, batch=2)
    with torch.no_grad():  # timm's own (unclustered) model: tokens after block 1 as [B, C, 8, 8]
        (patch_map,) = model.backbone.forward_intermediates(images, indices=[0], intermediates_only=True)
    pixels = patch_map.flatten(2).transpose(1, 2).double()  # [B, 64, C]
    centres = torch.nn.functional.adaptive_avg_pool2d(patch_map.double(), (6, 6)).flatten(2).transpose(1, 2)
    nearest = ((pixels[:, :, None] - centres[:, None]) ** 2).sum(-1).min(-1).values
    assert result["distance"] == pytest.approx(float(nearest.median()), rel=1e-6)
    assert result["sharpness"] == pytest.approx(3.0 * result["distance"])


def test_auto_temperature_is_calibrated_to_the_feature_scale(seg_run):
    from dfx.cluster.analysis import AUTO_SHARPNESS

    report = cluster_report(seg_run, cluster_ratio=0.5, images=3, warmup=0, repeats=1, device="cpu",
                            temperature="auto", metric=False)
    distance = report["assignment"]["distance"]
    assert report["settings"]["temperature_mode"] == "auto"
    assert report["settings"]["temperature"] == pytest.approx(AUTO_SHARPNESS / distance)
    assert report["assignment"]["sharpness"] == pytest.approx(AUTO_SHARPNESS)
    fixed = cluster_report(seg_run, cluster_ratio=0.5, images=3, warmup=0, repeats=1, device="cpu",
                           temperature=0.02, metric=False)
    assert fixed["assignment"]["distance"] == pytest.approx(distance)  # the distance ignores the temperature
    with pytest.raises(UsageError, match="temperature"):
        cluster_report(seg_run, cluster_ratio=0.5, images=1, warmup=0, repeats=1, temperature=-1.0, metric=False)


def test_cluster_command_json(seg_run):
    result, payload = invoke("cluster", "--model", seg_run, "--cluster-ratio", "0.75", "--images", "2", *FAST,
                             "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().count("\n") == 0  # exactly one JSON object
    assert payload["clustered_grid"] == [7, 7] and "mIoU" in payload["clustered"]
    assert payload["settings"]["temperature_mode"] == "auto"  # the command's default
    result, _ = invoke("cluster", "--model", seg_run, "--temperature", "hot", "--json")
    assert result.exit_code == 2 and "--temperature" in result.output and "'hot'" in result.output


def test_bench_side_by_side(seg_run):
    result, payload = invoke("bench", "--model", seg_run, "--cluster-ratio", "0.5", "--alpha", "2", *FAST,
                             "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    for side in ("baseline", "clustered"):
        assert {"latency_ms", "throughput", "gflops", "peak_mem_mb"} <= set(payload[side])
    base, clustered = payload["baseline"], payload["clustered"]
    assert payload["flops_ratio"] == pytest.approx(base["gflops"] / clustered["gflops"])
    assert payload["speedup"] == pytest.approx(base["latency_ms"] / clustered["latency_ms"])
    assert payload["efficiency"] == pytest.approx(payload["speedup"] / payload["flops_ratio"])
    assert 0 < payload["cluster_share"] < 1 and payload["settings"]["alpha"] == 2
    # alpha = depth: no block runs on the clusters, so the clustered model costs more than the baseline
    assert payload["flops_ratio"] < 1
    # the peak memory is per model, weights included
    from dfx.engine.evaluation import load_model

    weights_mb = sum(p.numel() * 4 for p in load_model(seg_run)[2].parameters()) / 2**20
    assert base["peak_mem_mb"] > weights_mb and clustered["peak_mem_mb"] > weights_mb


def test_bench_without_clustering_keeps_its_keys(seg_run):
    result, payload = invoke("bench", "--model", seg_run, *FAST, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    assert {"latency_ms", "latency_p90_ms", "throughput", "params_m", "gflops", "peak_mem_mb"} <= set(payload)
    assert "clustered" not in payload


@pytest.mark.parametrize(
    "command, extra, message",
    [
        ("cluster", ["--cluster-ratio", "0"], "must be a number in (0, 1], got 0.0"),
        ("cluster", ["--cluster-ratio", "1.5"], "must be a number in (0, 1], got 1.5"),
        ("bench", ["--cluster-ratio", "-0.25"], "must be a number in (0, 1], got -0.25"),
        ("bench", ["--alpha", "1"], "--alpha 1: alpha chooses where tokens are clustered; it needs --cluster-ratio"),
        ("cluster", ["--alpha", "3"], "must be an integer in [1, 2] for this 2-block model, got 3"),
        ("bench", ["--cluster-ratio", "0.5", "--alpha", "0"], "must be an integer in [1, 2] for this 2-block model"),
        ("cluster", ["--cluster-ratio", "0.1"], "window=5 does not fit the 3x3 clustered token grid"),
        ("cluster", ["--window", "7"], "window must be an odd integer in [1, 6]"),
        ("bench", ["--cluster-ratio", "0.2"], "window=5 does not fit the 4x4 clustered token grid"),
    ],
)
def test_bad_input_exits_2_naming_value_and_range(seg_run, tiny_root, command, extra, message):
    extra = extra + (["--data", str(tiny_root), "--images", "1"] if command == "cluster" else [])
    result, payload = invoke(command, "--model", seg_run, *extra, *FAST, "--device", "cpu", "--json")
    assert result.exit_code == 2, result.output
    assert message in payload["error"] and payload["exit_code"] == 2


def test_a_model_that_is_not_a_vit_is_refused(tiny_root):
    result, payload = invoke("cluster", "--model", "resnet10t", "--data", tiny_root, "--images", "1", *FAST, "--json")
    assert result.exit_code == 2, result.output
    assert "model must be a timm VisionTransformer" in payload["error"] and "got ResNet" in payload["error"]


def test_exit_code_through_the_entry_point():
    """The --json / exit-code contract through ``dfx.cli.main`` (tests/test_cli.py checks it on real processes)."""
    result = run_dfx("cluster", "--model", "vit_tiny_patch16_224", "--cluster-ratio", "2", "--json")
    assert result.returncode == 2
    assert "got 2.0" in json.loads(result.stdout)["error"] and "Traceback" not in result.stderr

"""Expedit on the other dense models: hourglass Swin (windowed clustering), hourglass DPT, and
`dfx cluster` on depth and detection runs.

Tiny models in float64 (Swin: width 16-32, window 4; DPT: width 48, 4 blocks), so identities hold to 1e-12.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from dfx.cluster import token_clustering
from dfx.cluster.analysis import clustered_copy
from dfx.cluster.swin import _shift_mask, hourglass_swin, partition, relative_index, resize_bias_table
from dfx.models.dpt import DPT

SWIN = dict(embed_dim=32, depths=(2, 2, 4, 2), num_heads=(1, 2, 4, 8), window_size=4, img_size=128)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_swin(features_only=True, **overrides):
    torch.manual_seed(0)
    extra = dict(features_only=True, out_indices=(1, 2, 3), strict_img_size=False) if features_only else {}
    model = timm.create_model("swin_tiny_patch4_window7_224", **{**SWIN, **extra, **overrides})
    return model.double().eval()


def images(batch=2, height=128, width=128, seed=1):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------- hourglass Swin


@pytest.mark.parametrize("alpha", [1, 3, 5, 6, 7, 9])
def test_swin_is_the_identity_when_the_clustered_side_is_the_window(alpha):
    """s = ws, iters = 0, k = 1: clustering and reconstruction are the identity, and our block (window,
    shift mask, bias table) must then compute what timm's blocks compute, at every alpha of every stage."""
    model = tiny_swin()
    x = images()
    clustered = hourglass_swin(model, clusters=4, alpha=alpha, iters=0, k=1, window=1)
    with torch.no_grad():
        reference, outputs = model(x), clustered(x)
    assert [o.shape for o in outputs] == [r.shape for r in reference]
    for out, ref in zip(outputs, reference):
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_swin_classifier_identity_and_real_clustering_changes_only_later_stages():
    model = tiny_swin(features_only=False, num_classes=3)
    x = images(1)
    with torch.no_grad():
        identity = hourglass_swin(model, clusters=4, alpha=5, iters=0, k=1, window=1)
        torch.testing.assert_close(identity(x), model(x), rtol=0, atol=1e-12)
    features = tiny_swin()
    clustered = hourglass_swin(features, clusters=3, alpha=5, window=3, temperature=1.0)  # stage 3, 4 -> 3 per window
    with torch.no_grad():
        reference, outputs = features(x), clustered(x)
    torch.testing.assert_close(outputs[0], reference[0], rtol=0, atol=0)  # stage 2: before clustering
    for out, ref in zip(outputs[1:], reference[1:]):
        assert out.shape == ref.shape and not torch.allclose(out, ref, atol=1e-3)
        assert F.cosine_similarity(out, ref, dim=-1).mean() > 0.5  # still close to the unclustered features


def test_swin_any_input_size_and_bad_settings():
    model = tiny_swin()
    clustered = hourglass_swin(model, clusters=3, alpha=5, window=3, temperature=1.0)
    x = images(1, 100, 140)  # stage-3 map 7x9: padded to 8x12 (2x3 windows), cut back after reconstruction
    with torch.no_grad():
        assert [o.shape for o in clustered(x)] == [o.shape for o in model(x)]
    assert clustered.clustered_grid((7, 9)) == (6, 9)
    with pytest.raises(ValueError, match="last block of stage 2"):
        hourglass_swin(model, alpha=4)
    with pytest.raises(ValueError, match="larger than the 4x4 attention window"):
        hourglass_swin(model, clusters=5, alpha=5, window=1)
    with pytest.raises(ValueError, match="window=5 does not fit the 3x3"):
        hourglass_swin(model, clusters=3, alpha=5, window=5)
    with pytest.raises(ValueError, match="must be a timm Swin"):
        hourglass_swin(torch.nn.Linear(2, 2))


def test_per_window_clustering_equals_clustering_each_window_alone():
    """The wrapper's windows are the map's ws x ws tiles, and clustering them as a batch gives what
    clustering each tile on its own gives (a window's centres depend on that window only)."""
    model = tiny_swin()
    clustered = hourglass_swin(model, clusters=3, alpha=5, window=3, temperature=0.5)
    x = images(2)
    with torch.no_grad():
        stage_map = clustered.stage_input(x)  # [B, 16, 16, C] after stage 3's patch merging
        for block in clustered._cluster_stage()[0].blocks[:1]:  # alpha 5 = 1 block into stage 3
            stage_map = block(stage_map)
        windows, size = clustered.windows_at_alpha(clustered.stage_input(x))
        together = token_clustering(windows, (3, 3), 5, 0.5, 3)
    assert size == (8, 8) and windows.shape == (2 * 4, 32 * 4, 4, 4)
    for index in range(windows.shape[0]):
        b, rest = divmod(index, 4)
        row, col = divmod(rest, 2)
        tile = stage_map[b, row * 4:(row + 1) * 4, col * 4:(col + 1) * 4].permute(2, 0, 1)[None]
        torch.testing.assert_close(windows[index], tile[0], rtol=0, atol=0)
        alone = token_clustering(tile, (3, 3), 5, 0.5, 3)
        torch.testing.assert_close(together[index], alone[0], rtol=1e-12, atol=1e-12)


def test_resized_bias_table_is_a_bilinear_interpolation():
    """(2·7 − 1)² -> (2·5 − 1)² entries against bilinear interpolation written out (half-pixel centres,
    edge clamping: align_corners=False)."""
    old, new, heads = 7, 5, 3
    table = torch.randn((2 * old - 1) ** 2, heads, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    resized = resize_bias_table(table, old, new)
    src, dst = 2 * old - 1, 2 * new - 1
    grid = table.view(src, src, heads)

    def source(i):  # output index -> (lower index, upper index, weight of upper)
        position = min(max((i + 0.5) * src / dst - 0.5, 0.0), src - 1)
        low = math.floor(position)
        return low, min(low + 1, src - 1), position - low

    expected = torch.empty(dst, dst, heads, dtype=torch.float64)
    for i in range(dst):
        y0, y1, wy = source(i)
        for j in range(dst):
            x0, x1, wx = source(j)
            expected[i, j] = ((1 - wy) * ((1 - wx) * grid[y0, x0] + wx * grid[y0, x1])
                              + wy * ((1 - wx) * grid[y1, x0] + wx * grid[y1, x1]))
    torch.testing.assert_close(resized, expected.view(-1, heads), rtol=1e-12, atol=1e-12)
    assert resize_bias_table(table, old, old) is table
    # the index reads entry (dy + s - 1, dx + s - 1): centre of the table on the diagonal
    assert relative_index(new).diagonal().unique().tolist() == [(new - 1) * (2 * new - 1) + new - 1]


def test_shift_mask_matches_timm():
    """Our shifted-window mask against timm's own for the same map, window and shift."""
    from timm.models.swin_transformer import SwinTransformerBlock

    block = SwinTransformerBlock(dim=8, input_resolution=(12, 8), num_heads=1, window_size=4, shift_size=2)
    reference = block.get_attn_mask(torch.zeros(1, 12, 8, 8))
    torch.testing.assert_close(_shift_mask(12, 8, 4, (2, 2), None, torch.float32), reference)
    assert _shift_mask(12, 8, 4, (0, 0), None, torch.float32) is None
    assert partition(torch.arange(16.).view(1, 4, 4, 1), 2)[1].flatten().tolist() == [2, 3, 6, 7]


# ---------------------------------------------------------------- hourglass DPT


def tiny_dpt():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=3,
                            num_classes=0)
    return DPT(vit, [0, 1, 2, 3], [8, 16, 24, 48], features=16).double().eval()


def test_dpt_with_as_many_clusters_as_tokens_is_the_dpt():
    dpt = tiny_dpt()
    x = images(2, 64, 64)
    for alpha in (1, 2, 4):
        same = clustered_copy(dpt, 1.0, alpha=alpha, iters=0, k=1)
        assert same.backbone is not dpt.backbone and same.head is dpt.head  # shared head, own backbone
        with torch.no_grad():
            torch.testing.assert_close(same(x), dpt(x), rtol=0, atol=1e-12)
    assert type(dpt.backbone).__name__ == "VisionTransformer"  # the original is left as it was


def test_dpt_taps_after_alpha_are_reconstructed_at_full_resolution():
    """Taps 0 and 1 (blocks before alpha = 2) equal the DPT's; taps 2 and 3 are reconstructed to 8x8."""
    from dfx.cluster import token_reconstruction

    dpt = tiny_dpt()
    clustered = clustered_copy(dpt, 0.5, alpha=2, temperature=1.0)  # 8x8 -> 6x6 after block 2
    x = images(1, 64, 64)
    with torch.no_grad():
        taps = clustered.backbone.forward_intermediates(x, indices=[0, 1, 2, 3], intermediates_only=True)
        reference = dpt.backbone.forward_intermediates(x, indices=[0, 1, 2, 3], intermediates_only=True)
        # blocks by hand: tokens after block 2 clustered, blocks 3-4 on 36 centres, each output reconstructed
        vit = dpt.backbone
        tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        tokens = vit.blocks[1](vit.blocks[0](tokens))
        before = tokens[:, 1:]
        centres = token_clustering(before.transpose(1, 2).reshape(1, 48, 8, 8), (6, 6), 5, 1.0, 5)
        small = torch.cat([tokens[:, :1], centres], 1)
        expected = []
        for block in vit.blocks[2:]:
            small = block(small)
            expected.append(token_reconstruction(small[:, 1:], before, centres, 20, 1.0))
    for index in (0, 1):
        torch.testing.assert_close(taps[index], reference[index], rtol=0, atol=0)
    for tap, want in zip(taps[2:], expected):
        assert tap.shape == (1, 48, 8, 8)
        torch.testing.assert_close(tap, want.transpose(1, 2).reshape(1, 48, 8, 8), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- dfx cluster on depth and detection runs

DEPTH_MODEL = {"name": "vit_tiny_patch16_224", "features": 16,
               "kwargs": {"img_size": 64, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2,
                          "mlp_ratio": 2.0}}


@pytest.fixture(scope="module")
def depth_run(tmp_path_factory):
    from dfx.data.shapes_rgbd import generate_shapes_rgbd
    from dfx.engine import train
    from dfx.recipe import build_recipe

    root = tmp_path_factory.mktemp("tiny-depth")
    generate_shapes_rgbd(root, train_images=8, val_images=4, haze=0.3)
    recipe = build_recipe({"task": "depth", "model": DEPTH_MODEL, "data": {"root": str(root)},
                           "train": {"epochs": 1, "batch_size": 4, "warmup_epochs": 0, "num_workers": 0},
                           "eval": {"metric": "AbsRel", "mode": "min"}}, name="tiny-depth")
    return train(recipe, out=tmp_path_factory.mktemp("depth-run") / "run", device="cpu", quiet=True)["run_dir"]


@pytest.mark.slow
def test_cluster_report_on_a_depth_run(depth_run):
    from dfx.cluster_report import cluster_report

    report = cluster_report(depth_run, cluster_ratio=0.5, alpha=1, images=2, warmup=0, repeats=1, device="cpu",
                            temperature=2.0, clusters=(5, 5))
    assert report["grid"] == [8, 8] and report["clustered_grid"] == [5, 5] and report["settings"]["clusters"] == [5, 5]
    base, clustered = report["baseline"], report["clustered"]
    assert report["metric"] == "AbsRel" and set(report["metric_drops"]) == {"AbsRel", "RMSE", "d1"}
    # lower AbsRel / RMSE is better, higher d1: a drop is positive when the clustered model is worse
    assert report["metric_drops"]["AbsRel"] == pytest.approx((clustered["AbsRel"] - base["AbsRel"]) * 100)
    assert report["metric_drops"]["RMSE"] == pytest.approx((clustered["RMSE"] - base["RMSE"]) * 100)
    assert report["metric_drops"]["d1"] == pytest.approx((base["d1"] - clustered["d1"]) * 100)
    assert report["metric_drop"] == report["metric_drops"]["AbsRel"]
    for side in (base, clustered):
        assert 0 < side["backbone"]["gflops"] < side["gflops"]  # the DPT head costs on top of the ViT
    assert report["backbone_flops_ratio"] == pytest.approx(base["backbone"]["gflops"] / clustered["backbone"]["gflops"])


SWIN_DET = ["model.backbone=swin_tiny_patch4_window7_224",
            "model.backbone_kwargs={embed_dim: 16, depths: [2, 2, 2, 2], num_heads: [1, 1, 2, 2], window_size: 4}",
            "model.dim=32", "model.heads=4", "model.encoder_layers=1", "model.decoder_layers=1", "model.ffn_dim=32",
            "model.one2one_queries=10", "model.one2many_queries=20", "model.one2many_k=2", "data.scales=[96]",
            "data.max_size=96", "data.crop=null", "train.epochs=1", "train.batch_size=2", "train.num_workers=0",
            "train.warmup_steps=0", "eval.batch_size=4", "eval.draw_images=0"]


@pytest.mark.slow
def test_cluster_report_on_a_detection_run_with_a_swin_backbone(tmp_path):
    from pathlib import Path

    from dfx.cluster_report import cluster_report
    from dfx.data.embedded import generate_shapes_det
    from dfx.engine import train

    root = tmp_path / "shapes-det"
    generate_shapes_det(root, seed=0, train_images=4, val_images=3)
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "hdetr-shapes.yaml"
    run = train(recipe, [f"data.root={root}", *SWIN_DET], out=tmp_path / "run", device="cpu", quiet=True)["run_dir"]
    report = cluster_report(run, cluster_ratio=0.5, alpha=5, images=2, warmup=0, repeats=1, device="cpu",
                            window=1, temperature="auto")
    assert {"fidelity", "assignment", "baseline", "clustered", "speedup", "flops_ratio", "backbone_speedup",
            "backbone_flops_ratio", "metric", "metric_drop", "metric_drops", "settings"} <= set(report)
    for side in ("baseline", "clustered"):
        assert {"latency_ms", "gflops", "AP", "AP50", "backbone"} <= set(report[side])
    assert report["metric"] == "AP" and {"AP", "AP50"} <= set(report["metric_drops"])
    assert report["metric_drops"]["AP"] == pytest.approx((report["baseline"]["AP"] - report["clustered"]["AP"]) * 100)
    assert report["settings"]["alpha"] == 5 and report["settings"]["depth"] == 8
    # stage 3 of a 96 px image: a 6x6 map, padded to 2x2 windows of 4x4, each clustered to 3x3
    assert report["grid"] == [6, 6] and report["clustered_grid"] == [6, 6]
    assert report["assignment"]["sharpness"] == pytest.approx(2.0)


def test_clusters_option_and_the_run_argument():
    from typer.testing import CliRunner

    from dfx.cli import app
    from dfx.cluster_report import parse_clusters
    from dfx.errors import UsageError

    assert parse_clusters("16x16") == (16, 16) and parse_clusters("12X9") == (12, 9) and parse_clusters("8") == (8, 8)
    assert parse_clusters(None) is None
    for bad in ("0x4", "axb", "4x4x4", "-2x3"):
        with pytest.raises(UsageError, match="--clusters: expected HxW"):
            parse_clusters(bad)
    result = CliRunner().invoke(app, ["cluster", "runs/a", "--model", "runs/b", "--json"])
    assert result.exit_code == 2 and "give the model once" in result.stdout
    result = CliRunner().invoke(app, ["cluster", "--json"])
    assert result.exit_code == 2 and "give the model once" in result.stdout
    result = CliRunner().invoke(app, ["cluster", "runs/a", "--clusters", "big", "--json"])
    assert result.exit_code == 2 and "'big'" in result.stdout


def test_a_fixed_clusters_grid_on_a_vit():
    """--clusters fixes h x w whatever the patch grid; larger than the grid is refused by name."""
    from dfx.cluster import hourglass

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=3,
                            dynamic_img_size=True).double().eval()
    fast = hourglass(vit, clusters=(5, 7), window=5)
    assert fast.clustered_grid((8, 8)) == (5, 7) and fast.clustered_grid((12, 16)) == (5, 7)
    with torch.no_grad():
        assert fast.forward_features(images(1, 64, 64)).shape == (1, 65, 48)
    with pytest.raises(ValueError, match="clusters=5x7 is larger than the 4x8 patch grid"):
        fast.clustered_grid((4, 8))
    with pytest.raises(ValueError, match="clusters must be a pair"):
        hourglass(vit, clusters=(0, 3))

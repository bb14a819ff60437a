"""The depth task: metrics against numpy, the losses against their formulas, DPT's reassembly for each
backbone, the RGB + depth pairs, and a short train / eval / predict / export run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dfx.data.depth import DepthFormat, read_depth_target
from dfx.data.depth_eval import CROPS, DepthMetrics, align_scale_shift, crop_mask
from dfx.data.depth_pairs import DepthPairs, DepthTransform, collate_depth
from dfx.errors import UsageError
from dfx.models.depth_losses import silog_loss, ssi_loss
from dfx.recipe import build_recipe
from dfx.tasks.depth import DepthEvaluator, build_dpt
from shared_data import DATA, needs

SAMPLES = DATA / "rgbd-samples"


def numpy_metrics(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray, low: float, high: float) -> dict:
    """The Eigen et al. metrics written out directly (as BTS's compute_errors does)."""
    d, g = np.clip(pred[valid], low, high).astype(np.float64), gt[valid].astype(np.float64)
    thresh = np.maximum(d / g, g / d)
    return {"AbsRel": np.mean(np.abs(d - g) / g), "SqRel": np.mean((d - g) ** 2 / g),
            "RMSE": np.sqrt(np.mean((d - g) ** 2)), "RMSE_log": np.sqrt(np.mean((np.log(d) - np.log(g)) ** 2)),
            "d1": np.mean(thresh < 1.25), "d2": np.mean(thresh < 1.25 ** 2), "d3": np.mean(thresh < 1.25 ** 3)}


def hand_made_pair(height=48, width=64, seed=0):
    """Ground truth with holes (0), a far region beyond 10 m, and predictions spread around it."""
    rng = np.random.default_rng(seed)
    gt = rng.uniform(0.5, 9.0, (height, width)).astype(np.float32)
    gt[5:9, 10:30] = 0.0  # no return
    gt[-3:, :] = 12.0  # beyond max_depth: not scored
    pred = (gt * rng.uniform(0.6, 1.5, gt.shape)).astype(np.float32)
    pred[gt == 0] = 3.0
    pred[0, :5] = 0.0001  # clipped up to min_depth
    pred[1, :5] = 40.0  # clipped down to max_depth
    return pred, gt


# ------------------------------------------------------------------------------------------ metrics


@pytest.mark.parametrize("crop", ["none", "eigen", "garg"])
def test_metrics_match_numpy_on_valid_cropped_pixels(crop):
    pred, gt = hand_made_pair()
    height, width = gt.shape
    top, bottom, left, right = CROPS[crop]
    inside = np.zeros_like(gt, dtype=bool)
    inside[int(top * height):int(bottom * height), int(left * width):int(right * width)] = True
    valid = (gt > 1e-3) & (gt < 10.0) & inside
    expected = numpy_metrics(pred, gt, valid, 1e-3, 10.0)
    metrics = DepthMetrics(1e-3, 10.0, crop)
    metrics.add(torch.from_numpy(pred)[None], torch.from_numpy(gt)[None])
    got = DepthMetrics.summarize([metrics.state()])
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key
    assert got["images"] == 1 and 0.1 < got["AbsRel"] < 0.5  # a real spread, not a trivial pair


def test_eigen_and_garg_crops_at_their_native_sizes():
    eigen = crop_mask(480, 640, "eigen")
    rows, cols = eigen.any(1).nonzero()[:, 0], eigen.any(0).nonzero()[:, 0]
    assert (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1) == (45, 471, 41, 601)
    garg = crop_mask(375, 1242, "garg")  # a KITTI frame: BTS's int(0.40810811 * h) ... slices
    rows, cols = garg.any(1).nonzero()[:, 0], garg.any(0).nonzero()[:, 0]
    assert (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1) == (153, 371, 44, 1197)


def test_metrics_average_over_images_and_skip_images_without_depth():
    pred_a, gt_a = hand_made_pair(seed=1)
    pred_b, gt_b = hand_made_pair(seed=2)
    empty = np.zeros_like(gt_a)
    metrics = DepthMetrics(1e-3, 10.0)
    metrics.add(torch.from_numpy(np.stack([pred_a, pred_b, pred_a])), torch.from_numpy(np.stack([gt_a, gt_b, empty])))
    got = DepthMetrics.summarize([metrics.state()])
    a = numpy_metrics(pred_a, gt_a, (gt_a > 1e-3) & (gt_a < 10), 1e-3, 10.0)
    b = numpy_metrics(pred_b, gt_b, (gt_b > 1e-3) & (gt_b < 10), 1e-3, 10.0)
    assert got["AbsRel"] == pytest.approx((a["AbsRel"] + b["AbsRel"]) / 2, rel=1e-6)
    assert got["images"] == 2 and got["images_without_depth"] == 1


def test_relative_predictions_are_aligned_in_inverse_depth():
    _, gt = hand_made_pair()
    inverse = np.where(gt > 0, 1 / np.maximum(gt, 1e-6), 0)
    pred = 0.37 * inverse + 0.05  # exact up to scale and shift: perfect after alignment
    metrics = DepthMetrics(1e-3, 10.0, relative=True)
    metrics.add(torch.from_numpy(pred.astype(np.float32))[None], torch.from_numpy(gt)[None])
    got = DepthMetrics.summarize([metrics.state()])
    assert got["AbsRel"] < 1e-4 and got["d1"] == 1.0
    plain = DepthMetrics(1e-3, 10.0)
    plain.add(torch.from_numpy(pred.astype(np.float32))[None], torch.from_numpy(gt)[None])
    assert DepthMetrics.summarize([plain.state()])["AbsRel"] > 0.5  # unaligned it is far off


def test_align_scale_shift_is_least_squares():
    rng = np.random.default_rng(3)
    p, t = rng.normal(size=(2, 6, 7)), rng.normal(size=(2, 6, 7))
    mask = rng.random((2, 6, 7)) > 0.3
    aligned = align_scale_shift(torch.from_numpy(p), torch.from_numpy(t), torch.from_numpy(mask)).numpy()
    for i in range(2):
        design = np.stack([p[i][mask[i]], np.ones(mask[i].sum())], 1)
        (s, b), *_ = np.linalg.lstsq(design, t[i][mask[i]], rcond=None)
        np.testing.assert_allclose(aligned[i], s * p[i] + b, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------ losses


def test_silog_matches_its_formula_and_ignores_invalid_pixels():
    pred, gt = hand_made_pair()
    mask = gt > 0
    g = np.log(pred[mask].astype(np.float64)) - np.log(gt[mask].astype(np.float64))
    expected = 10 * np.sqrt(np.mean(g ** 2) - 0.85 * np.mean(g) ** 2)
    got = silog_loss(torch.from_numpy(pred)[None].double(), torch.from_numpy(gt)[None].double(),
                     torch.from_numpy(mask)[None])
    assert float(got) == pytest.approx(expected, rel=1e-5)
    changed = pred.copy()
    changed[~mask] = 123.0  # predictions where there is no ground truth do not count
    again = silog_loss(torch.from_numpy(changed)[None], torch.from_numpy(gt)[None], torch.from_numpy(mask)[None])
    assert float(again) == pytest.approx(expected, rel=1e-4)
    # lambda = 1: fully scale-invariant
    one = silog_loss(torch.from_numpy(pred)[None].double(), torch.from_numpy(gt)[None].double(),
                     torch.from_numpy(mask)[None], variance_focus=1.0)
    scaled = silog_loss(torch.from_numpy(3 * pred)[None].double(), torch.from_numpy(gt)[None].double(),
                        torch.from_numpy(mask)[None], variance_focus=1.0)
    assert float(one) == pytest.approx(float(scaled), rel=1e-6)


def test_ssi_loss_matches_its_formula_and_is_scale_and_shift_invariant():
    rng = np.random.default_rng(4)
    pred, target = rng.uniform(0, 2, (2, 8, 9)), rng.uniform(0.1, 1, (2, 8, 9))
    mask = rng.random((2, 8, 9)) > 0.25
    total = 0.0
    for i in range(2):
        design = np.stack([pred[i][mask[i]], np.ones(mask[i].sum())], 1)
        (s, b), *_ = np.linalg.lstsq(design, target[i][mask[i]], rcond=None)
        total += np.sum((s * pred[i][mask[i]] + b - target[i][mask[i]]) ** 2)
    expected = total / (2 * mask.sum())
    loss = ssi_loss(torch.from_numpy(pred), torch.from_numpy(target), torch.from_numpy(mask))
    assert float(loss) == pytest.approx(expected, rel=1e-9)
    moved = ssi_loss(torch.from_numpy(5 * pred - 2), torch.from_numpy(target), torch.from_numpy(mask))
    assert float(moved) == pytest.approx(expected, rel=1e-9)
    assert expected > 0.01


# ------------------------------------------------------------------------------------------ DPT


def depth_recipe(**sections):
    tree = {"task": "depth", "model": {"name": "vit_tiny_patch16_224", "features": 16,
                                       "kwargs": {"img_size": 64, "patch_size": 8, "embed_dim": 32, "depth": 4,
                                                  "num_heads": 2, "mlp_ratio": 2.0}},
            "train": {"num_workers": 0}}
    for name, values in sections.items():
        tree[name] = {**tree.get(name, {}), **values}
    return build_recipe(tree)


# Each paper backbone at full depth but a narrow width (vit_large's 24 blocks of width 32, not 1024);
# the hybrid keeps timm's ResNet-50 stem and stages (the taps' 256 / 512 channels) under a narrow ViT.
BACKBONES = {
    "vit_base_patch16_384": ({"embed_dim": 32, "depth": 12, "num_heads": 2}, [2, 5, 8, 11], [12, 24, 48, 96]),
    "vit_large_patch16_384": ({"embed_dim": 32, "depth": 24, "num_heads": 2}, [5, 11, 17, 23], [16, 32, 64, 64]),
    "vit_base_r50_s16_384": ({"embed_dim": 32, "depth": 12, "num_heads": 2}, [0, 1, 8, 11], [256, 512, 32, 32]),
}


@pytest.mark.parametrize("name", BACKBONES)
def test_dpt_reassembles_four_taps_at_strides_4_to_32(name):
    kwargs, hooks, widths = BACKBONES[name]
    recipe = depth_recipe(model={"name": name, "kwargs": kwargs, "hooks": hooks, "reassemble": widths,
                                 "features": 16})
    model = build_dpt(recipe.model).eval()
    images = torch.randn(2, 3, 64, 96)  # not square, not the 384 the backbone was made for
    with torch.no_grad():
        taps = model.taps(images)
        out = model(images)
    assert [tuple(t.shape) for t in taps] == [(2, widths[0], 16, 24), (2, widths[1], 8, 12),
                                              (2, widths[2], 4, 6), (2, widths[3], 2, 3)]
    assert tuple(out.shape) == (2, 1, 64, 96)
    assert float(out.min()) > 0 and float(out.max()) < 10  # metric: max_depth * sigmoid
    if name == "vit_base_r50_s16_384":  # the first two taps are the ResNet stages, not ViT blocks
        cnn = model.backbone.patch_embed.backbone
        with torch.no_grad():
            stem = cnn.stem(images)
            stage0 = cnn.stages[0](stem)
        torch.testing.assert_close(taps[0], stage0)


def test_dpt_paper_taps_are_the_defaults_and_relative_output_is_non_negative():
    from dfx.models.dpt import PAPER_CONFIGS, default_hooks

    assert PAPER_CONFIGS["vit_large_patch16_384"]["hooks"] == [5, 11, 17, 23]
    assert default_hooks(12, False) == [2, 5, 8, 11] and default_hooks(12, True) == [0, 1, 8, 11]
    recipe = depth_recipe(model={"output": "relative"})
    model = build_dpt(recipe.model).eval()
    assert model.hooks == [0, 1, 2, 3]
    with torch.no_grad():
        assert float(model(torch.randn(1, 3, 64, 64)).min()) >= 0


def test_bad_hooks_are_a_usage_error():
    with pytest.raises(UsageError, match="model.hooks"):
        build_dpt(depth_recipe(model={"hooks": [0, 1, 2, 9]}).model)
    with pytest.raises(UsageError, match="strictly increase"):
        build_dpt(depth_recipe(model={"hooks": [0, 0, 1, 2]}).model)
    with pytest.raises(UsageError, match="'resnet18' is not a timm ViT"):
        build_dpt(depth_recipe(model={"name": "resnet18", "kwargs": {}}).model)
    with pytest.raises(UsageError, match="model.reassemble"):
        depth_recipe(model={"reassemble": [8, 16]})


# ------------------------------------------------------------------------------------------ data


def write_pairs(root, count=4, size=(24, 32), seed=0):
    """NYU-style root: rgb/<id>.png, depth/<id>.png (uint16 millimetres), train.txt / val.txt ids."""
    rng = np.random.default_rng(seed)
    (root / "rgb").mkdir(parents=True)
    (root / "depth").mkdir()
    ids = [f"s{i}" for i in range(count)]
    for sample_id in ids:
        metres = rng.uniform(0.5, 8.0, size)
        metres[0, 0] = 0  # a hole
        grey = (255 * (1 - metres / 8)).astype(np.uint8)  # brightness tells depth: learnable
        Image.fromarray(np.stack([grey] * 3, -1)).save(root / "rgb" / f"{sample_id}.png")
        Image.fromarray((metres * 1000).round().astype(np.uint16)).save(root / "depth" / f"{sample_id}.png")
    for split in ("train", "val"):
        (root / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def test_pairs_by_id_and_by_bts_style_file_list(tmp_path):
    root = write_pairs(tmp_path / "nyu")
    by_id = DepthPairs(root, "val.txt")
    image, depth = by_id.load(1)
    assert image.shape == (24, 32, 3) and depth.dtype == np.float32
    raw = np.asarray(Image.open(root / "depth" / "s1.png"))
    np.testing.assert_allclose(depth, raw / 1000.0, rtol=1e-6)
    assert depth[0, 0] == 0
    # the BTS / AdaBins list format: leading slashes under the root, a focal length after the paths
    (root / "list.txt").write_text("/rgb/s2.png /depth/s2.png 518.8579\nrgb/s3.png depth/s3.png\n")
    listed = DepthPairs(root, "list.txt")
    assert [p.name for p in listed.samples[0]] == ["s2.png", "s2.png"] and len(listed) == 2
    (root / "bad.txt").write_text("rgb/s2.png depth/nope.png\n")
    with pytest.raises(UsageError, match="nope.png is listed but missing"):
        DepthPairs(root, "bad.txt")


def test_eight_bit_depth_reads_on_the_depth_max_scale(tmp_path):
    Image.fromarray(np.array([[0, 51, 255]], dtype=np.uint8)).save(tmp_path / "d.png")
    np.testing.assert_allclose(read_depth_target(tmp_path / "d.png", DepthFormat(max_metres=10)), [[0, 2, 10]])
    Image.fromarray(np.zeros((2, 2, 3), dtype=np.uint8)).save(tmp_path / "c.png")
    with pytest.raises(UsageError, match="holds no depth"):
        read_depth_target(tmp_path / "c.png")


def test_eval_keeps_ground_truth_resolution_and_collate_pads_with_no_return(tmp_path):
    transform = DepthTransform((16, 16), training=False)
    small = transform(np.zeros((20, 30, 3), np.uint8), np.full((20, 30), 2.0, np.float32))
    large = transform(np.zeros((24, 32, 3), np.uint8), np.full((24, 32), 3.0, np.float32))
    images, depths, sizes = collate_depth([small, large])
    assert images.shape == (2, 3, 16, 16) and depths.shape == (2, 24, 32)
    assert sizes.tolist() == [[20, 30], [24, 32]]
    assert float(depths[0, 20:].abs().sum() + depths[0, :, 30:].abs().sum()) == 0
    # the evaluator scores each image at its own size: a constant model predicting 2 m is exact on
    # the first image and off by 1/3 on the second
    recipe = depth_recipe()
    evaluator = DepthEvaluator(recipe)
    evaluator.update(lambda x: torch.full((x.shape[0], 1, 16, 16), 2.0), (images, depths, sizes))
    got = DepthEvaluator.summarize([evaluator.state()])
    assert got["AbsRel"] == pytest.approx((0 + 1 / 3) / 2, rel=1e-6)


def test_training_crop_moves_image_and_depth_together():
    torch.manual_seed(0)
    image = np.zeros((40, 40, 3), np.uint8)
    image[:, 20:] = 255
    depth = np.where(np.arange(40)[None, :] < 20, 1.0, 5.0).repeat(40, 0).astype(np.float32)
    transform = DepthTransform((20, 20), training=True, scale=(0.3, 0.6), hflip=0.5)
    for _ in range(10):
        pixels, metres = transform(image, depth)
        bright = pixels[0] > 0  # normalised: white > 0, black < 0
        assert set(torch.unique(metres).tolist()) <= {1.0, 5.0}  # nearest: no invented depth
        assert bool(((metres == 5.0) == bright).float().mean() > 0.9)


# ------------------------------------------------------------------------------------------ end to end

TINY = """\
task: depth
model:
  name: vit_tiny_patch16_224
  kwargs: {{img_size: 32, patch_size: 8, embed_dim: 32, depth: 4, num_heads: 2, mlp_ratio: 2.0}}
  features: 16
data:
  root: {root}
  image_size: 32
train:
  epochs: 2
  batch_size: 4
  lr: 2.0e-3
  num_workers: 0
  log_every: 2
eval:
  batch_size: 4
"""


@pytest.mark.slow
def test_train_eval_predict_export_end_to_end(tmp_path):
    from conftest import run_dfx

    root = write_pairs(tmp_path / "pairs", count=8)
    recipe = tmp_path / "tiny-depth.yaml"
    recipe.write_text(TINY.format(root=root))
    trained = run_dfx("train", recipe, "--out", tmp_path / "run", "--json", "--quiet")
    assert trained.returncode == 0, trained.stderr
    result = json.loads(trained.stdout)
    assert set(result["metrics"]) >= {"AbsRel", "SqRel", "RMSE", "RMSE_log", "d1", "d2", "d3"}
    evaluated = run_dfx("eval", tmp_path / "run", "--json", "--quiet")
    assert evaluated.returncode == 0, evaluated.stderr
    again = json.loads(evaluated.stdout)["metrics"]
    best = result["best"]
    for key in ("AbsRel", "RMSE", "d1"):  # eval reads the best checkpoint: the same numbers
        assert again[key] == pytest.approx(best[key], rel=1e-5)

    predicted = run_dfx("predict", tmp_path / "run", root / "rgb" / "s1.png", "--out", tmp_path / "pred", "--json")
    assert predicted.returncode == 0, predicted.stderr
    summary = json.loads(predicted.stdout)
    line = json.loads((tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()[0])
    raw = np.asarray(Image.open(tmp_path / "pred" / line["depth"]))
    assert raw.dtype == np.uint16 and raw.shape == (24, 32)
    assert raw.min() / 1000 == pytest.approx(line["min_m"], abs=1e-3) and summary["images"] == 1
    picture = Image.open(tmp_path / "pred" / "images" / "s1.png")
    assert picture.size == (64, 24)  # the image and its colour-mapped depth side by side

    pytest.importorskip("onnxruntime")
    exported = run_dfx("export", tmp_path / "run", "--out", tmp_path / "model.onnx", "--json")
    assert exported.returncode == 0, exported.stderr
    check = json.loads(exported.stdout)
    assert check["outputs"] == ["depth"] and check["check"]["passed"]


@needs("rgbd-samples")
@pytest.mark.parametrize("name, guess", [("NYU", "NYU raw Kinect (.pgm)"), ("SUN", "SUN RGB-D (rotated bits, mm)"),
                                         ("TUM", "1/5000 m (TUM RGB-D)")])
def test_data_check_guesses_the_unit_of_real_depth_files(tmp_path, name, guess):
    from dfx.data_check import check_data

    suffix = {"NYU": ("ppm", "pgm"), "SUN": ("jpg", "png"), "TUM": ("png", "png")}[name]
    listing = tmp_path / "pair.txt"
    listing.write_text(f"{name}_color.{suffix[0]} {name}_depth.{suffix[1]}\n")
    report = check_data(SAMPLES, ["task=depth", f"data.train_split={listing}", f"data.val_split={listing}"],
                        progress=False)
    assert report["ok"] and report["unit"]["guess"] == guess
    assert not report["unit"]["configured_plausible"]  # the default reading is millimetres: flagged with the fix
    assert report["unit"]["fix"] in next(p["detail"] for p in report["problems"] if p["kind"] == "unit")


@needs("rgbd-samples")
def test_real_pairs_read_in_every_format(tmp_path):
    """NYU raw .pgm, SUN RGB-D's PNG and TUM's 5000-per-metre PNG, each as a one-pair list."""
    formats = {"NYU": DepthFormat("nyu-raw"), "SUN": DepthFormat("sunrgbd"), "TUM": DepthFormat("linear", 5000)}
    suffix = {"NYU": ("ppm", "pgm"), "SUN": ("jpg", "png"), "TUM": ("png", "png")}
    for name, fmt in formats.items():
        colour, depth = suffix[name]
        (tmp_path / f"{name}.txt").write_text(f"{SAMPLES}/{name}_color.{colour} {SAMPLES}/{name}_depth.{depth}\n")
        image, metres = DepthPairs(SAMPLES, str(tmp_path / f"{name}.txt"), depth=fmt).load(0)
        valid = metres[metres > 0]
        assert image.shape[:2] == metres.shape and 0.3 < np.median(valid) < 8, name


def test_inverse_output_is_dpts_affine_inverse_depth():
    recipe = depth_recipe(model={"output": "inverse", "inverse_scale": 0.000305, "inverse_shift": 0.1378})
    model = build_dpt(recipe.model).eval()
    torch.nn.init.zeros_(model.head.out.weight)
    torch.nn.init.constant_(model.head.out.bias, 1000.0)  # relu(x) = 1000 everywhere
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    torch.testing.assert_close(out, torch.full_like(out, 1 / (0.000305 * 1000 + 0.1378)))


def test_kitti_style_lines_without_ground_truth_are_left_out(tmp_path):
    root = write_pairs(tmp_path / "k", count=2)
    (root / "eigen.txt").write_text("rgb/s0.png depth/s0.png 721.5\nrgb/s1.png None 721.5\n")
    pairs = DepthPairs(root, "eigen.txt")
    assert len(pairs) == 1 and pairs.without_depth == 1


def test_data_check_reports_valid_share_range_and_unit(tmp_path):
    from dfx.data_check import check_data

    root = write_pairs(tmp_path / "mm", count=3)
    report = check_data(root, ["task=depth"], progress=False)
    assert report["ok"] and report["task"] == "depth"
    val = report["splits"]["val"]
    assert val["pairs"] == 3 and val["valid_fraction"] == pytest.approx(1 - 1 / (24 * 32), abs=1e-4)
    assert 0.5 <= val["depth_m"]["min"] and val["depth_m"]["max"] <= 8.0
    assert report["unit"]["configured_plausible"] and report["unit"]["guess"] == "millimetres"
    # the same files read as metres (scale 1): the median is thousands of metres, flagged with the fix
    report = check_data(root, ["task=depth", "data.depth_scale=1"], progress=False)
    assert not report["unit"]["configured_plausible"]
    assert any(p["kind"] == "unit" and "data.depth_scale=1000" in p["detail"] for p in report["problems"])
    (root / "depth" / "s2.png").unlink()
    report = check_data(root, ["task=depth"], progress=False)
    assert not report["ok"] and "s2" in report["problems"][0]["detail"]


def test_compare_reads_lower_is_better_metrics():
    from dfx.compare import format_metric, paired_difference, reading_line

    diff = paired_difference({0: 0.150, 1: 0.160, 2: 0.155}, {0: 0.120, 1: 0.131, 2: 0.124}, mode="min")
    assert diff["reading"] == "better" and diff["mean"] == pytest.approx(-0.03, abs=1e-9)
    assert reading_line("B", "A", diff, "AbsRel").startswith("B − A = -0.030 AbsRel [")
    assert format_metric(0.1234, "AbsRel") == "0.123" and format_metric(0.452, "AP") == "45.2"


def test_relative_model_trains_ssi_on_inverse_depth_and_metric_model_silog():
    from dfx.tasks.depth import Task

    _, gt = hand_made_pair()
    target = torch.from_numpy(gt)[None]
    prediction = torch.rand(1, 1, *gt.shape, requires_grad=True)
    images = torch.zeros(1, 3, *gt.shape)
    relative = Task(depth_recipe(model={"output": "relative"}))
    loss, _ = relative.loss(lambda x: prediction, (images, target, torch.tensor([gt.shape])))
    mask = target > 0
    inverse = torch.where(mask, 1 / target.clamp(min=1e-6), torch.zeros_like(target))
    assert float(loss.detach()) == pytest.approx(float(ssi_loss(prediction[:, 0], inverse, mask).detach()), rel=1e-6)
    loss.backward()
    assert float(prediction.grad[0, 0][~mask[0]].abs().sum()) == 0  # no gradient where there is no depth
    metric = Task(depth_recipe(train={"silog_variance_focus": 0.5, "silog_scale": 1.0}))
    loss, _ = metric.loss(lambda x: prediction.detach() + 1, (images, target, torch.tensor([gt.shape])))
    expected = silog_loss(prediction.detach()[:, 0] + 1, target, mask, variance_focus=0.5, scale=1.0)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


def test_hybrid_taps_survive_a_deep_copy():
    """EMA deep-copies the model: the copy's hooks must fill the copy's taps, not the original's."""
    import copy

    kwargs, hooks, widths = BACKBONES["vit_base_r50_s16_384"]
    recipe = depth_recipe(model={"name": "vit_base_r50_s16_384", "kwargs": {**kwargs, "depth": 2}, "hooks": [0, 1, 0, 1],
                                 "reassemble": widths, "features": 8})
    model = build_dpt(recipe.model).eval()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
        images = torch.randn(1, 3, 32, 32)
        a, b = model(images), twin(images)
    assert a.shape == b.shape == (1, 1, 32, 32) and not torch.allclose(a, b)
    stage = model.backbone.patch_embed.backbone.stages[0]
    assert "dpt_output" not in stage.__dict__  # taken, not kept alive between calls

"""The translation task: PSNR / SSIM / L1 / FID / KID against direct computations and known values, the
generator's shapes for M = 2, 3 and every strategy, the GAN loss's gradient separation, the embedded
set's modalities against their formulas, the data folder, and a one-epoch dfx fuse run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dfx.data.shapes_translation import generate_shapes_translation, shading_of, sobel_magnitude
from dfx.data.translation import TranslationFolder, TranslationTransform
from dfx.data.translation_eval import (TranslationMetrics, frechet_distance, gaussian_window,
                                       kernel_inception_distance, psnr, ssim)
from dfx.errors import RunError, UsageError
from dfx.fusion.mit import MultiModalMiT
from dfx.fusion.strategies import FUSIONS
from dfx.fusion.translation import TranslationGenerator
from dfx.recipe import build_recipe, load_recipe

TINY = {"embed_dims": [8, 16, 24, 32], "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4]}


# ------------------------------------------------------------------------------------------ metrics


def numpy_ssim(x: np.ndarray, y: np.ndarray, window: int = 11, sigma: float = 1.5) -> float:
    """SSIM written out window by window: [C, H, W] images on [0, 1], Gaussian weights, valid positions."""
    t = np.arange(window) - (window - 1) / 2
    g = np.exp(-t ** 2 / (2 * sigma ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    values = []
    for a, b in zip(x, y):
        for i in range(a.shape[0] - window + 1):
            for j in range(a.shape[1] - window + 1):
                pa, pb = a[i:i + window, j:j + window], b[i:i + window, j:j + window]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
                cov = (w * (pa - ma) * (pb - mb)).sum()
                values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_ssim_matches_a_window_by_window_computation():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (2, 3, 18, 21))
    y = np.clip(x + rng.normal(0, 0.15, x.shape), 0, 1)
    y[1, :, :8] = 0.2  # a flat region in the second image
    got = ssim(torch.from_numpy(x), torch.from_numpy(y))
    expected = [numpy_ssim(x[k], y[k]) for k in range(2)]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)
    assert 0.2 < expected[0] < 0.95


def test_ssim_known_values():
    x = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    assert float(ssim(x, x)[0]) == pytest.approx(1.0, abs=1e-12)
    a, b = 0.3, 0.7  # constant images: no variance, SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    c1 = 0.01 ** 2
    got = ssim(torch.full((1, 1, 12, 12), a, dtype=torch.float64), torch.full((1, 1, 12, 12), b, dtype=torch.float64))
    assert float(got[0]) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)
    assert float(gaussian_window().sum()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 1, 8, 40), torch.zeros(1, 1, 8, 40))


def test_psnr_matches_numpy_and_caps_exact_copies():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (3, 3, 10, 12))
    y = np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1)
    expected = [10 * math.log10(1 / np.mean((x[k] - y[k]) ** 2)) for k in range(3)]
    np.testing.assert_allclose(psnr(torch.from_numpy(x), torch.from_numpy(y)).numpy(), expected, rtol=1e-10)
    assert float(psnr(torch.from_numpy(x), torch.from_numpy(x))[0]) == 100.0
    # a constant error of 0.1 on [0, 1]: exactly 20 dB
    assert float(psnr(torch.full((1, 3, 4, 4), 0.5), torch.full((1, 3, 4, 4), 0.6))[0]) == pytest.approx(20.0)


def test_translation_metrics_on_the_tasks_scale_and_merged_states():
    rng = np.random.default_rng(2)
    pred = rng.uniform(-1.2, 1.2, (4, 3, 16, 16))  # beyond [-1, 1]: clipped for PSNR / SSIM, not for L1
    target = rng.uniform(-1, 1, (4, 3, 16, 16))
    whole, parts = TranslationMetrics(), [TranslationMetrics(), TranslationMetrics()]
    whole.add(torch.from_numpy(pred), torch.from_numpy(target))
    parts[0].add(torch.from_numpy(pred[:1]), torch.from_numpy(target[:1]))
    parts[1].add(torch.from_numpy(pred[1:]), torch.from_numpy(target[1:]))
    summary = TranslationMetrics.summarize([whole.state()])
    merged = TranslationMetrics.summarize([p.state() for p in parts])
    unit_p, unit_t = np.clip((pred + 1) / 2, 0, 1), (target + 1) / 2
    assert summary["L1"] == pytest.approx(np.abs(pred - target).mean(), rel=1e-12)
    assert summary["PSNR"] == pytest.approx(np.mean([10 * math.log10(1 / np.mean((unit_p[k] - unit_t[k]) ** 2))
                                                     for k in range(4)]), rel=1e-10)
    assert summary["SSIM"] == pytest.approx(np.mean([numpy_ssim(unit_p[k], unit_t[k]) for k in range(4)]), abs=1e-6)
    for key in summary:
        assert merged[key] == pytest.approx(summary[key], rel=1e-12)


def test_frechet_distance_of_diagonal_gaussians_and_itself():
    rng = np.random.default_rng(3)
    a = rng.normal(0, 1, (400, 3)) * [1.0, 2.0, 0.5] + [0.0, 1.0, -1.0]
    b = rng.normal(0, 1, (300, 3)) * [1.5, 1.0, 0.5] + [0.5, 1.0, 0.0]
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # with both sample covariances made exactly diagonal: |mu_a - mu_b|^2 + sum (sqrt(va) - sqrt(vb))^2
    a = (a - a.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(a, rowvar=False))).T * [1.0, 2.0, 0.5] + [0, 1, -1]
    b = (b - b.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(b, rowvar=False))).T * [1.5, 1.0, 0.5] + [.5, 1, 0]
    expected = 0.5 ** 2 + 1.0 ** 2 + (1.0 - 1.5) ** 2 + (2.0 - 1.0) ** 2 + 0.0
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_kid_matches_the_unbiased_mmd_written_out():
    rng = np.random.default_rng(4)
    a, b = rng.normal(0, 1, (12, 5)), rng.normal(0.4, 1, (10, 5))
    k = lambda u, v: (u @ v / 5 + 1) ** 3  # noqa: E731
    # subsets of all ten vectors of each set are permutations: the statistic itself, whatever the draw
    kid = kernel_inception_distance(a[:10], b, subsets=3, subset_size=10)
    xx = sum(k(a[i], a[j]) for i in range(10) for j in range(10) if i != j) / 90
    yy = sum(k(b[i], b[j]) for i in range(10) for j in range(10) if i != j) / 90
    xy = sum(k(a[i], b[j]) for i in range(10) for j in range(10)) / 100
    assert kid == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    far = kernel_inception_distance(a, b + 3.0, subsets=5, subset_size=8)
    assert far > 10 * abs(kid)  # a shifted set is far away


# ------------------------------------------------------------------------------------------ generator


@pytest.mark.parametrize("modalities", [2, 3])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_generator_shapes_for_every_strategy(modalities, fusion):
    torch.manual_seed(0)
    generator = TranslationGenerator(MultiModalMiT("b0", modalities, fusion, **TINY)).eval()
    images = torch.randn(2, modalities, 3, 64, 64)
    out = generator(images, streams=True)
    streams = 1 if fusion in ("none", "concat") else 2
    assert len(out["streams"]) == streams
    for image in (*out["streams"], out["ensemble"]):
        assert image.shape == (2, 3, 64, 64)
        assert image.abs().max() <= 1.0
    weights = generator.alpha.softmax(0)
    expected = sum(w * s for w, s in zip(weights, out["streams"]))
    torch.testing.assert_close(out["ensemble"], expected)
    torch.testing.assert_close(generator(list(images.unbind(1))), out if streams == 1 else generator(images, True))
    assert generator(torch.randn(1, modalities, 3, 40, 72)).shape == (1, 3, 40, 72)  # not a multiple of 32


def tiny_translation_recipe(root, gan: bool, fusion: str = "gemini", modalities=("reshading", "edge_texture")):
    return build_recipe({
        "task": "translation",
        "model": {"fusion": fusion, **TINY, "decoder_depths": [1, 1, 1], "gan": gan, "drop_path_rate": 0.0},
        "data": {"root": str(root), "modalities": list(modalities), "image_size": 32},
        "train": {"epochs": 1, "batch_size": 4, "lr": 1e-3, "warmup_epochs": 0, "num_workers": 0, "log_every": 1},
        "eval": {"batch_size": 4}})


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes-translation")
    generate_shapes_translation(root, train_images=8, val_images=4, size=32)
    return root


def test_gan_loss_keeps_the_two_objectives_apart(tiny_set):
    from dfx.tasks.translation import Task, bce

    torch.manual_seed(0)
    task = Task(tiny_translation_recipe(tiny_set, gan=True))
    model = task.build_model()
    inputs, target = torch.utils.data.default_collate([task.dataset("val")[i] for i in range(2)])
    loss, logs = task.loss(model, (inputs, target))
    loss.backward()
    d_grads = {n: p.grad.clone() for n, p in model.discriminator.named_parameters()}
    g_grads = {n: p.grad.clone() for n, p in model.generator.named_parameters() if p.grad is not None}
    model.zero_grad()
    # the discriminator learns from its own loss only (on the same generated images)
    with torch.no_grad():
        fakes = model(inputs, streams=True)["streams"]
    d = model.discriminator
    d_loss = sum(0.5 * (bce(d(inputs[:, s], target), True) + bce(d(inputs[:, s], fake), False))
                 for s, fake in enumerate(fakes))
    d_loss.backward()
    for name, p in d.named_parameters():
        torch.testing.assert_close(d_grads[name], p.grad, rtol=1e-5, atol=1e-8)
    # the generator learns from 100 x L1 + its adversarial term, never from the discriminator's loss
    model.zero_grad()
    out = model(inputs, streams=True)
    m = task.recipe.model
    g_loss = m.l1_weight * sum(torch.nn.functional.l1_loss(x, target) for x in [*out["streams"], out["ensemble"]])
    g_loss = g_loss + sum(bce(d(inputs[:, s], x), True) for s, x in enumerate(out["streams"]))
    g_loss.backward()
    for name, p in model.generator.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(g_grads[name], p.grad, rtol=1e-4, atol=1e-7)
    assert logs["d"] == pytest.approx(float(d_loss.detach()), rel=1e-5)


# ------------------------------------------------------------------------------------------ data


def test_shading_and_edges_against_their_formulas():
    xx = np.arange(20, dtype=np.float64)[None].repeat(10, 0)
    plane = 0.5 * xx  # dz/dx = 0.5: normal (-0.5, 0, 1) / |.|
    light = np.array([0.0, 0.0, 1.0])
    expected = 0.15 + 0.85 * (1 / math.sqrt(1.25))
    np.testing.assert_allclose(shading_of(plane, light), expected)
    lit_from_left = shading_of(plane, np.array([-1.0, 0.0, 0.0]))  # the plane faces -x: n . l = 0.5 / |n|
    np.testing.assert_allclose(lit_from_left, 0.15 + 0.85 * 0.5 / math.sqrt(1.25))
    step = np.zeros((6, 8))
    step[:, 4:] = 10.0
    edges = sobel_magnitude(step)
    np.testing.assert_allclose(edges[:, 3], 40.0)  # 10 x (1 + 2 + 1)
    np.testing.assert_allclose(edges[:, 4], 40.0)
    assert edges[:, :3].max() == 0 and edges[:, 5:].max() == 0


def test_translation_folder_and_transform(tiny_set):
    transform = TranslationTransform((32, 32), training=True)
    data = TranslationFolder(tiny_set, "train", ["reshading", "edge_texture", "depth_zbuffer"], target="rgb",
                             transform=transform)
    assert len(data) == 8
    inputs, target = data[0]
    assert inputs.shape == (3, 3, 32, 32) and target.shape == (3, 32, 32)
    assert inputs.min() >= -1 and target.max() <= 1
    raw_inputs, raw_target = data.load(0)
    # reshading is grey (three equal channels) and the target is that shading times an albedo
    assert np.array_equal(raw_inputs[0][..., 0], raw_inputs[0][..., 1])
    assert raw_target.std() > 5
    with pytest.raises(UsageError, match="data.target: 'photo'"):
        TranslationFolder(tiny_set, "train", ["reshading"], target="photo")
    with pytest.raises(UsageError, match="must not be an input"):
        TranslationFolder(tiny_set, "train", ["rgb", "reshading"], target="rgb")


def test_recipes_load_and_bad_values_are_named(tmp_path):
    quick = load_recipe("recipes/translation-shapes.yaml")
    assert quick.task == "translation" and quick.eval.metric == "L1" and quick.eval.mode == "min"
    paper = load_recipe("recipes/tokenfusion-taskonomy.yaml")
    assert paper.model.gan and paper.model.l1_weight == 100.0
    assert paper.data.modalities == ["reshading", "edge_texture"] and paper.data.target == "rgb"
    with pytest.raises(UsageError, match="data.target 'rgb' is also an input"):
        load_recipe("recipes/translation-shapes.yaml", ["data.modalities=[rgb,reshading]"])
    with pytest.raises(UsageError, match="decoder_depths"):
        load_recipe("recipes/translation-shapes.yaml", ["model.decoder_depths=[1,1]"])
    with pytest.raises(UsageError, match="fuses two or more modalities"):
        load_recipe("recipes/translation-shapes.yaml", ["data.modalities=[reshading]"])


@pytest.mark.slow
def test_one_epoch_fuse_run_reports_the_translation_metrics(tiny_set, tmp_path):
    from conftest import run_dfx

    result = run_dfx("fuse", "recipes/translation-shapes.yaml", f"data.root={tiny_set}", "data.image_size=32",
                     "train.epochs=1", "train.batch_size=4", "train.num_workers=0", "eval.batch_size=4",
                     "model.embed_dims=[8,16,24,32]", "model.num_heads=[1,2,2,4]", "model.gan=true",
                     "--out", str(tmp_path / "run"), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    metrics = report["metrics"]
    for key in ("L1", "PSNR", "SSIM", "L1/reshading", "L1/edge_texture"):
        assert math.isfinite(metrics[key])
    assert 0 < metrics["L1"] < 2 and -1 <= metrics["SSIM"] <= 1 and report["fusion"] == "gemini"
    # dfx predict: the translated image at the input's size, inputs and output side by side
    val = tiny_set / "reshading" / "val-00000.png"
    predicted = run_dfx("predict", tmp_path / "run", val, "--modality",
                        f"edge_texture={tiny_set / 'edge_texture' / 'val-00000.png'}", "--out", tmp_path / "pred",
                        "--json")
    assert predicted.returncode == 0, predicted.stderr
    line = json.loads((tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()[0])
    assert line["translation"] == "translations/val-00000.png"
    from PIL import Image

    assert Image.open(tmp_path / "pred" / line["translation"]).size == (32, 32)
    assert Image.open(tmp_path / "pred" / "images" / "val-00000.png").size == (3 * 32, 32)
    pytest.importorskip("onnxruntime")
    exported = run_dfx("export", tmp_path / "run", "--out", tmp_path / "model.onnx", "--json")
    assert exported.returncode == 0, exported.stderr
    check = json.loads(exported.stdout)
    assert check["outputs"] == ["image"] and check["check"]["passed"]
    assert list(check["inputs"]) == ["reshading", "edge_texture"]


def test_fid_and_kid_of_the_ensemble_against_the_targets(tiny_set):
    from dfx.tasks.translation import Task, TranslationEvaluator

    torch.manual_seed(0)
    task = Task(tiny_translation_recipe(tiny_set, gan=False))
    model = task.build_model().eval()
    features = lambda images: images.double().mean((2, 3))  # noqa: E731  (per-channel means: 3-d features)
    data = task.dataset("val")
    batches = [torch.utils.data.default_collate([data[i] for i in range(j, j + 2)]) for j in (0, 2)]
    evaluators = [TranslationEvaluator(["reshading", "edge_texture"], features=features, kid_subset_size=4)
                  for _ in batches]
    for evaluator, batch in zip(evaluators, batches):  # two ranks, one batch each
        evaluator.update(model, batch)
    metrics = TranslationEvaluator.summarize([e.state() for e in evaluators])
    with torch.no_grad():
        fake = torch.cat([features(model(inputs)) for inputs, _ in batches]).numpy()
    real = torch.cat([features(target) for _, target in batches]).numpy()
    assert metrics["FID"] == pytest.approx(frechet_distance(fake, real), rel=1e-9)
    assert metrics["KID_x100"] == pytest.approx(100 * kernel_inception_distance(fake, real, subset_size=4), rel=1e-9)
    assert metrics["FID"] > 0


def test_fid_without_inception_weights_fails_before_training(tiny_set, tmp_path, monkeypatch):
    import time

    from dfx.tasks.translation import Task

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    recipe = build_recipe({**tiny_translation_recipe(tiny_set, gan=False).to_dict(), "eval": {"fid": True}})
    start = time.perf_counter()
    with pytest.raises(RunError, match=r"eval.fid needs Inception-v3 weights .*HF_HUB_OFFLINE is set; fixes: "):
        Task(recipe).build_model()
    assert time.perf_counter() - start < 10

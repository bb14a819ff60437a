"""``dfx cluster``: what token clustering changes on a real model, on real data.

    report = cluster_report("runs/segmentation/segmenter-shapes", cluster_ratio=0.5)

The model is a dfx run (a timm ViT classifier, or a Segmenter whose backbone is clustered) or a
timm model name (random weights). It runs with and without `hourglass` on images from the data:
feature fidelity and assignment sharpness (dfx.cluster.analysis); for a dfx run, the task's
validation metric with and without; GFLOPs, latency (side by side) and the speed-up (dfx.measure).
"""

from __future__ import annotations

import logging
import statistics
from numbers import Real
from pathlib import Path

import torch

from dfx.cluster.analysis import (AUTO_SHARPNESS, DEFAULTS, assignment_sharpness, clustered_copy, clustering_settings,
                                  feature_fidelity, vit_of)
from dfx.errors import UsageError
from dfx.measure import compare_latency, count_flops
from dfx.models import build, build_any
from torch import nn


def check_cluster_ratio(cluster_ratio) -> float:
    """cluster_ratio as a float; UsageError unless it is a number in (0, 1]."""
    if isinstance(cluster_ratio, bool) or not isinstance(cluster_ratio, Real) or not 0 < cluster_ratio <= 1:
        raise UsageError(f"--cluster-ratio: the share of patch tokens kept must be a number in (0, 1], "
                         f"got {cluster_ratio!r}")
    return float(cluster_ratio)


def wrap_model(model: nn.Module, cluster_ratio: float, alpha: int | None = None, image_size: int | None = None,
               **settings) -> nn.Module:
    """:func:`dfx.cluster.analysis.clustered_copy`, its ValueErrors as UsageErrors (same message)."""
    try:
        return clustered_copy(model, cluster_ratio, alpha, image_size, **settings)
    except ValueError as e:
        raise UsageError(f"cannot cluster {type(vit_of(model)).__name__}: {e}") from None


logger = logging.getLogger(__name__)


def cluster_report(model: str, cluster_ratio: float = 0.5, alpha: int | None = None, data: str | None = None,
                   images: int = 8, batch: int = 1, warmup: int = 2, repeats: int = 10, device: str = "auto",
                   iters: int = 5, temperature: float | str = 0.02, window: int = 5, k: int = 20,
                   metric: bool = True, progress: bool = False) -> dict:
    """Run ``model`` with and without token clustering; see the module docstring.

    model: a dfx run directory or checkpoint (trained weights, its task's data and metric), or a
    timm model name or alias (random weights). data: a data root or embedded dataset name; default
    the run's own validation data, or ``shapes-seg`` resized to the model's input size for a timm
    name. images: how many validation images the fidelity is measured on; batch: the batch of the
    latency measurement. metric: also evaluate the task metric over the whole validation split
    (dfx runs only). progress: bars over the latency rounds and the validation batches (stderr).
    temperature: a number, or ``"auto"`` to calibrate it to the model's feature scale
    on the fidelity images (``AUTO_SHARPNESS`` / median squared token-to-centre distance at alpha).

    Returns {"model", "weights", "image_size", "grid", "clustered_grid", "settings", "fidelity", "assignment",
    "baseline": {"latency_ms", "gflops", [metric]}, "clustered": {...}, "speedup", "flops_ratio",
    ["metric", "metric_drop"]}; metric_drop is (baseline - clustered) in points (x100).
    """
    from dfx.engine import distributed as D

    cluster_ratio = check_cluster_ratio(cluster_ratio)
    for name, value, minimum in (("--images", images, 1), ("--batch", batch, 1), ("--repeats", repeats, 1),
                                 ("--warmup", warmup, 0)):
        if value < minimum:
            raise UsageError(f"{name} must be >= {minimum}, got {value}")
    dev = D.resolve_device(device)
    base, description, task, recipe, dataset = _load(model, data, dev)
    size = dataset[0][0].shape[-1]
    auto = temperature == "auto"
    if not auto and (isinstance(temperature, bool) or not isinstance(temperature, Real) or temperature < 0):
        raise UsageError(f"--temperature must be a number >= 0 or 'auto', got {temperature!r}")
    settings = dict(image_size=size, iters=iters, window=window, k=k)
    clustered = wrap_model(base, cluster_ratio, alpha, temperature=DEFAULTS["temperature"] if auto else temperature,
                           **settings)
    vit = vit_of(clustered)
    grid = tuple(vit.patch_embed.dynamic_feat_size((size, size)))
    sample = torch.stack([dataset[i][0] for i in range(min(images, len(dataset)))]).to(dev)
    if auto:  # the distance at block alpha does not depend on the temperature
        distance = assignment_sharpness(clustered, sample)["distance"]
        temperature = AUTO_SHARPNESS / max(distance, 1e-12)
        clustered = wrap_model(base, cluster_ratio, alpha, temperature=temperature, **settings)
        vit = vit_of(clustered)
        logger.info(f"dfx: temperature auto: {temperature:.4g} (= {AUTO_SHARPNESS} / median squared token-centre "
                    f"distance {distance:.4g} at block {vit.hourglass_config.alpha})")

    small_grid = vit.clustered_grid(grid)
    logger.info(f"dfx: {description}: {grid[0]}x{grid[1]} patch tokens -> {small_grid[0]}x{small_grid[1]} clusters; "
                f"fidelity on {len(sample)} images")
    report = {"model": description, "weights": "trained" if task is not None else "random", "image_size": size,
              "grid": list(grid), "clustered_grid": list(small_grid),
              "settings": {**clustering_settings(clustered), "temperature_mode": "auto" if auto else "fixed"},
              "fidelity": feature_fidelity(base, clustered, sample),
              "assignment": assignment_sharpness(clustered, sample)}
    distance, sharpness = report["assignment"]["distance"], report["assignment"]["sharpness"]
    if sharpness < 0.1 and not auto:
        logger.warning(f"dfx: warning: temperature {temperature} x squared token-centre distance {distance:.3g} = "
                       f"{sharpness:.2g}: soft assignments are nearly uniform for this model's feature scale and "
                       f"clustering blurs the features; try --temperature auto (here {AUTO_SHARPNESS / distance:.2g})")
    models = {"baseline": base, "clustered": clustered}
    from dfx.engine.progress import track

    times = compare_latency(models, sample[:1].repeat(batch, 1, 1, 1), warmup, repeats,
                            rounds=lambda it: track(it, repeats, "timing", enabled=progress))
    for name, net in models.items():
        report[name] = {"latency_ms": statistics.median(times[name]) * 1e3,
                        "gflops": count_flops(net, sample[:1]) / 1e9}
    report["speedup"] = report["baseline"]["latency_ms"] / report["clustered"]["latency_ms"]
    report["flops_ratio"] = report["baseline"]["gflops"] / report["clustered"]["gflops"]
    if task is not None and metric:
        from dfx.engine.trainer import evaluate, make_loader

        key = recipe.eval.metric
        ctx = D.Context(device=dev)
        loader = make_loader(dataset, recipe.eval.batch_size, ctx, shuffle=False, seed=0, num_workers=0,
                             collate_fn=task.collate_fn)
        for name, net in models.items():
            logger.info(f"dfx: {key} of the {name} model on {len(dataset)} validation images")
            report[name][key] = evaluate(task, net, loader, ctx, progress=progress)[key]
        report["metric"] = key
        report["metric_drop"] = (report["baseline"][key] - report["clustered"][key]) * 100
    report.update({"device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
                   "threads": torch.get_num_threads(), "batch": batch, "warmup": warmup, "repeats": repeats})
    return report


def _load(spec: str, data: str | None, device: torch.device):
    """(model in eval mode, description, task or None, recipe or None, validation dataset)."""
    path = Path(spec)
    if path.is_dir() or path.suffix == ".safetensors":
        recipe, task, model, _ = build(path, [f"data.root={data}"] if data else [], read_data=True)
        model = model.to(device)
        return model, f"{recipe.model.name} ({path})", task, recipe, task.dataset("val")
    from dfx.data.segmentation import SegmentationFolder, SegmentationTransform
    from dfx.tasks.classification import data_root

    with torch.random.fork_rng(devices=[]):  # random weights, the same on every call
        torch.manual_seed(0)
        model, description, size = build_any(spec, device)
    root = data_root(data or "shapes-seg")
    if not (root / "classes.txt").is_file():
        raise UsageError(f"--data {data}: expected a segmentation root (classes.txt, val.txt, images/, labels/) "
                         "or an embedded dataset name (shapes-seg) for a timm model")
    dataset = SegmentationFolder(root, "val", SegmentationTransform(size or 224, training=False))
    return model, f"{description} (random weights)", None, None, dataset

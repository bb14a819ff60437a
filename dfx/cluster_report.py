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
from dfx.cluster.swin import is_swin
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


# Every metric of a task reported side by side (those the evaluator returns), and which way is better.
TASK_METRICS = {"segmentation": ("mIoU", "pixel_acc"), "depth": ("AbsRel", "RMSE", "d1"),
                "detection": ("AP", "AP50", "segm/AP", "PQ"), "classification": ("top1",)}
LOWER_IS_BETTER = {"AbsRel", "SqRel", "RMSE", "RMSE_log", "loss"}


def parse_clusters(text: str | None) -> tuple[int, int] | None:
    """``--clusters HxW`` (or one number N for NxN) -> (h, w); UsageError naming the value otherwise."""
    if text is None:
        return None
    parts = text.lower().replace("×", "x").split("x")
    try:
        h, w = (int(parts[0]), int(parts[0])) if len(parts) == 1 else tuple(int(p) for p in parts)
    except ValueError:
        h = w = 0
    if len(parts) > 2 or h < 1 or w < 1:
        raise UsageError(f"--clusters: expected HxW with two positive integers (e.g. 16x16), got {text!r}")
    return h, w


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
                   metric: bool = True, progress: bool = False, clusters: tuple[int, int] | None = None) -> dict:
    """Run ``model`` with and without token clustering; see the module docstring.

    model: a dfx run directory or checkpoint (trained weights, its task's data and metric), or a
    timm model name or alias (random weights). data: a data root or embedded dataset name; default
    the run's own validation data, or ``shapes-seg`` resized to the model's input size for a timm
    name. images: how many validation images the fidelity is measured on; batch: the batch of the
    latency measurement. metric: also evaluate the task metric over the whole validation split
    (dfx runs only). progress: bars over the latency rounds and the validation batches (stderr).
    temperature: a number, or ``"auto"`` to calibrate it to the model's feature scale
    on the fidelity images (``AUTO_SHARPNESS`` / median squared token-to-centre distance at alpha).

    clusters: a fixed (h, w) grid of centres in place of cluster_ratio (for a Swin: s x s per window).

    Returns {"model", "weights", "image_size", "grid", "clustered_grid", "settings", "fidelity", "assignment",
    "baseline": {"latency_ms", "gflops", "backbone": {"latency_ms", "gflops"}, [metrics]}, "clustered": {...},
    "speedup", "flops_ratio", "backbone_speedup", "backbone_flops_ratio", ["metric", "metric_drop",
    "metric_drops"]}: whole model and backbone alone (the clustered ViT or Swin, for a Segmenter, DPT or
    detector). metric_drop is how much worse the clustered model is on the run's ``eval.metric``, in
    points (x100; positive = worse, whichever way the metric is better); metric_drops the same for
    every metric of the task that the evaluator reports (TASK_METRICS; RMSE in centimetres).
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
    settings = dict(image_size=size, iters=iters, window=window, k=k,
                    **({"clusters": clusters} if clusters is not None else {}))
    clustered = wrap_model(base, cluster_ratio, alpha, temperature=DEFAULTS["temperature"] if auto else temperature,
                           **settings)
    vit = vit_of(clustered)
    sample = torch.stack([dataset[i][0] for i in range(min(images, len(dataset)))]).to(dev)
    if auto:  # the distance at block alpha does not depend on the temperature
        distance = assignment_sharpness(clustered, sample)["distance"]
        temperature = AUTO_SHARPNESS / max(distance, 1e-12)
        clustered = wrap_model(base, cluster_ratio, alpha, temperature=temperature, **settings)
        vit = vit_of(clustered)
        logger.info(f"dfx: temperature auto: {temperature:.4g} (= {AUTO_SHARPNESS} / median squared token-centre "
                    f"distance {distance:.4g} at block {vit.hourglass_config.alpha})")

    if is_swin(vit):  # the clustered stage's map, and its clustered map (whole windows)
        with torch.no_grad():
            grid = tuple(vit.stage_input(sample[:1]).shape[1:3])
    else:
        grid = tuple(vit.patch_embed.dynamic_feat_size((size, size)))
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
    backbones = {name: BackboneOnly(net) for name, net in models.items()}
    backbone_times = compare_latency(backbones, sample[:1].repeat(batch, 1, 1, 1), warmup, repeats)
    for name, net in models.items():
        report[name] = {"latency_ms": statistics.median(times[name]) * 1e3,
                        "gflops": count_flops(net, sample[:1]) / 1e9,
                        "backbone": {"latency_ms": statistics.median(backbone_times[name]) * 1e3,
                                     "gflops": count_flops(backbones[name], sample[:1]) / 1e9}}
    report["speedup"] = report["baseline"]["latency_ms"] / report["clustered"]["latency_ms"]
    report["flops_ratio"] = report["baseline"]["gflops"] / report["clustered"]["gflops"]
    report["backbone_speedup"] = report["baseline"]["backbone"]["latency_ms"] / report["clustered"]["backbone"][
        "latency_ms"]
    report["backbone_flops_ratio"] = report["baseline"]["backbone"]["gflops"] / report["clustered"]["backbone"][
        "gflops"]
    if task is not None and metric:
        from dfx.engine.trainer import evaluate, make_loader

        key = recipe.eval.metric
        ctx = D.Context(device=dev)
        loader = make_loader(dataset, recipe.eval.batch_size, ctx, shuffle=False, seed=0, num_workers=0,
                             collate_fn=task.collate_fn)
        keys = [key, *(name for name in TASK_METRICS.get(recipe.task, ()) if name != key)]
        for name, net in models.items():
            logger.info(f"dfx: {key} of the {name} model on {len(dataset)} validation images")
            metrics = evaluate(task, net, loader, ctx, progress=progress)
            report[name].update({k: float(metrics[k]) for k in keys if k in metrics})
        report["metric"] = key
        lower = recipe.eval.mode == "min"
        worse_up = {k: (k == key and lower) or (k != key and k in LOWER_IS_BETTER) for k in keys}
        report["metric_drops"] = {k: (report["clustered"][k] - report["baseline"][k]) * 100 * (1 if worse_up[k] else -1)
                                  for k in keys if k in report["clustered"]}
        report["metric_drop"] = report["metric_drops"][key]
    report.update({"device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
                   "threads": torch.get_num_threads(), "batch": batch, "warmup": warmup, "repeats": repeats})
    return report


class BackboneOnly(nn.Module):
    """The part of a model that clustering changes, run alone on images: a Segmenter's or DPT's ViT
    (a DPT's taps, ``forward_intermediates`` as the DPT calls it), a detector's Swin body, or the
    timm model itself."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images):
        vit = vit_of(self.model)
        hooks = getattr(self.model, "hooks", None)
        if hooks is not None and hasattr(vit, "forward_intermediates") and hasattr(self.model, "taps"):
            vit_hooks = hooks[2:] if getattr(self.model, "hybrid", False) else hooks
            return vit.forward_intermediates(images, indices=vit_hooks, return_prefix_tokens=True, norm=False,
                                             output_fmt="NCHW", intermediates_only=True)
        if is_swin(vit) and not hasattr(vit, "return_layers"):
            return vit.forward_features(images)
        return vit(images) if is_swin(vit) else vit.forward_features(images)


def _load(spec: str, data: str | None, device: torch.device):
    """(model in eval mode, description, task or None, recipe or None, validation dataset)."""
    path = Path(spec)
    if path.is_dir() or path.suffix == ".safetensors":
        recipe, task, model, _ = build(path, [f"data.root={data}"] if data else [], read_data=True)
        model = model.to(device).eval()
        name = getattr(recipe.model, "name", None) or getattr(recipe.model, "backbone", "model")
        return model, f"{name} ({path})", task, recipe, task.dataset("val")
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

"""What token clustering changes on a real model: feature fidelity, task metric, FLOPs and latency.

    report = cluster_report("runs/segmentation/segmenter-shapes", cluster_ratio=0.5)

The model is a dfx run (a timm ViT classifier, or a Segmenter whose backbone is clustered) or a
timm model name (random weights). It runs with and without `hourglass` on images from the data:

- fidelity: cosine similarity between the dense features (final normed patch tokens [B, H*W, C])
  of the clustered model, which are reconstructed, and those of the unclustered one; mean and
  minimum over every token of the images;
- metric: for a dfx run, the task's validation metric (mIoU for segmentation) with and without;
- GFLOPs (dfx.bench.count_flops), latency (alternating passes after warm-up) and the speed-up;
- assignment sharpness: temperature × the typical squared token-to-centre distance at block alpha,
  which says whether the temperature suits the model's feature scale (see `assignment_sharpness`).

Also here: `clustering_overhead`, the time a clustered forward pass spends in `token_clustering` and
`token_reconstruction`, measured on the very tensors that pass hands them.
"""

from __future__ import annotations

import statistics
import sys
import time
from numbers import Real
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfx.cluster.tokens import token_clustering, token_reconstruction
from dfx.cluster.wrapper import hourglass
from dfx.errors import UsageError

# Default clustering settings (`hourglass`'s defaults), reported with every measurement.
DEFAULTS = dict(iters=5, temperature=0.02, window=5, k=20)

# `temperature="auto"` picks temperature = AUTO_SHARPNESS / D, D the median squared distance of a
# token to its nearest initial centre at block alpha: the nearest centre then outweighs one at twice
# that squared distance by e^2 (about 7x). Measured on the segmenter-shapes run (ratio 0.5): sharpness
# 0.34 / 0.67 / 1.0 / 1.7 / 3.4 cost 1.84 / 1.05 / 0.91 / 0.76 / 0.77 mIoU points (docs/cluster.md).
AUTO_SHARPNESS = 2.0


def check_cluster_ratio(cluster_ratio) -> float:
    """cluster_ratio as a float; UsageError unless it is a number in (0, 1]."""
    if isinstance(cluster_ratio, bool) or not isinstance(cluster_ratio, Real) or not 0 < cluster_ratio <= 1:
        raise UsageError(f"--cluster-ratio: the share of patch tokens kept must be a number in (0, 1], "
                         f"got {cluster_ratio!r}")
    return float(cluster_ratio)


def vit_of(model: nn.Module) -> nn.Module:
    """The ViT whose tokens are clustered: a Segmenter's backbone, else the model itself."""
    from dfx.tasks.segmentation import Segmenter

    return model.backbone if isinstance(model, Segmenter) else model


def wrap_model(model: nn.Module, cluster_ratio: float, alpha: int | None = None, image_size: int | None = None,
               **settings) -> nn.Module:
    """`model` with its ViT run through `hourglass` (weights shared, `model` unchanged).

    Any ValueError of `hourglass` (ratio, alpha beyond the depth, a model that is no ViT, a window
    larger than the clustered grid at ``image_size``) becomes a UsageError with the same message.
    """
    from dfx.tasks.segmentation import Segmenter

    try:
        clustered_vit = hourglass(vit_of(model), cluster_ratio=cluster_ratio, alpha=alpha, **settings)
        if image_size is not None:  # dynamic-size models check their grid only at a forward pass
            clustered_vit.clustered_grid(tuple(clustered_vit.patch_embed.dynamic_feat_size((image_size, image_size))))
    except ValueError as e:
        raise UsageError(f"cannot cluster {type(vit_of(model)).__name__}: {e}") from None
    return Segmenter(clustered_vit, model.head) if isinstance(model, Segmenter) else clustered_vit


def dense_features(model: nn.Module, images: Tensor) -> Tensor:
    """Final normed patch tokens [B, H*W, C] of the model's ViT (prefix tokens dropped)."""
    vit = vit_of(model)
    return vit.forward_features(images)[:, vit.num_prefix_tokens:]


@torch.no_grad()
def feature_fidelity(baseline: nn.Module, clustered: nn.Module, images: Tensor, batch: int = 8) -> dict:
    """Cosine similarity of the clustered model's dense features to the baseline's, per token.

    images [N, 3, H, W] -> {"cosine_mean", "cosine_min", "tokens"} over all N·H·W patch tokens.
    """
    cosines = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        reference, reconstructed = dense_features(baseline, chunk), dense_features(clustered, chunk)
        cosines.append(F.cosine_similarity(reconstructed.double(), reference.double(), dim=-1).flatten())
    cosines = torch.cat(cosines)
    return {"cosine_mean": float(cosines.mean()), "cosine_min": float(cosines.min()), "tokens": cosines.numel()}


def _block_outputs(clustered: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """One forward pass of a clustered model: tokens leaving block alpha (before clustering,
    [B, prefix + H*W, C]) and leaving the last block ([B, prefix + h*w, C] when alpha < depth)."""
    vit = vit_of(clustered)
    seen: dict[str, Tensor] = {}
    hooks = [vit.blocks[vit.hourglass_config.alpha - 1].register_forward_hook(
                 lambda m, i, o: seen.setdefault("alpha", o)),
             vit.blocks[-1].register_forward_hook(lambda m, i, o: seen.update(last=o))]
    try:
        clustered(images)
    finally:
        for hook in hooks:
            hook.remove()
    return seen["alpha"], seen["last"]


@torch.no_grad()
def assignment_sharpness(clustered: nn.Module, images: Tensor, batch: int = 8) -> dict:
    """How sharp the soft assignment is for this model's features at block alpha.

    distance: median over the tokens of all ``images`` of the squared distance to the nearest
    initial centre (the adaptive-average-pooled grid); sharpness = temperature · distance.
    Assignments are softmax(-temperature · D) over a token's window: with sharpness well below 1 a
    token weighs its window's centres almost alike and clustering + reconstruction blur the
    features (raise the temperature, to about 1 / distance); around 1 and above they follow the
    nearest centres. Only blocks 1 … alpha run. -> {"distance", "sharpness"}
    """
    vit = vit_of(clustered)
    config = vit.hourglass_config
    distances = []
    for start in range(0, len(images), batch):
        tokens, grid = vit._embed_tokens(images[start : start + batch])
        for block in vit.blocks[: config.alpha]:
            tokens = block(tokens)
        before = tokens[:, vit.num_prefix_tokens:].double()  # [B, H*W, C]
        centres = F.adaptive_avg_pool2d(before.unflatten(1, grid).permute(0, 3, 1, 2), vit.clustered_grid(grid))
        distances.append(torch.cdist(before, centres.flatten(2).transpose(1, 2)).square().amin(-1).flatten())
    median = float(torch.cat(distances).median())
    return {"distance": median, "sharpness": config.temperature * median}


@torch.no_grad()
def clustering_overhead(clustered: nn.Module, images: Tensor, repeats: int = 3) -> dict:
    """Seconds (median of ``repeats``) of the clustering and reconstruction calls of one forward pass.

    One forward pass of the clustered model records, with forward hooks, the tokens leaving block
    alpha (what is clustered) and leaving the last block (what is reconstructed); then
    `token_clustering` and `token_reconstruction` are timed alone on those tensors with the
    model's settings (device synchronised around each call).
    -> {"clustering_s", "reconstruction_s"}
    """
    vit = vit_of(clustered)
    config, prefix = vit.hourglass_config, vit.num_prefix_tokens
    grid = tuple(vit.patch_embed.dynamic_feat_size(tuple(images.shape[-2:])))
    after_alpha, after_last = _block_outputs(clustered, images)
    before = after_alpha[:, prefix:]  # [B, H*W, C]
    patch_map = before.unflatten(1, grid).permute(0, 3, 1, 2)
    small_grid = vit.clustered_grid(grid)

    def cluster() -> Tensor:
        return token_clustering(patch_map, small_grid, config.iters, config.temperature, config.window)

    centres = cluster()
    refined = after_last[:, prefix:] if config.alpha < len(vit.blocks) else centres

    def reconstruct() -> Tensor:
        return token_reconstruction(refined, before, centres, config.k, config.temperature)

    return {"clustering_s": _median_seconds(cluster, images.device, repeats),
            "reconstruction_s": _median_seconds(reconstruct, images.device, repeats)}


def _median_seconds(call, device: torch.device, repeats: int) -> float:
    from dfx.bench import _sync

    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        call()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def clustering_settings(clustered: nn.Module) -> dict:
    """The settings of a wrapped model and its grids, as plain data for reports."""
    config = vit_of(clustered).hourglass_config
    return {"cluster_ratio": config.cluster_ratio, "alpha": config.alpha, "depth": len(vit_of(clustered).blocks),
            "iters": config.iters, "temperature": config.temperature, "window": config.window, "k": config.k}


def _log(message: str) -> None:
    print(f"dfx: {message}", file=sys.stderr, flush=True)


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
    from dfx.bench import compare_latency, count_flops
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
        _log(f"temperature auto: {temperature:.4g} (= {AUTO_SHARPNESS} / median squared token-centre distance "
             f"{distance:.4g} at block {vit.hourglass_config.alpha})")

    small_grid = vit.clustered_grid(grid)
    _log(f"{description}: {grid[0]}x{grid[1]} patch tokens -> {small_grid[0]}x{small_grid[1]} clusters; fidelity on "
         f"{len(sample)} images")
    report = {"model": description, "weights": "trained" if task is not None else "random", "image_size": size,
              "grid": list(grid), "clustered_grid": list(small_grid),
              "settings": {**clustering_settings(clustered), "temperature_mode": "auto" if auto else "fixed"},
              "fidelity": feature_fidelity(base, clustered, sample),
              "assignment": assignment_sharpness(clustered, sample)}
    distance, sharpness = report["assignment"]["distance"], report["assignment"]["sharpness"]
    if sharpness < 0.1 and not auto:
        _log(f"warning: temperature {temperature} x squared token-centre distance {distance:.3g} = {sharpness:.2g}: "
             "soft assignments are nearly uniform for this model's feature scale and clustering blurs the features; "
             f"try --temperature auto (here {AUTO_SHARPNESS / distance:.2g})")
    models = {"baseline": base, "clustered": clustered}
    times = compare_latency(models, sample[:1].repeat(batch, 1, 1, 1), warmup, repeats, progress=progress)
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
            _log(f"{key} of the {name} model on {len(dataset)} validation images")
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
        from dfx.engine.evaluation import load_model

        recipe, task, model, _ = load_model(path, [f"data.root={data}"] if data else [], device)
        return model, f"{recipe.model.name} ({path})", task, recipe, task.dataset("val")
    from dfx.bench import build_bench_model
    from dfx.data.segmentation import SegmentationFolder, SegmentationTransform
    from dfx.tasks.classification import data_root

    with torch.random.fork_rng(devices=[]):  # random weights, the same on every call
        torch.manual_seed(0)
        model, description, size = build_bench_model(spec, device)
    root = data_root(data or "shapes-seg")
    if not (root / "classes.txt").is_file():
        raise UsageError(f"--data {data}: expected a segmentation root (classes.txt, val.txt, images/, labels/) "
                         "or an embedded dataset name (shapes-seg) for a timm model")
    dataset = SegmentationFolder(root, "val", SegmentationTransform(size or 224, training=False))
    return model, f"{description} (random weights)", None, None, dataset

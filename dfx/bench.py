"""Inference benchmark: latency, throughput, parameters, FLOPs and peak memory of a model.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one forward pass, where
one multiply-add counts as 2 FLOPs. Latency is the wall time of a forward pass of the whole batch
(CUDA synchronised), after warm-up; median and 90th percentile over the repeats.
"""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

import torch

from dfx.engine import distributed as D
from dfx.errors import UsageError


def build_bench_model(spec: str, device: torch.device, image_size: int | None = None
                      ) -> tuple[torch.nn.Module, str, int | None]:
    """(model, description, native image size) from a run dir, checkpoint, recipe file or timm name."""
    path = Path(spec)
    if path.is_dir() or path.suffix == ".safetensors":
        from dfx.engine.evaluation import load_model

        recipe, _, model, _ = load_model(path, device=device)
        return model, f"{_model_name(recipe)} ({path})", _native_size(recipe)
    if path.suffix in {".yaml", ".yml"}:
        from dfx.recipe import load_recipe, task_module

        recipe = load_recipe(path)
        model = task_module(recipe.task).Task(recipe).build_model()
        return model.to(device).eval(), f"{_model_name(recipe)} ({path})", _native_size(recipe)
    import timm

    from dfx.hub import ALIASES

    name = ALIASES.get(spec, spec)
    try:
        try:  # ViT-style models are built for the benchmarked size (position embeddings)
            model = timm.create_model(name, pretrained=False, **({"img_size": image_size} if image_size else {}))
        except TypeError:  # CNNs take any size and have no img_size argument
            model = timm.create_model(name, pretrained=False)
    except RuntimeError as e:
        raise UsageError(f"--model {spec!r}: not a run directory, checkpoint, recipe or timm model ({e})") from None
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    return model.to(device).eval(), name, size


def _model_name(recipe) -> str:
    """What a recipe's model is called: a timm name, a detector's backbone, or the task."""
    model = recipe.model
    if hasattr(model, "name"):
        return model.name
    if hasattr(model, "backbone"):
        return f"{recipe.task} ({model.backbone})"
    return recipe.task


def _native_size(recipe) -> int | None:
    """The square input size a recipe's model is evaluated at (detection: its largest scale)."""
    data = recipe.data
    if hasattr(data, "image_size"):
        return data.image_size
    return max(data.scales) if getattr(data, "scales", None) else None


def count_flops(model: torch.nn.Module, example: torch.Tensor) -> float:
    """Forward FLOPs for ``example`` (1 multiply-add = 2 FLOPs).

    torch's counter knows the CUDA fused-attention kernels but not the CPU one, which would make
    attention free on CPU; it is counted with the same formula as its CUDA sibling.
    """
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    aten = torch.ops.aten
    extra = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        extra[aten._scaled_dot_product_flash_attention_for_cpu] = cpu_attention
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=extra) as counter:
        model(example)
    return float(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(model, images: torch.Tensor, warmup: int, repeats: int) -> list[float]:
    """Seconds per forward pass, ``repeats`` samples after ``warmup`` unmeasured passes."""
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            _sync(images.device)
            t0 = time.perf_counter()
            model(images)
            _sync(images.device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return times


def compare_latency(models: dict[str, torch.nn.Module], images: torch.Tensor, warmup: int, repeats: int,
                    progress: bool = False) -> dict[str, list[float]]:
    """Seconds per forward pass of each model, measured side by side.

    Each model first runs ``warmup`` unmeasured passes; then ``repeats`` rounds each time one pass
    of every model, the order rotated from round to round, so that a drift in machine load (other
    jobs, clocks, caches) reaches all models alike. ``progress``: a bar over the rounds on stderr.
    """
    from dfx.engine.progress import track

    names = list(models)
    for name in names:
        time_forward(models[name], images, warmup, 0)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in track(range(repeats), repeats, "timing", enabled=progress):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name] += time_forward(models[name], images, 0, 1)
    return times


def forward_peak_memory_mb(model: torch.nn.Module, images: torch.Tensor) -> tuple[float, str]:
    """(MB, kind): peak tensor memory of one forward pass, weights and inputs included.

    CUDA: ``max_memory_allocated`` after a reset. CPU: the peak of live tensor bytes tracked by
    torch's ``MemTracker`` (a dispatch mode), which, unlike the process' resident set, does not
    keep the high-water mark of an earlier, larger model.
    """
    device = images.device
    with torch.no_grad():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            model(images)
            return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
        from torch.distributed._tools.mem_tracker import MemTracker

        tracker = MemTracker()
        tracker.track_external(model, images)
        with tracker:
            model(images)
    peak = tracker.get_tracker_snapshot("peak")
    return sum(stats["Total"] for stats in peak.values()) / 2**20, "cpu_tensor_peak"


def summarize_times(times: list[float], batch: int) -> dict:
    median = statistics.median(times)
    p90 = sorted(times)[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    return {"latency_ms": median * 1e3, "latency_p90_ms": p90 * 1e3, "throughput": batch / median}


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory: CUDA max allocated, or this process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bench(model: str = "vit_base_patch16_224", batch: int = 1, image_size: int | None = None, warmup: int = 5,
          repeats: int = 20, device: str = "auto", dtype: str = "float32", cluster_ratio: float | None = None,
          alpha: int | None = None) -> dict:
    """Benchmark one model; returns a flat dict of measurements (see module docstring).

    With ``cluster_ratio`` the model (a ViT, or a dfx run whose backbone is one) is measured with
    and without Expedit token clustering (``alpha``: blocks at full resolution, default the
    wrapper's); see :func:`bench_clustered` for that result.
    """
    if batch < 1 or warmup < 0 or repeats < 1:
        raise UsageError(f"--batch ({batch}) and --repeats ({repeats}) must be >= 1, --warmup ({warmup}) >= 0")
    if cluster_ratio is None and alpha is not None:
        raise UsageError(f"--alpha {alpha}: alpha chooses where tokens are clustered; it needs --cluster-ratio")
    if cluster_ratio is not None:
        from dfx.cluster.evaluate import check_cluster_ratio

        check_cluster_ratio(cluster_ratio)  # before the (slow) model build
    dev = D.resolve_device(device)
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise UsageError(f"--dtype {dtype!r}: expected one of {', '.join(dtypes)}")
    net, name, native = build_bench_model(model, dev, image_size)
    size = image_size or native or 224
    net = net.to(dtypes[dtype])
    images = torch.randn(batch, 3, size, size, device=dev, dtype=dtypes[dtype])
    if cluster_ratio is not None:
        result = bench_clustered(net, images, cluster_ratio, alpha, warmup, repeats)
        return {"model": name, "batch": batch, "image_size": size, **result,
                **_environment(dev, dtype, warmup, repeats)}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        flops = count_flops(net, images[:1])
        times = time_forward(net, images, warmup, repeats)
    except (RuntimeError, AssertionError) as e:
        raise UsageError(f"--image-size {size}: the model cannot run on {size}x{size} inputs "
                         f"({str(e).splitlines()[0]})") from None
    return {
        "model": name,
        "batch": batch,
        "image_size": size,
        **summarize_times(times, batch),
        "params_m": sum(p.numel() for p in net.parameters()) / 1e6,
        "gflops": flops / 1e9,
        "flops_note": "per image, forward; 1 multiply-add = 2 FLOPs",
        "peak_mem_mb": peak_memory_mb(dev),
        "peak_mem_kind": "cuda_max_allocated" if dev.type == "cuda" else "process_peak_rss",
        **_environment(dev, dtype, warmup, repeats),
    }


def _environment(device: torch.device, dtype: str, warmup: int, repeats: int) -> dict:
    return {"device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device), "dtype": dtype,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "warmup": warmup, "repeats": repeats}


def bench_clustered(model: torch.nn.Module, images: torch.Tensor, cluster_ratio: float, alpha: int | None = None,
                    warmup: int = 5, repeats: int = 20, overhead_repeats: int = 3) -> dict:
    """The model with and without token clustering, side by side (alternating passes, warm-up first).

    -> {"baseline": {"latency_ms", "latency_p90_ms", "throughput", "gflops", "peak_mem_mb"},
        "clustered": {...}, "speedup", "flops_ratio", "efficiency", "cluster_share", "cluster_ms",
        "settings", "grid", "clustered_grid", "params_m", "peak_mem_kind"}

    speedup = baseline latency / clustered latency; flops_ratio = baseline GFLOPs / clustered
    GFLOPs (the speed-up the FLOPs saved allow); efficiency = speedup / flops_ratio.
    cluster_share: share of the clustered latency spent in clustering + reconstruction, timed on
    their own in a separate instrumented pass (dfx.cluster.evaluate.clustering_overhead).
    """
    from dfx.cluster.evaluate import clustering_overhead, clustering_settings, vit_of, wrap_model

    size = images.shape[-1]
    clustered = wrap_model(model, cluster_ratio, alpha, image_size=size)
    vit = vit_of(clustered)
    grid = tuple(vit.patch_embed.dynamic_feat_size((size, size)))
    models = {"baseline": model, "clustered": clustered}
    result: dict = {}
    try:
        flops = {name: count_flops(net, images[:1]) for name, net in models.items()}
        times = compare_latency(models, images, warmup, repeats)
        overhead = clustering_overhead(clustered, images, overhead_repeats)
        memory = {name: forward_peak_memory_mb(net, images) for name, net in models.items()}
    except (RuntimeError, AssertionError) as e:
        raise UsageError(f"--image-size {size}: the model cannot run on {size}x{size} inputs "
                         f"({str(e).splitlines()[0]})") from None
    for name in models:
        result[name] = {**summarize_times(times[name], len(images)), "gflops": flops[name] / 1e9,
                        "peak_mem_mb": memory[name][0]}
    speedup = result["baseline"]["latency_ms"] / result["clustered"]["latency_ms"]
    flops_ratio = flops["baseline"] / flops["clustered"]
    overhead_ms = {"clustering": overhead["clustering_s"] * 1e3, "reconstruction": overhead["reconstruction_s"] * 1e3}
    return {
        **result,
        "speedup": speedup,
        "flops_ratio": flops_ratio,
        "efficiency": speedup / flops_ratio,
        "cluster_share": sum(overhead_ms.values()) / result["clustered"]["latency_ms"],
        "cluster_ms": overhead_ms,
        "settings": clustering_settings(clustered),
        "grid": list(grid),
        "clustered_grid": list(vit.clustered_grid(grid)),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "peak_mem_kind": memory["baseline"][1],
    }

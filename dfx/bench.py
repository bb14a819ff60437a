"""Inference benchmark: latency, throughput, parameters, FLOPs and peak memory of a model.

The measurements themselves are dfx.measure's: FLOPs of one forward pass (1 multiply-add = 2
FLOPs), latency of a forward pass of the whole batch after warm-up (median and 90th percentile
over the repeats), peak tensor memory of one forward pass.
"""

from __future__ import annotations

import torch

from dfx.engine import distributed as D
from dfx.errors import UsageError
from dfx.measure import compare_latency, count_flops, forward_peak_memory_mb, summarize_times, time_forward
from dfx.models import build_any


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
        from dfx.cluster_report import check_cluster_ratio

        check_cluster_ratio(cluster_ratio)  # before the (slow) model build
    dev = D.resolve_device(device)
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise UsageError(f"--dtype {dtype!r}: expected one of {', '.join(dtypes)}")
    net, name, native = build_any(model, dev, image_size)
    size = image_size or native or 224
    net = net.to(dtypes[dtype])
    images = torch.randn(batch, 3, size, size, device=dev, dtype=dtypes[dtype])
    if cluster_ratio is not None:
        result = bench_clustered(net, images, cluster_ratio, alpha, warmup, repeats)
        return {"model": name, "batch": batch, "image_size": size, **result,
                **_environment(dev, dtype, warmup, repeats)}
    try:
        flops = count_flops(net, images[:1])
        times = time_forward(net, images, warmup, repeats)
        memory, memory_kind = forward_peak_memory_mb(net, images)
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
        "peak_mem_mb": memory,
        "peak_mem_kind": memory_kind,
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
    their own in a separate instrumented pass (dfx.cluster.analysis.clustering_overhead).
    """
    from dfx.cluster.analysis import clustering_overhead, clustering_settings, vit_of
    from dfx.cluster_report import wrap_model

    size = images.shape[-1]
    clustered = wrap_model(model, cluster_ratio, alpha, image_size=size)
    vit = vit_of(clustered)
    from dfx.cluster.swin import is_swin

    if is_swin(vit):  # the clustered stage's map size
        with torch.no_grad():
            grid = tuple(vit.stage_input(images[:1]).shape[1:3])
    else:
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

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
        return model, f"{recipe.model.name} ({path})", getattr(recipe.data, "image_size", None)
    if path.suffix in {".yaml", ".yml"}:
        from dfx.recipe import load_recipe, task_module

        recipe = load_recipe(path)
        model = task_module(recipe.task).Task(recipe).build_model()
        return model.to(device).eval(), f"{recipe.model.name} ({path})", getattr(recipe.data, "image_size", None)
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
          repeats: int = 20, device: str = "auto", dtype: str = "float32") -> dict:
    """Benchmark one model; returns a flat dict of measurements (see module docstring)."""
    if batch < 1 or warmup < 0 or repeats < 1:
        raise UsageError(f"--batch ({batch}) and --repeats ({repeats}) must be >= 1, --warmup ({warmup}) >= 0")
    dev = D.resolve_device(device)
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise UsageError(f"--dtype {dtype!r}: expected one of {', '.join(dtypes)}")
    net, name, native = build_bench_model(model, dev, image_size)
    size = image_size or native or 224
    net = net.to(dtypes[dtype])
    images = torch.randn(batch, 3, size, size, device=dev, dtype=dtypes[dtype])
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
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "warmup": warmup,
        "repeats": repeats,
    }

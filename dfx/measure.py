"""Measurements shared by ``dfx bench``, ``dfx cluster``, ``dfx compare`` and the benchmarks.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one forward pass, where
one multiply-add counts as 2 FLOPs. Latency is the wall time of a forward pass (CUDA
synchronised) after warm-up; models compared side by side take turns. Peak memory has one
definition, :func:`forward_peak_memory_mb`: the peak of live tensor bytes during one forward pass,
weights and inputs included.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Iterable

import torch


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


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(model, images: torch.Tensor, warmup: int, repeats: int) -> list[float]:
    """Seconds per forward pass, ``repeats`` samples after ``warmup`` unmeasured passes."""
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            sync(images.device)
            t0 = time.perf_counter()
            model(images)
            sync(images.device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return times


def compare_latency(models: dict[str, torch.nn.Module], images: torch.Tensor, warmup: int, repeats: int,
                    rounds: Callable[[Iterable[int]], Iterable[int]] = iter) -> dict[str, list[float]]:
    """Seconds per forward pass of each model, measured side by side.

    Each model first runs ``warmup`` unmeasured passes; then ``repeats`` rounds each time one pass
    of every model, the order rotated from round to round, so that a drift in machine load (other
    jobs, clocks, caches) reaches all models alike. ``rounds`` wraps the rounds' iterator (e.g. a
    progress bar).
    """
    names = list(models)
    for name in names:
        time_forward(models[name], images, warmup, 0)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in rounds(range(repeats)):
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


def median_seconds(call, device: torch.device, repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``call()``, the device synchronised around each."""
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        call()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)

"""Expedit clustering and reconstruction in dfx against the dense formulation of the papers' code.

    python benchmarks/token_clustering.py [--quick] [--device cpu|cuda] [--threads N] [--repeats R] [--json]

Settings (batch 1, iters 5, window 5, temperature 0.02, k 20):
  segmenter  40×40 -> 28×28 tokens, C = 1024 (Segmenter ViT-L/16 on ADE20K, layer 10)
  sam        64×64 -> 45×45 tokens, C = 1280 (a SAM ViT-H-like image encoder)

Dense clustering builds the full [B, H·W, h·w] distance matrix, masks it to the window and takes a
softmax over all h·w centres; dense reconstruction scatters the top-k weights into a dense [B, N, M]
matrix and multiplies. Both are written in this file and run in inference mode (no autograd).

Time: median over `repeats` rounds after one warm-up call each; each round runs dense then dfx.
Peak memory: bytes allocated above the inputs during one call.
  cuda  torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus the bytes
        allocated before the call.
  cpu   each setting is measured in a fresh subprocess run with MALLOC_MMAP_THRESHOLD_=65536, so
        glibc serves every tensor larger than 64 KiB with its own mmap and unmaps it when it is
        freed: the resident set follows the live tensors. Per variant, after a warm-up call (iters
        1) the peak is reset (`5` > /proc/self/clear_refs) and the result is VmHWM after the call
        minus VmRSS before it (Linux only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from dfx.cluster import token_clustering, token_reconstruction

SETTINGS = {
    "segmenter": dict(map_size=(40, 40), grid=(28, 28), channels=1024),
    "sam": dict(map_size=(64, 64), grid=(45, 45), channels=1280),
}
QUICK_SETTINGS = {
    "tiny": dict(map_size=(16, 16), grid=(11, 11), channels=64),
    "small": dict(map_size=(24, 24), grid=(17, 17), channels=128),
}
ITERS, WINDOW, TEMPERATURE, TOP_K = 5, 5, 0.02, 20
VARIANTS = ("dense_clustering", "dfx_clustering", "dense_reconstruction", "dfx_reconstruction")


def dense_clustering(x, grid, iters=ITERS, temperature=TEMPERATURE, window=WINDOW):
    """x [B, C, H, W] -> [B, h*w, C] with the full masked [B, H*W, h*w] assignment matrix."""
    h, w = grid
    pixels = x.flatten(2).transpose(1, 2)  # [B, N, C]
    cell = F.interpolate(torch.arange(h * w, dtype=torch.float32, device=x.device).view(1, 1, h, w), x.shape[-2:])
    cell = cell.flatten().long()
    centre = torch.arange(h * w, device=x.device)
    radius = window // 2
    row_near = (cell[:, None] // w - centre // w).abs() <= radius
    in_window = row_near & ((cell[:, None] % w - centre % w).abs() <= radius)  # [N, M]
    centres = F.adaptive_avg_pool2d(x, grid).flatten(2).transpose(1, 2)
    pixel_sq = pixels.square().sum(-1, keepdim=True)  # [B, N, 1]
    for _ in range(iters):
        distance = pixel_sq + centres.square().sum(-1)[:, None, :] - 2 * pixels @ centres.transpose(1, 2)
        assignment = (-temperature * distance).masked_fill(~in_window, float("-inf")).softmax(-1)
        centres = assignment.transpose(1, 2) @ pixels / assignment.sum(1)[..., None]
    return centres


def dense_reconstruction(x, before, centres, k=TOP_K, temperature=TEMPERATURE):
    """Top-k weights scattered into a dense [B, N, M] matrix, L2-normalised rows, times x [B, M, C]."""
    distance = before.square().sum(-1, keepdim=True) + centres.square().sum(-1)[:, None]
    distance = distance - 2 * before @ centres.transpose(1, 2)  # [B, N, M]
    weights = torch.exp(-temperature * distance)
    top = weights.topk(min(k, weights.shape[-1]), dim=-1)
    weights = torch.zeros_like(weights).scatter_(-1, top.indices, top.values)
    return F.normalize(weights, dim=-1) @ x


def make_inputs(setting, device, seed=0):
    """Token map x [1, C, H, W] with a ViT-like scale, its tokens and cluster centres."""
    generator = torch.Generator().manual_seed(seed)
    (height, width), (h, w) = setting["map_size"], setting["grid"]
    # Smooth map plus noise so neighbouring tokens resemble each other, as in a ViT's middle layers.
    coarse = torch.randn(1, setting["channels"], height // 4 + 1, width // 4 + 1, generator=generator)
    x = F.interpolate(coarse, size=(height, width), mode="bilinear") + 0.5 * torch.randn(
        1, setting["channels"], height, width, generator=generator
    )
    x = x.to(device)
    centres = F.adaptive_avg_pool2d(x, (h, w)).flatten(2).transpose(1, 2).contiguous()
    before = x.flatten(2).transpose(1, 2).contiguous()
    return x, before, centres


def variant_call(name, setting, inputs, iters=ITERS):
    x, before, centres = inputs
    if name == "dense_clustering":
        return lambda: dense_clustering(x, setting["grid"], iters)
    if name == "dfx_clustering":
        return lambda: token_clustering(x, setting["grid"], iters, TEMPERATURE, WINDOW)
    if name == "dense_reconstruction":
        return lambda: dense_reconstruction(centres, before, centres)
    return lambda: token_reconstruction(centres, before, centres, TOP_K, TEMPERATURE)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_times(setting, inputs, device, repeats):
    """Median seconds per variant; one warm-up call each, then `repeats` rounds over all variants."""
    calls = {name: variant_call(name, setting, inputs) for name in VARIANTS}
    times = {name: [] for name in VARIANTS}
    for call in calls.values():
        call()
    for _ in range(repeats):
        for name, call in calls.items():
            synchronize(device)
            start = time.perf_counter()
            call()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_bytes_cuda(setting, inputs, device, name):
    variant_call(name, setting, inputs, iters=1)()
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before_call = torch.cuda.memory_allocated(device)
    result = variant_call(name, setting, inputs)()
    synchronize(device)
    del result
    return torch.cuda.max_memory_allocated(device) - before_call


def _proc_status_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_bytes_cpu_here(setting_name, quick, threads):
    """Run inside the fresh subprocess: {variant: peak resident bytes above the inputs during one call}."""
    if threads:
        torch.set_num_threads(threads)
    setting = (QUICK_SETTINGS if quick else SETTINGS)[setting_name]
    inputs = make_inputs(setting, torch.device("cpu"))
    peaks = {}
    with torch.inference_mode():
        for name in VARIANTS:
            variant_call(name, setting, inputs, iters=1)()  # its memory is unmapped again when freed
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # reset VmHWM to the current resident set
            resident = _proc_status_kib("VmRSS")
            result = variant_call(name, setting, inputs)()
            peaks[name] = (_proc_status_kib("VmHWM") - resident) * 1024
            del result
    return peaks


def peak_bytes_cpu(setting_name, quick, threads):
    command = [sys.executable, __file__, "--measure-cpu-memory", setting_name]
    command += ["--quick"] if quick else []
    command += ["--threads", str(threads)] if threads else []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def max_abs_difference(setting, inputs):
    dense = variant_call("dense_clustering", setting, inputs)()
    ours = variant_call("dfx_clustering", setting, inputs)()
    return float((dense - ours).abs().max())


def run(quick, device, threads, repeats):
    settings = QUICK_SETTINGS if quick else SETTINGS
    results = {}
    for setting_name, setting in settings.items():
        print(f"[token_clustering] {setting_name} ...", file=sys.stderr, flush=True)
        inputs = make_inputs(setting, device)
        with torch.inference_mode():
            seconds = median_times(setting, inputs, device, repeats)
            difference = max_abs_difference(setting, inputs)
            if device.type == "cuda":
                peaks = {name: peak_bytes_cuda(setting, inputs, device, name) for name in VARIANTS}
        if device.type != "cuda":
            peaks = peak_bytes_cpu(setting_name, quick, threads)
        results[setting_name] = dict(
            map_size=list(setting["map_size"]),
            grid=list(setting["grid"]),
            channels=setting["channels"],
            seconds=seconds,
            peak_bytes=peaks,
            clustering_max_abs_difference=difference,
            clustering_speedup=seconds["dense_clustering"] / seconds["dfx_clustering"],
            clustering_memory_ratio=peaks["dense_clustering"] / max(peaks["dfx_clustering"], 1),
            reconstruction_speedup=seconds["dense_reconstruction"] / seconds["dfx_reconstruction"],
            reconstruction_memory_ratio=peaks["dense_reconstruction"] / max(peaks["dfx_reconstruction"], 1),
        )
    return results


def print_table(results, device, threads, repeats):
    print(f"device {device}, torch threads {threads or torch.get_num_threads()}, median of {repeats} rounds, batch 1")
    print(f"clustering: iters {ITERS}, window {WINDOW}; reconstruction: k {TOP_K}; ratios are dense / dfx")
    header = f"{'setting':<10} {'tokens':<14} {'C':>5}  {'op':<15} {'dense ms':>9} {'dfx ms':>9} {'speedup':>8}"
    header += f" {'dense MB':>9} {'dfx MB':>8} {'mem ratio':>9}"
    print(header)
    for setting_name, row in results.items():
        tokens = f"{row['map_size'][0]}x{row['map_size'][1]}->{row['grid'][0]}x{row['grid'][1]}"
        for op in ("clustering", "reconstruction"):
            dense_s, dfx_s = row["seconds"][f"dense_{op}"], row["seconds"][f"dfx_{op}"]
            dense_b, dfx_b = row["peak_bytes"][f"dense_{op}"], row["peak_bytes"][f"dfx_{op}"]
            print(
                f"{setting_name:<10} {tokens:<14} {row['channels']:>5}  {op:<15}"
                f" {dense_s * 1e3:>9.1f} {dfx_s * 1e3:>9.1f} {row[f'{op}_speedup']:>7.2f}x"
                f" {dense_b / 2**20:>9.1f} {dfx_b / 2**20:>8.1f} {row[f'{op}_memory_ratio']:>8.2f}x"
            )
    for setting_name, row in results.items():
        print(f"{setting_name}: max |dense - dfx| clustering (float32) = {row['clustering_max_abs_difference']:.2e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes and 3 rounds (< 1 minute)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5, 3 with --quick)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--measure-cpu-memory", metavar="SETTING", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_cpu_memory:
        print(json.dumps(peak_bytes_cpu_here(args.measure_cpu_memory, args.quick, args.threads)))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = args.repeats or (3 if args.quick else 5)
    results = run(args.quick, device, args.threads, repeats)
    if args.json:
        print(json.dumps(dict(device=str(device), threads=torch.get_num_threads(), repeats=repeats, settings=results)))
    else:
        print_table(results, device, args.threads, repeats)


if __name__ == "__main__":
    main()

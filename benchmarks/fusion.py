"""Benchmark dfx's GeminiFusion.

1. dfx vs the official-style formulation (a Python loop over images; per image one
   nn.MultiheadAttention call with the N tokens as the batch and the 2 candidates as the
   sequence), same weights, at the MiT stage shapes, forward and forward+backward.
2. Latency of one GeminiFusion layer vs full cross-modal attention (every token of one
   modality attends over all tokens of the other, both directions, C=64, 1 head,
   F.scaled_dot_product_attention) as the token count grows, with log-log slopes.

Usage:
    python benchmarks/fusion.py [--quick] [--device auto|cpu|cuda] [--json] [--repeats R]

Variants are interleaved (order rotated every repeat) after a warmup call, and the median
is reported. With --json exactly one JSON object goes to stdout, progress to stderr.

On a CPU shared with other busy processes, OpenMP threads that spin while waiting make
every op slow (10x or worse, hitting the many-op official loop hardest); run with
OMP_WAIT_POLICY=PASSIVE or --threads 1 there for meaningful numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import numpy as np
import torch

from dfx.fusion import CrossModalAttention, GeminiFusion

# (batch, tokens, channels) of MiT stages: stages 1-2 of a 256x256 input (64x64, 32x32
# tokens), stages 3-4 of a 480x640 NYUDv2 input (30x40, 15x20); heads=8 as in the official code.
STAGE_SHAPES = [(8, 4096, 64), (8, 1024, 128), (8, 1200, 320), (8, 300, 512)]
QUICK_STAGE_SHAPES = [(2, 512, 64), (2, 256, 128), (2, 150, 320), (2, 75, 512)]
SCALING_TOKENS = [1024, 4096, 16384, 65536]
QUICK_SCALING_TOKENS = [256, 1024, 4096]


def official_style_fusion(module: GeminiFusion, x0: torch.Tensor, x1: torch.Tensor):
    """The per-image loop of the reference code, [B, N, C] x2 -> (y0, y1)."""
    attn = (module.cross_attn_0_to_1, module.cross_attn_1_to_0)
    outputs = ([], [])
    for image0, image1 in zip(x0, x1):
        tokens = (image0, image1)
        for d in (0, 1):
            s, o = tokens[d], tokens[1 - d]
            phi = module.relation_judger(torch.cat([s, o], -1))
            keys = torch.stack([s + module.k_noise.weight[d], s * phi])  # [2, N, C]
            values = torch.stack([s + module.v_noise.weight[d], o])
            fused, _ = attn[d](s.unsqueeze(0), keys, values)
            outputs[d].append(s + fused[0])
    return torch.stack(outputs[0]), torch.stack(outputs[1])


def timed_call(fn, backward: bool, device: torch.device) -> float:
    """Seconds for one call of fn (and a backward pass through both outputs)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    if backward:
        y0, y1 = fn()
        torch.autograd.backward((y0, y1), (torch.ones_like(y0), torch.ones_like(y1)))
    else:
        with torch.no_grad():
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def interleaved_medians(variants: dict, repeats: int, backward: bool, device) -> dict:
    """Median seconds per variant; one warmup each, then variants alternate in rotating order."""
    names = list(variants)
    for name in names:
        timed_call(variants[name], backward, device)
    samples = {name: [] for name in names}
    for rep in range(repeats):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            samples[name].append(timed_call(variants[name], backward, device))
    return {name: statistics.median(times) for name, times in samples.items()}


def loglog_slope(tokens, seconds) -> float:
    return float(np.polyfit(np.log(tokens), np.log(seconds), 1)[0])


def compare_with_official(shapes, repeats, device, dtype, log) -> list[dict]:
    rows = []
    for batch, tokens, dim in shapes:
        torch.manual_seed(0)
        module = GeminiFusion(dim, heads=8).to(device, dtype)
        x0 = torch.randn(batch, tokens, dim, device=device, dtype=dtype, requires_grad=True)
        x1 = torch.randn(batch, tokens, dim, device=device, dtype=dtype, requires_grad=True)
        with torch.no_grad():
            diff = max((a - b).abs().max().item()
                       for a, b in zip(module(x0, x1), official_style_fusion(module, x0, x1)))
        variants = {"official": lambda: official_style_fusion(module, x0, x1), "dfx": lambda: module(x0, x1)}
        for mode, backward in (("forward", False), ("forward+backward", True)):
            log(f"  {batch}x{tokens}x{dim} {mode} ...")
            medians = interleaved_medians(variants, repeats, backward, device)
            rows.append({
                "batch": batch, "tokens": tokens, "dim": dim, "heads": 8, "mode": mode,
                "official_ms": 1e3 * medians["official"], "dfx_ms": 1e3 * medians["dfx"],
                "speedup": medians["official"] / medians["dfx"], "max_abs_diff": diff,
            })
    return rows


def scaling(token_counts, cross_max_tokens, repeats, device, dtype, log) -> dict:
    dim = 64
    torch.manual_seed(0)
    gemini = GeminiFusion(dim, heads=8).to(device, dtype)
    cross = CrossModalAttention(dim, heads=1).to(device, dtype)
    gemini_ms, cross_ms = [], []
    for tokens in token_counts:
        log(f"  {tokens} tokens ...")
        x0 = torch.randn(1, tokens, dim, device=device, dtype=dtype)
        x1 = torch.randn(1, tokens, dim, device=device, dtype=dtype)
        variants = {"gemini": lambda: gemini(x0, x1)}
        if tokens <= cross_max_tokens:
            variants["cross"] = lambda: cross(x0, x1)
        # fewer repeats where one call takes seconds
        medians = interleaved_medians(variants, repeats if tokens < 16384 else max(1, repeats // 2),
                                      False, device)
        gemini_ms.append(1e3 * medians["gemini"])
        cross_ms.append(1e3 * medians["cross"] if "cross" in medians else None)
    measured = [(n, t) for n, t in zip(token_counts, cross_ms) if t is not None]
    cross_slope = loglog_slope(*zip(*measured)) if len(measured) > 1 else math.nan
    extrapolated = {}
    if measured and len(measured) < len(token_counts):
        # quadratic growth from the largest measured size (the fitted slope at small sizes
        # still includes fixed overheads, so this is the optimistic end)
        last_tokens, last_ms = measured[-1]
        for n, t in zip(token_counts, cross_ms):
            if t is None:
                extrapolated[n] = last_ms * (n / last_tokens) ** 2
    return {
        "dim": dim, "batch": 1, "tokens": list(token_counts),
        "gemini_ms": gemini_ms, "cross_attention_ms": cross_ms,
        "cross_attention_extrapolated_ms": extrapolated,
        "gemini_exponent": loglog_slope(token_counts, gemini_ms), "cross_attention_exponent": cross_slope,
    }


def print_report(result: dict) -> None:
    print(f"GeminiFusion benchmark on {result['device']} ({result['threads']} threads), "
          f"dtype {result['dtype']}, torch {result['torch']}, median of {result['repeats']} repeats")
    print("\nofficial-style per-image loop vs dfx (same weights); speedup = official / dfx")
    print(f"{'B x N x C':>16} {'mode':>17} {'official ms':>12} {'dfx ms':>9} {'speedup':>8} {'max|diff|':>10}")
    for row in result["comparison"]:
        shape = f"{row['batch']}x{row['tokens']}x{row['dim']}"
        print(f"{shape:>16} {row['mode']:>17} {row['official_ms']:12.1f} {row['dfx_ms']:9.1f} "
              f"{row['speedup']:7.2f}x {row['max_abs_diff']:10.1e}")
    scale = result["scaling"]
    print(f"\none fusion layer, batch 1, C={scale['dim']}: GeminiFusion (8 heads) vs cross-attention (1 head)")
    print(f"{'tokens':>8} {'gemini ms':>10} {'cross-attn ms':>14}")
    for n, g, c in zip(scale["tokens"], scale["gemini_ms"], scale["cross_attention_ms"]):
        cross = f"{c:14.1f}" if c is not None else f"{scale['cross_attention_extrapolated_ms'][n]:13.0f}*"
        print(f"{n:>8} {g:10.2f} {cross}")
    if scale["cross_attention_extrapolated_ms"]:
        print("  * not run: extrapolated as quadratic from the largest measured size")
    print(f"log-log growth exponent: gemini {scale['gemini_exponent']:.2f}, "
          f"cross-attention {scale['cross_attention_exponent']:.2f} (measured sizes)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes and repeats (< 60 s)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per variant (default 5, quick 2)")
    parser.add_argument("--cross-max-tokens", type=int, default=None,
                        help="largest token count at which cross-attention is run (default 16384, quick 1024)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    repeats = args.repeats or (2 if args.quick else 5)
    if repeats < 1:
        parser.error(f"--repeats must be >= 1, got {repeats}")
    cross_max_tokens = args.cross_max_tokens or (1024 if args.quick else 16384)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    def log(message):
        print(message, file=sys.stderr, flush=True)

    log("official-style vs dfx ...")
    comparison = compare_with_official(QUICK_STAGE_SHAPES if args.quick else STAGE_SHAPES,
                                       repeats, device, dtype, log)
    log("scaling ...")
    token_counts = QUICK_SCALING_TOKENS if args.quick else SCALING_TOKENS
    result = {
        "device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "repeats": repeats, "comparison": comparison,
        "scaling": scaling(token_counts, cross_max_tokens, repeats, device, dtype, log),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

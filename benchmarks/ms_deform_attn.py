"""Benchmark dfx.ops.ms_deform_attn against the straightforward per-level grid_sample formulation.

Shapes are Deformable-DETR's: batch 2, an 800x1333 input giving four levels at strides
8, 16, 32, 64 (100x167, 50x84, 25x42, 13x21; S = 22223 tokens), 8 heads of dim 32, 4 points.
Two cases: the encoder (every token is a query, Lq = S) and the decoder (Lq = 300).

Both implementations run interleaved (alternating which goes first) after a warm-up that also
checks that their outputs and gradients agree; the medians and the ratio reference / dfx are
printed. Forward is timed under ``torch.no_grad()``, forward+backward with gradients for value,
sampling locations and attention weights. The thread count is PyTorch's default unless
``--threads`` is given.

    python benchmarks/ms_deform_attn.py [--device cpu|cuda] [--quick] [--json] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from dfx.ops import ms_deform_attn

FULL = dict(batch=2, levels=[(100, 167), (50, 84), (25, 42), (13, 21)], decoder_queries=300, repeats=(5, 20))
QUICK = dict(batch=1, levels=[(25, 42), (13, 21), (7, 11), (4, 6)], decoder_queries=100, repeats=(7, 15))
HEADS, HEAD_DIM, POINTS = 8, 32, 4


def reference(value, spatial_shapes, sampling_locations, attention_weights):
    """The straightforward formulation: per level, grid_sample the level's points, weight, sum."""
    batch, _, heads, head_dim = value.shape
    _, num_queries, _, _, points, _ = sampling_locations.shape
    sizes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    out = 0
    for level, (level_value, (height, width)) in enumerate(zip(value.split([h * w for h, w in sizes], 1), sizes)):
        maps = level_value.permute(0, 2, 3, 1).reshape(batch * heads, head_dim, height, width)
        grid = 2 * sampling_locations[:, :, :, level].transpose(1, 2).reshape(batch * heads, num_queries, points, 2) - 1
        sampled = F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        weights = attention_weights[:, :, :, level].transpose(1, 2).reshape(batch * heads, 1, num_queries, points)
        out = out + (sampled * weights).sum(-1)  # [N * M, D, Lq]
    return out.view(batch, heads, head_dim, num_queries).permute(0, 3, 1, 2).reshape(batch, num_queries, -1)


IMPLEMENTATIONS = {"dfx": ms_deform_attn, "reference": reference}


def make_inputs(batch, levels, queries, device, seed=0):
    """Random inputs; locations spread slightly past [0, 1] so some points fall off the maps."""
    generator = torch.Generator().manual_seed(seed)
    tokens = sum(h * w for h, w in levels)
    value = torch.randn(batch, tokens, HEADS, HEAD_DIM, generator=generator)
    locations = torch.rand(batch, queries, HEADS, len(levels), POINTS, 2, generator=generator) * 1.1 - 0.05
    weights = torch.randn(batch, queries, HEADS, len(levels) * POINTS, generator=generator).softmax(-1)
    weights = weights.view(batch, queries, HEADS, len(levels), POINTS)
    shapes = torch.tensor(levels, dtype=torch.long)
    return [t.to(device) for t in (value, shapes, locations, weights)]


def run_once(name, inputs, backward, upstream, device):
    """Seconds for one forward (no_grad) or forward+backward; also returns output and gradients."""
    value, shapes, locations, weights = inputs
    leaves = [t.detach().requires_grad_(backward) for t in (value, locations, weights)]
    synchronize(device)
    start = time.perf_counter()
    with torch.set_grad_enabled(backward):
        out = IMPLEMENTATIONS[name](leaves[0], shapes, leaves[1], leaves[2])
        if backward:
            out.backward(upstream)
    synchronize(device)
    return time.perf_counter() - start, out.detach(), [t.grad for t in leaves]


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def mismatch_fraction(ours, theirs) -> float:
    """Fraction of elements differing by more than 1e-4 x the largest reference magnitude."""
    tolerance = 1e-4 * theirs.abs().max().clamp_min(1e-12)
    return ((ours - theirs).abs() > tolerance).double().mean().item()


def check_agreement(inputs, upstream, device) -> dict:
    """Run both with gradients once (this is also the warm-up); raise if they disagree.

    A point whose x * W - 0.5 lands exactly on an integer sits on a kink of the bilinear
    interpolant; there the two implementations may round to different sides in float32 and
    return different one-sided location gradients (about 1 in 10 million points at the encoder
    shape), so a tiny fraction of mismatching elements is allowed.
    """
    _, ours, our_grads = run_once("dfx", inputs, True, upstream, device)
    _, theirs, their_grads = run_once("reference", inputs, True, upstream, device)
    fractions = {"output": mismatch_fraction(ours, theirs)}
    for name, mine, other in zip(("value", "locations", "weights"), our_grads, their_grads):
        fractions[f"grad_{name}"] = mismatch_fraction(mine, other)
    if max(fractions.values()) > 1e-5:
        raise SystemExit(f"dfx and the reference disagree: fraction of mismatching elements {fractions}")
    return fractions


def time_case(case, inputs, repeats, device, log) -> list[dict]:
    upstream = torch.randn(inputs[2].shape[0], inputs[2].shape[1], HEADS * HEAD_DIM, device=device)
    mismatches = check_agreement(inputs, upstream, device)
    summary = ", ".join(f"{name} {fraction:.1e}" for name, fraction in mismatches.items())
    log(f"{case}: fraction of elements off by > 1e-4 x max: {summary}")
    rows = []
    for backward in (False, True):
        mode = "forward+backward" if backward else "forward"
        if not backward:  # one untimed no_grad call each; the gradient path was warmed by the check
            for name in IMPLEMENTATIONS:
                run_once(name, inputs, False, upstream, device)
        times = {name: [] for name in IMPLEMENTATIONS}
        for repeat in range(repeats):
            order = list(IMPLEMENTATIONS) if repeat % 2 == 0 else list(reversed(IMPLEMENTATIONS))
            for name in order:
                times[name].append(run_once(name, inputs, backward, upstream, device)[0])
        dfx_ms, reference_ms = (1e3 * statistics.median(times[name]) for name in ("dfx", "reference"))
        row = dict(
            case=case,
            queries=inputs[2].shape[1],
            mode=mode,
            dfx_ms=round(dfx_ms, 2),
            reference_ms=round(reference_ms, 2),
            speedup=round(reference_ms / dfx_ms, 2),
            repeats=repeats,
            mismatch_fraction=max(mismatches.values()),
        )
        log(f"{case:8s} {mode:17s} dfx {dfx_ms:9.1f} ms  reference {reference_ms:9.1f} ms  ratio {row['speedup']:.2f}x")
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (< 1 min on CPU)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout, progress on stderr")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for this run (default: leave as is)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available", file=sys.stderr)
        return 2
    config = QUICK if args.quick else FULL
    stream = sys.stderr if args.json else sys.stdout

    def log(line):
        print(line, file=stream, flush=True)

    tokens = sum(h * w for h, w in config["levels"])
    log(
        f"ms_deform_attn on {args.device} (torch {torch.__version__}, {torch.get_num_threads()} threads): "
        f"batch {config['batch']}, levels {config['levels']} (S={tokens}), {HEADS} heads x {HEAD_DIM}, {POINTS} points"
    )
    rows = []
    for case, queries, repeats in (
        ("encoder", tokens, config["repeats"][0]),
        ("decoder", config["decoder_queries"], config["repeats"][1]),
    ):
        inputs = make_inputs(config["batch"], config["levels"], queries, args.device)
        rows += time_case(case, inputs, repeats, args.device, log)
    if args.json:
        summary = dict(
            device=args.device,
            torch=torch.__version__,
            threads=torch.get_num_threads(),
            batch=config["batch"],
            levels=config["levels"],
            heads=HEADS,
            head_dim=HEAD_DIM,
            points=POINTS,
            results=rows,
        )
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

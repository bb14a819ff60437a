"""Training-step cost of H-DETR's hybrid branch and DINO's denoising queries, side by side with the
one-to-one-only model.

    python benchmarks/hybrid_overhead.py                 # CPU, R50, one 800x1333 image
    python benchmarks/hybrid_overhead.py --device cuda --repeats 20

Models (recipes/hdetr.yaml's architecture, random weights, 80 classes, 7 objects per image — COCO's
mean — at random):

- baseline: 300 queries (recipes/deformable-detr.yaml);
- hybrid (dfx): 300 + 1500 queries, self-attention run per group, one-to-many cost matrix computed
  once per distinct target and tiled k times;
- hybrid (masked): the same model with one masked 1800x1800 self-attention and the matcher run on
  the explicitly repeated targets, as the paper's implementation does;
- DINO denoising: the baseline plus ``dn_queries`` 100 (with 7 objects: 14 groups of 2 x 7 noised
  targets = 196 queries; one masked self-attention over all queries, the denoising losses on every
  layer);
- DINO (recipes/dino.yaml's queries): 900 queries + denoising;
- DINO + hybrid: 300 + 1500 queries + denoising (the experimental combination).

A step is forward + loss + backward + AdamW update. The variants run in turn (round-robin) after a
warm-up, so load on the machine hits them alike; the median step time and the ratio to the
baseline are printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfx.detection import DeformableDETR, SetCriterion, repeat_targets  # noqa: E402
from dfx.detection.denoising import denoising_groups  # noqa: E402
from dfx.recipe import load_recipe  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "hdetr.yaml"


class ExplicitRepeatCriterion(SetCriterion):
    """One-to-many matching on targets repeated k times (a k-times larger cost matrix)."""

    def group_loss(self, outputs, targets, num_boxes, repeat=1):
        repeated = repeat_targets(targets, repeat) if repeat > 1 else targets
        total, last = 0.0, None
        for layer in [outputs, *outputs.get("aux_outputs", [])]:
            terms = self.terms(layer, repeated, num_boxes, self.matcher(layer, repeated))
            total = total + self.weighted(terms)
            last = last or terms
        return total, last


def make_targets(objects: int, classes: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand(objects, 2, generator=generator) * 0.6 + 0.2
    sizes = torch.rand(objects, 2, generator=generator) * 0.3 + 0.05
    return [{"labels": torch.randint(0, classes, (objects,), generator=generator),
             "boxes": torch.cat((centres, sizes), -1)}]


def build(one2many: int, attention: str, device, dn_queries: int = 0, one2one: int = 300) -> DeformableDETR:
    recipe = load_recipe(RECIPE, [f"model.one2many_queries={one2many}", f"model.hybrid_attention={attention}",
                                  f"model.dn_queries={dn_queries}", f"model.one2one_queries={one2one}",
                                  "model.pretrained=null"])
    torch.manual_seed(0)
    return DeformableDETR(recipe.model.detector_config(80)).to(device).train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--objects", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip", nargs="*", default=[], help="leave out variants whose name contains a word")
    args = parser.parse_args()
    device = torch.device(args.device)

    images = torch.randn(1, 3, args.height, args.width, device=device)
    mask = torch.zeros(1, args.height, args.width, dtype=torch.bool, device=device)
    targets = [{k: v.to(device) for k, v in t.items()} for t in make_targets(args.objects, 80, 0)]
    dn = denoising_groups(100, args.objects) * 2 * args.objects  # denoising queries of this batch
    variants = {
        "baseline (300 queries)": (build(0, "grouped", device), SetCriterion(80)),
        "hybrid 300+1500, dfx (grouped attention, tiled cost)": (build(1500, "grouped", device), SetCriterion(80)),
        "hybrid 300+1500, masked attention, repeated targets": (build(1500, "masked", device),
                                                               ExplicitRepeatCriterion(80)),
        f"DINO denoising, 300 + {dn} dn queries": (build(0, "grouped", device, dn_queries=100), SetCriterion(80)),
        f"DINO queries, 900 + {dn} dn queries": (build(0, "grouped", device, dn_queries=100, one2one=900),
                                                 SetCriterion(80)),
        f"DINO + hybrid, 300+1500 + {dn} dn queries": (build(1500, "grouped", device, dn_queries=100),
                                                       SetCriterion(80)),
    }
    if args.skip:
        variants = {name: v for name, v in variants.items() if name.startswith("baseline")
                    or not any(word in name for word in args.skip)}
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-5) for name, (model, _) in variants.items()}

    def step(name: str) -> float:
        model, criterion = variants[name]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        loss, _ = criterion(model(images, mask, targets), targets)
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[name].step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    times = {name: [] for name in variants}
    for round_ in range(args.warmup + args.repeats):
        for name in variants:
            elapsed = step(name)
            if round_ >= args.warmup:
                times[name].append(elapsed)
        print(f"round {round_ + 1}/{args.warmup + args.repeats}: "
              + ", ".join(f"{t[-1]:.2f}s" for t in times.values() if t), file=sys.stderr, flush=True)

    base = statistics.median(times["baseline (300 queries)"])
    print(f"\nTraining step, R50 Deformable-DETR / H-DETR / DINO, one {args.height}x{args.width} image, "
          f"{args.objects} objects, "
          f"{device.type}{'' if device.type == 'cuda' else f' ({torch.get_num_threads()} threads)'}, "
          f"median of {args.repeats} after {args.warmup} warm-up, torch {torch.__version__}\n")
    print("| variant | step (s) | vs baseline |")
    print("|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {median / base:.3f}x |")


if __name__ == "__main__":
    main()

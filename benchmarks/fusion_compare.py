"""Fusion strategies side by side on shapes-rgbd: `dfx fuse --compare` with the quickstart recipe.

Trains none, concat, exchange, cross-attn and gemini with recipes/gemini-shapes.yaml (same data,
seed and schedule), then writes the table and the plot into docs/: the block between the
``<!-- compare:begin -->`` and ``<!-- compare:end -->`` markers of docs/fuse.md, and
docs/fuse_compare.png.

Usage:
    python benchmarks/fusion_compare.py [--recipe R] [--strategies LIST] [--device cpu] [a.b=c ...]

Run it from an empty folder or pass --out; each strategy gets its run directory under runs/fusion/.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from dfx.compare import Variant, compare, markdown
from dfx.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "fuse.md"
BEGIN, END = "<!-- compare:begin -->", "<!-- compare:end -->"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "gemini-shapes.yaml"))
    parser.add_argument("--strategies", default="none,concat,exchange,cross-attn,gemini")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="folder for the runs (default runs/fusion/...)")
    parser.add_argument("--no-docs", action="store_true", help="print the table, leave docs/ alone")
    parser.add_argument("overrides", nargs="*", help="recipe overrides a.b=c")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    variants = [Variant(s, args.recipe, [f"model.fusion={s}"]) for s in args.strategies.split(",")]
    result = compare(variants, args.overrides, seeds=[recipe.train.seed], out=args.out or "runs/compare/fusion",
                     device=args.device, log=lambda line: print(line, file=sys.stderr, flush=True))
    table = markdown(result)
    size = recipe.data.size
    note = (f"`dfx fuse {Path(args.recipe).relative_to(ROOT) if Path(args.recipe).is_relative_to(ROOT) else args.recipe}"
            f" --compare {args.strategies}{' ' + ' '.join(args.overrides) if args.overrides else ''}`: "
            f"{recipe.train.epochs} epochs, seed {recipe.train.seed}, {size[0]}x{size[1]} inputs, final-epoch "
            f"validation mIoU (ensemble, and per stream); latency: batch 1, {args.device}, "
            f"{torch.get_num_threads()} thread(s), torch {torch.__version__}; GFLOPs per image (1 multiply-add = 2 "
            "FLOPs); train: wall seconds per run.")
    print(table + "\n" + note)
    if not args.no_docs:
        text = DOC.read_text()
        start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
        DOC.write_text(text[:start] + "\n" + note + "\n\n" + table + text[stop:])
        shutil.copy(Path(result["dir"]) / "compare.png", ROOT / "docs" / "fuse_compare.png")
        print(f"wrote {DOC} and docs/fuse_compare.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

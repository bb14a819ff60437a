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

from dfx.tasks.fusion import compare, markdown_table

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
    result = compare(args.recipe, args.strategies, args.overrides, out=args.out, device=args.device, quiet=True)
    table = markdown_table(result["rows"])
    epochs, device = result["epochs"], result["device"]
    note = (f"`dfx fuse {Path(args.recipe).relative_to(ROOT) if Path(args.recipe).is_relative_to(ROOT) else args.recipe}"
            f" --compare {args.strategies}{' ' + ' '.join(args.overrides) if args.overrides else ''}`: {epochs} epochs, "
            f"seed {result['seed']}, {result['image_size'][0]}x{result['image_size'][1]} inputs, final-epoch "
            f"validation metrics (250 images); latency: batch 1, {device}, {result['threads']} thread(s), "
            f"torch {result['torch']}; GFLOPs per image (1 multiply-add = 2 FLOPs).")
    print(table + "\n" + note)
    if not args.no_docs:
        text = DOC.read_text()
        start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
        DOC.write_text(text[:start] + "\n" + note + "\n\n" + table + text[stop:])
        shutil.copy(Path(result["table_dir"]) / "compare.png", ROOT / "docs" / "fuse_compare.png")
        print(f"wrote {DOC} and docs/fuse_compare.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

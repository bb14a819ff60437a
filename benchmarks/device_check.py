"""One command that checks dfx on a GPU and writes one JSON and one markdown table.

    python benchmarks/device_check.py [--out DIR] [--budget-s 480]
    python benchmarks/device_check.py --smoke        # every check at toy size on the CPU (< 2 min)

On a machine without CUDA (and without --smoke) it says so and exits 0. The checks, each in its
own process with a time limit so that one failure or hang never hides the others:

1. the CUDA tests of the suite (pytest -m cuda);
2. AMP training steps (bf16 and fp16) of every paper recipe's model at its real input size, on a
   synthetic batch: the loss stays finite; median step time and peak memory;
3. ms_deform_attn forward/backward on CUDA against the per-level grid_sample formulation at
   Deformable-DETR's shapes (benchmarks/ms_deform_attn.py);
4. the H-DETR training-step overhead at 800x1333 (benchmarks/hybrid_overhead.py);
5. GeminiFusion against the per-image formulation (benchmarks/fusion.py);
6. Expedit clustering of vit_large_patch16_384 at batch 8 (dfx bench --cluster-ratio 0.5).

Writes DIR/device_check.json (every check's status, seconds and numbers) and DIR/device_check.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
# The paper recipes and what their model is built with when the recipe names no classes.
PAPER_RECIPES = {
    "hdetr.yaml": ["model.num_classes=80"],
    "deformable-detr.yaml": ["model.num_classes=80"],
    "dino.yaml": ["model.num_classes=80"],
    "gemini-nyudv2-mitb3.yaml": [],
    "gemini-deliver-mitb2.yaml": [],
}
SMOKE_OVERRIDES = {  # toy sizes of the same code paths for --smoke
    "detection": ["model.backbone=resnet18", "model.encoder_layers=1", "model.decoder_layers=2",
                  "model.one2one_queries=10", "model.one2many_queries=20", "model.dim=32", "model.ffn_dim=64",
                  "data.scales=[96]", "data.max_size=128"],
    "fusion": ["model.variant=b0", "model.depths=[1,1,1,1]", "model.decoder_dim=32", "data.image_size=[64,64]"],
}


def synthetic_batch(recipe, task, batch: int, size: tuple[int, int], device: torch.device):
    """A batch in the task's training format, random content of the recipe's class count."""
    g = torch.Generator().manual_seed(0)
    classes = len(task.classes)
    if recipe.task == "detection":
        images = torch.randn(batch, 3, *size, generator=g)
        masks = torch.zeros(batch, *size, dtype=torch.bool)
        targets = []
        for _ in range(batch):
            centres, sides = 0.2 + 0.6 * torch.rand(7, 2, generator=g), 0.05 + 0.25 * torch.rand(7, 2, generator=g)
            targets.append({"labels": torch.randint(classes, (7,), generator=g).to(device),
                            "boxes": torch.cat([centres, sides], 1).to(device)})
        return images.to(device), masks.to(device), targets
    if recipe.task == "fusion":
        images = torch.randn(batch, len(recipe.data.modalities), 3, *size, generator=g)
        return images.to(device), torch.randint(classes, (batch, *size), generator=g).to(device)
    return (torch.randn(batch, 3, *size, generator=g).to(device),
            torch.randint(classes, (batch,), generator=g).to(device))


def amp_steps(recipe_file: Path, overrides: list[str], dtype: torch.dtype, device: torch.device, steps: int,
              batch: int = 2) -> dict:
    """``steps`` AdamW training steps under autocast(dtype); loss finite, step time, peak memory."""
    from dfx.models import build, native_size

    recipe, task, model, _ = build(recipe_file, [*overrides, "model.pretrained=null"])
    model.to(device).train()
    size = native_size(recipe) or 224
    if recipe.task == "detection":
        size = (size, recipe.data.max_size)
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    data = synthetic_batch(recipe, task, batch, size, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, times = [], []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype):
            loss, _ = task.loss(model, data)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    return {"recipe": recipe_file.name, "dtype": str(dtype).replace("torch.", ""), "input": list(size),
            "batch": batch, "losses": losses, "finite": all(math.isfinite(v) for v in losses),
            "step_s": statistics.median(times[1:] or times),
            "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def run_process(name: str, args: list[str], timeout: float) -> dict:
    """Run one check in a child process; its status, seconds, and its JSON output when it prints one."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    except subprocess.TimeoutExpired:
        return {"check": name, "status": "timeout", "seconds": round(time.perf_counter() - start, 1)}
    result = {"check": name, "status": "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})",
              "seconds": round(time.perf_counter() - start, 1)}
    lines = proc.stdout.strip().splitlines()
    try:
        result["result"] = json.loads(lines[-1]) if lines else None
    except ValueError:
        result["output"] = "\n".join(lines[-25:])
    if proc.returncode != 0:
        result["stderr"] = "\n".join(proc.stderr.strip().splitlines()[-15:])
    return result


def checks(smoke: bool, device: str) -> list[tuple[str, list[str], float]]:
    python = sys.executable
    bench = REPO / "benchmarks"
    if smoke:
        return [
            ("ms_deform_attn vs grid_sample", [python, str(bench / "ms_deform_attn.py"), "--quick", "--json",
                                               "--device", device], 120),
            ("H-DETR step overhead", [python, str(bench / "hybrid_overhead.py"), "--device", device, "--height",
                                      "320", "--width", "416", "--repeats", "1", "--warmup", "0"], 180),
            ("GeminiFusion vs per-image", [python, str(bench / "fusion.py"), "--quick", "--json", "--device",
                                           device], 120),
            ("clustering vit_tiny 224 batch 2", [python, "-m", "dfx", "bench", "--model", "vit_tiny_patch16_224",
                                                 "--cluster-ratio", "0.5", "--batch", "2", "--repeats", "2",
                                                 "--warmup", "1", "--device", device, "--json"], 120),
        ]
    return [
        ("CUDA tests", [python, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"], 150),
        ("ms_deform_attn vs grid_sample", [python, str(bench / "ms_deform_attn.py"), "--json", "--device", device],
         90),
        ("H-DETR step overhead 800x1333", [python, str(bench / "hybrid_overhead.py"), "--device", device,
                                           "--repeats", "10", "--warmup", "2"], 120),
        ("GeminiFusion vs per-image", [python, str(bench / "fusion.py"), "--json", "--device", device], 90),
        ("clustering vit_large_patch16_384 batch 8", [python, "-m", "dfx", "bench", "--model",
                                                      "vit_large_patch16_384", "--cluster-ratio", "0.5", "--batch",
                                                      "8", "--device", device, "--json"], 90),
    ]


def markdown(report: dict) -> str:
    lines = [f"Device check: {report['device']}, torch {report['torch']}, {report['total_s']:.0f} s in all.", "",
             "| check | status | seconds | numbers |", "|---|---|---:|---|"]
    for item in report["checks"]:
        lines.append(f"| {item['check']} | {item['status']} | {item['seconds']:.0f} | {summary_of(item)} |")
    lines += ["", "AMP training steps (synthetic batch, real input size, AdamW):", "",
              "| recipe | dtype | input | batch | loss finite | step (ms) | peak memory (GiB) |",
              "|---|---|---|---:|---|---:|---:|"]
    for item in report["amp"]:
        if "error" in item:
            lines.append(f"| {item['recipe']} | {item['dtype']} | - | - | error: {item['error']} | - | - |")
            continue
        memory = f"{item['peak_mem_gb']:.2f}" if item["peak_mem_gb"] is not None else "-"
        lines.append(f"| {item['recipe']} | {item['dtype']} | {'x'.join(map(str, item['input']))} | {item['batch']} | "
                     f"{'yes' if item['finite'] else 'NO'} | {1e3 * item['step_s']:.0f} | {memory} |")
    return "\n".join(lines) + "\n"


def summary_of(item: dict) -> str:
    """The headline numbers of one check's result, compactly."""
    result = item.get("result")
    rows = result.get("results") or result.get("comparison") if isinstance(result, dict) else None
    if rows:  # the benchmark scripts' per-case rows: speed-up per case, worst mismatch
        cases = [f"{r.get('case', r.get('tokens'))} {r['mode']} {r['speedup']:.2f}x" for r in rows if "speedup" in r]
        worst = max((r.get("max_abs_diff", r.get("mismatch_fraction", 0)) for r in rows), default=0)
        return "speed-up vs reference: " + "; ".join(cases) + f"; max mismatch {worst:.2g}"
    if isinstance(result, dict):
        keys = [k for k in ("speedup", "flops_ratio", "efficiency", "ratio", "max_abs_diff") if k in result]
        if keys:
            return ", ".join(f"{k} {result[k]:.3g}" for k in keys if isinstance(result[k], (int, float)))
        return ", ".join(f"{k}" for k in list(result)[:6])
    text = item.get("output") or item.get("stderr") or ""
    tail = [line for line in text.splitlines() if line.startswith("|") or "passed" in line or "Error" in line]
    return " ".join(tail[-4:]).replace("|", "/")[:300]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for device_check.{json,md}")
    parser.add_argument("--smoke", action="store_true", help="every check at toy size on the CPU")
    parser.add_argument("--steps", type=int, default=4, help="AMP training steps per recipe and dtype")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("device_check: no CUDA device here; nothing to check (use --smoke for a CPU run of the checks)")
        return 0
    device = torch.device("cpu" if args.smoke else "cuda")
    started = time.perf_counter()
    report = {"device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(device),
              "torch": torch.__version__, "checks": [], "amp": []}
    for name, command, limit in checks(args.smoke, device.type):
        print(f"device_check: {name} …", file=sys.stderr, flush=True)
        report["checks"].append(run_process(name, command, limit))
    dtypes = [torch.bfloat16] if args.smoke else [torch.bfloat16, torch.float16]
    for file, overrides in PAPER_RECIPES.items():
        if not (RECIPES / file).is_file():
            continue
        for dtype in dtypes:
            print(f"device_check: AMP steps {file} {dtype} …", file=sys.stderr, flush=True)
            extra = SMOKE_OVERRIDES.get(_task_of(RECIPES / file), []) if args.smoke else []
            try:
                report["amp"].append(amp_steps(RECIPES / file, [*overrides, *extra], dtype, device,
                                               2 if args.smoke else args.steps, batch=1 if args.smoke else 2))
            except Exception as e:  # one recipe failing must not hide the others
                report["amp"].append({"recipe": file, "dtype": str(dtype), "error": f"{type(e).__name__}: "
                                      + (str(e).splitlines() or [""])[0][:200]})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    report["total_s"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "device_check.json").write_text(json.dumps(report, indent=1, default=str))
    (args.out / "device_check.md").write_text(markdown(report))
    print(markdown(report))
    failed = [c["check"] for c in report["checks"] if c["status"] != "ok"]
    failed += [f"{a['recipe']} {a['dtype']}" for a in report["amp"] if "error" in a or not a.get("finite")]
    if failed:
        print(f"device_check: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _task_of(recipe_file: Path) -> str:
    from dfx.recipe import load_tree

    return str(load_tree(recipe_file).get("task"))


if __name__ == "__main__":
    sys.exit(main())

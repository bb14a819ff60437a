"""Evaluate a trained model from a run directory or a dfx checkpoint file."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from dfx.engine import checkpoint as ckpt
from dfx.engine import distributed as D
from dfx.errors import RunError, UsageError
from dfx.recipe import Recipe, build_recipe, apply_overrides, task_module


def find_checkpoint(path: str | Path) -> Path:
    """A run directory's best checkpoint (else last), or the checkpoint file itself."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (path / "checkpoints" / name).is_file():
                return path / "checkpoints" / name
        raise UsageError(f"{path}: no checkpoints/best.safetensors or last.safetensors; is this a dfx run directory?")
    if path.is_file():
        return path
    raise UsageError(f"{path}: no such run directory or checkpoint file")


def load_model(path: str | Path, overrides: Iterable[str] = (), device: str | torch.device = "cpu"):
    """(recipe, task, model in eval mode, checkpoint metadata) from a run directory or checkpoint.

    The recipe comes from the checkpoint's metadata (the run's fully resolved recipe), with
    ``overrides`` on top (e.g. ``data.root=...`` to evaluate on other data).
    """
    file = find_checkpoint(path)
    meta = ckpt.read_metadata(file)
    if meta.get("format") != "dfx" or not isinstance(meta.get("recipe"), dict):
        raise RunError(f"{file}: not a dfx checkpoint (no recipe in its metadata); "
                       "use the run directory it came from or a file written by `dfx train`")
    tree = meta["recipe"]
    if tree.get("model", {}).get("pretrained"):
        # every weight is in the checkpoint: do not fetch the starting weights again (offline-safe)
        tree = apply_overrides(tree, ["model.pretrained=null"])
    recipe: Recipe = build_recipe(apply_overrides(tree, list(overrides)), name=str(meta.get("name", "run")))
    task = task_module(recipe.task).Task(recipe)
    info = meta.get("info") or {}
    if "classes" in info:
        task.classes = info["classes"]
    model = task.build_model()
    try:
        model.load_state_dict(ckpt.load_weights(file))
    except RuntimeError as e:
        raise RunError(f"{file} does not fit the recipe's model: {str(e).splitlines()[0]}") from None
    device = device if isinstance(device, torch.device) else D.resolve_device(device)
    return recipe, task, model.to(device).eval(), meta


def evaluate_checkpoint(path: str | Path, overrides: Iterable[str] = (), device: str = "auto",
                        progress: bool = False) -> dict:
    """``{"metrics": {...}, "checkpoint": PATH, "epoch": N}`` on the recipe's validation data.

    ``progress``: a progress bar (or plain lines) over the validation batches on stderr.
    """
    from dfx.engine.trainer import evaluate, make_loader

    ctx = D.Context(device=D.resolve_device(device))
    recipe, task, model, meta = load_model(path, overrides, ctx.device)
    val_set = task.dataset("val")
    loader = make_loader(val_set, recipe.eval.batch_size, ctx, shuffle=False, seed=0,
                         num_workers=recipe.train.num_workers, collate_fn=task.collate_fn)
    file = find_checkpoint(path)
    if hasattr(task, "output_dir"):  # predictions and plots go beside the run: RUN/eval/
        task.output_dir = (Path(path) if Path(path).is_dir() else file.parent) / "eval"
    metrics = evaluate(task, model, loader, ctx, progress=progress)
    return {"metrics": metrics, "checkpoint": str(file), "epoch": meta.get("epoch"), **getattr(task, "outputs", {})}

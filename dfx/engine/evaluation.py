"""Evaluate a trained model: a run directory, a dfx checkpoint, or a recipe with ``model.weights``."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from dfx.engine import distributed as D
from dfx.engine.rundir import new_run_dir
from dfx.errors import UsageError
from dfx.weights import find_checkpoint


def load_model(path: str | Path, overrides: Iterable[str] = (), device: str | torch.device = "cpu"):
    """(recipe, task, model in eval mode, checkpoint metadata) from a run directory, a checkpoint, or a
    recipe file with ``model.weights=...`` among the overrides.

    From a run or checkpoint the recipe comes from its metadata (the run's fully resolved recipe),
    with ``overrides`` on top (e.g. ``data.root=...`` to evaluate on other data). The classes come
    from the checkpoint or the recipe, else from the validation data.
    """
    from dfx.models import build

    recipe, task, model, meta = build(path, overrides, read_data=True)
    device = device if isinstance(device, torch.device) else D.resolve_device(device)
    return recipe, task, model.to(device).eval(), meta


def evaluate_checkpoint(path: str | Path, overrides: Iterable[str] = (), device: str = "auto",
                        progress: bool = False) -> dict:
    """``{"metrics": {...}, "checkpoint": PATH, "epoch": N}`` on the recipe's validation data.

    ``path``: a run directory, a dfx checkpoint, or a recipe file whose ``model.weights`` (set in it
    or in ``overrides``) names the weights — e.g. a released checkpoint of the reference code.
    ``progress``: a progress bar (or plain lines) over the validation batches on stderr.
    """
    from dfx.engine.trainer import evaluate, make_loader

    ctx = D.Context(device=D.resolve_device(device))
    recipe, task, model, meta = load_model(path, overrides, ctx.device)
    if not meta and not recipe.model.weights:
        raise UsageError(f"{path}: a recipe evaluates the weights named by model.weights; pass model.weights=FILE "
                         "(a dfx checkpoint, run directory, hf://… or released checkpoint), or evaluate a run directory")
    val_set = task.dataset("val")
    loader = make_loader(val_set, recipe.eval.batch_size, ctx, shuffle=False, seed=0,
                         num_workers=recipe.train.num_workers, collate_fn=task.collate_fn)
    weights = recipe.model.weights
    if Path(weights).expanduser().exists():  # a run directory: name the file that was loaded
        weights = str(find_checkpoint(weights))
    if hasattr(task, "output_dir"):  # predictions and plots go beside the run (RUN/eval/) or the recipe's runs
        if meta:
            task.output_dir = (Path(path) if Path(path).is_dir() else Path(path).parent) / "eval"
        else:
            task.output_dir = new_run_dir(recipe.task, f"{recipe.name}-eval")
    metrics = evaluate(task, model, loader, ctx, progress=progress)
    return {"metrics": metrics, "checkpoint": weights, "epoch": meta.get("epoch"),
            **getattr(task, "outputs", {})}

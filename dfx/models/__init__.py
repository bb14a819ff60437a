"""Models from Python: ``dfx.create_model(recipe, overrides=(), weights=None)``.

The model of any task, built from a recipe (file or shipped name), a run directory or a dfx checkpoint without
reading the dataset (the classes come from the checkpoint, ``data.classes`` or
``model.num_classes``), with ``model.weights`` loaded, in eval mode. :func:`build_any` also takes
timm model names (what ``dfx bench`` and ``dfx cluster`` measure). Model classes that belong to
no single method live here too (:mod:`dfx.models.segmenter`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from dfx.errors import UsageError
from dfx.recipe import RECIPE_SUFFIXES, Recipe, apply_overrides, build_recipe, find_shipped, load_recipe, task_module


def read_source(source: str | os.PathLike, overrides: Iterable[str] = (),
                weights: str | os.PathLike | None = None) -> tuple[Recipe, dict]:
    """(recipe, checkpoint metadata) for a recipe file, a run directory or a dfx checkpoint.

    From a run or checkpoint the recipe is the recorded one and ``model.weights`` defaults to that
    checkpoint (its ``model.pretrained`` is dropped: every weight is in the checkpoint, and no
    download is needed offline). ``weights`` replaces ``model.weights``; ``overrides`` go on top.
    """
    from dfx.engine.checkpoint import read_metadata
    from dfx.weights import find_checkpoint

    path = Path(source).expanduser()
    extra = [f"model.weights={weights}"] if weights is not None else []
    if path.suffix in RECIPE_SUFFIXES or (not path.exists() and find_shipped(path) is not None):
        return load_recipe(path, [*overrides, *extra]), {}
    file = find_checkpoint(path)
    meta = read_metadata(file)
    if meta.get("format") != "dfx" or not isinstance(meta.get("recipe"), dict):
        raise UsageError(f"{file}: not a dfx checkpoint (no recipe in its metadata); pass a recipe and "
                         "model.weights=FILE to load a released checkpoint")
    recorded = [f"model.weights={file}", "model.pretrained=null"]
    tree = apply_overrides(meta["recipe"], [*recorded, *overrides, *extra])
    return build_recipe(tree, name=str(meta.get("name", "run"))), meta


def recipe_classes(recipe: Recipe) -> list[str] | None:
    """The classes a recipe names without its data: ``data.classes``, else ``model.num_classes`` numbered."""
    listed = getattr(recipe.data, "classes", None)
    if listed:
        return list(listed)
    count = getattr(recipe.model, "num_classes", 0) or 0
    return [f"class_{i}" for i in range(count)] if count else None


def build(source: str | os.PathLike, overrides: Iterable[str] = (), weights: str | os.PathLike | None = None,
          *, read_data: bool = False):
    """(recipe, task, model in eval mode, metadata). The classes come from the checkpoint; else, with
    ``read_data``, from the dataset (evaluation); else from the recipe (:func:`recipe_classes`)."""
    recipe, meta = read_source(source, overrides, weights)
    task = task_module(recipe.task).Task(recipe)
    if not getattr(task, "has_classes", True):  # a regression task (depth): no class list to find
        return recipe, task, task.build_model().eval(), meta
    task.classes = (meta.get("info") or {}).get("classes")
    if task.classes is None and not read_data:
        task.classes = recipe_classes(recipe)
    if task.classes is None and not read_data:
        raise UsageError(f"{recipe.source or source}: the recipe names no classes; set model.num_classes "
                         "(or data.classes), or build from a run directory / dfx checkpoint that records them")
    return recipe, task, task.build_model().eval(), meta


def create_model(recipe: str | os.PathLike, overrides: Iterable[str] = (),
                 weights: str | os.PathLike | None = None) -> nn.Module:
    """The task's model built from ``recipe`` (a recipe path, run directory or dfx checkpoint) with
    ``overrides`` ("a.b=c" strings) applied and ``weights`` (or ``model.weights``) loaded, in eval
    mode. The dataset is never read. See DESIGN.md, "Models from Python", for each task's forward."""
    return build(recipe, overrides, weights)[2]


def build_any(spec: str, device: torch.device, image_size: int | None = None) -> tuple[nn.Module, str, int | None]:
    """(model in eval mode, description, native image size) from a run directory, checkpoint, recipe
    (file or shipped name; its weights when ``model.weights`` is set, else its initialisation) or timm model name
    (random weights, built for ``image_size`` where the model takes one)."""
    path = Path(spec)
    if path.is_dir() or path.suffix in (".safetensors", *RECIPE_SUFFIXES) or find_shipped(path) is not None:
        recipe, _, model, _ = build(path, read_data=True)
        return model.to(device), f"{model_name(recipe)} ({path})", native_size(recipe)
    import timm

    from dfx.hub import ALIASES

    name = ALIASES.get(spec, spec)
    try:
        try:  # ViT-style models are built for the benchmarked size (position embeddings)
            model = timm.create_model(name, pretrained=False, **({"img_size": image_size} if image_size else {}))
        except TypeError:  # CNNs take any size and have no img_size argument
            model = timm.create_model(name, pretrained=False)
    except RuntimeError as e:
        raise UsageError(f"--model {spec!r}: not a run directory, checkpoint, recipe or timm model ({e})") from None
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    return model.to(device).eval(), name, size


def model_name(recipe) -> str:
    """What a recipe's model is called: a timm name, a detector's backbone, or the task."""
    model = recipe.model
    if hasattr(model, "name"):
        return model.name
    if hasattr(model, "backbone"):
        return f"{recipe.task} ({model.backbone})"
    return recipe.task


def native_size(recipe) -> int | None:
    """The square input size a recipe's model is evaluated at (detection: its largest scale)."""
    data = recipe.data
    if hasattr(data, "image_size"):
        return data.image_size
    return max(data.scales) if getattr(data, "scales", None) else None

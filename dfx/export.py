"""``dfx export``: a trained model as an ONNX file, checked with onnxruntime against PyTorch.

The graph is traced with PyTorch's TorchScript-based exporter (``torch.onnx.export(dynamo=False)``,
opset 17; the torch.export-based one needs onnxscript and more). Inputs and outputs:

* detection: ``images [B, 3, H, W]`` and ``mask [B, H, W]`` bool (True at padding) ->
  ``pred_logits [B, Q, K]``, ``pred_boxes [B, Q, 4]`` (cxcywh in [0, 1] of the unpadded image) and,
  with ``model.masks`` (MaskDINO), ``pred_masks [B, Q, H/4, W/4]`` (mask logits on the padded input);
  the deformable attention runs through ``grid_sample`` (dfx.ops.ms_deform_attn_grid_sample);
  top-k post-processing stays outside the graph (dfx.detection.postprocess);
* segmentation: ``images [B, 3, S, S]`` -> ``logits [B, K, S, S]``;
* fusion: one input per modality, named after it, ``[B, 3, H, W]`` -> ``logits [B, K, H, W]``
  (the ensemble);
* classification: ``images [B, 3, S, S]`` -> ``logits [B, K]``.
* depth: ``images [B, 3, H, W]`` -> ``depth [B, 1, H, W]`` (metres, or relative inverse depth).

H and W are fixed at export (``image_size``; detection pads smaller images and marks the padding
in ``mask``); ``dynamic_batch`` leaves B free. Inputs are normalised as the recipe's data section
says (mean / std); the file's metadata records the task, classes, mean, std and input size.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn

from dfx.errors import RunError, UsageError

OPSET = 17  # GridSample needs >= 16
TOLERANCE = 1e-3
INSTALL_HINT = 'dfx export needs onnx and onnxruntime: pip install "dfx[export]"'


def require_onnx():
    """(onnx, onnxruntime), or a UsageError saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise UsageError(f"{INSTALL_HINT} ({e})") from None
    return onnx, onnxruntime


class DetectionGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, mask):
        out = self.model(images, mask)
        names = [name for name in ("pred_logits", "pred_boxes", "pred_masks", "pred_keypoints") if name in out]
        return tuple(out[name].float() for name in names)  # float32 even where the exporter promoted


class FusionGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *modalities):
        return self.model(torch.stack(modalities, 1))  # [B, M, 3, H, W] -> ensemble logits


def _input_size(recipe, image_size: list[int] | None) -> tuple[int, int]:
    if image_size:
        if len(image_size) not in (1, 2) or min(image_size) < 1:
            raise UsageError(f"--image-size: expected S or H W in pixels, got {image_size}")
        return (image_size[0], image_size[-1])
    data = recipe.data
    if recipe.task == "detection":
        return (max(data.scales), max(data.scales))
    if recipe.task in ("fusion", "depth", "translation"):
        return tuple(data.size)
    return (data.image_size, data.image_size)


def example_inputs(recipe, size: tuple[int, int], image: str | os.PathLike | None, modalities: dict | None = None):
    """(input names, tensors at batch 1, what they were made from) for the export and its check.

    With ``image`` the tensors are that picture read and normalised as ``dfx predict`` does (fusion:
    ``modalities`` maps the other modalities to their files); without, seeded noise.
    """
    from dfx.predict import PREDICTORS

    if recipe.task in ("fusion", "translation"):
        names = list(recipe.data.modalities)
    else:
        names = ["images", "mask"] if recipe.task == "detection" else ["images"]
    if image is None:
        generator = torch.Generator().manual_seed(0)
        count = len(names) if recipe.task in ("fusion", "translation") else 1
        tensors = [torch.randn(1, 3, *size, generator=generator) for _ in range(count)]
        if recipe.task == "detection":
            tensors.append(torch.zeros(1, *size, dtype=torch.bool))
        return names, tensors, "seeded noise"
    paths = [Path(image)]
    if recipe.task in ("fusion", "translation"):
        missing = [n for n in names[1:] if n not in (modalities or {})]
        if missing:
            raise UsageError(f"--image is the {names[0]} image; pass the others too: "
                             + " ".join(f"--modality {n}=FILE" for n in missing))
        paths += [Path(modalities[n]) for n in names[1:]]
    for path in paths:
        if not path.is_file():
            raise UsageError(f"--image {path}: no such file")
    try:
        if recipe.task == "detection":  # resized as dfx predict does, to fit the canvas
            from dfx.data.det_transforms import DetectionTransform
            from dfx.data.images import read_rgb

            transform = DetectionTransform(False, scales=[min(size)], max_size=max(size), mean=recipe.data.mean,
                                           std=recipe.data.std)
            tensor, _ = transform(read_rgb(paths[0]), {"boxes": torch.zeros(0, 4),
                                                         "labels": torch.zeros(0, dtype=torch.long)})
        else:
            _, tensor = PREDICTORS[recipe.task](recipe, [], 0.0, Path(".")).load(paths)
    except (OSError, ValueError) as e:
        raise UsageError(f"--image {image}: cannot read it ({e})") from None
    if recipe.task == "detection":  # pad into the fixed H x W canvas; the mask marks the padding
        canvas = torch.zeros(1, 3, *size)
        mask = torch.ones(1, *size, dtype=torch.bool)
        height, width = min(tensor.shape[1], size[0]), min(tensor.shape[2], size[1])
        canvas[0, :, :height, :width] = tensor[:, :height, :width]
        mask[0, :height, :width] = False
        return names, [canvas, mask], str(image)
    if recipe.task in ("fusion", "translation"):
        return names, [t[None] for t in tensor.unbind(0)], ", ".join(map(str, paths))
    return names, [tensor[None]], str(image)


def export(weights: str | os.PathLike, *, format: str = "onnx", out: str | os.PathLike | None = None,
           dynamic_batch: bool = False, image: str | os.PathLike | None = None,
           modalities: dict[str, str] | None = None, image_size: list[int] | None = None,
           overrides: Iterable[str] = ()) -> dict:
    """Export the model of ``weights`` (run directory, dfx checkpoint, or recipe with model.weights) to
    ONNX and compare onnxruntime's outputs with PyTorch's on ``image`` (batch 1, and batch 2 with
    ``dynamic_batch``). Returns the file, its inputs / outputs and the check's numbers."""
    from dfx.engine.rundir import check_out_path, new_run_dir
    from dfx.models import build

    if format != "onnx":
        raise UsageError(f"--format {format!r}: dfx exports onnx only")
    onnx, onnxruntime = require_onnx()
    recipe, task, model, meta = build(weights, overrides)
    if not meta and not recipe.model.weights:
        raise UsageError(f"{weights}: a recipe exports the weights named by model.weights; pass model.weights=FILE, "
                         "or a run directory or dfx checkpoint")
    graphs = {"detection": DetectionGraph, "fusion": FusionGraph, "translation": FusionGraph}
    if recipe.task not in ("detection", "fusion", "segmentation", "classification", "distillation", "depth",
                           "translation"):
        raise UsageError(f"dfx export does not handle task {recipe.task!r}")
    graph = graphs.get(recipe.task, lambda m: m)(model.float().cpu()).eval()
    size = _input_size(recipe, image_size)
    names, inputs, source = example_inputs(recipe, size, image, modalities)
    outputs = {"detection": ["pred_logits", "pred_boxes"], "depth": ["depth"],
               "translation": ["image"]}.get(recipe.task, ["logits"])
    if recipe.task == "detection" and recipe.model.masks:
        outputs.append("pred_masks")
    if recipe.task == "detection" and getattr(recipe.model, "keypoints", 0):
        outputs.append("pred_keypoints")
    if out is not None and Path(out).suffix == ".onnx":
        check_out_path(Path(out), "an .onnx file")
    path = Path(out) if out is not None and Path(out).suffix == ".onnx" else \
        new_run_dir("export", recipe.name, out, resumable=False) / "model.onnx"
    if path.exists():
        raise UsageError(f"--out {path}: already exists; choose another file")
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic = {name: {0: "batch"} for name in names + outputs} if dynamic_batch else None
    t0 = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad():
        # the tracer warns about every Python value it freezes (level sizes, shape checks): expected here
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(graph, tuple(inputs), str(path), dynamo=False, opset_version=OPSET, input_names=names,
                              output_names=outputs, dynamic_axes=dynamic)
        except Exception as e:
            raise RunError(f"ONNX export of the {recipe.task} model failed: {str(e).splitlines()[0]}") from e
    seconds = time.perf_counter() - t0
    _write_metadata(onnx, path, recipe, task.classes, size)
    check = check_onnx(onnxruntime, path, graph, names, inputs, outputs, batches=(1, 2) if dynamic_batch else (1,))
    check["input"] = source
    result = {"file": str(path), "task": recipe.task, "inputs": {n: list(t.shape) for n, t in zip(names, inputs)},
              "outputs": outputs, "dynamic_batch": dynamic_batch, "opset": OPSET, "exporter": "torchscript",
              "export_s": round(seconds, 2), "size_mb": round(path.stat().st_size / 2**20, 2), "check": check}
    if not check["passed"]:
        raise RunError(f"{path}: onnxruntime differs from PyTorch by {check['max_abs_diff']:.3g} (> {TOLERANCE:g}); "
                       "the file is kept for inspection")
    return result


def _write_metadata(onnx, path: Path, recipe, classes, size) -> None:
    from dfx.files import atomic_write

    model = onnx.load(str(path))
    entries = {"dfx_task": recipe.task, "dfx_classes": json.dumps(classes), "dfx_input_size": json.dumps(size),
               "dfx_mean": json.dumps(list(recipe.data.mean)), "dfx_std": json.dumps(list(recipe.data.std))}
    for key, value in entries.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    atomic_write(path, lambda tmp: onnx.save(model, str(tmp)))


def check_onnx(onnxruntime, path: Path, graph: nn.Module, names: list[str], inputs: list[torch.Tensor],
               outputs: list[str], batches=(1,)) -> dict:
    """Largest absolute difference between onnxruntime and PyTorch, per output, at each batch size
    (batch 2: the input and its horizontal flip)."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diffs: dict[str, float] = {}
    for batch in batches:
        feed = inputs if batch == 1 else [torch.cat([t, t.flip(-1)]) for t in inputs]
        with torch.no_grad():
            expected = graph(*feed)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = session.run(outputs, {n: t.numpy() for n, t in zip(names, feed)})
        for name, want, have in zip(outputs, expected, got):
            key = name if len(batches) == 1 else f"{name}@batch{batch}"
            diffs[key] = float(np.abs(want.numpy() - have).max())
    worst = max(diffs.values())
    return {"max_abs_diff": worst, "per_output": diffs, "tolerance": TOLERANCE, "passed": worst <= TOLERANCE}

"""Semantic segmentation: a plain timm ViT with a Segmenter-style linear decoder.

Recipe sections: ``model`` (classification's ModelConfig: a timm ViT name and its kwargs),
``data`` (:class:`DataConfig`), ``train`` (:class:`dfx.recipe.TrainConfig`), ``eval``
(:class:`EvalConfig`, metric ``mIoU``). Data: a segmentation root (dfx.data.segmentation) or the
embedded ``shapes-seg``. Loss: per-pixel cross-entropy, label 255 ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfx import hub
from dfx.data.segmentation import IGNORE_INDEX, SegmentationFolder, SegmentationTransform
from dfx.errors import UsageError
from dfx.models.segmenter import Segmenter
from dfx.weights import load_recipe_weights
from dfx.recipe import EvalConfig as BaseEvalConfig
from dfx.recipe import TrainConfig
from dfx.tasks.classification import ModelConfig, agreed_classes, data_root


def check_crop_augmentation(prefix: str, scale: list[float], ratio: list[float], hflip: float) -> None:
    """Validate the random-resized-crop and flip settings shared by the segmentation data sections."""
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise UsageError(f"{prefix}.scale: expected [min, max] with 0 < min <= max <= 1, got {scale}")
    if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
        raise UsageError(f"{prefix}.ratio: expected [min, max] with 0 < min <= max, got {ratio}")
    if not 0 <= hflip <= 1:
        raise UsageError(f"{prefix}.hflip: expected a probability in [0, 1], got {hflip}")


@dataclass
class DataConfig:
    """A segmentation root (or ``shapes-seg``) and the aligned augmentation of image and label."""

    root: str = "shapes-seg"
    image_size: int = 64
    scale: list[float] = field(default_factory=lambda: [0.5, 1.0])  # random resized crop: area share
    ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333])  # and aspect ratio
    hflip: float = 0.5
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    def validate(self, prefix: str) -> None:
        check_crop_augmentation(prefix, self.scale, self.ratio, self.hflip)
        if self.image_size < 1:
            raise UsageError(f"{prefix}.image_size: expected a positive size in pixels, got {self.image_size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise UsageError(f"{prefix}.mean/std: expected three values (RGB)")


@dataclass
class EvalConfig(BaseEvalConfig):
    batch_size: int = 64
    metric: str = "mIoU"


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig}


def build_segmenter(model: ModelConfig, num_classes: int) -> Segmenter:
    """A Segmenter from the recipe's ``model`` section (a timm ViT; its classifier is dropped)."""
    kwargs = dict(model.kwargs)
    if model.drop_path_rate:
        kwargs["drop_path_rate"] = model.drop_path_rate
    try:
        backbone = hub.create_timm_model(model.name, pretrained=None if model.weights else model.pretrained,
                                         **{**kwargs, "num_classes": 0})
    except TypeError as e:
        raise UsageError(f"model.kwargs: {e}") from None
    if not (hasattr(backbone, "patch_embed") and hasattr(backbone, "num_prefix_tokens")):
        raise UsageError(f"model.name: {model.name!r} is not a plain ViT (no patch tokens); segmentation needs a timm "
                         "VisionTransformer such as vit_tiny_patch16_224 or deit_small_patch16_224")
    return Segmenter(backbone, nn.Linear(backbone.num_features, num_classes))


class Task:
    """Builders and per-batch logic for segmentation; the engine owns the loop."""

    collate_fn = None

    def __init__(self, recipe):
        self.recipe = recipe
        self.classes: list[str] | None = None  # from the data, or from the checkpoint when evaluating

    def dataset(self, split: str) -> SegmentationFolder:
        data = self.recipe.data
        transform = SegmentationTransform(data.image_size, split == "train", scale=data.scale, ratio=data.ratio,
                                          hflip=data.hflip, mean=data.mean, std=data.std)
        dataset = SegmentationFolder(data_root(data.root), split, transform)
        self.classes = agreed_classes(self.classes, dataset.classes, data.root)
        return dataset

    def build_model(self) -> Segmenter:
        if self.classes is None:
            self.dataset("val")
        model = build_segmenter(self.recipe.model, len(self.classes))
        load_recipe_weights(model, self.recipe.model)
        return model

    def info(self) -> dict:
        """What a checkpoint should remember besides the recipe."""
        return {"classes": self.classes}

    def loss(self, model, batch) -> tuple[Tensor, dict]:
        images, labels = batch
        return F.cross_entropy(model(images), labels, ignore_index=IGNORE_INDEX), {}

    def evaluator(self) -> "Evaluator":
        return Evaluator(self.classes)


class Evaluator:
    """mIoU, per-class IoU, pixel accuracy and mean cross-entropy over the pixels not ignored.

    State: a K×K confusion matrix (rows: label, columns: prediction) and the loss sum, gathered
    across ranks and summed. IoU_c = TP / (TP + FP + FN); a class absent from both labels and
    predictions has no IoU (it is left out of the per-class values and of the mean).
    """

    def __init__(self, classes: list[str]):
        self.classes = list(classes)
        size = len(self.classes)
        self.confusion = torch.zeros(size, size, dtype=torch.int64)
        self.loss_sum = 0.0

    @torch.no_grad()
    def update(self, model, batch) -> None:
        images, labels = batch
        logits = model(images).float()
        if logits.shape[-2:] != labels.shape[-2:]:
            logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        self.add(logits.argmax(1), labels)
        self.loss_sum += float(F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum"))

    def add(self, predictions: Tensor, labels: Tensor) -> None:
        """Count predictions [B, H, W] against labels [B, H, W] (pixels labelled 255 are skipped)."""
        size = len(self.classes)
        valid = labels != IGNORE_INDEX
        pairs = labels[valid].long().cpu() * size + predictions[valid].long().cpu()
        self.confusion += torch.bincount(pairs, minlength=size * size).view(size, size)

    def state(self) -> dict:
        return {"confusion": self.confusion.tolist(), "loss_sum": self.loss_sum, "classes": self.classes}

    @staticmethod
    def summarize(states: list[dict]) -> dict:
        confusion = torch.tensor([s["confusion"] for s in states], dtype=torch.float64).sum(0)
        classes = states[0]["classes"]
        hits = confusion.diagonal()
        union = confusion.sum(0) + confusion.sum(1) - hits
        present = union > 0
        iou = hits / union.clamp(min=1)
        pixels = confusion.sum()
        metrics = {
            "mIoU": float(iou[present].mean()) if present.any() else 0.0,
            "pixel_acc": float(hits.sum() / pixels) if pixels else 0.0,
            "loss": sum(s["loss_sum"] for s in states) / max(float(pixels), 1.0),
        }
        metrics.update({f"iou/{name}": float(iou[c]) for c, name in enumerate(classes) if present[c]})
        return metrics

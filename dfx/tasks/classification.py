"""Image classification: a timm model on an ImageFolder tree (or the embedded ``shapes-cls``).

Recipe sections: ``model`` (:class:`ModelConfig`), ``data`` (:class:`DataConfig`),
``train`` (:class:`TrainConfig`), ``eval`` (:class:`dfx.recipe.EvalConfig`, metric ``top1``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F

from dfx import hub
from dfx.data.classification import image_folder
from dfx.data.embedded import embedded_root, is_embedded
from dfx.errors import UsageError
from dfx.weights import load_recipe_weights
from dfx.recipe import EvalConfig, WeightsConfig
from dfx.recipe import TrainConfig as BaseTrainConfig


@dataclass
class ModelConfig(WeightsConfig):
    """A timm model. ``kwargs`` go to ``timm.create_model`` (e.g. depth, embed_dim, img_size);
    ``num_classes`` 0: from the data."""

    name: str = "vit_tiny_patch16_224"
    num_classes: int = 0
    pretrained: Union[str, None] = None  # weight spec for dfx.hub (file, hf://, timm name, alias)
    drop_path_rate: float = 0.0
    kwargs: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    """ImageFolder data and timm transforms. ``root`` is a folder or an embedded dataset name."""

    root: str = "shapes-cls"
    image_size: int = 32
    scale: list[float] = field(default_factory=lambda: [0.6, 1.0])
    hflip: float = 0.5
    color_jitter: float = 0.0
    auto_augment: Union[str, None] = None  # timm policy string, e.g. "rand-m9-mstd0.5-inc1"
    reprob: float = 0.0  # random erasing probability
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    def validate(self, prefix: str) -> None:
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise UsageError(f"{prefix}.scale: expected [min, max] with 0 < min <= max <= 1, got {self.scale}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise UsageError(f"{prefix}.mean/std: expected three values (RGB)")


@dataclass
class TrainConfig(BaseTrainConfig):
    label_smoothing: float = 0.0
    mixup: float = 0.0  # mixup alpha (0 = off)
    cutmix: float = 0.0  # cutmix alpha (0 = off)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig}


def data_root(root: str) -> Path:
    return embedded_root(root) if is_embedded(root) else Path(root).expanduser()


def agreed_classes(known: list[str] | None, found: list[str], root: str, hint: str = "") -> list[str]:
    """The class list of a task: ``found`` in the data when nothing is known yet, else ``known`` (the
    model's, e.g. from a checkpoint) provided the data has as many classes."""
    if known is None:
        return list(found)
    if len(found) != len(known):
        raise UsageError(f"data.root: {root} has {len(found)} classes but the model was trained on "
                         f"{len(known)} ({', '.join(known)}){hint}")
    return known


def transforms(data: DataConfig, training: bool):
    from timm.data import create_transform

    common = dict(interpolation=data.interpolation, mean=tuple(data.mean), std=tuple(data.std))
    if not training:
        return create_transform(data.image_size, is_training=False, crop_pct=data.crop_pct, **common)
    return create_transform(
        data.image_size, is_training=True, scale=tuple(data.scale), hflip=data.hflip,
        color_jitter=data.color_jitter, auto_augment=data.auto_augment, re_prob=data.reprob, **common,
    )


class Task:
    """Builders and per-batch logic for classification; the engine owns the loop."""

    def __init__(self, recipe):
        self.recipe = recipe
        self.classes: list[str] | None = None
        self.mixup = None

    # data ---------------------------------------------------------------------------------
    def dataset(self, split: str):
        data = self.recipe.data
        root = data_root(data.root)
        if self.classes is None:
            self.classes = image_folder(root, "train").classes
        return image_folder(root, split, transforms(data, split == "train"), classes=self.classes)

    collate_fn = None

    # model --------------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        if self.classes is None:
            self.dataset("val")
        m = self.recipe.model
        if m.num_classes not in (0, len(self.classes)):
            raise UsageError(f"model.num_classes {m.num_classes} differs from the {len(self.classes)} classes of "
                             "the data; leave it 0 (the data decides)")
        kwargs = dict(m.kwargs)
        kwargs.setdefault("num_classes", len(self.classes))
        if m.drop_path_rate:
            kwargs["drop_path_rate"] = m.drop_path_rate
        try:
            model = hub.create_timm_model(m.name, pretrained=None if m.weights else m.pretrained, **kwargs)
        except TypeError as e:
            raise UsageError(f"model.kwargs: {e}") from None
        load_recipe_weights(model, m)
        return model

    def info(self) -> dict:
        """What a checkpoint should remember besides the recipe."""
        return {"classes": self.classes}

    # training -----------------------------------------------------------------------------
    def targets(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, targets): Mixup/CutMix (soft [B, K]), label smoothing (soft) or the labels [B]."""
        t = self.recipe.train
        if (t.mixup or t.cutmix) and self.mixup is None:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=t.mixup, cutmix_alpha=t.cutmix, label_smoothing=t.label_smoothing,
                               num_classes=len(self.classes))
        if self.mixup is not None:
            return self.mixup(images, labels)
        if t.label_smoothing:
            from timm.data.mixup import one_hot

            off = t.label_smoothing / len(self.classes)
            return images, one_hot(labels, len(self.classes), on_value=1.0 - t.label_smoothing + off, off_value=off)
        return images, labels

    def loss(self, model, batch) -> tuple[torch.Tensor, dict]:
        images, target = self.targets(*batch)
        # cross_entropy takes class indices or soft [B, K] targets alike
        return F.cross_entropy(model(images), target), {}

    def evaluator(self) -> "Evaluator":
        return Evaluator()


class Evaluator:
    """Top-1 / top-5 accuracy and mean cross-entropy; state is a few sums (cheap to gather)."""

    def __init__(self):
        self.sums = {"n": 0, "top1": 0, "top5": 0, "loss": 0.0}

    @torch.no_grad()
    def update(self, model, batch) -> None:
        images, labels = batch
        logits = model(images).float()
        k = min(5, logits.shape[-1])
        topk = logits.topk(k, dim=-1).indices
        hits = topk == labels[:, None]
        self.sums["n"] += len(labels)
        self.sums["top1"] += int(hits[:, 0].sum())
        self.sums["top5"] += int(hits.any(dim=-1).sum())
        self.sums["loss"] += float(F.cross_entropy(logits, labels, reduction="sum"))

    def state(self) -> dict:
        return dict(self.sums)

    @staticmethod
    def summarize(states: list[dict]) -> dict:
        total = {key: sum(s[key] for s in states) for key in states[0]}
        n = max(total["n"], 1)
        return {"top1": total["top1"] / n, "top5": total["top5"] / n, "loss": total["loss"] / n}

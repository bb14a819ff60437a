"""Monocular depth estimation with DPT (dfx.models.dpt): ``task: depth``.

Recipe sections: ``model`` (:class:`ModelConfig`: a timm ViT, plain or hybrid, the DPT taps and
widths, ``output``), ``data`` (:class:`DataConfig`: RGB + depth pairs, dfx.data.depth_pairs, or
the embedded ``shapes-depth``), ``train`` (:class:`TrainConfig`: the shared one plus the SILog
constants and the decoder's learning-rate multiplier), ``eval`` (:class:`EvalConfig`: metric
``AbsRel`` minimised, the crop and the depth range scored).

Loss: ``model.output: metric`` / ``inverse`` (depth in metres) trains with SILog;
``relative`` (inverse depth up to scale and shift) with the scale-and-shift-invariant loss on
``1 / depth`` (dfx.models.depth_losses), each on the valid pixels only (depth > 0).
Evaluation: AbsRel, SqRel, RMSE, RMSE_log, d1, d2, d3 (dfx.data.depth_eval) at the ground
truth's resolution, and the mean training loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from dfx import hub
from dfx.data.depth import DepthDataSection
from dfx.data.depth_eval import DepthMetrics
from dfx.data.depth_pairs import DepthPairs, DepthTransform, collate_depth
from dfx.errors import UsageError
from dfx.models.depth_losses import silog_loss, ssi_loss
from dfx.models.dpt import DPT, PAPER_CONFIGS, default_hooks, default_reassemble, is_hybrid
from dfx.recipe import POSITIVE, Range
from dfx.recipe import EvalConfig as BaseEvalConfig
from dfx.recipe import TrainConfig as BaseTrainConfig
from dfx.recipe import WeightsConfig
from dfx.tasks.classification import data_root
from dfx.tasks.segmentation import check_crop_augmentation
from dfx.weights import load_recipe_weights


@dataclass
class ModelConfig(WeightsConfig):
    """A timm ViT under a DPT head.

    ``hooks`` (the four tapped blocks; a hybrid's first two are its ResNet stages) and
    ``reassemble`` (the four maps' widths) default to the paper's for ``vit_base_patch16_384``,
    ``vit_large_patch16_384`` and ``vit_base_r50_s16_384``, else to the quarter points of the
    depth and C/8, C/4, C/2, C. ``features``: the fusion width (256 in the paper). ``output``:
    ``metric`` depth in metres up to ``max_depth``; ``inverse``, metres as DPT's fine-tuned models
    give them, ``1 / (inverse_scale * relu + inverse_shift)``; or ``relative`` inverse depth.
    """

    RANGES: ClassVar[dict[str, Range]] = {"features": Range(2), "max_depth": POSITIVE, "inverse_scale": POSITIVE,
                                          "inverse_shift": POSITIVE, "drop_path_rate": Range(0, 1, high_open=True)}

    name: str = "vit_base_r50_s16_384"
    pretrained: Union[str, None] = None  # backbone weights: a weight spec for dfx.hub (file, hf://, timm name)
    drop_path_rate: float = 0.0
    kwargs: dict = field(default_factory=dict)  # to timm.create_model (embed_dim, depth, patch_size ...)
    hooks: Union[list[int], None] = None
    reassemble: Union[list[int], None] = None
    features: int = 256
    output: Literal["metric", "inverse", "relative"] = "metric"
    max_depth: float = 10.0  # metric: the largest depth the head can give
    inverse_scale: float = 0.000305  # inverse: DPT-Hybrid NYUv2's (KITTI: 6.016e-5)
    inverse_shift: float = 0.1378  # inverse: DPT-Hybrid NYUv2's (KITTI: 0.00579)

    def validate(self, prefix: str) -> None:
        for key in ("hooks", "reassemble"):
            values = getattr(self, key)
            if values is not None and (len(values) != 4 or min(values) < (0 if key == "hooks" else 1)):
                raise UsageError(f"{prefix}.{key}: expected four {'block indices' if key == 'hooks' else 'widths'}, "
                                 f"got {values}")


@dataclass
class DataConfig(DepthDataSection):
    """RGB + depth pairs (dfx.data.depth_pairs) and their augmentation.

    ``images`` / ``depths``: the folders of an id-listing split file; ``image_size``: the training
    crop and evaluation input, an int (square) or [height, width]. Depth files: ``depth_encoding``
    (``linear``: ``depth_scale`` units per metre, 1000 = millimetres, 5000 = TUM; ``sunrgbd``;
    ``nyu-raw``), 8-bit depth PNGs read as ``value * depth_max / 255`` metres.
    """

    root: str = "shapes-depth"
    images: str = "rgb"
    depths: str = "depth"

    def validate(self, prefix: str) -> None:
        self.check_size_and_depth(prefix)
        check_crop_augmentation(prefix, self.scale, self.ratio, self.hflip)


@dataclass
class TrainConfig(BaseTrainConfig):
    RANGES: ClassVar[dict[str, Range]] = {**BaseTrainConfig.RANGES, "silog_variance_focus": Range(0, 1),
                                          "silog_scale": POSITIVE, "decoder_lr_mult": POSITIVE}

    silog_variance_focus: float = 0.85  # lambda of SILog (1: fully scale-invariant)
    silog_scale: float = 10.0
    decoder_lr_mult: float = 1.0  # learning rate of the DPT head (reassembly, fusion, head) x this (paper: 10)


@dataclass
class EvalConfig(BaseEvalConfig):
    """Depth scoring: ``crop`` (``eigen`` NYU, ``garg`` KITTI, ``none``) and the range of ground truth
    scored (``min_depth``, ``max_depth``: NYU 1e-3-10, KITTI 1e-3-80); predictions are clipped to it."""

    RANGES: ClassVar[dict[str, Range]] = {**BaseEvalConfig.RANGES, "min_depth": POSITIVE, "max_depth": POSITIVE}

    batch_size: int = 16
    metric: str = "AbsRel"
    mode: Literal["max", "min"] = "min"
    crop: Literal["none", "eigen", "garg"] = "none"
    min_depth: float = 1e-3
    max_depth: float = 10.0

    def validate(self, prefix: str) -> None:
        if not self.min_depth < self.max_depth:
            raise UsageError(f"{prefix}.min_depth / max_depth: expected min < max, got {self.min_depth} / "
                             f"{self.max_depth}")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig}


def build_dpt(m: ModelConfig) -> DPT:
    """The DPT of a recipe's ``model`` section (backbone weights from ``pretrained`` unless ``weights``)."""
    kwargs = {"dynamic_img_size": True, **m.kwargs, "num_classes": 0}
    if m.drop_path_rate:
        kwargs["drop_path_rate"] = m.drop_path_rate
    not_a_vit = UsageError(f"model.name: {m.name!r} is not a timm ViT with a class token; DPT taps blocks of a "
                           "VisionTransformer such as vit_base_patch16_384, vit_large_patch16_384 or "
                           "vit_base_r50_s16_384")
    try:
        backbone = hub.create_timm_model(m.name, pretrained=None if m.weights else m.pretrained, **kwargs)
    except TypeError as e:
        if "dynamic_img_size" in str(e) and "dynamic_img_size" not in m.kwargs:  # a CNN or another family
            raise not_a_vit from None
        raise UsageError(f"model.kwargs: {e}") from None
    if not (hasattr(backbone, "forward_intermediates") and hasattr(backbone, "blocks")
            and getattr(backbone, "cls_token", None) is not None):
        raise not_a_vit
    paper = PAPER_CONFIGS.get(m.name, {}) if not m.kwargs else {}  # kwargs change the sizes: no paper values
    hooks = m.hooks or paper.get("hooks") or default_hooks(len(backbone.blocks), is_hybrid(backbone))
    widths = m.reassemble or paper.get("reassemble") or default_reassemble(backbone.embed_dim)
    try:
        return DPT(backbone, hooks, widths, features=m.features, output=m.output, max_depth=m.max_depth,
                   inverse_scale=m.inverse_scale, inverse_shift=m.inverse_shift)
    except ValueError as e:
        raise UsageError(f"model.hooks / model.reassemble: {e}") from None


def depth_loss(recipe, prediction: Tensor, target: Tensor) -> Tensor:
    """The recipe's loss: prediction [B, 1, H, W] (at the target's size), target [B, H, W] metres."""
    mask = target > 0
    if recipe.model.output != "relative":
        t = recipe.train
        return silog_loss(prediction[:, 0], target, mask, t.silog_variance_focus, t.silog_scale)
    inverse = torch.where(mask, 1.0 / target.clamp(min=1e-6), torch.zeros_like(target))
    return ssi_loss(prediction[:, 0], inverse, mask)


class Task:
    """Builders and per-batch logic for depth; the engine owns the loop."""

    collate_fn = staticmethod(collate_depth)
    has_classes = False  # dfx.models.build asks no class list of a depth model

    def __init__(self, recipe):
        self.recipe = recipe
        self.classes = None

    def dataset(self, split: str) -> DepthPairs:
        data = self.recipe.data
        transform = DepthTransform(data.size, split == "train", scale=data.scale, ratio=data.ratio, hflip=data.hflip,
                                   mean=data.mean, std=data.std)
        return DepthPairs(data_root(data.root), data.train_split if split == "train" else data.val_split,
                          images=data.images, depths=data.depths, depth=data.depth, transform=transform)

    def build_model(self) -> DPT:
        from dfx.models.dpt_released import RELEASED_FORMAT, convert_dpt

        model = build_dpt(self.recipe.model)
        load_recipe_weights(model, self.recipe.model, converters=[convert_dpt], formats=[RELEASED_FORMAT])
        return model

    def info(self) -> dict:
        m = self.recipe.model
        return {"output": m.output, "max_depth": m.max_depth}

    def param_groups(self, model) -> list[dict]:
        """AdamW groups: no weight decay on 1-d tensors (norms, biases); the DPT head's lr x decoder_lr_mult."""
        from dfx.tasks.fusion import decoder_param_groups

        return decoder_param_groups(model, self.recipe.train.weight_decay, self.recipe.train.decoder_lr_mult)

    def loss(self, model, batch) -> tuple[Tensor, dict]:
        images, depths, _ = batch
        prediction = model(images)
        if prediction.shape[-2:] != depths.shape[-2:]:
            prediction = F.interpolate(prediction, size=depths.shape[-2:], mode="bilinear", align_corners=False)
        return depth_loss(self.recipe, prediction, depths), {}

    def evaluator(self) -> "DepthEvaluator":
        return DepthEvaluator(self.recipe)


def upsample_to(prediction: Tensor, height: int, width: int) -> Tensor:
    """[1, H', W'] or [1, 1, H', W'] -> [H, W], bilinear (the ground truth's resolution)."""
    one = prediction.reshape(1, 1, *prediction.shape[-2:]).float()
    return F.interpolate(one, size=(height, width), mode="bilinear", align_corners=False)[0, 0]


class DepthEvaluator:
    """dfx.data.depth_eval's metrics over the validation set plus the mean loss per batch.

    Each prediction is upsampled to its ground truth's own size (``sizes`` in the batch) before it
    is scored; the loss is computed at that size too.
    """

    def __init__(self, recipe):
        self.recipe = recipe
        e = recipe.eval
        self.metrics = DepthMetrics(e.min_depth, e.max_depth, e.crop, relative=recipe.model.output == "relative")
        self.loss_sum, self.batches = 0.0, 0

    @torch.no_grad()
    def update(self, model, batch) -> None:
        images, depths, sizes = batch
        prediction = model(images).float()
        for one, target, (height, width) in zip(prediction, depths, sizes.tolist()):
            full = upsample_to(one, height, width)[None]
            self.metrics.add(full, target[None, :height, :width])
            self.loss_sum += float(depth_loss(self.recipe, full[None], target[None, :height, :width]))
            self.batches += 1

    def state(self) -> dict:
        return {"metrics": self.metrics.state(), "loss_sum": self.loss_sum, "count": self.batches}

    @staticmethod
    def summarize(states: list[dict]) -> dict:
        metrics = DepthMetrics.summarize([s["metrics"] for s in states])
        count = sum(s["count"] for s in states)
        metrics["loss"] = sum(s["loss_sum"] for s in states) / max(count, 1)
        return metrics

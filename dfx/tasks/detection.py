"""Object detection: Deformable-DETR / H-Deformable-DETR trained on COCO-format data.

Recipe sections: ``model`` (:class:`ModelConfig`: the architecture and H-DETR's hybrid branch),
``loss`` (:class:`LossConfig`: matcher costs and loss weights), ``data`` (:class:`DataConfig`: a
COCO root or the embedded ``shapes-det``, DETR-style augmentation), ``train``
(:class:`TrainConfig`: the shared one plus the backbone learning rate), ``eval`` (metric ``AP``).

Batches are ``(images [B, 3, H, W], masks [B, H, W] True at padding, targets)`` with targets'
boxes cxcywh normalised to each unpadded image. Evaluation runs pycocotools on the validation
annotation file; the predictions are written in COCO results format beside the run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Union

import torch
from torch import Tensor

from dfx import hub
from dfx.data.coco import CocoDetection
from dfx.data.det_transforms import DetectionTransform, collate_detection
from dfx.data.formats import SPLITS, DetectionData, find_detection_data
from dfx.detection import DeformableDETR, DetectorConfig, SetCriterion, official, official_dino, postprocess
from dfx.detection.detector import DETECTIONS
from dfx.detection.loss_config import HybridLossConfig, MaskLossConfig, SetLossConfig
from dfx.errors import UsageError
from dfx.weights import load_recipe_weights
from dfx.files import write_text_atomic
from dfx.recipe import EvalConfig as BaseEvalConfig
from dfx.recipe import TrainConfig as BaseTrainConfig
from dfx.recipe import WeightsConfig
from dfx.tasks.classification import agreed_classes, data_root

logger = logging.getLogger(__name__)


@dataclass
class ModelConfig(HybridLossConfig, DetectorConfig, WeightsConfig):
    """The detector (every :class:`DetectorConfig` field; ``one2many_queries: 0`` is Deformable-DETR),
    the hybrid branch's loss settings (:class:`HybridLossConfig`) and post-processing. ``num_classes``
    0: from the data."""

    num_classes: int = 0
    detections: int = DETECTIONS  # kept per image after top-k post-processing

    def validate(self, prefix: str) -> None:
        try:
            self.detector_config(self.num_classes or 1).validate()
        except ValueError as e:
            raise UsageError(f"{prefix}: {e}") from None
        try:
            HybridLossConfig.validate(self)
        except ValueError as e:
            raise UsageError(f"{prefix}.{e}") from None
        if self.detections < 1:
            raise UsageError(f"{prefix}.detections: expected >= 1, got {self.detections}")

    def detector_config(self, num_classes: int) -> DetectorConfig:
        if self.num_classes not in (0, num_classes):
            raise UsageError(f"model.num_classes {self.num_classes} differs from the {num_classes} classes of the "
                             "data; leave it 0 (the data decides) or set data.category_ids")
        names = {f.name for f in fields(DetectorConfig)}
        values = {k: v for k, v in vars(self).items() if k in names}
        if self.weights:  # whole-model weights replace the backbone's starting weights: fetch nothing
            values["pretrained"] = None
        return DetectorConfig(**{**values, "num_classes": num_classes})


@dataclass
class LossConfig(MaskLossConfig, SetLossConfig):
    """Hungarian matcher costs and loss weights (:class:`SetLossConfig`; Deformable-DETR's: focal 2,
    L1 5, GIoU 2), and MaskDINO's mask terms (:class:`MaskLossConfig`), used with ``model.masks``."""

    def validate(self, prefix: str) -> None:
        try:
            SetLossConfig.validate(self)
            MaskLossConfig.validate(self)
        except ValueError as e:  # the message starts with the field's name
            raise UsageError(f"{prefix}.{e}") from None


@dataclass
class SplitPaths:
    """One split given explicitly: an image folder and a COCO annotation file."""

    images: str = ""
    annotations: str = ""

    def validate(self, prefix: str) -> None:
        missing = [name for name in ("images", "annotations") if not getattr(self, name)]
        if missing:
            raise UsageError(f"{prefix}: needs both images (a folder) and annotations (a COCO JSON file); "
                             f"{' and '.join(missing)} missing")


@dataclass
class DataConfig:
    """Detection data in any format :mod:`dfx.data.formats` recognises (COCO 2017, dfx, Roboflow/CVAT
    COCO exports, YOLO, Pascal VOC), ``shapes-det``, or explicit ``train``/``val``/``test`` paths; and
    DETR-style augmentation (sizes in pixels)."""

    root: str = "datasets/coco"  # a dataset folder, a YOLO data.yaml, or shapes-det
    train: Union[SplitPaths, None] = None  # {images: DIR, annotations: FILE}: takes the place of root's split
    val: Union[SplitPaths, None] = None
    test: Union[SplitPaths, None] = None
    scales: list[int] = field(default_factory=lambda: [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800])
    max_size: int = 1333
    crop: Union[list[int], None] = field(default_factory=lambda: [384, 600])  # random crop side range; null: none
    crop_resize: Union[list[int], None] = field(default_factory=lambda: [400, 500, 600])  # shorter side before a crop
    crop_prob: float = 0.5
    hflip: float = 0.5
    category_ids: Union[list[int], None] = None  # the classes, as annotation category ids; null: all in the file
    classes: Union[list[str], None] = None  # their names, so a model builds without the data (dfx.create_model)
    skip_invalid: bool = False  # drop (and count) invalid boxes, labels and images instead of failing
    color_jitter: float = 0.0  # training: brightness, contrast and saturation each scaled by [1 - j, 1 + j]
    # input normalisation; null: the backbone's pretrained configuration (timm's), filled in when the recipe loads
    mean: Union[list[float], None] = None
    std: Union[list[float], None] = None
    # keypoints (model.keypoints): left/right index pairs a flip swaps (null: the names' left_/right_ pairs)
    # and the OKS sigmas (null: the annotations' category "sigmas", else COCO's 17)
    flip_pairs: Union[list[list[int]], None] = None
    sigmas: Union[list[float], None] = None

    def validate(self, prefix: str) -> None:
        if not self.scales or min(self.scales) < 1:
            raise UsageError(f"{prefix}.scales: expected a list of positive shorter-side sizes, got {self.scales}")
        if self.max_size < max(self.scales):
            raise UsageError(f"{prefix}.max_size {self.max_size} is below the largest scale {max(self.scales)}")
        if self.crop is not None and (len(self.crop) != 2 or not 0 < self.crop[0] <= self.crop[1]):
            raise UsageError(f"{prefix}.crop: expected [min, max] side in pixels or null, got {self.crop}")
        if self.crop_resize is not None and (not self.crop_resize or min(self.crop_resize) < 1):
            raise UsageError(f"{prefix}.crop_resize: expected shorter-side sizes in pixels or null, got "
                             f"{self.crop_resize}")
        if self.classes is not None and self.category_ids is not None and len(self.classes) != len(self.category_ids):
            raise UsageError(f"{prefix}.classes names {len(self.classes)} classes but {prefix}.category_ids lists "
                             f"{len(self.category_ids)}; give one name per id")
        for name in ("crop_prob", "hflip"):
            if not 0 <= getattr(self, name) <= 1:
                raise UsageError(f"{prefix}.{name}: expected a probability in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.color_jitter < 1:
            raise UsageError(f"{prefix}.color_jitter: expected a strength in [0, 1), got {self.color_jitter}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and (len(value) != 3 or (name == "std" and min(value) <= 0)):
                raise UsageError(f"{prefix}.{name}: expected three {'positive ' if name == 'std' else ''}values (RGB) "
                                 f"or null (the backbone's pretrained normalisation), got {value}")


@dataclass
class TrainConfig(BaseTrainConfig):
    """The shared ``train`` section plus the detector's learning-rate groups."""

    backbone_lr: float = 2e-5
    offset_lr_mult: float = 0.1  # sampling offsets and reference-point heads train at lr × this
    norm_weight_decay: Union[float, None] = None  # of LayerNorm/GroupNorm/BatchNorm parameters; null: weight_decay


@dataclass
class EvalConfig(BaseEvalConfig):
    batch_size: int = 8
    metric: str = "AP"
    draw_images: int = 8  # val images drawn with their predictions into predictions.png


SECTIONS = {"model": ModelConfig, "loss": LossConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig}


def validate_recipe(recipe) -> None:
    if recipe.train.backbone_lr < 0 or recipe.train.offset_lr_mult < 0:
        raise UsageError("train.backbone_lr and train.offset_lr_mult must be >= 0")
    data = recipe.data
    if data.mean is None or data.std is None:  # filled in here, so recipe.yaml, checkpoints and exports record it
        mean, std = pretrained_normalisation(recipe.model.backbone)
        data.mean = list(mean) if data.mean is None else data.mean
        data.std = list(std) if data.std is None else data.std
    if recipe.train.norm_weight_decay is not None and not recipe.train.norm_weight_decay >= 0:
        raise UsageError(f"train.norm_weight_decay must be >= 0 or null, got {recipe.train.norm_weight_decay}")


def pretrained_normalisation(backbone: str) -> tuple[tuple, tuple]:
    """(mean, std) the backbone's pretrained weights expect, from timm's pretrained configuration
    of that model (``tf_efficientnet_lite0``: 0.5 / 0.5); ImageNet's for a name timm does not know."""
    import timm

    name = hub.ALIASES.get(backbone, backbone)
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # a name outside timm's registry of pretrained configurations
        cfg = None
    if cfg is None:
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        return IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    return tuple(cfg.mean), tuple(cfg.std)


class Task:
    """Builders and per-batch logic for detection; the engine owns the loop."""

    collate_fn = staticmethod(collate_detection)

    def __init__(self, recipe):
        self.recipe = recipe
        self.classes: list[str] | None = None
        self.output_dir: Path | None = None  # where evaluation writes predictions and plots
        self.outputs: dict = {}  # files the last evaluation wrote
        self._datasets: dict = {}
        self._data: DetectionData | None = None
        self._noted_missing = False  # classes without validation ground truth are named once
        self._criterion: SetCriterion | None = None  # built on first use, when the classes are known

    def data(self) -> DetectionData:
        """The recipe's dataset: its format and splits (read once; YOLO and VOC converted here)."""
        if self._data is None:
            data = self.recipe.data
            paths = {split: vars(getattr(data, split)) for split in SPLITS if getattr(data, split) is not None}
            root = None if {"train", "val"} <= set(paths) else data_root(data.root)
            self._data = find_detection_data(root, paths, data.skip_invalid)
        return self._data

    def dataset(self, split: str) -> CocoDetection:
        if split in self._datasets:
            return self._datasets[split]
        data = self.recipe.data
        source = self.data().split(split)
        transform = DetectionTransform(split == "train", scales=data.scales, max_size=data.max_size, crop=data.crop,
                                       crop_resize=data.crop_resize, crop_prob=data.crop_prob, hflip=data.hflip,
                                       mean=data.mean, std=data.std, color_jitter=data.color_jitter)
        # a split without some class (val often lacks a rare one) still gets the model's classes, by name
        dataset = CocoDetection(source.images, source.ann_file, transform, category_ids=data.category_ids,
                                skip_invalid=data.skip_invalid, annotations=source.annotations,
                                classes=self.classes if data.category_ids is None else None,
                                masks=self.recipe.model.masks, keypoints=bool(self.recipe.model.keypoints),
                                flip_pairs=data.flip_pairs, sigmas=data.sigmas)
        if self.recipe.model.keypoints:
            transform.flip_perm = dataset.flip_perm
            check_keypoints(dataset, self.recipe.model.keypoints)
        for reason, count in source.skipped.items():
            dataset.skipped[reason] = dataset.skipped.get(reason, 0) + count
        if any(dataset.skipped.values()):
            logger.info(f"dfx: {dataset.skip_summary()}")
        self.classes = agreed_classes(self.classes, dataset.classes, data.root, "; set data.category_ids")
        self._datasets[split] = dataset
        return dataset

    def data_summary(self) -> str:
        """One line on the data training reads: format, classes, images and boxes per split."""
        from dfx.data.formats import summary_line

        return summary_line(self.data(), {split: self.dataset(split) for split in ("train", "val")})

    def build_model(self) -> DeformableDETR:
        if self.classes is None:
            self.dataset("val")
        try:
            config = self.recipe.model.detector_config(len(self.classes))
            model = DeformableDETR(config)
        except ValueError as e:
            raise UsageError(f"model: {e}") from None
        ids = self.category_ids()
        load_recipe_weights(model, self.recipe.model,
                            converters=[official.converter(config, ids), official_dino.converter(config, ids)],
                            formats=[official.FORMAT, official_dino.FORMAT], hint=official.hint)
        return model

    def category_ids(self) -> list[int] | None:
        """The classes as dataset category ids (how released class heads are indexed), if known."""
        if self.recipe.data.category_ids is not None:
            return list(self.recipe.data.category_ids)
        read = next(iter(self._datasets.values()), None)
        return list(read.category_ids) if read is not None else None

    def criterion(self) -> SetCriterion:
        loss = self.recipe.loss
        masks = MaskLossConfig(**{f.name: getattr(loss, f.name) for f in fields(MaskLossConfig)}) \
            if self.recipe.model.masks else None
        # ED-Pose's keypoint cost and losses with the data's sigmas
        sigmas = self.dataset("val").sigmas if self.recipe.model.keypoints else None
        return SetCriterion.from_config(len(self.classes), self.recipe.loss, self.recipe.model, masks, sigmas)

    def param_groups(self, model) -> list[dict]:
        """Backbone at ``train.backbone_lr``; sampling offsets and reference points at lr × offset_lr_mult;
        with ``train.norm_weight_decay`` set, normalisation layers' parameters get that weight decay
        (detrex: 0) in groups of their own."""
        t = self.recipe.train
        norms = set()
        if t.norm_weight_decay is not None:
            norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._NormBase)
            norms = {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
        groups: dict[tuple[str, bool], list] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if name.startswith("backbone."):
                kind = "backbone"
            elif "sampling_offsets" in name or name.startswith("reference_points"):
                kind = "offsets"
            else:
                kind = "rest"
            groups.setdefault((kind, id(param) in norms), []).append(param)
        lrs = {"rest": t.lr, "backbone": t.backbone_lr, "offsets": t.lr * t.offset_lr_mult}
        order = [(kind, norm) for kind in ("backbone", "offsets", "rest") for norm in (False, True)]
        return [{"params": groups[key], "lr": lrs[key[0]], **({"weight_decay": t.norm_weight_decay} if key[1] else {})}
                for key in order if key in groups]

    def info(self) -> dict:
        return {"classes": self.classes}

    def loss(self, model, batch) -> tuple[Tensor, dict]:
        if self._criterion is None:
            self._criterion = self.criterion()
        images, masks, targets = batch
        return self._criterion(model(images, masks, targets), targets)  # targets: DINO's denoising queries

    def evaluator(self) -> "Evaluator":
        dataset = self.dataset("val")
        return Evaluator(self, dataset)


class Evaluator:
    """COCO bbox evaluation of the top-k detections of every validation image.

    State: the detections in COCO results format (gathered over ranks). ``summarize`` runs
    pycocotools and returns AP, AP50, AP75, APs/m/l, AR1/10/100, ARs/m/l and ``AP/<class>``; with
    ``task.output_dir`` set it also writes ``predictions.json``, ``pr_curve.png`` and
    ``predictions.png`` (the first ``eval.draw_images`` images with their boxes) there.
    """

    def __init__(self, task: Task, dataset: CocoDetection):
        self.task, self.dataset = task, dataset
        self.results: list[dict] = []
        self.segm_results: list[dict] = []  # with model.masks: the same detections' masks (RLE)
        self.keypoint_results: list[dict] = []  # with model.keypoints: the same detections' poses
        self.drawn: list[tuple] = []

    @torch.no_grad()
    def update(self, model, batch) -> None:
        from dfx.data.coco_eval import to_coco_results

        images, masks, targets = batch
        outputs = model(images, masks)
        sizes = torch.stack([t["orig_size"] for t in targets]).to(images.device)
        detections = postprocess(outputs, sizes, self.task.recipe.model.detections)
        self.results += to_coco_results([int(t["image_id"]) for t in targets], [d["boxes"].cpu() for d in detections],
                                        [d["scores"].cpu() for d in detections],
                                        [d["labels"].cpu() for d in detections], self.dataset.category_ids)
        if "pred_masks" in outputs:
            self._add_masks(outputs["pred_masks"], detections, targets)
        if "pred_keypoints" in outputs:
            from dfx.detection.keypoints import detection_keypoints, keypoint_results

            points = detection_keypoints(outputs["pred_keypoints"], detections, sizes)
            for target, found, pose in zip(targets, detections, points):
                keep = found["labels"] == 0  # the keypoint category is the first (the one) class
                self.keypoint_results += keypoint_results([int(target["image_id"])], [pose[keep].cpu()],
                                                          [found["scores"][keep].cpu()], self.dataset.category_ids[0])
                found["keypoints"] = pose
        wanted = self.task.recipe.eval.draw_images
        if self.task.output_dir is not None and len(self.drawn) < wanted:
            for target, found in zip(targets, detections):
                if len(self.drawn) < wanted:
                    self.drawn.append((int(target["image_id"]), {k: v.cpu() for k, v in found.items()}))

    def _add_masks(self, pred_masks, detections: list[dict], targets: list[dict]) -> None:
        """The detections' masks as COCO segm results, scored as MaskDINO does: class score x mask score."""
        from dfx.data.coco_eval import to_coco_segm_results
        from dfx.detection.masks import instance_masks

        masks, mask_scores = instance_masks(pred_masks, [d["queries"] for d in detections],
                                            torch.stack([t["size"] for t in targets]),
                                            torch.stack([t["orig_size"] for t in targets]))
        self.segm_results += to_coco_segm_results([int(t["image_id"]) for t in targets], [m.cpu() for m in masks],
                                                  [(d["scores"] * s).cpu() for d, s in zip(detections, mask_scores)],
                                                  [d["labels"].cpu() for d in detections], self.dataset.category_ids)

    def state(self) -> dict:
        return {"results": self.results, "segm_results": self.segm_results, "keypoint_results": self.keypoint_results}

    def summarize(self, states: list[dict]) -> dict:
        from dfx.data.coco_eval import class_ap, run_cocoeval, without_ground_truth

        results = [r for s in states for r in s["results"]]
        metrics, cocoeval = run_cocoeval(self.dataset.coco, results)
        metrics.update({f"AP/{name}": value for name, value in class_ap(cocoeval).items()})
        if self.task.recipe.model.masks:  # mask AP next to box AP, as segm/AP, segm/AP50, ...
            segm, segm_eval = run_cocoeval(self.dataset.coco, [r for s in states for r in s.get("segm_results", [])],
                                           iou_type="segm")
            metrics.update({f"segm/{name}": value for name, value in segm.items()})
            metrics.update({f"segm/AP/{name}": value for name, value in class_ap(segm_eval).items()})
        if self.task.recipe.model.keypoints:  # keypoint AP (OKS) next to box AP, as keypoints/AP, ...
            poses, _ = run_cocoeval(self.dataset.coco, [r for s in states for r in s.get("keypoint_results", [])],
                                    iou_type="keypoints", sigmas=self.dataset.sigmas)
            metrics.update({f"keypoints/{name}": value for name, value in poses.items()})
        missing = without_ground_truth(cocoeval)
        if missing and not self.task._noted_missing and _is_main():
            self.task._noted_missing = True
            logger.info(f"dfx: no validation ground truth for {', '.join(missing)}: no per-class AP for them")
        if self.task.output_dir is not None and _is_main():
            self.task.outputs = self._write(results, cocoeval)
        return metrics

    def _write(self, results: list[dict], cocoeval) -> dict:
        import numpy as np

        from dfx.data.coco_eval import write_results
        from dfx.data.images import load_rgb
        from dfx.detection.plots import draw_predictions, plot_pr_curve

        folder = Path(self.task.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        files = {"predictions": folder / "predictions.json", "annotations": Path(self.dataset.ann_file)}
        write_results(files["predictions"], results)
        if self.dataset.converted:  # YOLO / VOC: the COCO ground truth the predictions were scored against
            files["annotations"] = folder / "annotations.json"
            write_text_atomic(files["annotations"], json.dumps(self.dataset.coco.dataset))
        plot_pr_curve(cocoeval, folder / "pr_curve.png")
        files["pr_curve"] = folder / "pr_curve.png"
        if self.drawn:
            coco = self.dataset.coco
            pictures = [np.asarray(load_rgb(Path(self.dataset.image_dir) / coco.imgs[i]["file_name"]))
                        for i, _ in self.drawn]
            draw_predictions(pictures, [d for _, d in self.drawn], self.classes, folder / "predictions.png")
            files["picture"] = folder / "predictions.png"
        return {k: str(v) for k, v in files.items()}

    @property
    def classes(self) -> list[str]:
        return self.task.classes


def check_keypoints(dataset: CocoDetection, count: int) -> None:
    """A UsageError unless the data has ``count`` keypoints per instance and OKS sigmas for them."""
    if len(dataset.keypoint_names) != count:
        raise UsageError(f"model.keypoints is {count} but {dataset.ann_file} has {len(dataset.keypoint_names)} "
                         f"keypoints per instance ({', '.join(dataset.keypoint_names[:5])}, ...); set model.keypoints: "
                         f"{len(dataset.keypoint_names)}")
    if dataset.sigmas is None:
        raise UsageError(f"{dataset.ann_file}: no OKS sigmas for its {count} keypoints: set data.sigmas (one per "
                         "keypoint) or add \"sigmas\" to the category")


def _is_main() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0

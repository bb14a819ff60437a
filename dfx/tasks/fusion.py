"""Multi-modal semantic segmentation (GeminiFusion and its baselines): ``task: fusion``.

Recipe sections: ``model`` (:class:`ModelConfig`: MiT variant, fusion strategy, weights),
``data`` (:class:`DataConfig`: a multi-modal root, dfx.data.multimodal, or ``shapes-rgbd``),
``train`` (:class:`TrainConfig`: the shared one plus the decoder's learning-rate multiplier),
``eval`` (segmentation's, metric ``mIoU`` of the ensemble).

Model: dfx.fusion.MultiModalMiT + one SegFormer head over every stream + a learned ensemble.
Loss: cross-entropy (255 ignored) of the ensemble plus ``model.stream_loss`` times that of each
stream, plus ``model.exchange_sparsity`` times the mean exchange score (``exchange`` only).
Evaluation: mIoU, pixel accuracy and loss of the ensemble, and ``mIoU/<modality>`` per stream.

:func:`fuse` trains one strategy; ``dfx fuse --compare`` (dfx.compare) trains several on the same
data, seeds and schedule and tabulates mIoU, parameters, GFLOPs and latency.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from dfx import hub
from dfx.data.depth import DepthDataSection
from dfx.data.multimodal import MultiModalFolder, MultiModalTransform
from dfx.data.segmentation import IGNORE_INDEX
from dfx.errors import UsageError
from dfx.models import recipe_classes
from dfx.weights import load_recipe_weights
from dfx.fusion.mit import MIT_SHARED, MIT_VARIANTS, MultiModalMiT, load_mit_weights
from dfx.fusion.released import RELEASED_FORMATS, architecture
from dfx.fusion.segformer import FusionSegmenter
from dfx.fusion.strategies import FUSIONS, TWO_STREAM
from dfx.recipe import TrainConfig as BaseTrainConfig
from dfx.recipe import WeightsConfig
from dfx.recipe import load_recipe
from dfx.tasks.classification import agreed_classes, data_root
from dfx.tasks.segmentation import EvalConfig, Evaluator, check_crop_augmentation

Fusion = Literal["none", "concat", "exchange", "cross-attn", "gemini"]
Variant = Literal["b0", "b1", "b2", "b3", "b4", "b5"]


@dataclass
class MitModelConfig(WeightsConfig):
    """The multi-modal MiT and its fusion strategy, shared by the fusion (segmentation) and
    translation tasks' ``model`` sections.

    ``embed_dims`` / ``depths`` / ``num_heads`` / ``mlp_ratios`` / ``sr_ratios`` (four values,
    one per stage) replace the variant's sizes when set. ``pretrained``: an official SegFormer
    ``mit_b*`` ImageNet checkpoint (weight spec for dfx.hub: file or hf://org/repo/file).
    """

    fusion: Fusion = "gemini"
    variant: Variant = "b0"
    pretrained: Union[str, None] = None
    embed_dims: Union[list[int], None] = None
    depths: Union[list[int], None] = None
    num_heads: Union[list[int], None] = None
    mlp_ratios: Union[list[int], None] = None
    sr_ratios: Union[list[int], None] = None
    drop_path_rate: float = 0.1

    def sizes(self) -> dict:
        names = ("embed_dims", "depths", "num_heads", "mlp_ratios", "sr_ratios")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def check_sizes(self, prefix: str) -> list[int]:
        """Four positive values per size field, widths divisible by heads; returns the widths."""
        for name, values in self.sizes().items():
            if len(values) != 4 or min(values) < 1:
                raise UsageError(f"{prefix}.{name}: expected four positive values (one per stage), got {values}")
        dims = self.embed_dims or MIT_VARIANTS[self.variant]["embed_dims"]
        heads = self.num_heads or MIT_SHARED["num_heads"]
        if any(d % h for d, h in zip(dims, heads)):
            raise UsageError(f"{prefix}: embed_dims must divide by num_heads stage by stage, got {dims} / {heads}")
        return dims


@dataclass
class ModelConfig(MitModelConfig):
    """The MiT backbone, the fusion strategy (:class:`MitModelConfig`) and the SegFormer decoder."""

    decoder_dim: int = 256  # GeminiFusion: 256 on NYUDv2 / SUN RGB-D, 512 on DeLiVER
    dropout: float = 0.1
    stream_loss: float = 1.0  # weight of each stream's own loss (the ensemble's is 1)
    # the reference trains the ensemble weights only with the ensemble loss (streams detached in it);
    # false lets the ensemble loss reach the streams too (one more signal towards the fused prediction)
    ensemble_detach: bool = True
    exchange_threshold: float = 0.02  # exchange: tokens scored below are replaced
    exchange_sparsity: float = 0.01  # exchange: weight of the mean-score (L1) penalty

    def validate(self, prefix: str) -> None:
        self.check_sizes(prefix)
        if not 0 <= self.drop_path_rate < 1 or not 0 <= self.dropout < 1:
            raise UsageError(f"{prefix}.drop_path_rate / dropout: expected values in [0, 1)")


@dataclass
class DataConfig(DepthDataSection):
    """A multi-modal segmentation root (or ``shapes-rgbd``) and the aligned augmentation.

    ``modalities``: folder names in the order the model reads them (the first is the primary
    stream; ``none`` uses it alone). ``image_size``: the training crop and evaluation size, an int
    (square) or [height, width]. ``normalize``: ``first`` (the reference) normalises the first
    modality (RGB) by ``mean``/``std`` and only divides the others by 255; ``all`` normalises every
    modality. 16-bit depth files are decoded by ``depth_encoding`` (``linear``: ``depth_scale``
    units per metre, 1000 = millimetres; ``sunrgbd``; ``nyu-raw``) and ``depth_max`` metres map
    to 255 (dfx.data.depth).
    """

    root: str = "shapes-rgbd"
    modalities: list[str] = field(default_factory=lambda: ["rgb", "depth"])
    labels: str = "labels"
    classes: Union[list[str], None] = None  # default: <root>/classes.txt
    normalize: Literal["first", "all"] = "first"

    def validate(self, prefix: str) -> None:
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise UsageError(f"{prefix}.modalities: expected distinct folder names, got {self.modalities}")
        self.check_size_and_depth(prefix)
        check_crop_augmentation(prefix, self.scale, self.ratio, self.hflip)


@dataclass
class TrainConfig(BaseTrainConfig):
    decoder_lr_mult: float = 1.0  # learning rate of the decode head and ensemble weights (paper: 10)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig}


def validate_recipe(recipe) -> None:
    if recipe.model.fusion in TWO_STREAM and len(recipe.data.modalities) < 2:
        raise UsageError(f"model.fusion {recipe.model.fusion!r} fuses two or more modalities but data.modalities "
                         f"lists {recipe.data.modalities}; add one or use model.fusion=none")


def stream_names(modalities: list[str], fusion: str) -> list[str]:
    """Names of the backbone's streams: the modality, or the merged ones joined by '+'."""
    if fusion == "none":
        return [modalities[0]]
    if fusion == "concat":
        return ["+".join(modalities)]
    return [modalities[0], "+".join(modalities[1:])]


class Task:
    """Builders and per-batch logic for multi-modal segmentation; the engine owns the loop."""

    collate_fn = None

    def __init__(self, recipe):
        self.recipe = recipe
        self.classes: list[str] | None = None
        self.weights_report: dict | None = None

    def dataset(self, split: str) -> MultiModalFolder:
        data = self.recipe.data
        transform = MultiModalTransform(data.size, split == "train", scale=data.scale, ratio=data.ratio,
                                        hflip=data.hflip, mean=data.mean, std=data.std, normalize=data.normalize)
        dataset = MultiModalFolder(data_root(data.root), split, data.modalities, labels=data.labels,
                                   split_file=data.train_split if split == "train" else data.val_split,
                                   classes=data.classes, transform=transform, depth=data.depth)
        self.classes = agreed_classes(self.classes, dataset.classes, data.root)
        return dataset

    def build_model(self) -> FusionSegmenter:
        if self.classes is None:
            self.classes = recipe_classes(self.recipe)  # data.classes: no need to read the data
        if self.classes is None:
            self.dataset("val")
        m = self.recipe.model
        try:
            backbone = MultiModalMiT(m.variant, len(self.recipe.data.modalities), m.fusion,
                                     drop_path_rate=m.drop_path_rate, exchange_threshold=m.exchange_threshold,
                                     **m.sizes())
        except ValueError as e:
            raise UsageError(f"model: {e}") from None
        if m.pretrained and not m.weights:
            state = hub.load_state_dict(hub.resolve(m.pretrained))
            self.weights_report = load_mit_weights(backbone, state, source=m.pretrained)
        model = FusionSegmenter(backbone, len(self.classes), m.decoder_dim, m.dropout,
                                detach_ensemble=m.ensemble_detach)
        load_recipe_weights(model, m, converters=self.released_converters(model),
                            formats=[f"{c.format_name}: {layout}" for c, layout in RELEASED_FORMATS], hint=recipe_key)
        return model

    def released_converters(self, model: FusionSegmenter) -> list:
        """The released formats' converters, each checking that the file fits the recipe's model first."""
        def checked(convert):
            def run(checkpoint):
                state = convert(checkpoint)
                if state is not None:
                    check_released(state, model, self.recipe, checkpoint.file)
                return state
            run.format_name = convert.format_name
            return run
        return [checked(convert) for convert, _ in RELEASED_FORMATS]

    def info(self) -> dict:
        return {"classes": self.classes, "modalities": list(self.recipe.data.modalities)}

    def param_groups(self, model: FusionSegmenter) -> list[dict]:
        """AdamW groups: no weight decay on 1-d tensors (norms, biases); decoder lr x decoder_lr_mult."""
        return decoder_param_groups(model, self.recipe.train.weight_decay, self.recipe.train.decoder_lr_mult)

    def loss(self, model, batch) -> tuple[Tensor, dict]:
        images, labels = batch
        out = model(images, streams=True)
        loss = F.cross_entropy(out["ensemble"], labels, ignore_index=IGNORE_INDEX)
        if len(out["streams"]) > 1:
            for logits in out["streams"]:
                loss = loss + self.recipe.model.stream_loss * F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
        logs = {}
        segmenter = getattr(model, "module", model)  # DistributedDataParallel wraps the model
        sparsity = segmenter.sparsity_loss()
        if sparsity is not None:
            loss = loss + self.recipe.model.exchange_sparsity * sparsity
            modules = segmenter.backbone.fusion_modules()
            logs["exchanged"] = sum(m.exchanged for m in modules) / len(modules)
        return loss, logs

    def evaluator(self) -> "FusionEvaluator":
        return FusionEvaluator(self.classes, stream_names(self.recipe.data.modalities, self.recipe.model.fusion))


def decoder_param_groups(model, weight_decay: float, decoder_lr_mult: float) -> list[dict]:
    """Optimizer groups of a model with a ``backbone``: no weight decay on 1-d tensors (norms, biases);
    everything outside ``backbone.`` (the decoder) at ``lr_scale`` decoder_lr_mult."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            decoder = not name.startswith("backbone.")
            groups.setdefault((decoder, param.ndim > 1), []).append(param)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0,
             "lr_scale": decoder_lr_mult if decoder else 1.0}
            for (decoder, decay), params in sorted(groups.items())]


def recipe_key(key: str) -> str | None:
    """The recipe key(s) that decide the shape of a fusion model's tensor ``key`` (for load errors)."""
    if key.startswith("decode_head.linear_pred."):
        return "data.classes"
    if key.startswith("decode_head."):
        return "model.decoder_dim"
    if ".norm.ln_" in key and key.startswith("backbone.patch_embed"):
        return "data.modalities"
    if key.startswith("backbone."):
        return "model.variant / model.embed_dims"
    return None


def check_released(state: dict, model: FusionSegmenter, recipe, file) -> None:
    """Compare a released checkpoint's architecture with the recipe's model; one UsageError naming the fixes."""
    have, want = architecture(state), architecture(model.state_dict())
    fixes = []
    listed = list(recipe.data.modalities)
    if have["modalities"] != len(listed):
        fixes.append(f"data.modalities: the checkpoint takes {have['modalities']} modalities (stream 0 first, e.g. "
                     f"[rgb, depth] for NYUDv2 / SUN RGB-D, [img, depth, event, lidar] for DeLiVER) but the recipe "
                     f"lists {len(listed)}: {listed}")
    if (have["depths"], have["embed_dims"]) != (want["depths"], want["embed_dims"]):
        named = [v for v, sizes in MIT_VARIANTS.items()
                 if (sizes["depths"], sizes["embed_dims"]) == (have["depths"], have["embed_dims"])]
        fix = f"model.variant={named[0]}" if named else (f"model.depths={have['depths']} "
                                                         f"model.embed_dims={have['embed_dims']}")
        fixes.append(f"{fix}: the checkpoint's MiT has depths {have['depths']} and widths {have['embed_dims']}, the "
                     f"recipe's {want['depths']} and {want['embed_dims']}")
    if have["decoder_dim"] != want["decoder_dim"]:
        fixes.append(f"model.decoder_dim={have['decoder_dim']} (the recipe says {want['decoder_dim']})")
    if have["classes"] != want["classes"]:
        fixes.append(f"data.classes: the checkpoint predicts {have['classes']} classes, the recipe lists "
                     f"{want['classes']}")
    if have["gemini"] != want["gemini"]:
        fixes.append(f"model.fusion=gemini (the recipe says {recipe.model.fusion!r})")
    if fixes:
        raise UsageError(f"{file} does not fit the recipe's model; change " + "; ".join(fixes))


class FusionEvaluator:
    """Segmentation metrics of the ensemble (mIoU, pixel_acc, loss, iou/<class>) plus mIoU per stream.

    One :class:`dfx.tasks.segmentation.Evaluator` counts the ensemble's predictions and one each
    stream's; per-stream results appear as ``mIoU/<stream name>`` when there are two streams.
    """

    def __init__(self, classes: list[str], streams: list[str]):
        self.ensemble = Evaluator(classes)
        self.names = list(streams)
        self.streams = [Evaluator(classes) for _ in streams] if len(streams) > 1 else []

    @torch.no_grad()
    def update(self, model, batch) -> None:
        images, labels = batch
        out = model(images, streams=True)
        for evaluator, logits in [(self.ensemble, out["ensemble"]), *zip(self.streams, out["streams"])]:
            evaluator.add(logits.float().argmax(1), labels)
        self.ensemble.loss_sum += float(F.cross_entropy(out["ensemble"].float(), labels, ignore_index=IGNORE_INDEX,
                                                        reduction="sum"))

    def state(self) -> dict:
        return {"ensemble": self.ensemble.state(), "streams": [e.state() for e in self.streams], "names": self.names}

    @staticmethod
    def summarize(states: list[dict]) -> dict:
        metrics = Evaluator.summarize([s["ensemble"] for s in states])
        for i, name in enumerate(states[0]["names"] if states[0]["streams"] else []):
            metrics[f"mIoU/{name}"] = Evaluator.summarize([s["streams"][i] for s in states])["mIoU"]
        return metrics


# ------------------------------------------------------------------------------------------------
# dfx fuse


def strategies_of(text: str | list[str]) -> list[str]:
    """``"none,concat,gemini"`` (or a list) as checked, distinct strategy names."""
    names = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    names = [check_fusion(s) for s in names if s]
    if len(names) < 1 or len(set(names)) != len(names):
        raise UsageError(f"--compare {text!r}: expected distinct strategies separated by commas, e.g. "
                         "none,concat,exchange,cross-attn,gemini")
    return names


def fusion_overrides(overrides: Iterable[str], fusion: str | None) -> list[str]:
    overrides = list(overrides)
    if fusion is not None:
        check_fusion(fusion)
        overrides.append(f"model.fusion={fusion}")
    return overrides


def check_fusion(name: str) -> str:
    if name not in FUSIONS:
        match = difflib.get_close_matches(name, FUSIONS, n=1)
        hint = f" (did you mean {match[0]}?)" if match else ""
        raise UsageError(f"fusion {name!r} is not a strategy{hint}; choose from {', '.join(FUSIONS)}")
    return name


def load_fusion_recipe(recipe: str | Path, overrides: list[str]):
    resolved = load_recipe(recipe, overrides)
    if resolved.task not in ("fusion", "translation"):
        raise UsageError(f"{recipe}: task is {resolved.task!r}; dfx fuse takes a fusion recipe (task: fusion, e.g. "
                         "recipes/gemini-shapes.yaml, or task: translation, e.g. recipes/translation-shapes.yaml); "
                         "use dfx train for other tasks")
    return resolved


def fuse(recipe: str | Path, overrides: Iterable[str] = (), *, fusion: str | None = None, out=None,
         device: str = "auto", quiet: bool = False, dry_run: bool = False) -> dict:
    """Train and evaluate one fusion strategy; returns train's result plus ``"fusion"``."""
    from dfx.engine.trainer import train

    resolved = load_fusion_recipe(recipe, fusion_overrides(overrides, fusion))
    if dry_run:
        return resolved.to_dict()
    result = train(resolved, out=out, device=device, quiet=quiet)
    return {**result, "fusion": resolved.model.fusion}

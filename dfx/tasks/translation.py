"""Multi-modal image-to-image translation (TokenFusion / GeminiFusion): ``task: translation``.

Recipe sections: ``model`` (:class:`ModelConfig`: MiT variant, fusion strategy, decoder depths,
the loss weights and the adversarial switch), ``data`` (:class:`DataConfig`: input modalities and
a target folder, dfx.data.translation, or the embedded ``shapes-translation``), ``train`` (the
shared one), ``eval`` (:class:`EvalConfig`: metric ``L1`` minimised).

Model: dfx.fusion.translation.TranslationGenerator (fusion inside the encoder's blocks, one image
per stream, a learned ensemble) and, with ``model.gan``, a conditional PatchDiscriminator.
Loss (TokenFusion's): ``l1_weight`` (100) times the sum of the L1 to the target of each stream's
image and of the ensemble's (whose streams are detached: it trains the ensemble weights), plus
with ``gan`` the generator's BCE against "real" (weight ``gan_weight``, 1) and the discriminator's
``0.5 * (BCE(real, 1) + BCE(fake, 0))`` per stream, plus ``exchange_sparsity`` times the mean
exchange score (``exchange`` only). The reference alternates a discriminator step and a
generator step; dfx's loop takes one step, so the two objectives are kept apart by gradients: the
discriminator's loss sees detached generated images, and the generator's adversarial term runs
the discriminator with detached parameters.
Evaluation (dfx.data.translation_eval): L1, PSNR, SSIM of the ensemble image, ``L1/<stream>`` per
stream, and the mean L1 loss; with ``eval.fid`` also FID and KID x 100 on Inception-v3 features.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from dfx import hub
from dfx.data.depth import DepthDataSection
from dfx.data.translation import TranslationFolder, TranslationTransform
from dfx.data.translation_eval import TranslationMetrics, frechet_distance, kernel_inception_distance
from dfx.errors import RunError, UsageError
from dfx.fusion.mit import MultiModalMiT, load_mit_weights
from dfx.fusion.translation import PatchDiscriminator, TranslationGenerator, Translator
from dfx.recipe import NON_NEGATIVE, POSITIVE, Range
from dfx.recipe import EvalConfig as BaseEvalConfig
from dfx.recipe import TrainConfig
from dfx.tasks.classification import data_root
from dfx.tasks.fusion import MitModelConfig, stream_names
from dfx.tasks.segmentation import check_crop_augmentation
from dfx.weights import load_recipe_weights


@dataclass
class ModelConfig(MitModelConfig):
    """The generator's MiT and fusion strategy, its decoder, and the loss.

    ``embed_dims`` / ``depths`` / ``num_heads`` / ``mlp_ratios`` / ``sr_ratios`` (four values) replace
    the variant's sizes; ``decoder_depths``: blocks at strides 16, 8, 4 (default: the encoder's
    stages 3, 2, 1). ``pretrained``: an official SegFormer ``mit_b*`` checkpoint for the encoder.
    ``gan``: add the conditional adversarial loss (TokenFusion trains with it).
    """

    RANGES: ClassVar[dict[str, Range]] = {"l1_weight": POSITIVE, "gan_weight": NON_NEGATIVE,
                                          "exchange_sparsity": NON_NEGATIVE,
                                          "drop_path_rate": Range(0, 1, high_open=True)}

    decoder_depths: Union[list[int], None] = None
    gan: bool = True
    l1_weight: float = 100.0  # TokenFusion's gama
    gan_weight: float = 1.0
    exchange_threshold: float = 0.02
    exchange_sparsity: float = 1e-3  # TokenFusion translation's lamda

    def validate(self, prefix: str) -> None:
        dims = self.check_sizes(prefix)
        if any(d % 4 for d in dims):
            raise UsageError(f"{prefix}.embed_dims: the PixelShuffle decoder needs widths divisible by 4, got {dims}")
        if self.decoder_depths is not None and (len(self.decoder_depths) != 3 or min(self.decoder_depths) < 0):
            raise UsageError(f"{prefix}.decoder_depths: expected three block counts (strides 16, 8, 4), got "
                             f"{self.decoder_depths}")


@dataclass
class DataConfig(DepthDataSection):
    """Input modalities and the target image (dfx.data.translation), and the aligned augmentation.

    ``modalities``: input folders in the order the model reads them (the first is stream 0, the
    only one ``none`` reads); ``target``: the folder of the images to produce. Every image is
    normalised by ``mean`` / ``std`` (0.5: [-1, 1], the generator's tanh range).
    """

    root: str = "shapes-translation"
    modalities: list[str] = field(default_factory=lambda: ["reshading", "edge_texture"])
    target: str = "rgb"
    scale: list[float] = field(default_factory=lambda: [0.6, 1.0])

    def validate(self, prefix: str) -> None:
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise UsageError(f"{prefix}.modalities: expected distinct folder names, got {self.modalities}")
        if self.target in self.modalities:
            raise UsageError(f"{prefix}.target {self.target!r} is also an input in {prefix}.modalities; the target "
                             "must not be an input")
        self.check_size_and_depth(prefix)
        check_crop_augmentation(prefix, self.scale, self.ratio, self.hflip)


@dataclass
class EvalConfig(BaseEvalConfig):
    """``fid``: also score FID and KID x 100 (``KID_x100``) of the ensemble's images against the targets
    on Inception-v3 pool features (``inception``: a weight spec for dfx.hub, default timm's port of the
    TensorFlow Inception-v3; the papers used pytorch-fid's, so values are close, not identical)."""

    RANGES: ClassVar[dict[str, Range]] = {**BaseEvalConfig.RANGES, "kid_subset_size": Range(2)}

    batch_size: int = 32
    metric: str = "L1"
    mode: Literal["max", "min"] = "min"
    fid: bool = False
    inception: str = "inception_v3.tf_in1k"
    kid_subset_size: int = 1000


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig}


def validate_recipe(recipe) -> None:
    from dfx.tasks.fusion import validate_recipe as check_fusion_recipe

    check_fusion_recipe(recipe)


def build_translator(recipe) -> Translator:
    m = recipe.model
    try:
        backbone = MultiModalMiT(m.variant, len(recipe.data.modalities), m.fusion, drop_path_rate=m.drop_path_rate,
                                 exchange_threshold=m.exchange_threshold, **m.sizes())
        generator = TranslationGenerator(backbone, decoder_depths=m.decoder_depths)
        discriminator = PatchDiscriminator(m.variant, **m.sizes()) if m.gan else None
    except ValueError as e:
        raise UsageError(f"model: {e}") from None
    return Translator(generator, discriminator)


def bce(logits: Tensor, real: bool) -> Tensor:
    """Binary cross-entropy of logits against all-real (1) or all-fake (0) labels."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, 1.0 if real else 0.0))


def conditions(inputs: Tensor, streams: int) -> list[Tensor]:
    """The input each stream's image is judged with: stream 0 reads modality 0, stream 1 modality 1
    (the first of the merged extras)."""
    return [inputs[:, min(s, inputs.shape[1] - 1)] for s in range(streams)]


class Task:
    """Builders and per-batch logic for translation; the engine owns the loop."""

    collate_fn = None
    has_classes = False

    def __init__(self, recipe):
        self.recipe = recipe
        self.classes = None
        self.weights_report: dict | None = None
        self._inception = None

    def dataset(self, split: str) -> TranslationFolder:
        data = self.recipe.data
        transform = TranslationTransform(data.size, split == "train", scale=data.scale, ratio=data.ratio,
                                         hflip=data.hflip, mean=data.mean, std=data.std)
        return TranslationFolder(data_root(data.root), split, data.modalities, target=data.target,
                                 split_file=data.train_split if split == "train" else data.val_split,
                                 transform=transform, depth=data.depth)

    def build_model(self) -> Translator:
        if self.recipe.eval.fid:  # fail before training, not at the first evaluation
            try:
                hub.resolve(self.recipe.eval.inception)
            except (UsageError, RunError) as e:
                raise type(e)(f"eval.fid needs Inception-v3 weights (eval.inception={self.recipe.eval.inception!r}), "
                              f"or set eval.fid=false: {e}") from None
        model = build_translator(self.recipe)
        m = self.recipe.model
        if m.pretrained and not m.weights:
            state = hub.load_state_dict(hub.resolve(m.pretrained))
            self.weights_report = load_mit_weights(model.backbone, state, source=m.pretrained)
        load_recipe_weights(model, m)
        return model

    def info(self) -> dict:
        data = self.recipe.data
        return {"modalities": list(data.modalities), "target": data.target,
                "streams": stream_names(list(data.modalities), self.recipe.model.fusion)}

    def param_groups(self, model) -> list[dict]:
        """AdamW groups: no weight decay on 1-d tensors (norms, biases)."""
        decay, flat = [], []
        for param in model.parameters():
            if param.requires_grad:
                (decay if param.ndim > 1 else flat).append(param)
        return [{"params": decay, "weight_decay": self.recipe.train.weight_decay},
                {"params": flat, "weight_decay": 0.0}]

    def loss(self, model, batch) -> tuple[Tensor, dict]:
        inputs, target = batch
        translator = getattr(model, "module", model)  # DistributedDataParallel wraps the model
        m = self.recipe.model
        out = model(inputs, streams=True)
        images = out["streams"] + ([out["ensemble"]] if len(out["streams"]) > 1 else [])
        l1 = sum(F.l1_loss(image, target) for image in images)  # the ensemble's trains its weights only
        loss = m.l1_weight * l1
        logs = {"l1": float(F.l1_loss(out["ensemble"].detach(), target))}
        if translator.discriminator is not None:
            d = translator.discriminator
            frozen = {name: p.detach() for name, p in d.named_parameters()}
            d_loss, g_gan = 0.0, 0.0
            for condition, image in zip(conditions(inputs, len(out["streams"])), out["streams"]):
                d_loss = d_loss + 0.5 * (bce(d(condition, target), True) + bce(d(condition, image.detach()), False))
                g_gan = g_gan + bce(functional_call(d, frozen, (condition, image)), True)
            loss = loss + m.gan_weight * g_gan + d_loss
            logs.update({"g_gan": float(g_gan.detach()), "d": float(d_loss.detach())})
        sparsity = translator.sparsity_loss()
        if sparsity is not None:
            loss = loss + m.exchange_sparsity * sparsity
        return loss, logs

    def evaluator(self) -> "TranslationEvaluator":
        e = self.recipe.eval
        if e.fid and self._inception is None:
            self._inception = inception_extractor(e.inception)
        return TranslationEvaluator(stream_names(list(self.recipe.data.modalities), self.recipe.model.fusion),
                                    features=self._inception if e.fid else None, kid_subset_size=e.kid_subset_size)


def inception_extractor(spec: str):
    """Inception-v3 pool features: ``images [B, 3, H, W]`` in [-1, 1] -> ``[B, 2048]`` (resized to 299,
    normalised as the weights expect). ``spec``: a weight spec for dfx.hub (offline: fails within
    seconds naming the repository and the fixes)."""
    network = hub.create_timm_model("inception_v3", pretrained=spec, num_classes=0).eval()
    config = network.pretrained_cfg
    mean = torch.tensor(config.get("mean", (0.5, 0.5, 0.5))).view(1, 3, 1, 1)
    std = torch.tensor(config.get("std", (0.5, 0.5, 0.5))).view(1, 3, 1, 1)

    @torch.no_grad()
    def features(images: Tensor) -> Tensor:
        network.to(images.device)
        unit = ((images.float() + 1) / 2).clamp(0, 1)
        x = F.interpolate(unit, size=(299, 299), mode="bilinear", align_corners=False)
        return network((x - mean.to(x.device)) / std.to(x.device)).double().cpu()

    return features


class TranslationEvaluator:
    """L1, PSNR and SSIM of the ensemble image; ``L1/<stream>`` per stream when there are two; ``loss``:
    the mean L1 of the ensemble. With ``features`` (images -> feature vectors), also ``FID`` and
    ``KID_x100`` of the ensemble's images against the targets over the whole validation set."""

    def __init__(self, streams: list[str], features=None, kid_subset_size: int = 1000):
        self.ensemble = TranslationMetrics()
        self.names = list(streams)
        self.streams = [TranslationMetrics() for _ in streams] if len(streams) > 1 else []
        self.features, self.kid_subset_size = features, kid_subset_size
        self.fake: list[Tensor] = []
        self.real: list[Tensor] = []

    @torch.no_grad()
    def update(self, model, batch) -> None:
        inputs, target = batch
        out = model(inputs, streams=True)
        self.ensemble.add(out["ensemble"].float(), target)
        for metrics, image in zip(self.streams, out["streams"]):
            metrics.add(image.float(), target)
        if self.features is not None:
            self.fake.append(self.features(out["ensemble"]))
            self.real.append(self.features(target))

    def state(self) -> dict:
        state = {"ensemble": self.ensemble.state(), "streams": [s.state() for s in self.streams], "names": self.names}
        if self.features is not None and self.fake:
            state.update({"fake": torch.cat(self.fake).numpy(), "real": torch.cat(self.real).numpy(),
                          "kid_subset_size": self.kid_subset_size})
        return state

    @staticmethod
    def summarize(states: list[dict]) -> dict:
        metrics = TranslationMetrics.summarize([s["ensemble"] for s in states])
        metrics["loss"] = metrics["L1"]
        for i, name in enumerate(states[0]["names"] if states[0]["streams"] else []):
            metrics[f"L1/{name}"] = TranslationMetrics.summarize([s["streams"][i] for s in states])["L1"]
        if any("fake" in s for s in states):
            fake = np.concatenate([s["fake"] for s in states if "fake" in s])
            real = np.concatenate([s["real"] for s in states if "real" in s])
            subset = next(s["kid_subset_size"] for s in states if "fake" in s)
            metrics["FID"] = frechet_distance(fake, real)
            metrics["KID_x100"] = 100 * kernel_inception_distance(fake, real, subset_size=subset)
        return metrics

"""Manifold distillation: train a student ViT from a frozen teacher (a dfx run, a weights file or the Hub).

Recipe sections: ``model`` (the student; classification's ModelConfig, random init unless
``model.pretrained`` is set), ``data`` / ``train`` / ``eval`` (classification's) and ``distill``
(:class:`DistillConfig`).

Per batch of images [B, 3, H, W] (after Mixup/CutMix when enabled, the same images for both):
the teacher gives logits [B, K] and the outputs of ``distill.teacher_layers`` under no_grad; the
student gives logits [B, K] (or a (class, distillation) pair for a distilled DeiT) and the outputs
of ``distill.student_layers``; extra tokens are dropped so both sides hold the same N patch tokens
[B, N, C], and :func:`dfx.distill.distillation_loss` combines CE, KD and the relation losses.

The teacher lives on the Task, never inside the model the engine trains and saves, so
checkpoints hold the student alone and ``dfx eval`` of a distilled run needs no teacher. It is
built on first use, frozen, kept in eval mode and moved to the batch's device.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Union

import torch
from torch import nn

from dfx import hub
from dfx.distill import BlockFeatures, distillation_loss, patch_tokens
from dfx.errors import RunError, UsageError
from dfx.recipe import EvalConfig, shipped_display
from dfx.tasks import classification
from dfx.tasks.classification import DataConfig, ModelConfig, TrainConfig

DEFAULT_RECIPE = "recipes/distill-shapes.yaml"


@dataclass
class DistillConfig:
    """The ``distill`` section. Defaults are the paper's DeiT-Ti <- CaiT-S24 weights.

    ``student_layers[i]`` is paired with ``teacher_layers[i]``; negative indices count from the
    last block (-1 is the last), so one recipe fits teachers of different depths.
    """

    teacher: Union[str, None] = None  # dfx run dir or checkpoint, weights file, hf://org/repo, timm name, alias
    teacher_model: Union[str, None] = None  # timm architecture of a plain weights file / hf:// file
    teacher_kwargs: dict = field(default_factory=dict)  # to timm.create_model for file / Hub teachers
    alpha: float = 1.0  # KD share: (1 - alpha) * CE + alpha * KD
    beta: float = 1.0  # weight of the manifold (relation) terms; 0 = plain KD
    w_sample: float = 0.1
    w_patch: float = 4.0
    w_rand: float = 0.2
    k: int = 192  # tokens drawn for the random relation
    tau: float = 1.0  # soft-KD temperature
    kd: Literal["soft", "hard"] = "soft"
    student_layers: list[int] = field(default_factory=list)
    teacher_layers: list[int] = field(default_factory=list)

    def validate(self, prefix: str) -> None:
        if not self.teacher:
            raise UsageError(f"{prefix}.teacher: required: a dfx run directory, a weights file, hf://org/repo, a timm "
                             f"model name or an alias ({', '.join(hub.ALIASES)}); pass --teacher or "
                             f"{prefix}.teacher=...")
        if not 0.0 <= self.alpha <= 1.0:
            raise UsageError(f"{prefix}.alpha: expected a value in [0, 1] (share of KD against CE), got {self.alpha}")
        for key in ("beta", "w_sample", "w_patch", "w_rand"):
            if getattr(self, key) < 0:
                raise UsageError(f"{prefix}.{key}: expected a value >= 0, got {getattr(self, key)}")
        if self.k < 1:
            raise UsageError(f"{prefix}.k: expected at least 1 token for the random relation, got {self.k}")
        if self.tau <= 0:
            raise UsageError(f"{prefix}.tau: expected a temperature > 0, got {self.tau}")
        if len(self.student_layers) != len(self.teacher_layers):
            raise UsageError(f"{prefix}.student_layers and {prefix}.teacher_layers pair up one to one: got "
                             f"{len(self.student_layers)} student layers {self.student_layers} and "
                             f"{len(self.teacher_layers)} teacher layers {self.teacher_layers}")
        if self.beta > 0 and not self.student_layers:
            raise UsageError(f"{prefix}.student_layers / teacher_layers: empty, but {prefix}.beta is {self.beta}; "
                             f"name the layer pairs (e.g. [0, 1, -2, -1]) or set {prefix}.beta=0 for plain KD")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig,
            "distill": DistillConfig}


# ----------------------------------------------------------------------------------------------
# The teacher: where it comes from, how it is built, whether its layers fit the student's


@dataclass
class TeacherSource:
    """A located teacher: a dfx checkpoint (``run``) or a timm architecture plus weights file."""

    spec: str
    run: Union[Path, None] = None  # run directory or dfx checkpoint file
    model_name: Union[str, None] = None
    weights: Union[Path, None] = None
    kwargs: dict = field(default_factory=dict)


def _is_dfx_checkpoint(path: Path) -> bool:
    if path.suffix != ".safetensors":
        return False
    from dfx.engine.checkpoint import read_metadata

    return read_metadata(path).get("format") == "dfx"


def _train_command(run: Path, recipe_source: Union[str, None]) -> str:
    """The command that creates run directory ``run``: ``dfx train <stem> [--out run]`` for a shipped
    recipe, ``dfx train <folder>/<stem>.yaml`` for one beside the distillation recipe or in ./recipes."""
    stem = re.sub(r"-\d+$", "", run.name)
    folders = [Path(recipe_source).parent] if recipe_source else []
    for folder in (*folders, Path("recipes")):
        candidate = folder / f"{stem}.yaml"
        if candidate.is_file():
            default_dir = run.parts[:1] == ("runs",) and len(run.parts) == 3 and run.name == stem
            return f"dfx train {shipped_display(candidate)}" + ("" if default_dir else f" --out {run}")
    return f"dfx train RECIPE --out {run}"


def locate_teacher(d: DistillConfig, recipe_source: Union[str, None] = None) -> TeacherSource:
    """Find (and, for the Hub, download) the teacher named by ``distill.teacher``; fails fast.

    Raises UsageError for a missing run directory (naming the ``dfx train`` command that creates
    it) and RunError (via dfx.hub) when Hub weights are neither cached nor reachable.
    """
    spec = str(d.teacher)
    path = Path(spec).expanduser()
    if path.is_dir() or (path.is_file() and _is_dfx_checkpoint(path)):
        return TeacherSource(spec, run=path)
    is_hub = spec.startswith("hf://") or path.is_file() or spec in hub.ALIASES or hub.timm_name(spec) is not None
    if not is_hub:
        if path.suffix in {".safetensors", ".pth", ".pt", ".bin"}:
            raise UsageError(f"distill.teacher: weights file not found: {spec}")
        if "/" in spec:  # looks like a run directory that is not there yet
            raise UsageError(f"distill.teacher: no dfx run directory {spec}; create it with "
                             f"`{_train_command(path, recipe_source)}` or pass --teacher NAME|PATH|RUN_DIR")
        close = difflib.get_close_matches(spec, list(hub.ALIASES), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UsageError(f"distill.teacher: {spec!r} is not a run directory, a weights file, hf://org/repo, a timm "
                         f"pretrained name or an alias{hint}; aliases: {', '.join(hub.ALIASES)}")
    name = d.teacher_model or _architecture_of(spec)
    if name is None:
        raise UsageError(f"distill.teacher_model: required for teacher {spec!r} (a plain weights file): "
                         f"the timm architecture it fits, e.g. deit_base_patch16_224")
    return TeacherSource(spec, model_name=name, weights=hub.resolve(spec), kwargs=dict(d.teacher_kwargs))


def _architecture_of(spec: str) -> Union[str, None]:
    """timm architecture of an alias, timm name or ``hf://timm/<name>`` spec (None for other files)."""
    if spec.startswith("hf://timm/"):
        spec = spec[len("hf://timm/"):].split("/")[0]
    return hub.timm_name(spec)


def build_teacher(source: TeacherSource, *, meta: bool = False) -> tuple[nn.Module, Union[list[str], None]]:
    """(teacher model, its class names when known). ``meta``: architecture only, no weights loaded.

    The returned model is frozen (no parameter requires grad) and in eval mode.
    """
    classes = None
    if source.run is not None:
        from dfx.engine import checkpoint as ckpt
        from dfx.engine.evaluation import load_model
        from dfx.weights import find_checkpoint

        file = find_checkpoint(source.run)
        recipe_model = (ckpt.read_metadata(file).get("recipe") or {}).get("model") or {}
        # The checkpoint holds all weights: never fetch the teacher's own initialisation again.
        overrides = ["model.pretrained=null"] if "pretrained" in recipe_model else []
        if meta:
            with torch.device("meta"):
                _, _, model, meta_data = _architecture_only(file, overrides)
        else:
            _, _, model, meta_data = load_model(file, overrides)
        classes = (meta_data.get("info") or {}).get("classes")
    else:
        try:
            with torch.device("meta") if meta else contextlib.nullcontext():
                model = hub.create_timm_model(source.model_name, **source.kwargs)
        except TypeError as e:
            raise UsageError(f"distill.teacher_kwargs: {e}") from None
        if not meta:
            load_teacher_weights(model, source)
    model.requires_grad_(False)
    return model.eval(), classes


def load_teacher_weights(model: nn.Module, source: TeacherSource) -> None:
    """Load every tensor of ``source.weights`` into ``model`` (strict: a teacher needs its classifier too).

    timm's own pretrained loading drops the classifier whenever the class count differs from the
    architecture's default; a teacher must keep it, so the file is loaded here, after the model
    family's ``checkpoint_filter_fn`` (original-format keys, position embeddings resized to
    ``teacher_kwargs.img_size``).
    """
    state = hub.load_state_dict(source.weights)
    adapt = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if adapt is not None:
        state = adapt(state, model)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        reason = " ".join(str(e).split())[:300]
        raise RunError(f"distill.teacher: {source.weights} does not fit {source.model_name} "
                       f"{source.kwargs or ''}: {reason}; set distill.teacher_model / teacher_kwargs to the "
                       "architecture the weights were trained with") from None


def _architecture_only(file: Path, overrides: list[str]):
    """load_model without reading the weights (call under a meta device)."""
    from dfx.engine import checkpoint as ckpt
    from dfx.recipe import apply_overrides, build_recipe, task_module

    meta_data = ckpt.read_metadata(file)
    recipe = build_recipe(apply_overrides(meta_data["recipe"], [*overrides, "model.weights=null"]),
                          name=str(meta_data.get("name", "run")))
    task = task_module(recipe.task).Task(recipe)
    task.classes = (meta_data.get("info") or {}).get("classes")
    return recipe, task, task.build_model(), meta_data


def _model_name(model: nn.Module) -> str:
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__


def _resolve_layers(key: str, layers: list[int], model: nn.Module, role: str) -> list[int]:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        raise UsageError(f"{key}: the {role} {_model_name(model)} has no `blocks` of transformer blocks to take "
                         "features from; use a ViT / DeiT / CaiT-style timm model or set distill.beta=0 (plain KD)")
    depth = len(blocks)
    bad = [i for i in layers if not -depth <= i < depth]
    if bad:
        raise UsageError(f"{key}: {bad} out of range for the {role} {_model_name(model)} ({depth} blocks): valid "
                         f"indices are 0..{depth - 1}, or -{depth}..-1 counted from the end (e.g. "
                         f"[0, 1, 2, 3, -4, -3, -2, -1] for the first four and last four)")
    return [i % depth for i in layers]


def _check_input_size(model: nn.Module, image_size: int, key: str, role: str) -> None:
    embed = getattr(model, "patch_embed", None)
    if embed is None or getattr(model, "dynamic_img_size", False) or not getattr(embed, "strict_img_size", False):
        return
    if tuple(embed.img_size) != (image_size, image_size):
        raise UsageError(f"{key}: the {role} {_model_name(model)} takes {embed.img_size[0]}x{embed.img_size[1]} "
                         f"images but data.image_size is {image_size}; teacher and student see the same images, so "
                         "their input resolution must match data.image_size")


def layer_pairs(student: nn.Module, teacher: nn.Module, d: DistillConfig,
                image_size: int) -> tuple[list[int], list[int]]:
    """Check the two models against the recipe; return the paired block indices (non-negative).

    Works on meta-device models (only architecture is read). Empty lists when ``beta`` is 0: plain
    KD takes no features.
    """
    _check_input_size(student, image_size, "model.kwargs.img_size", "student")
    _check_input_size(teacher, image_size, "distill.teacher", "teacher")
    if d.beta == 0:
        return [], []
    student_layers = _resolve_layers("distill.student_layers", d.student_layers, student, "student")
    teacher_layers = _resolve_layers("distill.teacher_layers", d.teacher_layers, teacher, "teacher")
    grids = [getattr(getattr(m, "patch_embed", None), "grid_size", None) for m in (student, teacher)]
    if None not in grids and tuple(grids[0]) != tuple(grids[1]):
        raise UsageError(f"distill: the student's patch grid {tuple(grids[0])} differs from the teacher's "
                         f"{tuple(grids[1])}; the relation losses compare the same patches, so use the same patch "
                         "size and input resolution, or set distill.beta=0 (plain KD)")
    return student_layers, teacher_layers


def preflight(recipe) -> TeacherSource:
    """Locate the teacher and check both architectures against the recipe before any data is read."""
    source = locate_teacher(recipe.distill, recipe.source)
    teacher, _ = build_teacher(source, meta=True)
    m = recipe.model
    try:
        with torch.device("meta"):
            student = hub.create_timm_model(m.name, **m.kwargs)
    except TypeError as e:
        raise UsageError(f"model.kwargs: {e}") from None
    layer_pairs(student, teacher, recipe.distill, recipe.data.image_size)
    return source


# ----------------------------------------------------------------------------------------------
# The task


def _forward(net: nn.Module, hooked: nn.Module, images: torch.Tensor, layers: list[int]):
    """(net(images), patch tokens [B, N, C] of ``hooked.blocks[layers]``); hooks live for this call only."""
    if not layers:
        return net(images), []
    with BlockFeatures(hooked, layers) as blocks:
        logits = net(images)
        return logits, patch_tokens(blocks.pop(), blocks.num_prefix_tokens)


class Task(classification.Task):
    """Classification data, model and evaluation; the loss distils from the teacher."""

    def __init__(self, recipe):
        super().__init__(recipe)
        self.teacher: Union[nn.Module, None] = None
        self.layers: tuple[list[int], list[int]] = ([], [])

    def build_model(self) -> nn.Module:
        model = super().build_model()
        if hasattr(model, "set_distilled_training"):
            # A distilled DeiT returns (class, distillation) logits in train mode: CE on the first,
            # KD on the second. In eval mode it averages them (what evaluation and export see).
            model.set_distilled_training(True)
        return model

    def info(self) -> dict:
        return {**super().info(), "teacher": self.recipe.distill.teacher}

    def teacher_for(self, student: nn.Module, device: torch.device) -> nn.Module:
        """The frozen teacher on ``device``, built and checked against ``student`` on first use."""
        if self.teacher is None:
            d = self.recipe.distill
            teacher, teacher_classes = build_teacher(locate_teacher(d, self.recipe.source))
            if teacher_classes is not None and teacher_classes != self.classes:
                raise UsageError(f"distill.teacher: the teacher run was trained on classes {teacher_classes} but "
                                 f"data.root has {self.classes}; KD needs the same classes in the same order")
            if getattr(teacher, "num_classes", len(self.classes)) != len(self.classes):
                raise UsageError(f"distill.teacher: {_model_name(teacher)} predicts {teacher.num_classes} classes but "
                                 f"data.root has {len(self.classes)}; KD needs a teacher of the same classes")
            self.layers = layer_pairs(student, teacher, d, self.recipe.data.image_size)
            self.teacher = teacher
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        return self.teacher

    def loss(self, model, batch) -> tuple[torch.Tensor, dict]:
        images, labels = batch
        student = getattr(model, "module", model)  # hooks go on the model inside DistributedDataParallel
        teacher = self.teacher_for(student, images.device)
        student_layers, teacher_layers = self.layers
        images, target = self.targets(images, labels)
        with torch.no_grad():
            teacher_logits, teacher_feats = _forward(teacher, teacher, images, teacher_layers)
        student_logits, student_feats = _forward(model, student, images, student_layers)
        d = self.recipe.distill
        total, parts = distillation_loss(student_logits, teacher_logits, target, student_feats, teacher_feats,
                                         alpha=d.alpha, beta=d.beta, w_sample=d.w_sample, w_patch=d.w_patch,
                                         w_rand=d.w_rand, k=d.k, tau=d.tau, kd=d.kd)
        return total, {name: value.detach() for name, value in parts.items()}  # read at log points only


# ----------------------------------------------------------------------------------------------
# Entry point of `dfx distill`


def distill_overrides(overrides: Iterable[str] = (), teacher: Union[str, None] = None,
                      student: Union[str, None] = None) -> list[str]:
    """Recipe overrides with ``--teacher`` / ``--student`` added (quoted: any path is a string)."""
    extra = [f"distill.teacher={json.dumps(teacher)}"] if teacher else []
    extra += [f"model.name={json.dumps(student)}"] if student else []
    return [*overrides, *extra]


def distill(recipe: Union[str, Path] = DEFAULT_RECIPE, overrides: Iterable[str] = (), *,
            teacher: Union[str, None] = None, student: Union[str, None] = None, out=None, resume=None,
            device: str = "auto", quiet: bool = False, dry_run: bool = False) -> dict:
    """Distil a teacher into the recipe's student; returns train's result plus ``"teacher"``.

    The teacher is located (and Hub weights fetched) and the layer pairs are checked against both
    architectures before any data is read, so a wrong name, an unreachable Hub or a bad layer
    index fails in seconds. ``dry_run`` returns the resolved recipe instead of training.
    """
    from dfx.engine.trainer import resolve_run, train

    overrides = distill_overrides(overrides, teacher, student)
    resolved, _ = resolve_run(recipe, overrides, resume)
    if resolved.task != "distillation":
        raise UsageError(f"{recipe}: task is {resolved.task!r}; dfx distill takes a distillation recipe "
                         f"(task: distillation, e.g. {DEFAULT_RECIPE}); use dfx train for other tasks")
    if dry_run:
        return resolved.to_dict()
    source = preflight(resolved)
    result = train(recipe, overrides, out=out, resume=resume, device=device, quiet=quiet)
    return {**result, "teacher": source.spec}

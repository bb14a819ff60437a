"""Recipes: YAML files that describe one experiment, as data only.

A recipe has five top-level sections: ``task``, ``model``, ``data``, ``train``, ``eval``.

- ``_base_:`` (a path or a list of paths, relative to the file) names parent recipes; they are
  deep-merged in order, then the file's own keys on top (mappings merge, everything else replaces).
- Command-line overrides ``a.b.c=value`` are applied last; ``value`` is parsed as YAML.
- The merged mapping is validated against the task's typed sections (dataclasses): unknown keys
  fail with a did-you-mean, wrong types name the key and the expected type, every float must be
  finite, and values outside a section's ``RANGES`` name the key, the value and the valid range —
  all before any data is read or any model built (``--dry-run`` included).

Nothing in a recipe is executed: YAML is read with ``yaml.safe_load`` and only plain values are
accepted.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml

from dfx.errors import UsageError

# Task name -> module defining it. A plain table, read lazily: importing dfx registers nothing.
TASK_MODULES = {
    "classification": "dfx.tasks.classification",
    "detection": "dfx.tasks.detection",
    "distillation": "dfx.tasks.distillation",
    "fusion": "dfx.tasks.fusion",
    "segmentation": "dfx.tasks.segmentation",
}


INF = math.inf


@dataclass(frozen=True)
class Range:
    """Valid values of a number: ``low``..``high``, each end closed unless marked open."""

    low: float = -INF
    high: float = INF
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.high == INF:
            return f"{'>' if self.low_open else '>='} {low}"
        return f"{'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
UNIT = Range(0, 1)


@dataclass
class TrainConfig:
    """The ``train`` section shared by every task.

    ``batch_size`` is the *global* batch over all processes, so a recipe means the same
    optimisation whatever the number of GPUs; each process takes ``batch_size / world_size``.
    """

    RANGES: ClassVar[dict[str, Range]] = {
        "epochs": Range(1, 100_000), "batch_size": Range(1, 2**20), "lr": POSITIVE, "weight_decay": NON_NEGATIVE,
        "momentum": UNIT, "warmup_epochs": NON_NEGATIVE, "warmup_steps": NON_NEGATIVE, "warmup_lr": NON_NEGATIVE,
        "min_lr": NON_NEGATIVE, "decay_epochs": POSITIVE, "milestones": Range(1, 100_000), "decay_rate": POSITIVE,
        "grad_clip": POSITIVE, "ema_decay": UNIT, "seed": Range(0, 2**32, high_open=True),
        "num_workers": Range(0, 256), "log_every": Range(1),
    }

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = 0.9
    scheduler: Literal["cosine", "step", "multistep", "poly", "constant"] = "cosine"
    warmup_epochs: float = 0.0
    warmup_steps: int = 0
    warmup_lr: float = 1e-6
    min_lr: float = 0.0
    decay_epochs: float = 30.0
    milestones: list[int] = field(default_factory=list)
    decay_rate: float = 0.1
    grad_clip: Union[float, None] = None
    amp: Union[bool, Literal["bf16", "fp16"]] = False
    ema: bool = False
    ema_decay: float = 0.9998
    seed: int = 0
    num_workers: int = 2
    log_every: int = 20
    tensorboard: bool = False  # also log to <run>/tensorboard (needs the tensorboard extra)
    compile: bool = False  # train the network under torch.compile (evaluation stays eager)


@dataclass
class WeightsConfig:
    """Whole-model weights, shared by every task's ``model`` section (see dfx.weights).

    ``weights``: a dfx checkpoint or run directory, ``hf://org/repo/file``, or a released
    checkpoint of the method's reference code; loaded after the model is built, in place of
    ``pretrained`` (the backbone's starting weights). ``weights_strict: false`` loads what fits
    and warns about the rest instead of failing.
    """

    weights: Union[str, None] = None
    weights_strict: bool = True


@dataclass
class EvalConfig:
    """The ``eval`` section: when to evaluate and which metric picks the ``best`` checkpoint."""

    RANGES: ClassVar[dict[str, Range]] = {"every": Range(1, 100_000), "batch_size": Range(1, 2**20)}

    every: int = 1
    batch_size: int = 128
    metric: str = "top1"
    mode: Literal["max", "min"] = "max"


class Recipe:
    """A validated recipe: ``task`` plus one dataclass per section (``recipe.train.lr``).

    Every task has ``model``, ``data``, ``train`` and ``eval``; a task may add sections of its
    own (e.g. ``distill``) by listing them in its ``SECTIONS``.
    """

    def __init__(self, task: str, sections: dict, name: str = "recipe", source: str | None = None):
        self.task = task
        self.sections = sections
        self.name = name  # file stem; names the run directory
        self.source = source  # file the recipe was read from, if any

    def __getattr__(self, section: str):
        sections = self.__dict__.get("sections", {})
        if section in sections:
            return sections[section]
        raise AttributeError(f"recipe has no section {section!r}")

    def to_dict(self) -> dict:
        """The recipe as plain data (what ``recipe.yaml`` in a run directory holds)."""
        return {"task": self.task, **{k: dataclasses.asdict(v) for k, v in self.sections.items()}}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def task_module(task: str):
    """The module that defines ``task`` (its config dataclasses and builders)."""
    if task not in TASK_MODULES:
        raise UsageError(f"task: unknown task {task!r}{_suggest(task, TASK_MODULES)}; known tasks: {', '.join(TASK_MODULES)}")
    return importlib.import_module(TASK_MODULES[task])


# ----------------------------------------------------------------------------------------------
# Reading YAML with `_base_` inheritance


def read_yaml(path: Path) -> dict:
    """Read one YAML mapping; errors name the file (and line for syntax errors)."""
    if not path.is_file():
        raise UsageError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise UsageError(f"{where}: YAML syntax error: {e.problem or e}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: YAML error: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a recipe must be a YAML mapping of sections, got {type(data).__name__}")
    return data


def deep_merge(base: dict, top: dict) -> dict:
    """Merge ``top`` into a copy of ``base``: mappings merge key by key, other values replace."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read ``path`` and its ``_base_`` parents into one merged mapping."""
    if not Path(path).is_file():
        raise UsageError(f"recipe file not found: {path}")
    path = Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise UsageError(f"_base_ cycle: {chain}")
    data = read_yaml(path)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise UsageError(f"{path}: _base_ must be a path or a list of paths, got {bases!r}")
    merged: dict = {}
    for base in bases:
        merged = deep_merge(merged, load_tree(path.parent / base, (*_seen, path)))
    return deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], yaml-parsed value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise UsageError(f"override {text!r} is not of the form section.key=value (e.g. train.epochs=20)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # an unparsable value is taken as the literal string; validation decides
    return key.split("."), value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    out = copy.deepcopy(tree)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for i, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise UsageError(f"override {text!r}: {'.'.join(keys[: i + 1])} is a value, not a section")
            node = child
        node[keys[-1]] = value
    return out


# ----------------------------------------------------------------------------------------------
# Validation against typed dataclasses


def _suggest(name: str, candidates) -> str:
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(inner)}"
    if origin is dict or tp is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp, key: str) -> Any:
    """Return ``value`` converted to ``tp`` or raise _Mismatch. ``key`` is the dotted path."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        nested = None  # a mapping that fits a section's shape but not its keys: that error says more
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except _Mismatch:
                continue
            except UsageError as e:
                nested = nested or e
        if nested is not None:
            raise nested
        raise _Mismatch
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            return value
        raise _Mismatch
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (list, tuple)):
            return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        raise _Mismatch
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return copy.deepcopy(value)
        raise _Mismatch
    if dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return build_section(tp, value, key)
        raise _Mismatch
    raise TypeError(f"unsupported recipe field type {tp!r} at {key}")


def build_section(cls, data: dict, prefix: str):
    """Instantiate dataclass ``cls`` from ``data``, checking keys and types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}"
        if key not in fields:
            known = ", ".join(fields)
            raise UsageError(f"unknown recipe key {path}{_suggest(key, fields)}; keys of {prefix}: {known}")
        try:
            kwargs[key] = _coerce(value, hints[key], path)
        except _Mismatch:
            hint = hints[key]
            options = [a for a in typing.get_args(hint) if isinstance(a, str)] if typing.get_origin(hint) is Literal else []
            suggestion = _suggest(value, options) if isinstance(value, str) else ""
            raise UsageError(f"{path}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})"
                             f"{suggestion}") from None
    ranges = getattr(cls, "RANGES", {})
    for key, value in kwargs.items():
        check_value(f"{prefix}.{key}", value, ranges.get(key))
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise UsageError(f"{prefix}: {e}") from None
    check = getattr(obj, "validate", None)
    if check is not None:
        check(prefix)
    return obj


def check_value(path: str, value: Any, valid: Range | None) -> None:
    """Numbers (also inside lists) must be finite and, with ``valid``, inside that range."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            check_value(f"{path}[{i}]", item, valid)
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{path}: expected a finite number, got {value}")
    if valid is not None and value not in valid:
        raise UsageError(f"{path}: {value!r} is out of range; expected a value {'in ' if valid.high != INF else ''}"
                         f"{valid}")


def build_recipe(tree: dict, name: str = "recipe", source: str | None = None) -> Recipe:
    """Validate a merged mapping and return a :class:`Recipe`."""
    task = tree.get("task")
    if not isinstance(task, str):
        raise UsageError(f"task: expected a task name ({', '.join(TASK_MODULES)}), got {task!r}")
    module = task_module(task)
    allowed = ("task", *module.SECTIONS)
    unknown = [k for k in tree if k not in allowed]
    if unknown:
        key = unknown[0]
        raise UsageError(f"unknown recipe section {key!r}{_suggest(key, allowed)}; sections of a {task} recipe: "
                         f"{', '.join(allowed)}")
    sections = {}
    for section, cls in module.SECTIONS.items():
        value = tree.get(section) or {}
        if not isinstance(value, dict):
            raise UsageError(f"{section}: expected a mapping, got {value!r}")
        sections[section] = build_section(cls, value, section)
    recipe = Recipe(task=task, sections=sections, name=name, source=source)
    check = getattr(module, "validate_recipe", None)
    if check is not None:  # cross-section checks, e.g. layer pairs against the models
        check(recipe)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file (with ``_base_`` parents), apply overrides and validate it."""
    path = Path(path)
    tree = apply_overrides(load_tree(path), list(overrides))
    return build_recipe(tree, name=path.stem, source=str(path))


def recipe_from_json(text: str, name: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Rebuild a recipe stored as JSON (e.g. in checkpoint metadata)."""
    return build_recipe(apply_overrides(json.loads(text), list(overrides)), name=name)


def list_recipes(folder: str | Path | None = None) -> list[dict]:
    """``[{"path", "task", "summary"}]`` for every recipe in ``folder`` (default ``./recipes``, else the
    recipes beside the dfx source); summary: the first line of the file's header comment."""
    if folder is None:
        here = Path("recipes")
        folder = here if here.is_dir() else Path(__file__).resolve().parents[1] / "recipes"
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such folder of recipes; pass the folder that holds your .yaml recipes")
    found = []
    for path in sorted(folder.glob("*.y*ml")):
        lines = path.read_text().splitlines()
        comment = next((line.lstrip("# ").strip() for line in lines if line.startswith("#") and line.strip("# ")), "")
        task, error = None, None
        try:
            task = load_tree(path).get("task")  # through _base_ parents
        except UsageError as e:  # listed with the reason, not silently without a task
            error = str(e)
        found.append({"path": str(path), "task": task, "summary": comment, **({"error": error} if error else {})})
    return found

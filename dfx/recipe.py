"""Recipes: YAML files that describe one experiment, as data only.

A recipe has five top-level sections: ``task``, ``model``, ``data``, ``train``, ``eval``.

- A recipe is named by its path or, for the recipes that ship with dfx (package data, see
  :func:`shipped_folder`), by name from any folder: ``hdetr-shapes``, ``hdetr-shapes.yaml`` or
  ``recipes/hdetr-shapes.yaml``. An existing path always wins (:func:`resolve_recipe`).
- ``_base_:`` (a path or a list of paths, relative to the file, else a shipped recipe's name) names
  parent recipes; they are deep-merged in order, then the file's own keys on top (mappings merge,
  everything else replaces).
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
import importlib.resources
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
    "depth": "dfx.tasks.depth",
    "detection": "dfx.tasks.detection",
    "distillation": "dfx.tasks.distillation",
    "fusion": "dfx.tasks.fusion",
    "segmentation": "dfx.tasks.segmentation",
    "translation": "dfx.tasks.translation",
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
        "num_workers": Range(0, 256), "log_every": Range(1), "patience": Range(1, 100_000),
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
    ema: bool = False  # keep an exponential moving average of the weights: it is evaluated and saved as best
    ema_decay: float = 0.9998
    # early stopping: end the run once eval.metric has not improved for this many epochs (null: never)
    patience: Union[int, None] = None
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


RECIPE_SUFFIXES = (".yaml", ".yml")


def shipped_folder() -> Path:
    """The folder of the recipes that ship with dfx.

    Installed from a wheel they are package data, ``dfx/recipes/*.yaml``, read with
    ``importlib.resources``; in a source checkout (editable install, ``PYTHONPATH``) they are the
    repository's ``recipes/``, the one folder the wheel is built from (setup.py maps it).
    """
    packaged = importlib.resources.files("dfx").joinpath("recipes")
    if isinstance(packaged, Path) and packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[1] / "recipes"


def shipped_names() -> list[str]:
    """The shipped recipes' names (file stems), sorted."""
    return sorted(p.stem for p in shipped_folder().glob("*.y*ml") if p.suffix in RECIPE_SUFFIXES)


def _stem(name: str | Path) -> str:
    path = Path(name)
    return path.stem if path.suffix in RECIPE_SUFFIXES else path.name


def _close_shipped(name: str | Path) -> str:
    """`` (did you mean a, b or c?)``: the shipped names closest to ``name``, or nothing."""
    return _suggest(_stem(name), shipped_names(), n=3)


def find_shipped(name: str | Path) -> Path | None:
    """The shipped recipe that ``name`` names (``hdetr-shapes``, ``hdetr-shapes.yaml`` or
    ``recipes/hdetr-shapes.yaml``), or None. A path into any other folder names no shipped recipe."""
    if str(Path(name).parent) not in (".", "recipes"):
        return None
    for suffix in RECIPE_SUFFIXES:
        candidate = shipped_folder() / f"{_stem(name)}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def resolve_recipe(name: str | Path) -> Path:
    """The recipe file that ``name`` names: an existing path first, else a shipped recipe by name.

    Raises UsageError naming the argument and, for a bare name, the closest shipped names.
    """
    path = Path(name).expanduser()
    if path.is_file():
        return path
    shipped = find_shipped(path)
    if shipped is not None:
        return shipped
    if str(path.parent) in (".", "recipes"):
        raise UsageError(f"recipe file not found: {name}, and no shipped recipe is named {_stem(path)}"
                         f"{_close_shipped(path)}; `dfx recipes` lists them")
    raise UsageError(f"recipe file not found: {name}")


def shipped_display(path: str | Path) -> str:
    """How to name a recipe file in a command: a shipped recipe by its name (it resolves from any
    folder), any other file by its path."""
    path = Path(path)
    if path.is_file() and path.resolve().parent == shipped_folder().resolve():
        return path.stem
    return str(path)


def copy_recipe(name: str, folder: str | Path = ".", force: bool = False) -> dict:
    """Write shipped recipe ``name`` into ``folder`` (created if needed) as a starting point for
    one's own; ``{"copied": PATH, "recipe": NAME}``. An existing file is kept unless ``force``."""
    source = find_shipped(name)
    if source is None:
        raise UsageError(f"recipes --copy: no shipped recipe is named {_stem(name)}{_close_shipped(name)}; "
                         "`dfx recipes` lists them")
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"recipes --copy: {folder} is a file; pass the folder to write {source.name} into")
    target = folder / source.name
    if target.exists() and not force:
        raise UsageError(f"recipes --copy: {target} already exists; pass --force to overwrite it, or another folder")
    folder.mkdir(parents=True, exist_ok=True)
    target.write_bytes(source.read_bytes())
    return {"copied": str(target), "recipe": source.stem}


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
    """Read recipe ``path`` (a path or a shipped recipe's name) and its ``_base_`` parents into one
    merged mapping."""
    path = resolve_recipe(path).resolve()
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
        merged = deep_merge(merged, load_tree(_base_file(path, base), (*_seen, path)))
    return deep_merge(merged, data)


def _base_file(child: Path, base: str) -> Path:
    """A ``_base_`` entry of ``child``: the file beside it, else the shipped recipe of that name (a
    user's own recipe in any folder can build on ``_base_: hdetr.yaml``)."""
    beside = child.parent / Path(base).expanduser()
    if beside.is_file():
        return beside
    shipped = find_shipped(base)
    if shipped is not None:
        return shipped
    raise UsageError(f"{child}: _base_ {base}: no file {beside}, and no shipped recipe is named {_stem(base)}"
                     f"{_close_shipped(base)}")


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


def _suggest(name: str, candidates, n: int = 1) -> str:
    """`` (did you mean a?)``, or with ``n`` > 1 `` (did you mean a, b or c?)``; nothing if none is close."""
    match = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.6)
    if not match:
        return ""
    return f" (did you mean {match[0] if len(match) == 1 else ', '.join(match[:-1]) + ' or ' + match[-1]}?)"


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
    """Read a recipe file or shipped recipe (with ``_base_`` parents), apply overrides and validate it."""
    path = resolve_recipe(path)
    tree = apply_overrides(load_tree(path), list(overrides))
    return build_recipe(tree, name=path.stem, source=str(path))


def recipe_from_json(text: str, name: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Rebuild a recipe stored as JSON (e.g. in checkpoint metadata)."""
    return build_recipe(apply_overrides(json.loads(text), list(overrides)), name=name)


def list_recipes(folder: str | Path | None = None) -> list[dict]:
    """``[{"name", "path", "task", "summary"}]`` for every recipe in ``folder`` (default: the shipped
    recipes); summary: the first line of the file's header comment."""
    folder = shipped_folder() if folder is None else Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such folder of recipes; pass the folder that holds your .yaml recipes")
    found = []
    for path in sorted(p for p in folder.glob("*.y*ml") if p.suffix in RECIPE_SUFFIXES):
        lines = path.read_text().splitlines()
        comment = next((line.lstrip("# ").strip() for line in lines if line.startswith("#") and line.strip("# ")), "")
        task, error = None, None
        try:
            task = load_tree(path).get("task")  # through _base_ parents
        except UsageError as e:  # listed with the reason, not silently without a task
            error = str(e)
        found.append({"name": path.stem, "path": str(path), "task": task, "summary": comment,
                      **({"error": error} if error else {})})
    return found

"""Whole-model weights (``model.weights``): read a checkpoint safely, map it, load it strictly.

A weight spec is a dfx checkpoint (``.safetensors`` written by ``dfx train``), a dfx run
directory (its best checkpoint, else its last), an ``hf://org/repo/file`` reference, or a
released checkpoint of a method's reference code (a ``torch.save`` file). Torch files are read
with ``torch.load(weights_only=True)``; the few non-tensor types released files contain
(``argparse.Namespace``, numpy scalars) are allowed by name, nothing else is ever unpickled.

Each task says which released formats it understands with *converters*: functions that take a
:class:`Checkpoint` and return a state dict in dfx's layout, or ``None`` when the file is not
theirs. :func:`load_model_weights` tries them, then checks every key and shape before loading.
"""

from __future__ import annotations

import argparse
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from dfx import hub
from dfx.errors import RunError, UsageError

DFX_FORMAT = ("a dfx checkpoint (.safetensors written by dfx train) or run directory; a torch file of this "
              "model's own state dict")


@dataclass
class Checkpoint:
    """A weights file as read from disk.

    ``tensors``: the state dict of a dfx (safetensors) checkpoint, else ``None``; ``meta`` its
    metadata (recipe, classes, epoch); ``raw``: what ``torch.load`` returned for any other file.
    """

    file: Path
    tensors: dict[str, Tensor] | None = None
    meta: dict = field(default_factory=dict)
    raw: object = None

    @property
    def is_dfx(self) -> bool:
        return self.tensors is not None


def find_checkpoint(path: str | Path) -> Path:
    """A run directory's best checkpoint (else last), or the checkpoint file itself."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (path / "checkpoints" / name).is_file():
                return path / "checkpoints" / name
        raise UsageError(f"{path}: no checkpoints/best.safetensors or last.safetensors; is this a dfx run directory?")
    if path.is_file():
        return path
    raise UsageError(f"{path}: no such run directory or checkpoint file")


def _numpy_scalar_types() -> list:
    """The globals a numpy scalar pickles through, under numpy 1.x and 2.x module names.

    A file names the scalar constructor by the module of the numpy that wrote it
    (``numpy.core.multiarray.scalar`` under 1.x, ``numpy._core.multiarray.scalar`` under 2.x);
    torch matches allowed globals by name, so the installed numpy's function is allowed under both.
    """
    import numpy as np

    found = [np.dtype, *{type(np.dtype(t)) for t in "?bhilqBHILQefdgFDG"}]
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            scalar = getattr(__import__(module, fromlist=["scalar"]), "scalar")
        except (ImportError, AttributeError):
            continue
        found += [(scalar, f"{name}.scalar") for name in ("numpy.core.multiarray", "numpy._core.multiarray")]
        break
    return found


def safe_globals() -> list:
    """Everything :func:`read_torch_file` lets ``torch.load`` rebuild besides tensors and containers."""
    return [argparse.Namespace, *_numpy_scalar_types()]


def read_torch_file(file: Path) -> object:
    """``torch.load(weights_only=True)`` with the released files' extra types allowed.

    A file that needs any other type to unpickle is refused (exit 2); an unreadable one is a
    :class:`RunError` naming it (exit 1).
    """
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:
        name = hub.refused_global(e)
        if name is not None:
            raise UsageError(f"{file}: refused to unpickle {name or 'a Python object'}; dfx reads weights with "
                             "torch.load(weights_only=True) and allows only tensors, containers, "
                             "argparse.Namespace and numpy scalars") from None
        raise RunError(f"cannot read weights {file}: {_first_line(e)} (corrupt, truncated, or not a weights file)") from None


def read_checkpoint(spec: str | os.PathLike) -> Checkpoint:
    """Read a weight spec (file, run directory, ``hf://…``) without interpreting its layout."""
    from dfx.engine import checkpoint as ckpt

    text = str(spec)
    local = Path(text).expanduser()
    file = find_checkpoint(local) if local.is_dir() else hub.resolve(text)
    if file.suffix == ".safetensors":
        meta = ckpt.read_metadata(file)
        return Checkpoint(file, tensors=ckpt.load_weights(file), meta=meta)
    return Checkpoint(file, raw=read_torch_file(file))


def check_state_dict(model: nn.Module, state: Mapping[str, Tensor], source: str, *, strict: bool = True,
                     hint: Callable[[str], str | None] | None = None) -> list[str]:
    """Compare ``state`` with the model's keys and shapes; the problems, one line each.

    Strict: any problem raises :class:`UsageError` naming every key with both shapes (and, where
    ``hint(key)`` knows it, the recipe key that decides that shape). Not strict: a warning.
    """
    own = model.state_dict()
    problems = [f"missing {k} {tuple(v.shape)}" for k, v in own.items() if k not in state]
    problems += [f"unexpected {k} {tuple(v.shape)}" for k, v in state.items() if k not in own]
    for key, value in state.items():
        if key in own and tuple(value.shape) != tuple(own[key].shape):
            note = hint(key) if hint is not None else None
            problems.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
                            + (f" (set {note})" if note else ""))
    if problems:
        head = f"{source} does not fit the recipe's model ({len(problems)} problems): "
        shown = "; ".join(problems[:8]) + (f"; … {len(problems) - 8} more" if len(problems) > 8 else "")
        if strict:
            raise UsageError(head + shown + "; set model.weights_strict=false to load what fits")
        warnings.warn(head + shown, stacklevel=2)
    return problems


def load_model_weights(model: nn.Module, spec: str | os.PathLike, *,
                       converters: Sequence[Callable[[Checkpoint], dict | None]] = (),
                       formats: Iterable[str] = (), strict: bool = True,
                       hint: Callable[[str], str | None] | None = None) -> dict:
    """Load ``spec`` into ``model`` in place; returns ``{"file", "format", "problems"}``.

    A dfx checkpoint loads as it is; any other file is handed to each converter in turn (the
    task's released formats). A file no converter recognises is a :class:`UsageError` naming the
    file and ``formats``, the formats the task understands.
    """
    checkpoint = read_checkpoint(spec)
    state, kind = None, "dfx"
    if checkpoint.is_dfx:
        state = checkpoint.tensors
    else:
        for convert in (*converters, _plain_state_dict(model)):
            state = convert(checkpoint)
            if state is not None:
                kind = getattr(convert, "format_name", convert.__name__)
                break
    if state is None:
        understood = "; ".join([DFX_FORMAT, *formats])
        raise UsageError(f"{checkpoint.file}: not a checkpoint format dfx understands for this model; "
                         f"understood: {understood}")
    problems = check_state_dict(model, state, str(checkpoint.file), strict=strict, hint=hint)
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    model.load_state_dict(fitting, strict=False)
    return {"file": str(checkpoint.file), "format": kind, "problems": problems}


def _plain_state_dict(model: nn.Module) -> Callable[[Checkpoint], dict | None]:
    """The last converter: a torch file holding this model's own state dict (bare, or under
    ``state_dict`` / ``model``), recognised when most of its keys are the model's."""
    own = set(model.state_dict())

    def plain_state_dict(checkpoint: Checkpoint) -> dict | None:
        state = checkpoint.raw
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
            return None
        return dict(state) if len(own.intersection(state)) * 2 >= len(state) else None

    plain_state_dict.format_name = "state dict"
    return plain_state_dict


def load_recipe_weights(model: nn.Module, config, **kwargs) -> dict | None:
    """Load a recipe ``model`` section's ``weights`` (if set) with its ``weights_strict``; see
    :func:`load_model_weights` for ``kwargs`` (the task's converters, formats and hint)."""
    if not config.weights:
        return None
    return load_model_weights(model, config.weights, strict=config.weights_strict, **kwargs)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

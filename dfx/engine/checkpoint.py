"""Checkpoints: weights as safetensors, training state as a ``weights_only`` torch file.

``<name>.safetensors`` holds the model weights plus metadata (task, recipe as JSON, epoch,
metrics), so a weights file alone is enough to evaluate or fine-tune. ``<name>.state.pt`` holds
what resuming needs: optimizer, scheduler, scaler, EMA weights, RNG states, epoch and best
metric. Both are written to a temporary file in the same folder and renamed into place, so an
interrupted write never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from dfx.errors import RunError
from dfx.files import atomic_write


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write weights (tensors made contiguous and unshared) with JSON-encoded metadata."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_metadata(path: Path) -> dict:
    """The metadata of a dfx safetensors file, JSON values decoded."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise RunError(f"cannot read checkpoint {path}: {e} (corrupt or not a safetensors file)") from None
    out = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise RunError(f"cannot read checkpoint {path}: {e} (corrupt or truncated file)") from None


def rng_state() -> dict:
    """Global RNG states (torch CPU/CUDA, python, numpy) in weights_only-loadable types."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, str(tmp)))


def load_state(path: Path) -> dict:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"cannot read training state {path}: {reason} (corrupt or truncated file)") from None

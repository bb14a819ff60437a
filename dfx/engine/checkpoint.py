"""Checkpoints: weights as safetensors, training state as a ``weights_only`` torch file.

``<name>.safetensors`` holds the model weights plus metadata (task, recipe as JSON, epoch,
metrics, and ``sha256``, a digest of the tensor data), so a weights file alone is enough to
evaluate or fine-tune. ``<name>.state.pt`` holds what resuming needs: optimizer, scheduler,
scaler, EMA weights, RNG states, epoch, best metric, the records of every epoch and the digests
of the weights files it belongs with; it is stored with a digest of its own bytes. A bit flip
in either file is an error naming the file.

An epoch end is one transaction (:func:`commit_epoch`): the new weights are written beside the
old ones as ``<name>.next.safetensors``, then the training state is renamed into place (the
commit point), then the weights are renamed over the old ones. :func:`recover` finishes or
discards an interrupted commit, so ``last``, ``best`` and the state always describe one epoch.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from dfx.errors import RunError
from dfx.files import atomic_write
from dfx.hub import refusal_reason

WEIGHTS = ("last", "best")


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (in name order)."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        value = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], metadata: dict) -> str:
    """Write weights (tensors made contiguous and unshared) with JSON-encoded metadata and the
    digest of the tensors (``sha256``); returns that digest."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    digest = tensor_digest(tensors)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in {**metadata, "sha256": digest}.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return digest


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
    """The tensors of a safetensors file; a dfx checkpoint's digest is checked."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise RunError(f"cannot read checkpoint {path}: {e} (corrupt or truncated file)") from None
    expected = read_metadata(path).get("sha256")
    if expected is not None and tensor_digest(tensors) != expected:
        raise RunError(f"checkpoint {path} is corrupt: its tensor data does not match the digest written with it "
                       "(a damaged disk or copy); restore the file or train again")
    return tensors


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
    """Write the training state wrapped with the sha256 of its serialised bytes."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    wrapped = {"format": "dfx-state", "sha256": hashlib.sha256(payload).hexdigest(),
               "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}
    atomic_write(path, lambda tmp: torch.save(wrapped, str(tmp)))


def load_state(path: Path) -> dict:
    def fail(reason: str) -> RunError:
        return RunError(f"cannot read training state {path}: {reason}")

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and state.get("format") == "dfx-state":
            payload = state["payload"].numpy().tobytes()
            if hashlib.sha256(payload).hexdigest() != state["sha256"]:
                raise fail("its bytes do not match the digest written with it (a damaged disk or copy)")
            state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except RunError:
        raise
    except Exception as e:
        raise fail(refusal_reason(e) or f"{_first_line(e)} (corrupt or truncated file)") from None
    return state


def next_path(folder: Path, name: str) -> Path:
    return Path(folder) / f"{name}.next.safetensors"


def commit_epoch(folder: Path, weights: dict[str, tuple[dict, dict]], state: dict) -> dict[str, str]:
    """Write one epoch's checkpoint as a unit.

    ``weights`` maps ``last`` (and ``best`` when it changed) to ``(state_dict, metadata)``;
    ``state`` is the training state (epoch, optimizer, ..., ``rows``). The state records the
    digest of every weights file it belongs with; its rename is the commit point. Returns
    those digests (pass them as ``state["files"]`` next epoch).
    """
    folder = Path(folder)
    files = dict(state.get("files") or {})
    for name, (state_dict, meta) in weights.items():
        files[name] = save_weights(next_path(folder, name), state_dict, meta)
    save_state(folder / "last.state.pt", {**state, "files": files})
    for name in weights:
        os.replace(next_path(folder, name), folder / f"{name}.safetensors")
    return files


def _digest_of(path: Path) -> str | None:
    return read_metadata(path).get("sha256") if path.is_file() else None


def recover(folder: Path) -> dict | None:
    """Bring ``checkpoints/`` to its last committed epoch and return that training state.

    Weights written for an epoch whose state was committed are moved into place; weights of an
    uncommitted epoch are deleted. Returns None when no epoch was ever committed. Raises
    RunError when the files left do not belong together (never resumes from a mix).
    """
    folder = Path(folder)
    state_path = folder / "last.state.pt"
    state = load_state(state_path) if state_path.is_file() else None
    files = (state or {}).get("files", {})
    for name in WEIGHTS:
        pending = next_path(folder, name)
        if not pending.is_file():
            continue
        if files.get(name) is not None and _digest_of(pending) == files[name]:
            os.replace(pending, folder / f"{name}.safetensors")  # committed: finish the install
        else:
            pending.unlink()  # written for an epoch that never committed
    if state is None:
        return None
    if not files and (folder / "last.safetensors").is_file():  # written before states recorded digests
        epoch = read_metadata(folder / "last.safetensors").get("epoch")
        if epoch != state["epoch"]:
            raise RunError(f"{folder / 'last.safetensors'} holds epoch {epoch} but {state_path} epoch "
                           f"{state['epoch']}: an interrupted checkpoint write mixed two epochs; start a new run")
    for name, digest in files.items():
        path = folder / f"{name}.safetensors"
        if _digest_of(path) != digest:
            raise RunError(f"{path} does not belong with {state_path} (epoch {state['epoch']}): the run directory was "
                           "changed by hand or by another program; restore the checkpoints or start a new run")
    return state

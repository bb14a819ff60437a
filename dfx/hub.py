"""Weights: resolve a weight spec to a local file, and load it safely.

A spec is one of

- a local file: ``weights/model.safetensors``, ``mit_b0.pth``;
- ``hf://org/repo`` (file ``model.safetensors``) or ``hf://org/repo/path/in/repo.safetensors``;
- a timm pretrained name: ``deit_base_patch16_224.fb_in1k`` (the Hub repo timm itself uses);
- a short alias: ``deit-ti``, ``deit-s``, ``deit-b``, ``vit-l``, ``r50``, ``cait-s24``.

Downloads go through ``huggingface_hub`` into the standard cache (``HF_HOME`` / ``HF_HUB_CACHE``),
and ``HF_HUB_OFFLINE=1`` is honoured. A file already in the cache is used without touching the
network. When the Hub cannot be reached and the file is not cached, resolution fails within
seconds with a message naming the repo and the ways out. Nothing is ever loaded with full pickle.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from dfx.errors import RunError, UsageError

ALIASES = {
    "deit-ti": "deit_tiny_patch16_224.fb_in1k",
    "deit-s": "deit_small_patch16_224.fb_in1k",
    "deit-b": "deit_base_patch16_224.fb_in1k",
    "vit-b": "vit_base_patch16_224.augreg2_in21k_ft_in1k",
    "vit-l": "vit_large_patch16_384.augreg_in21k_ft_in1k",
    "r50": "resnet50.a1_in1k",
    "cait-s24": "cait_s24_224.fb_dist_in1k",
}

DEFAULT_FILENAME = "model.safetensors"
# How long one request to the Hub may wait; an unreachable Hub must fail fast, not hang.
HUB_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class HubFile:
    """A file in a Hub repository."""

    repo_id: str
    filename: str = DEFAULT_FILENAME
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.repo_id}/{self.filename}"


def timm_name(spec: str) -> str | None:
    """The timm model name a spec stands for (alias or timm pretrained name), else None."""
    name = ALIASES.get(spec, spec)
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    except Exception:
        cfg = None
    return name if cfg is not None else None


def hub_file(spec: str) -> HubFile | None:
    """The Hub file a spec points to, or None when the spec is not a Hub reference."""
    if spec.startswith("hf://"):
        parts = spec[len("hf://") :].strip("/").split("/")
        if len(parts) < 2 or not all(parts[:2]):
            raise UsageError(f"weights {spec!r}: expected hf://org/repo or hf://org/repo/file")
        revision = None
        repo = parts[1]
        if "@" in repo:
            repo, revision = repo.split("@", 1)
        filename = "/".join(parts[2:]) or DEFAULT_FILENAME
        ref = HubFile(f"{parts[0]}/{repo}", filename, revision)
        _check_hub_spec(spec, ref)
        return ref
    if spec in ALIASES:  # every alias is a timm model whose weights live at timm/<name>
        return HubFile(f"timm/{ALIASES[spec]}")
    name = timm_name(spec)
    if name is None:
        return None
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if not cfg.hf_hub_id:
        raise UsageError(f"weights {spec!r}: timm has no Hugging Face Hub weights for {name}; pass a local file")
    return HubFile(cfg.hf_hub_id, cfg.hf_hub_filename or DEFAULT_FILENAME)


def _check_hub_spec(spec: str, ref: HubFile) -> None:
    """A malformed ``hf://`` spec is bad usage (exit 2), found before any cache or network access."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(ref.repo_id)
    except HFValidationError as e:
        reason = str(e).strip().splitlines()[0]
        raise UsageError(f"weights {spec!r}: {ref.repo_id!r} is not a valid Hub repo id ({reason}); "
                         "expected hf://org/repo[@revision][/file]") from None
    if ref.revision == "" or any(not part for part in ref.filename.split("/")):
        raise UsageError(f"weights {spec!r}: empty revision or file name; expected hf://org/repo[@revision][/file]")


def refused_global(error: BaseException) -> str | None:
    """The Python object a ``weights_only`` load refused to rebuild (``""`` when torch names none);
    None when ``error`` is no such refusal."""
    text = str(error)
    if "Weights only load failed" not in text and "Unsupported global" not in text:
        return None
    return next((line.split("GLOBAL", 1)[1].split()[0] for line in text.splitlines() if "GLOBAL" in line), "")


def refusal_reason(error: BaseException) -> str | None:
    """Why a ``weights_only`` load refused a file, in dfx's words (None: not a refusal).

    torch's own text suggests ``weights_only=False``, which dfx never uses: a file that needs
    full pickle can run arbitrary code when loaded.
    """
    name = refused_global(error)
    if name is None:
        return None
    what = f" ({name})" if name else ""
    return (f"it holds Python objects{what} that dfx refuses to unpickle (only tensors and plain values are "
            "loaded); save the weights as safetensors or a plain state dict")


def cache_dir() -> Path:
    """The Hugging Face Hub cache, read from the environment on every call (``HF_HUB_CACHE``,
    else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``), so it can change within a process."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _fixes(ref: HubFile) -> str:
    return (
        f"fixes: download it on a machine with network access "
        f"(`hf download {ref.repo_id} {ref.filename}`) and copy the Hugging Face cache here "
        f"(point HF_HOME or HF_HUB_CACHE at it), or pass a local file path instead of {ref.repo_id!r}"
    )


def _unreachable() -> str | None:
    """Why the Hub endpoint cannot be reached, or None when a TCP connection opens.

    huggingface_hub retries failed requests with back-off for tens of seconds; one quick
    connection attempt first lets an offline machine fail in seconds instead.
    """
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=HUB_TIMEOUT_S).close()
    except OSError as e:
        return f"{url.hostname}:{port}: {e.strerror or e}"
    return None


def download(ref: HubFile) -> Path:
    """Local path of a Hub file: the cache first, then the network (unless offline)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(ref.repo_id, ref.filename, cache_dir=cache_dir(), revision=ref.revision)
    if isinstance(cached, str) and Path(cached).is_file():
        return Path(cached)
    if _offline():
        raise RunError(f"weights {ref} are not in the Hugging Face cache and HF_HUB_OFFLINE is set; {_fixes(ref)}")
    reason = _unreachable()
    if reason:
        raise RunError(f"weights {ref} are not in the Hugging Face cache and the Hub is unreachable ({reason}); {_fixes(ref)}")
    try:
        path = hf_hub_download(ref.repo_id, ref.filename, revision=ref.revision, cache_dir=cache_dir(),
                               etag_timeout=HUB_TIMEOUT_S)
    except Exception as e:  # connection errors, 404, auth: all end the same way for the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"could not download weights {ref} from the Hugging Face Hub ({reason}); {_fixes(ref)}") from None
    return Path(path)


def resolve(spec: str | os.PathLike) -> Path:
    """Resolve a weight spec to a local file path (downloading it if needed)."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    ref = hub_file(text)
    if ref is not None:
        return download(ref)
    if path.suffix in {".safetensors", ".pth", ".pt", ".bin"} or os.sep in text:
        raise UsageError(f"weights file not found: {text}")
    aliases = ", ".join(ALIASES)
    raise UsageError(
        f"weights {text!r}: not a file, an hf://org/repo reference, a timm pretrained name or an alias ({aliases})"
    )


def load_state_dict(path: str | os.PathLike) -> dict:
    """Read a state dict from safetensors, or from a torch file with ``weights_only=True``.

    Torch files that wrap the weights (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped.
    """
    import torch  # imported here: resolving a spec (and failing fast offline) needs no torch

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        reason = refusal_reason(e)
        if reason is None:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            reason = f"{first} (corrupt, truncated, or not a weights file)"
        raise RunError(f"cannot read weights {path}: {reason}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise RunError(f"cannot read weights {path}: expected a mapping of tensors, got {type(state).__name__}")
    return state


def create_timm_model(name: str, pretrained: str | None = None, **kwargs):
    """``timm.create_model`` with weights resolved through :func:`resolve`.

    ``pretrained`` is any weight spec; ``"timm"`` (or ``True``) means the weights timm names for
    ``name``. timm's own checkpoint filters (position-embedding resizing, head removal when
    ``num_classes`` differs) still apply because the file is handed to timm's loader.
    """
    import timm

    name = ALIASES.get(name, name)
    if pretrained in (None, False, "", "none"):
        try:
            return timm.create_model(name, pretrained=False, **kwargs)
        except RuntimeError as e:
            raise UsageError(f"model.name: {e}") from None
    spec = name if pretrained in (True, "timm") else str(pretrained)
    path = resolve(spec)
    overlay = {"file": str(path), "custom_load": False}
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except Exception as e:  # timm's text for a refused pickle says "retry with weights_only=False"
        reason = refusal_reason(e)
        if reason is None:
            raise
        raise RunError(f"cannot read weights {path}: {reason}") from None

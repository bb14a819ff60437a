"""Weights through dfx.hub, offline: a Hugging Face cache written in the standard layout."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dfx import hub
from dfx.errors import RunError, UsageError

REVISION = "0123456789abcdef0123456789abcdef01234567"


def write_cache(cache: Path, repo_id: str, files: dict[str, dict[str, torch.Tensor]]) -> Path:
    """models--org--name/refs/main (40-hex revision, no newline) + snapshots/<rev>/<file>."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    snapshot = repo / "snapshots" / REVISION
    for name, tensors in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(snapshot / name))
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "hf-cache"
    folder.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    return folder


def test_hf_reference_resolves_from_the_cache_offline(cache):
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    snapshot = write_cache(cache, "dfx-test/tiny", {"model.safetensors": tensors, "sub/other.safetensors": tensors})
    assert hub.resolve("hf://dfx-test/tiny") == snapshot / "model.safetensors"
    assert hub.resolve("hf://dfx-test/tiny/sub/other.safetensors") == snapshot / "sub" / "other.safetensors"
    assert torch.equal(hub.load_state_dict(hub.resolve("hf://dfx-test/tiny"))["w"], tensors["w"])


def test_alias_and_timm_name_load_cached_weights_into_timm(cache):
    import timm

    reference = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    write_cache(cache, "timm/deit_tiny_patch16_224.fb_in1k",
                {"model.safetensors": {k: v.contiguous() for k, v in reference.state_dict().items()}})
    for spec in ("deit-ti", "deit_tiny_patch16_224.fb_in1k"):
        model = hub.create_timm_model("deit_tiny_patch16_224", pretrained=spec)
        for key, value in reference.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key
    # timm's own filters still apply: a different head size drops the classifier
    model = hub.create_timm_model("deit-ti", pretrained="timm", num_classes=7)
    assert model.head.weight.shape == (7, 192)
    assert torch.equal(model.blocks[0].attn.qkv.weight, reference.blocks[0].attn.qkv.weight)


def test_missing_weights_offline_fail_fast_naming_repo_and_fixes(cache):
    t0 = time.perf_counter()
    with pytest.raises(RunError) as info:
        hub.resolve("deit-b")
    assert time.perf_counter() - t0 < 10
    message = str(info.value)
    assert "timm/deit_base_patch16_224.fb_in1k" in message
    assert "HF_HUB_OFFLINE" in message and "HF_HOME" in message and "local file" in message


def test_unreachable_hub_fails_within_seconds(cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    t0 = time.perf_counter()
    with pytest.raises(RunError, match=r"dfx-test/absent.*unreachable"):
        hub.resolve("hf://dfx-test/absent")
    assert time.perf_counter() - t0 < 10


def test_local_files_and_safe_loading(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"state_dict": {"a": torch.ones(2)}}, path)
    assert hub.resolve(str(path)) == path
    assert torch.equal(hub.load_state_dict(path)["a"], torch.ones(2))  # wrapped dicts are unwrapped

    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    evil = tmp_path / "evil.pth"
    torch.save({"x": Payload()}, evil)
    with pytest.raises(RunError, match=r"cannot read weights .*evil\.pth: it holds Python objects \((builtins\.)?print\) "
                                        r"that dfx refuses to unpickle") as refused:
        hub.load_state_dict(evil)  # weights_only refuses arbitrary objects
    assert "weights_only=False" not in str(refused.value) and "corrupt" not in str(refused.value)
    with pytest.raises(RunError, match=r"training state .*evil\.pth: it holds Python objects"):
        from dfx.engine.checkpoint import load_state

        load_state(evil)


def test_bad_specs_are_usage_errors():
    with pytest.raises(UsageError, match="weights file not found"):
        hub.resolve("missing/model.safetensors")
    with pytest.raises(UsageError, match="not a file, an hf://org/repo reference"):
        hub.resolve("no-such-model-name")
    with pytest.raises(UsageError, match="hf://org/repo"):
        hub.resolve("hf://onlyorg")
    for spec, message in [("hf://a b/c", "'a b/c' is not a valid Hub repo id"),
                          ("hf://org/re..po", "'org/re..po' is not a valid Hub repo id"),
                          ("hf://org/repo@/model.safetensors", "empty revision or file name"),
                          ("hf://org/repo//model.safetensors", "empty revision or file name")]:
        with pytest.raises(UsageError, match=f"weights {re.escape(repr(spec))}: {re.escape(message)}"):
            hub.resolve(spec)

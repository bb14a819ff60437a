"""GeminiFusion's released checkpoints: both file layouts, the real B3 / B2 key sets, logits equal to the
reference computation (tests/gemini_reference.py), round trip, and the errors that name recipe keys."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import dfx
from conftest import run_dfx
from dfx.engine.checkpoint import save_weights
from dfx.errors import UsageError
from dfx.fusion.released import convert_deliver, convert_nyudv2
from dfx.models import build
from dfx.recipe import load_recipe
from dfx.weights import Checkpoint, check_state_dict
from gemini_reference import (MIT_SIZES, DeliverSegmenter, NyuSegmenter, deliver_release, nyudv2_release,
                              seed_values)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
NYU = RECIPES / "gemini-nyudv2-mitb3.yaml"
DELIVER = RECIPES / "gemini-deliver-mitb2.yaml"
TINY_DIMS, TINY_DEPTHS = [16, 32, 40, 64], [1, 2, 2, 1]
TINY = ["model.pretrained=null", f"model.embed_dims={TINY_DIMS}", f"model.depths={TINY_DEPTHS}"]


def tiny_nyu(seed=0) -> NyuSegmenter:
    torch.manual_seed(seed)
    return seed_values(NyuSegmenter(TINY_DIMS, TINY_DEPTHS, classes=40), seed).eval()


def tiny_deliver(seed=0, modalities=4) -> DeliverSegmenter:
    torch.manual_seed(seed)
    return seed_values(DeliverSegmenter(TINY_DIMS, TINY_DEPTHS, classes=25, modalities=modalities), seed).eval()


def inputs(count: int, size=(64, 96), seed=1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, *size, generator=generator) for _ in range(count)]


def assert_relative_close(actual: torch.Tensor, expected: torch.Tensor, rel=1e-4):
    scale = expected.abs().max()
    assert scale > 1e-3  # not a trivially zero output
    assert (actual - expected).abs().max() <= rel * scale, float((actual - expected).abs().max() / scale)


# ------------------------------------------------------------------------- the real models' key sets


@pytest.mark.slow
@pytest.mark.parametrize("recipe, reference, release, convert, size", [
    (NYU, lambda: NyuSegmenter(*MIT_SIZES["b3"], classes=40), nyudv2_release, convert_nyudv2, "b3"),
    (DELIVER, lambda: DeliverSegmenter(*MIT_SIZES["b2"], classes=25, modalities=4), deliver_release,
     convert_deliver, "b2"),
])
def test_the_paper_recipes_hold_every_tensor_of_the_released_models(recipe, reference, release, convert, size):
    """The full NYUDv2 MiT-B3 and DeLiVER MiT-B2 (4 modalities): same keys and shapes after conversion."""
    with torch.device("meta"):
        official = reference()
    converted = convert(Checkpoint(Path("release.pth"), raw=release(official)))
    _, _, model, _ = build(recipe, ["model.pretrained=null"])
    assert model.backbone.variant == size
    own = model.state_dict()
    assert sorted(converted) == sorted(own)
    assert all(tuple(converted[k].shape) == tuple(own[k].shape) for k in own)
    assert check_state_dict(model, converted, "release", strict=True) == []
    # the reference's unused last score net of each stage is dropped, the used ones are kept
    if size == "b2":
        assert "backbone.extra_score_predictor.0.score_nets.3.0.weight" in release(official)
        assert "backbone.merge1.score_nets.2.1.weight" in converted
        assert not any(".score_nets.3." in k for k in converted)


def test_paper_recipes_describe_the_reference_models():
    nyu, deliver = load_recipe(NYU, ["model.pretrained=null"]), load_recipe(DELIVER, ["model.pretrained=null"])
    assert (nyu.model.decoder_dim, deliver.model.decoder_dim) == (256, 512)
    assert nyu.model.ensemble_detach and deliver.model.ensemble_detach
    assert nyu.data.normalize == deliver.data.normalize == "first"
    assert nyu.data.mean == [0.485, 0.456, 0.406] and nyu.data.std == [0.229, 0.224, 0.225]
    assert len(nyu.data.classes) == 40 and len(deliver.data.classes) == 25
    sun = load_recipe(RECIPES / "gemini-sunrgbd-mitb3.yaml", ["model.pretrained=null"])
    assert (sun.model.decoder_dim, sun.model.variant, len(sun.data.classes)) == (256, "b3", 37)
    assert sun.data.classes == nyu.data.classes[:37]  # SUN RGB-D's 37 are NYUDv2's 40 without the "other" three


def test_building_a_recipe_that_lists_its_classes_never_reads_the_data(tmp_path):
    model = dfx.create_model(NYU, [*TINY, f"data.root={tmp_path / 'absent'}"])
    assert model.decode_head.linear_pred.out_channels == 40


# ---------------------------------------------------------------- logits equal the reference computation


def test_nyudv2_release_gives_the_reference_logits(tmp_path):
    official = tiny_nyu()
    file = tmp_path / "model-best.pth.tar"
    torch.save(nyudv2_release(official), file)
    model = dfx.create_model(NYU, TINY, weights=file)
    rgb, depth = inputs(2)
    with torch.no_grad():
        expected = [F.interpolate(x, size=rgb.shape[2:], mode="bilinear", align_corners=False)
                    for x in official([rgb, depth])]  # the reference stops at stride 4
        out = model([rgb, depth])
    assert len(out["streams"]) == 2 and out["ensemble"].shape == (2, 40, 64, 96)
    for actual, reference in zip([*out["streams"], out["ensemble"]], expected):
        assert_relative_close(actual, reference)


def test_deliver_release_with_four_modalities_gives_the_reference_logits(tmp_path):
    official = tiny_deliver()
    file = tmp_path / "geminifusion_b2_deliver_rgbdel.pth"
    torch.save(deliver_release(official), file)
    model = dfx.create_model(DELIVER, TINY, weights=file)
    images = inputs(4)
    with torch.no_grad():
        expected = official(images)
        out = model(images)
    for actual, reference in zip([*out["streams"], out["ensemble"]], expected):
        assert_relative_close(actual, reference)
    # the merge matters: another LiDAR image changes stream 1 (and, through the fusion, stream 0)
    with torch.no_grad():
        changed = model([*images[:3], torch.randn_like(images[3])])
    assert (changed["streams"][1] - out["streams"][1]).abs().max() > 1e-3


def test_deliver_rgbd_release_has_no_merge(tmp_path):
    official = tiny_deliver(modalities=2)
    assert not any("extra_score_predictor" in k for k in official.state_dict())
    file = tmp_path / "rgbd.pth"
    torch.save(deliver_release(official), file)
    model = dfx.create_model(DELIVER, [*TINY, "data.modalities=[img,depth]"], weights=file)
    images = inputs(2)
    with torch.no_grad():
        for actual, reference in zip(model(images)["streams"], official(images)[:2]):
            assert_relative_close(actual, reference)


def test_loaded_release_round_trips_through_a_dfx_checkpoint(tmp_path):
    file = tmp_path / "model-best.pth.tar"
    torch.save(nyudv2_release(tiny_nyu()), file)
    recipe, _, model, _ = build(NYU, [*TINY, f"model.weights={file}"])
    saved = tmp_path / "best.safetensors"
    save_weights(saved, model.state_dict(), {"format": "dfx", "recipe": recipe.to_dict(), "name": "nyu",
                                             "info": {"classes": recipe.data.classes}})
    again = dfx.create_model(saved)
    images = inputs(2, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(again(images)["ensemble"], model(images)["ensemble"], rtol=0, atol=0)
    state = again.state_dict()
    assert torch.equal(state["ensemble_weights"], nyudv2_release(tiny_nyu())["segmenter"]["module.alpha"])


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.slow
def test_a_checkpoint_of_another_mit_size_names_the_recipe_key(tmp_path):
    with torch.device("meta"):
        b2 = NyuSegmenter(*MIT_SIZES["b2"], classes=40)
    state = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in b2.state_dict().items()}
    file = tmp_path / "b2.pth.tar"
    torch.save({"segmenter": {f"module.{k}": v for k, v in state.items()}, "epoch_start": 1,
                "best_val": np.float32(0.5)}, file)
    with pytest.raises(UsageError, match=r"b2\.pth\.tar does not fit .*change model\.variant=b2: the checkpoint's MiT "
                                         r"has depths \[3, 4, 6, 3\]"):
        dfx.create_model(NYU, ["model.pretrained=null"], weights=file)


def test_other_class_count_and_modalities_name_both_sides(tmp_path):
    file = tmp_path / "rgbdel.pth"
    torch.save(deliver_release(tiny_deliver()), file)
    with pytest.raises(UsageError, match=r"data\.modalities: the checkpoint takes 4 modalities .* the recipe lists 2: "
                                         r"\['img', 'depth'\]"):
        dfx.create_model(DELIVER, [*TINY, "data.modalities=[img,depth]"], weights=file)
    with pytest.raises(UsageError, match=r"data\.classes: the checkpoint predicts 25 classes, the recipe lists 3"):
        dfx.create_model(DELIVER, [*TINY, "data.classes=[a,b,c]"], weights=file)
    with pytest.raises(UsageError, match=r"model\.decoder_dim=512 \(the recipe says 256\)"):
        dfx.create_model(DELIVER, [*TINY, "model.decoder_dim=256"], weights=file)


def test_a_damaged_release_fails_key_by_key_unless_loading_is_not_strict(tmp_path):
    release = nyudv2_release(tiny_nyu())
    del release["segmenter"]["module.encoder.block2.1.attn.k_noise.weight"]
    file = tmp_path / "damaged.pth.tar"
    torch.save(release, file)
    with pytest.raises(UsageError, match=r"missing backbone\.block2\.1\.attn\.fusion\.k_noise\.weight \(2, 32\)"):
        dfx.create_model(NYU, TINY, weights=file)
    with pytest.warns(UserWarning, match="1 problems"):
        dfx.create_model(NYU, [*TINY, "model.weights_strict=false"], weights=file)


def test_an_unknown_torch_file_lists_the_formats_understood(tmp_path):
    file = tmp_path / "other.pth"
    torch.save({"state_dict": {"head.weight": torch.zeros(2)}}, file)
    with pytest.raises(UsageError, match=r"understood: .*GeminiFusion NYUDv2 / SUN RGB-D release: .*GeminiFusion "
                                         r"DeLiVER release"):
        dfx.create_model(NYU, TINY, weights=file)


# ------------------------------------------------------------------------------------------ dfx eval


def write_nyu_root(root: Path, count=2, size=(64, 96)) -> Path:
    rng = np.random.default_rng(0)
    for folder in ("rgb", "depth", "masks"):
        (root / folder).mkdir(parents=True)
    lines = []
    for i in range(count):
        name = f"{i:06d}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / "rgb" / name)
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(root / "depth" / name)
        Image.fromarray(rng.integers(0, 40, size, dtype=np.uint8)).save(root / "masks" / name)
        lines.append(f"rgb/{name}\tdepth/{name}\tmasks/{name}")
    (root / "val.txt").write_text("\n".join(lines) + "\n")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.slow
def test_dfx_eval_reports_each_stream_and_the_ensemble_of_a_release(tmp_path):
    official = tiny_nyu()
    file = tmp_path / "mit-b3.pth.tar"
    torch.save(nyudv2_release(official), file)
    root = write_nyu_root(tmp_path / "nyudv2")
    result = run_dfx("eval", NYU, f"model.weights={file}", f"data.root={root}", "data.image_size=[64,96]",
                     "train.num_workers=0", *TINY, "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)["metrics"]
    # the same numbers from the reference computation on the same inputs (RGB normalised, depth / 255)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    hits = np.zeros((3, 40, 40), dtype=np.int64)
    for i in range(2):
        rgb = torch.from_numpy(np.array(Image.open(root / "rgb" / f"{i:06d}.png"))).permute(2, 0, 1) / 255
        depth = torch.from_numpy(np.array(Image.open(root / "depth" / f"{i:06d}.png")))[None].repeat(3, 1, 1) / 255
        label = np.asarray(Image.open(root / "masks" / f"{i:06d}.png")).astype(np.int64)
        with torch.no_grad():
            outputs = official([((rgb - mean) / std)[None], depth[None]])
        for s, logits in enumerate(outputs):
            predicted = F.interpolate(logits, size=label.shape, mode="bilinear").argmax(1)[0].numpy()
            np.add.at(hits[s], (label, predicted), 1)
    inter = np.diagonal(hits, axis1=1, axis2=2)
    union = hits.sum(1) + hits.sum(2) - inter
    miou = [float((inter[s][union[s] > 0] / union[s][union[s] > 0]).mean()) for s in range(3)]
    assert metrics["mIoU/rgb"] == pytest.approx(miou[0], abs=2e-3)
    assert metrics["mIoU/depth"] == pytest.approx(miou[1], abs=2e-3)
    assert metrics["mIoU"] == pytest.approx(miou[2], abs=2e-3)


def test_dfx_eval_of_a_release_that_does_not_fit_exits_2_naming_the_keys(tmp_path):
    file = tmp_path / "rgbdel.pth"
    torch.save(deliver_release(tiny_deliver()), file)
    result = run_dfx("eval", DELIVER, f"model.weights={file}", "data.modalities=[img,depth]", *TINY, "--json")
    assert result.returncode == 2, result.stderr
    error = json.loads(result.stdout)["error"]
    assert "the checkpoint takes 4 modalities" in error and "['img', 'depth']" in error


def test_numpy_scalars_of_numpy_1_and_2_are_read_without_full_pickle(tmp_path):
    """Released files were written under numpy 1.x (numpy.core.multiarray.scalar) or 2.x (numpy._core...)."""
    import io
    import pathlib

    buffer = io.BytesIO()
    torch.save(nyudv2_release(tiny_nyu()), buffer, _use_new_zipfile_serialization=False)  # one plain pickle stream
    written = buffer.getvalue()
    numpy2, numpy1 = b"cnumpy._core.multiarray\nscalar\n", b"cnumpy.core.multiarray\nscalar\n"
    assert numpy2 in written or numpy1 in written  # best_val and best_epoch are numpy scalars
    for name, data in (("numpy1", written.replace(numpy2, numpy1)), ("numpy2", written.replace(numpy1, numpy2))):
        file = tmp_path / f"{name}.pth.tar"
        file.write_bytes(data)
        model = dfx.create_model(NYU, TINY, weights=file)
        assert torch.equal(model.ensemble_weights, tiny_nyu().alpha)
    hostile = nyudv2_release(tiny_nyu())
    hostile["args"] = pathlib.PurePosixPath("/tmp")  # any other Python object: refused, never unpickled
    torch.save(hostile, tmp_path / "hostile.pth.tar")
    with pytest.raises(UsageError, match=r"hostile\.pth\.tar: refused to unpickle .*weights_only=True"):
        dfx.create_model(NYU, TINY, weights=tmp_path / "hostile.pth.tar")

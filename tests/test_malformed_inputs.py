"""Every command fed a table of malformed inputs: each gives its exit code, exactly one JSON object
under --json ({"error", "exit_code"}), and a message that names the input at fault; never a Python
exception type, never a silent exit 0.

The rows run through the real entry point (conftest.run_dfx). Builders make the bad input in the
test's folder and return the command line; ``{tmp}`` stands for that folder.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import run_dfx
from PIL import Image

from dfx.engine.checkpoint import save_weights
from dfx.engine.trainer import checkpoint_metadata
from dfx.models import build

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "hdetr-shapes.yaml")
CLASSES = ["circle", "square"]


def coco_export(root: Path, edit=None) -> Path:
    """A Roboflow-style export: train/ and valid/ with three 50x40 images and one box each;
    ``edit(annotations dict)`` corrupts both splits' files."""
    for split in ("train", "valid"):
        folder = root / split
        folder.mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (50, 40), (60 * i, 90, 30)).save(folder / f"{i}.jpg")
        data = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 50, "height": 40} for i in range(3)],
                "annotations": [{"id": i + 1, "image_id": i, "category_id": 1 + i % 2, "bbox": [5, 5, 20, 15],
                                 "area": 300, "iscrowd": 0} for i in range(3)],
                "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]}
        if edit is not None:
            edit(data)
        (folder / "_annotations.coco.json").write_text(json.dumps(data))
    return root


def results_case(entries, strict: bool = False):
    """dfx eval --predictions of ``entries`` (a list, or raw text) against the export's valid split."""
    def make(tmp: Path) -> list[str]:
        root = coco_export(tmp / "data")
        (tmp / "r.json").write_text(entries if isinstance(entries, str) else json.dumps(entries))
        return ["eval", "--predictions", str(tmp / "r.json"), "--annotations",
                str(root / "valid" / "_annotations.coco.json"), *(["--strict"] if strict else [])]
    return make


def box(**change) -> dict:
    return {"image_id": 0, "category_id": 1, "bbox": [5, 5, 20, 15], "score": 0.9, **change}


def swapped(tmp: Path) -> list[str]:
    root = coco_export(tmp / "data")
    (tmp / "r.json").write_text(json.dumps([box()]))
    return ["eval", "--predictions", str(root / "valid" / "_annotations.coco.json"), "--annotations", str(tmp / "r.json")]


def annotations_as_results(tmp: Path) -> list[str]:
    ann = str(coco_export(tmp / "data") / "valid" / "_annotations.coco.json")
    return ["eval", "--predictions", ann, "--annotations", ann]


def repeated_ids_case(tmp: Path) -> list[str]:
    root = coco_export(tmp / "data", repeated_image_id)
    (tmp / "r.json").write_text(json.dumps([box()]))
    return ["eval", "--predictions", str(tmp / "r.json"), "--annotations", str(root / "valid" / "_annotations.coco.json")]


def data_case(edit, command: str = "check"):
    def make(tmp: Path) -> list[str]:
        root = coco_export(tmp / "data", edit)
        if command == "check":
            return ["data", "check", str(root)]
        return ["train", RECIPE, f"data.root={root}", "train.epochs=1", "--out", str(tmp / "run")]
    return make


def string_box(data):
    data["annotations"][1]["bbox"] = ["5", "5", "20", "15"]


def repeated_image_id(data):
    data["images"][2]["id"] = 1


def shared_name(data):
    data["categories"][1]["name"] = "circle"


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    recipe, task, model, _ = build(RECIPE, ["model.num_classes=2", "data.classes=[circle,square]",
                                            "model.one2one_queries=5", "model.one2many_queries=5",
                                            "model.encoder_layers=1", "model.decoder_layers=1", "data.scales=[64]",
                                            "data.max_size=96"])
    path = tmp_path_factory.mktemp("det") / "det.safetensors"
    save_weights(path, model.state_dict(), checkpoint_metadata(recipe, task, 0, {}))
    return path


def predict_case(setup):
    def make(tmp: Path, detector: Path) -> list[str]:
        return ["predict", str(detector), *setup(tmp)]
    make.needs_detector = True
    return make


def nothing_readable(tmp: Path) -> list[str]:
    (tmp / "in").mkdir()
    (tmp / "in" / "notes.txt").write_text("no pictures here")
    return [str(tmp / "in")]


def unlisted_image(tmp: Path) -> list[str]:
    root = coco_export(tmp / "data")
    Image.new("RGB", (20, 20)).save(root / "valid" / "stray.png")
    return [str(root / "valid"), "--annotations", str(root / "valid" / "_annotations.coco.json")]


def out_is_a_file(tmp: Path) -> list[str]:
    Image.new("RGB", (20, 20)).save(tmp / "a.png")
    (tmp / "taken").write_text("")
    return [str(tmp / "a.png"), "--out", str(tmp / "taken")]


def export_under_a_file(tmp: Path, detector: Path) -> list[str]:
    (tmp / "file.txt").write_text("")
    return ["export", str(detector), "--out", str(tmp / "file.txt" / "model.onnx")]


export_under_a_file.needs_detector = True

# (id, builder, exit code, words the message must hold); "{tmp}" in a word is the test's folder
CASES = [
    ("results-nan-score", results_case([box(), box(score=float("nan"))]), 2, ["1 of 2 entries", "[1] score is nan"]),
    ("results-inf-box", results_case([box(bbox=[5, 5, float("inf"), 15])]), 2, ["[0] bbox holds NaN or infinity"]),
    ("results-negative-size", results_case([box(), box(), box(bbox=[5, 5, -20, 15])]), 2,
     ["1 of 3 entries", "[2] bbox has a negative width or height"]),
    ("results-string-score", results_case([box(score="0.9")]), 2, ["score is not a number ('0.9')"]),
    ("results-string-id", results_case([box(image_id="0")]), 2, ["image_id is not an integer ('0')"]),
    ("results-bool-score", results_case([box(score=True)]), 2, ["score is not a number (True)"]),
    ("results-three-numbers", results_case([box(bbox=[1, 2, 3])]), 2, ["bbox has 3 numbers, not 4"]),
    ("results-no-score", results_case([{"image_id": 0, "category_id": 1, "bbox": [1, 2, 3, 4]}]), 2, ["[0] no score"]),
    ("results-not-objects", results_case([3, 4]), 2, ["2 of 2 entries", "[0] not a JSON object"]),
    ("results-unknown-image", results_case([box(), box(image_id=99)]), 2, ["1 of 2 entries", "image_ids", "99"]),
    ("results-unknown-category", results_case([box(category_id=7)]), 2, ["category_ids", "7", "--annotations"]),
    ("results-a-dict", results_case({"detections": []}), 2, ["must hold a JSON list"]),
    ("results-not-json", results_case("[{'image_id': 0}"), 2, ["r.json", "not valid JSON"]),
    ("results-empty-strict", results_case([], strict=True), 2, ["empty list", "--strict"]),
    ("swapped", swapped, 2, ["r.json: a JSON list (a results file?)", "did you swap --predictions and --annotations"]),
    ("results-is-annotations", annotations_as_results, 2, ["is a COCO annotation file, not a results list", "swap"]),
    ("annotations-repeated-image-id", repeated_ids_case, 2, ["1 image records repeat an image id (1)"]),
    ("data-check-string-box", data_case(string_box), 1, ["_annotations.coco.json", "bbox ['5', '5', '20', '15']"]),
    ("train-string-box", data_case(string_box, "train"), 2, ["_annotations.coco.json", "['5', '5', '20', '15']"]),
    ("train-shared-category-name", data_case(shared_name, "train"), 2, ["categories 1, 2 share the name 'circle'"]),
    ("train-repeated-image-id", data_case(repeated_image_id, "train"), 2, ["repeat an image id (1)"]),
    ("compare-seeds-backwards", lambda tmp: ["compare", RECIPE, "--seeds", "7-0"], 2,
     ["the range 7-0 is empty", "0-7"]),
    ("compare-seeds-huge", lambda tmp: ["compare", RECIPE, "--seeds", "0-100000000"], 2,
     ["100000001 seeds", "at most 10000"]),
    ("predict-nothing-readable", predict_case(nothing_readable), 2, ["none of the 1 files", "notes.txt"]),
    ("predict-unlisted-image", predict_case(unlisted_image), 2, ["1 of 4 images are not listed", "stray.png"]),
    ("predict-annotations-missing", predict_case(lambda tmp: [str(tmp), "--annotations", str(tmp / "no.json")]), 2,
     ["--annotations", "no.json", "no such file"]),
    ("predict-out-is-a-file", predict_case(out_is_a_file), 2, ["--out", "taken: is a file"]),
    ("export-out-under-a-file", export_under_a_file, 2, ["file.txt is a file, not a folder"]),
]


@pytest.mark.parametrize("make, code, words", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_malformed_input(make, code, words, tmp_path, request):
    args = make(tmp_path, request.getfixturevalue("detector")) if getattr(make, "needs_detector", False) else \
        make(tmp_path)
    result = run_dfx(*args, "--json")
    lines = result.stdout.strip().splitlines()
    assert result.returncode == code, result.stderr
    payload = json.loads(lines[-1])
    assert len([line for line in lines if line.startswith("{")]) == 1, result.stdout  # one JSON object
    assert payload["exit_code"] == code
    for word in words:
        assert word.replace("{tmp}", str(tmp_path)) in payload["error"], payload["error"]
    for leak in ("Traceback", "Error:", "Exception", "--debug"):
        assert leak not in payload["error"], payload["error"]


def test_a_symlink_loop_under_a_recursive_glob_reads_each_file_once(tmp_path):
    from dfx.predict import collect_files

    (tmp_path / "photos").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "a.png")
    os.symlink(tmp_path / "photos", tmp_path / "photos" / "loop")
    found = collect_files([str(tmp_path / "photos" / "**" / "*.png")])
    assert [p.name for p in found] == ["a.png"]


def test_a_strip_thinner_than_a_pixel_resizes_to_one_pixel():
    from dfx.data.det_transforms import resized_shape

    assert resized_shape(10, 4000, 64, 96) == (1, 96) and resized_shape(4000, 10, 64, 96) == (96, 1)
    assert resized_shape(1371, 2048, 64, 96) == (64, 95)  # ordinary images as DETR resizes them


def test_predict_on_a_4000x10_image(detector, tmp_path):
    Image.new("RGB", (4000, 10), (90, 30, 20)).save(tmp_path / "strip.png")
    result = run_dfx("predict", detector, tmp_path / "strip.png", "--conf", "0", "--json")
    assert result.returncode == 0, result.stdout
    summary = json.loads(result.stdout)
    line = json.loads(Path(summary["results"]).read_text())
    assert (line["width"], line["height"]) == (4000, 10) and len(line["detections"]) == 10  # 5 queries x 2
    assert all(0 <= d["box"][0] <= d["box"][2] <= 4000 for d in line["detections"])


def test_a_failing_data_check_json_says_error_and_exit_code(tmp_path):
    root = coco_export(tmp_path / "data", string_box)
    result = run_dfx("data", "check", root, "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 1 and report["ok"] is False and report["exit_code"] == 1
    assert "train: 1 annotations" in report["error"] and "['5', '5', '20', '15']" in report["error"]


def test_recipes_names_a_broken_yaml(tmp_path):
    (tmp_path / "good.yaml").write_text("# a recipe\ntask: classification\n")
    (tmp_path / "broken.yaml").write_text("task: [unclosed\n")
    result = run_dfx("recipes", tmp_path, "--json")
    listed = {Path(r["path"]).name: r for r in json.loads(result.stdout)["recipes"]}
    assert result.returncode == 0 and "error" not in listed["good.yaml"]
    assert "broken.yaml" in listed["broken.yaml"]["error"] and "YAML" in listed["broken.yaml"]["error"]


def test_compare_exits_1_when_every_run_of_a_variant_failed(tmp_path, monkeypatch):
    from dfx import compare as compare_module
    from dfx.errors import RunError

    def run_one(variant, seed, overrides, run_dir, threads, device):
        status = {"status": "failed", "reason": "out of memory"} if "one2many_k" in variant.name else \
            {"status": "done", "metrics": {"AP": 0.1}}
        return {"variant": variant.name, "seed": seed, "wall_s": 1.0, "run_dir": str(run_dir), **status}

    monkeypatch.setattr(compare_module, "run_one", run_one)
    with pytest.raises(RunError, match=r"every run of .*one2many_k=3 failed \(seed 0: out of memory\)"):
        compare_module.compare([RECIPE, f"{RECIPE}:model.one2many_k=3"], seeds=[0, 1], out=tmp_path / "c",
                               measure_cost=False)
    assert (tmp_path / "c" / "compare.json").is_file()  # the report is written before the error


def test_an_interrupted_compare_says_to_repeat_the_compare(monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("dfx.compare.compare", interrupted)
    result = run_dfx("compare", RECIPE, "--json")
    assert result.returncode == 130
    error = json.loads(result.stdout)["error"]
    assert "repeat the same dfx compare command" in error and "dfx train" not in error


def test_data_loader_workers_leave_sigterm_to_the_main_process():
    from dfx.engine import distributed as D
    from dfx.engine.trainer import make_loader

    class Dispositions(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            return int(signal.getsignal(signal.SIGTERM) == signal.SIG_IGN)

    loader = make_loader(Dispositions(), 1, D.Context(device=torch.device("cpu")), shuffle=False, seed=0,
                         num_workers=1)
    assert [int(b) for b in loader] == [1, 1]
    assert signal.getsignal(signal.SIGTERM) != signal.SIG_IGN  # the main process still handles it

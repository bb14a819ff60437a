"""Detection data in the formats people export: the real chess export (Roboflow COCO) read in place,
and the same data converted to YOLO and Pascal VOC. Whatever the format, the ground truth
evaluated as predictions scores AP 1.0 on every split."""

from __future__ import annotations

import json
import os
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
import pytest
import yaml
from shared_data import DATA, needs

from dfx.data.coco import CocoDetection, quiet_coco
from dfx.data.formats import find_detection_data, label_file
from dfx.data.coco_eval import evaluate_coco, to_coco_results
from dfx.errors import UsageError
from dfx.recipe import load_recipe
from dfx.tasks.detection import Task

CHESS = DATA / "chess-pieces-coco"
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SPLIT_DIRS = {"train": "train", "val": "valid", "test": "test"}

needs_chess = needs("chess-pieces-coco")


def chess_file(split: str) -> dict:
    return json.loads((CHESS / SPLIT_DIRS[split] / "_annotations.coco.json").read_text())


def dataset_of(source, **kwargs) -> CocoDetection:
    return CocoDetection(source.images, source.ann_file, annotations=source.annotations, **kwargs)


def ground_truth_as_predictions(dataset: CocoDetection, with_ignored: bool = False) -> list[dict]:
    """Every target box as a detection of score 1, through the label -> category mapping the model uses
    (``with_ignored``: the crowd / difficult boxes too)."""
    ids = dataset.ids
    boxes = [dataset.targets[i][0] for i in ids]
    labels = [dataset.targets[i][1] for i in ids]
    results = to_coco_results(ids, boxes, [np.ones(len(b)) for b in boxes], labels, dataset.category_ids)
    if with_ignored:
        results += [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
                    for a in dataset.coco.dataset["annotations"] if a.get("iscrowd")]
    return results


def link_images(names, source: Path, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        os.symlink(source / name, folder / name)


def write_yolo(root: Path, limit: int | None = None) -> Path:
    """The chess export as an Ultralytics dataset (images linked, not copied); returns data.yaml."""
    names = [c["name"] for c in chess_file("train")["categories"] if c["id"] > 0]  # id 0 is the group "pieces"
    for split in ("train", "val"):
        data = chess_file(split)
        images = data["images"][:limit]
        link_images([im["file_name"] for im in images], CHESS / SPLIT_DIRS[split], root / "images" / split)
        (root / "labels" / split).mkdir(parents=True)
        for image in images:
            lines = [f"{a['category_id'] - 1} {(a['bbox'][0] + a['bbox'][2] / 2) / image['width']:.6f} "
                     f"{(a['bbox'][1] + a['bbox'][3] / 2) / image['height']:.6f} {a['bbox'][2] / image['width']:.6f} "
                     f"{a['bbox'][3] / image['height']:.6f}" for a in data["annotations"] if a["image_id"] == image["id"]]
            (root / "labels" / split / Path(image["file_name"]).with_suffix(".txt").name).write_text("\n".join(lines))
    spec = {"path": ".", "train": "images/train", "val": "images/val", "names": dict(enumerate(names))}
    (root / "data.yaml").write_text(yaml.safe_dump(spec))
    return root / "data.yaml"


def write_voc(root: Path, limit: int | None = None, difficult_every: int = 7) -> Path:
    """The chess export as Pascal VOC: every ``difficult_every``-th object marked difficult."""
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    count = 0
    for split in ("train", "val"):
        data = chess_file(split)
        names = {c["id"]: c["name"] for c in data["categories"]}
        images = data["images"][:limit]
        link_images([im["file_name"] for im in images], CHESS / SPLIT_DIRS[split], root / "JPEGImages")
        stems = []
        for image in images:
            stem = Path(image["file_name"]).stem
            stems.append(stem)
            xml = ET.Element("annotation")
            ET.SubElement(xml, "filename").text = image["file_name"]
            size = ET.SubElement(xml, "size")
            ET.SubElement(size, "width").text, ET.SubElement(size, "height").text = str(image["width"]), str(image["height"])
            for a in data["annotations"]:
                if a["image_id"] != image["id"]:
                    continue
                count += 1
                obj = ET.SubElement(xml, "object")
                ET.SubElement(obj, "name").text = names[a["category_id"]]
                ET.SubElement(obj, "difficult").text = "1" if count % difficult_every == 0 else "0"
                box = ET.SubElement(obj, "bndbox")
                x, y, w, h = a["bbox"]
                for key, value in zip(("xmin", "ymin", "xmax", "ymax"), (x + 1, y + 1, x + w, y + h)):
                    ET.SubElement(box, key).text = str(value)
            ET.ElementTree(xml).write(root / "Annotations" / f"{stem}.xml")
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    return root


@needs_chess
def test_the_chess_export_is_read_in_place():
    data = find_detection_data(CHESS)
    assert data.format == "coco-export" and list(data.splits) == ["train", "val", "test"]
    assert data.split("val").images == CHESS / "valid"
    train = dataset_of(data.split("train"))
    # "pieces" (id 0) only groups the classes and has no boxes: it is not a class
    assert train.category_ids == list(range(1, 14)) and "pieces" not in train.classes
    assert (len(train), sum(len(train.targets[i][1]) for i in train.ids)) == (202, 2108)
    val = dataset_of(data.split("val"), classes=train.classes)
    assert val.classes == train.classes and len(val) == 58


@needs_chess
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_chess_ground_truth_scores_one_whatever_the_ids(split):
    dataset = dataset_of(find_detection_data(CHESS).split(split))
    metrics = evaluate_coco(dataset.coco, ground_truth_as_predictions(dataset))
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AR100"] == pytest.approx(1.0)
    # per-class AP names only the classes with ground truth in the split: bishop has one box, in train
    expected_missing = [] if split == "train" else ["bishop"]
    assert metrics["no_ground_truth"] == expected_missing
    assert set(metrics["per_class"]) == set(dataset.classes) - set(expected_missing)
    assert all(v == pytest.approx(1.0) for v in metrics["per_class"].values())


@needs_chess
def test_annotation_ids_from_zero_would_break_pycocotools_unfixed():
    """The quirk the renumbering exists for: pycocotools counts a match to annotation id 0 as a miss."""
    from pycocotools.cocoeval import COCOeval

    raw = chess_file("val")
    coco = quiet_coco(raw)
    detections = coco.loadRes([{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                                "score": 1.0} for a in raw["annotations"]])
    evaluation = COCOeval(coco, detections, "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    precision = evaluation.eval["precision"][0, :, :, 0, -1]
    assert raw["annotations"][0]["id"] == 0 and (precision[precision > -1] < 1.0).any()


@needs_chess
def test_yolo_dataset_converts_to_the_same_boxes(tmp_path):
    data = find_detection_data(write_yolo(tmp_path / "yolo"))
    assert data.format == "yolo" and set(data.splits) == {"train", "val"}
    for split in ("train", "val"):
        dataset = dataset_of(data.split(split))
        assert dataset.classes == [c["name"] for c in chess_file(split)["categories"] if c["id"] > 0]
        original = dataset_of(find_detection_data(CHESS).split(split))
        by_name = {original.coco.imgs[i]["file_name"]: i for i in original.ids}
        for image_id in dataset.ids:
            other = by_name[dataset.coco.imgs[image_id]["file_name"]]
            boxes, labels = dataset.targets[image_id]
            assert labels.tolist() == original.targets[other][1].tolist()
            assert np.abs(boxes - original.targets[other][0]).max(initial=0) < 0.01  # 6-decimal normalised labels
        metrics = evaluate_coco(dataset.coco, ground_truth_as_predictions(dataset))
        assert metrics["AP"] == pytest.approx(1.0)


@needs_chess
def test_voc_difficult_objects_are_no_targets_and_ignored(tmp_path):
    data = find_detection_data(write_voc(tmp_path / "voc", limit=20))
    assert data.format == "voc" and set(data.splits) == {"train", "val"}
    for split in ("train", "val"):
        dataset = dataset_of(data.split(split))
        difficult = [a for a in dataset.coco.dataset["annotations"] if a["difficult"]]
        boxes = sum(len(dataset.targets[i][1]) for i in dataset.ids)
        assert difficult and boxes == len(dataset.coco.dataset["annotations"]) - len(difficult)
        original = dataset_of(find_detection_data(CHESS).split(split))
        first_box = original.coco.dataset["annotations"][0]["bbox"]
        converted = dataset.coco.dataset["annotations"][0]["bbox"]
        assert converted == pytest.approx(first_box)  # 1-based inclusive VOC pixels undone exactly
        for with_ignored in (False, True):  # detections on difficult objects neither count nor hurt
            metrics = evaluate_coco(dataset.coco, ground_truth_as_predictions(dataset, with_ignored))
            assert metrics["AP"] == pytest.approx(1.0), (split, with_ignored)


@needs_chess
def test_explicit_paths_take_the_place_of_a_root(tmp_path):
    recipe = load_recipe(RECIPES / "hdetr-shapes.yaml", [
        "data.root=nowhere",
        f"data.train={{images: {CHESS / 'train'}, annotations: {CHESS / 'train' / '_annotations.coco.json'}}}",
        f"data.val.images={CHESS / 'test'}", f"data.val.annotations={CHESS / 'test' / '_annotations.coco.json'}"])
    task = Task(recipe)
    assert task.data().format == "paths" and len(task.dataset("train")) == 202 and len(task.dataset("val")) == 29
    assert "13 classes; train 202 images / 2108 boxes; val 29 images / 376 boxes" in task.data_summary()
    with pytest.raises(UsageError, match="data.val: needs both images .* annotations missing"):
        load_recipe(RECIPES / "hdetr-shapes.yaml", [f"data.val.images={CHESS / 'test'}"])


def write_tiny_yolo(root: Path, lines: list[str]) -> Path:
    from PIL import Image

    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        Image.new("RGB", (40, 20)).save(root / split / "images" / "a.png")
        (root / split / "labels" / "a.txt").write_text("\n".join(lines))
    # Roboflow's YOLO export writes paths one level too high; they are found anyway
    (root / "data.yaml").write_text("train: ../train/images\nval: ../val/images\nnc: 2\nnames: [cat, dog]\n")
    return root


def test_yolo_labels_are_denormalised(tmp_path):
    data = find_detection_data(write_tiny_yolo(tmp_path / "y", ["1 0.5 0.5 0.5 0.5", "0 0.1 0.2 0.3 0.2 0.3 0.6"]))
    assert data.format == "yolo" and label_file(Path("/d/images/train/a.png")) == Path("/d/labels/train/a.txt")
    boxes, labels = dataset_of(data.split("train")).targets[1]
    assert labels.tolist() == [1, 0]
    assert np.allclose(boxes, [[10, 5, 30, 15], [4, 4, 12, 12]])  # the polygon's bounding box


@pytest.mark.parametrize("line, problem", [("2 0.5 0.5 0.1 0.1", "class index 2 is out of range 0..1"),
                                           ("0 0.5 0.5 1.4 0.1", r"coordinates outside \[0, 1\]"),
                                           ("0 0.5 0.5", "expected 'class cx cy w h'")])
def test_bad_yolo_labels_name_file_and_line(tmp_path, line, problem):
    root = write_tiny_yolo(tmp_path / "y", ["0 0.5 0.5 0.2 0.2", line])
    with pytest.raises(UsageError, match=rf"train/labels/a.txt:2: {problem}"):
        find_detection_data(root)
    data = find_detection_data(root, skip_invalid=True)
    assert data.split("train").skipped == {"invalid YOLO label": 1}
    assert len(data.split("train").annotations["annotations"]) == 1


def test_unknown_folder_lists_every_format(tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(UsageError) as error:
        find_detection_data(tmp_path / "photos")
    message = str(error.value)
    assert "is in no known detection format" in message and "\n" not in message
    for looked_for in ("instances_train2017.json", "annotations/train.json", "_annotations.coco.json", "data.yaml",
                       "ImageSets/Main/train.txt", "{images: DIR, annotations: FILE}"):
        assert looked_for in message


def test_missing_images_are_counted_and_named(tmp_path):
    from PIL import Image

    (tmp_path / "train").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "0.jpg")
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 8, "height": 8} for i in range(8)]
    (tmp_path / "train" / "_annotations.coco.json").write_text(json.dumps(
        {"images": images, "annotations": [], "categories": [{"id": 0, "name": "x"}]}))
    source = find_detection_data(tmp_path).split("train")
    with pytest.raises(UsageError, match=r"7 of 8 images listed in .* are missing from .*: 1.jpg, 2.jpg, 3.jpg, "
                                         r"4.jpg, 5.jpg and 2 more"):
        dataset_of(source)

"""Detection data in the formats people have, recognised from a folder's contents.

Every format becomes, per split, an image folder and a COCO annotation dict (or file), so that
one dataset class (:class:`dfx.data.coco.CocoDetection`) and one evaluation (pycocotools) serve
them all:

    coco         COCO 2017: <root>/{train,val}2017/, <root>/annotations/instances_{train,val}2017.json
    dfx          <root>/{train,val}/, <root>/annotations/{train,val}.json (the embedded shapes-det)
    coco-export  Roboflow / CVAT exports: <root>/{train,valid|val,test}/_annotations.coco.json
                 (or annotations.json) with the images beside it
    yolo         Ultralytics: a data.yaml with ``names`` and ``train``/``val`` image folders, the
                 labels in the matching ``labels/`` folders (``class cx cy w h`` normalised)
    voc          Pascal VOC: Annotations/*.xml, JPEGImages/, ImageSets/Main/{train,val,test}.txt
    paths        explicit ``data.train: {images: DIR, annotations: FILE}`` (and ``data.val``,
                 ``data.test``), for any other COCO layout

YOLO and VOC are converted in memory: image ids 1..N in file order, category ids 1..K in class
order, boxes in pixels ``[x, y, w, h]``. VOC's ``difficult`` objects become ``iscrowd: 1``:
they are no training targets and COCOeval ignores detections on them, as VOC's evaluation does.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dfx.data.images import IMAGE_SUFFIXES, image_size, list_images
from dfx.errors import UsageError

SPLITS = ("train", "val", "test")
EXPORT_SPLIT_DIRS = {"train": ("train",), "val": ("valid", "val"), "test": ("test",)}
EXPORT_FILES = ("_annotations.coco.json", "annotations.json")
YOLO_FILES = ("data.yaml", "dataset.yaml", "data.yml")
# YOLO labels: this much rounding outside [0, 1] is accepted (and clipped); more is an error
YOLO_TOLERANCE = 1e-3

LOOKED_FOR = {
    "coco": "COCO 2017 (train2017/ + annotations/instances_train2017.json)",
    "dfx": "dfx (train/ + annotations/train.json)",
    "coco-export": "Roboflow/CVAT COCO export (train/_annotations.coco.json or train/annotations.json beside the "
                   "images; val as valid/ or val/)",
    "yolo": "YOLO (data.yaml with names and train/val image folders, labels/*.txt beside them)",
    "voc": "Pascal VOC (Annotations/*.xml, JPEGImages/, ImageSets/Main/train.txt)",
}


@dataclass
class Split:
    """One split: its image folder and COCO annotations (``annotations`` in memory, else the file)."""

    images: Path
    ann_file: Path  # the file, or for a converted split the file it was read from (for messages)
    annotations: dict | None = None
    skipped: dict[str, int] = field(default_factory=dict)  # what conversion dropped under skip_invalid


@dataclass
class DetectionData:
    """A dataset's format and its splits (a subset of train, val, test)."""

    format: str
    root: Path | None
    splits: dict[str, Split]

    def split(self, name: str) -> Split:
        if name not in self.splits:
            where = f"{self.root} ({self.format})" if self.root else "the recipe"
            hint = (f"; set data.{name}: {{images: DIR, annotations: FILE}}" if self.format in ("paths", "coco-export")
                    else "")
            raise UsageError(f"data: {where} has no {name} split (it has {', '.join(self.splits) or 'none'}){hint}")
        return self.splits[name]


def find_detection_data(root: str | Path | None, paths: dict[str, dict | None] | None = None,
                        skip_invalid: bool = False) -> DetectionData:
    """Recognise ``root``'s format and return its splits; ``paths`` (split -> {images, annotations})
    are explicit splits that take the place of the root's (with all of train and val, ``root`` is
    not read). A folder in no known format is a UsageError listing what was looked for."""
    explicit = {s: Split(Path(p["images"]).expanduser(), Path(p["annotations"]).expanduser())
                for s, p in (paths or {}).items() if p}
    if {"train", "val"} <= set(explicit) or root is None:
        return DetectionData("paths", None, explicit)
    data = detect(Path(root).expanduser(), skip_invalid)
    data.splits.update(explicit)
    return data


def detect(root: Path, skip_invalid: bool = False) -> DetectionData:
    if root.is_file() and root.suffix in (".yaml", ".yml"):
        return yolo_data(root, skip_invalid)
    if not root.is_dir():
        raise UsageError(f"data.root: {root} does not exist; {_formats_hint('a dataset folder in one of')}")
    for name, finder in (("coco", coco_splits), ("dfx", dfx_splits), ("coco-export", export_splits)):
        splits = finder(root)
        if splits:
            return DetectionData(name, root, splits)
    yaml_file = next((root / f for f in YOLO_FILES if (root / f).is_file()), None)
    if yaml_file is not None:
        return yolo_data(yaml_file, skip_invalid)
    if (root / "Annotations").is_dir() and (root / "ImageSets" / "Main").is_dir():
        return voc_data(root)
    raise UsageError(f"data.root: {root} is in no known detection format; {_formats_hint('looked for')}")


def _formats_hint(lead: str) -> str:
    return (f"{lead}: {'; '.join(LOOKED_FOR.values())}; or a YOLO data.yaml, or data.train and data.val set to "
            "{images: DIR, annotations: FILE}")


def coco_splits(root: Path) -> dict[str, Split]:
    found = {s: Split(root / f"{s}2017", root / "annotations" / f"instances_{s}2017.json") for s in SPLITS}
    return {s: p for s, p in found.items() if p.images.is_dir() and p.ann_file.is_file()}


def dfx_splits(root: Path) -> dict[str, Split]:
    found = {s: Split(root / s, root / "annotations" / f"{s}.json") for s in SPLITS}
    return {s: p for s, p in found.items() if p.images.is_dir() and p.ann_file.is_file()}


def export_splits(root: Path) -> dict[str, Split]:
    splits = {}
    for split, folders in EXPORT_SPLIT_DIRS.items():
        for folder in folders:
            ann_file = next((root / folder / f for f in EXPORT_FILES if (root / folder / f).is_file()), None)
            if ann_file is not None:
                splits[split] = Split(root / folder, ann_file)
                break
    return splits


# ----------------------------------------------------------------------------------------------
# YOLO (Ultralytics)


def yolo_data(yaml_file: Path, skip_invalid: bool = False) -> DetectionData:
    """The splits of an Ultralytics dataset YAML, converted to COCO."""
    try:
        spec = yaml.safe_load(yaml_file.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"{yaml_file}: not a readable YAML file ({e})") from None
    if not isinstance(spec, dict) or "names" not in spec:
        raise UsageError(f"{yaml_file}: a YOLO dataset file needs 'names' (the class names) and 'train'/'val' "
                         "image folders")
    names = spec["names"]
    if isinstance(names, dict):  # {0: person, 1: bicycle}
        names = [names[k] for k in sorted(names)]
    if not isinstance(names, list) or not names:
        raise UsageError(f"{yaml_file}: 'names' must be a list of class names or a mapping index -> name")
    if "nc" in spec and spec["nc"] != len(names):
        raise UsageError(f"{yaml_file}: nc is {spec['nc']} but 'names' lists {len(names)} classes")
    base = yaml_file.parent / spec["path"] if spec.get("path") else yaml_file.parent
    splits = {}
    for split in SPLITS:
        if spec.get(split):
            images = _yolo_folder(base, spec[split], yaml_file, split)
            annotations, skipped = yolo_to_coco(images, [str(n) for n in names], skip_invalid)
            splits[split] = Split(images, yaml_file, annotations, skipped)
    return DetectionData("yolo", yaml_file.parent, splits)


def _yolo_folder(base: Path, entry, yaml_file: Path, split: str) -> Path:
    if not isinstance(entry, str):
        raise UsageError(f"{yaml_file}: {split} must be one image folder (got {entry!r})")
    candidates = [base / entry]
    if entry.startswith("../"):  # Roboflow's YOLO exports write ../train/images for <root>/train/images
        candidates.append(base / entry[3:])
    for folder in candidates:
        if folder.is_dir():
            return folder.resolve()
    raise UsageError(f"{yaml_file}: {split} image folder {candidates[0]} does not exist")


def label_file(image: Path) -> Path:
    """Ultralytics' rule: the last ``images`` folder of the path becomes ``labels``, suffix .txt."""
    parts = list(image.parts)
    if "images" in parts:
        index = len(parts) - 1 - parts[::-1].index("images")
        parts[index] = "labels"
    return Path(*parts).with_suffix(".txt")


def yolo_to_coco(image_dir: Path, names: list[str], skip_invalid: bool = False) -> tuple[dict, dict[str, int]]:
    """COCO annotations of the images under ``image_dir`` and their YOLO label files.

    A line is ``class cx cy w h`` (or ``class x1 y1 x2 y2 ...``, a polygon: YOLO-seg, whose bounding
    box is taken and which is kept as the object's COCO ``segmentation`` in pixels, so that a masks
    model trains on it), normalised to [0, 1]. A class index out of range or a coordinate outside [0, 1] is a
    UsageError naming file and line, or dropped and counted under ``skip_invalid``. An image
    without a label file has no objects.
    """
    images, annotations, skipped = [], [], {}
    for image_id, path in enumerate(list_images(image_dir), 1):
        width, height = image_size(path)
        images.append({"id": image_id, "file_name": path.relative_to(image_dir).as_posix(), "width": width,
                       "height": height})
        labels = label_file(path)
        if not labels.is_file():
            continue
        for number, line in enumerate(labels.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                category, x0, y0, x1, y1, polygon = _yolo_box(line, len(names))
            except ValueError as e:
                if not skip_invalid:
                    raise UsageError(f"{labels}:{number}: {e} (line {line.strip()!r}); fix the label, or set "
                                     "data.skip_invalid: true to drop it") from None
                skipped["invalid YOLO label"] = skipped.get("invalid YOLO label", 0) + 1
                continue
            box = [x0 * width, y0 * height, (x1 - x0) * width, (y1 - y0) * height]
            annotation = {"id": len(annotations) + 1, "image_id": image_id, "category_id": category + 1,
                          "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
            if polygon is not None:
                annotation["segmentation"] = [[v * (height if i % 2 else width) for i, v in enumerate(polygon)]]
            annotations.append(annotation)
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(names)]
    return {"images": images, "annotations": annotations, "categories": categories}, skipped


def _yolo_box(line: str, classes: int) -> tuple[int, float, float, float, float, list[float] | None]:
    """(class, x0, y0, x1, y1, polygon or None) normalised and clipped to [0, 1], from one label line;
    ValueError says what is wrong."""
    fields = line.split()
    try:
        category, values = float(fields[0]), [float(v) for v in fields[1:]]
    except (ValueError, IndexError):
        raise ValueError("not numbers") from None
    if category != int(category) or not 0 <= category < classes:
        raise ValueError(f"class index {fields[0]} is out of range 0..{classes - 1}")
    if len(values) == 4:
        cx, cy, w, h = values
        corners = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        checked = values
    elif len(values) >= 6 and len(values) % 2 == 0:  # a polygon
        xs, ys = values[0::2], values[1::2]
        corners, checked = [min(xs), min(ys), max(xs), max(ys)], values
    else:
        raise ValueError(f"expected 'class cx cy w h' (or a polygon), got {len(fields)} fields")
    if not all(math.isfinite(v) for v in checked) or min(checked) < -YOLO_TOLERANCE or \
            max(checked) > 1 + YOLO_TOLERANCE or min(corners) < -YOLO_TOLERANCE or max(corners) > 1 + YOLO_TOLERANCE:
        raise ValueError("coordinates outside [0, 1] (YOLO labels are normalised by the image size)")
    x0, y0, x1, y1 = (min(max(v, 0.0), 1.0) for v in corners)
    if x1 <= x0 or y1 <= y0:
        raise ValueError("the box has no area")
    polygon = [min(max(v, 0.0), 1.0) for v in values] if len(values) != 4 else None
    return int(category), x0, y0, x1, y1, polygon


# ----------------------------------------------------------------------------------------------
# Pascal VOC


def voc_data(root: Path) -> DetectionData:
    """The splits of a VOC root (train, val, test from ImageSets/Main/<split>.txt), converted to COCO.

    Classes: every object name in the split files' annotations, sorted (the same for every split).
    """
    lists = {s: root / "ImageSets" / "Main" / f"{s}.txt" for s in SPLITS}
    lists = {s: f for s, f in lists.items() if f.is_file()}
    if not lists:
        raise UsageError(f"data.root: {root} looks like Pascal VOC but has no ImageSets/Main/train.txt (or val.txt, "
                         "test.txt) listing the image ids of each split")
    parsed = {s: [_read_voc(root, image_id) for image_id in f.read_text().split()] for s, f in lists.items()}
    names = sorted({obj[0] for records in parsed.values() for record in records for obj in record["objects"]})
    category = {name: i + 1 for i, name in enumerate(names)}
    splits = {}
    for split, records in parsed.items():
        images, annotations = [], []
        for image_id, record in enumerate(records, 1):
            images.append({"id": image_id, "file_name": record["file_name"], "width": record["width"],
                           "height": record["height"]})
            for name, box, difficult in record["objects"]:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category[name],
                                    "bbox": box, "area": box[2] * box[3], "iscrowd": int(difficult),
                                    "difficult": int(difficult)})
        coco = {"images": images, "annotations": annotations,
                "categories": [{"id": category[n], "name": n} for n in names]}
        splits[split] = Split(root / "JPEGImages", lists[split], coco)
    return DetectionData("voc", root, splits)


def _read_voc(root: Path, image_id: str) -> dict:
    """One VOC XML: file name, size and objects (name, COCO box in pixels, difficult)."""
    xml_file = root / "Annotations" / f"{image_id}.xml"
    try:
        tree = ET.parse(xml_file).getroot()
    except (OSError, ET.ParseError) as e:
        raise UsageError(f"{xml_file}: cannot read the annotation ({e}); it is listed in ImageSets/Main") from None
    file_name = (tree.findtext("filename") or "").strip()
    if not file_name or not (root / "JPEGImages" / file_name).is_file():
        file_name = next((f"{image_id}{s}" for s in IMAGE_SUFFIXES if (root / "JPEGImages" / f"{image_id}{s}").is_file()),
                         file_name or f"{image_id}.jpg")
    size = tree.find("size")
    try:
        width, height = int(float(size.findtext("width"))), int(float(size.findtext("height")))
    except (AttributeError, TypeError, ValueError):
        width = height = 0
    if width <= 0 or height <= 0:  # some tools write 0 x 0: read it from the image
        width, height = image_size(root / "JPEGImages" / file_name)
    objects = []
    for obj in tree.iter("object"):
        try:
            box = obj.find("bndbox")
            x0, y0, x1, y1 = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError):
            raise UsageError(f"{xml_file}: an object has no valid bndbox (xmin, ymin, xmax, ymax)") from None
        # VOC pixels are 1-based and inclusive: xmin 1, xmax 10 covers 10 pixels starting at x = 0
        objects.append(((obj.findtext("name") or "").strip(), [x0 - 1, y0 - 1, x1 - x0 + 1, y1 - y0 + 1],
                        (obj.findtext("difficult") or "0").strip() == "1"))
    return {"file_name": file_name, "width": width, "height": height, "objects": objects}


def summary_line(data: DetectionData, datasets: dict[str, "CocoDetection"]) -> str:
    """``data: ROOT (FORMAT), K classes; train N images / M boxes; val ...`` for the start of training."""
    train = next(iter(datasets.values()))
    parts = [f"{name} {len(d)} images / {sum(len(d.targets[i][1]) for i in d.ids)} boxes"
             for name, d in datasets.items()]
    where = data.root if data.root is not None else "explicit paths"
    return f"dfx: data {where} ({data.format}), {train.num_classes} classes; " + "; ".join(parts)

"""COCO-format detection data: an image folder and an annotation JSON, checked when built.

Which folder and file make each split, for every format people export (COCO, Roboflow/CVAT,
YOLO, Pascal VOC, explicit paths), is :mod:`dfx.data.formats`' business; YOLO and VOC arrive
here as annotation dicts converted in memory.

An item is ``(image, target)`` after the transform (dfx.data.det_transforms); the transform gets
the PIL RGB image and a target whose ``boxes`` are absolute pixel xyxy [N, 4] float, ``labels``
contiguous class indices [N] int64, ``image_id``, ``orig_size`` and ``size`` (h, w) int64 [2].
With ``masks=True`` (instance segmentation) the target also has ``masks`` uint8 [N, H, W], each
annotation's ``segmentation`` (polygons, or RLE compressed or not) decoded by ``pycocotools.mask``
on the image's pixels. With ``keypoints=True`` (pose) the target also has ``keypoints`` float32
[N, K, 3] (x, y in absolute pixels, visibility 0/1/2), K from the category's ``keypoints`` names,
and ``area`` [N] (the annotations' areas in pixels, for OKS);
the dataset then knows ``keypoint_names``, ``skeleton`` (0-based pairs), ``flip_perm`` (left <->
right, from ``flip_pairs`` or the names) and ``sigmas`` (the category's, COCO's for 17, else None).
Crowd annotations (iscrowd=1) are not targets; they stay in ``coco`` so that COCOeval ignores
detections on them as COCO intends.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dfx.data.images import image_problem, load_rgb
from dfx.errors import UsageError
from dfx.files import read_json

SKIP_HINT = "set data.skip_invalid: true to drop them"
# the reasons CocoDetection.skipped counts under
UNKNOWN_CATEGORY, BAD_BOX, UNKNOWN_IMAGE, MISSING_IMAGE, UNREADABLE_IMAGE = (
    "unknown category", "invalid box", "unknown image id", "missing image file", "unreadable image")


def read_annotation_file(ann_file: Path) -> dict:
    """The parsed JSON of a COCO annotation file, checked by :func:`check_annotations`."""
    if not Path(ann_file).is_file():
        raise UsageError(f"annotation file {ann_file} does not exist; check data.root (or the path you passed)")
    return check_annotations(read_json(ann_file, "annotation file", "re-export or re-download it"), ann_file)


def check_annotations(data, source: str | Path) -> dict:
    """A COCO annotation dict with ``annotations``/``categories`` defaulted to [] and annotation ids
    made positive and unique.

    ``source`` names the file (or converted dataset) in messages. pycocotools indexes annotations
    by id and counts a detection as matched only when the matched ground-truth id is > 0, so
    exports whose ids start at 0, repeat or are missing are renumbered 1..N (nothing else refers
    to annotation ids).
    """
    if isinstance(data, list):
        raise UsageError(f"annotation file {source}: a JSON list (a results file?), not a COCO annotation dict with "
                         "'images', 'annotations' and 'categories'; did you swap --predictions and --annotations?")
    if not isinstance(data, dict) or not data.get("images"):
        raise UsageError(f"annotation file {source}: empty annotation file (no 'images' list); "
                         "a COCO file needs 'images', 'annotations' and 'categories'")
    broken = [i for i, im in enumerate(data["images"]) if not (isinstance(im, dict) and {"id", "file_name"} <= set(im))]
    if broken:
        raise UsageError(f"annotation file {source}: {len(broken)} image records lack 'id' or 'file_name' (first: "
                         f"images[{broken[0]}]); every image record needs both")
    image_ids = [im["id"] for im in data["images"]]
    if len(set(image_ids)) < len(image_ids):
        seen: set = set()
        twice = [i for i in image_ids if i in seen or seen.add(i)]
        raise UsageError(f"annotation file {source}: {len(twice)} image records repeat an image id ({first(twice)}); "
                         "every image needs its own id")
    data = {**data, "annotations": data.get("annotations") or [], "categories": data.get("categories") or []}
    ids = [a.get("id") for a in data["annotations"]]
    if not all(isinstance(i, int) and i > 0 for i in ids) or len(set(ids)) < len(ids):
        data["annotations"] = [{**a, "id": n} for n, a in enumerate(data["annotations"], 1)]
    return data


def read_ground_truth(ann_file: str | Path):
    """A pycocotools COCO of an annotation file, ready for COCOeval (annotation ids fixed as above)."""
    return quiet_coco(read_annotation_file(Path(ann_file)))


def label_categories(data: dict) -> list[int]:
    """The category ids that are classes, sorted: every category except grouping-only ones.

    Labelling tools (Roboflow) add the dataset's name as a category that is only the
    ``supercategory`` of the real classes and has no boxes; it is not a class to learn or score.
    """
    used = {a.get("category_id") for a in data["annotations"]}
    parents = {c.get("supercategory") for c in data["categories"] if c.get("supercategory") != c.get("name")}
    return sorted(c["id"] for c in data["categories"] if c["id"] in used or c.get("name") not in parents)


def quiet_coco(dataset: dict):
    """A pycocotools COCO built from an in-memory dict, without its progress prints."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def box_ok(box, image: dict) -> bool:
    """A COCO [x, y, w, h] of finite numbers with positive size that overlaps its image (when the
    image's size is known)."""
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(is_number(v) and math.isfinite(v) for v in box)
            and box[2] > 0 and box[3] > 0):
        return False
    x, y, w, h = box
    return x + w > 0 and y + h > 0 and x < image.get("width", math.inf) and y < image.get("height", math.inf)


def named_categories(classes: list[str], categories: list[dict], source: str | Path,
                     fix: str = "set data.category_ids to the matching ids") -> list[int]:
    """The category ids of ``classes``, by name, in that order (``source`` names the file in messages)."""
    repeated = sorted({name for name in classes if classes.count(name) > 1})
    if repeated:
        raise UsageError(f"the model's classes repeat the names {first(repeated)}, so {source}'s categories cannot be "
                         "matched by name; set data.category_ids to the ids to use")
    ids = {}
    for category in categories:
        ids.setdefault(str(category.get("name", category["id"])), category["id"])
    absent = [name for name in classes if name not in ids]
    if absent:
        raise UsageError(f"{source} has no categories named {first(absent)} (the model's classes are "
                         f"{first(classes, 20)}); {fix}")
    return [ids[name] for name in classes]


def is_number(value) -> bool:
    """An int or float as JSON gives them: not a string such as "0.9", not true/false."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def first(items, count: int = 5) -> str:
    items = list(items)
    more = f" and {len(items) - count} more" if len(items) > count else ""
    return ", ".join(str(i) for i in items[:count]) + more


class CocoDetection(Dataset):
    """The images and boxes of one COCO annotation file, checked when built.

    ``category_ids``: COCO category ids in label order (label i is category ``category_ids[i]``);
    default every category of the file that is a class (:func:`label_categories`), sorted by id, or
    with ``classes`` (names, e.g. the model's) the categories of those names in that order. ``skip_invalid``: drop what is invalid
    (annotations with unknown categories, non-positive boxes or unknown image ids; images whose
    file is missing, not an image or cut off) and count it in ``skipped`` (reason -> count) instead of raising UsageError.

    ``annotations``: the annotation dict itself (a dataset converted in memory from YOLO or VOC);
    ``ann_file`` then only names it in messages.

    Attributes: ``coco`` (pycocotools COCO of the file, restricted to the kept images, annotations
    and categories: the ground truth for COCOeval), ``category_ids``, ``classes`` (names in label
    order), ``ids`` (image ids, sorted; images without boxes included), ``skipped``, ``dropped_files``
    (image file name -> why skip_invalid dropped it).
    """

    def __init__(self, image_dir: str | Path, ann_file: str | Path, transform=None,
                 category_ids: list[int] | None = None, skip_invalid: bool = False, annotations: dict | None = None,
                 classes: list[str] | None = None, masks: bool = False, keypoints: bool = False,
                 flip_pairs: list | None = None, sigmas: list | None = None):
        self.image_dir = Path(image_dir)
        self.masks = masks
        self.keypoints = keypoints
        self.ann_file = Path(ann_file)
        self.converted = annotations is not None  # no COCO file on disk holds these annotations
        self.transform = transform
        self.skip_invalid = skip_invalid
        self.skipped: dict[str, int] = {}
        self.dropped_files: dict[str, str] = {}  # image file name -> why it was dropped (skip_invalid)
        data = read_annotation_file(self.ann_file) if annotations is None else check_annotations(annotations, ann_file)
        categories = {c["id"]: c for c in data["categories"]}
        chosen = category_ids is not None  # by the recipe: names may repeat, the ids decide
        if category_ids is None:
            category_ids = label_categories(data) if classes is None else named_categories(classes, data["categories"], self.ann_file)
        absent = [c for c in category_ids if c not in categories]
        if absent:
            raise UsageError(f"data.category_ids: {first(absent)} not among the categories of {self.ann_file} "
                             f"(it has {first(sorted(categories), 20)})")
        if len(set(category_ids)) != len(category_ids):
            raise UsageError(f"data.category_ids: {list(category_ids)} lists an id twice")
        self.category_ids = [int(c) for c in category_ids]
        self.classes = [str(categories[c].get("name", c)) for c in self.category_ids]
        shared = sorted({name for name in self.classes if self.classes.count(name) > 1})
        if shared and not chosen:
            ids = [c for c, name in zip(self.category_ids, self.classes) if name == shared[0]]
            raise UsageError(f"{self.ann_file}: categories {first(ids)} share the name {shared[0]!r}; class names "
                             "must be unique: rename one, or list the ids to learn in data.category_ids")
        self.label_of = {c: i for i, c in enumerate(self.category_ids)}
        if keypoints:
            self._keypoint_metadata([categories[c] for c in self.category_ids], flip_pairs, sigmas)

        images = self._present_images(data["images"])
        annotations = self._valid_annotations(data["annotations"], {im["id"]: im for im in data["images"]}, images)
        self.coco = quiet_coco({**data, "images": list(images.values()), "annotations": annotations,
                                "categories": [categories[c] for c in self.category_ids]})
        self.ids = sorted(images)
        self.targets = self._targets(images, annotations)

    def _keypoint_metadata(self, categories: list[dict], flip_pairs, sigmas) -> None:
        """keypoint_names, skeleton, flip_perm and sigmas of the (one) keypoint category."""
        from dfx.data.keypoints import flip_permutation, resolve_sigmas

        named = [c for c in categories if c.get("keypoints")]
        if not named:
            raise UsageError(f"{self.ann_file}: no category lists 'keypoints' (names); pose needs a person-keypoints "
                             "file (person_keypoints_*.json) or model.keypoints: false")
        if len({len(c["keypoints"]) for c in named}) > 1:
            raise UsageError(f"{self.ann_file}: categories list different keypoints; pose learns one skeleton")
        category = named[0]
        self.keypoint_names = [str(n) for n in category["keypoints"]]
        k = len(self.keypoint_names)
        self.skeleton = [(int(a) - 1, int(b) - 1) for a, b in category.get("skeleton") or []]
        try:
            self.flip_perm = flip_permutation(self.keypoint_names, flip_pairs if flip_pairs is not None
                                              else category.get("flip_pairs"))
        except ValueError as e:
            raise UsageError(f"data.flip_pairs: {e}") from None
        try:
            self.sigmas = list(resolve_sigmas(k, sigmas, category, where="data.sigmas"))
        except ValueError:
            if sigmas is not None or category.get("sigmas") is not None:
                raise
            self.sigmas = None  # no OKS without them: evaluation says so

    def _present_images(self, images: list[dict]) -> dict[int, dict]:
        """image id -> image record, for images whose file exists (all of them unless skip_invalid;
        with it, files that are not images or are cut off are dropped too)."""
        if not self.image_dir.is_dir():
            raise UsageError(f"image folder {self.image_dir} (for {self.ann_file}) does not exist")
        present = set(os.listdir(self.image_dir))  # one listing instead of a stat per image (COCO: 118k)
        missing = [im["file_name"] for im in images
                   if im["file_name"] not in present and not (self.image_dir / im["file_name"]).is_file()]
        if missing and not self.skip_invalid:
            raise UsageError(f"{len(missing)} of {len(images)} images listed in {self.ann_file} are missing from "
                             f"{self.image_dir}: {first(missing)}; restore them, or {SKIP_HINT}")
        self._count(MISSING_IMAGE, len(missing))
        self.dropped_files.update((name, "missing") for name in missing)
        if self.skip_invalid:  # cut-off or non-image files: a header and end-of-file check, not a decode
            for im in images:
                reason = im["file_name"] not in self.dropped_files and \
                    image_problem(self.image_dir / im["file_name"], decode=False)
                if reason:
                    self.dropped_files[im["file_name"]] = reason
                    self._count(UNREADABLE_IMAGE, 1)
        gone = set(self.dropped_files)
        return {im["id"]: im for im in images if im["file_name"] not in gone}

    def _valid_annotations(self, annotations: list[dict], listed: dict, images: dict[int, dict]) -> list[dict]:
        """The annotations of kept images whose category is known and whose box has positive size
        and overlaps its image.

        ``listed``: every image record of the file by id; annotations of images dropped for a
        missing file go with their image (already counted) and are not counted again.
        """
        invalid: dict[str, list[dict]] = {UNKNOWN_CATEGORY: [], BAD_BOX: [], UNKNOWN_IMAGE: []}
        kept = []
        for ann in annotations:
            box = ann.get("bbox")
            if ann.get("image_id") not in listed:
                invalid[UNKNOWN_IMAGE].append(ann)
            elif ann.get("category_id") not in self.label_of:
                invalid[UNKNOWN_CATEGORY].append(ann)
            elif not box_ok(box, listed[ann["image_id"]]):
                invalid[BAD_BOX].append(ann)
            elif ann["image_id"] in images:
                kept.append(ann)
        if not self.skip_invalid:
            self._raise_invalid(invalid)
        for reason, anns in invalid.items():
            self._count(reason, len(anns))
        return kept

    def _raise_invalid(self, invalid: dict[str, list[dict]]) -> None:
        if invalid[UNKNOWN_CATEGORY]:
            anns = invalid[UNKNOWN_CATEGORY]
            ids = sorted({a.get("category_id") for a in anns}, key=str)
            raise UsageError(f"{len(anns)} annotations in {self.ann_file} have category ids {first(ids, 10)} that "
                             f"are not in the category list {first(self.category_ids, 20)}; add them to "
                             "data.category_ids or set data.skip_invalid: true")
        if invalid[BAD_BOX]:
            anns = invalid[BAD_BOX]
            raise UsageError(f"{len(anns)} annotations in {self.ann_file} have boxes with non-positive width or "
                             f"height, or outside their image (annotation ids {first(a.get('id') for a in anns)}; e.g. bbox "
                             f"{anns[0].get('bbox')} as [x, y, w, h]); fix them, or {SKIP_HINT}")
        if invalid[UNKNOWN_IMAGE]:
            anns = invalid[UNKNOWN_IMAGE]
            raise UsageError(f"{len(anns)} annotations in {self.ann_file} refer to image ids that are not in its "
                             f"'images' list ({first(sorted({a.get('image_id') for a in anns}, key=str))}); fix "
                             f"the file, or {SKIP_HINT}")

    def _targets(self, images: dict[int, dict], annotations: list[dict]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """image id -> (boxes [N, 4] float32 absolute xyxy clipped to the image, labels [N] int64), no crowds;
        with ``masks``, ``self.segments``: image id -> the same objects' segmentations."""
        boxes: dict[int, list] = {i: [] for i in images}
        labels: dict[int, list] = {i: [] for i in images}
        self.segments: dict[int, list] = {i: [] for i in images}
        self.poses: dict[int, list] = {i: [] for i in images}
        self.pose_areas: dict[int, list] = {i: [] for i in images}
        for ann in annotations:
            if ann.get("iscrowd", 0):
                continue
            if self.keypoints:  # with the annotation's area (OKS divides by it), 0.53 x the box without one
                self.poses[ann["image_id"]].append(self._pose(ann))
                area = ann.get("area")
                self.pose_areas[ann["image_id"]].append(float(area) if is_number(area) and area > 0 else
                                                        0.53 * ann["bbox"][2] * ann["bbox"][3])
            if self.masks:
                if not ann.get("segmentation"):
                    raise UsageError(f"annotation {ann.get('id')} in {self.ann_file} has no 'segmentation'; instance "
                                     "masks need polygons or RLE on every object (or train boxes only: model.masks: false)")
                self.segments[ann["image_id"]].append(ann["segmentation"])
            x, y, w, h = ann["bbox"]
            boxes[ann["image_id"]].append((x, y, x + w, y + h))
            labels[ann["image_id"]].append(self.label_of[ann["category_id"]])
        targets = {}
        for image_id, image in images.items():
            xyxy = np.asarray(boxes[image_id], dtype=np.float32).reshape(-1, 4)
            if "width" in image and "height" in image:  # COCO boxes sometimes overhang the image by a pixel
                np.clip(xyxy, 0, [image["width"], image["height"], image["width"], image["height"]], out=xyxy)
            targets[image_id] = (xyxy, np.asarray(labels[image_id], dtype=np.int64))
        return targets

    def _pose(self, ann: dict) -> np.ndarray:
        """[K, 3] float32 keypoints of an annotation (all v=0 when it has none); a wrong length is an error."""
        k = len(self.keypoint_names)
        values = ann.get("keypoints") or [0.0] * (3 * k)
        if len(values) != 3 * k or not all(is_number(v) for v in values):
            raise UsageError(f"annotation {ann.get('id')} in {self.ann_file}: 'keypoints' holds {len(values)} values; "
                             f"expected {3 * k} numbers (x, y, v for each of the category's {k} keypoints)")
        points = np.asarray(values, dtype=np.float32).reshape(k, 3)
        points[points[:, 2] <= 0] = 0.0
        return points

    def _count(self, reason: str, count: int) -> None:
        if count:
            self.skipped[reason] = self.skipped.get(reason, 0) + count

    def skip_summary(self) -> str:
        """One line naming what skip_invalid dropped, or "" when nothing was."""
        if not self.skipped:
            return ""
        parts = ", ".join(f"{count} ({reason})" for reason, count in self.skipped.items())
        return f"{self.ann_file}: skipped {parts} (data.skip_invalid: true)"

    def label_to_category(self, label: int) -> int:
        """The COCO category id of contiguous label ``label``."""
        return self.category_ids[int(label)]

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> tuple:
        """The raw pair: the PIL RGB image and its target with absolute xyxy boxes."""
        image_id = self.ids[index]
        image = load_rgb(str(self.image_dir / self.coco.imgs[image_id]["file_name"]))
        boxes, labels = self.targets[image_id]
        size = torch.tensor([image.height, image.width], dtype=torch.int64)
        target = {"boxes": torch.from_numpy(boxes.copy()), "labels": torch.from_numpy(labels.copy()),
                  "image_id": image_id, "orig_size": size, "size": size.clone()}
        if self.masks:
            target["masks"] = torch.from_numpy(decode_segmentations(self.segments[image_id], image.height, image.width))
        if self.keypoints:
            poses = self.poses[image_id]
            k = len(self.keypoint_names)
            target["keypoints"] = torch.from_numpy(np.stack(poses) if poses else np.zeros((0, k, 3), np.float32))
            target["area"] = torch.tensor(self.pose_areas[image_id], dtype=torch.float32)
        return image, target

    def __getitem__(self, index: int):
        image, target = self.load(index)
        if self.transform is None:
            return image, target
        return self.transform(image, target)


def decode_segmentations(segmentations: list, height: int, width: int) -> np.ndarray:
    """COCO segmentations (polygon lists, uncompressed RLE with list counts, or compressed RLE) ->
    uint8 [N, height, width] 0/1 masks, as pycocotools rasterises them (a polygon's parts merged)."""
    from pycocotools import mask as coco_mask

    masks = np.zeros((len(segmentations), height, width), dtype=np.uint8)
    for i, segmentation in enumerate(segmentations):
        if isinstance(segmentation, list):  # polygons: one RLE per part, merged
            rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE (crowds are stored so)
            rle = coco_mask.frPyObjects(segmentation, height, width)
        else:
            rle = segmentation
        if list(rle["size"]) != [height, width]:
            raise UsageError(f"an RLE segmentation of size {rle['size']} is on an image of {height}x{width} pixels; "
                             "RLE sizes are [height, width] of their image: re-export the annotations")
        masks[i] = coco_mask.decode(rle)
    return masks

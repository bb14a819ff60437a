"""``dfx data check``: read a detection dataset the way training will and report what is in it
(depth data: dfx.data.depth_check, for a depth recipe or ``task=depth``).

The report names the format, each split's images and boxes (per class), image sizes, and every
problem found. A problem is ``fatal`` when training would fail on it (with the recipe's
``data.skip_invalid``): the same errors training raises, plus images that do not decode.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from dfx.data.coco import MISSING_IMAGE, UNREADABLE_IMAGE, CocoDetection, first
from dfx.data.formats import SPLITS, DetectionData
from dfx.data.images import image_problem, image_size
from dfx.data.keypoints import keypoint_summary
from dfx.engine.progress import track
from dfx.errors import UsageError


def detection_recipe(target: str | Path | None, overrides=()):
    """The detection recipe to read: a recipe file or shipped recipe name, or a data root (or YOLO data.yaml) with
    detection defaults; ``overrides`` apply either way."""
    from dfx.recipe import apply_overrides, build_recipe, find_shipped, load_recipe, read_yaml

    target = Path(target) if target is not None else None
    if target is not None and not target.exists() and find_shipped(target) is not None:
        target = find_shipped(target)  # a shipped recipe by name
    if target is not None and target.suffix in (".yaml", ".yml") and target.is_file() and \
            "names" not in read_yaml(target):  # a YOLO data.yaml has names; a recipe has task and sections
        recipe = load_recipe(target, list(overrides))
        if recipe.task not in ("detection", "depth"):
            raise UsageError(f"{target}: dfx data check reads detection and depth data; this recipe's task is "
                             f"{recipe.task}")
        return recipe
    tree = {"task": "detection"} if target is None else {"task": "detection", "data": {"root": str(target)}}
    return build_recipe(apply_overrides(tree, list(overrides)), name="data-check")


def check_data(target: str | Path | None, overrides=(), decode: bool = True, progress: bool = True) -> dict:
    """The report of :mod:`dfx.data_check` as a dict; ``ok`` is False when training would fail.

    ``decode``: decode every image (slow on large datasets; without it only files that are missing
    or not images are found).
    """
    from dfx.tasks.detection import Task

    recipe = detection_recipe(target, overrides)
    if recipe.task == "depth":
        from dfx.data.depth_check import check_depth

        return check_depth(recipe, decode=decode, progress=progress)
    task, problems = Task(recipe), []
    skip = recipe.data.skip_invalid
    try:
        data = task.data()
    except UsageError as e:  # conversion errors (YOLO labels) stop training; read on to report the rest
        if skip:
            raise
        recipe.data.skip_invalid = True
        data = Task(recipe).data()
        problems.append(_problem("all", "conversion", 1, str(e), fatal=True))
    report = {"root": str(data.root) if data.root else None, "format": data.format, "skip_invalid": skip,
              "splits": {}, "classes": []}
    for split in ("train", "val"):
        if split not in data.splits:
            problems.append(_problem(split, "missing split", 1, f"no {split} split; training needs train and val",
                                     fatal=True))
    classes = None
    for split in [s for s in SPLITS if s in data.splits]:
        source = data.split(split)
        dataset, error = _read_split(source, recipe.data.category_ids, skip, classes)
        if dataset is None:
            problems.append(_problem(split, "annotations", 1, error, fatal=True))
            continue
        if error:
            problems.append(_problem(split, "annotations", 1, error, fatal=True))
        classes = classes or dataset.classes
        stats, split_problems = _split_report(split, dataset, source.skipped, decode, progress, skip)
        masks, mask_problems = _mask_report(split, dataset, bool(getattr(recipe.model, "masks", False)))
        report["splits"][split] = {**stats, **masks}
        problems += split_problems + mask_problems
    report["classes"] = classes or []
    report["problems"] = problems
    report["ok"] = not any(p["fatal"] for p in problems)
    return report


def _read_split(source, category_ids, skip: bool, classes):
    """(dataset read with skip_invalid on, the error training would raise or None)."""
    def read(skip_invalid: bool):
        return CocoDetection(source.images, source.ann_file, category_ids=category_ids, skip_invalid=skip_invalid,
                             annotations=source.annotations, classes=classes if category_ids is None else None)

    try:
        return read(skip), None
    except UsageError as e:
        if skip:
            return None, str(e)
        try:
            return read(True), str(e)
        except UsageError as again:
            return None, str(again)


def _problem(split: str, kind: str, count: int, detail: str, fatal: bool) -> dict:
    return {"split": split, "kind": kind, "count": count, "detail": detail, "fatal": fatal}


def _split_report(split: str, dataset: CocoDetection, converted: dict, decode: bool, progress: bool, skip: bool):
    coco = dataset.coco
    problems = []
    per_class = Counter()
    ignored = 0
    overhang = []
    for ann in coco.dataset["annotations"]:
        if ann.get("iscrowd", 0):
            ignored += 1
            continue
        per_class[dataset.classes[dataset.label_of[ann["category_id"]]]] += 1
        image = coco.imgs[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        if x < -0.5 or y < -0.5 or x + w > image.get("width", x + w) + 0.5 or y + h > image.get("height", y + h) + 0.5:
            overhang.append(ann["id"])
    sizes = Counter((im.get("width"), im.get("height")) for im in coco.imgs.values())
    outcome = "dropped under data.skip_invalid" if skip else "training fails on them (data.skip_invalid: true drops them)"
    for reason, count in {**converted, **dataset.skipped}.items():
        if reason == UNREADABLE_IMAGE:
            continue  # named below, with the images that only a decode finds
        names = [f for f, why in dataset.dropped_files.items() if why == "missing"] if reason == MISSING_IMAGE else []
        listed = f": {first(names)}" if names else ""
        problems.append(_problem(split, reason, count, f"{count} x {reason}{listed}; {outcome}", fatal=not skip))
    if overhang:
        problems.append(_problem(split, "box outside image", len(overhang),
                                 f"{len(overhang)} boxes reach outside their image (annotation ids {first(overhang)}); "
                                 "they are clipped to it", fatal=False))
    empty = [name for name in dataset.classes if not per_class[name]]
    if empty:
        kind = "empty class" if split == "train" else "no ground truth"
        detail = (f"no boxes of {first(empty, 20)} in train: the model cannot learn them" if split == "train" else
                  f"no boxes of {first(empty, 20)} in {split}: they get no per-class AP")
        problems.append(_problem(split, kind, len(empty), detail, fatal=False))
    unreadable = [f"{name} ({why})" for name, why in dataset.dropped_files.items() if why != "missing"]
    fatal = bool(unreadable) and not skip
    if decode:
        resized = []
        for image_id in track(dataset.ids, len(dataset.ids), f"reading {split} images", enabled=progress):
            record = coco.imgs[image_id]
            path = dataset.image_dir / record["file_name"]
            reason = image_problem(path)
            if reason:  # kept by the quick check, fails to decode: training would stop on it
                unreadable.append(f"{record['file_name']} ({reason})")
                fatal = True
            elif "width" in record and image_size(path) != (record["width"], record["height"]):
                resized.append(record["file_name"])
        if resized:
            problems.append(_problem(split, "image size", len(resized),
                                     f"{len(resized)} images differ in size from their annotation record (EXIF "
                                     f"rotation or re-encoding?): {first(resized)}", fatal=False))
    if unreadable:
        problems.append(_problem(split, UNREADABLE_IMAGE, len(unreadable),
                                 f"{len(unreadable)} images cannot be read: {first(unreadable)}; replace or remove them",
                                 fatal=fatal))
    stats = {"images": len(dataset), "boxes": sum(per_class.values()), "ignored_boxes": ignored,
             "boxes_per_class": {name: per_class[name] for name in dataset.classes},
             "image_sizes": {f"{w}x{h}": n for (w, h), n in sizes.most_common(5)},
             "image_dir": str(dataset.image_dir), "annotations": str(dataset.ann_file)}
    points = keypoint_summary(coco.dataset["annotations"], coco.dataset["categories"])
    if points is not None:
        stats["keypoints"] = points
        if points["wrong_length"]:
            problems.append(_problem(split, "keypoints", len(points["wrong_length"]),
                                     f"{len(points['wrong_length'])} annotations hold a keypoints list that is not "
                                     f"3 x {len(points['keypoints'])} numbers (ids {first(points['wrong_length'])})",
                                     fatal=False))
    return stats, problems


def _mask_report(split: str, dataset: CocoDetection, required: bool) -> tuple[dict, list[dict]]:
    """Instance masks of the split's non-crowd objects: how many carry one, and the problems:
    objects without (fatal when the recipe trains masks), empty masks (a polygon of fewer than 3
    points, or no pixel), and polygons reaching more than half a pixel outside their image."""
    from pycocotools import mask as coco_mask

    objects = [a for a in dataset.coco.dataset["annotations"] if not a.get("iscrowd", 0)]
    with_mask = [a for a in objects if a.get("segmentation")]
    if not with_mask and not required:
        return {"masks": 0}, []
    problems, empty, outside = [], [], []
    for ann in with_mask:
        image = dataset.coco.imgs[ann["image_id"]]
        height, width = image.get("height"), image.get("width")
        segmentation = ann["segmentation"]
        if isinstance(segmentation, list):
            parts = [p for p in segmentation if len(p) >= 6]
            xs = [v for p in parts for v in p[0::2]]
            ys = [v for p in parts for v in p[1::2]]
            if xs and width and height and (min(xs) < -0.5 or min(ys) < -0.5 or max(xs) > width + 0.5
                                            or max(ys) > height + 0.5):
                outside.append(ann["id"])
            if not parts:
                empty.append(ann["id"])
                continue
            if not height or not width:  # no size to rasterise at
                continue
            rle = coco_mask.merge(coco_mask.frPyObjects(parts, height, width))
        elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
            rle = coco_mask.frPyObjects(segmentation, *segmentation["size"])
        else:
            rle = segmentation
        if int(coco_mask.area(rle)) == 0:
            empty.append(ann["id"])
    missing = [a["id"] for a in objects if not a.get("segmentation")]
    if missing:
        detail = (f"{len(missing)} of {len(objects)} objects have no segmentation (annotation ids {first(missing)})"
                  + ("; model.masks trains on every object's mask: add polygons or RLE, or train boxes only"
                     if required else "; a masks model (model.masks: true) cannot train on them"))
        problems.append(_problem(split, "missing mask", len(missing), detail, fatal=required))
    if empty:
        problems.append(_problem(split, "empty mask", len(empty),
                                 f"{len(empty)} masks have no pixel or fewer than 3 polygon points (annotation ids "
                                 f"{first(empty)}); they teach the model an empty object", fatal=False))
    if outside:
        problems.append(_problem(split, "polygon outside image", len(outside),
                                 f"{len(outside)} polygons reach outside their image (annotation ids {first(outside)}); "
                                 "rasterising clips them", fatal=False))
    return {"masks": len(with_mask)}, problems

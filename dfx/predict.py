"""``dfx predict``: run a trained model on image files and write pictures and machine-readable results.

WEIGHTS is a run directory, a dfx checkpoint or a recipe with ``model.weights=`` (dfx.models.build);
SOURCE is image files, folders or globs. Everything goes to ``runs/predict/<name>[-N]/`` (or ``--out``):

* detection: ``predictions.json`` (COCO results, ``bbox`` x y w h in the original image's pixels,
  exactly as ``dfx eval`` writes them), ``predictions.jsonl`` (one line per image: file, size,
  ``image_id`` and ``detections`` with class, score and xyxy box clipped to the image) and ``images/``
  (the boxes drawn with class and score). A model with masks (MaskDINO) also writes
  ``segm_predictions.json`` (COCO segm results, compressed RLE, scored class x mask score as
  ``dfx eval`` scores them), gives each JSON-lines detection its ``mask_score``, ``area`` and
  ``segmentation`` and draws each mask (tint and outline, one colour per instance). The ids are a dataset's when its COCO annotation file is
  given (``--annotations``) or lies beside the images (Roboflow's ``_annotations.coco.json``):
  images matched by file name, categories by class name, so that ``dfx eval --predictions``
  scores them; for a free folder of photos ``image_id`` is the line's 0-based index in
  ``predictions.jsonl`` and ``category_id`` the class index (or ``data.category_ids``). The summary's
  ``numbering`` says which;
* segmentation and fusion: ``labels/<stem>.png`` (uint8 class ids at the original size; 255 where
  the confidence is below ``conf``), ``images/`` (the classes over the image) and the JSON lines
  (each class's share of the pixels);
* classification: the JSON lines (top-5 classes and scores) and ``images/`` (the top class written
  on the image).
* depth: ``depth/<stem>.png`` (uint16 millimetres) and ``images/`` (the image beside its
  colour-mapped depth); see dfx.predict_depth.
* translation: ``translations/<stem>.png`` (the image produced) and ``images/`` (inputs and output
  side by side); see dfx.predict_translation.

Fusion and translation read one source per modality: SOURCE is the first of ``data.modalities``, ``modalities``
gives the others (``{"depth": ["DIR"]}``); files are paired by name (stem), else in sorted order.
A file that is not a readable image is named, skipped and counted; the JSON lines are written as
the run goes, so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, UnidentifiedImageError

from dfx.data.images import IMAGE_SUFFIXES, read_rgb
from dfx.errors import UsageError
from dfx.predict_depth import DepthPredictor
from dfx.predict_translation import TranslationPredictor

logger = logging.getLogger(__name__)

DEFAULT_CONF = {"detection": 0.25}  # other tasks: 0 (every pixel labelled, top-5 classes listed)


def collect_files(sources: Iterable[str | os.PathLike]) -> list[Path]:
    """Files named by ``sources`` (files, folders: every file in them, globs), in order, each file once."""
    files: list[Path] = []
    seen: set[Path] = set()
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            found = [path]
        elif glob.has_magic(str(source)):
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        else:
            found = None
        if not found:
            what = "is an empty folder" if path.is_dir() else "matches no file" if found is not None else \
                "does not exist"
            raise UsageError(f"SOURCE {source}: {what}; pass image files, folders or globs such as 'photos/*.jpg'")
        for file in found:  # the same file once, however reached (a symlink loop under ``**``)
            key = file.resolve()
            if key not in seen:
                seen.add(key)
                files.append(file)
    return files


def pair_modalities(primary: list[Path], others: dict[str, list[Path]], names: list[str]) -> list[list[Path]]:
    """One list of paths per sample, in ``names`` order: matched by stem, else in sorted order."""
    samples = [[p] for p in primary]
    for name in names[1:]:
        files = others[name]
        by_stem = {f.stem: f for f in files}
        if all(p.stem in by_stem for p in primary):
            matched = [by_stem[p.stem] for p in primary]
        elif len(files) == len(primary):
            matched = files  # both sorted: NYU_color / NYU_depth, SUN_color / SUN_depth ...
        else:
            raise UsageError(f"--modality {name}: {len(files)} files for {len(primary)} {names[0]} images and their "
                             "names do not match; give the same number of files (paired in sorted order) or the "
                             "same file names")
        for sample, path in zip(samples, matched):
            sample.append(path)
    return samples


class Predictor:
    """Per-task reading, forward pass and output of one batch; subclasses fill in the task."""

    def __init__(self, recipe, classes: list[str], conf: float, out: Path):
        self.recipe, self.classes, self.conf, self.out = recipe, classes, conf, out
        self.names: set[str] = set()

    def unique_stem(self, path: Path) -> str:
        stem, n = path.stem, 1
        while stem in self.names:
            n += 1
            stem = f"{path.stem}-{n}"
        self.names.add(stem)
        return stem

    def load(self, paths: list[Path]) -> tuple[np.ndarray, torch.Tensor]:
        """(the picture to draw on, uint8 [H, W, 3]; the model's input tensor)."""
        raise NotImplementedError

    def run(self, model, inputs: list[torch.Tensor], pictures: list[np.ndarray], device) -> list:
        raise NotImplementedError

    def write(self, paths: list[Path], picture: np.ndarray, output) -> dict:
        """Write the files of one image; return its JSON line (without the common fields)."""
        raise NotImplementedError

    def finish(self) -> dict:
        return {}


class DetectionPredictor(Predictor):
    """COCO results numbered by a dataset (:meth:`number_by`) or, for free photos, by file order."""

    def __init__(self, recipe, classes, conf, out):
        from dfx.data.det_transforms import DetectionTransform

        super().__init__(recipe, classes, conf, out)
        data = recipe.data
        self.transform = DetectionTransform(False, scales=data.scales, max_size=data.max_size, mean=data.mean,
                                            std=data.std)
        self.category_ids = list(getattr(data, "category_ids", None) or range(len(classes)))
        self.image_ids: dict[Path, int] | None = None  # file -> the dataset's image id (None: file order)
        self.numbering = {"image_id": "the image's 0-based line in predictions.jsonl (file order)",
                          "category_id": "data.category_ids" if getattr(data, "category_ids", None) else
                          "the class's 0-based index in 'categories'"}
        self.results: list[dict] = []
        self.segm_results: list[dict] | None = [] if getattr(recipe.model, "masks", False) else None

    def number_by(self, ann_file: Path, files: list[Path], found: bool) -> None:
        """Use the image and category ids of the COCO file ``ann_file``: images matched by file name,
        categories by class name. ``found``: the file was found beside the images rather than
        given; files it does not list then keep file-order numbering (with a warning)."""
        try:
            self._number_by(ann_file, files)
        except UsageError as e:
            if not found:
                raise
            logger.warning(f"dfx predict: not numbering by {ann_file} ({e}); the results are numbered by file order")

    def _number_by(self, ann_file: Path, files: list[Path]) -> None:
        from dfx.data.coco import first, named_categories, read_annotation_file

        data = read_annotation_file(ann_file)
        ids_of: dict[str, list[int]] = {}
        for image in data["images"]:
            ids_of.setdefault(Path(str(image["file_name"])).name, []).append(image["id"])
        absent = [f for f in files if f.name not in ids_of]
        if absent:
            raise UsageError(f"--annotations: {len(absent)} of {len(files)} images are not listed in {ann_file} "
                             f"({first(f.name for f in absent)}); predict only that dataset's images, or leave out "
                             "--annotations (file-order numbering)")
        twice = sorted(name for name, ids in ids_of.items() if len(ids) > 1 and any(f.name == name for f in files))
        if twice:
            raise UsageError(f"{ann_file}: file names {first(twice)} are listed under several image ids; "
                             "fix the file so that each image is listed once")
        self.category_ids = named_categories(self.classes, data["categories"], ann_file,
                                             "pass the annotations of the data the model was trained on")
        self.image_ids = {f: ids_of[f.name][0] for f in files}
        self.numbering = {"image_id": f"{ann_file} (matched by file name)",
                          "category_id": f"{ann_file} (matched by class name)"}

    def load(self, paths):
        image = read_rgb(paths[0])
        tensor, _ = self.transform(image, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)})
        return np.asarray(image), tensor

    def run(self, model, inputs, pictures, device):
        from dfx.data.det_transforms import collate_detection
        from dfx.detection import postprocess

        images, masks, _ = collate_detection([(x, None) for x in inputs])
        outputs = model(images.to(device), masks.to(device))
        sizes = torch.tensor([p.shape[:2] for p in pictures], device=device)
        found = postprocess(outputs, sizes, self.recipe.model.detections)
        if "pred_masks" in outputs:  # MaskDINO: each detection's mask, scored as the evaluator scores it
            from dfx.detection.masks import instance_masks

            seen = torch.tensor([x.shape[-2:] for x in inputs], device=device)
            found_masks, mask_scores = instance_masks(outputs["pred_masks"], [d["queries"] for d in found], seen,
                                                      sizes)
            for d, m, s in zip(found, found_masks, mask_scores):
                d["masks"], d["mask_scores"] = m, d["scores"] * s
        if "pred_keypoints" in outputs:  # ED-Pose: each detection's keypoints in pixels
            from dfx.detection.keypoints import detection_keypoints

            for d, points in zip(found, detection_keypoints(outputs["pred_keypoints"], found, sizes)):
                d["keypoints"] = points
        return [{k: v[d["scores"] >= self.conf].cpu() for k, v in d.items()} for d in found]

    def write(self, paths, picture, output):
        from dfx.data.coco_eval import to_coco_results

        image_id = len(self.names) if self.image_ids is None else self.image_ids[paths[0]]
        # the results exactly as `dfx eval` writes them (boxes unclipped, scores unrounded): same AP
        results = to_coco_results([image_id], [output["boxes"]], [output["scores"]], [output["labels"]],
                                  self.category_ids)
        if "keypoints" in output:  # COCO keypoint results (the box beside them), as dfx eval scores them
            for entry, points in zip(results, output["keypoints"]):
                entry["keypoints"] = [round(float(v), 2) for v in torch.cat((points, torch.ones(len(points), 1)), 1)
                                      .flatten()]
        self.results += results
        height, width = picture.shape[:2]
        boxes = output["boxes"].clamp(min=0)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(max=width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(max=height)
        detections = [{"class": self.classes[int(k)], "class_id": int(k), "score": round(float(s), 5),
                       "box": [round(float(v), 2) for v in box]}
                      for box, s, k in zip(boxes, output["scores"], output["labels"])]
        if "masks" in output:
            self._add_masks(image_id, output, detections)
        for detection, entry in zip(detections, results if "keypoints" in output else []):
            detection["keypoints"] = entry["keypoints"]
        name = self.unique_stem(paths[0])
        if "masks" in output:
            picture = draw_masks(picture, output["masks"].numpy())
        drawn = draw_boxes(picture, detections, self.classes)
        if "keypoints" in output:
            from dfx.data.keypoints import known_skeleton

            skeleton = known_skeleton(self.recipe.data.root, self.recipe.model.keypoints)
            draw_skeletons(drawn, [d["keypoints"] for d in detections], skeleton)
        drawn.save(self.out / "images" / f"{name}.jpg", quality=90)
        return {"image_id": image_id, "detections": detections}

    def _add_masks(self, image_id: int, output: dict, detections: list[dict]) -> None:
        """COCO segm results of the image (compressed RLE, scored class x mask score as ``dfx eval``
        scores them) and each JSON-lines detection's ``mask_score``, ``area`` and ``segmentation``."""
        from dfx.data.coco_eval import to_coco_segm_results

        segm = to_coco_segm_results([image_id], [output["masks"]], [output["mask_scores"]], [output["labels"]],
                                    self.category_ids)
        self.segm_results += segm
        for detection, result, mask in zip(detections, segm, output["masks"]):
            detection.update({"mask_score": round(float(result["score"]), 5), "area": int(mask.sum()),
                              "segmentation": result["segmentation"]})

    def finish(self):
        from dfx.data.coco_eval import write_results

        write_results(self.out / "predictions.json", self.results)
        categories = [{"id": int(c), "name": name} for c, name in zip(self.category_ids, self.classes)]
        files = {"predictions": str(self.out / "predictions.json")}
        if self.segm_results is not None:  # MaskDINO: the masks as COCO segm results (dfx eval --predictions)
            write_results(self.out / "segm_predictions.json", self.segm_results)
            files["segm_predictions"] = str(self.out / "segm_predictions.json")
        return {**files, "numbering": {**self.numbering, "categories": categories}}


class SegmentationPredictor(Predictor):
    def __init__(self, recipe, classes, conf, out):
        from dfx.data.segmentation import SegmentationTransform

        super().__init__(recipe, classes, conf, out)
        data = recipe.data
        self.transform = SegmentationTransform(data.image_size, False, mean=data.mean, std=data.std)

    def load(self, paths):
        image = read_rgb(paths[0])
        tensor, _ = self.transform(image, np.zeros((image.height, image.width), dtype=np.uint8))
        return np.asarray(image), tensor

    def logits(self, model, batch):
        return model(batch)

    def run(self, model, inputs, pictures, device):
        logits = self.logits(model, torch.stack(inputs).to(device)).float()
        maps = []
        for one, picture in zip(logits, pictures):  # each image back to its own size
            probs = F.interpolate(one[None], size=picture.shape[:2], mode="bilinear", align_corners=False)[0]
            probs = probs.softmax(0)
            score, label = probs.max(0)
            maps.append(label.masked_fill(score < self.conf, 255).to(torch.uint8).cpu().numpy())
        return maps

    def write(self, paths, picture, label_map):
        from dfx.data.segmentation import IGNORE_INDEX

        name = self.unique_stem(paths[0])
        Image.fromarray(label_map).save(self.out / "labels" / f"{name}.png")
        overlay_classes(picture, label_map, len(self.classes)).save(self.out / "images" / f"{name}.jpg", quality=90)
        ids, counts = np.unique(label_map, return_counts=True)
        shares = {self.classes[int(i)]: round(float(c) / label_map.size, 5)
                  for i, c in zip(ids, counts) if i != IGNORE_INDEX}
        return {"label_map": f"labels/{name}.png", "classes": shares}


class FusionPredictor(SegmentationPredictor):
    def __init__(self, recipe, classes, conf, out):
        from dfx.data.multimodal import MultiModalTransform

        Predictor.__init__(self, recipe, classes, conf, out)
        data = recipe.data
        self.transform = MultiModalTransform(data.size, False, mean=data.mean, std=data.std, normalize=data.normalize)
        self.depth = data.depth

    def load(self, paths):
        from dfx.data.depth import read_aligned

        images = read_aligned(paths, self.depth)
        tensor, _ = self.transform(images, np.zeros(images[0].shape[:2], dtype=np.uint8))
        return images[0].clip(0, 255).astype(np.uint8), tensor  # [M, 3, h, w]

    def write(self, paths, picture, label_map):
        return {**super().write(paths, picture, label_map), "files": [str(p) for p in paths]}


class ClassificationPredictor(Predictor):
    def __init__(self, recipe, classes, conf, out):
        from dfx.tasks.classification import transforms

        super().__init__(recipe, classes, conf, out)
        self.transform = transforms(recipe.data, training=False)

    def load(self, paths):
        image = read_rgb(paths[0])
        return np.asarray(image), self.transform(image)

    def run(self, model, inputs, pictures, device):
        probs = model(torch.stack(inputs).to(device)).float().softmax(-1).cpu()
        scores, labels = probs.topk(min(5, probs.shape[-1]), dim=-1)
        return list(zip(scores, labels))

    def write(self, paths, picture, output):
        scores, labels = output
        top = [{"class": self.classes[int(k)], "class_id": int(k), "score": round(float(s), 5)}
               for i, (s, k) in enumerate(zip(scores, labels)) if i == 0 or s >= self.conf]
        image = Image.fromarray(picture)
        ImageDraw.Draw(image).text((4, 4), f"{top[0]['class']} {top[0]['score']:.2f}", fill=(255, 255, 0),
                                   stroke_width=2, stroke_fill=(0, 0, 0), font_size=max(10, image.height // 20))
        image.save(self.out / "images" / f"{self.unique_stem(paths[0])}.jpg", quality=90)
        return {"top": top}


PREDICTORS = {"detection": DetectionPredictor, "segmentation": SegmentationPredictor, "fusion": FusionPredictor,
              "classification": ClassificationPredictor, "distillation": ClassificationPredictor,
              "depth": DepthPredictor, "translation": TranslationPredictor}


def _colours(count: int) -> np.ndarray:
    from dfx.detection.plots import class_colours

    return (np.asarray([c[:3] for c in class_colours(count)]) * 255).round().astype(np.uint8)


def draw_boxes(picture: np.ndarray, detections: list[dict], classes: list[str]) -> Image.Image:
    """The image with each detection's box and "class score", one colour per class."""
    image = Image.fromarray(picture)
    draw = ImageDraw.Draw(image)
    colours = _colours(len(classes))
    line = max(2, round(max(image.size) / 400))
    font_size = max(10, round(max(image.size) / 60))
    for d in detections:
        colour = tuple(int(c) for c in colours[d["class_id"]])
        x0, y0, x1, y1 = d["box"]
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line)
        text = f"{d['class']} {d['score']:.2f}"
        left, top, right, bottom = draw.textbbox((x0, y0), text, font_size=font_size)
        lift = bottom - top + 2 if y0 >= bottom - top + 2 else 0  # above the box, inside it at the top edge
        draw.rectangle((left, top - lift, right + 2, bottom - lift), fill=colour)
        draw.text((x0 + 1, y0 - lift), text, fill=(255, 255, 255), font_size=font_size)
    return image


def draw_masks(picture: np.ndarray, masks: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The image with each instance mask (bool [N, H, W]) tinted and outlined in a colour of its own;
    later masks are drawn over earlier ones."""
    colours = _colours(max(len(masks), 1))
    tinted = picture.astype(np.float32)
    for mask, colour in zip(masks, colours):
        tinted[mask] = (1 - alpha) * tinted[mask] + alpha * colour
        inner = mask.copy()  # a pixel of the mask with a 4-neighbour outside it is on the outline
        inner[1:] &= mask[:-1]
        inner[:-1] &= mask[1:]
        inner[:, 1:] &= mask[:, :-1]
        inner[:, :-1] &= mask[:, 1:]
        tinted[mask & ~inner] = colour
    return tinted.round().astype(np.uint8)


def draw_skeletons(image: Image.Image, poses: list[list[float]], skeleton) -> None:
    """Draw each pose ([x, y, v] * K in pixels) on ``image``: its ``skeleton`` pairs as lines, its
    keypoints as dots (left/right and centre keypoints alike, one colour per pose)."""
    draw = ImageDraw.Draw(image)
    colours = _colours(max(len(poses), 1))
    line = max(1, round(max(image.size) / 300))
    for pose, colour in zip(poses, colours):
        colour = tuple(int(c) for c in colour)
        points = [(pose[i], pose[i + 1]) for i in range(0, len(pose), 3)]
        for a, b in skeleton:
            draw.line([points[a], points[b]], fill=colour, width=line)
        for x, y in points:
            draw.ellipse((x - 2 * line, y - 2 * line, x + 2 * line, y + 2 * line), fill=(255, 255, 255), outline=colour)


def overlay_classes(picture: np.ndarray, label_map: np.ndarray, num_classes: int, alpha: float = 0.5) -> Image.Image:
    """The image with each pixel tinted by its class colour (255: left as is)."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[:num_classes] = _colours(num_classes)
    tinted = picture.astype(np.float32)
    labelled = label_map != 255
    tinted[labelled] = (1 - alpha) * tinted[labelled] + alpha * palette[label_map[labelled]]
    return Image.fromarray(tinted.round().astype(np.uint8))


def predict(weights: str | os.PathLike, sources: list[str], *, modalities: dict[str, list[str]] | None = None,
            out: str | os.PathLike | None = None, conf: float | None = None, batch: int = 4,
            overrides: Iterable[str] = (), device: str = "auto", quiet: bool = False,
            annotations: str | os.PathLike | None = None) -> dict:
    """Run the model of ``weights`` on ``sources``; returns a summary (output folder, counts, files).

    ``annotations``: detection: the COCO file whose image and category ids the results take (default:
    a COCO export's annotation file beside the images, if there is one); see :meth:`DetectionPredictor.number_by`.
    """
    from dfx.engine import distributed as D
    from dfx.engine.progress import track
    from dfx.engine.rundir import new_run_dir
    from dfx.models import build

    if batch < 1:
        raise UsageError(f"--batch: expected a positive batch size, got {batch}")
    if conf is not None and not 0 <= conf <= 1:
        raise UsageError(f"--conf: expected a score threshold in [0, 1], got {conf}")
    recipe, task, model, meta = build(weights, overrides)
    if not meta and not recipe.model.weights:
        raise UsageError(f"{weights}: a recipe predicts with the weights named by model.weights; pass "
                         "model.weights=FILE, or a run directory or dfx checkpoint")
    if recipe.task not in PREDICTORS:
        raise UsageError(f"dfx predict does not handle task {recipe.task!r}; it handles {', '.join(PREDICTORS)}")
    if annotations is not None and recipe.task != "detection":
        raise UsageError(f"--annotations numbers detection results; this model's task is {recipe.task}")
    if annotations is not None and not Path(annotations).is_file():
        raise UsageError(f"--annotations {annotations}: no such file; pass the COCO annotation JSON of the images")
    samples = _samples(recipe, sources, modalities or {})
    ann_file = Path(annotations) if annotations is not None else None
    if recipe.task == "detection":
        ann_file = ann_file or _annotations_beside([s[0] for s in samples])
        samples = [s for s in samples if ann_file is None or s[0].resolve() != ann_file.resolve()]
    device = D.resolve_device(device)
    model.to(device)
    conf = DEFAULT_CONF.get(recipe.task, 0.0) if conf is None else conf
    predictor = PREDICTORS[recipe.task](recipe, task.classes, conf, Path("."))
    if ann_file is not None:  # checked before anything is written
        predictor.number_by(ann_file, [s[0] for s in samples], found=annotations is None)
    folder = predictor.out = new_run_dir("predict", recipe.name, out, resumable=False)
    (folder / "images").mkdir()
    if recipe.task in ("segmentation", "fusion"):
        (folder / "labels").mkdir()
    skipped: list[dict] = []
    done, t0 = 0, time.perf_counter()
    lines = folder / "predictions.jsonl"
    with lines.open("w") as stream, torch.inference_mode():
        for start in track(range(0, len(samples), batch), description=f"predict (batches of {batch})",
                           enabled=not quiet):
            chunk, pictures, inputs = _read_batch(predictor, samples[start:start + batch], skipped)
            if chunk:
                outputs = predictor.run(model, inputs, pictures, device)
                for paths, picture, output in zip(chunk, pictures, outputs):
                    line = {"file": str(paths[0]), "width": picture.shape[1], "height": picture.shape[0],
                            **predictor.write(paths, picture, output)}
                    stream.write(json.dumps(line) + "\n")
                stream.flush()
                done += len(chunk)
    if not done:
        raise UsageError(f"dfx predict: none of the {len(samples)} files could be read as an image (first: "
                         f"{skipped[0]['file']}: {skipped[0]['reason']}); pass image files, folders or globs")
    files = {"results": str(lines), "pictures": str(folder / "images"), **predictor.finish()}
    if recipe.task in ("segmentation", "fusion"):
        files["labels"] = str(folder / "labels")
    summary = {"task": recipe.task, "out": str(folder), "images": done, "skipped": len(skipped),
               "skipped_files": skipped, "conf": conf, "elapsed_s": round(time.perf_counter() - t0, 3), **files}
    if recipe.task == "detection":
        summary["detections"] = len(predictor.results)
    return summary


def _annotations_beside(files: list[Path]) -> Path | None:
    """The annotation file of a COCO export (Roboflow's ``_annotations.coco.json``...) in the one folder
    that holds ``files``, if there is one."""
    from dfx.data.formats import EXPORT_FILES

    folders = {f.parent for f in files}
    if len(folders) != 1:
        return None
    folder = folders.pop()
    return next((folder / name for name in EXPORT_FILES if (folder / name).is_file()), None)


def _read_batch(predictor: Predictor, samples: list[list[Path]], skipped: list[dict]):
    """(paths, pictures, input tensors) of the readable samples; the others are named and added to ``skipped``."""
    chunk, pictures, inputs = [], [], []
    for paths in samples:
        try:
            picture, tensor = predictor.load(paths)
        except (OSError, ValueError, UsageError, Image.DecompressionBombError) as e:
            reason = _reason(paths, e)
            skipped.append({"file": str(paths[0]), "reason": reason})
            logger.warning(f"dfx predict: skipped {paths[0]}: {reason}")
            continue
        chunk.append(paths)
        pictures.append(picture)
        inputs.append(tensor)
    return chunk, pictures, inputs


def _samples(recipe, sources: list[str], modalities: dict[str, list[str]]) -> list[list[Path]]:
    if not sources:
        raise UsageError("dfx predict: no SOURCE given; pass image files, folders or globs")
    primary = collect_files(sources)
    if recipe.task not in ("fusion", "translation"):
        if modalities:
            raise UsageError(f"--modality is for fusion models; this model's task is {recipe.task}")
        return [[p] for p in primary]
    names = list(recipe.data.modalities)
    unknown = sorted(set(modalities) - set(names[1:]))
    missing = [n for n in names[1:] if n not in modalities]
    if unknown or missing:
        raise UsageError(f"--modality: the model reads {', '.join(names)} (SOURCE is {names[0]}); "
                         + (f"unknown {', '.join(unknown)}; " if unknown else "")
                         + (f"pass {' '.join(f'--modality {n}=DIR' for n in missing)}" if missing else "")
                         .rstrip("; "))
    return pair_modalities(primary, {n: collect_files(modalities[n]) for n in names[1:]}, names)


def _reason(paths: list[Path], error: BaseException) -> str:
    bad = [p for p in paths if p.suffix.lower() not in IMAGE_SUFFIXES]
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, UnidentifiedImageError) or bad:
        return f"not an image ({bad[0].name if bad else paths[0].name})"
    return text

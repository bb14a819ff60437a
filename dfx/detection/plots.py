"""Detection plots for the run directory: precision-recall curves and predictions drawn on images.

Figures are built with matplotlib's object API (no pyplot state, so safe beside training threads)
and written atomically (temporary file, then rename), like results.png.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dfx.files import save_figure

MAX_LEGEND_CLASSES = 10  # past this many classes the per-class curves are thin grey lines without a legend


def class_colours(count: int) -> list:
    """One RGBA colour per class: tab10 up to 10 classes, tab20 up to 20, then a hue wheel."""
    from matplotlib import colormaps

    if count <= 10:
        return [colormaps["tab10"](i) for i in range(count)]
    if count <= 20:
        return [colormaps["tab20"](i) for i in range(count)]
    return [colormaps["hsv"](i / count) for i in range(count)]


def precision_curve(cocoeval, iou: float) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Precision [R, K] at the IoU threshold nearest ``iou`` (all areas, most detections), the
    recall points [R], and the indices of the categories that have ground truth."""
    t = int(np.argmin(np.abs(cocoeval.params.iouThrs - iou)))
    precision = cocoeval.eval["precision"][t, :, :, 0, -1]  # [R, K]; -1 where a class has no ground truth
    with_gt = [k for k in range(precision.shape[1]) if (precision[:, k] > -1).any()]
    return precision, np.asarray(cocoeval.params.recThrs), with_gt


def plot_pr_curve(cocoeval, path: str | Path, iou: float = 0.5) -> None:
    """PNG of precision against recall at IoU ``iou``: one curve per class, their mean in bold,
    and the mean at IoU 0.75 dashed. ``cocoeval``: an evaluated and accumulated COCOeval."""
    from matplotlib.figure import Figure

    precision, recall, with_gt = precision_curve(cocoeval, iou)
    precision_75, _, with_gt_75 = precision_curve(cocoeval, 0.75)
    names = [cocoeval.cocoGt.cats[c]["name"] for c in cocoeval.params.catIds]
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    few = len(with_gt) <= MAX_LEGEND_CLASSES
    colours = class_colours(len(names))
    for k in with_gt:
        curve = precision[:, k]
        if few:
            ax.plot(recall, curve, linewidth=1, color=colours[k], label=f"{names[k]} {curve.mean():.3f}")
        else:
            ax.plot(recall, curve, linewidth=0.5, color="grey", alpha=0.4)
    if with_gt:
        mean = precision[:, with_gt].mean(1)
        ax.plot(recall, mean, linewidth=2.5, color="black", label=f"all classes {mean.mean():.3f} (IoU {iou:g})")
    if with_gt_75:
        mean_75 = precision_75[:, with_gt_75].mean(1)
        ax.plot(recall, mean_75, linewidth=2, linestyle="--", color="black",
                label=f"all classes {mean_75.mean():.3f} (IoU 0.75)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"precision-recall, IoU {iou:g} (legend: AP per curve)", fontsize=10)
    ax.grid(alpha=0.3)
    if with_gt:
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    save_figure(fig, path)


def draw_predictions(images: list[np.ndarray], predictions: list[dict], class_names: list[str], path: str | Path,
                     score_threshold: float = 0.3, targets: list[dict] | None = None) -> None:
    """PNG grid of ``images`` (uint8 [H, W, 3]) with their predicted boxes.

    ``predictions``: per image ``{"boxes": [N, 4] absolute xyxy, "scores": [N], "labels": [N]}``
    (tensors or arrays); boxes scoring below ``score_threshold`` are not drawn. Each class has its
    own colour; a prediction is a solid box labelled "name score". ``targets`` (optional, per image
    ``{"boxes", "labels"}`` in the same pixels): ground truth, drawn dashed.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    count = len(images)
    cols = max(1, math.ceil(math.sqrt(count)))
    rows = max(1, math.ceil(count / cols))
    fig = Figure(figsize=(3 * cols, 3 * rows))
    colours = class_colours(len(class_names))
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.axis("off")
        if i >= count:
            continue
        ax.imshow(images[i])
        if targets is not None:
            for box, label in zip(_numpy(targets[i]["boxes"]).reshape(-1, 4), _numpy(targets[i]["labels"])):
                x0, y0, x1, y1 = box.tolist()
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, linestyle="--", linewidth=1,
                                       edgecolor=colours[int(label)]))
        prediction = predictions[i]
        boxes = _numpy(prediction["boxes"]).reshape(-1, 4)
        for box, score, label in zip(boxes, _numpy(prediction["scores"]), _numpy(prediction["labels"])):
            if score < score_threshold:
                continue
            x0, y0, x1, y1 = box.tolist()
            colour = colours[int(label)]
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, linewidth=1.5, edgecolor=colour))
            ax.text(x0, y0, f"{class_names[int(label)]} {float(score):.2f}", fontsize=6, color="white",
                    verticalalignment="bottom", bbox={"facecolor": colour, "edgecolor": "none", "pad": 1, "alpha": 0.8})
    title = f"predictions (score >= {score_threshold:g})" + ("; ground truth dashed" if targets is not None else "")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def _numpy(values) -> np.ndarray:
    """A tensor (any device) or list as a numpy array."""
    return np.asarray(values.detach().cpu() if hasattr(values, "detach") else values)

"""``dfx data check`` for depth data: read the pairs as training will and report what the depth holds.

Per split: the pairs, image sizes, the share of pixels with a return (valid), the range of depth
in metres as the recipe decodes it, and the raw values' storage (16-bit, 8-bit). A **unit
guess** reads the raw 16-bit values under the common conventions (millimetres, TUM's 1/5000 m,
KITTI's 1/256 m, SUN RGB-D's rotated bits) and names the ones that put the median depth in a
plausible 0.3-30 m; the configured reading is flagged when it is not among them. Problems that
stop training (missing or unreadable files, sizes that differ) are fatal.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from PIL import Image

from dfx.data.depth import DEPTH_MODES, DepthFormat, raw_to_metres
from dfx.errors import UsageError

# name -> (recipe overrides that select it, how raw 16-bit values become metres)
READINGS = {
    "millimetres": ("data.depth_encoding=linear data.depth_scale=1000", DepthFormat("linear", 1000)),
    "1/5000 m (TUM RGB-D)": ("data.depth_encoding=linear data.depth_scale=5000", DepthFormat("linear", 5000)),
    "1/256 m (KITTI)": ("data.depth_encoding=linear data.depth_scale=256", DepthFormat("linear", 256)),
    "SUN RGB-D (rotated bits, mm)": ("data.depth_encoding=sunrgbd", DepthFormat("sunrgbd")),
}
PLAUSIBLE_MEDIAN_M = (0.3, 30.0)
MAX_SAMPLES = 200  # pairs read per split for the statistics (evenly spaced)


def check_depth(recipe, decode: bool = True, progress: bool = True) -> dict:
    """The report as a dict (``ok`` False when training would fail); see the module docstring."""
    from dfx.engine.progress import track
    from dfx.tasks.depth import Task

    data = recipe.data
    report = {"task": "depth", "root": data.root, "format": "RGB + depth pairs", "classes": [], "splits": {},
              "reading": _describe(data.depth), "problems": []}
    raw_values: list[np.ndarray] = []
    task = Task(recipe)
    for split in ("train", "val"):
        try:
            dataset = task.dataset(split)
        except UsageError as e:
            report["problems"].append(_problem(split, "pairs", str(e), fatal=True))
            continue
        dataset.transform = None
        stats = {"pairs": len(dataset), "split_file": data.train_split if split == "train" else data.val_split}
        report["splits"][split] = stats
        if not decode:
            continue
        picks = np.unique(np.linspace(0, len(dataset) - 1, min(len(dataset), MAX_SAMPLES)).round().astype(int))
        sizes, modes, valid, pixels, medians, lows, highs, failed = Counter(), Counter(), 0, 0, [], [], [], []
        for index in track(picks.tolist(), len(picks), f"reading {split} pairs", enabled=progress):
            try:
                image, metres = dataset.load(index)
            except UsageError as e:
                failed.append(str(e))
                continue
            depth_path = dataset.samples[index][1]
            with Image.open(depth_path) as raw:
                modes[raw.mode] += 1
                if raw.mode in DEPTH_MODES:
                    values = np.asarray(raw)
                    raw_values.append(values[values > 0][::97])  # a thin sample for the unit guess
            sizes[f"{image.shape[1]}x{image.shape[0]}"] += 1
            good = metres[metres > 0]
            valid += good.size
            pixels += metres.size
            if good.size:
                medians.append(float(np.median(good)))
                lows.append(float(good.min()))
                highs.append(float(good.max()))
        if failed:
            report["problems"].append(_problem(split, "unreadable pair", f"{len(failed)} pairs cannot be used: "
                                               f"{failed[0]}", fatal=True))
        stats.update({"checked": int(len(picks)), "image_sizes": dict(sizes.most_common(5)),
                      "depth_storage": dict(modes), "valid_fraction": round(valid / pixels, 4) if pixels else 0.0,
                      "depth_m": {"min": round(min(lows), 4), "median": round(float(np.median(medians)), 4),
                                  "max": round(max(highs), 4)} if medians else None})
        if pixels and not valid:
            report["problems"].append(_problem(split, "no depth", "no pixel has a return (all zeros): check "
                                               "data.depths and the depth files", fatal=True))
        elif medians and max(highs) > recipe.eval.max_depth:
            report["problems"].append(_problem(split, "beyond eval.max_depth",
                                               f"depth reaches {max(highs):.3g} m, beyond eval.max_depth "
                                               f"{recipe.eval.max_depth:g}: those pixels are not scored (and a "
                                               f"metric model caps at model.max_depth {recipe.model.max_depth:g})",
                                               fatal=False))
    if raw_values:
        report["unit"] = unit_guess(np.concatenate(raw_values), data.depth)
        if not report["unit"]["configured_plausible"]:
            report["problems"].append(_problem("all", "unit", report["unit"]["advice"], fatal=False))
    report["ok"] = not any(p["fatal"] for p in report["problems"])
    return report


def unit_guess(raw: np.ndarray, configured: DepthFormat) -> dict:
    """The median depth of ``raw`` (non-zero 16-bit values) under each common reading, and which fit."""
    def median_of(fmt: DepthFormat) -> float:
        metres = raw_to_metres(raw, fmt)
        metres = metres[metres > 0]
        return float(np.median(metres)) if metres.size else 0.0

    low, high = PLAUSIBLE_MEDIAN_M
    medians = {name: round(median_of(fmt), 3) for name, (_, fmt) in READINGS.items()}
    plausible = [name for name, m in medians.items() if low <= m <= high]
    mine = round(median_of(configured), 3)
    fits = low <= mine <= high
    advice = (f"as configured ({_describe(configured)}) the median depth is {mine:g} m; "
              + (f"plausible readings: {', '.join(f'{n} ({medians[n]:g} m: {READINGS[n][0]})' for n in plausible)}"
                 if plausible else "no common reading gives a plausible median; check the files"))
    return {"raw_median": float(np.median(raw)), "configured_median_m": mine, "configured_plausible": fits,
            "median_m_by_reading": medians, "plausible": plausible, "advice": advice}


def _describe(fmt: DepthFormat) -> str:
    if fmt.encoding == "linear":
        return f"16-bit linear, {fmt.scale:g} units per metre; 8-bit as value * {fmt.max_metres:g} / 255 m"
    return f"16-bit {fmt.encoding}"


def _problem(split: str, kind: str, detail: str, fatal: bool) -> dict:
    return {"split": split, "kind": kind, "count": 1, "detail": detail, "fatal": fatal}


def report_lines(report: dict) -> list[str]:
    """The human-readable table of a depth report, one line each (the CLI prints them)."""
    lines = [f"{report['root']}: {report['format']} (depth read as {report['reading']})"]
    for split, stats in report["splits"].items():
        line = f"{split}: {stats['pairs']} pairs"
        if stats.get("depth_m"):
            d = stats["depth_m"]
            sizes = ", ".join(f"{k} ({n})" for k, n in stats["image_sizes"].items())
            line += (f"; {100 * stats['valid_fraction']:.1f}% of pixels valid; depth {d['min']:g}-{d['max']:g} m "
                     f"(median {d['median']:g}); sizes {sizes}; checked {stats['checked']}")
        lines.append(line)
    if "unit" in report:
        unit = report["unit"]
        lines.append(f"unit: {'ok' if unit['configured_plausible'] else 'suspect'} -- {unit['advice']}")
    return lines

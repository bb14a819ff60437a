"""``dfx data check`` for depth data: read the pairs as training will and report what the depth holds.

Per split: the pairs, image sizes, the share of pixels with a return (valid), the range of depth
in metres as the recipe decodes it, and the raw values' storage (16-bit, 8-bit). A **unit
guess** reads the raw 16-bit values under the common conventions (millimetres, TUM's 1/5000 m,
KITTI's 1/256 m, SUN RGB-D's rotated bits, NYU's raw Kinect frames) from their signatures
(:func:`unit_guess`); the configured reading is flagged, with the override to set, when it differs. Problems that
stop training (missing or unreadable files, sizes that differ) are fatal.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from PIL import Image

from dfx.data.depth import DEPTH_MODES, NYU_NO_RETURN, DepthFormat, raw_to_metres
from dfx.errors import UsageError

# name -> (recipe overrides that select it, how raw 16-bit values become metres)
READINGS = {
    "NYU raw Kinect (.pgm)": ("data.depth_encoding=nyu-raw", DepthFormat("nyu-raw")),
    "millimetres": ("data.depth_encoding=linear data.depth_scale=1000", DepthFormat("linear", 1000)),
    "1/5000 m (TUM RGB-D)": ("data.depth_encoding=linear data.depth_scale=5000", DepthFormat("linear", 5000)),
    "1/256 m (KITTI)": ("data.depth_encoding=linear data.depth_scale=256", DepthFormat("linear", 256)),
    "SUN RGB-D (rotated bits, mm)": ("data.depth_encoding=sunrgbd", DepthFormat("sunrgbd")),
}
MAX_SAMPLES = 200  # pairs read per split for the statistics (evenly spaced)


def check_depth(recipe, decode: bool = True, progress: bool = True) -> dict:
    """The report as a dict (``ok`` False when training would fail); see the module docstring."""
    from dfx.engine.progress import track
    from dfx.tasks.depth import Task

    data = recipe.data
    report = {"task": "depth", "root": data.root, "format": "RGB + depth pairs", "classes": [], "splits": {},
              "reading": _describe(data.depth), "problems": []}
    raw_values: list[np.ndarray] = []
    raw_valid = raw_pixels = 0
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
                    raw_valid += int((values > 0).sum())
                    raw_pixels += values.size
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
        report["unit"] = unit_guess(np.concatenate(raw_values), raw_valid / max(raw_pixels, 1), data.depth)
        if not report["unit"]["configured_plausible"]:
            report["problems"].append(_problem("all", "unit", report["unit"]["advice"], fatal=False))
    report["ok"] = not any(p["fatal"] for p in report["problems"])
    return report


def unit_guess(raw: np.ndarray, valid_fraction: float, configured: DepthFormat) -> dict:
    """Which common convention the raw 16-bit values (``raw``: a sample of the non-zero ones) follow.

    Signatures, in order: NYU's raw Kinect frames hold byte-swapped 11-bit values (<= 2047 once
    swapped); SUN RGB-D's rotation leaves the low 3 bits zero for any depth under 8.19 m; a sparse
    map (under 30% of pixels with a return) is LiDAR, KITTI's 1/256 m; otherwise a dense sensor in
    millimetres when that puts the median in 0.3-8 m and the 99th percentile under 15 m, else TUM's
    1/5000 m when that does.
    """
    raw = raw.astype(np.uint16)
    metres = {name: raw_to_metres(raw, fmt) for name, (_, fmt) in READINGS.items()}
    if raw.byteswap().max() <= NYU_NO_RETURN and raw.max() > NYU_NO_RETURN:
        guess, reason = "NYU raw Kinect (.pgm)", "every value is an 11-bit count once its bytes are swapped"
    elif np.mean((raw & 7) == 0) > 0.9:
        guess, reason = "SUN RGB-D (rotated bits, mm)", f"{100 * np.mean((raw & 7) == 0):.0f}% of the values have their low 3 bits zero"
    elif valid_fraction < 0.3:
        guess, reason = "1/256 m (KITTI)", f"only {100 * valid_fraction:.0f}% of the pixels have a return (LiDAR)"
    else:
        dense = [name for name in ("millimetres", "1/5000 m (TUM RGB-D)")
                 if 0.3 <= np.median(metres[name]) <= 8 and np.percentile(metres[name], 99) < 15]
        guess = dense[0] if dense else None
        reason = (f"median {np.median(metres[guess]):.2f} m, 99th percentile {np.percentile(metres[guess], 99):.2f} m "
                  "(a dense indoor sensor)" if guess else "no common reading gives dense indoor depth")
    mine = raw_to_metres(raw, configured)
    fits = guess is not None and _same_reading(READINGS[guess][1], configured)
    fix = READINGS[guess][0] if guess and not fits else None
    advice = f"the files look like {guess} ({reason})" if guess else reason
    if fix:
        advice += f"; the recipe reads {_describe(configured)}: set {fix}"
    return {"guess": guess, "reason": reason, "fix": fix, "configured_plausible": fits,
            "configured_median_m": float(np.median(mine[mine > 0])) if (mine > 0).any() else 0.0, "advice": advice}


def _same_reading(a: DepthFormat, b: DepthFormat) -> bool:
    return a.encoding == b.encoding and (a.encoding != "linear" or a.scale == b.scale)


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

"""``dfx predict`` for depth models: per image a 16-bit depth PNG and a colour-mapped picture.

* ``depth/<stem>.png``: uint16 at the image's own size. A metric model writes millimetres
  (``metres * 1000``, rounded; 0 = no depth, 65535 caps 65.5 m) -- the format sensors and NYU /
  TUM exports use, so dfx reads it back with ``data.depth_scale: 1000``. A ``relative`` model
  knows inverse depth only up to scale and shift: its map is stretched to 1-65535 per image
  (larger = nearer) and the JSON line says so.
* ``images/<stem>.png``: the image and its depth side by side, depth colour-mapped (magma,
  near = bright) between the 2nd and 98th percentiles of the image's inverse depth.
* the JSON line: the files and the predicted depth's min / median / max (metres, metric models).

:class:`DepthPredictor` has the interface of dfx.predict's per-task Predictors (load, run, write,
finish) without importing that module, which lists it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


MM_PER_METRE = 1000.0


def colourize(inverse_depth: np.ndarray) -> np.ndarray:
    """[H, W] inverse depth (any scale) -> uint8 [H, W, 3], magma, the 2nd-98th percentile stretched."""
    from matplotlib import colormaps

    low, high = np.percentile(inverse_depth, [2, 98])
    scaled = np.clip((inverse_depth - low) / max(high - low, 1e-12), 0, 1)
    return (colormaps["magma"](scaled)[..., :3] * 255).round().astype(np.uint8)


class DepthPredictor:
    def __init__(self, recipe, classes, conf, out: Path):
        from dfx.data.depth_pairs import DepthTransform

        self.recipe, self.out = recipe, out
        self.stems: dict[str, int] = {}  # stem -> how many images had it (photos/a.jpg, scans/a.png)
        data = recipe.data
        self.transform = DepthTransform(data.size, False, mean=data.mean, std=data.std)
        self.metric = recipe.model.output != "relative"

    def load(self, paths):
        from dfx.data.images import load_rgb

        picture = np.asarray(load_rgb(paths[0]))
        tensor, _ = self.transform(picture, np.zeros(picture.shape[:2], dtype=np.float32))
        return picture, tensor

    def run(self, model, inputs, pictures, device):
        maps = model(torch.stack(inputs).to(device)).float()
        return [F.interpolate(one[None], size=picture.shape[:2], mode="bilinear", align_corners=False)[0, 0]
                .cpu().numpy() for one, picture in zip(maps, pictures)]

    def write(self, paths, picture, output):
        seen = self.stems[paths[0].stem] = self.stems.get(paths[0].stem, 0) + 1
        name = paths[0].stem if seen == 1 else f"{paths[0].stem}-{seen}"
        (self.out / "depth").mkdir(exist_ok=True)
        if self.metric:
            raw = np.clip(np.round(output * MM_PER_METRE), 0, 65535).astype(np.uint16)
            inverse = 1.0 / np.maximum(output, 1e-6)
            stats = {"unit": "mm", "min_m": round(float(output.min()), 4),
                     "median_m": round(float(np.median(output)), 4), "max_m": round(float(output.max()), 4)}
        else:
            low, high = float(output.min()), float(output.max())
            raw = (1 + np.round((output - low) / max(high - low, 1e-12) * 65534)).astype(np.uint16)
            inverse = output
            stats = {"unit": "relative inverse depth, stretched to 1-65535 (larger = nearer)"}
        Image.fromarray(raw).save(self.out / "depth" / f"{name}.png")
        side_by_side = np.concatenate([picture, colourize(inverse)], axis=1)
        Image.fromarray(side_by_side).save(self.out / "images" / f"{name}.png")
        return {"depth": f"depth/{name}.png", **stats}

    def finish(self):
        return {"depth": str(self.out / "depth")}

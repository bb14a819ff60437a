"""``dfx predict`` for translation models: per sample the translated image and a contact sheet.

* ``translations/<stem>.png``: the ensemble's image (RGB, 8-bit) at the first input's own size;
* ``images/<stem>.png``: the inputs and the translation side by side;
* the JSON line: the files read (one per modality) and written.

The inputs are the model's ``data.modalities``: SOURCE is the first, ``--modality NAME=SOURCE`` each
other (as for fusion models). :class:`TranslationPredictor` has the interface of dfx.predict's
per-task Predictors (load, run, write, finish) without importing that module, which lists it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class TranslationPredictor:
    def __init__(self, recipe, classes, conf, out: Path):
        from dfx.data.translation import TranslationTransform

        self.recipe, self.out = recipe, out
        self.stems: dict[str, int] = {}
        data = recipe.data
        self.transform = TranslationTransform(data.size, False, mean=data.mean, std=data.std)
        self.depth = data.depth

    def load(self, paths):
        from dfx.data.depth import read_aligned

        images = read_aligned(paths, self.depth)
        inputs, _ = self.transform(images, np.zeros_like(images[0]))
        sheet = np.concatenate([image.clip(0, 255).astype(np.uint8) for image in images], axis=1)
        return sheet, inputs

    def run(self, model, inputs, pictures, device):
        images = model(torch.stack(inputs).to(device)).float()
        outputs = []
        for image, sheet in zip(images, pictures):
            size = (sheet.shape[0], sheet.shape[1] // len(self.recipe.data.modalities))
            full = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
            outputs.append(((full.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy())
        return outputs

    def write(self, paths, picture, output):
        seen = self.stems[paths[0].stem] = self.stems.get(paths[0].stem, 0) + 1
        name = paths[0].stem if seen == 1 else f"{paths[0].stem}-{seen}"
        (self.out / "translations").mkdir(exist_ok=True)
        Image.fromarray(output).save(self.out / "translations" / f"{name}.png")
        Image.fromarray(np.concatenate([picture, output], axis=1)).save(self.out / "images" / f"{name}.png")
        return {"translation": f"translations/{name}.png", "files": [str(p) for p in paths]}

    def finish(self):
        return {"translations": str(self.out / "translations")}

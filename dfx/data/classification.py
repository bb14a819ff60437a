"""ImageFolder classification data: ``<root>/train/<class>/*``, ``<root>/val/<class>/*``."""

from __future__ import annotations

from pathlib import Path

from torchvision.datasets import ImageFolder

from dfx.data.images import load_rgb
from dfx.errors import UsageError


def image_folder(root: Path, split: str, transform=None, classes: list[str] | None = None) -> ImageFolder:
    """The ``split`` folder of an ImageFolder tree, with errors that name what is missing.

    ``classes`` (from the train split) fixes the label order so val labels agree with train.
    """
    folder = Path(root) / split
    layout = f"expected {root}/train/<class>/<image> and {root}/val/<class>/<image>"
    if not folder.is_dir():
        raise UsageError(f"data.root: {folder} does not exist; {layout}")
    try:
        dataset = ImageFolder(str(folder), transform=transform, loader=load_rgb)
    except (FileNotFoundError, RuntimeError) as e:
        raise UsageError(f"data.root: {folder}: {e}; {layout}") from None
    if classes is not None and dataset.classes != classes:
        extra = sorted(set(dataset.classes) - set(classes))
        if extra:
            raise UsageError(f"data.root: {folder} has classes not in train/: {', '.join(extra)}")
        # val may lack some classes: remap its labels to the train order
        index = {name: i for i, name in enumerate(classes)}
        dataset.samples = [(p, index[dataset.classes[t]]) for p, t in dataset.samples]
        dataset.targets = [t for _, t in dataset.samples]
        dataset.class_to_idx = {c: index[c] for c in dataset.classes}
        dataset.classes = list(classes)
    return dataset

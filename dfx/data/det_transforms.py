"""DETR-style detection transforms on ``(PIL image, target)`` pairs, and the padding collate.

A target is a dict: ``boxes`` float [N, 4] (absolute pixel xyxy on the way in, normalised cxcywh
in [0, 1] on the way out), ``labels`` int64 [N], ``image_id`` int, ``orig_size`` int64 [2] (h, w of
the image as read), ``size`` int64 [2] (h, w of the transformed, unpadded image), and for instance
segmentation ``masks`` uint8 [N, h, w] (0/1 on the image's pixels), which follow every flip, crop and
resize of the image (nearest-neighbour resizing) and are dropped with their boxes.

Training (DETR's augmentation): with ``color_jitter`` j > 0, brightness, contrast and saturation each
scaled by a factor drawn in [1 - j, 1 + j] (in random order; hue is kept: a class may be a colour);
random horizontal flip; then either (probability ``1 - crop_prob``)
a resize of the shorter side to a random one of ``scales``, capped so the longer side is at most
``max_size``, or (probability ``crop_prob``) a resize of the shorter side to a random one of
``crop_resize`` (uncapped; skipped when null), a random crop whose sides are drawn in
[crop[0], crop[1]] pixels (boxes clipped to it; boxes left with no area are dropped with their
labels), and then that same multi-scale resize. Evaluation: resize the shorter side to max(scales),
with the same cap. Random draws come from torch's global generator (seeded per sample by
dfx.data.seeded), so a sample's augmentation depends only on its seed.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import Tensor

# a box at most this many pixels wide or high after a crop no longer shows its object (the
# reference drops only boxes left with no area)
MIN_BOX_SIDE = 0.0


def resized_shape(height: int, width: int, shorter: int, max_size: int) -> tuple[int, int]:
    """(h, w) with the shorter side ``shorter``, reduced so the longer side is <= ``max_size``.

    DETR's rounding, so that inputs match the reference pixel for pixel: a reduced shorter side is
    rounded, the longer side is truncated (``int``), and an image already at size is left as is.
    """
    short, long = min(height, width), max(height, width)
    if long / short * shorter > max_size:
        shorter = int(round(max_size * short / long))
        if shorter == 0:  # a strip (4000 x 10 px) thinner than a pixel at max_size: 1 px by max_size
            return (1, max_size) if height <= width else (max_size, 1)
    if short == shorter:
        return height, width
    other = max(1, int(shorter * long / short))
    return (shorter, other) if height <= width else (other, shorter)


class DetectionTransform:
    """``(PIL image, target with absolute xyxy boxes) -> (image [3, h, w] float normalised, target)``.

    The output target's boxes are cxcywh normalised by the output (unpadded) size (w, h, w, h).
    """

    def __init__(self, train: bool, scales: list[int], max_size: int, crop: list[int] | None = None,
                 crop_prob: float = 0.5, hflip: float = 0.5, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                 crop_resize: list[int] | None = None, color_jitter: float = 0.0, flip_perm: list[int] | None = None):
        if not scales:
            raise ValueError("scales: expected at least one size for the shorter side")
        if crop is not None and (len(crop) != 2 or not 0 < crop[0] <= crop[1]):
            raise ValueError(f"crop: expected [min, max] side lengths in pixels with 0 < min <= max, got {crop}")
        self.train = train
        self.scales = [int(s) for s in scales]
        self.max_size = int(max_size)
        self.crop = crop
        self.crop_resize = [int(s) for s in crop_resize] if crop_resize else None
        self.crop_prob = crop_prob
        self.hflip = hflip
        self.mean = list(mean)
        self.std = list(std)
        self.color_jitter = color_jitter
        self.flip_perm = flip_perm  # keypoints: the left <-> right index map a horizontal flip applies

    def __call__(self, image: Image.Image, target: dict) -> tuple[Tensor, dict]:
        from torchvision import tv_tensors
        from torchvision.ops import box_convert
        from torchvision.transforms.v2 import functional as F

        boxes = tv_tensors.BoundingBoxes(torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4),
                                         format="XYXY", canvas_size=(image.height, image.width))
        labels = torch.as_tensor(target["labels"], dtype=torch.int64)
        # instance masks ride along as a tv_tensors.Mask: the same ops, nearest-neighbour resizing
        masks = tv_tensors.Mask(torch.as_tensor(target["masks"], dtype=torch.uint8)) if "masks" in target else None
        # keypoints [N, K, 3] (absolute x, y, visibility) follow by hand: flip (with the left/right swap),
        # crop (points cut off become v=0) and resize
        points = torch.as_tensor(target["keypoints"], dtype=torch.float32).clone() if "keypoints" in target else None
        # their areas (pixels, for OKS) scale with resizes; a crop replaces them by the cropped boxes' (ED-Pose)
        area = (torch.as_tensor(target["area"], dtype=torch.float32).clone()
                if points is not None and "area" in target else None)
        if self.train:
            if self.color_jitter:
                from torchvision.transforms import v2

                j = self.color_jitter
                image = v2.ColorJitter(brightness=j, contrast=j, saturation=j)(image)
            if torch.rand(()) < self.hflip:
                width = image.width
                image, boxes = F.horizontal_flip(image), F.horizontal_flip(boxes)
                masks = _each(F.horizontal_flip, masks)
                if points is not None:
                    points = flip_keypoints(points, width, self.flip_perm)
            if self.crop is not None and torch.rand(()) < self.crop_prob:
                if self.crop_resize:
                    shorter = self.crop_resize[int(torch.randint(len(self.crop_resize), ()))]
                    size = list(resized_shape(image.height, image.width, shorter, max_size=1 << 30))  # uncapped
                    area = None if area is None else area * (size[0] * size[1]) / (image.height * image.width)
                    points = _scale_points(points, size[1] / image.width, size[0] / image.height)
                    image, boxes = F.resize(image, size, antialias=True), F.resize(boxes, size)
                    masks = _each(F.resize, masks, size)
                image, boxes, labels, masks, points = self._random_crop(image, boxes, labels, masks, points)
                if points is not None:
                    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            shorter = self.scales[int(torch.randint(len(self.scales), ()))]
        else:
            shorter = max(self.scales)
        size = list(resized_shape(image.height, image.width, shorter, self.max_size))
        if area is not None:  # normalised by the image's area (as the keypoints by its sides): resizes keep it
            area = area / (image.height * image.width)
        points = _scale_points(points, size[1] / image.width, size[0] / image.height)
        image, boxes, masks = F.resize(image, size, antialias=True), F.resize(boxes, size), _each(F.resize, masks, size)

        tensor = F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True)
        tensor = F.normalize(tensor, mean=self.mean, std=self.std)
        height, width = size
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        out = dict(target)
        out["boxes"] = box_convert(boxes.as_subclass(Tensor), "xyxy", "cxcywh") / scale
        out["labels"] = labels
        out["size"] = torch.tensor(size, dtype=torch.int64)
        if masks is not None:
            out["masks"] = masks.as_subclass(Tensor)
        if points is not None:  # x, y normalised by the output size like the boxes
            out["keypoints"] = torch.cat([points[..., :2] / scale[:2], points[..., 2:]], -1)
            if area is not None:
                out["area_norm"] = area.as_subclass(Tensor)
        return tensor, out

    def _random_crop(self, image, boxes, labels, masks=None, points=None):
        """A crop of random size in [crop[0], crop[1]] per side (at most the image), boxes clipped to it
        (and masks cut to it); objects whose box is left with no area are dropped."""
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as F

        low, high = self.crop
        crop_h = int(torch.randint(min(low, image.height), min(high, image.height) + 1, ()))
        crop_w = int(torch.randint(min(low, image.width), min(high, image.width) + 1, ()))
        top = int(torch.randint(image.height - crop_h + 1, ()))
        left = int(torch.randint(image.width - crop_w + 1, ()))
        image = F.crop(image, top, left, crop_h, crop_w)
        boxes = F.clamp_bounding_boxes(F.crop(boxes, top, left, crop_h, crop_w))
        keep = ((boxes[:, 2] - boxes[:, 0]) > MIN_BOX_SIDE) & ((boxes[:, 3] - boxes[:, 1]) > MIN_BOX_SIDE)
        if masks is not None:
            masks = F.crop(masks, top, left, crop_h, crop_w)
            masks = tv_tensors.wrap(masks[keep], like=masks)
        if points is not None:
            points = points[keep].clone()
            points[..., 0] -= left
            points[..., 1] -= top
            x, y = points[..., 0], points[..., 1]
            outside = (x < 0) | (x >= crop_w) | (y < 0) | (y >= crop_h)
            points[outside | (points[..., 2] <= 0)] = 0.0
        # indexing returns a plain tensor; re-wrap so the resize that follows still treats it as boxes
        return image, tv_tensors.wrap(boxes[keep], like=boxes), labels[keep], masks, points


def flip_keypoints(points: Tensor, width: float, flip_perm: list[int] | None) -> Tensor:
    """Keypoints [N, K, 3] of an image ``width`` wide mirrored: x -> width - x (continuous pixel
    coordinates), then left and right swapped by ``flip_perm`` (keypoint i <- keypoint perm[i])."""
    if flip_perm is None and points.shape[1] > 1:
        raise ValueError("flipping keypoints needs flip_perm (the left <-> right pairs); set data.flip_pairs "
                         "or data.hflip: 0")
    out = points.clone()
    labelled = out[..., 2] > 0
    out[..., 0] = torch.where(labelled, width - out[..., 0], out[..., 0])
    return out[:, flip_perm] if flip_perm is not None else out


def _scale_points(points: Tensor | None, sx: float, sy: float) -> Tensor | None:
    if points is None:
        return None
    out = points.clone()
    out[..., 0] *= sx
    out[..., 1] *= sy
    return out


def _each(op, masks, *args):
    """``op(masks, *args)``, or None without masks."""
    return None if masks is None else op(masks, *args)


def collate_detection(batch: list[tuple[Tensor, dict]]) -> tuple[Tensor, Tensor, list[dict]]:
    """Pad a list of ``(image [3, h_i, w_i], target)`` into one batch.

    Returns images [B, 3, Hmax, Wmax] (zeros in the padding, bottom and right), masks
    [B, Hmax, Wmax] bool (True = padding, as the detector's attention masks expect) and the
    targets as a list (``None`` where there is none, as in prediction), unchanged but for instance
    ``masks``, zero-padded to [N, Hmax, Wmax] (the frame the mask losses read).
    """
    images = [image for image, _ in batch]
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    padded = images[0].new_zeros(len(images), images[0].shape[0], height, width)
    masks = torch.ones(len(images), height, width, dtype=torch.bool)
    for i, image in enumerate(images):
        padded[i, :, :image.shape[1], :image.shape[2]] = image
        masks[i, :image.shape[1], :image.shape[2]] = False
    targets = [target for _, target in batch]
    for i, target in enumerate(targets):
        if target is not None and "masks" in target:
            instance = target["masks"]
            framed = instance.new_zeros(instance.shape[0], height, width)
            framed[:, : instance.shape[1], : instance.shape[2]] = instance
            targets[i] = {**target, "masks": framed}
    return padded, masks, targets

"""Which input normalisation do pretrained weights expect? Ask their first BatchNorm.

    python benchmarks/pretrained_normalisation.py        # tf_efficientnet_lite0 from ../shared/weights

A BatchNorm layer's running mean and variance are the statistics of its input over the training
data, in the normalisation training used. Real photos fed under the right normalisation give stem
activations with about those statistics; under a wrong one the variance is off by the squared
ratio of the stds (ImageNet's 0.229 against 0.5: about 4.8x). For each candidate this prints, over
the stem's channels, the median ratio of the photos' activation variance to the running variance,
the median offset of their mean in running standard deviations, and the classifier's mean top-1
probability (a weaker signal: a larger input contrast also sharpens the logits).

The photos: the real RGB pictures of ../shared/data (the RGB-D samples and the first chess test
photos), resized to 224 on the shorter side and centre-cropped, as ImageNet evaluation does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# ../shared beside the repository ($DFX_SHARED_DATA names its data folder for a checkout elsewhere)
SHARED = Path(os.environ.get("DFX_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data").parent
CANDIDATES = {"imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]), "0.5/0.5": ([0.5] * 3, [0.5] * 3)}


def main() -> None:
    import timm
    from torchvision.transforms.v2 import functional as F

    from dfx.hub import load_state_dict
    from dfx.predict import read_image

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tf_efficientnet_lite0", help="a timm model name")
    parser.add_argument("--weights", type=Path,
                        default=SHARED / "weights" / "tf_efficientnet_lite0.imagenet.safetensors")
    parser.add_argument("--chess", type=int, default=5, help="chess test photos added to the RGB-D samples")
    args = parser.parse_args()
    photos = sorted((SHARED / "data" / "rgbd-samples").glob("*_color.*")) + \
        sorted((SHARED / "data" / "chess-pieces-coco" / "test").glob("*.jpg"))[:args.chess]
    if not photos:
        parser.error(f"no photos under {SHARED / 'data'}")
    model = timm.create_model(args.model, pretrained=False)
    model.load_state_dict(load_state_dict(args.weights))
    model.eval()
    stem, norm = model.conv_stem, model.bn1  # timm's EfficientNet / MobileNet family
    live = norm.running_var > 1e-4  # channels that carry signal
    pictures = [F.center_crop(F.to_dtype(F.pil_to_tensor(F.resize(read_image(p), 224)), torch.float32, scale=True), 224)
                for p in photos]
    report = {"model": args.model, "weights": str(args.weights), "photos": len(photos), "channels": int(live.sum())}
    with torch.no_grad():
        for name, (mean, std) in CANDIDATES.items():
            batch = torch.stack([F.normalize(x, mean, std) for x in pictures])
            y = stem(batch)
            ratio = (y.var((0, 2, 3)) / norm.running_var)[live]
            offset = ((y.mean((0, 2, 3)) - norm.running_mean) / norm.running_var.sqrt()).abs()[live]
            top1 = model(batch).softmax(-1).max(-1).values.mean()
            report[name] = {"variance_ratio": round(float(ratio.median()), 3),
                            "mean_offset_std": round(float(offset.median()), 3), "top1_prob": round(float(top1), 3)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

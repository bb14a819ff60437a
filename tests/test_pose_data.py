"""Pose data: COCO keypoints read into targets, the flip that swaps left and right, the embedded
shapes-pose (deterministic, consistent annotations) and dfx data check's keypoint report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dfx.cli import app
from dfx.data.coco import CocoDetection
from dfx.data.det_transforms import DetectionTransform, flip_keypoints
from dfx.data.keypoints import flip_permutation, oks
from dfx.data.shapes_pose import FLIP_PAIRS, KEYPOINTS, SIGMAS, SIZE, generate_shapes_pose
from dfx.errors import UsageError

NAMES = ["head", "left_hand", "right_hand"]


def small_coco(tmp_path, keypoints=None):
    """One 100x80 image with two people (3 keypoints each) and a crowd."""
    (tmp_path / "images").mkdir()
    Image.new("RGB", (100, 80), (40, 90, 140)).save(tmp_path / "images" / "a.png")
    data = {"images": [{"id": 7, "file_name": "a.png", "width": 100, "height": 80}],
            "categories": [{"id": 1, "name": "person", "keypoints": NAMES, "skeleton": [[1, 2], [1, 3]],
                            "sigmas": [0.05, 0.1, 0.1]}],
            "annotations": [
                {"id": 1, "image_id": 7, "category_id": 1, "bbox": [10, 10, 30, 40], "area": 600, "iscrowd": 0,
                 "num_keypoints": 3, "keypoints": keypoints or [20, 12, 2, 38, 30, 2, 12, 30, 1]},
                {"id": 2, "image_id": 7, "category_id": 1, "bbox": [60, 20, 20, 30], "area": 300, "iscrowd": 0,
                 "num_keypoints": 1, "keypoints": [70, 22, 2, 0, 0, 0, 5, 5, 0]},
                {"id": 3, "image_id": 7, "category_id": 1, "bbox": [0, 60, 50, 20], "area": 900, "iscrowd": 1,
                 "num_keypoints": 0, "keypoints": [0] * 9}]}
    path = tmp_path / "kp.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_keypoints_become_targets_with_the_datasets_skeleton_and_sigmas(tmp_path):
    dataset = CocoDetection(tmp_path / "images", small_coco(tmp_path), keypoints=True)
    _, target = dataset.load(0)
    assert target["keypoints"].shape == (2, 3, 3)  # the crowd is no target
    assert target["keypoints"][0].tolist() == [[20, 12, 2], [38, 30, 2], [12, 30, 1]]
    assert target["keypoints"][1, 2].tolist() == [0, 0, 0]  # v=0 points are zeroed
    assert dataset.skeleton == [(0, 1), (0, 2)] and dataset.sigmas == [0.05, 0.1, 0.1]
    assert dataset.flip_perm == [0, 2, 1] and target["area"].tolist() == [600.0, 300.0]


def test_a_wrong_keypoint_count_is_a_named_error(tmp_path):
    with pytest.raises(UsageError, match="annotation 1 .*holds 6 values; expected 9"):
        CocoDetection(tmp_path / "images", small_coco(tmp_path, keypoints=[1, 2, 2, 3, 4, 2]), keypoints=True)


def test_flip_mirrors_x_and_swaps_left_and_right():
    points = torch.tensor([[[20.0, 12, 2], [38, 30, 2], [12, 30, 1]], [[70, 22, 2], [0, 0, 0], [0, 0, 0]]])
    flipped = flip_keypoints(points, 100, [0, 2, 1])
    # the head stays the head; the new left hand is the old right hand, mirrored
    assert flipped[0].tolist() == [[80, 12, 2], [88, 30, 1], [62, 30, 2]]
    assert flipped[1].tolist() == [[30, 22, 2], [0, 0, 0], [0, 0, 0]]  # unlabelled points stay (0, 0, 0)
    assert torch.equal(flip_keypoints(flipped, 100, [0, 2, 1]), points)
    with pytest.raises(ValueError, match="flip_perm"):
        flip_keypoints(points, 100, None)


def test_the_transform_flips_resizes_and_normalises_keypoints_with_the_boxes(tmp_path):
    dataset = CocoDetection(tmp_path / "images", small_coco(tmp_path), keypoints=True)
    image, target = dataset.load(0)
    transform = DetectionTransform(train=True, scales=[160], max_size=1000, hflip=1.0, flip_perm=dataset.flip_perm)
    tensor, out = transform(image, target)
    assert tuple(tensor.shape[1:]) == (160, 200)
    expected = flip_keypoints(target["keypoints"], 100, [0, 2, 1])
    expected[..., 0] /= 100
    expected[..., 1] /= 80
    assert torch.allclose(out["keypoints"], expected)
    assert torch.allclose(out["area_norm"], torch.tensor([600.0, 300.0]) / (100 * 80))  # OKS areas, normalised
    box = out["boxes"][0]  # cxcywh of the flipped box [60, 10, 90, 50] / (100, 80)
    assert torch.allclose(box, torch.tensor([0.75, 0.375, 0.3, 0.5]))
    # labelled points of the first person stay inside its flipped box
    xs = out["keypoints"][0, :, 0]
    assert ((xs >= box[0] - box[2] / 2) & (xs <= box[0] + box[2] / 2)).all()


def test_shapes_pose_is_deterministic_and_its_annotations_fit_the_images(tmp_path):
    generate_shapes_pose(tmp_path / "a", train_images=20, val_images=2)
    generate_shapes_pose(tmp_path / "b", train_images=20, val_images=2)
    a = (tmp_path / "a" / "annotations" / "train.json").read_text()
    assert a == (tmp_path / "b" / "annotations" / "train.json").read_text()
    image = Path("train") / "000003.png"
    assert (tmp_path / "a" / image).read_bytes() == (tmp_path / "b" / image).read_bytes()
    data = json.loads(a)
    category = data["categories"][0]
    assert category["keypoints"] == list(KEYPOINTS) and category["sigmas"] == list(SIGMAS)
    assert flip_permutation(KEYPOINTS) == flip_permutation(KEYPOINTS, FLIP_PAIRS)  # names and pairs agree
    visibility = []
    for ann in data["annotations"]:
        points = np.asarray(ann["keypoints"], dtype=float).reshape(-1, 3)
        x, y, w, h = ann["bbox"]
        labelled = points[points[:, 2] > 0]
        assert ((labelled[:, 0] >= x - 1) & (labelled[:, 0] <= x + w + 1)).all()
        assert ((labelled[:, 1] >= y - 1) & (labelled[:, 1] <= y + h + 1)).all()
        assert ann["num_keypoints"] == len(labelled) and 0 < w <= SIZE and 0 < h <= SIZE
        visibility += points[:, 2].tolist()
        # a figure faces the viewer: its left hand is right of its right hand more often than not,
        # checked in the figure's frame below
    counts = np.bincount(np.asarray(visibility, dtype=int), minlength=3)
    assert counts[2] > 10 * counts[1] > 0  # mostly visible, some occluded (v=1)


def test_shapes_pose_left_limbs_are_on_the_figures_image_right(tmp_path):
    generate_shapes_pose(tmp_path, train_images=40, val_images=1)
    data = json.loads((tmp_path / "annotations" / "train.json").read_text())
    left, right = KEYPOINTS.index("left_foot"), KEYPOINTS.index("right_foot")
    sides = []
    for ann in data["annotations"]:
        p = np.asarray(ann["keypoints"], dtype=float).reshape(-1, 3)
        if (p[[0, 6, left, right], 2] > 0).all():
            up = p[0, :2] - p[6, :2]  # pelvis -> head
            across = np.array([-up[1], up[0]])  # the figure's +x in image coordinates (y down)
            sides.append(np.dot(p[left, :2] - p[right, :2], across) > 0)
    assert len(sides) > 20 and all(sides)


def test_data_check_reports_keypoints_per_instance_and_visibility(tmp_path):
    generate_shapes_pose(tmp_path, train_images=12, val_images=4)
    result = CliRunner().invoke(app, ["data", "check", str(tmp_path), "--json", "--no-decode"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    points = report["splits"]["train"]["keypoints"]
    data = json.loads((tmp_path / "annotations" / "train.json").read_text())
    v = np.asarray([a["keypoints"][2::3] for a in data["annotations"]])
    assert points["instances"] == len(v) and points["per_instance"] == pytest.approx((v > 0).sum(1).mean(), abs=1e-3)
    assert points["visibility"] == {str(i): int((v == i).sum()) for i in range(3)}
    assert points["keypoints"] == list(KEYPOINTS)


def test_ground_truth_poses_have_oks_one_and_a_shifted_pose_less():
    truth = np.array([[[10.0, 10], [20, 20], [30, 10]]])
    visibility = np.array([[2, 1, 0]])
    assert oks(truth, truth, visibility, np.array([400.0]), np.array([0.1, 0.1, 0.1]))[0, 0] == pytest.approx(1.0)
    assert oks(truth + 3, truth, visibility, np.array([400.0]), np.array([0.1, 0.1, 0.1]))[0, 0] < 0.8


def test_a_crop_replaces_the_oks_areas_by_the_cropped_boxes_and_cuts_points(tmp_path):
    dataset = CocoDetection(tmp_path / "images", small_coco(tmp_path), keypoints=True)
    image, target = dataset.load(0)
    torch.manual_seed(0)
    transform = DetectionTransform(train=True, scales=[50], max_size=1000, hflip=0.0, crop=[50, 50], crop_prob=1.0,
                                   flip_perm=dataset.flip_perm)
    _, out = transform(image, target)
    boxes = out["boxes"]  # cxcywh normalised by the 50 x 50 crop (resized to 50: the same size)
    assert torch.allclose(out["area_norm"], boxes[:, 2] * boxes[:, 3], atol=1e-6)
    points = out["keypoints"]
    labelled = points[..., 2] > 0
    assert ((points[..., :2] >= 0) & (points[..., :2] < 1)).all(-1)[labelled].all()
    assert (points[~labelled] == 0).all()


def test_training_refuses_data_whose_keypoints_do_not_fit_the_model(tmp_path):
    from dfx.tasks.detection import check_keypoints

    dataset = CocoDetection(tmp_path / "images", small_coco(tmp_path), keypoints=True)
    check_keypoints(dataset, 3)
    with pytest.raises(UsageError, match="model.keypoints is 17 but .* has 3 keypoints .*set model.keypoints: 3"):
        check_keypoints(dataset, 17)
    dataset.sigmas = None  # a 3-keypoint skeleton whose file gives no sigmas
    with pytest.raises(UsageError, match="no OKS sigmas .* set data.sigmas"):
        check_keypoints(dataset, 3)

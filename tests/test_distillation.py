"""The distillation task and `dfx distill`: student-only checkpoints, a frozen teacher, the logged loss
against distillation_loss on features taken by hand, layer-pair and teacher errors, the offline Hub error."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from typer.testing import CliRunner

from dfx.cli import app
from dfx.distill import distillation_loss
from dfx.engine import load_model, train
from dfx.errors import RunError, UsageError
from dfx.recipe import load_recipe
from dfx.tasks.distillation import Task, build_teacher, distill, locate_teacher

REPO = Path(__file__).resolve().parents[1]

TEACHER_RECIPE = """\
task: classification
model:
  name: vit_tiny_patch16_224
  kwargs: {{img_size: 32, patch_size: 8, embed_dim: 32, depth: 3, num_heads: 2, mlp_ratio: 2.0}}
data: {{root: {root}, image_size: 32}}
train: {{epochs: 1, batch_size: 8, seed: 0, num_workers: 0}}
eval: {{batch_size: 24}}
"""

# A narrower, shallower student on the same 4x4 patch grid; its blocks pair with the teacher's first and last.
STUDENT_RECIPE = """\
task: distillation
model:
  name: {student}
  kwargs: {{img_size: 32, patch_size: 8, embed_dim: 16, depth: 2, num_heads: 2, mlp_ratio: 2.0}}
data: {{root: {root}, image_size: 32}}
train: {{epochs: 1, batch_size: 8, seed: 0, num_workers: 0, log_every: 3}}
eval: {{batch_size: 24}}
distill: {{teacher: {teacher}, alpha: 0.5, beta: 1.0, k: 20, tau: 2.0, student_layers: [0, 1], teacher_layers: [0, -1]}}
"""


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, tiny_data) -> Path:
    """A dfx classification run (1 epoch of a 3-block ViT on the tiny ImageFolder): the teacher."""
    folder = tmp_path_factory.mktemp("teacher")
    (folder / "teacher.yaml").write_text(TEACHER_RECIPE.format(root=tiny_data))
    return Path(train(folder / "teacher.yaml", out=folder / "run", quiet=True)["run_dir"])


def student_recipe(tmp_path, tiny_data, teacher, student="vit_tiny_patch16_224") -> Path:
    path = tmp_path / "student.yaml"
    path.write_text(STUDENT_RECIPE.format(root=tiny_data, teacher=teacher, student=student))
    return path


def file_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("checkpoints/*"))}


def dfx(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dfx", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=300)


def test_cli_distills_into_a_student_only_checkpoint(tmp_path, tiny_data, teacher_run):
    before = file_digests(teacher_run)
    recipe = student_recipe(tmp_path, tiny_data, "cait-s24")  # --teacher replaces the recipe's teacher
    # In-process (typer's runner): the same command line, without paying for the imports again.
    result = CliRunner().invoke(app, ["distill", str(recipe), "--teacher", str(teacher_run), "--student",
                                      "deit_tiny_patch16_224", "--json"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip().count("\n") == 0
    payload = json.loads(result.stdout)
    assert set(payload) == {"run_dir", "metrics", "best", "epochs", "stopped_early", "elapsed_s", "teacher"}
    assert payload["teacher"] == str(teacher_run) and set(payload["metrics"]) == {"top1", "top5", "loss"}
    run_dir = Path(payload["run_dir"])
    assert run_dir.parent.name == "distillation"
    assert "epoch 1/1 step 3/" in result.stderr and " kd " in result.stderr and " manifold " in result.stderr

    # The checkpoint holds exactly the student's tensors; the teacher run is untouched.
    recipe_used, task, student, meta = load_model(run_dir)  # no teacher needed to load or evaluate
    assert recipe_used.model.name == "deit_tiny_patch16_224" and recipe_used.distill.teacher == str(teacher_run)
    from safetensors.torch import load_file

    saved = load_file(str(run_dir / "checkpoints" / "last.safetensors"))
    assert set(saved) == set(student.state_dict())
    assert saved["blocks.0.attn.qkv.weight"].shape == (48, 16)  # the student's width, not the teacher's 32
    assert meta["info"]["teacher"] == str(teacher_run)
    assert file_digests(teacher_run) == before
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and torch.isfinite(torch.tensor(rows[0]["train/loss"]))


def manual_forward(model, images):
    """(logits, patch tokens after every block): timm's ViT forward written out, without hooks."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    feats = []
    for block in model.blocks:
        x = block(x)
        feats.append(x[:, model.num_prefix_tokens:])
    return model.forward_head(model.norm(x)), feats


@pytest.mark.parametrize("student, smoothing", [("vit_tiny_patch16_224", 0.0), ("vit_tiny_patch16_224", 0.1),
                                                ("deit_tiny_distilled_patch16_224", 0.0)])
def test_task_loss_equals_distillation_loss_by_hand(tmp_path, tiny_data, teacher_run, student, smoothing):
    recipe = load_recipe(student_recipe(tmp_path, tiny_data, teacher_run, student),
                         [f"train.label_smoothing={smoothing}"])
    task = Task(recipe)
    dataset = task.dataset("train")
    torch.manual_seed(0)
    model = task.build_model()
    picked = range(0, len(dataset), len(dataset) // 8)[:8]  # every class, whatever the dataset's size
    images = torch.stack([dataset[i][0] for i in picked])
    labels = torch.tensor([dataset[i][1] for i in picked])
    classes = len(task.classes)

    task.teacher_for(model, images.device)  # built on first use: its random init must not shift the draws below
    torch.manual_seed(1)  # the random relation's token draws
    loss, logs = task.loss(model, (images, labels))

    teacher = load_model(teacher_run)[2]
    with torch.no_grad():
        teacher_logits, teacher_feats = manual_forward(teacher, images)
        assert torch.allclose(teacher_logits, teacher(images), atol=1e-6)  # the written-out forward is timm's
    student_logits, student_feats = manual_forward(model, images)
    if student.startswith("deit_tiny_distilled"):
        assert isinstance(student_logits, tuple) and len(student_logits) == 2  # (class, distillation) heads
    target = labels
    if smoothing:  # smoothed one-hot targets: (1 - e) on the label plus e / K everywhere
        target = F.one_hot(labels, classes).double() * (1 - smoothing) + smoothing / classes
    torch.manual_seed(1)
    expected, parts = distillation_loss(student_logits, teacher_logits, target, [student_feats[0], student_feats[1]],
                                        [teacher_feats[0], teacher_feats[2]], alpha=0.5, beta=1.0, w_sample=0.1,
                                        w_patch=4.0, w_rand=0.2, k=20, tau=2.0, kd="soft")
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert logs == pytest.approx({name: float(value) for name, value in parts.items()}, rel=1e-5)
    assert logs["manifold"] > 0 and logs["kd"] > 0
    if smoothing:
        ce = F.cross_entropy(student_logits.detach().double(), labels, label_smoothing=smoothing)
        assert logs["ce"] == pytest.approx(float(ce), rel=1e-5)

    # The teacher is frozen, in eval mode, outside the student, and unchanged by a training step.
    frozen = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loss.backward()
    optimizer.step()
    assert not task.teacher.training and all(p.grad is None and not p.requires_grad for p in task.teacher.parameters())
    assert all(torch.equal(v, task.teacher.state_dict()[k]) for k, v in frozen.items())
    assert not any(m is task.teacher for m in model.modules())
    model.eval()
    assert model(images).shape == (8, classes)  # a distilled DeiT averages its two heads at inference


@pytest.mark.parametrize("overrides, message", [
    (["distill.student_layers=[0, 2]"], "distill.student_layers: [2] out of range for the student"),
    (["distill.teacher_layers=[0, -4]"], "distill.teacher_layers: [-4] out of range for the teacher"),
    (["distill.teacher_layers=[0]"], "pair up one to one"),
    (["distill.student_layers=[]", "distill.teacher_layers=[]"], "or set distill.beta=0"),
    (["model.kwargs.patch_size=4"], "patch grid (8, 8) differs from the teacher's (4, 4)"),
    (["distill.alpha=1.5"], "distill.alpha: expected a value in [0, 1]"),
    (["model.kwargs.depthh=3"], "model.kwargs:"),
    (["distill.teacher=deit-bb"], "(did you mean deit-b?)"),
])
def test_bad_layer_pairs_and_weights_fail_before_any_data_is_read(tmp_path, tiny_data, teacher_run, overrides, message):
    recipe = student_recipe(tmp_path, tiny_data, teacher_run)
    with pytest.raises(UsageError) as error:
        distill(recipe, overrides, quiet=True)
    assert message in str(error.value)
    if "out of range" in message:
        assert "valid indices are 0.." in str(error.value)
    assert not Path("runs").exists()


def test_plain_weights_file_teacher_is_built_from_teacher_model(tmp_path, tiny_data, teacher_run):
    from safetensors.torch import save_file

    reference = load_model(teacher_run)[2]
    weights = tmp_path / "teacher.safetensors"  # bare weights: no dfx metadata, no architecture
    save_file(reference.state_dict(), str(weights))
    recipe = student_recipe(tmp_path, tiny_data, weights)
    with pytest.raises(UsageError, match="distill.teacher_model: required"):
        locate_teacher(load_recipe(recipe).distill)
    architecture = ["distill.teacher_model=vit_tiny_patch16_224", "distill.teacher_kwargs={img_size: 32, patch_size: "
                    f"8, embed_dim: 32, depth: 3, num_heads: 2, mlp_ratio: 2.0, num_classes: {reference.num_classes}}}"]
    teacher, classes = build_teacher(locate_teacher(load_recipe(recipe, architecture).distill))
    images = torch.randn(2, 3, 32, 32)
    assert classes is None and not teacher.training
    assert torch.equal(teacher(images), reference(images))
    wrong = [*architecture[:1], architecture[1].replace("depth: 3", "depth: 2")]
    with pytest.raises(RunError, match="does not fit vit_tiny_patch16_224"):
        build_teacher(locate_teacher(load_recipe(recipe, wrong).distill))


def test_hub_teacher_loads_from_the_cache_and_must_take_the_data_resolution(tmp_path, tiny_data, monkeypatch):
    import timm
    from safetensors.torch import save_file

    reference = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    revision = "0123456789abcdef0123456789abcdef01234567"  # the standard cache layout, offline
    repo = tmp_path / "hub" / "models--timm--deit_tiny_patch16_224.fb_in1k"
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    save_file(reference.state_dict(), str(repo / "snapshots" / revision / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))

    recipe = load_recipe(student_recipe(tmp_path, tiny_data, "deit-ti"))
    teacher, _ = build_teacher(locate_teacher(recipe.distill))
    images = torch.randn(1, 3, 224, 224)
    assert torch.equal(teacher(images), reference(images))  # every tensor, the 1000-class head included
    with pytest.raises(UsageError, match="teacher deit_tiny_patch16_224 takes 224x224 images but data.image_size is 32"):
        distill(recipe.source, quiet=True)


def test_missing_teacher_run_prints_the_command_that_makes_it(tmp_path):
    (tmp_path / "recipes").mkdir()
    for name in ("distill-shapes.yaml", "cls-shapes.yaml"):
        shutil.copy(REPO / "recipes" / name, tmp_path / "recipes" / name)
    with pytest.raises(UsageError) as error:
        distill("recipes/distill-shapes.yaml", quiet=True)
    assert ("no dfx run directory runs/classification/cls-shapes; create it with `dfx train recipes/cls-shapes.yaml`"
            in str(error.value))
    with pytest.raises(UsageError, match=r"create it with `dfx train RECIPE --out elsewhere/teacher`"):
        distill("recipes/distill-shapes.yaml", teacher="elsewhere/teacher", quiet=True)


def test_offline_hub_teacher_fails_fast_naming_the_weights(tmp_path):
    started = time.perf_counter()
    result = dfx("distill", REPO / "recipes" / "distill-deit-tiny.yaml", "--teacher", "deit-b", "--json",
                 env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")})
    elapsed = time.perf_counter() - started
    assert result.returncode == 1, result.stderr
    error = json.loads(result.stdout)["error"]
    assert "timm/deit_base_patch16_224.fb_in1k" in error and "hf download" in error and "HF_HUB_CACHE" in error
    assert "Traceback" not in result.stderr
    assert elapsed < 10, f"took {elapsed:.1f} s"

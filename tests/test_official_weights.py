"""Released Deformable-DETR / H-Deformable-DETR checkpoints through ``model.weights``.

``official_state_dict`` writes a state dict in the reference code's layout from its module
structure (fundamentalvision/Deformable-DETR and HDETR/H-Deformable-DETR: ``DeformableDETR``,
``DeformableTransformer``, its encoder/decoder layers, ``MSDeformAttn``, the torchvision ResNet with
frozen BN), with seeded values. ``reference_forward`` re-states the reference's forward pass on
such a dict, tensor by tensor under the reference's names, so that dfx's outputs can be compared
with what the reference computes from the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

import dfx
from dfx.detection import official
from dfx.errors import RunError, UsageError
from dfx.ops import ms_deform_attn

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
COCO_IDS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32,
            33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59,
            60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90]

# The model-zoo rows of docs/detection.md: recipe + overrides for each released architecture.
HDETR = ("hdetr.yaml", [])
DEFORMABLE_PLUS_PLUS = ("deformable-detr.yaml", ["model.ffn_dim=1024", "model.dropout=0.1",
                                                 "model.mixed_query_selection=false", "model.look_forward_twice=false"])
# The same architectures scaled down for CPU tests (the hidden width stays 256: the reference's
# query-selection encoding is fixed at 4 x 128 features).
SMALL = ["model.backbone=resnet18", "model.pretrained=null", "model.encoder_layers=1", "model.decoder_layers=3",
         "model.ffn_dim=64", "model.points=2"]


def official_args(**overrides) -> dict:
    """The reference's training arguments (main.py's argparse names) for the tiny test models."""
    args = dict(backbone="resnet18", hidden_dim=256, nheads=8, enc_layers=1, dec_layers=3, dim_feedforward=64,
                num_feature_levels=4, dec_n_points=2, enc_n_points=2, two_stage=True, with_box_refine=True,
                mixed_selection=True, look_forward_twice=True, num_queries_one2one=20, num_queries_one2many=30,
                num_classes=91)
    return {**args, **overrides}


def official_state_dict(args: dict, seed: int = 0) -> dict:
    """Keys and shapes of the reference model for ``args``; values from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    c, ffn = args["hidden_dim"], args["dim_feedforward"]
    shapes: dict[str, tuple] = {}
    # backbone.0 = Backbone(torchvision ResNet, FrozenBatchNorm2d) through IntermediateLayerGetter (no fc)
    net = getattr(torchvision.models, args["backbone"])(norm_layer=torchvision.ops.FrozenBatchNorm2d)
    shapes.update({f"backbone.0.body.{k}": tuple(v.shape) for k, v in net.state_dict().items()
                   if not k.startswith("fc.")})
    channels = [net.layer2[-1].conv1.in_channels, net.layer3[-1].conv1.in_channels, net.layer4[-1].conv1.in_channels]
    in_channels = channels[-1]
    for level in range(args["num_feature_levels"]):
        kernel, source = (1, channels[level]) if level < 3 else (3, in_channels)
        shapes[f"input_proj.{level}.0.weight"] = (c, source, kernel, kernel)
        shapes[f"input_proj.{level}.0.bias"] = (c,)
        shapes[f"input_proj.{level}.1.weight"] = shapes[f"input_proj.{level}.1.bias"] = (c,)
        if level >= 3:
            in_channels = c

    def linear(name, out, inp):
        shapes[name + ".weight"], shapes[name + ".bias"] = (out, inp), (out,)

    def norm(name, width=c):
        shapes[name + ".weight"] = shapes[name + ".bias"] = (width,)

    def deformable(name, points):
        samples = args["nheads"] * args["num_feature_levels"] * points
        linear(name + ".sampling_offsets", samples * 2, c)
        linear(name + ".attention_weights", samples, c)
        linear(name + ".value_proj", c, c)
        linear(name + ".output_proj", c, c)

    shapes["transformer.level_embed"] = (args["num_feature_levels"], c)
    for i in range(args["enc_layers"]):
        layer = f"transformer.encoder.layers.{i}"
        deformable(layer + ".self_attn", args["enc_n_points"])
        norm(layer + ".norm1"), linear(layer + ".linear1", ffn, c), linear(layer + ".linear2", c, ffn)
        norm(layer + ".norm2")
    for i in range(args["dec_layers"]):
        layer = f"transformer.decoder.layers.{i}"
        deformable(layer + ".cross_attn", args["dec_n_points"])
        norm(layer + ".norm1")
        shapes[layer + ".self_attn.in_proj_weight"], shapes[layer + ".self_attn.in_proj_bias"] = (3 * c, c), (3 * c,)
        linear(layer + ".self_attn.out_proj", c, c)
        norm(layer + ".norm2"), linear(layer + ".linear1", ffn, c), linear(layer + ".linear2", c, ffn)
        norm(layer + ".norm3")
    queries = args["num_queries_one2one"] + args["num_queries_one2many"]
    if args["two_stage"]:
        linear("transformer.enc_output", c, c), norm("transformer.enc_output_norm")
        linear("transformer.pos_trans", 2 * c, 2 * c), norm("transformer.pos_trans_norm", 2 * c)
        if args["mixed_selection"]:
            shapes["query_embed.weight"] = (queries, c)
    else:
        linear("transformer.reference_points", 2, c)
        shapes["query_embed.weight"] = (queries, 2 * c)
    heads = args["dec_layers"] + int(args["two_stage"])
    for j in range(heads if args["with_box_refine"] else 1):  # without refinement: one head, shared
        linear(f"class_embed.{j}", args["num_classes"], c)
        for k, out in enumerate((c, c, 4)):
            linear(f"bbox_embed.{j}.layers.{k}", out, c)

    state = {}
    for key, shape in shapes.items():
        if key.endswith(("norm1.weight", "norm2.weight", "norm3.weight", "_norm.weight", ".1.weight")) or \
                key.endswith(("bn1.weight", "bn2.weight", "bn3.weight", "downsample.1.weight")):
            value = 1 + 0.1 * torch.randn(shape, generator=g)
        elif key.endswith("running_var"):
            value = 0.5 + torch.rand(shape, generator=g)
        elif len(shape) > 1 and key not in ("transformer.level_embed", "query_embed.weight"):
            value = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        else:
            value = torch.randn(shape, generator=g) * (1.0 if len(shape) > 1 else 0.1)
        state[key] = value
    if not args["with_box_refine"]:  # the same module under every index
        for key in [k for k in state if k.startswith(("class_embed.0.", "bbox_embed.0."))]:
            for j in range(1, heads):
                state[key.replace(".0.", f".{j}.", 1)] = state[key]
    for key in list(state):  # the decoder's second registration of the heads
        if (key.startswith("bbox_embed.") and args["with_box_refine"]) or \
                (key.startswith("class_embed.") and args["two_stage"]):
            state["transformer.decoder." + key] = state[key]
    return state


def save_released(path: Path, state: dict, args: dict) -> Path:
    """A file as the reference's main.py writes it (model, optimizer, scheduler, epoch, args)."""
    scheduler = torch.optim.lr_scheduler.MultiStepLR(torch.optim.SGD([torch.zeros(1)], lr=0.1), [40])
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 2e-4, "params": [0]}]},
                "lr_scheduler": scheduler.state_dict(), "epoch": 11, "args": argparse.Namespace(**args)}, path)
    return path


# --------------------------------------------------------------------------------------------
# The reference forward, re-stated on the official tensors (eval mode).

def _linear(w, name, x):
    return F.linear(x, w[name + ".weight"], w[name + ".bias"])


def _norm(w, name, x):
    return F.layer_norm(x, x.shape[-1:], w[name + ".weight"], w[name + ".bias"])


def _deformable(w, name, query, reference, value, shapes, padding, args, points):
    batch, length, c = query.shape
    heads, levels = args["nheads"], args["num_feature_levels"]
    value = _linear(w, name + ".value_proj", value).masked_fill(padding[..., None], 0.0)
    value = value.view(batch, -1, heads, c // heads)
    offsets = _linear(w, name + ".sampling_offsets", query).view(batch, length, heads, levels, points, 2)
    weights = _linear(w, name + ".attention_weights", query).view(batch, length, heads, levels * points)
    weights = weights.softmax(-1).view(batch, length, heads, levels, points)
    if reference.shape[-1] == 2:
        normaliser = torch.stack([shapes[..., 1], shapes[..., 0]], -1)
        locations = reference[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
    else:
        locations = reference[:, :, None, :, None, :2] + offsets / points * reference[:, :, None, :, None, 2:] * 0.5
    return _linear(w, name + ".output_proj", ms_deform_attn(value, shapes, locations, weights))


def _sine(mask, feats, temperature=10000.0, offset=-0.5):
    """Deformable-DETR's PositionEmbeddingSine (DINO's PositionEmbeddingSineHW: temperature 20, offset 0)."""
    not_mask = (~mask).float()
    y, x = not_mask.cumsum(1), not_mask.cumsum(2)
    y = (y + offset) / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = (x + offset) / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    dim_t = temperature ** (2 * (torch.arange(feats, dtype=torch.float32) // 2) / feats)
    px, py = x[..., None] / dim_t, y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), 4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), 4).flatten(3)
    return torch.cat((py, px), 3).permute(0, 3, 1, 2)


def _inverse_sigmoid(x, eps=1e-5):
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _box_head(w, name, x):
    x = _linear(w, name + ".layers.0", x).relu()
    return _linear(w, name + ".layers.2", _linear(w, name + ".layers.1", x).relu())


def reference_encoder(w: dict, args: dict, images, mask, temperature=10000.0, offset=-0.5):
    """The reference's backbone, input projections, sine encoding and encoder -> (memory [B, S, C],
    level shapes [L, 2], padding [B, S], valid ratios [B, L, 2])."""
    c = args["hidden_dim"]
    net = getattr(torchvision.models, args["backbone"])(norm_layer=torchvision.ops.FrozenBatchNorm2d)
    net.load_state_dict({k[len("backbone.0.body."):]: v for k, v in w.items() if k.startswith("backbone.0.body.")},
                        strict=False)
    net.eval()
    x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
    features = []
    for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
        x = stage(x)
        features.append(x)
    features = features[1:]
    srcs, masks = [], []
    for level in range(args["num_feature_levels"]):
        if level < 3:
            source, kernel_args = features[level], {}
        else:
            source, kernel_args = (features[-1] if level == 3 else srcs[-1]), {"stride": 2, "padding": 1}
        src = F.conv2d(source, w[f"input_proj.{level}.0.weight"], w[f"input_proj.{level}.0.bias"], **kernel_args)
        srcs.append(F.group_norm(src, 32, w[f"input_proj.{level}.1.weight"], w[f"input_proj.{level}.1.bias"]))
        masks.append(F.interpolate(mask[None].float(), size=src.shape[-2:]).to(torch.bool)[0])
    pos = [_sine(m, c // 2, temperature, offset) for m in masks]
    shapes = torch.as_tensor([s.shape[-2:] for s in srcs], dtype=torch.long)
    src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
    pad = torch.cat([m.flatten(1) for m in masks], 1)
    lvl_pos = torch.cat([p.flatten(2).transpose(1, 2) + w["transformer.level_embed"][i] for i, p in enumerate(pos)], 1)
    ratios = torch.stack([torch.stack([(~m[:, 0, :]).sum(1).float() / m.shape[2],
                                       (~m[:, :, 0]).sum(1).float() / m.shape[1]], -1) for m in masks], 1)
    refs = []
    for level, (h, wd) in enumerate(shapes.tolist()):
        ry, rx = torch.meshgrid(torch.linspace(0.5, h - 0.5, h), torch.linspace(0.5, wd - 0.5, wd), indexing="ij")
        refs.append(torch.stack((rx.reshape(-1)[None] / (ratios[:, None, level, 0] * wd),
                                 ry.reshape(-1)[None] / (ratios[:, None, level, 1] * h)), -1))
    enc_ref = torch.cat(refs, 1)[:, :, None] * ratios[:, None]
    memory = src
    for i in range(args["enc_layers"]):
        name = f"transformer.encoder.layers.{i}"
        attended = _deformable(w, name + ".self_attn", memory + lvl_pos, enc_ref, memory, shapes, pad, args,
                               args["enc_n_points"])
        memory = _norm(w, name + ".norm1", memory + attended)
        memory = _norm(w, name + ".norm2", memory + _linear(w, name + ".linear2",
                                                             _linear(w, name + ".linear1", memory).relu()))
    return memory, shapes, pad, ratios


def reference_proposals(w: dict, memory, shapes, pad):
    """gen_encoder_output_proposals and enc_output -> (output memory [B, S, C], proposals before the
    sigmoid [B, S, 4], inf where padded or too close to the border)."""
    batch, proposals, start = memory.shape[0], [], 0
    for level, (h, wd) in enumerate(shapes.tolist()):
        m = pad[:, start:start + h * wd].view(batch, h, wd)
        valid_h, valid_w = (~m[:, :, 0]).sum(1), (~m[:, 0, :]).sum(1)
        gy, gx = torch.meshgrid(torch.linspace(0, h - 1, h), torch.linspace(0, wd - 1, wd), indexing="ij")
        grid = (torch.stack((gx, gy), -1)[None] + 0.5) / torch.stack((valid_w, valid_h), -1).view(batch, 1, 1, 2)
        proposals.append(torch.cat((grid, torch.ones_like(grid) * 0.05 * 2.0 ** level), -1).view(batch, -1, 4))
        start += h * wd
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals)).masked_fill(pad[..., None], float("inf"))
    proposals = proposals.masked_fill(~valid, float("inf"))
    out_memory = memory.masked_fill(pad[..., None], 0.0).masked_fill(~valid, 0.0)
    out_memory = _norm(w, "transformer.enc_output_norm", _linear(w, "transformer.enc_output", out_memory))
    return out_memory, proposals


@torch.no_grad()
def reference_forward(w: dict, args: dict, images, mask):
    """(pred_logits [B, Q1, 91], pred_boxes [B, Q1, 4]) as the reference computes them."""
    c = args["hidden_dim"]
    memory, shapes, pad, ratios = reference_encoder(w, args, images, mask)
    batch, layers = images.shape[0], args["dec_layers"]
    one2one = args["num_queries_one2one"]
    queries = one2one + args["num_queries_one2many"]
    if args["two_stage"]:
        out_memory, proposals = reference_proposals(w, memory, shapes, pad)
        enc_class = _linear(w, f"class_embed.{layers}", out_memory)
        enc_coord = _box_head(w, f"bbox_embed.{layers}", out_memory) + proposals
        top = torch.topk(enc_class[..., 0], queries, dim=1)[1]
        top_coords = torch.gather(enc_coord, 1, top[..., None].repeat(1, 1, 4))
        reference = top_coords.sigmoid()
        dim_t = 10000 ** (2 * (torch.arange(128, dtype=torch.float32) // 2) / 128)
        embedded = top_coords.sigmoid()[..., None] * 2 * math.pi / dim_t
        embedded = torch.stack((embedded[..., 0::2].sin(), embedded[..., 1::2].cos()), 4).flatten(2)
        pos_out = _norm(w, "transformer.pos_trans_norm", _linear(w, "transformer.pos_trans", embedded))
        query_pos, tgt = torch.split(pos_out, c, dim=2)
        if args["mixed_selection"]:
            tgt = w["query_embed.weight"][None].expand(batch, -1, -1)
    else:
        query_pos, tgt = torch.split(w["query_embed.weight"], c, dim=1)
        query_pos, tgt = query_pos[None].expand(batch, -1, -1), tgt[None].expand(batch, -1, -1)
        reference = _linear(w, "transformer.reference_points", query_pos).sigmoid()
    attn_mask = torch.zeros(queries, queries, dtype=torch.bool)
    attn_mask[one2one:, :one2one] = attn_mask[:one2one, one2one:] = True
    head = (lambda kind, i: f"{kind}.{i}") if args["with_box_refine"] else (lambda kind, i: f"{kind}.0")
    output, init_reference, inter = tgt, reference, []
    for i in range(layers):
        name = f"transformer.decoder.layers.{i}"
        scale = torch.cat([ratios, ratios], -1) if reference.shape[-1] == 4 else ratios
        q = output + query_pos
        attended = F.multi_head_attention_forward(
            q.transpose(0, 1), q.transpose(0, 1), output.transpose(0, 1), c, args["nheads"],
            w[name + ".self_attn.in_proj_weight"], w[name + ".self_attn.in_proj_bias"], None, None, False, 0.0,
            w[name + ".self_attn.out_proj.weight"], w[name + ".self_attn.out_proj.bias"], training=False,
            need_weights=False, attn_mask=attn_mask)[0].transpose(0, 1)
        output = _norm(w, name + ".norm2", output + attended)
        attended = _deformable(w, name + ".cross_attn", output + query_pos, reference[:, :, None] * scale[:, None],
                               memory, shapes, pad, args, args["dec_n_points"])
        output = _norm(w, name + ".norm1", output + attended)
        output = _norm(w, name + ".norm3", output + _linear(w, name + ".linear2",
                                                             _linear(w, name + ".linear1", output).relu()))
        new_reference = reference
        if args["with_box_refine"]:
            delta = _box_head(w, head("bbox_embed", i), output)
            if reference.shape[-1] == 4:
                new_reference = (delta + _inverse_sigmoid(reference)).sigmoid()
            else:
                new_reference = torch.cat((delta[..., :2] + _inverse_sigmoid(reference), delta[..., 2:]), -1).sigmoid()
            reference = new_reference.detach()
        inter.append(new_reference if args["look_forward_twice"] else reference)
    last = layers - 1
    base = _inverse_sigmoid(init_reference if last == 0 else inter[last - 1])
    delta = _box_head(w, head("bbox_embed", last), output)
    boxes = (delta + base).sigmoid() if base.shape[-1] == 4 else \
        torch.cat((delta[..., :2] + base, delta[..., 2:]), -1).sigmoid()
    logits = _linear(w, head("class_embed", last), output)
    return logits[:, :one2one], boxes[:, :one2one]


# --------------------------------------------------------------------------------------------

def _images():
    generator = torch.Generator().manual_seed(5)
    images = torch.randn(2, 3, 96, 128, generator=generator)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, 80:, :] = True  # the second image is 80x112, padded to the batch
    mask[1, :, 112:] = True
    images[1][:, mask[1]] = 0.0
    return images, mask


VARIANTS = {
    "h-deformable-detr": (HDETR, {}),
    "deformable-detr ++ two-stage": (DEFORMABLE_PLUS_PLUS, dict(mixed_selection=False, look_forward_twice=False,
                                                               num_queries_one2many=0)),
    "deformable-detr + box refine": (("deformable-detr.yaml", DEFORMABLE_PLUS_PLUS[1] + ["model.two_stage=false"]),
                                     dict(two_stage=False, mixed_selection=False, look_forward_twice=False,
                                          num_queries_one2many=0)),
    "deformable-detr": (("deformable-detr.yaml", DEFORMABLE_PLUS_PLUS[1] + ["model.two_stage=false",
                                                                           "model.box_refine=false"]),
                        dict(two_stage=False, with_box_refine=False, mixed_selection=False, look_forward_twice=False,
                             num_queries_one2many=0)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_released_checkpoints_give_the_reference_outputs(variant, tmp_path):
    """Through dfx.create_model + the recipe (scaled down), the same logits and boxes as the
    reference's forward on the same weights, the 91 category-id rows mapped onto COCO's 80 classes."""
    (recipe, overrides), changes = VARIANTS[variant]
    args = official_args(**changes)
    state = official_state_dict(args, seed=1)
    file = save_released(tmp_path / "checkpoint.pth", state, args)
    overrides = [*overrides, *SMALL, f"model.one2one_queries={args['num_queries_one2one']}",
                 f"model.one2many_queries={args['num_queries_one2many']}"]
    model = dfx.create_model(RECIPES / recipe, overrides, weights=file)
    assert not model.training
    images, mask = _images()
    with torch.no_grad():
        outputs = model(images, mask)
    logits, boxes = reference_forward(state, args, images, mask)
    assert outputs["pred_logits"].shape == (2, 20, 80) and outputs["pred_boxes"].shape == (2, 20, 4)
    torch.testing.assert_close(outputs["pred_logits"], logits[..., COCO_IDS], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outputs["pred_boxes"], boxes, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # two full-size R50 models
@pytest.mark.parametrize("recipe, overrides, changes", [
    (*HDETR, dict(backbone="resnet50", enc_layers=6, dec_layers=6, dim_feedforward=2048, enc_n_points=4,
                  dec_n_points=4, num_queries_one2one=300, num_queries_one2many=1500)),
    (*DEFORMABLE_PLUS_PLUS, dict(backbone="resnet50", enc_layers=6, dec_layers=6, dim_feedforward=1024,
                                 enc_n_points=4, dec_n_points=4, mixed_selection=False, look_forward_twice=False,
                                 num_queries_one2one=300, num_queries_one2many=0)),
])
def test_full_size_released_layouts_load_strictly_into_the_zoo_recipes(recipe, overrides, changes, tmp_path):
    args = official_args(**changes)
    state = official_state_dict(args)
    file = save_released(tmp_path / "released.pth", state, args)
    model = dfx.create_model(RECIPES / recipe, [*overrides, "model.pretrained=null"], weights=file)
    own = model.state_dict()
    layers = args["dec_layers"]
    # each official tensor is where the module of that role reads it
    assert torch.equal(own["backbone.body.layer1.0.conv1.weight"], state["backbone.0.body.layer1.0.conv1.weight"])
    assert torch.equal(own["decoder.layers.2.norm1.weight"], state["transformer.decoder.layers.2.norm2.weight"])
    assert torch.equal(own["decoder.layers.2.norm2.weight"], state["transformer.decoder.layers.2.norm1.weight"])
    assert torch.equal(own["encoder.layers.5.ffn.3.weight"], state["transformer.encoder.layers.5.linear2.weight"])
    assert torch.equal(own["enc_box_head.layers.2.bias"], state[f"bbox_embed.{layers}.layers.2.bias"])
    for i in range(layers):  # class k of the recipe is row category_ids[k] of the released head
        assert torch.equal(own[f"class_heads.{i}.weight"], state[f"class_embed.{i}.weight"][COCO_IDS])
        assert torch.equal(own[f"class_heads.{i}.bias"], state[f"class_embed.{i}.bias"][COCO_IDS])
    assert torch.equal(own["enc_class_head.weight"], state[f"class_embed.{layers}.weight"][:1])  # objectness row
    queries = "content_queries.weight" if args["mixed_selection"] else None
    if queries:
        assert torch.equal(own[queries], state["query_embed.weight"])


def test_dfx_to_official_to_dfx_is_the_identity():
    config = dfx.create_model(RECIPES / "hdetr.yaml", [*SMALL, "model.one2one_queries=20",
                                                       "model.one2many_queries=30"]).config
    torch.manual_seed(0)
    model = dfx.detection.DeformableDETR(config)
    state = {k: v + torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    exported = official.to_official(state, config, COCO_IDS)
    assert exported["class_embed.3.weight"].shape[0] == 91
    assert "transformer.decoder.bbox_embed.0.layers.0.weight" in exported
    expected = official_state_dict(official_args(), seed=0)
    assert {k: tuple(v.shape) for k, v in exported.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    back = official.to_dfx(exported, config, COCO_IDS)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_another_architecture_names_the_recipe_keys(tmp_path):
    """300 mixed-selection queries into the 1800-query H-DETR recipe: exit 2 with both shapes."""
    args = official_args(num_queries_one2one=300, num_queries_one2many=0)
    file = save_released(tmp_path / "detr300.pth", official_state_dict(args), args)
    with pytest.raises(UsageError) as error:
        dfx.create_model(RECIPES / "hdetr.yaml", [*SMALL, "model.one2one_queries=300"], weights=file)
    text = str(error.value)
    assert "content_queries.weight: checkpoint (300, 256) vs model (1800, 256)" in text
    assert "model.one2one_queries / model.one2many_queries" in text and str(file) in text
    plain = official_args(two_stage=False, mixed_selection=False, look_forward_twice=False)
    file = save_released(tmp_path / "plain.pth", official_state_dict(plain), plain)
    with pytest.raises(UsageError, match="model.two_stage=false model.mixed_query_selection=false"):
        dfx.create_model(RECIPES / "hdetr.yaml", SMALL, weights=file)


def test_missing_and_misshaped_keys_are_named_with_both_shapes(tmp_path):
    args = official_args()
    state = official_state_dict(args)
    del state["transformer.decoder.layers.1.norm3.bias"]
    state["transformer.encoder.layers.0.linear1.weight"] = torch.zeros(128, 256)
    file = save_released(tmp_path / "broken.pth", state, args)
    overrides = [*SMALL, "model.one2one_queries=20", "model.one2many_queries=30"]
    with pytest.raises(UsageError) as error:
        dfx.create_model(RECIPES / "hdetr.yaml", overrides, weights=file)
    text = str(error.value)
    assert "missing decoder.layers.1.norm3.bias (256,)" in text
    assert "encoder.layers.0.ffn.0.weight: checkpoint (128, 256) vs model (64, 256) (set model.ffn_dim)" in text
    with pytest.warns(UserWarning, match="missing decoder.layers.1.norm3.bias"):
        model = dfx.create_model(RECIPES / "hdetr.yaml", [*overrides, "model.weights_strict=false"], weights=file)
    assert torch.equal(model.state_dict()["decoder.layers.0.norm3.bias"],
                       state["transformer.decoder.layers.0.norm3.bias"])


def test_unknown_and_corrupt_files(tmp_path):
    unknown = tmp_path / "other.pth"
    torch.save({"state_dict": {"conv.weight": torch.zeros(1)}}, unknown)
    with pytest.raises(UsageError, match="Deformable-DETR / H-Deformable-DETR checkpoint") as error:
        dfx.create_model(RECIPES / "hdetr.yaml", SMALL, weights=unknown)
    assert str(unknown) in str(error.value) and "understood" in str(error.value)
    args = official_args()
    good = save_released(tmp_path / "good.pth", official_state_dict(args), args)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(RunError, match=str(truncated)):
        dfx.create_model(RECIPES / "hdetr.yaml", SMALL, weights=truncated)


def test_class_heads_need_the_category_ids(tmp_path):
    """A recipe whose classes are not named as category ids cannot take 91-row heads silently."""
    args = official_args()
    file = save_released(tmp_path / "c.pth", official_state_dict(args), args)
    overrides = [*SMALL, "model.one2one_queries=20", "model.one2many_queries=30", "data.category_ids=null",
                 "data.classes=[a, b, c]"]
    with pytest.raises(UsageError, match=r"class_embed\.\d\.(weight|bias) has 91 rows .* set data.category_ids"):
        dfx.create_model(RECIPES / "hdetr.yaml", overrides, weights=file)


def test_dfx_eval_takes_a_recipe_and_a_released_checkpoint(tmp_path):
    """`dfx eval RECIPE model.weights=FILE data.root=…`: no run directory; the released heads' rows
    are read at the dataset's category ids (shapes-det: 1, 3, 5, 7). Bad files exit 2 and 1."""
    from typer.testing import CliRunner

    from dfx.cli import app
    from dfx.data.shapes_det import generate_shapes_det

    root = tmp_path / "shapes-det"
    generate_shapes_det(root, seed=0, train_images=2, val_images=3)
    args = official_args()
    file = save_released(tmp_path / "released.pth", official_state_dict(args), args)
    overrides = [f"data.root={root}", "model.backbone_kwargs={}", "model.frozen_bn=true", "model.dim=256",
                 "model.heads=8", *SMALL, "model.one2one_queries=20", "model.one2many_queries=30", "data.scales=[128]",
                 "data.max_size=128", "eval.batch_size=4", "eval.draw_images=0"]
    runner = CliRunner()
    result = runner.invoke(app, ["eval", str(RECIPES / "hdetr-shapes.yaml"), f"model.weights={file}", *overrides,
                                 "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert 0.0 <= payload["metrics"]["AP"] <= 1.0
    predictions = json.loads(Path(payload["predictions"]).read_text())
    assert len(predictions) == 3 * 20 * 4 and {p["category_id"] for p in predictions} == {1, 3, 5, 7}
    bad = tmp_path / "bad.pth"
    torch.save({"weights": {}}, bad)
    result = runner.invoke(app, ["eval", str(RECIPES / "hdetr-shapes.yaml"), f"model.weights={bad}", *overrides,
                                 "--device", "cpu", "--json"])
    assert result.exit_code == 2 and "bad.pth" in json.loads(result.stdout)["error"]
    bad.write_bytes(file.read_bytes()[:1000])
    result = runner.invoke(app, ["eval", str(RECIPES / "hdetr-shapes.yaml"), f"model.weights={bad}", *overrides,
                                 "--device", "cpu", "--json"])
    assert result.exit_code == 1 and "bad.pth" in json.loads(result.stdout)["error"]

"""Released DINO checkpoints (IDEA-Research/DINO and detrex) through ``model.weights``, and DINO's switches.

``dino_state_dict`` writes a state dict in IDEA-Research/DINO's layout (``models/dino/dino.py`` and
``deformable_transformer.py``: ``DINO``, ``DeformableTransformer``, ``TransformerDecoder`` with its
``ref_point_head`` and ``norm``, ``tgt_embed``, ``enc_out_*_embed``, ``label_enc``, one class and
box head shared by the decoder layers) from the module structure, with seeded values;
``detrex_state_dict`` renames such a dict (per-layer heads) into detrex's layout (detectron2's ResNet,
``neck``, ``attentions``/``ffns``/``norms``). ``dino_forward`` re-states the reference's eval forward
under DINO's names: the sine encoding of pixels, the two-stage selection by the best class, then per
decoder layer the positional query from the layer's reference box (``gen_sineembed_for_position`` in
y, x, w, h order -> ``ref_point_head``), the layer, the box refined from the raw output, the heads
reading ``norm(output)``; ``inverse_sigmoid`` with eps 1e-3. The Deformable-DETR pieces it shares
(linear, layer norm, deformable attention, box MLP) come from tests/test_official_weights.py.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from test_official_weights import (COCO_IDS, RECIPES, _box_head, _deformable, _images, _linear, _norm, official_args,
                                   official_state_dict, reference_encoder, reference_proposals, save_released)

import dfx
from dfx.detection import DeformableDETR, DetectorConfig, postprocess
from dfx.errors import UsageError

SMALL = ["model.backbone=resnet18", "model.pretrained=null", "model.encoder_layers=1", "model.decoder_layers=3",
         "model.ffn_dim=64", "model.points=2", "model.one2one_queries=20"]
LAYERS = 3
UNUSED_IDS = sorted(set(range(91)) - set(COCO_IDS))


def dino_args(**overrides) -> dict:
    """DINO_4scale.py's names where they differ from Deformable-DETR's, at the tiny test sizes."""
    return {**official_args(num_queries_one2one=20, num_queries_one2many=0), "num_classes": 91,
            "dn_labelbook_size": 91, **overrides}


def dino_state_dict(args: dict, seed: int = 0, shared: bool = True) -> dict:
    """IDEA-Research/DINO's keys and shapes for ``args`` (heads shared across layers when ``shared``)."""
    g = torch.Generator().manual_seed(seed + 100)
    base = official_state_dict(args, seed)  # backbone, input_proj, level_embed, encoder and decoder layers
    c, layers = args["hidden_dim"], args["dec_layers"]
    state = {k: v for k, v in base.items()
             if not k.startswith(("transformer.pos_trans", "transformer.decoder.", "class_embed.", "bbox_embed.",
                                  "query_embed."))}
    state.update({k: v for k, v in base.items() if k.startswith("transformer.decoder.layers.")})
    state["transformer.tgt_embed.weight"] = base["query_embed.weight"]
    for name, (out, inp) in {"layers.0": (c, 2 * c), "layers.1": (c, c)}.items():
        state[f"transformer.decoder.ref_point_head.{name}.weight"] = torch.randn(out, inp, generator=g) / math.sqrt(inp)
        state[f"transformer.decoder.ref_point_head.{name}.bias"] = 0.1 * torch.randn(out, generator=g)
    state["transformer.decoder.norm.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
    state["transformer.decoder.norm.bias"] = 0.1 * torch.randn(c, generator=g)
    for kind in ("class_embed", "bbox_embed"):  # the encoder's heads: its own copies
        prefix = f"transformer.enc_out_{kind}."
        state.update({prefix + k[len(f"{kind}.{layers}."):]: v for k, v in base.items() if k.startswith(f"{kind}.{layers}.")})
        for i in range(layers):
            source = 0 if shared else i
            state.update({f"{kind}.{i}." + k[len(f"{kind}.{source}."):]: v for k, v in base.items()
                          if k.startswith(f"{kind}.{source}.")})
    state["label_enc.weight"] = torch.randn(args["dn_labelbook_size"] + 1, c, generator=g)
    if args["num_classes"] == 91:  # rows of no COCO class stay at a trained model's low scores
        for key in [k for k in state if re.match(r"^(class_embed\.\d+|transformer\.enc_out_class_embed)\.bias$", k)]:
            state[key] = state[key].clone()
            state[key][UNUSED_IDS] = -20.0
    for key in [k for k in state if k.startswith(("class_embed.", "bbox_embed."))]:
        state["transformer.decoder." + key] = state[key]  # dino.py hands the heads to the decoder too
    return state


def detrex_state_dict(args: dict, seed: int = 0) -> tuple[dict, dict]:
    """(the model in DINO's names with per-layer heads and 80 classes, the same tensors in detrex's layout)."""
    args = {**args, "num_classes": 80, "dn_labelbook_size": 79}
    ours = dino_state_dict(args, seed, shared=False)
    layers = args["dec_layers"]
    encoder = {"self_attn.": "attentions.0.", "linear1.": "ffns.0.layers.0.0.", "linear2.": "ffns.0.layers.1.",
               "norm1.": "norms.0.", "norm2.": "norms.1."}
    decoder = {"self_attn.": "attentions.0.attn.", "norm2.": "norms.0.", "cross_attn.": "attentions.1.",
               "norm1.": "norms.1.", "linear1.": "ffns.0.layers.0.0.", "linear2.": "ffns.0.layers.1.",
               "norm3.": "norms.2."}
    detrex = {}
    for key, value in ours.items():
        name = key
        if key.startswith("backbone.0.body."):
            rest = key[len("backbone.0.body."):]
            if rest.startswith(("conv1.", "bn1.")):
                name = "backbone.stem.conv1." + ("norm." + rest[4:] if rest.startswith("bn1.") else rest[6:])
            else:
                stage, block, module, tail = re.match(r"layer(\d)\.(\d+)\.(\w+\d?(?:\.\d)?)\.(\w+)$", rest).groups()
                module = {"downsample.0": "shortcut", "downsample.1": "shortcut.norm"}.get(
                    module, re.sub(r"^bn(\d)$", r"conv\1.norm", module))
                name = f"backbone.res{int(stage) + 1}.{block}.{module}.{tail}"
        elif key.startswith("input_proj."):
            level, part, tail = key.split(".")[1:]
            where = f"convs.{level}" if int(level) < 3 else f"extra_convs.{int(level) - 3}"
            name = f"neck.{where}.{'conv' if part == '0' else 'norm'}.{tail}"
        elif key == "transformer.level_embed":
            name = "transformer.level_embeds"
        elif re.match(r"^transformer\.(encoder|decoder)\.layers\.", key):
            part, index, rest = re.match(r"^transformer\.(encoder|decoder)\.layers\.(\d+)\.(.*)$", key).groups()
            table = encoder if part == "encoder" else decoder
            prefix = next(p for p in table if rest.startswith(p))
            name = f"transformer.{part}.layers.{index}.{table[prefix]}{rest[len(prefix):]}"
        elif key.startswith("transformer.enc_out_"):
            kind = "class_embed" if "class" in key else "bbox_embed"
            name = f"{kind}.{layers}." + key.split("_embed.", 1)[1]
        elif key.startswith("transformer.decoder.") and "_embed." in key:
            continue
        detrex[name] = value
    for key in [k for k in detrex if k.startswith(("class_embed.", "bbox_embed."))]:
        detrex["transformer.decoder." + key] = detrex[key]
    return ours, detrex


# --------------------------------------------------------------------------------------------
# The reference forward, re-stated on DINO's tensors (eval mode: no denoising queries).

def _inverse_sigmoid(x, eps=1e-3):
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _sine_of_boxes(boxes):
    """gen_sineembed_for_position: 128 features per coordinate, in (y, x, w, h) order."""
    dim_t = 10000 ** (2 * (torch.arange(128, dtype=torch.float32) // 2) / 128)
    parts = []
    for coordinate in (1, 0, 2, 3):
        p = boxes[..., coordinate, None] * 2 * math.pi / dim_t
        parts.append(torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), -1).flatten(-2))
    return torch.cat(parts, -1)


@torch.no_grad()
def dino_forward(w: dict, args: dict, images, mask, temperature=20.0, offset=0.0, heads="shared"):
    """(pred_logits [B, Q, K], pred_boxes [B, Q, 4]) of the last decoder layer, as the reference computes them."""
    c, layers, queries = args["hidden_dim"], args["dec_layers"], args["num_queries_one2one"]
    memory, shapes, pad, ratios = reference_encoder(w, args, images, mask, temperature, offset)
    # gen_encoder_output_proposals, then the standard two-stage selection by the best class
    batch = images.shape[0]
    out_memory, proposals = reference_proposals(w, memory, shapes, pad)
    enc_class = _linear(w, "transformer.enc_out_class_embed", out_memory)
    enc_coord = _box_head(w, "transformer.enc_out_bbox_embed", out_memory) + proposals
    top = torch.topk(enc_class.max(-1)[0], queries, dim=1)[1]
    refpoint = torch.gather(enc_coord, 1, top[..., None].repeat(1, 1, 4))
    output = w["transformer.tgt_embed.weight"][None].repeat(batch, 1, 1)
    # TransformerDecoder
    reference = refpoint.sigmoid()
    ref_points, intermediate = [reference], []
    head = (lambda kind, i: f"{kind}.0") if heads == "shared" else (lambda kind, i: f"{kind}.{i}")
    for i in range(layers):
        name = f"transformer.decoder.layers.{i}"
        reference_input = reference[:, :, None] * torch.cat([ratios, ratios], -1)[:, None]
        sine = _sine_of_boxes(reference_input[:, :, 0, :])
        query_pos = _linear(w, "transformer.decoder.ref_point_head.layers.1",
                            _linear(w, "transformer.decoder.ref_point_head.layers.0", sine).relu())
        q = output + query_pos
        attended = F.multi_head_attention_forward(
            q.transpose(0, 1), q.transpose(0, 1), output.transpose(0, 1), c, args["nheads"],
            w[name + ".self_attn.in_proj_weight"], w[name + ".self_attn.in_proj_bias"], None, None, False, 0.0,
            w[name + ".self_attn.out_proj.weight"], w[name + ".self_attn.out_proj.bias"], training=False,
            need_weights=False)[0].transpose(0, 1)
        output = _norm(w, name + ".norm2", output + attended)
        attended = _deformable(w, name + ".cross_attn", output + query_pos, reference_input, memory, shapes, pad, args,
                               args["dec_n_points"])
        output = _norm(w, name + ".norm1", output + attended)
        output = _norm(w, name + ".norm3", output + _linear(w, name + ".linear2",
                                                             _linear(w, name + ".linear1", output).relu()))
        new_reference = (_box_head(w, head("bbox_embed", i), output) + _inverse_sigmoid(reference)).sigmoid()
        reference = new_reference.detach()
        ref_points.append(new_reference)
        intermediate.append(_norm(w, "transformer.decoder.norm", output))
    # dino.py: the heads on the normalised states, boxes on each layer's input reference
    last = layers - 1
    boxes = (_box_head(w, head("bbox_embed", last), intermediate[last]) + _inverse_sigmoid(ref_points[last])).sigmoid()
    return _linear(w, head("class_embed", last), intermediate[last]), boxes


def reference_postprocess(logits, boxes, sizes, num_select=300):
    """PostProcess(num_select): top-k over queries x classes, boxes xyxy in pixels."""
    scores, index = logits.sigmoid().view(logits.shape[0], -1).topk(num_select, dim=1)
    picked = torch.gather(boxes, 1, (index // logits.shape[2])[..., None].repeat(1, 1, 4))
    xyxy = torch.cat((picked[..., :2] - picked[..., 2:] / 2, picked[..., :2] + picked[..., 2:] / 2), -1)
    height, width = sizes.unbind(1)
    return scores, index % logits.shape[2], xyxy * torch.stack((width, height, width, height), 1)[:, None]


# --------------------------------------------------------------------------------------------

def _assert_same_detections(outputs, logits, boxes, label_of):
    sizes = torch.tensor([[96, 128], [80, 112]])
    ours = postprocess(outputs, sizes, 300)
    scores, labels, xyxy = reference_postprocess(logits, boxes, sizes)
    for image, found in enumerate(ours):
        assert len(found["scores"]) == 300
        torch.testing.assert_close(found["scores"], scores[image], rtol=1e-4, atol=1e-6)
        assert [label_of[int(k)] for k in found["labels"]] == labels[image].tolist()
        torch.testing.assert_close(found["boxes"], xyxy[image], rtol=1e-4, atol=1e-3)


def test_released_dino_checkpoint_gives_the_reference_outputs(tmp_path):
    """checkpoint0011_4scale.pth's layout (shared heads, 91 category-id rows, label_enc, tgt_embed)
    through dfx.create_model + recipes/dino.yaml (scaled down, 3 decoder layers): the reference's last
    layer logits and boxes within 1e-4, and its top-300 detections."""
    args = dino_args()
    state = dino_state_dict(args, seed=1)
    file = save_released(tmp_path / "checkpoint0011_4scale.pth", state, args)
    model = dfx.create_model(RECIPES / "dino.yaml", SMALL, weights=file)
    assert not model.training and model.config.decoder_layers == LAYERS == args["dec_layers"]
    images, mask = _images()
    with torch.no_grad():
        outputs = model(images, mask)
    logits, boxes = dino_forward(state, args, images, mask)
    assert outputs["pred_logits"].shape == (2, 20, 80) and outputs["pred_boxes"].shape == (2, 20, 4)
    torch.testing.assert_close(outputs["pred_logits"], logits[..., COCO_IDS], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outputs["pred_boxes"], boxes, rtol=1e-4, atol=1e-5)
    _assert_same_detections(outputs, logits, boxes, COCO_IDS)
    own = model.state_dict()  # the 92-row label embedding: class k is row category_ids[k], then the 11 ids
    others = [i for i in range(91) if i not in COCO_IDS]  # of 0-90 that are no category, in id order
    assert len(others) == 11 and others[:3] == [0, 12, 26]
    assert torch.equal(own["dn_label_embed.weight"], state["label_enc.weight"][COCO_IDS + others])


def test_released_detrex_checkpoint_gives_the_reference_outputs(tmp_path):
    """dino_r50_4scale_12ep.pth's layout (detectron2 names, per-layer heads, 80 classes) through
    recipes/dino-detrex.yaml: detrex's encoding (temperature 10000, offset -0.5), the same forward."""
    args = dino_args()
    ours, detrex = detrex_state_dict(args, seed=2)
    assert "backbone.res2.0.conv1.norm.running_var" in detrex and "neck.extra_convs.0.conv.weight" in detrex
    file = tmp_path / "dino_r50_4scale_12ep.pth"
    torch.save({"model": detrex, "iteration": 89999}, file)
    model = dfx.create_model(RECIPES / "dino-detrex.yaml", SMALL, weights=file)
    images, mask = _images()
    with torch.no_grad():
        outputs = model(images, mask)
    logits, boxes = dino_forward(ours, {**args, "num_classes": 80}, images, mask, temperature=10000.0, offset=-0.5,
                                 heads="per-layer")
    assert outputs["pred_logits"].shape == (2, 20, 80)
    torch.testing.assert_close(outputs["pred_logits"], logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outputs["pred_boxes"], boxes, rtol=1e-4, atol=1e-5)
    _assert_same_detections(outputs, logits, boxes, list(range(80)))


@pytest.mark.parametrize("change, fault", [
    ({"query_position": "proposal"}, "one positional query for every layer"),
    ({"decoder_norm": False}, "no final norm"),
    ({"position_temperature": 10000.0}, "Deformable-DETR's temperature"),
    ({"position_offset": -0.5}, "pixel-centre offset"),
])
def test_each_dino_switch_changes_the_outputs(change, fault):
    """The reference comparison above fails when any one of DINO's switches is off: each changes the
    last layer's outputs of the same weights (3 decoder layers)."""
    config = dfx.create_model(RECIPES / "dino.yaml", [*SMALL, "model.num_classes=80"]).config
    torch.manual_seed(0)
    dino = DeformableDETR(config).eval()
    other = DeformableDETR(DetectorConfig(**{**vars(config), **change})).eval()
    # trained-looking weights: the fresh box heads' last layers are zero (boxes = proposals)
    state = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in dino.state_dict().items()}
    dino.load_state_dict(state)
    other.load_state_dict(state, strict=False)
    images, mask = _images()
    with torch.no_grad():
        a, b = dino(images, mask), other(images, mask)
    assert not torch.allclose(a["pred_boxes"], b["pred_boxes"], rtol=1e-3, atol=1e-4), fault
    assert not torch.allclose(a["pred_logits"], b["pred_logits"], rtol=1e-3, atol=1e-4), fault


def test_the_heads_read_the_normalised_state_and_the_reference_the_raw_one():
    """With the final norm, layer l's box is the head on norm(output) over the layer's input
    reference, while layer l+1 samples around the box refined from the raw output (3 layers)."""
    config = dfx.create_model(RECIPES / "dino.yaml", [*SMALL, "model.num_classes=80"]).config
    torch.manual_seed(0)
    model = DeformableDETR(config).eval()
    model.load_state_dict({k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()})
    raw, refs = [], []
    for layer in model.decoder.layers:
        layer.register_forward_hook(lambda module, args, out: raw.append(out))
        layer.cross_attn.register_forward_hook(lambda module, args, out: refs.append(args[1][:, :, 0]))
    images = _images()[0]
    with torch.no_grad():  # no padding: every valid ratio is 1, the sampled reference is the box itself
        out = model(images)
        boxes = [*[a["pred_boxes"] for a in out["aux_outputs"]], out["pred_boxes"]]
        head = model.box_heads[0]
        for layer in range(LAYERS):
            base = _inverse_sigmoid(refs[layer])
            on_norm = (head(model.decoder.norm(raw[layer])) + base).sigmoid()
            on_raw = (head(raw[layer]) + base).sigmoid()
            torch.testing.assert_close(boxes[layer], on_norm, rtol=1e-5, atol=1e-6)
            assert not torch.allclose(on_norm, on_raw, atol=1e-3)
            if layer + 1 < LAYERS:
                torch.testing.assert_close(refs[layer + 1], on_raw, rtol=1e-5, atol=1e-6)


# --- the other switches ---------------------------------------------------------------------------

TINY_DINO = dict(num_classes=3, backbone="resnet10t", frozen_bn=False, dim=32, heads=4, levels=4, points=2,
                 encoder_layers=1, decoder_layers=3, ffn_dim=64, dropout=0.0, one2one_queries=5, two_stage=True,
                 box_refine=True, mixed_query_selection=True, look_forward_twice=True,
                 two_stage_scoring="class_aware")
TARGETS = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]])},
           {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]


def test_encoder_loss_scores_only_the_selected_proposals():
    """DINO's interm outputs: the encoder heads at the top-Q proposals (Q = one2one_queries), not every
    token; the boxes keep their gradient to the encoder's box head."""
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 80)
    every = DeformableDETR(DetectorConfig(**TINY_DINO)).train()
    selected = DeformableDETR(DetectorConfig(**TINY_DINO, encoder_loss="selected")).train()
    selected.load_state_dict(every.state_dict())
    tokens = every(images)["enc_outputs"]
    out = selected(images)["enc_outputs"]
    assert tokens["pred_logits"].shape[1] > 100 and out["pred_logits"].shape == (2, 5, 3)
    top = tokens["pred_logits"].max(-1).values.topk(5, dim=1).indices
    torch.testing.assert_close(out["pred_logits"], torch.gather(tokens["pred_logits"], 1, top[..., None].expand(-1, -1, 3)))
    torch.testing.assert_close(out["pred_boxes"], torch.gather(tokens["pred_boxes"], 1, top[..., None].expand(-1, -1, 4)))
    out["pred_boxes"].sum().backward()
    assert selected.enc_box_head.layers[-1].weight.grad.abs().sum() > 0


def test_shared_heads_are_one_module_for_every_layer():
    """DINO_4scale's dec_pred_{class,bbox}_embed_share: one head pair; moving its bias moves every layer's logits."""
    model = DeformableDETR(DetectorConfig(**TINY_DINO, shared_heads=True)).eval()
    per_layer = DeformableDETR(DetectorConfig(**TINY_DINO))
    assert len(model.class_heads) == len(model.box_heads) == 1
    assert len(per_layer.class_heads) == len(per_layer.box_heads) == 3
    images = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        before = model(images)
        model.class_heads[0].bias.add_(1.0)
        after = model(images)
    for a, b in zip([*before["aux_outputs"], before], [*after["aux_outputs"], after]):
        torch.testing.assert_close(b["pred_logits"], a["pred_logits"] + 1.0)


def test_content_queries_start_xavier_uniform_with_dino():
    """DINO's tgt_embed is xavier-initialised by the transformer's reset (bound sqrt(6 / (Q + C)));
    Deformable-DETR's mixed-selection queries keep nn.Embedding's N(0, 1)."""
    torch.manual_seed(0)
    config = {**TINY_DINO, "one2one_queries": 300, "dim": 256, "heads": 8}
    xavier = DeformableDETR(DetectorConfig(**config, content_query_init="xavier")).content_queries.weight.detach()
    normal = DeformableDETR(DetectorConfig(**config)).content_queries.weight.detach()
    bound = math.sqrt(6 / (300 + 256))
    assert xavier.abs().max() <= bound and xavier.std() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert normal.std() == pytest.approx(1.0, rel=0.05)


def test_inverse_sigmoid_eps_reaches_the_box_refinement():
    """A reference side of 1e-4: DINO's eps 1e-3 clamps its logit at log(1e-3), Deformable-DETR's 1e-5 does not."""
    from dfx.detection.transformer import _refine

    reference = torch.tensor([[[0.5, 0.5, 1e-4, 0.2]]])
    delta = torch.zeros(1, 1, 4)
    assert _refine(reference, delta, 1e-3)[0, 0, 2] == pytest.approx(1e-3 / (1 + 1e-3), rel=1e-4)
    assert _refine(reference, delta)[0, 0, 2] == pytest.approx(1e-4, rel=1e-3)
    decoder = DeformableDETR(DetectorConfig(**TINY_DINO, inverse_sigmoid_eps=1e-3)).decoder
    assert decoder.eps == 1e-3


def test_switch_errors_name_the_fix():
    with pytest.raises(ValueError, match="query_position per_layer .* set two_stage: true"):
        DetectorConfig(**{**TINY_DINO, "two_stage": False, "mixed_query_selection": False,
                          "query_position": "per_layer"}).validate()
    with pytest.raises(ValueError, match="encoder_loss selected .* set two_stage: true"):
        DetectorConfig(**{**TINY_DINO, "two_stage": False, "mixed_query_selection": False,
                          "encoder_loss": "selected"}).validate()
    with pytest.raises(UsageError, match=r"model\.query_position: expected one of 'proposal', 'per_layer'"):
        dfx.create_model(RECIPES / "dino.yaml", [*SMALL, "model.num_classes=80", "model.query_position=box"])


# --- the recipes ----------------------------------------------------------------------------------

def test_dino_recipe_is_the_reference_config():
    """recipes/dino.yaml against config/DINO/DINO_4scale.py (+ the scripts' dn_box_noise_scale=1.0) and
    recipes/dino-detrex.yaml against detrex's dino_r50_4scale_12ep."""
    from dfx.recipe import load_recipe

    official, detrex = load_recipe(RECIPES / "dino.yaml"), load_recipe(RECIPES / "dino-detrex.yaml")
    m, t, loss = official.model, official.train, official.loss
    assert (m.one2one_queries, m.one2many_queries, m.detections, m.ffn_dim, m.dropout, m.levels, m.points) == \
        (900, 0, 300, 2048, 0.0, 4, 4)
    assert (m.query_position, m.decoder_norm, m.encoder_loss, m.shared_heads, m.content_query_init) == \
        ("per_layer", True, "selected", True, "xavier")
    assert (m.two_stage, m.box_refine, m.mixed_query_selection, m.look_forward_twice, m.two_stage_scoring) == \
        (True, True, True, True, "class_aware")
    assert (m.inverse_sigmoid_eps, m.position_temperature, m.position_offset) == (1e-3, 20, 0.0)
    assert (m.dn_queries, m.label_noise, m.box_noise, m.backbone_frozen_stages) == (100, 0.5, 1.0, 1)
    assert (m.dn_label_book, detrex.model.dn_label_book) == (91, 0)  # DINO: num_classes=91; detrex: 80
    assert (loss.class_weight, loss.bbox_weight, loss.giou_weight, loss.cost_class, loss.cost_bbox, loss.cost_giou) \
        == (1.0, 5.0, 2.0, 2.0, 5.0, 2.0)
    assert (t.lr, t.backbone_lr, t.offset_lr_mult, t.weight_decay, t.grad_clip, t.epochs, t.milestones,
            t.batch_size, t.norm_weight_decay) == (1e-4, 1e-5, 1.0, 1e-4, 0.1, 12, [11], 16, None)
    d, dt = detrex.model, detrex.train
    assert (d.shared_heads, d.position_temperature, d.position_offset, d.box_noise, d.label_noise) == \
        (False, 10000, -0.5, 1.0, 0.5)
    assert (d.query_position, d.decoder_norm, d.encoder_loss, d.inverse_sigmoid_eps, d.detections) == \
        ("per_layer", True, "selected", 1e-3, 300)
    assert (dt.lr, dt.backbone_lr, dt.offset_lr_mult, dt.weight_decay, dt.norm_weight_decay) == \
        (1e-4, 1e-5, 1.0, 1e-4, 0.0)


def test_norm_parameters_skip_weight_decay_with_detrex(tmp_path):
    """detrex: get_default_optimizer_params(weight_decay_norm=0) — LayerNorm and GroupNorm parameters
    in groups of weight decay 0; IDEA-Research/DINO decays everything."""
    from dfx.recipe import load_recipe
    from dfx.tasks.detection import Task

    decays = {}
    for recipe in ("dino.yaml", "dino-detrex.yaml"):
        task = Task(load_recipe(RECIPES / recipe, [*SMALL[:-1], "model.one2one_queries=5"]))
        task.classes = [str(i) for i in range(80)]
        model = task.build_model()
        decay = {id(p): g.get("weight_decay") for g in task.param_groups(model) for p in g["params"]}
        assert len(decay) == sum(1 for p in model.parameters() if p.requires_grad)
        layer = model.decoder.layers[0]
        decays[recipe] = [decay[id(p)] for p in (layer.norm1.weight, model.input_proj.layers[0][1].bias,
                                                 model.decoder.norm.bias, layer.ffn[0].weight, layer.ffn[0].bias)]
    # LayerNorm, GroupNorm, the decoder's norm; a linear weight and bias keep train.weight_decay (None)
    assert decays == {"dino.yaml": [None] * 5, "dino-detrex.yaml": [0.0, 0.0, 0.0, None, None]}


# --- the loader's errors --------------------------------------------------------------------------

def test_a_checkpoint_of_another_detector_names_what_to_change(tmp_path):
    args = dino_args()
    dino = save_released(tmp_path / "dino.pth", dino_state_dict(args), args)
    with pytest.raises(UsageError, match="DINO one .*use recipes/dino.yaml or set model.query_position=per_layer "
                                         "model.decoder_norm=true"):
        dfx.create_model(RECIPES / "hdetr.yaml", SMALL, weights=dino)
    hdetr_args = official_args()
    hdetr = save_released(tmp_path / "hdetr.pth", official_state_dict(hdetr_args), hdetr_args)
    with pytest.raises(UsageError, match="model.query_position=proposal model.decoder_norm=false "
                                         "model.shared_heads=false"):
        dfx.create_model(RECIPES / "dino.yaml", SMALL, weights=hdetr)
    _, detrex = detrex_state_dict(args)
    file = tmp_path / "detrex.pth"
    torch.save({"model": detrex}, file)
    with pytest.raises(UsageError, match="detrex layout.*use recipes/dino-detrex.yaml or set model.shared_heads=false"):
        dfx.create_model(RECIPES / "dino.yaml", SMALL, weights=file)


def test_a_misshaped_dino_checkpoint_names_keys_and_shapes(tmp_path):
    args = dino_args()
    state = dino_state_dict(args)
    del state["transformer.decoder.norm.bias"]
    file = save_released(tmp_path / "broken.pth", state, args)
    with pytest.raises(UsageError) as error:
        dfx.create_model(RECIPES / "dino.yaml", [*SMALL[:-1], "model.one2one_queries=30"], weights=file)
    text = str(error.value)
    assert "missing decoder.norm.bias (256,)" in text and str(file) in text
    assert "content_queries.weight: checkpoint (20, 256) vs model (30, 256)" in text


@pytest.mark.slow  # a full-size R50 DINO-4scale
@pytest.mark.parametrize("layout", ["dino", "detrex"])
def test_full_size_released_dino_layouts_load_strictly(layout, tmp_path):
    args = dino_args(backbone="resnet50", enc_layers=6, dec_layers=6, dim_feedforward=2048, enc_n_points=4,
                     dec_n_points=4, num_queries_one2one=900)
    if layout == "dino":
        state = dino_state_dict(args)
        file = save_released(tmp_path / "checkpoint0011_4scale.pth", state, args)
        recipe = "dino.yaml"
    else:
        _, state = detrex_state_dict(args)
        file = tmp_path / "dino_r50_4scale_12ep.pth"
        torch.save({"model": state}, file)
        recipe = "dino-detrex.yaml"
    model = dfx.create_model(RECIPES / recipe, ["model.pretrained=null"], weights=file)
    own = model.state_dict()
    assert own["content_queries.weight"].shape == (900, 256)
    assert torch.equal(own["decoder.ref_point_head.layers.0.weight"],
                       state["transformer.decoder.ref_point_head.layers.0.weight"])
    if layout == "dino":
        assert len(model.class_heads) == 1 and torch.equal(own["class_heads.0.weight"], state["class_embed.5.weight"][COCO_IDS])
        assert torch.equal(own["decoder.layers.5.norm1.weight"], state["transformer.decoder.layers.5.norm2.weight"])
    else:
        assert len(model.class_heads) == 6 and torch.equal(own["enc_class_head.weight"], state["class_embed.6.weight"])
        assert torch.equal(own["backbone.body.layer4.2.bn3.running_var"], state["backbone.res5.2.conv3.norm.running_var"])
        assert torch.equal(own["decoder.layers.5.norm1.weight"], state["transformer.decoder.layers.5.norms.0.weight"])


def test_dfx_eval_takes_a_released_dino_checkpoint(tmp_path):
    """`dfx eval recipes/dino-shapes.yaml model.weights=checkpoint0011_4scale.pth data.root=…`: the
    released heads' rows are read at the dataset's category ids (shapes-det: 1, 3, 5, 7)."""
    import json
    from pathlib import Path

    from typer.testing import CliRunner

    from dfx.cli import app
    from dfx.data.shapes_det import generate_shapes_det

    root = tmp_path / "shapes-det"
    generate_shapes_det(root, seed=0, train_images=2, val_images=3)
    args = dino_args()
    file = save_released(tmp_path / "checkpoint0011_4scale.pth", dino_state_dict(args), args)
    overrides = [f"data.root={root}", "model.backbone_kwargs={}", "model.frozen_bn=true", "model.dim=256",
                 "model.heads=8", *SMALL, "data.scales=[128]", "data.max_size=128", "eval.batch_size=4",
                 "eval.draw_images=0", "model.detections=300"]
    result = CliRunner().invoke(app, ["eval", str(RECIPES / "dino-shapes.yaml"), f"model.weights={file}", *overrides,
                                      "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert 0.0 <= payload["metrics"]["AP"] <= 1.0
    predictions = json.loads(Path(payload["predictions"]).read_text())
    assert len(predictions) == 3 * 20 * 4 and {p["category_id"] for p in predictions} == {1, 3, 5, 7}

"""What token clustering changes inside a model: feature fidelity, assignment sharpness, overhead.

- `feature_fidelity`: cosine similarity between the dense features (final normed patch tokens
  [B, H*W, C]) of the clustered model, which are reconstructed, and those of the unclustered one;
- `assignment_sharpness`: temperature × the typical squared token-to-centre distance at block
  alpha, which says whether the temperature suits the model's feature scale;
- `clustering_overhead`: the time a clustered forward pass spends in `token_clustering` and
  `token_reconstruction`, measured on the very tensors that pass hands them.

Plain functions of models and tensors; ``dfx cluster``'s report (dfx.cluster_report) runs them on data.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfx.cluster.tokens import token_clustering, token_reconstruction
from dfx.cluster.swin import hourglass_swin, is_swin
from dfx.cluster.wrapper import hourglass
from dfx.measure import median_seconds

# Default clustering settings (`hourglass`'s defaults), reported with every measurement.
DEFAULTS = dict(iters=5, temperature=0.02, window=5, k=20)

# `temperature="auto"` picks temperature = AUTO_SHARPNESS / D, D the median squared distance of a
# token to its nearest initial centre at block alpha: the nearest centre then outweighs one at twice
# that squared distance by e^2 (about 7x). Measured on the segmenter-shapes run (ratio 0.5): sharpness
# 0.34 / 0.67 / 1.0 / 1.7 / 3.4 cost 1.84 / 1.05 / 0.91 / 0.76 / 0.77 mIoU points (docs/cluster.md).
AUTO_SHARPNESS = 2.0


def vit_of(model: nn.Module) -> nn.Module:
    """The transformer whose tokens are clustered: the ``backbone`` of a dense model built around a ViT
    (a Segmenter, a DPT: a ``backbone`` with ``blocks``), the Swin ``backbone.body`` of a detector,
    else the model itself."""
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Module) and hasattr(backbone, "blocks"):
        return backbone
    body = getattr(backbone, "body", None)
    if isinstance(body, nn.Module) and is_swin(body):
        return body
    return model


def with_backbone(model: nn.Module, backbone: nn.Module) -> nn.Module:
    """A shallow copy of ``model`` whose ``backbone`` is ``backbone``: every other submodule, parameter
    and buffer is ``model``'s own (shared, not copied), and ``model`` is left as it was."""
    copied = copy.copy(model)
    copied._modules = dict(model._modules)  # own module table: replacing the backbone leaves model alone
    copied.backbone = backbone
    return copied


def clustered_copy(model: nn.Module, cluster_ratio: float, alpha: int | None = None, image_size: int | None = None,
                   **settings) -> nn.Module:
    """``model`` with its ViT run through `hourglass` (weights shared, ``model`` unchanged).

    A dense model (Segmenter, DPT) comes back as a shallow copy around the clustered backbone, so its
    head reads the backbone's outputs as before: a Segmenter the reconstructed final tokens, a DPT
    every tapped block, each reconstructed to full resolution when it lies after alpha (the wrapper's
    ``forward_intermediates``; Expedit-DPT reconstructs in the hooks of the tapped blocks).
    ``image_size`` checks, for dynamic-size models, that the clustered grid fits the window there.
    Raises ValueError (ratio, alpha beyond the depth, a model that is no ViT, a window larger than
    the clustered grid).
    """
    vit = vit_of(model)
    if is_swin(vit):
        clustered_vit = hourglass_swin(vit, cluster_ratio=cluster_ratio, alpha=alpha, **settings)
    else:
        clustered_vit = hourglass(vit, cluster_ratio=cluster_ratio, alpha=alpha, **settings)
        if image_size is not None:  # dynamic-size models check their grid only at a forward pass
            clustered_vit.clustered_grid(tuple(clustered_vit.patch_embed.dynamic_feat_size((image_size, image_size))))
    if vit is model:
        return clustered_vit
    if model.backbone is vit:
        return with_backbone(model, clustered_vit)
    backbone = copy.copy(model.backbone)  # a detector: its Backbone around a clustered body
    backbone._modules = dict(model.backbone._modules)
    backbone.body = clustered_vit
    return with_backbone(model, backbone)


def dense_features(model: nn.Module, images: Tensor) -> Tensor:
    """Final normed patch tokens [B, H*W, C] of the model's ViT (prefix tokens dropped); for a Swin,
    its deepest feature map (a features_only net's last output, else forward_features) as [B, H*W, C]."""
    vit = vit_of(model)
    if is_swin(vit):
        out = vit(images)[-1] if hasattr(vit, "return_layers") else vit.forward_features(images)
        return out.flatten(1, 2)  # NHWC -> [B, H*W, C]
    return vit.forward_features(images)[:, vit.num_prefix_tokens:]


@torch.no_grad()
def feature_fidelity(baseline: nn.Module, clustered: nn.Module, images: Tensor, batch: int = 8) -> dict:
    """Cosine similarity of the clustered model's dense features to the baseline's, per token.

    images [N, 3, H, W] -> {"cosine_mean", "cosine_min", "tokens"} over all N·H·W patch tokens.
    """
    cosines = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        reference, reconstructed = dense_features(baseline, chunk), dense_features(clustered, chunk)
        cosines.append(F.cosine_similarity(reconstructed.double(), reference.double(), dim=-1).flatten())
    cosines = torch.cat(cosines)
    return {"cosine_mean": float(cosines.mean()), "cosine_min": float(cosines.min()), "tokens": cosines.numel()}


def _block_outputs(clustered: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """One forward pass of a clustered model: tokens leaving block alpha (before clustering,
    [B, prefix + H*W, C]) and leaving the last block ([B, prefix + h*w, C] when alpha < depth)."""
    vit = vit_of(clustered)
    seen: dict[str, Tensor] = {}
    hooks = [vit.blocks[vit.hourglass_config.alpha - 1].register_forward_hook(
                 lambda m, i, o: seen.setdefault("alpha", o)),
             vit.blocks[-1].register_forward_hook(lambda m, i, o: seen.update(last=o))]
    try:
        clustered(images)
    finally:
        for hook in hooks:
            hook.remove()
    return seen["alpha"], seen["last"]


@torch.no_grad()
def assignment_sharpness(clustered: nn.Module, images: Tensor, batch: int = 8) -> dict:
    """How sharp the soft assignment is for this model's features at block alpha.

    distance: median over the tokens of all ``images`` of the squared distance to the nearest
    initial centre (the adaptive-average-pooled grid); sharpness = temperature · distance.
    Assignments are softmax(-temperature · D) over a token's window: with sharpness well below 1 a
    token weighs its window's centres almost alike and clustering + reconstruction blur the
    features (raise the temperature, to about 1 / distance); around 1 and above they follow the
    nearest centres. Only blocks 1 … alpha run. -> {"distance", "sharpness"}
    """
    vit = vit_of(clustered)
    config = vit.hourglass_config
    distances = []
    if is_swin(vit):  # every window against its own initial s x s centres
        side = vit.clustered_side()
        for start in range(0, len(images), batch):
            windows, _ = vit.windows_at_alpha(vit.stage_input(images[start : start + batch]))
            before = windows.flatten(2).transpose(1, 2).double()  # [B*nW, ws², C]
            centres = F.adaptive_avg_pool2d(windows.double(), (side, side)).flatten(2).transpose(1, 2)
            distances.append(torch.cdist(before, centres).square().amin(-1).flatten())
        median = float(torch.cat(distances).median())
        return {"distance": median, "sharpness": config.temperature * median}
    for start in range(0, len(images), batch):
        tokens, grid = vit._embed_tokens(images[start : start + batch])
        for block in vit.blocks[: config.alpha]:
            tokens = block(tokens)
        before = tokens[:, vit.num_prefix_tokens:].double()  # [B, H*W, C]
        centres = F.adaptive_avg_pool2d(before.unflatten(1, grid).permute(0, 3, 1, 2), vit.clustered_grid(grid))
        distances.append(torch.cdist(before, centres.flatten(2).transpose(1, 2)).square().amin(-1).flatten())
    median = float(torch.cat(distances).median())
    return {"distance": median, "sharpness": config.temperature * median}


@torch.no_grad()
def clustering_overhead(clustered: nn.Module, images: Tensor, repeats: int = 3) -> dict:
    """Seconds (median of ``repeats``) of the clustering and reconstruction calls of one forward pass.

    One forward pass of the clustered model records, with forward hooks, the tokens leaving block
    alpha (what is clustered) and leaving the last block (what is reconstructed); then
    `token_clustering` and `token_reconstruction` are timed alone on those tensors with the
    model's settings (device synchronised around each call).
    -> {"clustering_s", "reconstruction_s"}
    """
    vit = vit_of(clustered)
    if is_swin(vit):
        return _swin_overhead(vit, images, repeats)
    config, prefix = vit.hourglass_config, vit.num_prefix_tokens
    grid = tuple(vit.patch_embed.dynamic_feat_size(tuple(images.shape[-2:])))
    after_alpha, after_last = _block_outputs(clustered, images)
    before = after_alpha[:, prefix:]  # [B, H*W, C]
    patch_map = before.unflatten(1, grid).permute(0, 3, 1, 2)
    small_grid = vit.clustered_grid(grid)

    def cluster() -> Tensor:
        return token_clustering(patch_map, small_grid, config.iters, config.temperature, config.window)

    centres = cluster()
    refined = after_last[:, prefix:] if config.alpha < len(vit.blocks) else centres

    def reconstruct() -> Tensor:
        return token_reconstruction(refined, before, centres, config.k, config.temperature)

    return {"clustering_s": median_seconds(cluster, images.device, repeats),
            "reconstruction_s": median_seconds(reconstruct, images.device, repeats)}


@torch.no_grad()
def _swin_overhead(swin: nn.Module, images: Tensor, repeats: int) -> dict:
    """`clustering_overhead` of a clustered Swin: the per-window clustering of the stage holding alpha,
    and the per-window reconstruction (timed on the centres in place of the refined tokens: same shapes,
    same work)."""
    config, side = swin.hourglass_config, swin.clustered_side()
    windows, _ = swin.windows_at_alpha(swin.stage_input(images))

    def cluster() -> Tensor:
        return token_clustering(windows, (side, side), config.iters, config.temperature, config.window)

    centres = cluster()
    before = windows.flatten(2).transpose(1, 2)

    def reconstruct() -> Tensor:
        return token_reconstruction(centres, before, centres, config.k, config.temperature)

    return {"clustering_s": median_seconds(cluster, images.device, repeats),
            "reconstruction_s": median_seconds(reconstruct, images.device, repeats)}


def model_depth(vit: nn.Module) -> int:
    """Blocks of a ViT, or of all stages of a Swin."""
    if is_swin(vit):
        from dfx.cluster.swin import _stages

        return sum(len(stage.blocks) for stage in _stages(vit))
    return len(vit.blocks)


def clustering_settings(clustered: nn.Module) -> dict:
    """The settings of a wrapped model and its grids, as plain data for reports."""
    config = vit_of(clustered).hourglass_config
    return {"cluster_ratio": config.cluster_ratio, "alpha": config.alpha, "depth": model_depth(vit_of(clustered)),
            "iters": config.iters, "temperature": config.temperature, "window": config.window, "k": config.k,
            **({"clusters": config.clusters if isinstance(config.clusters, int) else list(config.clusters)}
               if config.clusters is not None else {})}

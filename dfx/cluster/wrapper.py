"""Expedit hourglass: run a pretrained timm ViT's later blocks on clustered tokens, output full resolution.

    fast = hourglass(vit, cluster_ratio=0.5)      # vit: a timm VisionTransformer (vit_*, deit_*, ...)
    fast.forward_features(images)                  # [B, prefix + H*W, C], the shape vit returns
    fast.forward_intermediates(images, indices=4)  # DPT-style features, all at H×W
    fast(images)                                   # vit's own head on the reconstructed tokens

The H×W patch grid is the image size over the patch size; `prefix` counts the class, distillation
and register tokens (`model.num_prefix_tokens`). Blocks 1 … α run as usual on prefix + H·W tokens.
After block α the patch tokens `before` [B, H*W, C] are clustered into an h×w grid of centres with
`token_clustering`; the prefix tokens are kept aside untouched and put back in front of the centres,
so blocks α+1 … depth run on prefix + h·w tokens and the prefix tokens still attend to the whole
image. After the last block the patch tokens are mapped back to H×W with
`token_reconstruction(refined, before, centres, k, temperature)`; the final norm and the head then
run as usual. `temperature` serves both the clustering and the reconstruction.

Conventions:
- `alpha` counts the blocks run at full resolution, 1 <= alpha <= depth; default
  max(1, round(0.4 · depth)): 10 of 24 (the paper's Segmenter ViT-L), 5 of 12. alpha = depth
  clusters and reconstructs with no block between, which measures their error alone.
- `cluster_ratio` r in (0, 1] keeps the aspect ratio: h = max(1, round(H·√r)), w = max(1, round(W·√r));
  40×40 at r = 0.5 gives 28×28 (the paper's setting). r = 1 keeps h×w = H×W but still runs the
  clustering and reconstruction (with iters = 0 the clustering is then the identity).
- The clustering window counts centres, so it must fit the clustered grid: an odd window <= min(h, w).
  This is checked at each forward (the grid follows the input size in dynamic-size models) and, for
  models with a fixed image size, already at construction.
- Intermediates of blocks after α are reconstructed with the very weights of the final output: all
  outputs go through one `token_reconstruction` call, concatenated along channels (the weights depend
  only on `before` and `centres`; every channel is mapped with them independently).

Wrap, not patch: `hourglass` returns a new module and leaves `model` as it was. The new module's class
is made on the fly as a subclass of the model's own class with `HourglassViT` mixed in front, so it is
an ordinary timm model (same state_dict keys, heads, pooling, `reset_classifier`,
`set_grad_checkpointing`, ...) in which only `forward_features` and `forward_intermediates` change.
Its parameters and submodules are the model's own, shared and not copied (no extra memory): training
one trains the other, and `train()` / `eval()` / `.to()` on one reach the shared submodules and
parameters of both; replacing a submodule (`reset_classifier`) or adding a hook on one leaves the
other as it was. Wrap `copy.deepcopy(model)` for an independent copy, and wrap before `torch.compile`.
Pickle and deepcopy work (the made class is rebuilt from the base class); checkpoints are state_dicts
with the base model's keys.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dfx.cluster.tokens import _check_temperature, _is_int, token_clustering, token_reconstruction

__all__ = ["HourglassConfig", "HourglassViT", "cluster_grid", "hourglass"]

# Share of the depth run at full resolution by default: the paper's alpha = 10 of 24 blocks.
_DEFAULT_ALPHA_SHARE = 0.4


@dataclass(frozen=True)
class HourglassConfig:
    """The clustering settings of a wrapped model (its `hourglass_config`); see `hourglass`."""

    cluster_ratio: float
    alpha: int
    iters: int
    temperature: float
    window: int
    k: int
    clusters: tuple[int, int] | None = None  # a fixed h×w grid of centres, in place of cluster_ratio


def hourglass(
    model: nn.Module,
    cluster_ratio: float = 0.5,
    alpha: int | None = None,
    iters: int = 5,
    temperature: float = 0.02,
    window: int = 5,
    k: int = 20,
    clusters: tuple[int, int] | None = None,
) -> nn.Module:
    """Return `model` (a timm VisionTransformer) with blocks alpha+1 … depth run on clustered tokens.

    cluster_ratio: share of the H·W patch tokens kept, in (0, 1]; alpha: blocks run at full
    resolution, in [1, depth] (None: max(1, round(0.4 · depth))); iters, temperature, window: passed to
    `token_clustering`; k, temperature: passed to `token_reconstruction`; clusters: a fixed (h, w) grid of
    centres whatever the input size (Expedit-DPT's "16x16 clusters"), in place of cluster_ratio. The
    result shares `model`'s weights; `model` itself is not changed. Wrapping a wrapped model replaces its settings.
    """
    base_class = _vit_class(model)
    depth = len(model.blocks)
    config = HourglassConfig(
        cluster_ratio=_check_cluster_ratio(cluster_ratio),
        alpha=_check_alpha(alpha, depth),
        iters=_check_int("iters", iters, minimum=0),
        temperature=_checked_temperature(temperature),
        window=_check_window(window),
        k=_check_int("k", k, minimum=1),
        clusters=check_clusters(clusters),
    )
    wrapped = _new_hourglass(base_class)
    # Own containers (parameter, module, hook dicts, ...) holding the same objects: registering a hook or
    # replacing a submodule on one of the two models leaves the other as it was.
    wrapped.__dict__.update(
        {name: copy.copy(value) if isinstance(value, (dict, list, set)) else value
         for name, value in vars(model).items()}
    )
    wrapped.hourglass_config = config
    default_grid = getattr(model.patch_embed, "grid_size", None)
    if default_grid is not None and not getattr(model, "dynamic_img_size", False):
        wrapped.clustered_grid(tuple(default_grid))  # fixed image size: fail now, not at the first forward
    return wrapped


def cluster_grid(grid: tuple[int, int], cluster_ratio: float) -> tuple[int, int]:
    """The h×w grid of about cluster_ratio · H·W centres for an H×W patch grid, aspect ratio kept.

    h = max(1, round(H·√r)), w = max(1, round(W·√r)); e.g. (40, 40), 0.5 -> (28, 28).
    """
    scale = math.sqrt(_check_cluster_ratio(cluster_ratio))
    height, width = grid
    return max(1, round(height * scale)), max(1, round(width * scale))


class HourglassViT:
    """Mixed in front of a timm VisionTransformer class by `hourglass`; not meant to be built directly.

    Overrides `forward_features` and `forward_intermediates` (same signatures and outputs as timm's);
    everything else is the base model's. `hourglass_config` holds the settings.
    """

    base_class: type[VisionTransformer]  # the wrapped model's own class, set on each made class
    hourglass_config: HourglassConfig

    def clustered_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """(h, w) for the patch grid (H, W); ValueError if the window does not fit it."""
        config = self.hourglass_config
        if config.clusters is not None:
            h, w = config.clusters
            if h > grid[0] or w > grid[1]:
                raise ValueError(
                    f"clusters={h}x{w} is larger than the {grid[0]}x{grid[1]} patch grid: give at most "
                    f"{grid[0]}x{grid[1]} clusters, or a larger image size"
                )
            source = f"clusters={h}x{w} for"
        else:
            h, w = cluster_grid(grid, config.cluster_ratio)
            source = f"cluster_ratio={config.cluster_ratio} of"
        if config.window > min(h, w):
            raise ValueError(
                f"window={config.window} does not fit the {h}x{w} clustered token grid ({source} the "
                f"{grid[0]}x{grid[1]} patch grid): window must be an odd integer in [1, {min(h, w)}]; lower window, "
                f"or raise cluster_ratio (clusters) or the image size"
            )
        return h, w

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """images x [B, 3, H_img, W_img] -> normed tokens [B, prefix + H*W, C] (full resolution)."""
        _check_no_mask(attn_mask, is_causal)
        tokens, grid = self._embed_tokens(x)
        tokens, _ = self._run_blocks(tokens, grid, self.blocks, take_indices=[])
        return self.norm(tokens)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Any:
        """timm's `forward_intermediates`, every output at the full H×W patch resolution.

        Intermediates: [B, C, H, W] (NCHW) or [B, H*W, C] (NLC), prefix tokens split off as timm does;
        final features [B, prefix + H*W, C]. With `norm`, the final norm is applied after reconstruction.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        _check_no_mask(attn_mask, is_causal)
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        batch = x.shape[0]
        tokens, grid = self._embed_tokens(x)
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        tokens, intermediates = self._run_blocks(tokens, grid, blocks, take_indices)
        if norm:
            intermediates = [self.norm(y) for y in intermediates]
        prefix = self.num_prefix_tokens
        prefix_tokens = [y[:, :prefix] for y in intermediates] if prefix else None
        intermediates = [y[:, prefix:] for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [y.reshape(batch, *grid, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if output_dict:
            result = {"image_intermediates": intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                result["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                result["image_features"] = self.norm(tokens)
            return result
        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(tokens), intermediates

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value}" for name, value in vars(self.hourglass_config).items())

    def __reduce_ex__(self, protocol):
        # The class is made per call and cannot be found by name: pickle and deepcopy rebuild it from the base.
        return _new_hourglass, (type(self).base_class,), self.__dict__

    def _embed_tokens(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """images [B, 3, H_img, W_img] -> tokens [B, prefix + H*W, C] before the blocks, and (H, W)."""
        grid = tuple(self.patch_embed.dynamic_feat_size(tuple(images.shape[-2:])))
        tokens = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(images))))
        expected = self.num_prefix_tokens + grid[0] * grid[1]
        if tokens.shape[1] != expected:
            raise ValueError(
                f"expected {expected} tokens ({self.num_prefix_tokens} prefix + a {grid[0]}x{grid[1]} patch grid) "
                f"after the embedding, got {tokens.shape[1]}: clustering needs the whole grid (patch dropout "
                f"must be off, as in eval mode)"
            )
        return tokens, grid

    def _run_blocks(
        self, x: Tensor, grid: tuple[int, int], blocks: nn.Sequential, take_indices: list[int]
    ) -> tuple[Tensor, list[Tensor]]:
        """tokens x [B, prefix + H*W, C] through `blocks`, clustering after block alpha.

        Returns the last block's tokens and the outputs of the blocks in `take_indices`, all
        [B, prefix + H*W, C]. Without block alpha among `blocks` (stop_early, pruned), no clustering.
        """
        config, prefix = self.hourglass_config, self.num_prefix_tokens
        clustered = self.clustered_grid(grid)
        taken, clustering = [], None
        for index, block in enumerate(blocks):
            x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing else block(x)
            if index in take_indices:
                taken.append(x)
            if index + 1 == config.alpha:
                before = x[:, prefix:]  # [B, H*W, C]
                patch_map = before.unflatten(1, grid).permute(0, 3, 1, 2)  # [B, C, H, W], a view
                centres = token_clustering(patch_map, clustered, config.iters, config.temperature, config.window)
                x = torch.cat([x[:, :prefix], centres], dim=1)  # [B, prefix + h*w, C]
                clustering = (before, centres, len(taken))
        if clustering is None:
            return x, taken
        before, centres, first_clustered = clustering
        outputs = [x, *taken[first_clustered:]]
        # One reconstruction for all outputs: the top-k weights are computed once and shared.
        refined = torch.cat([y[:, prefix:] for y in outputs], dim=-1)  # [B, h*w, len(outputs) * C]
        restored = token_reconstruction(refined, before, centres, config.k, config.temperature)
        restored = restored.chunk(len(outputs), dim=-1)
        full = [torch.cat([y[:, :prefix], patches], dim=1) for y, patches in zip(outputs, restored)]
        return full[0], taken[:first_clustered] + full[1:]


def _new_hourglass(base_class: type[VisionTransformer]) -> HourglassViT:
    """An empty instance (no __init__ run) of a class mixing HourglassViT in front of `base_class`."""
    made_class = type(f"Hourglass{base_class.__name__}", (HourglassViT, base_class), {"base_class": base_class})
    return made_class.__new__(made_class)


def _vit_class(model) -> type[VisionTransformer]:
    if isinstance(model, HourglassViT):
        return type(model).base_class
    if not isinstance(model, VisionTransformer):
        hint = " (wrap the model before torch.compile)" if hasattr(model, "_orig_mod") else ""
        raise ValueError(
            "model must be a timm VisionTransformer (vit_*, deit_*, including distilled and register-token "
            f"models){hint}, got {type(model).__name__}"
        )
    return type(model)


def _check_no_mask(attn_mask, is_causal) -> None:
    if attn_mask is not None or is_causal:
        raise ValueError("attn_mask and is_causal are not supported with token clustering: the token count changes")


def check_clusters(clusters) -> tuple[int, int] | None:
    """None, or (h, w) as two positive integers; ValueError otherwise."""
    if clusters is None:
        return None
    try:
        h, w = clusters
    except (TypeError, ValueError):
        raise ValueError(f"clusters must be a pair (h, w) of positive integers, got {clusters!r}") from None
    if not (_is_int(h) and _is_int(w) and h >= 1 and w >= 1):
        raise ValueError(f"clusters must be a pair (h, w) of positive integers, got {clusters!r}")
    return int(h), int(w)


def _check_cluster_ratio(cluster_ratio) -> float:
    if isinstance(cluster_ratio, bool) or not isinstance(cluster_ratio, Real) or not 0 < cluster_ratio <= 1:
        raise ValueError(f"cluster_ratio must be a number in (0, 1], got {cluster_ratio!r}")
    return float(cluster_ratio)


def _check_alpha(alpha, depth: int) -> int:
    if alpha is None:
        return max(1, round(_DEFAULT_ALPHA_SHARE * depth))
    if not _is_int(alpha) or not 1 <= alpha <= depth:
        raise ValueError(
            f"alpha (blocks run at full resolution) must be an integer in [1, {depth}] for this {depth}-block "
            f"model, got {alpha!r}"
        )
    return int(alpha)


def _check_int(name: str, value, minimum: int) -> int:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _checked_temperature(temperature) -> float:
    _check_temperature(temperature)
    return float(temperature)


def _check_window(window) -> int:
    if not _is_int(window) or window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd integer, got {window!r}")
    return int(window)

"""Expedit hourglass for timm Swin Transformers: windowed clustering inside one stage.

    fast = hourglass_swin(swin, cluster_ratio=0.5)   # swin: timm SwinTransformer or its features_only net
    fast(images)                                      # the same outputs, the stage after alpha partly clustered

Blocks are counted over all stages (Swin-T's 2 + 2 + 6 + 2 = 12). Blocks 1 … alpha run as usual. The
stage holding block alpha then carries on with fewer tokens, as Expedit-DINO and Expedit-Mask2Former do:

- its token map [B, H, W, C] is cut into the stage's ws×ws attention windows (the map is first padded
  bottom/right to whole windows by repeating its last row and column, so padding adds no new feature
  values), and every window is clustered on its own into s×s centres (`token_clustering` with the
  windows as the batch: a window's centres depend on that window only);
- the centres are laid out window by window as a map of (H/ws)·s × (W/ws)·s tokens, and the stage's
  remaining blocks run on it with window s and shift s // 2 (no shift where the clustered map is a
  single window, as timm does), their relative-position bias tables resized from (2·ws − 1)² to
  (2·s − 1)² entries by bilinear interpolation (`resize_bias_table`; align_corners=False, as
  Expedit's `F.interpolate` call);
- at the end of the stage, before the next stage's patch merging and before the stage's output is
  taken as a feature map, every window is reconstructed to ws×ws (`token_reconstruction` per window,
  from its tokens at block alpha and its centres), the padding is cut off, and every later stage runs
  as usual at full resolution.

s = round(ws·√cluster_ratio) (7 → 5 at 0.5, 12 → 8 at 0.45), or `clusters` directly. With s = ws,
iters = 0 and k = 1 clustering and reconstruction are the identity and the model computes what the
unwrapped model computes (tested). The temperature is dfx's scale s of softmax(−s·d²) throughout
(Expedit-DINO's config stores 1/s).

Wrap, not patch, as `dfx.cluster.hourglass` does for ViTs: a new object of a class made on the fly
(the model's own class with `HourglassSwin` mixed in front), sharing every parameter and submodule.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfx.cluster.tokens import _is_int, token_clustering, token_reconstruction

__all__ = ["HourglassSwin", "SwinHourglassConfig", "hourglass_swin", "is_swin", "resize_bias_table"]


@dataclass(frozen=True)
class SwinHourglassConfig:
    """The clustering settings of a wrapped Swin (its `hourglass_config`); see `hourglass_swin`."""

    cluster_ratio: float
    alpha: int
    iters: int
    temperature: float
    window: int
    k: int
    clusters: int | None = None  # s, the side of each window's clustered grid, in place of cluster_ratio


def _stages(model: nn.Module) -> list[nn.Module]:
    from timm.models.swin_transformer import SwinTransformerStage

    return [m for m in model.children() if isinstance(m, SwinTransformerStage)] or [
        m for m in getattr(model, "layers", []) if isinstance(m, SwinTransformerStage)]


def is_swin(model: nn.Module) -> bool:
    """A timm SwinTransformer, or its features_only network (stages as direct children)."""
    from timm.models.swin_transformer import SwinTransformer

    return isinstance(model, (SwinTransformer, HourglassSwin)) or (
        hasattr(model, "return_layers") and bool(_stages(model)))


def hourglass_swin(model: nn.Module, cluster_ratio: float = 0.5, alpha: int | None = None, iters: int = 5,
                   temperature: float = 0.02, window: int = 3, k: int = 20,
                   clusters: int | tuple[int, int] | None = None) -> nn.Module:
    """Return `model` (a timm Swin, or its features_only net) with one stage's later blocks clustered.

    alpha: blocks (counted over all stages) run at full resolution; the stage holding block alpha
    must have a block after it (default: the 2nd block of the second-to-last stage, Swin-T/B/L's
    stage 3, as the papers). cluster_ratio / clusters: s, the clustered side of a window; window:
    the clustering window, in centres (odd, at most s); iters, temperature, k: as `token_clustering`
    and `token_reconstruction`. ValueError on settings that do not fit the model.
    """
    from dfx.cluster.wrapper import _check_alpha, _check_cluster_ratio, _check_int, _check_window, _checked_temperature

    base_class = type(model).base_class if isinstance(model, HourglassSwin) else type(model)
    if not is_swin(model):
        raise ValueError(f"model must be a timm Swin Transformer (swin_*), got {type(model).__name__}")
    stages = _stages(model)
    depths = [len(stage.blocks) for stage in stages]
    total = sum(depths)
    if alpha is None:
        stage = max(0, len(stages) - 2)
        alpha = sum(depths[:stage]) + min(2, depths[stage] - 1) if depths[stage] > 1 else 1
    alpha = _check_alpha(alpha, total)
    stage_index, first = _stage_of(depths, alpha)
    if alpha - first >= depths[stage_index]:
        ends = [sum(depths[: i + 1]) for i in range(len(depths))]
        raise ValueError(f"alpha={alpha} is the last block of stage {stage_index + 1}: no block of that stage runs on "
                         f"the clusters; choose a block with a block of its own stage after it (not one of {ends})")
    if clusters is not None and not _is_int(clusters):
        height, width = clusters
        if height != width:
            raise ValueError(f"clusters must be square for a Swin (s x s per window), got {height}x{width}")
        clusters = height
    if clusters is not None and (not _is_int(clusters) or clusters < 1):
        raise ValueError(f"clusters must be a positive integer (the side s of a window's grid), got {clusters!r}")
    config = SwinHourglassConfig(cluster_ratio=_check_cluster_ratio(cluster_ratio), alpha=alpha,
                                 iters=_check_int("iters", iters, minimum=0),
                                 temperature=_checked_temperature(temperature), window=_check_window(window),
                                 k=_check_int("k", k, minimum=1), clusters=None if clusters is None else int(clusters))
    wrapped = _new_hourglass_swin(base_class)
    wrapped.__dict__.update({name: copy.copy(value) if isinstance(value, (dict, list, set)) else value
                             for name, value in vars(model).items()})
    wrapped.hourglass_config = config
    wrapped.clustered_side()  # fail now if the window does not fit
    return wrapped


def _stage_of(depths: list[int], alpha: int) -> tuple[int, int]:
    """(index of the stage holding block alpha (1-based count), blocks before that stage)."""
    first = 0
    for index, depth in enumerate(depths):
        if alpha <= first + depth:
            return index, first
        first += depth
    raise AssertionError(alpha)


def resize_bias_table(table: Tensor, old: int, new: int) -> Tensor:
    """A relative-position bias table [(2·old − 1)², heads] -> [(2·new − 1)², heads], bilinear."""
    if old == new:
        return table
    heads = table.shape[1]
    grid = table.transpose(0, 1).reshape(1, heads, 2 * old - 1, 2 * old - 1)
    grid = F.interpolate(grid, size=(2 * new - 1, 2 * new - 1), mode="bilinear", align_corners=False)
    return grid.reshape(heads, -1).transpose(0, 1)


def relative_index(side: int, device=None) -> Tensor:
    """[side², side²] index into a (2·side − 1)² table: (dy + side − 1)·(2·side − 1) + dx + side − 1."""
    ys, xs = torch.meshgrid(torch.arange(side, device=device), torch.arange(side, device=device), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return (ys[:, None] - ys[None] + side - 1) * (2 * side - 1) + (xs[:, None] - xs[None] + side - 1)


def partition(x: Tensor, side: int) -> Tensor:
    """[B, H, W, C] (H, W multiples of side) -> windows [B·(H/side)·(W/side), side, side, C], row-major."""
    b, h, w, c = x.shape
    x = x.view(b, h // side, side, w // side, side, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, side, side, c)


def unpartition(windows: Tensor, side: int, batch: int, rows: int, cols: int) -> Tensor:
    """Inverse of `partition`: windows [B·rows·cols, side, side, C] -> [B, rows·side, cols·side, C]."""
    c = windows.shape[-1]
    x = windows.view(batch, rows, cols, side, side, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, rows * side, cols * side, c)


def _shift_mask(height: int, width: int, side: int, shift: tuple[int, int], device, dtype) -> Tensor | None:
    """[windows, side², side²] additive mask (0 / −100) of shifted-window attention, as Swin's."""
    if not any(shift):
        return None

    def regions(length: int, s: int) -> Tensor:
        index = torch.arange(length, device=device)
        return (index >= length - side).long() + (index >= length - s).long() if s else torch.zeros_like(index)

    region = regions(height, shift[0])[:, None] * 3 + regions(width, shift[1])[None]
    windows = partition(region[None, :, :, None], side).reshape(-1, side * side)
    mask = (windows[:, None, :] != windows[:, :, None]).to(dtype) * -100.0
    return mask


def _block(block: nn.Module, x: Tensor, side: int, table: Tensor, index: Tensor) -> Tensor:
    """A timm SwinTransformerBlock's computation on x [B, H, W, C] with window `side` (H, W multiples of it).

    The shift is side // 2 where the block shifts and the map is larger than one window, 0 otherwise.
    """
    b, h, w, c = x.shape
    shifts = any(block.target_shift_size)
    shift = tuple(side // 2 if shifts and length > side else 0 for length in (h, w))
    y = block.norm1(x)
    if any(shift):
        y = torch.roll(y, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    windows = partition(y, side).reshape(-1, side * side, c)
    attn = block.attn
    n = side * side
    qkv = attn.qkv(windows).reshape(windows.shape[0], n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    bias = table[index.view(-1)].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)  # [1, heads, n, n]
    mask = _shift_mask(h, w, side, shift, x.device, x.dtype)
    if mask is not None:
        count = mask.shape[0]
        bias = (bias + mask[:, None]).unsqueeze(0).expand(b, -1, -1, -1, -1).reshape(b * count, -1, n, n)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=attn.scale)
    out = attn.proj(out.transpose(1, 2).reshape(windows.shape[0], n, -1))
    y = unpartition(out.view(-1, side, side, c), side, b, h // side, w // side)
    if any(shift):
        y = torch.roll(y, shifts=shift, dims=(1, 2))
    x = x + block.drop_path1(y)
    return x + block.drop_path2(block.mlp(block.norm2(x)))


class HourglassSwin:
    """Mixed in front of a timm Swin class by `hourglass_swin`; not meant to be built directly."""

    base_class: type
    hourglass_config: SwinHourglassConfig

    def _cluster_stage(self) -> tuple[nn.Module, int]:
        """(the stage holding block alpha, blocks of that stage run before clustering)."""
        stages = _stages(self)
        index, first = _stage_of([len(s.blocks) for s in stages], self.hourglass_config.alpha)
        return stages[index], self.hourglass_config.alpha - first

    def stage_window(self) -> int:
        """ws: the attention window of the clustered stage (its bias table's side)."""
        stage, _ = self._cluster_stage()
        return stage.blocks[0].attn.window_size[0]

    def clustered_side(self) -> int:
        """s, the side of a window's clustered grid; ValueError if it or the clustering window does not fit."""
        config, ws = self.hourglass_config, self.stage_window()
        side = config.clusters or max(1, round(ws * math.sqrt(config.cluster_ratio)))
        if side > ws:
            raise ValueError(f"clusters={side} is larger than the {ws}x{ws} attention window of the clustered stage: "
                             f"give at most {ws}")
        if config.window > side:
            raise ValueError(f"window={config.window} does not fit the {side}x{side} clustered grid of a window: "
                             f"window must be an odd integer in [1, {side}]; lower window, or raise cluster_ratio (clusters)")
        return side

    def clustered_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The clustered stage's map size for its full-resolution map size `grid` (padded to whole windows)."""
        ws, side = self.stage_window(), self.clustered_side()
        return math.ceil(grid[0] / ws) * side, math.ceil(grid[1] / ws) * side

    def stage_input(self, images: Tensor) -> Tensor:
        """images -> the clustered stage's input map [B, H, W, C] (after its downsampling)."""
        target, _ = self._cluster_stage()
        x = self.patch_embed(images)
        for stage in _stages(self):
            x = stage.downsample(x)
            if stage is target:
                return x
            x = stage.blocks(x)
        raise AssertionError("the clustered stage is not among the stages")

    def windows_at_alpha(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Stage input x [B, H, W, C] (after its downsampling) -> after blocks up to alpha, padded and cut
        into windows [B·nW, C, ws, ws], and (H, W). Used by the forward pass and the sharpness analysis."""
        stage, before = self._cluster_stage()
        for block in stage.blocks[:before]:
            x = block(x)
        return self._windows(x), tuple(x.shape[1:3])

    def _windows(self, x: Tensor) -> Tensor:
        ws = self.stage_window()
        pad_h, pad_w = -x.shape[1] % ws, -x.shape[2] % ws
        if pad_h or pad_w:  # repeat the last row / column: padding brings no new feature values
            x = F.pad(x.permute(0, 3, 1, 2), (0, pad_w, 0, pad_h), mode="replicate").permute(0, 2, 3, 1)
        self._padded = tuple(x.shape[1:3])
        return partition(x, ws).permute(0, 3, 1, 2)

    def _run_stage(self, stage: nn.Module, x: Tensor) -> Tensor:
        """One stage (downsampling and blocks), clustered if it holds block alpha."""
        x = stage.downsample(x)
        if stage is not self._cluster_stage()[0]:
            return stage.blocks(x)
        config, ws, side = self.hourglass_config, self.stage_window(), self.clustered_side()
        _, before_count = self._cluster_stage()
        batch, height, width, channels = x.shape
        windows, _ = self.windows_at_alpha(x)  # [B·nW, C, ws, ws]
        rows, cols = self._padded[0] // ws, self._padded[1] // ws
        centres = token_clustering(windows, (side, side), config.iters, config.temperature, config.window)
        y = unpartition(centres.view(-1, side, side, channels), side, batch, rows, cols)
        index = relative_index(side, x.device)
        for block in stage.blocks[before_count:]:
            table = resize_bias_table(block.attn.relative_position_bias_table, ws, side)
            y = _block(block, y, side, table, index)
        refined = partition(y, side).reshape(-1, side * side, channels)
        before = windows.flatten(2).transpose(1, 2)  # [B·nW, ws², C]
        restored = token_reconstruction(refined, before, centres, config.k, config.temperature)
        full = unpartition(restored.view(-1, ws, ws, channels), ws, batch, rows, cols)
        return full[:, :height, :width].contiguous()

    def forward_features(self, x: Tensor) -> Tensor:
        """timm's SwinTransformer.forward_features: [B, H/32, W/32, C] after the final norm."""
        x = self.patch_embed(x)
        for stage in _stages(self):
            x = self._run_stage(stage, x)
        return self.norm(x)

    def forward(self, x: Tensor):
        if not hasattr(self, "return_layers"):  # a classifier: timm's forward around our features
            return self.forward_head(self.forward_features(x))
        features = {}  # a features_only net: the outputs of its return layers, as FeatureListNet gives them
        for name, module in self.items():
            x = self._run_stage(module, x) if module in _stages(self) else module(x)
            if name in self.return_layers:
                features[self.return_layers[name]] = x
        return list(features.values())

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value}" for name, value in vars(self.hourglass_config).items())

    def __reduce_ex__(self, protocol):
        return _new_hourglass_swin, (type(self).base_class,), self.__dict__


def _new_hourglass_swin(base_class: type) -> HourglassSwin:
    made = type(f"Hourglass{base_class.__name__}", (HourglassSwin, base_class), {"base_class": base_class})
    return made.__new__(made)

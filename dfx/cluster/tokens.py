"""Expedit token clustering and token reconstruction (training-free ViT acceleration).

    centres = token_clustering(x, (h, w))                  # x [B, C, H, W] -> [B, h*w, C]
    ... the remaining ViT layers run on `centres` -> refined [B, h*w, C] ...
    out = token_reconstruction(refined, before, centres)   # before [B, H*W, C] -> [B, H*W, C]

Clustering is windowed soft k-means. Pixel i lies in the centre cell cell(i) given by
nearest-neighbour upsampling of the h×w cell index map to H×W (the `F.interpolate(mode="nearest")`
convention) and may only be assigned to the centres whose cells lie in the window×window
neighbourhood of cell(i); neighbours outside the grid do not exist. Every step uses the *current*
centres: the adaptive-average-pooled ones at the first step, then the previous step's result.

    A_ij = softmax over j in window(i) of (-temperature · ||x_i - c_j||²)   (constant for gradients)
    c_j  = Σ_i A_ij x_i / Σ_i A_ij

Cost. The papers' code builds the full (h·w) × (H·W) distance matrix and masks it. Here a pixel is
scored only against centres near it: the grid is cut into bands of grid rows, and a band's centres
can only be reached by the pixel lines of its own grid rows and window//2 grid rows above and below,
which are one contiguous slice of the flattened map. Scores and new centres are then one matrix
product per band on views of `x` (the [B, C, H, W] map is never copied), and the per-pixel
assignment lives in a [B, H·W, window²] table. Extra memory is two sets of centres plus tables
that grow with H·W·window² (times a small band factor), never with H·W·h·w.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["token_clustering", "token_reconstruction"]

# Centres per band of grid rows. Larger bands mean fewer, larger matrix products but each band also
# scores window//2 extra grid rows of pixels above and below it. On CPU small products are efficient
# (64 measured best); on an accelerator each product costs a kernel launch, so bands are larger.
_BAND_CENTRES = 64
_BAND_CENTRES_ACCELERATOR = 512
# Rows of `before` scored at once in reconstruction: bounds the [B, rows, M] score block (4 MB fp32).
_SCORE_BLOCK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class _Band:
    """Grid rows r0 … r1-1 (R of them), their centres and the P pixels that may reach them.

    `centres`: slice of the flat centre index (r0*w … r1*w).
    `pixels`: contiguous slice of the flat pixel index (row-major over H×W).
    `columns` [P, R*window]: for each pixel and each (band row, column offset) pair, the column of
        that centre among the band's R*w centres (clipped when it does not exist).
    `pairs` [P*R*window]: where that pair's assignment sits in the flat [H·W·window² + 1] table;
        pairs outside the pixel's window, or whose centre does not exist, point at the last entry.
    """

    centres: slice
    pixels: slice
    columns: Tensor
    pairs: Tensor


@dataclass(frozen=True)
class _WindowTables:
    """Index tables of one (H, W, h, w, window) geometry.

    `slot_centre` [H·W·window²]: flat centre index of each pixel's window slot, or M if none.
    `slot_pair` [H·W·window²]: where that slot's score sits among the bands' concatenated
        [P, R*window] score blocks, or `num_pairs` (a -inf filler) if the centre does not exist.
    """

    bands: list[_Band]
    slot_centre: Tensor
    slot_pair: Tensor
    num_pairs: int


def token_clustering(
    x: Tensor, grid: tuple[int, int], iters: int = 5, temperature: float = 0.02, window: int = 5
) -> Tensor:
    """Cluster a token map x [B, C, H, W] into grid = (h, w) centres [B, h*w, C] (row-major cells).

    `iters` = 0 returns the adaptive-average-pooled initial centres. Gradients reach `x` through
    the last weighted mean with its assignment held constant (through the pooling when iters = 0).
    A centre that gets no weight at all (all its assignments underflowed to 0) keeps its previous
    value, held constant for gradients, instead of becoming 0/0.
    """
    h, w = _check_clustering_args(x, grid, iters, temperature, window)
    if iters == 0:
        return F.adaptive_avg_pool2d(x, (h, w)).flatten(2).transpose(1, 2).contiguous()  # [B, M, C]
    pixels = x.flatten(2)  # [B, C, N]: a view for contiguous and channels-last maps alike
    tables = _window_tables(tuple(x.shape[-2:]), (h, w), window, x.device)
    with torch.no_grad():
        # [B, M, C] as a view of the pooled [B, C, h, w] map: no copy, freed after the first step.
        centres = F.adaptive_avg_pool2d(x, (h, w)).flatten(2).transpose(1, 2)
        for _ in range(iters - 1):
            assignment = _soft_assignment(pixels, centres, tables, temperature, window)
            centres = _weighted_mean(pixels, assignment, tables, centres)
        assignment = _soft_assignment(pixels, centres, tables, temperature, window)
    return _weighted_mean(pixels, assignment, tables, centres)


def token_reconstruction(
    x: Tensor, before: Tensor, centres: Tensor, k: int = 20, temperature: float = 0.02
) -> Tensor:
    """Map refined clustered tokens x [B, M, C] back to the N original tokens: -> [B, N, C].

    `before` [B, N, C]: token features before clustering; `centres` [B, M, C]: centres at clustering.
    w_ij = exp(-temperature · ||before_i - centres_j||²); only the k largest per token are kept (k is
    clipped to M), each row is L2-normalised (not summed to one); output_i = Σ_j w_ij x_j.

    L2 normalisation removes any positive factor common to a row, so ||before_i||² (the same for
    every j) is dropped and the exponent is taken relative to the row's largest kept score: the
    result is identical and a row can never underflow to all zeros. The k-term sums are one
    `embedding_bag` over `x`, so no dense N × M weight matrix is built; the N × M scores are formed
    in blocks of rows.
    """
    k = _check_reconstruction_args(x, before, centres, k, temperature)
    batch, tokens, _ = before.shape
    clusters, channels = x.shape[1:]
    centre_sq = centres.square().sum(-1).unsqueeze(1)  # [B, 1, M]
    rows_per_block = max(1, _SCORE_BLOCK_ELEMENTS // (batch * clusters))
    top_scores, top_index = [], []
    for start in range(0, tokens, rows_per_block):
        # -temperature·||b - c||² + temperature·||b||² = temperature·(2 b·c - ||c||²)
        scores = torch.baddbmm(
            centre_sq,
            before[:, start : start + rows_per_block],
            centres.transpose(1, 2),
            beta=-temperature,
            alpha=2 * temperature,
        )  # [B, rows, M]
        values, index = scores.topk(k, dim=-1)  # sorted: column 0 holds the row maximum
        top_scores.append(values)
        top_index.append(index)
    top_scores, top_index = torch.cat(top_scores, 1), torch.cat(top_index, 1)  # [B, N, k]
    weights = F.normalize((top_scores - top_scores[..., :1].detach()).exp(), dim=-1)
    batch_offset = torch.arange(batch, device=x.device).view(batch, 1, 1) * clusters
    out = F.embedding_bag(
        (top_index + batch_offset).view(batch * tokens, k),
        x.reshape(batch * clusters, channels),
        per_sample_weights=weights.to(x.dtype).view(batch * tokens, k),
        mode="sum",
    )
    return out.view(batch, tokens, channels)


def _soft_assignment(
    pixels: Tensor, centres: Tensor, tables: _WindowTables, temperature: float, window: int
) -> Tensor:
    """A [B, N, window²] from pixels [B, C, N] and centres [B, M, C]; slots without a centre hold 0."""
    batch, _, num_pixels = pixels.shape
    # -temperature·||x - c||² = temperature·(2 x·c - ||c||²) - temperature·||x||²; the last term is
    # the same for all of a pixel's centres and cancels in the softmax.
    centre_sq = centres.square().sum(-1).unsqueeze(-1)  # [B, M, 1]
    pair_scores = pixels.new_empty(batch, tables.num_pairs + 1)
    pair_scores[:, -1] = -math.inf
    start = 0
    for band in tables.bands:
        scores = torch.baddbmm(
            centre_sq[:, band.centres],
            centres[:, band.centres],
            pixels[:, :, band.pixels],
            beta=-temperature,
            alpha=2 * temperature,
        )  # [B, R*w, P]: every centre of the band against every pixel that may reach it
        end = start + band.columns.numel()
        pair_scores[:, start:end] = scores.transpose(1, 2).gather(2, band.columns.expand(batch, -1, -1)).flatten(1)
        start = end
    logits = pair_scores[:, tables.slot_pair].view(batch, num_pixels, window * window)
    return logits.softmax(-1)


def _weighted_mean(pixels: Tensor, assignment: Tensor, tables: _WindowTables, previous: Tensor) -> Tensor:
    """New centres [B, M, C] = Σ_i A_ij x_i / Σ_i A_ij from pixels [B, C, N] and A [B, N, window²].

    `previous` [B, M, C] fills in centres whose total weight is 0.
    """
    batch, clusters, _ = previous.shape
    flat_assignment = F.pad(assignment.flatten(1), (0, 1))  # [B, N*window² + 1]: a trailing 0
    totals = previous.new_zeros(batch, clusters + 1)
    totals.index_add_(1, tables.slot_centre, flat_assignment[:, :-1])
    totals = totals[:, :clusters]
    sums = previous.new_empty(previous.shape)
    for band in tables.bands:
        in_window = flat_assignment[:, band.pairs].view(batch, *band.columns.shape)  # [B, P, R*window]
        band_weights = in_window.new_zeros(batch, band.columns.shape[0], band.centres.stop - band.centres.start)
        band_weights.scatter_add_(2, band.columns.expand(batch, -1, -1), in_window)  # [B, P, R*w]
        band_pixels = pixels[:, :, band.pixels].transpose(1, 2)  # [B, P, C], a view
        sums[:, band.centres] = torch.bmm(band_weights.transpose(1, 2), band_pixels)
    empty = totals == 0
    sums.div_(totals.masked_fill(empty, 1.0).unsqueeze(-1))
    if empty.any():
        sums[empty] = previous[empty]
    return sums


def _window_tables(
    map_size: tuple[int, int], grid: tuple[int, int], window: int, device: torch.device
) -> _WindowTables:
    """Index tables for a map of map_size = (H, W) pixels clustered into grid = (h, w) centres."""
    height, width = map_size
    h, w = grid
    radius, slots_per_pixel = window // 2, window * window
    num_slots = height * width * slots_per_pixel
    cell_map = torch.arange(h * w, dtype=torch.float64).view(1, 1, h, w)
    cell_map = F.interpolate(cell_map, size=(height, width), mode="nearest").view(height, width).long()
    line_cell_row = cell_map[:, 0] // w  # [H] grid row of each pixel line (non-decreasing)
    col_offsets = torch.arange(-radius, radius + 1)
    centre_col = (cell_map[0] % w)[:, None] + col_offsets  # [W, window] grid column of each window column
    col_exists = (centre_col >= 0) & (centre_col < w)
    centre_col = centre_col.clamp(0, w - 1)
    slot_centre = torch.full((num_slots,), h * w)
    slot_pair = torch.full((num_slots,), -1)
    band_centres = _BAND_CENTRES if device.type == "cpu" else _BAND_CENTRES_ACCELERATOR
    rows_per_band = min(h, math.ceil(band_centres / w))
    bands, num_pairs = [], 0
    for first_row in range(0, h, rows_per_band):
        band_rows = torch.arange(first_row, min(h, first_row + rows_per_band))  # [R]
        lines = torch.nonzero((line_cell_row >= band_rows[0] - radius) & (line_cell_row <= band_rows[-1] + radius))
        first_line, end_line = int(lines[0]), int(lines[-1]) + 1  # contiguous: the map is monotone
        row_offset = band_rows - line_cell_row[first_line:end_line, None]  # [L, R]
        slot = (row_offset.clamp(-radius, radius) + radius)[:, None, :, None] * window + col_offsets + radius
        valid = (row_offset.abs() <= radius)[:, None, :, None] & col_exists[None, :, None, :]  # [L, W, R, window]
        shape = valid.shape
        columns = ((band_rows - first_row)[:, None] * w + centre_col[:, None, :]).expand(shape)
        pixel = torch.arange(first_line * width, end_line * width).view(shape[0], width, 1, 1)
        flat_slot = (pixel * slots_per_pixel + slot).expand(shape)[valid]
        slot_centre[flat_slot] = first_row * w + columns[valid]
        slot_pair[flat_slot] = num_pairs + torch.nonzero(valid.flatten()).flatten()
        num_pairs += valid.numel()
        pairs = torch.where(valid, pixel * slots_per_pixel + slot, num_slots)
        bands.append(
            _Band(
                centres=slice(first_row * w, first_row * w + band_rows.numel() * w),
                pixels=slice(first_line * width, end_line * width),
                columns=columns.reshape(shape[0] * width, -1).to(device),
                pairs=pairs.flatten().to(device),
            )
        )
    slot_pair[slot_pair < 0] = num_pairs  # the -inf filler
    return _WindowTables(bands, slot_centre.to(device), slot_pair.to(device), num_pairs)


def _check_clustering_args(x, grid, iters, temperature, window) -> tuple[int, int]:
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor [B, C, H, W], got {_describe(x)}")
    height, width = x.shape[-2:]
    try:
        h, w = grid
    except (TypeError, ValueError):
        raise ValueError(f"grid must be a pair (h, w), got {grid!r}") from None
    if not (_is_int(h) and _is_int(w) and 1 <= h <= height and 1 <= w <= width):
        raise ValueError(f"grid must be integers with 1 <= h <= H={height} and 1 <= w <= W={width}, got {grid!r}")
    if not _is_int(window) or window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd integer, got {window!r}")
    if not _is_int(iters) or iters < 0:
        raise ValueError(f"iters must be an integer >= 0, got {iters!r}")
    _check_temperature(temperature)
    return int(h), int(w)


def _check_reconstruction_args(x, before, centres, k, temperature) -> int:
    for name, value in (("x", x), ("before", before), ("centres", centres)):
        if not isinstance(value, Tensor) or value.dim() != 3 or not value.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor [B, *, C], got {_describe(value)}")
    if not x.shape[0] == before.shape[0] == centres.shape[0]:
        raise ValueError(
            f"x, before and centres must share the batch size, got {x.shape[0]}, {before.shape[0]}, {centres.shape[0]}"
        )
    if before.shape[2] != centres.shape[2]:
        raise ValueError(f"before and centres must share channels C, got {before.shape[2]} and {centres.shape[2]}")
    if x.shape[1] != centres.shape[1] or x.shape[1] == 0:
        raise ValueError(
            f"x and centres must hold the same number M >= 1 of tokens, got {x.shape[1]} and {centres.shape[1]}"
        )
    if not _is_int(k) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    _check_temperature(temperature)
    return min(int(k), x.shape[1])


def _check_temperature(temperature) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, Real) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"shape {tuple(value.shape)}, dtype {value.dtype}"
    return f"a {type(value).__name__}"

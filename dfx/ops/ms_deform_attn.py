"""Multi-scale deformable attention (Deformable DETR), in pure PyTorch.

For every query ``q``, head ``m``, level ``l`` and point ``p``::

    out[n, q, m] = sum_{l, p} a[n, q, m, l, p] * bilinear(V_l[n, :, :, m], loc[n, q, m, l, p])

``V_l`` is level ``l`` of ``value`` seen as an ``H_l x W_l`` map of ``D``-vectors. Bilinear
sampling follows ``grid_sample(mode='bilinear', padding_mode='zeros', align_corners=False)`` on
``2 * loc - 1``: pixel ``(i, j)`` is centred at ``((j + 0.5) / W, (i + 0.5) / H)`` and everything
off the map reads zero. Heads are concatenated: the output is ``[N, Lq, M * D]``.

How it is computed:

* Each level is padded with one ring of zeros and all levels are flattened into one table of
  ``D``-rows, ``[N, Sp, M, D]`` -> ``[N * Sp * M, D]``. A point then reads exactly four rows,
  its top-left neighbour ``r`` and ``r + M``, ``r + Wp * M``, ``r + (Wp + 1) * M``, whether or
  not they lie on the map: no per-corner bounds checks. Points with no corner on the map get
  weight 0.
* Forward: a single ``embedding_bag`` over all levels; every (query, head) is a bag of
  ``4 * L * P`` rows weighted by attention weight x bilinear weight. Nothing of size
  ``[..., L, P, 4, D]`` is materialised (the per-level ``grid_sample`` formulation writes
  ``[N * M, D, Lq, P]`` per level and then reduces it).
* Backward is written by hand (``_BilinearGatherSum``): ``embedding_bag``'s own gradient sorts
  all ``4 * L * P`` indices of every bag, and made forward+backward slower than the reference.

  - corner dot products ``<grad_out[bag], table[row]>`` -- a sampled dense-dense matmul on CPU,
    ``embedding_bag``'s per-sample-weight gradient kernel elsewhere -- give the gradients of the
    attention weights and the fractional offsets at point level;
  - the table gradient is the transposed gather: sort the points (not the corners) by top-left
    row once, sum each row's run of output gradients with one ``embedding_bag`` per corner, and
    ``index_add_`` the sums at the corner rows.

Measured with ``benchmarks/ms_deform_attn.py`` (Deformable-DETR shapes: batch 2, levels 100x167,
50x84, 25x42, 13x21, 8 heads x 32, 4 points; CPU, torch 2.14, default 2 threads, median ms; on a
shared 2-core VM with a load of about 5, so absolute times are inflated)::

                                      dfx   per-level grid_sample
    encoder (Lq = 22223) forward       883    2806   (3.2x)
    encoder forward+backward          4339    8881   (2.0x)
    decoder (Lq = 300) forward         274     356   (1.3x)
    decoder forward+backward           899     814   (0.9x)

With one thread (compute-bound) the decoder is 41 vs 119 ms forward and 151 vs 285 ms
forward+backward (medians of 10), the encoder about 0.8 vs 2.2 s and 4.1 vs 6.4-9 s (a few runs).
With two threads on that overloaded VM every multi-threaded op cost ~8 ms of thread wake-up
whatever its size (profiled), which is what the 300-query decoder timings show for both
implementations. Tried and dropped: autograd through ``embedding_bag`` (its gradient sorts every
corner index; forward+backward ended slower than the reference), chunked ``index_select`` +
``bmm`` and chunked ``index_add_`` over corner rows (slower than the run sums above), and
``_embedding_bag_per_sample_weights_backward`` for the dots on CPU (half the speed of
``sampled_addmm``). On CUDA (not measured here: no GPU was available) the same path runs, with
``embedding_bag``'s per-sample-weight kernel for the dots; ``grid_sample`` could still win there.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from dfx.ops.transfer import host_tensor

# Corner order used throughout: (y0, x0), (y0, x1), (y1, x0), (y1, x1).
_CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor | Sequence[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention.

    Args:
        value: ``[N, S, M, D]`` per-head values; levels concatenated in order, each flattened
            row-major, ``S = sum(H_l * W_l)``.
        spatial_shapes: ``[L, 2]`` integer tensor of ``(H_l, W_l)``, or the same as a sequence of
            Python ``(H_l, W_l)`` int pairs; the latter spares reading the tensor back to the host
            (a device synchronisation on a GPU) in every call.
        sampling_locations: ``[N, Lq, M, L, P, 2]`` normalised ``(x, y)``; ``[0, 1]`` spans
            the map, points outside read zeros.
        attention_weights: ``[N, Lq, M, L, P]``.

    Returns:
        ``[N, Lq, M * D]`` in ``value``'s dtype, heads concatenated. Differentiable in
        ``value``, ``sampling_locations`` and ``attention_weights``.
    """
    level_sizes = _check_inputs(value, spatial_shapes, sampling_locations, attention_weights)
    if torch.onnx.is_in_onnx_export():  # the custom autograd function has no ONNX form; GridSample does
        return ms_deform_attn_grid_sample(value, level_sizes, sampling_locations, attention_weights)
    batch, num_queries, heads, _, points, _ = sampling_locations.shape
    layout = _TableLayout.build(level_sizes, batch, num_queries, heads, value.shape[-1], points)
    top_left, frac, weight = _sampling_points(sampling_locations, attention_weights, layout)
    out = _BilinearGatherSum.apply(value, top_left, frac, weight, layout)
    return out.view(batch, num_queries, heads * layout.head_dim)


def ms_deform_attn_grid_sample(value: Tensor, level_sizes: list[tuple[int, int]], sampling_locations: Tensor,
                               attention_weights: Tensor) -> Tensor:
    """The same result from standard operators only: one ``grid_sample`` per level.

    This is the path ONNX export traces (GridSample, opset >= 16); ``level_sizes`` are Python
    ints, so the exported graph has the levels' sizes fixed. Slower than :func:`ms_deform_attn`
    on CPU (it materialises ``[N * M, D, Lq, P]`` per level). Shapes as in :func:`ms_deform_attn`.
    """
    _, _, heads, head_dim = value.shape
    num_queries, points = sampling_locations.shape[1], sampling_locations.shape[4]
    # the TorchScript exporter folds some float32 constants (linspace) to float64: cast back, as
    # onnxruntime's GridSample takes one dtype (a no-op outside export)
    grids = (2 * sampling_locations - 1).to(value.dtype)  # grid_sample's [-1, 1] frame
    attention_weights = attention_weights.to(value.dtype)
    maps = value.split([h * w for h, w in level_sizes], dim=1)
    out = 0
    # -1 for the batch x heads dimension: arithmetic on traced sizes would freeze the batch size
    for level, (height, width) in enumerate(level_sizes):
        level_map = maps[level].permute(0, 2, 3, 1).reshape(-1, head_dim, height, width)
        grid = grids[:, :, :, level].transpose(1, 2).reshape(-1, num_queries, points, 2)
        sampled = F.grid_sample(level_map, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        weight = attention_weights[:, :, :, level].transpose(1, 2).reshape(-1, 1, num_queries, points)
        out = out + (sampled * weight).sum(-1)  # [N * M, D, Lq]
    return out.reshape(-1, heads * head_dim, num_queries).transpose(1, 2)


def _check_inputs(value, spatial_shapes, sampling_locations, attention_weights) -> list[tuple[int, int]]:
    """Raise ValueError on bad inputs; return ``[(H_l, W_l), ...]`` as Python ints."""
    for name, tensor in (
        ("value", value),
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating point tensor, got {_describe(tensor)}")
    if value.dim() != 4:
        raise ValueError(f"value must be [N, S, M, D], got shape {tuple(value.shape)}")
    level_sizes = _level_sizes(spatial_shapes)
    if any(h < 1 or w < 1 for h, w in level_sizes):
        raise ValueError(f"spatial_shapes must hold (H, W) >= 1 per level, got {level_sizes}")
    batch, tokens, heads, _ = value.shape
    total = sum(h * w for h, w in level_sizes)
    if tokens != total:
        raise ValueError(f"value has S={tokens} tokens but spatial_shapes {level_sizes} need sum(H*W)={total}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"sampling_locations must be [N, Lq, M, L, P, 2], got shape {tuple(sampling_locations.shape)}"
        )
    expected = (batch, sampling_locations.shape[1], heads, len(level_sizes), sampling_locations.shape[4])
    if tuple(sampling_locations.shape[:5]) != expected:
        raise ValueError(
            f"sampling_locations has shape {tuple(sampling_locations.shape)}, expected "
            f"[N={batch}, Lq, M={heads}, L={len(level_sizes)}, P, 2]"
        )
    if tuple(attention_weights.shape) != expected:
        raise ValueError(
            f"attention_weights must be [N, Lq, M, L, P] = {list(expected)}, got {list(attention_weights.shape)}"
        )
    tensors = (value, sampling_locations, attention_weights)
    devices = {str(t.device) for t in (*tensors, spatial_shapes) if isinstance(t, Tensor)}
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(devices)}")
    return level_sizes


def _is_int(x) -> bool:
    """A Python int, or a 0-d integer tensor: what ``tensor.shape`` gives while a model is traced
    (ONNX export), where the sizes are fixed for the exported graph anyway."""
    if isinstance(x, Tensor):
        return x.dim() == 0 and not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)
    return isinstance(x, int) and not isinstance(x, bool)


def _level_sizes(spatial_shapes) -> list[tuple[int, int]]:
    """``[(H_l, W_l), ...]`` as Python ints from an integer ``[L, 2]`` tensor or int pairs."""
    if isinstance(spatial_shapes, Tensor):
        if spatial_shapes.is_floating_point() or spatial_shapes.is_complex() or spatial_shapes.dtype == torch.bool:
            raise ValueError(f"spatial_shapes must be an integer tensor [L, 2] or (H, W) int pairs, got "
                             f"{_describe(spatial_shapes)}")
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2 or spatial_shapes.shape[0] == 0:
            raise ValueError(f"spatial_shapes must be [L, 2] with L >= 1, got shape {tuple(spatial_shapes.shape)}")
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    pairs = list(spatial_shapes) if isinstance(spatial_shapes, (list, tuple)) else None
    if not pairs or not all(isinstance(p, (list, tuple)) and len(p) == 2 and all(map(_is_int, p)) for p in pairs):
        got = repr(pairs) if pairs is not None else _describe(spatial_shapes)
        raise ValueError(f"spatial_shapes must be an integer tensor [L, 2] or (H, W) int pairs (L >= 1), got {got}")
    return [(int(h), int(w)) for h, w in pairs]


def _describe(obj) -> str:
    if isinstance(obj, Tensor):
        return f"a {obj.dtype} tensor of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"


@dataclass(frozen=True)
class _TableLayout:
    """Where every level sits in the padded value table (plain ints).

    ``padded_starts[l]`` is the first padded token of level ``l`` in one image and
    ``padded_starts[-1]`` the padded token count ``Sp``; table row ``(n * Sp + token) * M + m``.
    """

    level_sizes: tuple[tuple[int, int], ...]
    padded_starts: tuple[int, ...]
    batch: int
    queries: int
    heads: int
    head_dim: int
    points: int

    @classmethod
    def build(cls, level_sizes, batch, queries, heads, head_dim, points) -> "_TableLayout":
        starts = [0]
        for height, width in level_sizes:
            starts.append(starts[-1] + (height + 2) * (width + 2))
        return cls(tuple(level_sizes), tuple(starts), batch, queries, heads, head_dim, points)

    @property
    def num_rows(self) -> int:
        return self.batch * self.padded_starts[-1] * self.heads

    @property
    def num_corners(self) -> int:
        return self.batch * self.queries * self.heads * len(self.level_sizes) * self.points * 4

    @property
    def index_dtype(self):
        # int32 indices halve the memory traffic of the index arithmetic and sort twice as fast
        return torch.int32 if max(self.num_rows, self.num_corners) < 2**31 else torch.int64

    def padded_maps(self, table: Tensor):
        """Yield a view ``[N, H + 2, W + 2, M, D]`` of every padded level of ``table``."""
        as_tokens = table.view(self.batch, self.padded_starts[-1], self.heads, self.head_dim)
        for (height, width), start, end in zip(self.level_sizes, self.padded_starts, self.padded_starts[1:]):
            yield as_tokens[:, start:end].view(self.batch, height + 2, width + 2, self.heads, self.head_dim)

    def levels(self, value: Tensor):
        """Yield a view ``[N, H, W, M, D]`` of every level of ``value`` ``[N, S, M, D]``."""
        start = 0
        for height, width in self.level_sizes:
            yield value[:, start : start + height * width].unflatten(1, (height, width))
            start += height * width

    def per_point(self, values, dtype, device) -> Tensor:
        """``[L * P, ...]`` tensor repeating one value (or row) per level over its points."""
        return host_tensor(values, dtype, device).repeat_interleave(self.points, dim=0)

    def corner_offsets(self, device) -> Tensor:
        """``[4, L * P]`` row offsets of the four corners from the top-left one."""
        offsets = [[dy * (w + 2) * self.heads + dx * self.heads for _, w in self.level_sizes] for dy, dx in _CORNERS]
        return host_tensor(offsets, self.index_dtype, device).repeat_interleave(self.points, dim=1)


def _padded_value_table(value: Tensor, layout: _TableLayout) -> Tensor:
    """``[N, S, M, D]`` -> ``[N * Sp * M, D]``: every level padded by one zero pixel on each side."""
    table = value.new_zeros(layout.num_rows, layout.head_dim)
    for level, padded in zip(layout.levels(value), layout.padded_maps(table)):
        padded[:, 1:-1, 1:-1] = level
    return table


def _unpadded_gradient(grad_table: Tensor, layout: _TableLayout) -> Tensor:
    """``[N * Sp * M, D]`` -> ``[N, S, M, D]``: the inverse of ``_padded_value_table`` for gradients."""
    tokens = sum(h * w for h, w in layout.level_sizes)
    grad_value = grad_table.new_empty(layout.batch, tokens, layout.heads, layout.head_dim)
    for level, padded in zip(layout.levels(grad_value), layout.padded_maps(grad_table)):
        level.copy_(padded[:, 1:-1, 1:-1])
    return grad_value


def _sampling_points(locations: Tensor, attention_weights: Tensor, layout: _TableLayout):
    """Top-left table row, fractional offset and weight of every sampling point.

    Returns ``top_left`` ``[B, K]`` (``layout.index_dtype``), ``frac`` ``[B, K, 2]`` (x, y offsets
    in ``[0, 1)`` from the top-left pixel centre) and ``weight`` ``[B, K]`` (attention weight, 0
    for points with no corner on the map); ``B = N * Lq * M`` bags of ``K = L * P`` points.
    """
    batch, num_queries, heads, num_levels, points, _ = locations.shape
    bags, device = batch * num_queries * heads, locations.device
    # float32 at least: in float16, x * W for W ~ 170 keeps only ~0.1 px.
    coord_dtype = torch.promote_types(locations.dtype, torch.float32)
    if layout.padded_starts[-1] >= 2**24:  # token indices below are formed exactly in floating point
        coord_dtype = torch.float64
    size_wh = layout.per_point([(w, h) for h, w in layout.level_sizes], coord_dtype, device)  # [K, 2]
    locations = locations.reshape(bags, num_levels * points, 2).to(coord_dtype)
    pixel = torch.addcmul(size_wh.new_tensor(-0.5), locations, size_wh)  # grid_sample's pixel centres
    top_left_xy = pixel.detach().floor()
    # some corner is on the map iff -1 <= x0 <= W - 1 and -1 <= y0 <= H - 1 (NaNs are outside)
    inside = ((top_left_xy >= -1) & (top_left_xy < size_wh)).all(-1)
    # padded token of (x0, y0) is (y0 + 1) * (W + 2) + (x0 + 1) + level start
    padded_width = size_wh[:, 0] + 2
    level_start = layout.per_point(layout.padded_starts[:-1], coord_dtype, device)
    token = torch.addcmul(top_left_xy[..., 0] + (padded_width + 1 + level_start), top_left_xy[..., 1], padded_width)
    # points with no corner on the map read their level's padded (0, 0) block with weight 0;
    # keeping them in their own level keeps every top-left row's level unique (see _table_gradient)
    token = torch.where(inside, token, level_start)
    bag = torch.arange(bags, device=device)
    bag_row = (bag // (num_queries * heads) * layout.padded_starts[-1] * heads + bag % heads).to(layout.index_dtype)
    top_left = token.to(layout.index_dtype) * heads + bag_row.unsqueeze(-1)
    weight = attention_weights.reshape(bags, num_levels * points).to(coord_dtype) * inside
    return top_left, pixel - top_left_xy, weight


def _corner_weights(frac: Tensor, weight: Tensor) -> list[Tensor]:
    """Weight times the bilinear weight of each corner, in ``_CORNERS`` order; frac ``[..., 2]``."""
    frac_x, frac_y = frac.unbind(-1)
    lower = weight * frac_y
    upper = weight - lower
    left = 1 - frac_x
    return [upper * left, upper * frac_x, lower * left, lower * frac_x]


class _BilinearGatherSum(torch.autograd.Function):
    """``out[b] = sum_{c, k} w_c[b, k] * table[top_left[b, k] + corner_offsets[c, k]]``.

    ``table = _padded_value_table(value)`` and ``w_c = _corner_weights(frac, weight)[c]``.
    value ``[N, S, M, D]``; top_left, weight ``[B, K]``; frac ``[B, K, 2]`` -> ``[B, D]``.
    Padding happens in here so that its gradient is one copy per level rather than autograd's
    slice bookkeeping (a zero-filled full-size gradient per level), and the gradients of
    ``frac`` and ``weight`` are formed from the four corner dot products at point level
    rather than by autograd at corner level (4x the elements).
    """

    @staticmethod
    def forward(ctx, value, top_left, frac, weight, layout):
        table = _padded_value_table(value, layout)
        rows = (top_left.unsqueeze(1) + layout.corner_offsets(table.device)).flatten(1)  # [B, 4 * K]
        corner_weights = torch.cat(_corner_weights(frac, weight), dim=1).to(table.dtype)
        ctx.save_for_backward(table, top_left, frac, weight)
        ctx.layout = layout
        return F.embedding_bag(rows, table, per_sample_weights=corner_weights, mode="sum")

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        table, top_left, frac, weight = ctx.saved_tensors
        layout = ctx.layout
        grad_out = grad_out.contiguous()
        grad_value = grad_frac = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_table = _table_gradient(grad_out, top_left, frac, weight, layout)
            grad_value = _unpadded_gradient(grad_table, layout)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            rows = top_left.unsqueeze(1) + layout.corner_offsets(table.device)
            dots = _row_dot_products(grad_out, table, rows).to(frac.dtype)
            frac_x, frac_y = frac.unbind(-1)
            top_left_dot, top_right_dot, bottom_left_dot, bottom_right_dot = dots.unbind(1)
            top_slope = top_right_dot - top_left_dot
            bottom_slope = bottom_right_dot - bottom_left_dot
            top = top_left_dot + frac_x * top_slope  # <grad_out, value interpolated along x>
            vertical = bottom_left_dot + frac_x * bottom_slope - top
            grad_weight = top + frac_y * vertical  # <grad_out, bilinear sample>
            grad_frac_x = top_slope + frac_y * (bottom_slope - top_slope)
            grad_frac = torch.stack([grad_frac_x, vertical], dim=-1) * weight.unsqueeze(-1)
        return grad_value, None, grad_frac, grad_weight, None


def _row_dot_products(grad_out: Tensor, table: Tensor, rows: Tensor) -> Tensor:
    """``dots[b, ...] = <grad_out[b], table[rows[b, ...]]>`` for ``rows`` ``[B, ...]``.

    On CPU a sampled dense-dense matmul (``grad_out @ table.T`` at the given entries only) is
    about twice as fast as ``embedding_bag``'s per-sample-weight gradient, which calls a BLAS dot
    per entry; the latter serves CUDA and half precision, where it is the supported kernel.
    """
    bags, per_bag = rows.shape[0], math.prod(rows.shape[1:])
    flat_rows = rows.reshape(-1)
    bag_starts = torch.arange(0, bags * per_bag + 1, per_bag, dtype=rows.dtype, device=rows.device)
    if rows.device.type == "cpu" and table.dtype in (torch.float32, torch.float64):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta")
            pattern = torch.sparse_csr_tensor(
                bag_starts,
                flat_rows,
                table.new_zeros(flat_rows.numel()),  # sampled_addmm reads these even with beta=0
                (bags, table.shape[0]),
                check_invariants=False,  # columns are unsorted and may repeat; the kernel allows it
            )
        dots = torch.sparse.sampled_addmm(pattern, grad_out, table.t(), beta=0.0).values()
    else:
        bag_of_row = torch.arange(bags, dtype=rows.dtype, device=rows.device).repeat_interleave(per_bag)
        dots = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            grad_out, table, flat_rows, bag_starts[:-1], bag_of_row, 0, -1  # mode 0 = sum
        )
    return dots.view(rows.shape)


def _table_gradient(grad_out, top_left, frac, weight, layout: _TableLayout) -> Tensor:
    """``[R, D]``: every table row sums ``corner weight * grad_out[bag]`` over the corners that read it.

    Points are sorted once by top-left row, so each distinct top-left row owns a contiguous run
    of points; one ``embedding_bag`` per corner sums every run, and ``index_add_`` puts the sums
    at the corner's row (top-left row + that level's corner offset). Work is proportional to the
    number of points, not to the table size, which matters for the decoder (300 queries).
    """
    points = top_left.shape[1]
    sorted_rows, order = torch.sort(top_left.view(-1), stable=True)
    run_rows, run_lengths = torch.unique_consecutive(sorted_rows, return_counts=True)
    run_starts = run_lengths.cumsum(0) - run_lengths
    bag_of_point = order // points
    run_point = (order.index_select(0, run_starts) % points).to(top_left.dtype)  # any point of the run
    run_offsets = layout.corner_offsets(top_left.device).index_select(1, run_point)  # [4, runs]
    sorted_weights = _corner_weights(frac.view(-1, 2).index_select(0, order), weight.view(-1).index_select(0, order))
    grad_table = grad_out.new_zeros(layout.num_rows, layout.head_dim)
    for corner_offset, corner_weight in zip(run_offsets, sorted_weights):
        run_sums = F.embedding_bag(
            bag_of_point, grad_out, run_starts, per_sample_weights=corner_weight.to(grad_out.dtype), mode="sum"
        )
        grad_table.index_add_(0, run_rows + corner_offset, run_sums)
    return grad_table

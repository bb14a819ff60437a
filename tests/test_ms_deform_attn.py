"""dfx.ops.ms_deform_attn against two independent formulations written here.

* ``per_level_grid_sample``: the straightforward formulation, one ``grid_sample`` per level.
* ``explicit_loop``: plain Python loops that compute the four bilinear corner weights by hand,
  used on tiny cases to pin the sampling convention itself (pixel centres at ``(i + 0.5) / W``,
  zeros outside).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from dfx.ops import ms_deform_attn


def per_level_grid_sample(value, spatial_shapes, sampling_locations, attention_weights):
    """[N, S, M, D], [L, 2], [N, Lq, M, L, P, 2], [N, Lq, M, L, P] -> [N, Lq, M * D].

    Samples every level with grid_sample, stacks the samples of all levels and points, then
    takes one attention-weighted sum.
    """
    batch, _, heads, head_dim = value.shape
    _, num_queries, _, levels, points, _ = sampling_locations.shape
    sizes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    grids = 2 * sampling_locations - 1
    samples = []
    for level, level_value in enumerate(value.split([h * w for h, w in sizes], dim=1)):
        height, width = sizes[level]
        maps = level_value.permute(0, 2, 3, 1).reshape(batch * heads, head_dim, height, width)
        grid = grids[:, :, :, level].permute(0, 2, 1, 3, 4).reshape(batch * heads, num_queries, points, 2)
        samples.append(F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.stack(samples, dim=3).flatten(-2)  # [N * M, D, Lq, L * P]
    weights = attention_weights.permute(0, 2, 1, 3, 4).reshape(batch * heads, 1, num_queries, levels * points)
    out = (stacked * weights).sum(-1).view(batch, heads * head_dim, num_queries)
    return out.transpose(1, 2).contiguous()


def explicit_loop(value, spatial_shapes, sampling_locations, attention_weights):
    """Same contract, one point and one corner at a time."""
    batch, _, heads, head_dim = value.shape
    _, num_queries, _, levels, points, _ = sampling_locations.shape
    sizes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    starts = [sum(h * w for h, w in sizes[:level]) for level in range(levels)]
    out = torch.zeros(batch, num_queries, heads, head_dim, dtype=torch.float64)
    for n in range(batch):
        for q in range(num_queries):
            for m in range(heads):
                for level, (height, width) in enumerate(sizes):
                    for p in range(points):
                        x = sampling_locations[n, q, m, level, p, 0].item() * width - 0.5
                        y = sampling_locations[n, q, m, level, p, 1].item() * height - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        for xi, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                            for yi, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                                if 0 <= xi < width and 0 <= yi < height:
                                    weight = attention_weights[n, q, m, level, p].item() * wx * wy
                                    out[n, q, m] += weight * value[n, starts[level] + yi * width + xi, m].double()
    return out.view(batch, num_queries, heads * head_dim)


def random_inputs(batch, sizes, heads, head_dim, queries, points, dtype=torch.float64, spread=1.4, seed=0):
    """Locations cover [-(spread-1)/2, 1 + (spread-1)/2], so some fall off the maps."""
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(sizes, dtype=torch.long)
    tokens = sum(h * w for h, w in sizes)
    value = torch.randn(batch, tokens, heads, head_dim, generator=generator, dtype=dtype)
    locations = torch.rand(batch, queries, heads, len(sizes), points, 2, generator=generator, dtype=dtype)
    locations = (locations - 0.5) * spread + 0.5
    weights = torch.rand(batch, queries, heads, len(sizes), points, generator=generator, dtype=dtype)
    weights = weights.flatten(-2).softmax(-1).view_as(weights)
    return value, spatial_shapes, locations, weights


def single_point(value_map, x, y):
    """Sample one [H, W] map (M = D = 1, one level, one point, weight 1) at normalised (x, y)."""
    height, width = value_map.shape
    value = value_map.reshape(1, height * width, 1, 1).double()
    locations = torch.tensor([x, y], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
    weights = torch.ones(1, 1, 1, 1, 1, dtype=torch.float64)
    shapes = torch.tensor([[height, width]])
    ours = ms_deform_attn(value, shapes, locations, weights).item()
    assert ours == pytest.approx(explicit_loop(value, shapes, locations, weights).item(), abs=1e-12)
    return ours


MAP = torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]])  # H = 2, W = 3


@pytest.mark.parametrize("row, col", [(0, 0), (0, 2), (1, 1), (1, 2)])
def test_pixel_centre_returns_that_pixel(row, col):
    assert single_point(MAP, (col + 0.5) / 3, (row + 0.5) / 2) == pytest.approx(MAP[row, col].item())


def test_edges_read_half_the_edge_pixel_and_corners_a_quarter():
    assert single_point(MAP, 0.0, 0.75) == pytest.approx(0.5 * 10.0)  # left edge of row 1
    assert single_point(MAP, 1.0, 0.25) == pytest.approx(0.5 * 3.0)  # right edge of row 0
    assert single_point(MAP, 0.5, 0.0) == pytest.approx(0.5 * 2.0)  # top edge of column 1
    assert single_point(MAP, 0.0, 0.0) == pytest.approx(0.25 * 1.0)
    assert single_point(MAP, 1.0, 1.0) == pytest.approx(0.25 * 30.0)


def test_between_pixel_centres_interpolates_bilinearly():
    assert single_point(MAP, 1 / 3, 0.25) == pytest.approx(1.5)  # halfway between (0, 0) and (0, 1)
    assert single_point(MAP, 1 / 3, 0.5) == pytest.approx((1 + 2 + 10 + 20) / 4)
    # a quarter of the way from centre (0, 0) towards (0, 1) and (1, 0)
    x, y = (0.5 + 0.25) / 3, (0.5 + 0.25) / 2
    expected = 0.75 * 0.75 * 1 + 0.25 * 0.75 * 2 + 0.75 * 0.25 * 10 + 0.25 * 0.25 * 20
    assert single_point(MAP, x, y) == pytest.approx(expected)


@pytest.mark.parametrize("x, y", [(-0.5, 0.5), (1.5, 0.5), (0.5, -0.3), (0.5, 1.3), (-2.0, 3.0), (1 + 1 / 6, 0.5)])
def test_points_fully_outside_read_zero(x, y):
    assert single_point(MAP, x, y) == 0.0


def test_matches_explicit_loop_on_small_multi_level_case():
    inputs = random_inputs(batch=2, sizes=[(3, 4), (2, 5), (1, 1)], heads=2, head_dim=3, queries=3, points=2)
    torch.testing.assert_close(ms_deform_attn(*inputs), explicit_loop(*inputs), rtol=0, atol=1e-12)


def test_python_level_shapes_equal_the_tensor_form_in_value_and_gradients():
    value, shapes, locations, weights = random_inputs(batch=2, sizes=[(6, 9), (3, 5), (1, 3)], heads=2, head_dim=4,
                                                      queries=5, points=3)
    results = []
    for spatial_shapes in (shapes, [(6, 9), (3, 5), (1, 3)], ((6, 9), (3, 5), (1, 3))):
        inputs = [t.detach().clone().requires_grad_() for t in (value, locations, weights)]
        out = ms_deform_attn(inputs[0], spatial_shapes, inputs[1], inputs[2])
        out.pow(2).sum().backward()
        results.append([out, *(t.grad for t in inputs)])
    for other in results[1:]:
        for expected, got in zip(results[0], other):
            assert torch.equal(expected, got)  # the same computation, bit for bit


@pytest.mark.parametrize(
    "sizes, heads, head_dim, points",
    [
        ([(6, 9), (3, 5), (2, 2), (1, 3)], 4, 8, 3),  # four non-square levels
        ([(7, 4)], 1, 5, 1),
        ([(1, 1), (4, 13)], 3, 2, 4),
    ],
)
def test_forward_and_gradients_match_per_level_grid_sample(sizes, heads, head_dim, points):
    value, shapes, locations, weights = random_inputs(2, sizes, heads, head_dim, queries=11, points=points, seed=1)
    leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
    reference_leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
    ours = ms_deform_attn(leaves[0], shapes, leaves[1], leaves[2])
    reference = per_level_grid_sample(reference_leaves[0], shapes, reference_leaves[1], reference_leaves[2])
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    upstream = torch.randn_like(ours)
    grads = torch.autograd.grad(ours, leaves, upstream)
    reference_grads = torch.autograd.grad(reference, reference_leaves, upstream)
    for name, grad, expected in zip(("value", "locations", "weights"), grads, reference_grads):
        torch.testing.assert_close(grad, expected, rtol=0, atol=1e-10, msg=f"gradient of {name}")


def test_float32_matches_float64_reference():
    value, shapes, locations, weights = random_inputs(2, [(10, 17), (5, 9), (3, 4)], 8, 32, queries=50, points=4)
    ours = ms_deform_attn(value.float(), shapes, locations.float(), weights.float())
    assert ours.dtype == torch.float32
    reference = per_level_grid_sample(value, shapes, locations, weights)
    torch.testing.assert_close(ours.double(), reference, rtol=0, atol=1e-5)


def test_gradcheck_all_three_inputs():
    value, shapes, locations, weights = random_inputs(1, [(3, 4), (2, 3)], heads=2, head_dim=2, queries=2, points=2)
    leaves = [t.requires_grad_() for t in (value, locations, weights)]
    assert torch.autograd.gradcheck(lambda v, loc, w: ms_deform_attn(v, shapes, loc, w), leaves)


def test_gradient_only_where_requested_and_zero_for_outside_points():
    value, shapes, locations, weights = random_inputs(1, [(3, 4)], heads=1, head_dim=2, queries=2, points=1)
    locations[0, 0] = -1.0  # query 0 samples far outside: no gradient may reach it
    locations.requires_grad_()
    grad = torch.autograd.grad(ms_deform_attn(value, shapes, locations, weights).sum(), locations)[0]
    assert torch.count_nonzero(grad[0, 0]) == 0 and torch.count_nonzero(grad[0, 1]) > 0


def test_non_contiguous_inputs_and_no_grad():
    value, shapes, locations, weights = random_inputs(2, [(4, 6), (2, 3)], heads=2, head_dim=4, queries=5, points=2)
    value_t = value.transpose(2, 3).contiguous().transpose(2, 3)
    locations_t = locations.transpose(0, 1).contiguous().transpose(0, 1)
    assert not value_t.is_contiguous() and not locations_t.is_contiguous()
    with torch.no_grad():
        ours = ms_deform_attn(value_t, shapes, locations_t, weights)
    torch.testing.assert_close(ours, per_level_grid_sample(value, shapes, locations, weights), rtol=0, atol=1e-12)


def test_empty_query_set():
    value, shapes, locations, weights = random_inputs(2, [(3, 3)], heads=2, head_dim=4, queries=0, points=2)
    assert ms_deform_attn(value, shapes, locations, weights).shape == (2, 0, 8)


def _low_precision_check(device, dtype):
    value, shapes, locations, weights = random_inputs(2, [(8, 12), (4, 6)], heads=2, head_dim=8, queries=20, points=3)
    moved = [t.to(device=device, dtype=dtype).requires_grad_() for t in (value, locations, weights)]
    ours = ms_deform_attn(moved[0], shapes.to(device), moved[1], moved[2])
    assert ours.dtype == dtype
    torch.testing.assert_close(
        ours.double().cpu(), per_level_grid_sample(value, shapes, locations, weights), rtol=0, atol=0.05
    )
    ours.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == dtype and torch.isfinite(t.grad).all() for t in moved)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_on_cpu(dtype):
    _low_precision_check("cpu", dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_cuda(dtype):
    if dtype != torch.float64:
        _low_precision_check("cuda", dtype)
        return
    value, shapes, locations, weights = random_inputs(2, [(8, 12), (4, 6)], 2, 8, queries=20, points=3)
    leaves = [t.cuda().requires_grad_() for t in (value, locations, weights)]
    reference_leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
    ours = ms_deform_attn(leaves[0], shapes.cuda(), leaves[1], leaves[2])
    reference = per_level_grid_sample(reference_leaves[0], shapes, reference_leaves[1], reference_leaves[2])
    torch.testing.assert_close(ours.cpu(), reference, rtol=0, atol=1e-12)
    upstream = torch.randn_like(reference)
    grads = torch.autograd.grad(ours, leaves, upstream.cuda())
    for grad, expected in zip(grads, torch.autograd.grad(reference, reference_leaves, upstream)):
        torch.testing.assert_close(grad.cpu(), expected, rtol=0, atol=1e-10)
    value, shapes, locations, weights = random_inputs(1, [(3, 4), (2, 3)], 2, 2, queries=2, points=2)
    tiny = [t.cuda().requires_grad_() for t in (value, locations, weights)]
    assert torch.autograd.gradcheck(lambda v, loc, w: ms_deform_attn(v, shapes.cuda(), loc, w), tiny)


def _valid():
    return random_inputs(1, [(2, 3), (1, 2)], heads=2, head_dim=4, queries=3, points=2)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda v, s, loc, w: (v[:, :-1], s, loc, w), r"S=7 tokens .* need sum\(H\*W\)=8"),
        (lambda v, s, loc, w: (v[0], s, loc, w), r"value must be \[N, S, M, D\]"),
        (lambda v, s, loc, w: (v.long(), s, loc, w), "value must be a floating point tensor"),
        (lambda v, s, loc, w: (v, s.float(), loc, w), "spatial_shapes must be an integer tensor"),
        (lambda v, s, loc, w: (v, s.float().tolist(), loc, w), r"integer tensor \[L, 2\] or \(H, W\) int pairs"),
        (lambda v, s, loc, w: (v, [(2, 3, 1)], loc, w), r"\(H, W\) int pairs \(L >= 1\), got \[\(2, 3, 1\)\]"),
        (lambda v, s, loc, w: (v, [], loc, w), r"\(H, W\) int pairs \(L >= 1\), got \[\]"),
        (lambda v, s, loc, w: (v, [(2, 3), (1, 0)], loc, w), r"\(H, W\) >= 1"),
        (lambda v, s, loc, w: (v, s[:, :1], loc, w), r"spatial_shapes must be \[L, 2\]"),
        (lambda v, s, loc, w: (v, s * torch.tensor([1, 0]), loc, w), r"\(H, W\) >= 1"),
        (lambda v, s, loc, w: (v, s, loc[..., :1], w), r"sampling_locations must be \[N, Lq, M, L, P, 2\]"),
        (lambda v, s, loc, w: (v, s, loc[:, :, :1], w[:, :, :1]), "M=2"),
        (lambda v, s, loc, w: (v, s, loc[:, :, :, :1], w[:, :, :, :1]), "L=2"),
        (lambda v, s, loc, w: (v, s, loc, w[..., :1]), r"attention_weights must be \[N, Lq, M, L, P\]"),
        (lambda v, s, loc, w: (v, s, loc, w.bool()), "attention_weights must be a floating point tensor"),
    ],
)
def test_invalid_inputs_raise_value_error(change, message):
    with pytest.raises(ValueError, match=message):
        ms_deform_attn(*change(*_valid()))


def test_value_error_when_spatial_shapes_do_not_cover_value():
    value, shapes, locations, weights = _valid()
    with pytest.raises(ValueError, match=r"spatial_shapes \[\(2, 3\), \(2, 2\)\]"):
        ms_deform_attn(value, torch.tensor([[2, 3], [2, 2]]), locations, weights)


def test_export_path_matches_explicit_loop_and_is_taken_under_onnx_export(monkeypatch):
    """The standard-op path ONNX export traces gives the same numbers, and is the one chosen then."""
    import importlib

    module = importlib.import_module("dfx.ops.ms_deform_attn")

    value, shapes, locations, weights = random_inputs(batch=2, sizes=[(3, 4), (2, 5), (1, 1)], heads=2, head_dim=3,
                                                      queries=3, points=2)
    sizes = [tuple(s) for s in shapes.tolist()]
    expected = explicit_loop(value, shapes, locations, weights)
    torch.testing.assert_close(module.ms_deform_attn_grid_sample(value, sizes, locations, weights), expected,
                               rtol=0, atol=1e-12)
    taken = []
    original = module.ms_deform_attn_grid_sample
    monkeypatch.setattr(module, "ms_deform_attn_grid_sample", lambda *a: taken.append(1) or original(*a))
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    torch.testing.assert_close(ms_deform_attn(value, shapes, locations, weights), expected, rtol=0, atol=1e-12)
    assert taken == [1]

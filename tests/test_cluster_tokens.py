"""Expedit token clustering / reconstruction against dense float64 references written here.

The references build the full (pixels × centres) distance matrix and an explicit window mask
from a loop over centre cells, which is the papers' formulation; dfx never builds either.
"""

import pytest
import torch
import torch.nn.functional as F

from dfx.cluster import token_clustering, token_reconstruction
from dfx.cluster import tokens as tokens_module


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny; BLAS still wakes its threads for each small product, which on a
    loaded shared machine costs milliseconds per call. One thread keeps the file fast; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- dense references (float64)


def pixel_cells(map_size, grid):
    """[H*W] (row, col) of the cell covering each pixel: nearest upsampling of the cell index map."""
    (height, width), (h, w) = map_size, grid
    index = torch.arange(h * w, dtype=torch.float64).view(1, 1, h, w)
    index = F.interpolate(index, size=(height, width), mode="nearest").flatten().long()
    return index // w, index % w


def window_mask(map_size, grid, window):
    """[H*W, h*w] bool: centre j lies in the window of pixel i's cell (cells outside the grid absent)."""
    h, w = grid
    pixel_row, pixel_col = pixel_cells(map_size, grid)
    radius = window // 2
    mask = torch.zeros(pixel_row.numel(), h * w, dtype=torch.bool)
    for centre_row in range(h):
        for centre_col in range(w):
            near = ((pixel_row - centre_row).abs() <= radius) & ((pixel_col - centre_col).abs() <= radius)
            mask[:, centre_row * w + centre_col] = near
    return mask


def dense_clustering(x, grid, iters, temperature, mask=None):
    """Soft k-means with the full distance matrix; `mask` [N, M] restricts assignments (None: none)."""
    pixels = x.flatten(2).transpose(1, 2)  # [B, N, C]
    centres = F.adaptive_avg_pool2d(x, grid).flatten(2).transpose(1, 2)
    for _ in range(iters):
        distance = ((pixels[:, :, None, :] - centres[:, None, :, :]) ** 2).sum(-1)  # [B, N, M]
        logits = -temperature * distance
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        assignment = logits.softmax(-1).detach()
        centres = assignment.transpose(1, 2) @ pixels / assignment.sum(1)[..., None]
    return centres


def dense_reconstruction(x, before, centres, k, temperature):
    distance = ((before[:, :, None, :] - centres[:, None, :, :]) ** 2).sum(-1)  # [B, N, M]
    weights = torch.exp(-temperature * distance)
    kept = weights.topk(min(k, weights.shape[-1]), dim=-1).indices
    weights = weights * torch.zeros_like(weights).scatter_(-1, kept, 1.0)
    weights = weights / weights.norm(dim=-1, keepdim=True)
    return weights @ x


def token_map(batch, channels, height, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, height, width, generator=generator, dtype=torch.float64)


SHAPES_GRIDS_WINDOWS = [
    ((2, 5, 12, 12), (4, 4), 3),  # grid divides the map
    ((2, 6, 13, 11), (5, 4), 5),  # it does not
    ((1, 4, 9, 16), (7, 5), 7),  # non-square map and grid, window wider than some of the grid
    ((3, 3, 10, 7), (3, 7), 5),  # grid as wide as the map
    ((1, 4, 16, 10), (9, 6), 3),
]


# ---------------------------------------------------------------- clustering


@pytest.mark.parametrize("shape, grid, window", SHAPES_GRIDS_WINDOWS)
@pytest.mark.parametrize("iters", [0, 1, 5])
def test_clustering_matches_dense_reference(shape, grid, window, iters, monkeypatch):
    monkeypatch.setattr(tokens_module, "_BAND_CENTRES", 2 * grid[1])  # bands of two grid rows
    x = token_map(*shape)
    expected = dense_clustering(x, grid, iters, 0.3, window_mask(shape[-2:], grid, window))
    got = token_clustering(x, grid, iters=iters, temperature=0.3, window=window)
    assert got.shape == (shape[0], grid[0] * grid[1], shape[1])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("band_centres", [1, 10**6], ids=["one-grid-row-per-band", "one-band"])
def test_band_size_does_not_change_the_result(band_centres, monkeypatch):
    """Bands are an implementation detail: one grid row each, or the whole grid at once."""
    monkeypatch.setattr(tokens_module, "_BAND_CENTRES", band_centres)
    for shape, grid, window in SHAPES_GRIDS_WINDOWS:
        x = token_map(*shape)
        expected = dense_clustering(x, grid, 2, 0.3, window_mask(shape[-2:], grid, window))
        got = token_clustering(x, grid, iters=2, temperature=0.3, window=window)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_clustering_default_arguments_and_float32():
    x = token_map(2, 8, 20, 18, seed=1) * 3
    expected = dense_clustering(x, (8, 6), 5, 0.02, window_mask((20, 18), (8, 6), 5))
    torch.testing.assert_close(token_clustering(x, (8, 6)), expected, rtol=1e-10, atol=1e-10)
    got32 = token_clustering(x.float(), (8, 6))
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), expected, rtol=1e-4, atol=1e-4)


def test_pixels_belong_to_the_nearest_upsampled_cell():
    """Window 1: one step gives each cell the mean of its own pixels. Rows 0..4 of a 5-row map fall
    in cells floor(i·3/5) = 0, 0, 1, 1, 2 (F.interpolate's nearest), not in 0, 1, 1, 2, 2."""
    x = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0], dtype=torch.float64).view(1, 1, 5, 1)
    got = token_clustering(x, (3, 1), iters=1, window=1)
    torch.testing.assert_close(got.flatten(), torch.tensor([1.5, 6.0, 16.0], dtype=torch.float64))


def test_zero_iterations_is_adaptive_average_pooling():
    x = token_map(2, 3, 11, 9)
    pooled = F.adaptive_avg_pool2d(x, (4, 5)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(token_clustering(x, (4, 5), iters=0), pooled, rtol=0, atol=0)


@pytest.mark.parametrize("grid", [(3, 4), (5, 2)])
def test_window_covering_the_grid_is_plain_soft_kmeans(grid):
    x = token_map(2, 4, 10, 9, seed=2)
    expected = dense_clustering(x, grid, 4, 0.2, mask=None)
    for window in (2 * max(grid) - 1, 2 * max(grid) + 5):
        got = token_clustering(x, grid, iters=4, temperature=0.2, window=window)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_window_restricts_assignment():
    """A 1-wide window lets a pixel join only its own cell: one step gives the block means."""
    x = token_map(1, 3, 8, 8, seed=3)
    got = token_clustering(x, (4, 4), iters=1, temperature=5.0, window=1)
    block_means = F.avg_pool2d(x, 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(got, block_means, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, token_clustering(x, (4, 4), iters=1, temperature=5.0, window=3))


def test_layout_and_batch_do_not_change_the_result():
    x = token_map(3, 6, 12, 10, seed=4)
    reference = token_clustering(x, (5, 4), temperature=0.3)
    channels_last = token_clustering(x.contiguous(memory_format=torch.channels_last), (5, 4), temperature=0.3)
    torch.testing.assert_close(channels_last, reference, rtol=1e-12, atol=1e-12)
    one_at_a_time = torch.cat([token_clustering(x[i : i + 1], (5, 4), temperature=0.3) for i in range(3)])
    torch.testing.assert_close(one_at_a_time, reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("iters", [0, 1, 3])
@pytest.mark.parametrize("band_centres", [1, 10**6], ids=["one-grid-row-per-band", "one-band"])
def test_clustering_gradient_matches_dense_reference(iters, band_centres, monkeypatch):
    monkeypatch.setattr(tokens_module, "_BAND_CENTRES", band_centres)
    x = token_map(2, 4, 9, 11, seed=5)
    probe = torch.randn(2, 12, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_ref, x_dfx = x.clone().requires_grad_(), x.clone().requires_grad_()
    mask = window_mask((9, 11), (3, 4), 3)
    (dense_clustering(x_ref, (3, 4), iters, 0.3, mask) * probe).sum().backward()
    (token_clustering(x_dfx, (3, 4), iters=iters, temperature=0.3, window=3) * probe).sum().backward()
    assert x_dfx.grad.abs().sum() > 0
    torch.testing.assert_close(x_dfx.grad, x_ref.grad, rtol=1e-10, atol=1e-12)


def test_centre_without_weight_keeps_its_value():
    """Pixels 0 and 100 each sit on one outer centre; the middle centre (50) gets exp(-2500) = 0."""
    x = torch.tensor([0.0, 0.0, 0.0, 100.0, 100.0, 100.0], dtype=torch.float64).view(1, 1, 1, 6)
    got = token_clustering(x, (1, 3), iters=2, temperature=1.0, window=3)
    torch.testing.assert_close(got.flatten(), torch.tensor([0.0, 50.0, 100.0], dtype=torch.float64))


# ---------------------------------------------------------------- reconstruction


def reconstruction_inputs(batch=2, tokens=40, clusters=12, channels=5, seed=6):
    generator = torch.Generator().manual_seed(seed)
    x, before, centres = (
        torch.randn(batch, n, channels, generator=generator, dtype=torch.float64) for n in (clusters, tokens, clusters)
    )
    return x, before, centres


@pytest.mark.parametrize("k", [1, 3, 11, 12, 20])  # k >= M = 12 keeps every centre
@pytest.mark.parametrize("temperature", [0.02, 0.5])
def test_reconstruction_matches_dense_reference(k, temperature):
    x, before, centres = reconstruction_inputs()
    got = token_reconstruction(x, before, centres, k=k, temperature=temperature)
    torch.testing.assert_close(got, dense_reconstruction(x, before, centres, k, temperature), rtol=1e-10, atol=1e-10)


def test_reconstruction_rows_are_unit_norm_combinations():
    """With x = identity the output rows are the weight rows: unit L2 norm, k non-zeros, not sum-to-one."""
    _, before, centres = reconstruction_inputs(batch=1, clusters=8)
    weights = token_reconstruction(torch.eye(8, dtype=torch.float64)[None], before, centres, k=3, temperature=0.5)
    torch.testing.assert_close(weights.norm(dim=-1), torch.ones(1, 40, dtype=torch.float64))
    assert ((weights > 0).sum(-1) == 3).all()
    assert not torch.allclose(weights.sum(-1), torch.ones(1, 40, dtype=torch.float64))


def test_reconstruction_far_tokens_do_not_underflow():
    """exp(-0.02·||b - c||²) underflows to 0 in float64 here; normalisation still defines the rows."""
    x, before, centres = reconstruction_inputs(batch=1, tokens=6, clusters=4, channels=3)
    before = before + 200.0  # ||b - c||² ≈ 1.2e5: exp(-2400) is 0 in float64
    assert (dense_reconstruction(x, before, centres, 2, 0.02).isnan()).all()
    distance = ((before[:, :, None] - centres[:, None]) ** 2).sum(-1)
    weights = torch.exp(-0.02 * (distance - distance.min(-1, keepdim=True).values))  # same after normalising
    weights = weights * torch.zeros_like(weights).scatter_(-1, weights.topk(2, dim=-1).indices, 1.0)
    expected = (weights / weights.norm(dim=-1, keepdim=True)) @ x
    torch.testing.assert_close(token_reconstruction(x, before, centres, k=2), expected, rtol=1e-10, atol=1e-10)


def test_reconstruction_in_row_blocks(monkeypatch):
    x, before, centres = reconstruction_inputs(tokens=37)
    monkeypatch.setattr(tokens_module, "_SCORE_BLOCK_ELEMENTS", 50)  # 2 rows per block
    got = token_reconstruction(x, before, centres, k=4, temperature=0.3)
    torch.testing.assert_close(got, dense_reconstruction(x, before, centres, 4, 0.3), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k", [4, 12])
def test_reconstruction_gradients_match_dense_reference(k):
    inputs = reconstruction_inputs(tokens=15, clusters=12, channels=4)
    probe = torch.randn(2, 15, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = [t.clone().requires_grad_() for t in inputs]
    ours = [t.clone().requires_grad_() for t in inputs]
    (dense_reconstruction(*ref, k, 0.3) * probe).sum().backward()
    (token_reconstruction(*ours, k=k, temperature=0.3) * probe).sum().backward()
    for name, mine, theirs in zip(("x", "before", "centres"), ours, ref):
        assert mine.grad.abs().sum() > 0, name
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-9, atol=1e-11, msg=name)


def test_reconstruction_gradcheck():
    inputs = [t.requires_grad_() for t in reconstruction_inputs(batch=1, tokens=5, clusters=6, channels=3)]
    assert torch.autograd.gradcheck(lambda *t: token_reconstruction(*t, k=3, temperature=0.4), inputs)


def test_cluster_then_reconstruct_round_trip():
    """Reconstructing the centres themselves with k=1 copies each token's nearest centre."""
    x = token_map(1, 4, 8, 8, seed=7)
    centres = token_clustering(x, (4, 4), iters=2, temperature=0.3)
    before = x.flatten(2).transpose(1, 2)
    got = token_reconstruction(centres, before, centres, k=1)
    nearest = torch.cdist(before, centres).argmin(-1)
    torch.testing.assert_close(got, centres[0, nearest[0]][None])


# ---------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(grid=(0, 3)), "grid"),
        (dict(grid=(9, 3)), "grid"),
        (dict(grid=(3, 9)), "grid"),
        (dict(grid=(3,)), "grid"),
        (dict(grid=(2.0, 3)), "grid"),
        (dict(grid=(3, 3), window=4), "window"),
        (dict(grid=(3, 3), window=0), "window"),
        (dict(grid=(3, 3), window=-3), "window"),
        (dict(grid=(3, 3), iters=-1), "iters"),
        (dict(grid=(3, 3), temperature=-0.1), "temperature"),
        (dict(grid=(3, 3), temperature=float("nan")), "temperature"),
    ],
)
def test_clustering_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        token_clustering(torch.zeros(1, 2, 8, 8), **kwargs)


@pytest.mark.parametrize("x", [torch.zeros(2, 8, 8), torch.zeros(1, 2, 8, 8, dtype=torch.long)])
def test_clustering_rejects_bad_maps(x):
    with pytest.raises(ValueError, match="x must be"):
        token_clustering(x, (2, 2))


def test_reconstruction_rejects_bad_arguments():
    x, before, centres = reconstruction_inputs()
    cases = [
        ((x, before, centres), dict(k=0), "k must"),
        ((x, before, centres), dict(k=2.5), "k must"),
        ((x, before, centres), dict(temperature=-1.0), "temperature"),
        ((x[:, :5], before, centres), {}, "same number"),
        ((x, before[:1], centres), {}, "batch"),
        ((x, before[..., :3], centres), {}, "channels"),
        ((x, before[0], centres), {}, "before must"),
        ((x.long(), before, centres), {}, "x must"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            token_reconstruction(*args, **kwargs)

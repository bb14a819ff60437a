"""GeminiFusion: exact agreement with a per-token nn.MultiheadAttention formulation,
locality, gradients into the noise embeddings, checkpoint names and input validation."""

import pytest
import torch

import dfx.fusion.gemini as gemini
from dfx.fusion import GeminiFusion

EXPECTED_KEYS = {
    f"cross_attn_{d}.{name}"
    for d in ("0_to_1", "1_to_0")
    for name in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
} | {
    "relation_judger.0.fc1.weight",
    "relation_judger.0.fc1.bias",
    "relation_judger.0.fc2.weight",
    "relation_judger.0.fc2.bias",
    "k_noise.weight",
    "v_noise.weight",
}


def random_module(dim, heads, seed=0):
    """A float64 module with every parameter (biases included) random, so no term can hide."""
    torch.manual_seed(seed)
    module = GeminiFusion(dim, heads).double()
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, 0.4)
    return module


def reference_fusion(module, x0, x1):
    """Per image, per token: build the two candidates and call the module's own
    nn.MultiheadAttention (sequence of 2 keys, batch of 1). Returns (y0, y1)."""
    y = [torch.empty_like(x0), torch.empty_like(x1)]
    attn = (module.cross_attn_0_to_1, module.cross_attn_1_to_0)
    for b in range(x0.shape[0]):
        for n in range(x0.shape[1]):
            tokens = (x0[b, n], x1[b, n])
            for d in (0, 1):
                s, o = tokens[d], tokens[1 - d]
                phi = module.relation_judger(torch.cat([s, o]).unsqueeze(0))[0]
                keys = torch.stack([s + module.k_noise.weight[d], s * phi]).unsqueeze(1)  # [2, 1, C]
                values = torch.stack([s + module.v_noise.weight[d], o]).unsqueeze(1)
                out, _ = attn[d](s.view(1, 1, -1), keys, values)
                y[d][b, n] = s + out[0, 0]
    return tuple(y)


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("chunk_elements", [None, 16 * 5])
def test_matches_per_token_multihead_attention(heads, chunk_elements, monkeypatch):
    if chunk_elements is not None:  # 5 rows per chunk: exercises chunk boundaries
        monkeypatch.setattr(gemini, "_CHUNK_ELEMENTS", chunk_elements)
    module = random_module(16, heads)
    x0 = torch.randn(2, 7, 16, dtype=torch.float64)
    x1 = torch.randn(2, 7, 16, dtype=torch.float64)
    with torch.no_grad():
        y0, y1 = module(x0, x1)
        r0, r1 = reference_fusion(module, x0, x1)
    assert y0.shape == x0.shape and y1.shape == x1.shape
    torch.testing.assert_close(y0, r0, rtol=0, atol=1e-10)
    torch.testing.assert_close(y1, r1, rtol=0, atol=1e-10)
    # the fusion must actually do something in both directions
    assert (y0 - x0).abs().max() > 0.1 and (y1 - x1).abs().max() > 0.1


@pytest.mark.parametrize("perturbed", [0, 1])
def test_each_token_only_sees_its_own_position(perturbed):
    module = random_module(16, 4)
    x = [torch.randn(3, 10, 16, dtype=torch.float64) for _ in range(2)]
    with torch.no_grad():
        before = module(*x)
        x[perturbed] = x[perturbed].clone()
        x[perturbed][1, 4] += torch.randn(16, dtype=torch.float64)
        after = module(*x)
    for y_before, y_after in zip(before, after):
        changed = (y_after - y_before).abs().amax(-1)  # [B, N]
        assert changed[1, 4] > 1e-3
        changed[1, 4] = 0
        assert changed.max() <= 1e-12


def test_gradients_reach_noise_embeddings_and_match_finite_differences():
    module = random_module(8, 2)
    x0 = torch.randn(2, 3, 8, dtype=torch.float64)
    x1 = torch.randn(2, 3, 8, dtype=torch.float64)
    g0, g1 = torch.randn_like(x0), torch.randn_like(x1)

    def loss():
        y0, y1 = module(x0, x1)
        return (y0 * g0).sum() + (y1 * g1).sum()

    loss().backward()
    for table in (module.k_noise, module.v_noise):
        assert table.weight.grad is not None
        assert (table.weight.grad.abs().amax(-1) > 1e-6).all()  # both rows (directions)
    eps = 1e-6
    for table, (row, col) in ((module.k_noise, (1, 3)), (module.v_noise, (0, 5))):
        with torch.no_grad():
            table.weight[row, col] += eps
            up = loss()
            table.weight[row, col] -= 2 * eps
            down = loss()
            table.weight[row, col] += eps
        numeric = (up - down) / (2 * eps)
        assert abs(numeric - table.weight.grad[row, col]) <= 1e-7 * max(1.0, abs(numeric))


def test_input_gradients_pass_gradcheck():
    module = random_module(8, 2)
    x0 = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)
    x1 = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x0, x1), fast_mode=True)


def test_state_dict_names_and_loading_an_official_style_checkpoint():
    dim = 16
    module = GeminiFusion(dim)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert set(shapes) == EXPECTED_KEYS
    assert shapes["cross_attn_0_to_1.in_proj_weight"] == (3 * dim, dim)
    assert shapes["relation_judger.0.fc1.weight"] == (dim, 2 * dim)
    assert shapes["relation_judger.0.fc2.weight"] == (dim, dim)
    assert shapes["k_noise.weight"] == shapes["v_noise.weight"] == (2, dim)

    checkpoint = {k: torch.randn(shape) for k, shape in shapes.items()}  # plain dict, as saved
    fresh = GeminiFusion(dim)
    fresh.load_state_dict(checkpoint, strict=True)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, checkpoint[key])


def test_low_precision_is_close_to_float32():
    torch.manual_seed(0)
    module = GeminiFusion(32, 4)
    x0, x1 = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = module(x0, x1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = module(x0, x1)
        half = module.to(torch.bfloat16)(x0.bfloat16(), x1.bfloat16())
    for got in (*mixed, *half):
        assert torch.isfinite(got).all()
    for got, want in zip((*mixed, *half), (*expected, *expected)):
        assert (got.float() - want).abs().max() < 0.1 * want.abs().max()


@pytest.mark.parametrize(
    "shape0, shape1, match",
    [
        ((2, 5, 16), (2, 6, 16), "same shape"),
        ((2, 5, 16), (3, 5, 16), "same shape"),
        ((2, 5, 8), (2, 5, 8), r"\[B, N, 16\]"),
        ((5, 16), (5, 16), r"\[B, N, 16\]"),
    ],
)
def test_rejects_mismatched_shapes(shape0, shape1, match):
    module = GeminiFusion(16, 4)
    with pytest.raises(ValueError, match=match):
        module(torch.randn(shape0), torch.randn(shape1))


def test_rejects_bad_dtypes_and_constructor_arguments():
    module = GeminiFusion(16, 4)
    with pytest.raises(ValueError, match="floating-point"):
        module(torch.ones(1, 2, 16, dtype=torch.long), torch.ones(1, 2, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="share dtype"):
        module(torch.randn(1, 2, 16), torch.randn(1, 2, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="dim=30, heads=8"):
        GeminiFusion(30)
    with pytest.raises(ValueError, match="heads must be a positive int"):
        GeminiFusion(16, 0)
    with pytest.raises(ValueError, match="dim must be a positive int"):
        GeminiFusion(16.0)

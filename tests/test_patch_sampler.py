"""The affine patch sampler against PyTorch's F.affine_grid + F.grid_sample
(bilinear, zero padding, align_corners=False): values and gradients w.r.t.
both the map and theta."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreid.models.patch_sampler import (
    affine_grid,
    affine_sample,
    band_thetas,
    pooled_patches,
)


def _inputs(seed=0, b=2, p=3, h=6, w=5, c=4):
    rng = np.random.default_rng(seed)
    feature_map = rng.normal(size=(b, h, w, c)).astype(np.float32)
    # Scales, shears and shifts that send part of each grid outside the map.
    theta = np.zeros((b, p, 2, 3), np.float32)
    theta[..., 0, 0] = rng.uniform(0.4, 1.3, (b, p))
    theta[..., 1, 1] = rng.uniform(0.3, 1.2, (b, p))
    theta[..., 0, 1] = rng.uniform(-0.3, 0.3, (b, p))
    theta[..., 1, 0] = rng.uniform(-0.3, 0.3, (b, p))
    theta[..., :, 2] = rng.uniform(-0.8, 0.8, (b, p, 2))
    return feature_map, theta


def _torch_patches(torch, feature_map, theta, size):
    """(B, P, h, w, C) by PyTorch, each patch its own grid_sample."""
    f = torch.as_tensor(feature_map).permute(0, 3, 1, 2)  # NCHW
    b, c = f.shape[:2]
    out = []
    for q in range(theta.shape[1]):
        grid = torch.nn.functional.affine_grid(theta[:, q], (b, c, *size), align_corners=False)
        sampled = torch.nn.functional.grid_sample(
            f, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        out.append(sampled.permute(0, 2, 3, 1))
    return torch.stack(out, 1)


@pytest.mark.parametrize("size", [None, (4, 3)])
def test_affine_sample_matches_torch_values_and_gradients(size):
    torch = pytest.importorskip("torch")
    feature_map, theta = _inputs()
    out_size = size or feature_map.shape[1:3]
    cotangent = (
        np.random.default_rng(1)
        .normal(size=(*theta.shape[:2], *out_size, feature_map.shape[-1]))
        .astype(np.float32)
    )

    t_map = torch.tensor(feature_map, requires_grad=True)
    t_theta = torch.tensor(theta, requires_grad=True)
    t_out = _torch_patches(torch, t_map, t_theta, tuple(out_size))
    (t_out * torch.as_tensor(cotangent)).sum().backward()

    out = affine_sample(jnp.asarray(feature_map), jnp.asarray(theta), size)
    np.testing.assert_allclose(np.asarray(out), t_out.detach().numpy(), atol=1e-5)

    def objective(m, t):
        return jnp.sum(affine_sample(m, t, size) * cotangent)

    g_map, g_theta = jax.grad(objective, argnums=(0, 1))(jnp.asarray(feature_map), theta)
    np.testing.assert_allclose(np.asarray(g_map), t_map.grad.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(g_theta), t_theta.grad.numpy(), rtol=1e-4, atol=1e-4)
    assert np.abs(t_theta.grad.numpy()).max() > 0.1  # the gradient w.r.t. theta is not trivial


def test_affine_grid_matches_torch():
    torch = pytest.importorskip("torch")
    _, theta = _inputs(seed=2)
    grid = affine_grid(jnp.asarray(theta[:, 0]), (5, 7))
    expected = torch.nn.functional.affine_grid(
        torch.as_tensor(theta[:, 0]), (2, 1, 5, 7), align_corners=False
    )
    np.testing.assert_allclose(np.asarray(grid), expected.numpy(), atol=1e-6)


def test_pooled_patches_is_the_mean_of_the_sampled_patch():
    feature_map, theta = _inputs(seed=3)
    pooled = pooled_patches(jnp.asarray(feature_map), jnp.asarray(theta))
    full = affine_sample(jnp.asarray(feature_map), jnp.asarray(theta))
    np.testing.assert_allclose(np.asarray(pooled), np.asarray(full.mean((2, 3))), atol=1e-5)


def test_band_thetas_pool_the_horizontal_stripes():
    # An 8-row map in 4 bands: each band's sample rows fall between two input
    # rows of its stripe, so the pooled patch is the stripe's mean.
    feature_map, _ = _inputs(seed=4, h=8, w=4)
    theta = jnp.broadcast_to(band_thetas(4), (2, 4, 2, 3))
    pooled = pooled_patches(jnp.asarray(feature_map), theta, (2, 4))
    stripes = feature_map.reshape(2, 4, 2, 4, -1).mean((2, 3))
    np.testing.assert_allclose(np.asarray(pooled), stripes, atol=1e-5)


def test_identity_theta_returns_the_map():
    feature_map, _ = _inputs(seed=5)
    identity = jnp.asarray([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    out = affine_sample(jnp.asarray(feature_map), jnp.broadcast_to(identity, (2, 1, 2, 3)))
    np.testing.assert_allclose(np.asarray(out[:, 0]), feature_map, atol=1e-6)


def test_sampling_compiles_inside_jit():
    feature_map, theta = _inputs(seed=6)
    out = jax.jit(pooled_patches)(jnp.asarray(feature_map), jnp.asarray(theta))
    assert out.shape == (2, 3, 4) and np.all(np.isfinite(np.asarray(out)))

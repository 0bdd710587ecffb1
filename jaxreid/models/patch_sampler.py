"""Spatial-transformer patch sampling: an affine grid and bilinear sampling.

A patch is the feature map resampled on the grid an affine map theta (2, 3)
sends the output's normalised coordinates to:

    (x_in, y_in) = theta @ (x_out, y_out, 1),   coordinates in [-1, 1]

with PyTorch's conventions for `F.affine_grid` + `F.grid_sample(mode="bilinear",
padding_mode="zeros", align_corners=False)`: pixel j of a side of n pixels sits
at (2 j + 1) / n - 1 (pixel centres, the corners at -1 and 1), and a sample
point outside the map mixes in zeros.

Bilinear sampling with zero padding is a sum over the input pixels weighted by
the tent kernel max(0, 1 - |x_in - x|) max(0, 1 - |y_in - y|) (in pixel units):
the weights are built densely, (points, H * W), and applied with one einsum.
On a re-id feature map (at most a few hundred pixels) that is one small matmul
instead of four gathers, the gradient w.r.t. theta is the tent's slope (as
PyTorch's), and the mean of a patch (`pooled_patches`) folds into the weights
before they touch the channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _centres(n: int) -> jax.Array:
    """Normalised coordinates of n pixel centres (align_corners=False)."""
    return (2.0 * jnp.arange(n, dtype=jnp.float32) + 1.0) / n - 1.0


def affine_grid(theta: jax.Array, size: tuple[int, int]) -> jax.Array:
    """theta (..., 2, 3) -> (..., h, w, 2) sample points (x, y) in [-1, 1]
    coordinates for an output of `size` = (h, w), as F.affine_grid with
    align_corners=False."""
    h, w = size
    ys, xs = jnp.meshgrid(_centres(h), _centres(w), indexing="ij")
    base = jnp.stack([xs, ys, jnp.ones_like(xs)], -1)  # (h, w, 3)
    return jnp.einsum("...ij,hwj->...hwi", theta.astype(jnp.float32), base)


def sampling_weights(grid: jax.Array, height: int, width: int) -> jax.Array:
    """grid (..., 2) points (x, y) in [-1, 1] -> (..., height * width) bilinear
    weights over an input map of that size (zero padding, align_corners=False)."""
    # Pixel units: the input pixel centres at 0 .. n - 1.
    x = ((grid[..., 0] + 1.0) * width - 1.0) / 2.0
    y = ((grid[..., 1] + 1.0) * height - 1.0) / 2.0
    wx = jax.nn.relu(1.0 - jnp.abs(x[..., None] - jnp.arange(width, dtype=jnp.float32)))
    wy = jax.nn.relu(1.0 - jnp.abs(y[..., None] - jnp.arange(height, dtype=jnp.float32)))
    weights = wy[..., :, None] * wx[..., None, :]  # (..., height, width)
    return weights.reshape(*weights.shape[:-2], height * width)


def affine_sample(
    feature_map: jax.Array, theta: jax.Array, size: tuple[int, int] | None = None
) -> jax.Array:
    """Patches of a map: feature_map (B, H, W, C), theta (B, P, 2, 3) ->
    (B, P, h, w, C), (h, w) = `size` (default the map's own H, W).

    Equal to F.grid_sample(x, F.affine_grid(theta, (B, C, h, w)),
    mode="bilinear", padding_mode="zeros", align_corners=False) per patch, in
    NHWC."""
    b, height, width, c = feature_map.shape
    size = size or (height, width)
    weights = sampling_weights(affine_grid(theta, size), height, width)  # (B, P, h, w, HW)
    flat = feature_map.reshape(b, height * width, c)
    return jnp.einsum("bphwk,bkc->bphwc", weights.astype(flat.dtype), flat)


def pooled_patches(
    feature_map: jax.Array, theta: jax.Array, size: tuple[int, int] | None = None
) -> jax.Array:
    """The average-pooled patches: (B, H, W, C), (B, P, 2, 3) -> (B, P, C),
    the mean over the (h, w) output of `affine_sample` (same value, the mean
    taken over the weights first)."""
    b, height, width, c = feature_map.shape
    size = size or (height, width)
    weights = sampling_weights(affine_grid(theta, size), height, width)
    mean_weights = jnp.mean(weights, axis=(-3, -2))  # (B, P, HW)
    flat = feature_map.reshape(b, height * width, c)
    return jnp.einsum("bpk,bkc->bpc", mean_weights.astype(flat.dtype), flat)


def band_thetas(num: int) -> jax.Array:
    """(num, 2, 3) thetas of `num` equal horizontal bands covering the map top
    to bottom (full width): y_in = y_out / num + band centre."""
    centres = (2.0 * jnp.arange(num, dtype=jnp.float32) + 1.0) / num - 1.0
    theta = jnp.zeros((num, 2, 3), jnp.float32)
    theta = theta.at[:, 0, 0].set(1.0).at[:, 1, 1].set(1.0 / num)
    return theta.at[:, 1, 2].set(centres)

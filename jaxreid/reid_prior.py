"""The ReID prior of self-supervised person pre-training (SSL-KD, #52): what
real cameras do to a person crop, as pure jit-able functions of (key, batch).

- `down_up_sample`: low resolution (down-sample by a random factor, then back);
- `gaussian_blur`: defocus / motion blur at a random strength;
- `horizontal_occluder`: a full-width band (a railing, a car, a crowd's heads);
  random erasing (jaxreid.augment.random_erasing) adds the random blocks;
- `partial_view`: the upper or lower body of the crop, resized to the view's shape;
- `cell_mask`: which cells of the feature grid a masked view hides, and the
  pixel mask that hides them.

Images are float32 pixel-scale (B, H, W, 3), as jaxreid.augment gives them.
Every draw is made with the batch's shape from the given key, so a batch
gets the same draws whatever devices it is spread over (XLA's partitionable
threefry), and a step's keys come from the train state's key (jaxreid.pretrain).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp


def down_up_sample(
    rng: jax.Array, images: jax.Array, factors: Sequence[float], prob: float
) -> jax.Array:
    """With probability `prob` per image: resize to `factor` x its size (one of
    `factors`, drawn uniformly; antialiased) and back with bilinear
    interpolation. Each factor is one static resize of the whole batch, and
    each image keeps the one it drew: shapes stay static inside the step."""
    if prob <= 0 or not factors:
        return images
    b, h, w, c = images.shape
    k_apply, k_factor = jax.random.split(rng)
    choice = jax.random.randint(k_factor, (b,), 0, len(factors))
    apply = jax.random.uniform(k_apply, (b,)) < prob
    out = images
    for index, factor in enumerate(factors):
        small = (b, max(1, round(h * factor)), max(1, round(w * factor)), c)
        coarse = jax.image.resize(images, small, "linear", antialias=True)
        coarse = jax.image.resize(coarse, images.shape, "linear", antialias=False)
        out = jnp.where(((choice == index) & apply)[:, None, None, None], coarse, out)
    return out


def blur_radius(sigma_max: float, size: int) -> int:
    """Taps each side of the blur kernel: 4 sigma (scipy's default truncation),
    at most the axis length - 1."""
    return max(0, min(math.ceil(4.0 * sigma_max), size - 1))


def _blur_axis(images: jax.Array, sigma: jax.Array, radius: int, axis: int) -> jax.Array:
    """Gaussian weights exp(-d^2 / 2 sigma^2), |d| <= radius, along `axis`
    (1 = rows, 2 = columns), renormalised at the borders (no dark edges).

    A sum of shifted copies rather than a matrix product: elementwise work in
    a fixed order gives the same bits whatever the batch's split over devices
    (a batched dot may accumulate in another order for another batch size)."""
    n = images.shape[axis]
    pad = [(0, 0)] * images.ndim
    pad[axis] = (radius, radius)
    padded = jnp.pad(images, pad)
    inside = jnp.pad(jnp.ones((n,), images.dtype), (radius, radius))
    s = jnp.maximum(sigma, 1e-3)
    weighted, total = 0.0, 0.0
    for d in range(-radius, radius + 1):
        w = jnp.exp(-float(d * d) / (2.0 * s * s))  # (B,)
        shifted = jax.lax.slice_in_dim(padded, radius + d, radius + d + n, axis=axis)
        weighted = weighted + w[:, None, None, None] * shifted
        total = total + w[:, None] * inside[radius + d : radius + d + n][None, :]
    shape = [images.shape[0], 1, 1, 1]
    shape[axis] = n
    return weighted / total.reshape(shape)


def gaussian_blur(
    rng: jax.Array, images: jax.Array, sigma: tuple[float, float], prob: float
) -> jax.Array:
    """With probability `prob` per image: a separable Gaussian blur with sigma
    drawn uniformly in `sigma` (pixels), truncated at `blur_radius`; the
    others are returned unchanged."""
    if prob <= 0:
        return images
    b, h, w, _ = images.shape
    k_apply, k_sigma = jax.random.split(rng)
    s = jax.random.uniform(k_sigma, (b,), minval=sigma[0], maxval=sigma[1])
    blurred = _blur_axis(images, s, blur_radius(sigma[1], h), axis=1)
    blurred = _blur_axis(blurred, s, blur_radius(sigma[1], w), axis=2)
    apply = jax.random.uniform(k_apply, (b,)) < prob
    return jnp.where(apply[:, None, None, None], blurred, images)


def horizontal_occluder(
    rng: jax.Array,
    images: jax.Array,
    height: tuple[float, float],
    prob: float,
    fill: Sequence[float],
) -> jax.Array:
    """With probability `prob` per image: a band across the whole width, of
    `height` (fractions of the image height, uniform) at a uniform vertical
    position, filled with the colour `fill`."""
    if prob <= 0:
        return images
    b, h, _, _ = images.shape
    k_apply, k_height, k_top = jax.random.split(rng, 3)
    band = jnp.round(jax.random.uniform(k_height, (b,), minval=height[0], maxval=height[1]) * h)
    top = jnp.floor(jax.random.uniform(k_top, (b,)) * (h - band + 1))
    rows = jnp.arange(h, dtype=jnp.float32)[None, :]
    inside = (rows >= top[:, None]) & (rows < (top + band)[:, None])
    inside = inside & (jax.random.uniform(k_apply, (b,)) < prob)[:, None]
    return jnp.where(inside[:, :, None, None], jnp.asarray(fill, images.dtype), images)


def partial_view(
    rng: jax.Array,
    images: jax.Array,
    lower: bool,
    keep: tuple[float, float],
    shape: tuple[int, int],
) -> jax.Array:
    """The upper (lower=False) or lower body: the top (bottom) `r` of the
    image's height, r uniform in `keep`, over the full width, resized
    (bilinear, antialiased) to `shape` = (height, width) for every image."""
    b, h, w, _ = images.shape
    out_h, out_w = shape
    r = jax.random.uniform(rng, (b,), minval=keep[0], maxval=keep[1])
    # scale_and_translate maps input coordinate y to output s * y + t.
    scale_y = out_h / (r * h)
    top = (1.0 - r) * h if lower else jnp.zeros_like(r)

    def one(image, sy, t):
        return jax.image.scale_and_translate(
            image,
            (out_h, out_w, image.shape[-1]),
            (0, 1),
            jnp.stack([sy, jnp.float32(out_w / w)]),
            jnp.stack([-t * sy, jnp.float32(0.0)]),
            "linear",
            antialias=True,
        )

    return jax.vmap(one)(images, scale_y, top)


def cell_mask(
    rng: jax.Array, batch: int, grid: tuple[int, int], image: tuple[int, int], ratio: float
) -> tuple[jax.Array, jax.Array]:
    """Masked cells of a (gh, gw) feature grid and the pixels that hide them.

    Each image hides round(ratio * gh * gw) of its cells (a random subset).
    Returns (cells (B, gh * gw) float32 1 = masked, pixels (B, H, W) bool),
    the pixel blocks of the image = (H, W) under each masked cell (a ViT's
    patch, or the block of a CNN map's cell).
    """
    gh, gw = grid
    h, w = image
    count = round(ratio * gh * gw)
    scores = jax.random.uniform(rng, (batch, gh * gw))
    # The `count` lowest scores are masked (a uniform random subset).
    ranks = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
    cells = (ranks < count).astype(jnp.float32)
    rows = jnp.arange(h) * gh // h
    cols = jnp.arange(w) * gw // w
    index = rows[:, None] * gw + cols[None, :]  # (H, W) -> its cell
    pixels = cells[:, index] > 0
    return cells, pixels

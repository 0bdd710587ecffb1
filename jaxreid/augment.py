"""On-device augmentation: a pure, jit-able function of (rng, uint8 batch).

Everything runs inside the compiled train step, so the host only ever ships
uint8 images. Augmentations work in pixel scale [0, 255]; each backbone
normalises its own input with `normalize` (ResNet and EfficientNet-Lite0 use
different statistics), which keeps the normalisation part of the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

# ImageNet statistics in pixel scale (torchvision's 0-1 values times 255).
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

# Random erasing draws this many candidate rectangles per image at once and
# keeps the first that fits (the sequential reference retries up to 100 times;
# with the default area/aspect ranges 16 draws leave < 1e-6 images unerased).
_ERASING_TRIES = 16


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """(x - mean) / std per channel; images are pixel scale, (..., 3)."""
    mean = jnp.asarray(mean, dtype=images.dtype)
    std = jnp.asarray(std, dtype=images.dtype)
    return (images - mean) / std


@dataclasses.dataclass(frozen=True)
class AugmentOptions:
    """Static augmentation settings (hashable, so usable as a jit static arg)."""

    flip: bool = True
    pad: int = 0
    erasing_prob: float = 0.0
    erasing_area: tuple[float, float] = (0.02, 0.4)
    erasing_min_aspect: float = 0.3
    erasing_fill: tuple[float, float, float] = IMAGENET_MEAN

    @classmethod
    def from_config(cls, config) -> AugmentOptions:
        """Builds options from a ConfigDict with the same field names."""
        return cls(
            flip=bool(config.flip),
            pad=int(config.pad),
            erasing_prob=float(config.erasing_prob),
            erasing_area=tuple(config.erasing_area),
            erasing_min_aspect=float(config.erasing_min_aspect),
        )


def default_augment_config():
    """The config section `augment` (ml_collections.ConfigDict): flip, pad (pixels
    of zero padding before the random crop back to size), random erasing."""
    import ml_collections

    o = AugmentOptions()
    return ml_collections.ConfigDict(
        dict(
            flip=o.flip,
            pad=o.pad,
            erasing_prob=o.erasing_prob,
            erasing_area=o.erasing_area,
            erasing_min_aspect=o.erasing_min_aspect,
        )
    )


def horizontal_flip(images: jax.Array, do_flip: jax.Array) -> jax.Array:
    """Mirrors the images whose `do_flip` entry is True; (B, H, W, C)."""
    return jnp.where(do_flip[:, None, None, None], images[:, :, ::-1, :], images)


def pad_and_crop(rng: jax.Array, images: jax.Array, pad: int) -> jax.Array:
    """Zero-pads every side by `pad` and crops back to the original size at a
    random offset per image."""
    if pad <= 0:
        return images
    b, h, w, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(rng, (b, 2), 0, 2 * pad + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, image.shape[-1]))

    return jax.vmap(crop)(padded, offsets)


def erasing_boxes(
    rng: jax.Array,
    batch: int,
    height: int,
    width: int,
    area: tuple[float, float],
    min_aspect: float,
) -> tuple[jax.Array, jax.Array]:
    """Draws one rectangle per image as in random erasing (Zhong et al.).

    Returns (boxes, valid): boxes (B, 4) int32 = (top, left, h, w); valid (B,)
    is False where none of the tries fitted inside the image (no erasing).
    """
    k_area, k_aspect, k_top, k_left = jax.random.split(rng, 4)
    shape = (batch, _ERASING_TRIES)
    target = jax.random.uniform(k_area, shape, minval=area[0], maxval=area[1]) * height * width
    log_aspect = jax.random.uniform(
        k_aspect, shape, minval=jnp.log(min_aspect), maxval=jnp.log(1.0 / min_aspect)
    )
    aspect = jnp.exp(log_aspect)
    h = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
    w = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
    fits = (h < height) & (w < width) & (h > 0) & (w > 0)
    first = jnp.argmax(fits, axis=1)
    valid = jnp.any(fits, axis=1)
    h = jnp.take_along_axis(h, first[:, None], axis=1)[:, 0]
    w = jnp.take_along_axis(w, first[:, None], axis=1)[:, 0]
    top = jnp.floor(jax.random.uniform(k_top, (batch,)) * (height - h + 1)).astype(jnp.int32)
    left = jnp.floor(jax.random.uniform(k_left, (batch,)) * (width - w + 1)).astype(jnp.int32)
    return jnp.stack([top, left, h, w], axis=1), valid


def random_erasing(
    rng: jax.Array,
    images: jax.Array,
    prob: float,
    area: tuple[float, float],
    min_aspect: float,
    fill: Sequence[float],
) -> jax.Array:
    """Replaces a random rectangle of each image (with probability `prob`) by
    the constant `fill` colour."""
    if prob <= 0:
        return images
    b, height, width, _ = images.shape
    k_apply, k_box = jax.random.split(rng)
    boxes, valid = erasing_boxes(k_box, b, height, width, area, min_aspect)
    apply = valid & (jax.random.uniform(k_apply, (b,)) < prob)
    rows = jnp.arange(height)[None, :, None]
    cols = jnp.arange(width)[None, None, :]
    top, left, h, w = (boxes[:, i, None, None] for i in range(4))
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    inside = inside & apply[:, None, None]
    fill_value = jnp.asarray(fill, dtype=images.dtype)
    return jnp.where(inside[..., None], fill_value, images)


def augment_batch(rng: jax.Array, images: jax.Array, options: AugmentOptions) -> jax.Array:
    """uint8 (B, H, W, 3) -> augmented float32 pixel-scale images.

    Order as in the usual ReID recipe: flip, pad + crop, random erasing.
    """
    k_flip, k_crop, k_erase = jax.random.split(rng, 3)
    x = images.astype(jnp.float32)
    if options.flip:
        x = horizontal_flip(x, jax.random.bernoulli(k_flip, 0.5, (x.shape[0],)))
    x = pad_and_crop(k_crop, x, options.pad)
    return random_erasing(
        k_erase,
        x,
        options.erasing_prob,
        options.erasing_area,
        options.erasing_min_aspect,
        options.erasing_fill,
    )

"""Camera-based batch normalisation at extraction time (after Zhuang et al.,
ECCV 2020): each camera's images are extracted with batch-norm statistics
estimated on that camera's training images, so every layer sees each camera
centred and scaled alike. Uses cameras only, never identities.

Why: what one camera's images share (light, background) shifts every layer's
activations; re-estimating the statistics per camera removes that shift where
it arises. MSMT17 OSNet-x0.25 on CUHK03, no training: 10.0 -> 14.2 mAP
(camera-centring the final features instead: 12.8). Clustering such features
(cluster.camera_bn) lifts HHCL's adaptation 20.7 -> 21.5 mAP; on the adapted
or supervised models the per-camera statistics help ranking little or hurt
(eval.camera_bn: HHCL 20.7 -> 21.6, supervised 35.9 -> 29.0)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxreid import models
from jaxreid.models.layers import BN_MOMENTUM

logger = logging.getLogger(__name__)

# Images per camera its statistics are estimated on (a seeded draw): enough
# for stable means (the largest CUHK03 camera has 2,220) at a fraction of a
# full pass.
MAX_IMAGES = 512


@functools.lru_cache(maxsize=16)
def _batch_stats_fn(graphdef) -> Callable:
    """(params, batch_stats, uint8 images) -> the batch's own statistics: a
    train-mode forward from zero running statistics leaves BN_MOMENTUM x the
    batch statistics in them."""

    @jax.jit
    def batch_stats(params, batch_stats, images):
        zeros = jax.tree.map(jnp.zeros_like, batch_stats)
        _, new = models.apply_model(graphdef, params, zeros, images.astype(jnp.float32), True)
        return jax.tree.map(lambda s: s / BN_MOMENTUM, new)

    return batch_stats


def camera_batch_stats(
    graphdef,
    params,
    batch_stats,
    images,
    cameras: np.ndarray,
    *,
    batch_size: int,
    seed: int = 0,
    max_images: int = MAX_IMAGES,
) -> dict[int, object]:
    """{camera: batch_stats}: the mean train-mode batch statistics over up to
    `max_images` of the camera's `images` (seeded draw), in batches of
    `batch_size` (the last one filled up by repeating its images)."""
    if max_images < 1 or batch_size < 1:
        raise ValueError(f"max_images and batch_size must be >= 1, got {max_images}, {batch_size}")
    fn = _batch_stats_fn(graphdef)
    # Through the host: one device computes them whatever the device count
    # (the weights and the images may be replicated over a mesh).
    params, batch_stats = jax.device_get((params, batch_stats))
    cameras = np.asarray(cameras)
    rng = np.random.default_rng(seed)
    out = {}
    for camera in np.unique(cameras):
        rows = np.flatnonzero(cameras == camera)
        # A random draw: batches that mix the camera's people, as in training.
        rows = rng.permutation(rows)[:max_images]
        total, count = None, 0
        for start in range(0, len(rows), batch_size):
            chunk = np.resize(rows[start : start + batch_size], batch_size)
            stats = fn(params, batch_stats, jnp.asarray(np.asarray(images[chunk])))
            total = stats if total is None else jax.tree.map(jnp.add, total, stats)
            count += 1
        out[int(camera)] = jax.tree.map(lambda s, n=count: s / n, total)
    return out


def extract_by_camera(
    extract: Callable,
    batch_stats,
    images,
    cameras: np.ndarray,
    stats_by_camera: dict[int, object],
) -> dict[str, np.ndarray]:
    """`extract(batch_stats, images)` of each camera's images with its own
    statistics (the given `batch_stats` for a camera without any), reassembled
    in the order of `images`."""
    cameras = np.asarray(cameras)
    out: dict[str, np.ndarray] = {}
    missing = sorted(set(np.unique(cameras).tolist()) - set(stats_by_camera))
    if missing:
        logger.warning(
            "camera batch norm: %d camera(s) %s have no training images; their images "
            "use the model's running statistics",
            len(missing),
            missing,
        )
    for camera in np.unique(cameras):
        rows = np.flatnonzero(cameras == camera)
        part = extract(stats_by_camera.get(int(camera), batch_stats), images[rows])
        for key, value in part.items():
            if key not in out:
                out[key] = np.empty((len(cameras),) + value.shape[1:], value.dtype)
            out[key][rows] = value
    return out

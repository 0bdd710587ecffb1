"""Momentum updates of memory rows (prototypes of the clustering family,
cluster-family.md; instance banks): after the loss, each row is moved towards
the batch features assigned to it.

Update rules (after the loss, features as constants):

  sequential   for every batch sample in batch order:
                   c_y <- normalize(m c_y + (1 - m) f_i)        (reference)
  mean         one step per cluster with the mean of its batch samples:
                   c_y <- normalize(m c_y + (1 - m) mean_{i: y_i = y} f_i)
               The vectorised equivalent used by public implementations
               that average before updating; equal to `sequential` when each
               cluster has at most one sample in the batch.
  hard         one step per cluster with its LEAST similar batch sample
               (the hard-sample variant).

Samples with label < 0 (outliers) neither contribute to the loss nor update.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxreid.utils import l2_normalize as _normalize

UPDATE_MODES = ("sequential", "mean", "hard")


def update_centroids(
    centroids: jax.Array,
    features: jax.Array,
    labels: jax.Array,
    momentum: float = 0.1,
    mode: str = "mean",
) -> jax.Array:
    """New (C, D) centroids after a step (see the module docstring).

    `momentum` is m, the weight of the old prototype (0.1 in the usual recipe).
    """
    if mode not in UPDATE_MODES:
        raise ValueError(f"mode must be one of {UPDATE_MODES}, got {mode!r}")
    centroids = jnp.asarray(centroids)
    num_clusters = centroids.shape[0]
    f = jax.lax.stop_gradient(_normalize(jnp.asarray(features, centroids.dtype)))
    labels = jnp.asarray(labels, jnp.int32)
    valid = labels >= 0

    if mode == "sequential":

        def body(i, c):
            y = jnp.maximum(labels[i], 0)
            new = _normalize(momentum * c[y] + (1.0 - momentum) * f[i])
            return c.at[y].set(jnp.where(valid[i], new, c[y]))

        return jax.lax.fori_loop(0, f.shape[0], body, centroids)

    segment = jnp.where(valid, labels, num_clusters)  # outliers go to a dropped segment
    if mode == "mean":
        sums = jax.ops.segment_sum(f, segment, num_segments=num_clusters + 1)[:-1]
        counts = jax.ops.segment_sum(valid.astype(f.dtype), segment, num_clusters + 1)[:-1]
        step = sums / jnp.maximum(counts, 1.0)[:, None]
    else:  # hard: the batch sample of each cluster least similar to its prototype
        sim = jnp.sum(f * centroids[jnp.maximum(labels, 0)], axis=-1)
        sim = jnp.where(valid, sim, jnp.inf)
        least = jax.ops.segment_min(sim, segment, num_segments=num_clusters + 1)[:-1]
        counts = jax.ops.segment_sum(valid.astype(f.dtype), segment, num_clusters + 1)[:-1]
        # First sample (in batch order) reaching its cluster's minimum.
        is_min = valid & (sim == least[jnp.maximum(labels, 0)])
        order = jnp.where(is_min, jnp.arange(f.shape[0]), f.shape[0])
        first = jax.ops.segment_min(order, segment, num_segments=num_clusters + 1)[:-1]
        step = f[jnp.clip(first, 0, f.shape[0] - 1)]
    moved = _normalize(momentum * centroids + (1.0 - momentum) * step)
    return jnp.where((counts > 0)[:, None], moved, centroids)

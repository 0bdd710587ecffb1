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

Only the rows a batch names are computed and written, so a step costs O(B D)
whatever the number of rows C (in place when the table is donated, as the
train step does): 0.4 ms against 2.1 s for the dense update of a
200,000 x 2048 table on the 2-core CPU.
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
    # Computed in float32 whatever the table's dtype (a bfloat16 table is only
    # stored in bfloat16: its rows are rounded once, when written).
    f = jax.lax.stop_gradient(_normalize(jnp.asarray(features, jnp.float32)))
    labels = jnp.asarray(labels, jnp.int32)
    valid = labels >= 0

    if mode == "sequential":

        def body(i, c):
            y = jnp.maximum(labels[i], 0)
            new = _normalize(momentum * c[y].astype(jnp.float32) + (1.0 - momentum) * f[i])
            return c.at[y].set(jnp.where(valid[i], new.astype(c.dtype), c[y]))

        return jax.lax.fori_loop(0, f.shape[0], body, centroids)

    # Only the rows the batch touches are computed and written (O(B D) per
    # step, in place when the memory is donated): at 10^6 rows a dense (C, D)
    # update cost several copies of the table per step. Each sample's segment
    # is the first batch sample of its row, so the sums run over batch
    # segments in the order a segment sum over all rows would take.
    batch = f.shape[0]
    same = valid[:, None] & valid[None, :] & (labels[:, None] == labels[None, :])
    segment = jnp.where(valid, jnp.argmax(same, axis=1), batch)  # outliers: dropped
    target = jnp.where(valid, labels, num_clusters)  # out of range: not written
    old = centroids[jnp.minimum(target, num_clusters - 1)].astype(jnp.float32)
    if mode == "mean":
        counts = jax.ops.segment_sum(valid.astype(f.dtype), segment, num_segments=batch + 1)
        sums = jax.ops.segment_sum(f, segment, num_segments=batch + 1)
        step = (sums / jnp.maximum(counts, 1.0)[:, None])[segment]
    else:  # hard: the batch sample of each row least similar to its prototype
        sim = jnp.where(valid, jnp.sum(f * old, axis=-1), jnp.inf)
        least = jax.ops.segment_min(sim, segment, num_segments=batch + 1)
        # First sample (in batch order) reaching its row's minimum.
        is_min = valid & (sim == least[segment])
        order = jnp.where(is_min, jnp.arange(batch), batch)
        first = jax.ops.segment_min(order, segment, num_segments=batch + 1)
        step = f[jnp.clip(first[segment], 0, batch - 1)]
    moved = _normalize(momentum * old + (1.0 - momentum) * step)
    # Samples of one row write the same value; outliers write nowhere.
    return centroids.at[target].set(moved.astype(centroids.dtype), mode="drop")

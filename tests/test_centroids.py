"""Cluster memory: prototypes, ClusterNCE value and gradient, momentum updates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import unit

from jaxreid.methods import centroids as cluster_memory
from jaxreid.methods import cluster


def test_prototypes_are_normalised_cluster_means():
    features = np.array([[3.0, 0.0], [0.0, 2.0], [0.0, 5.0], [1.0, 1.0]])
    labels = np.array([0, 1, 1, -1])
    memory = cluster.build_memory("cluster_contrast", features, np.zeros(4), labels)
    # Cluster 0: (1, 0); cluster 1: mean of (0, 1) and (0, 1) = (0, 1); outlier ignored.
    np.testing.assert_allclose(memory.prototypes[:2], [[1.0, 0.0], [0.0, 1.0]], atol=1e-7)
    np.testing.assert_array_equal(memory.valid, [True, True, False, False])


def _numpy_loss(f, c, y, tau):
    f = unit(f)
    losses = []
    for i in range(len(y)):
        if y[i] < 0:
            continue
        z = f[i] @ c.T / tau
        losses.append(np.log(np.sum(np.exp(z - z.max()))) + z.max() - z[y[i]])
    return np.mean(losses)


def test_cluster_nce_value_and_gradient_match_numpy():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(6, 5)).astype(np.float32)
    c = unit(rng.normal(size=(4, 5))).astype(np.float32)
    y = np.array([0, 3, -1, 1, 1, 2])

    def loss(f, c):
        return cluster.masked_nce(f, c, jnp.ones(len(c), bool), jnp.asarray(y), 0.5)

    value = loss(jnp.asarray(f), jnp.asarray(c))
    np.testing.assert_allclose(value, _numpy_loss(f, c, y, 0.5), rtol=1e-5)
    grad_f, grad_c = jax.grad(loss, argnums=(0, 1))(jnp.asarray(f), jnp.asarray(c))
    assert np.all(np.asarray(grad_c) == 0)  # the memory is a constant
    assert np.all(np.asarray(grad_f)[2] == 0)  # the outlier contributes nothing
    eps = 1e-3
    for i, j in [(0, 0), (3, 2), (5, 4)]:
        up, down = f.copy(), f.copy()
        up[i, j] += eps
        down[i, j] -= eps
        numeric = (_numpy_loss(up, c, y, 0.5) - _numpy_loss(down, c, y, 0.5)) / (2 * eps)
        np.testing.assert_allclose(grad_f[i, j], numeric, rtol=2e-2, atol=1e-4)


def _numpy_sequential(c, f, y, m):
    c = c.copy()
    for i in range(len(y)):
        if y[i] >= 0:
            c[y[i]] = unit(m * c[y[i]] + (1 - m) * unit(f[i]))
    return c


def test_sequential_update_matches_numpy_loop():
    rng = np.random.default_rng(1)
    c = unit(rng.normal(size=(4, 6))).astype(np.float32)
    f = rng.normal(size=(7, 6)).astype(np.float32)
    y = np.array([2, 0, 2, -1, 3, 2, 0])
    new = cluster_memory.update_centroids(c, f, y, momentum=0.2, mode="sequential")
    np.testing.assert_allclose(new, _numpy_sequential(c, f, y, 0.2), atol=1e-6)
    np.testing.assert_allclose(new[1], c[1])  # untouched cluster


def test_mean_update_equals_sequential_with_one_sample_per_cluster_and_averages_otherwise():
    rng = np.random.default_rng(2)
    c = unit(rng.normal(size=(5, 4))).astype(np.float32)
    f = rng.normal(size=(3, 4)).astype(np.float32)
    distinct = np.array([4, 0, -1])
    np.testing.assert_allclose(
        cluster_memory.update_centroids(c, f, distinct, 0.1, "mean"),
        _numpy_sequential(c, f, distinct, 0.1),
        atol=1e-6,
    )
    shared = np.array([1, 1, 3])
    new = cluster_memory.update_centroids(c, f, shared, 0.1, "mean")
    mean = (unit(f[0]) + unit(f[1])) / 2
    np.testing.assert_allclose(new[1], unit(0.1 * c[1] + 0.9 * mean), atol=1e-6)


def test_hard_update_uses_least_similar_sample():
    c = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    f = np.array([[1.0, 0.1], [0.2, 1.0], [0.0, 1.0]], np.float32)
    y = np.array([1, 1, 0])
    new = cluster_memory.update_centroids(c, f, y, 0.5, "hard")
    # Cluster 1: sample 0 (cos 0.0995) is less similar than sample 1 (cos 0.98).
    np.testing.assert_allclose(new[1], unit(0.5 * c[1] + 0.5 * unit(f[0])), atol=1e-6)
    np.testing.assert_allclose(new[0], unit(0.5 * c[0] + 0.5 * unit(f[2])), atol=1e-6)
    with pytest.raises(ValueError, match="mode must be one of"):
        cluster_memory.update_centroids(c, f, y, 0.5, "median")


def _numpy_batch_rule(c, f, y, m, mode):
    """The update rules of the module doc, row by row, for every row the batch names."""
    c, f = c.astype(np.float64), unit(f.astype(np.float64))
    new = c.copy()
    for row in np.unique(y[y >= 0]):
        members = np.flatnonzero(y == row)
        if mode == "mean":
            step = f[members].mean(axis=0)
        else:
            step = f[members[np.argmin(f[members] @ c[row])]]
        new[row] = unit(m * c[row] + (1 - m) * step)
    return new


@pytest.mark.parametrize("mode", ["mean", "hard"])
def test_update_writes_only_the_batch_rows_and_matches_the_rule(mode):
    rng = np.random.default_rng(3)
    c = unit(rng.normal(size=(40, 8))).astype(np.float32)
    f = rng.normal(size=(10, 8)).astype(np.float32)
    y = np.array([5, 17, 5, -1, 39, 17, 5, 0, -1, 22])  # repeats, outliers, first and last rows
    update = jax.jit(cluster_memory.update_centroids, static_argnames="mode", donate_argnums=0)
    new = np.asarray(update(jnp.asarray(c), f, y, 0.3, mode=mode))
    np.testing.assert_allclose(new, _numpy_batch_rule(c, f, y, 0.3, mode), atol=1e-6)
    untouched = np.setdiff1d(np.arange(40), y)
    np.testing.assert_array_equal(new[untouched], c[untouched])  # bit for bit
    only_outliers = cluster_memory.update_centroids(c, f[:2], np.array([-1, -1]), 0.3, mode)
    np.testing.assert_array_equal(only_outliers, c)

"""Supervised reference losses against NumPy transcriptions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxreid.methods import supervised


def _np_smoothed_ce(z, y, eps):
    z = z.astype(np.float64)
    log_p = z - z.max(1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
    c = z.shape[1]
    total = 0.0
    for i in range(len(y)):
        q = np.full(c, eps / c)
        q[y[i]] += 1 - eps
        total += -(q * log_p[i]).sum()
    return total / len(y)


def _np_triplet(f, y, margin):
    f = f.astype(np.float64)
    values = []
    for i in range(len(y)):
        d = np.linalg.norm(f - f[i], axis=1)
        pos = [d[j] for j in range(len(y)) if y[j] == y[i] and j != i]
        neg = [d[j] for j in range(len(y)) if y[j] != y[i]]
        if pos and neg:
            values.append(max(0.0, max(pos) - min(neg) + margin))
    return np.mean(values) if values else 0.0


def test_smoothed_cross_entropy_matches_numpy_and_plain_ce_at_zero():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(5, 7)).astype(np.float32)
    y = np.array([0, 3, 6, 3, 1])
    got = supervised.smoothed_cross_entropy(jnp.asarray(z), jnp.asarray(y), 0.1)
    np.testing.assert_allclose(got, _np_smoothed_ce(z, y, 0.1), rtol=1e-5)
    plain = supervised.smoothed_cross_entropy(jnp.asarray(z), jnp.asarray(y), 0.0)
    np.testing.assert_allclose(plain, _np_smoothed_ce(z, y, 0.0), rtol=1e-5)
    assert float(got) != float(plain)


def test_batch_hard_triplet_matches_brute_force_and_gradient():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(8, 4)).astype(np.float32)
    y = np.array([0, 0, 1, 1, 2, 2, 2, 3])  # id 3 has no positive: skipped
    got = supervised.batch_hard_triplet(jnp.asarray(f), jnp.asarray(y), 0.3)
    np.testing.assert_allclose(got, _np_triplet(f, y, 0.3), rtol=1e-5)
    # A hand case: anchors at 0 and 1 (same id), a negative at 3 on a line.
    line = jnp.asarray([[0.0], [1.0], [3.0]])
    value = supervised.batch_hard_triplet(line, jnp.asarray([0, 0, 1]), 0.5)
    # anchor 0: 1 - 3 + 0.5 < 0 -> 0; anchor 1: 1 - 2 + 0.5 < 0 -> 0; anchor 2 skipped.
    assert float(value) == 0.0
    value = supervised.batch_hard_triplet(line, jnp.asarray([0, 0, 1]), 2.5)
    np.testing.assert_allclose(value, ((1 - 3 + 2.5) + (1 - 2 + 2.5)) / 2, rtol=1e-6)

    grad = np.asarray(jax.grad(supervised.batch_hard_triplet)(jnp.asarray(f), jnp.asarray(y), 0.3))
    assert np.all(np.isfinite(grad))
    eps = 1e-3
    for i, j in [(0, 0), (4, 2), (7, 3)]:
        up, down = f.copy(), f.copy()
        up[i, j] += eps
        down[i, j] -= eps
        numeric = (_np_triplet(up, y, 0.3) - _np_triplet(down, y, 0.3)) / (2 * eps)
        np.testing.assert_allclose(grad[i, j], numeric, rtol=2e-2, atol=1e-4)


def test_identical_features_give_finite_gradient():
    f = jnp.ones((4, 3))
    grad = jax.grad(supervised.batch_hard_triplet)(f, jnp.asarray([0, 0, 1, 1]), 0.3)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_relabel_maps_ids_to_a_dense_range():
    np.testing.assert_array_equal(supervised.relabel(np.array([7, 3, 7, 10])), [1, 0, 1, 2])

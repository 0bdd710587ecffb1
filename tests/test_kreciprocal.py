"""Sparse k-reciprocal Jaccard distance and re-ranking against dense brute-force references.

The references (below and in helpers.py) are written from the definitions (dense N x N arrays,
per-row loops) and follow the public implementations' conventions: the clustering variant ranks
k1 neighbours with the point itself included and uses d = 2 - 2 cos; re-ranking ranks all Q + G
points, takes k1 + 1 neighbours and divides each row of d by its maximum.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.sparse as sp
from helpers import dense_encoding, dense_jaccard, dense_rank

from jaxreid.pseudo_labels import kreciprocal, neighbors


def _clustered(n: int, dim: int, num_clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = 3.0 * rng.standard_normal((num_clusters, dim))
    x = centres[rng.integers(num_clusters, size=n)] + 1.5 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def reference_jaccard(x, k1, k2):
    x64 = x.astype(np.float64)
    distance = 2.0 - 2.0 * x64 @ x64.T
    rank = dense_rank(distance)
    v = dense_encoding(distance, rank, k1, round(k1 / 2) + 1, k2)
    return np.maximum(dense_jaccard(v, v), 0.0)


def reference_rerank(q, g, k1, k2, lambda_value):
    x = np.concatenate([q, g]).astype(np.float64)
    distance = 2.0 - 2.0 * x @ x.T
    distance = distance / distance.max(axis=1, keepdims=True)
    rank = dense_rank(distance)
    v = dense_encoding(distance, rank, k1 + 1, round(k1 / 2) + 1, k2)
    nq = len(q)
    jaccard = dense_jaccard(v[:nq], v)
    return ((1 - lambda_value) * jaccard + lambda_value * distance[:nq])[:, nq:]


@pytest.mark.parametrize("backend", ["faiss", "jax"])
@pytest.mark.parametrize(
    "n,k1,k2,seed", [(200, 20, 6, 0), (160, 30, 6, 1), (90, 9, 1, 2), (120, 7, 3, 3)]
)
def test_jaccard_equals_dense_reference(backend, n, k1, k2, seed):
    x = _clustered(n, 32, n // 8, seed)
    expected = reference_jaccard(x, k1, k2)
    result = kreciprocal.jaccard_distance(x, k1, k2, backend=backend)
    assert result.dtype == np.float32 and result.has_sorted_indices
    np.testing.assert_allclose(kreciprocal.densify(result), expected, atol=1e-5)
    # Stored entries are exactly the pairs with d_J < 1 (diagonal included, as 0).
    stored = np.zeros((n, n), bool)
    stored[sp.coo_matrix(result).row, sp.coo_matrix(result).col] = True
    np.testing.assert_array_equal(stored, expected < 1 - 1e-9)
    assert (expected >= 1).any(), "test data must leave pairs without shared support"
    np.testing.assert_array_equal(result.diagonal(), 0.0)
    assert (result != result.T).nnz == 0


def test_expansion_is_exercised_and_matches_definition():
    x = _clustered(200, 32, 25, seed=0)
    _, order = neighbors.knn(x, 20)
    reciprocal = kreciprocal.reciprocal_sets(order, 20)
    half = kreciprocal.reciprocal_sets(order, 11)
    expanded = kreciprocal.expanded_sets(reciprocal, half)
    assert expanded.nnz > reciprocal.nnz
    for i in range(200):
        r_i = set(reciprocal[i].indices.tolist())
        assert r_i == {j for j in order[i, :20] if i in order[j, :20]}
        members = set(r_i)
        for c in r_i:
            r_c = set(half[c].indices.tolist())
            if len(r_c & r_i) > 2 / 3 * len(r_c):
                members |= r_c
        assert set(expanded[i].indices.tolist()) == members


def test_expansion_rule_by_hand():
    def sets(rows):
        dense = np.zeros((8, 8), bool)
        for i, members in rows.items():
            dense[i, members] = True
        return sp.csr_matrix(dense)

    reciprocal = sets({0: [0, 1, 2, 3]})
    half = sets({0: [0], 1: [1, 2, 5], 2: [0, 2, 3, 6], 3: [3, 7]})
    # 1: overlap 2 of 3, not > 2 -> no; 2: 3 of 4 > 8/3 -> adds 6; 3: 1 of 2, not > 4/3 -> no.
    expanded = kreciprocal.expanded_sets(reciprocal, half)
    np.testing.assert_array_equal(expanded[0].indices, [0, 1, 2, 3, 6])


def test_max_distance_keeps_the_close_pairs_only():
    x = _clustered(150, 32, 18, seed=4)
    full = kreciprocal.jaccard_distance(x, 20, 6)
    close = kreciprocal.jaccard_distance(x, 20, 6, max_distance=0.5)
    dense = kreciprocal.densify(full)
    assert 0 < close.nnz < full.nnz
    coo = sp.coo_matrix(close)
    np.testing.assert_array_equal(coo.data, dense[coo.row, coo.col])
    assert coo.data.max() <= 0.5
    assert close.nnz == int((dense <= 0.5).sum())


def test_small_n_warns_and_uses_k1_equal_n(caplog):
    x = _clustered(12, 8, 3, seed=5)
    with caplog.at_level(logging.WARNING, logger="jaxreid.pseudo_labels.kreciprocal"):
        result = kreciprocal.jaccard_distance(x, 30, 6)
    assert "k1=30 > N=12" in caplog.text
    np.testing.assert_allclose(kreciprocal.densify(result), reference_jaccard(x, 12, 6), atol=1e-5)


def test_unnormalised_features_are_normalised():
    x = _clustered(80, 16, 10, seed=6)
    scaled = x * np.random.default_rng(0).uniform(0.5, 3.0, size=(80, 1)).astype(np.float32)
    a = kreciprocal.densify(kreciprocal.jaccard_distance(x, 10, 6))
    b = kreciprocal.densify(kreciprocal.jaccard_distance(scaled, 10, 6))
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("backend", ["faiss", "jax"])
@pytest.mark.parametrize(
    "k1,k2,lambda_value,seed", [(20, 6, 0.3, 0), (10, 1, 0.0, 1), (7, 3, 1.0, 2)]
)
def test_rerank_equals_dense_reference(backend, k1, k2, lambda_value, seed):
    x = _clustered(110, 32, 14, seed)
    q, g = x[:30], x[30:]
    result = kreciprocal.k_reciprocal_rerank(q, g, k1, k2, lambda_value, backend=backend)
    assert result.shape == (30, 80) and result.dtype == np.float32
    np.testing.assert_allclose(result, reference_rerank(q, g, k1, k2, lambda_value), atol=1e-5)


def test_rerank_handles_empty_and_tiny_inputs():
    x = _clustered(6, 8, 2, seed=7)
    assert kreciprocal.k_reciprocal_rerank(x[:0], x).shape == (0, 6)
    np.testing.assert_allclose(
        kreciprocal.k_reciprocal_rerank(x[:2], x[2:]),
        reference_rerank(x[:2], x[2:], 5, 6, 0.3),
        atol=1e-5,
    )


def test_densify_fills_missing_pairs_with_one():
    matrix = sp.csr_matrix(
        (
            np.array([0.0, 0.25, 0.25, 0.0], np.float32),
            (np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])),
        ),
        shape=(3, 3),
    )
    np.testing.assert_array_equal(
        kreciprocal.densify(matrix), [[0, 0.25, 1], [0.25, 0, 1], [1, 1, 1]]
    )


def test_small_chunks_give_the_same_result(monkeypatch):
    x = _clustered(150, 32, 18, seed=8)
    jaccard = kreciprocal.densify(kreciprocal.jaccard_distance(x, 20, 6))
    rerank = kreciprocal.k_reciprocal_rerank(x[:40], x[40:])
    monkeypatch.setattr(kreciprocal, "_CHUNK_ELEMENTS", 700)  # dozens of chunks of a few rows
    np.testing.assert_array_equal(
        kreciprocal.densify(kreciprocal.jaccard_distance(x, 20, 6)), jaccard
    )
    np.testing.assert_allclose(kreciprocal.k_reciprocal_rerank(x[:40], x[40:]), rerank, atol=1e-6)


def test_float16_unit_rows_are_used_without_a_float32_copy():
    x = _clustered(150, 32, 18, seed=9)
    half = x.astype(np.float16)
    assert kreciprocal.unit_rows(half) is half  # a 10^6-row map is not copied whole
    not_unit = (2 * x).astype(np.float16)
    assert kreciprocal.unit_rows(not_unit).dtype == np.float32
    # Rounding to float16 moves near-tied neighbours, not the clusters.
    from jaxreid.pseudo_labels.clustering import dbscan

    labels = dbscan(kreciprocal.jaccard_distance(x, 20, 6), 0.5, 4)
    assert labels.max() >= 5
    np.testing.assert_array_equal(dbscan(kreciprocal.jaccard_distance(half, 20, 6), 0.5, 4), labels)

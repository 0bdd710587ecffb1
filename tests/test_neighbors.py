"""kNN backends against a float64 brute force, and against each other (sets, ties, self first)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from helpers import unit

from jaxreid.pseudo_labels import neighbors

# (backend, extra keyword arguments): small blocks so several blocks and padding are exercised.
VARIANTS = [
    ("faiss", {}),
    ("jax", {"block_size": 64}),
    ("jax", {"block_size": 48, "symmetric": False}),
]
IDS = ["faiss", "jax-symmetric", "jax-query-blocks"]


def _random_unit(rows: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, dim))
    return unit(x, axis=1).astype(np.float32)


def _brute_force(queries, database, k, self_first):
    sims = queries.astype(np.float64) @ database.astype(np.float64).T
    if self_first:
        np.fill_diagonal(sims, np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # ties: lower index first
    return np.take_along_axis(sims, order, axis=1), order


@pytest.mark.parametrize("backend,kwargs", VARIANTS, ids=IDS)
def test_knn_equals_brute_force_order(backend, kwargs):
    x = _random_unit(257, 16, seed=0)
    sims, idx = neighbors.knn(x, 12, backend, **kwargs)
    ref_sims, ref_idx = _brute_force(x, x, 12, self_first=True)
    assert sims.shape == idx.shape == (257, 12)
    assert sims.dtype == np.float32 and idx.dtype == np.int64
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(idx[:, 0], np.arange(257))
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-6)
    np.testing.assert_allclose(sims[:, 1:], ref_sims[:, 1:], atol=1e-6)
    assert np.all(np.diff(sims, axis=1) <= 0)


def test_backends_agree_with_duplicates_and_ties():
    x = _random_unit(300, 8, seed=1)
    group = [5, 7, 9, 100, 250]  # five copies of one vector
    x[group] = x[7]
    x[[20, 21]] = x[3]  # three copies
    results = [neighbors.knn(x, 10, b, **kw) for b, kw in VARIANTS]
    for _, idx in results[1:]:
        np.testing.assert_array_equal(idx, results[0][1])
    idx = results[0][1]
    for i in group:  # itself first, then its copies in index order
        assert idx[i, 0] == i
        np.testing.assert_array_equal(idx[i, 1:5], [j for j in group if j != i])
    np.testing.assert_array_equal(idx[3, :3], [3, 20, 21])
    np.testing.assert_array_equal(idx[20, :3], [20, 3, 21])
    np.testing.assert_array_equal(idx[21, :3], [21, 3, 20])


def test_ordering_in_row_chunks_changes_nothing(monkeypatch):
    # The candidates are ordered _CHUNK_ROWS rows at a time (bounded work copies at 10^6
    # rows); chunks of 32 over 300 rows, the copies and ties of the test above included.
    x = _random_unit(300, 8, seed=1)
    x[[5, 7, 9, 100, 250]] = x[7]
    x[[20, 21]] = x[3]
    whole = neighbors.knn(x, 10), neighbors.knn_query(x[:40], x, 10)
    monkeypatch.setattr(neighbors, "_CHUNK_ROWS", 32)
    chunked = neighbors.knn(x, 10), neighbors.knn_query(x[:40], x, 10)
    for a, b in zip(whole, chunked, strict=True):
        assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()


@pytest.mark.parametrize("backend,kwargs", VARIANTS, ids=IDS)
def test_knn_query_equals_brute_force(backend, kwargs):
    kwargs = {k: v for k, v in kwargs.items() if k != "symmetric"}
    database = _random_unit(150, 16, seed=2)
    database[[40, 90]] = database[60]  # a three-way tie: 40, 60, 90 in this order
    queries = np.concatenate([_random_unit(37, 16, seed=3), database[60:61]])
    sims, idx = neighbors.knn_query(queries, database, 9, backend, **kwargs)
    ref_sims, ref_idx = _brute_force(queries, database, 9, self_first=False)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(idx[-1, :3], [40, 60, 90])
    np.testing.assert_allclose(sims, ref_sims, atol=1e-6)


@pytest.mark.parametrize("backend", ["faiss", "jax"])
def test_k_larger_than_n_is_clipped(backend):
    x = _random_unit(7, 4, seed=4)
    sims, idx = neighbors.knn(x, 30, backend)
    assert idx.shape == (7, 7)
    np.testing.assert_array_equal(np.sort(idx, axis=1), np.tile(np.arange(7), (7, 1)))
    np.testing.assert_array_equal(idx[:, 0], np.arange(7))


def test_jax_blocks_compile_once():
    x = _random_unit(200, 8, seed=5)
    neighbors.knn(x, 5, "jax", block_size=48)  # warm the cache for this shape
    before = neighbors._pair_top_k._cache_size()
    neighbors.knn(x[::-1].copy(), 5, "jax", block_size=48)  # 5 blocks, 15 pairs, same shapes
    assert neighbors._pair_top_k._cache_size() == before


def test_missing_faiss_gives_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ImportError, match="backend='jax'"):
        neighbors.knn(_random_unit(10, 4, seed=6), 3, "faiss")
    with pytest.raises(ValueError, match="backend"):
        neighbors.knn(_random_unit(10, 4, seed=6), 3, "annoy")

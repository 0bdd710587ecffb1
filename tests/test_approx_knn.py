"""Approximate kNN (cluster.knn = ivf / hnsw / auto) against the exact search: recall on
clustered data, the ordering conventions, "auto" below its threshold being the exact search
bit for bit (labels included), the derived index parameters and the setting's validation."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import unit

from jaxreid.config_base import base_config
from jaxreid.pseudo_labels import clustering, neighbors
from jaxreid.validate import config_problems


def _identities(n: int, dim: int, seed: int, outliers: float = 0.15):
    """Unit features of identities with 5-30 images each (noise 0.5-1.2 x the centre), plus
    `outliers` of the rows unclustered; returns (features float32, identity or -1)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(5, 31, size=n // 5)
    truth = np.repeat(np.arange(len(sizes)), sizes)[:n]
    truth = np.concatenate([truth, np.full(n - len(truth), -1)])
    truth[rng.random(n) < outliers] = -1
    centres = unit(rng.standard_normal((len(sizes), dim)), axis=1)
    noise = unit(rng.standard_normal((n, dim)), axis=1) * rng.uniform(0.5, 1.2, (n, 1))
    x = np.where(truth[:, None] >= 0, centres[np.maximum(truth, 0)], 0.0) + noise
    return unit(x, axis=1).astype(np.float32), truth


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(
        np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, exact, strict=True)])
    )


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_recall_and_conventions(index):
    x, _ = _identities(4000, 48, seed=0)
    k = 20
    exact_sims, exact_idx = neighbors.knn(x, k)
    # IVF's derived nprobe (8 of 64 lists) finds 0.87 of these lists: the neighbours beyond
    # an identity are near-random outliers spread over all lists; 24 lists find 0.96.
    params = neighbors.IndexParams(nprobe=24) if index == "ivf" else None
    sims, idx = neighbors.knn(x, k, index=index, params=params)
    assert sims.shape == idx.shape == (4000, k)
    assert sims.dtype == np.float32 and idx.dtype == np.int64
    recall = _recall(idx, exact_idx)
    assert recall >= 0.95, recall
    # Self first, then decreasing similarity; each similarity is the true inner product.
    np.testing.assert_array_equal(idx[:, 0], np.arange(len(x)))
    assert np.all(np.diff(sims[:, 1:], axis=1) <= 0)
    true = np.einsum("nd,nkd->nk", x.astype(np.float64), x[idx].astype(np.float64))
    np.testing.assert_allclose(sims, true, atol=1e-5)
    # Rows whose whole list was found are the exact lists, order included.
    same_set = np.array([set(a) == set(b) for a, b in zip(idx, exact_idx, strict=True)])
    assert same_set.mean() > 0.5
    np.testing.assert_array_equal(idx[same_set], exact_idx[same_set])


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_ties_are_ordered_by_index(index):
    x, _ = _identities(600, 16, seed=1, outliers=0.0)
    x = np.concatenate([x, x[:50], x[:50]])  # rows i, i + 600, i + 650 are equal
    sims, idx = neighbors.knn(x, 6, index=index, params=neighbors.IndexParams(nprobe=16))
    for i in range(50):
        twins = {i, i + 600, i + 650}
        row = list(idx[i])
        assert row[0] == i
        # The two twins come next, lower index first (similarity 1, a tie).
        assert row[1:3] == sorted(twins - {i}), row
    assert np.all(np.diff(sims[:, 1:], axis=1) <= 0)
    # Query-vs-database: ties by index, no self convention.
    qs, qi = neighbors.knn_query(x[:50], x, 3, index=index)
    np.testing.assert_array_equal(
        qi, np.stack([np.arange(50), np.arange(50) + 600, 650 + np.arange(50)], 1)
    )


def test_auto_below_threshold_is_exact_bit_for_bit():
    x, _ = _identities(3000, 64, seed=2)
    for backend in ("faiss", "jax"):
        exact = neighbors.knn(x, 30, backend)
        auto = neighbors.knn(x, 30, backend, index="auto")
        for a, b in zip(exact, auto, strict=True):
            assert a.tobytes() == b.tobytes()
    config = clustering.default_cluster_config()
    assert config.knn == "auto" and base_config().cluster.knn == "auto"
    labels_auto = clustering.cluster_features(x, config)
    config.knn = "exact"
    labels_exact = clustering.cluster_features(x, config)
    assert labels_auto.max() > 50  # a real clustering, not all outliers
    np.testing.assert_array_equal(labels_auto, labels_exact)


def test_auto_above_threshold_uses_the_approximate_index(monkeypatch):
    x, _ = _identities(1500, 32, seed=3)
    monkeypatch.setattr(neighbors, "AUTO_EXACT_MAX", 1000)
    assert neighbors.resolve_index("auto", 1000) == "exact"
    assert neighbors.resolve_index("auto", 1001) == neighbors.AUTO_INDEX
    auto = neighbors.knn(x, 10, index="auto")
    approximate = neighbors.knn(x, 10, index=neighbors.AUTO_INDEX)
    for a, b in zip(auto, approximate, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="index must be one of"):
        neighbors.knn(x, 10, index="flat")


def test_float16_memmap_database_is_read_in_chunks(monkeypatch, tmp_path):
    x, _ = _identities(2000, 32, seed=4)
    stored = np.lib.format.open_memmap(tmp_path / "f.npy", "w+", np.float16, x.shape)
    stored[:] = x
    monkeypatch.setattr(neighbors, "_CHUNK_ROWS", 300)  # several chunks, a short last one
    for index in ("ivf", "hnsw"):
        from_memmap = neighbors.knn(stored, 12, index=index)
        from_array = neighbors.knn(np.asarray(stored, np.float32), 12, index=index)
        for a, b in zip(from_memmap, from_array, strict=True):
            np.testing.assert_array_equal(a, b)


def test_derived_parameters_by_hand():
    # N = 10^6: 2 sqrt = 2000, log2 = 10.97 -> 2^11 lists; nprobe 16.
    assert neighbors.index_params(10**6, 38) == dict(
        nlist=2048, nprobe=16, hnsw_m=32, ef_construction=64, ef_search=152
    )
    # N = 20,000: 2 sqrt = 282.8, log2 = 8.14 -> 256 lists.
    p = neighbors.index_params(20_000, 20)
    assert (p["nlist"], p["nprobe"], p["ef_search"]) == (256, 16, 128)
    # N = 1,000: 64 lists would train on < 39 points each -> 1000 // 39 = 25; nprobe 16.
    assert neighbors.index_params(1000, 10)["nlist"] == 25
    assert neighbors.index_params(1000, 10)["nprobe"] == 16
    # N = 100: 2 lists, nprobe clipped to them.
    assert neighbors.index_params(100, 10)["nprobe"] == 2
    overridden = neighbors.index_params(
        10**6, 38, neighbors.IndexParams(nlist=4096, nprobe=32, hnsw_m=48, ef_search=200)
    )
    assert overridden == dict(nlist=4096, nprobe=32, hnsw_m=48, ef_construction=96, ef_search=200)
    # The settings reach the index: nprobe = nlist scans every list, i.e. the exact search.
    x, _ = _identities(1200, 24, seed=5)
    full = neighbors.knn(x, 15, index="ivf", params=neighbors.IndexParams(nlist=16, nprobe=16))
    np.testing.assert_array_equal(full[1], neighbors.knn(x, 15)[1])


def test_cpu_ivf_finds_the_candidates_of_faiss_index_ivf_flat():
    """The list-by-list BLAS search scans what FAISS's IndexIVFFlat scans: with the same
    centroids and nprobe, every query gets the same best candidates (ids and similarities),
    for the self search of a float16 memory map and for separate queries."""
    import faiss

    x, _ = _identities(3000, 40, seed=6)
    queries = _identities(500, 40, seed=7)[0]
    nlist, nprobe, k = 32, 5, 25
    centroids = neighbors.ivf_centroids(x, nlist)
    reference = faiss.IndexIVFFlat(faiss.IndexFlatIP(40), 40, nlist, faiss.METRIC_INNER_PRODUCT)
    reference.quantizer.add(centroids)
    reference.is_trained = True
    reference.add(x)
    reference.nprobe = nprobe
    params = dict(nlist=nlist, nprobe=nprobe)
    for q in (x, queries):
        want_sims, want = reference.search(q, k)
        sims, idx = neighbors._blocked_ivf_search(q, x, k, params, centroids=centroids)
        order = np.argsort(-sims, axis=1, kind="stable")
        sims, idx = np.take_along_axis(sims, order, 1), np.take_along_axis(idx, order, 1)
        np.testing.assert_allclose(sims, want_sims, atol=1e-5)
        # Ids agree wherever the similarity is not tied with a neighbour in the row.
        gaps = np.minimum(
            np.abs(np.diff(want_sims, axis=1, prepend=np.inf)),
            np.abs(np.diff(want_sims, axis=1, append=-np.inf)),
        )
        clear = gaps > 1e-5
        assert clear.mean() > 0.9
        np.testing.assert_array_equal(idx[clear], want[clear])
        # The scan is a small share of the data, so this is not the exact search.
        assert not np.array_equal(idx[:, :10], neighbors.knn_query(q, x, k)[1][:, :10])
    # Lists shorter than k pad with (-inf, -1), as FAISS does with (-inf or -3.4e38, -1).
    sims, idx = neighbors._blocked_ivf_search(x[:200], x[:200], 60, dict(nlist=8, nprobe=1))
    assert (idx == -1).any() and np.all(np.isneginf(sims[idx == -1]))


def test_knn_setting_is_validated():
    config = base_config()
    assert not [p for p in config_problems(config) if "knn" in p]
    config.cluster.knn = "flat"
    config.cluster.knn_nprobe = -1
    problems = config_problems(config)
    assert any(
        p.startswith("cluster.knn = 'flat': must be one of exact, ivf, hnsw, auto")
        for p in problems
    )
    assert any(p.startswith("cluster.knn_nprobe = -1") for p in problems)
    knn, params = clustering.knn_settings({"knn": "hnsw", "knn_ef_search": 99})
    assert knn == "hnsw" and params == neighbors.IndexParams(ef_search=99)

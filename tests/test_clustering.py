"""DBSCAN on sparse Jaccard distances, the clustering pipeline and its degenerate cases."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.sparse as sp

from jaxreid.pseudo_labels import clustering, kreciprocal


def reference_dbscan(distance: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    """Textbook DBSCAN (breadth-first, points scanned in index order) on a dense matrix."""
    n = len(distance)
    neighbourhoods = [np.flatnonzero(np.maximum(distance[i], 0.0) <= eps) for i in range(n)]
    is_core = [len(nb) >= min_samples for nb in neighbourhoods]
    labels = np.full(n, -1)
    cluster = 0
    for i in range(n):
        if labels[i] != -1 or not is_core[i]:
            continue
        labels[i] = cluster
        queue = [i]
        while queue:
            p = queue.pop(0)
            if not is_core[p]:
                continue
            for q in neighbourhoods[p]:
                if labels[q] == -1:
                    labels[q] = cluster
                    queue.append(q)
        cluster += 1
    return labels


def _random_distance(rng, n):
    points = rng.random((n, 2)) * rng.uniform(0.5, 3.0)
    return np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))


def _separated_clusters(sizes, dim=64, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(sizes), dim))
    labels = np.repeat(np.arange(len(sizes)), sizes)
    perm = rng.permutation(len(labels))
    x = centres[labels[perm]] + 0.1 * rng.standard_normal((len(labels), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels[perm]


def test_dbscan_equals_reference_on_random_dense_cases():
    rng = np.random.default_rng(0)
    for _ in range(150):
        distance = _random_distance(rng, int(rng.integers(1, 50)))
        eps, min_samples = rng.uniform(0.05, 0.5), int(rng.integers(1, 6))
        np.testing.assert_array_equal(
            clustering.dbscan(distance, eps, min_samples),
            reference_dbscan(distance, eps, min_samples),
        )


def test_dbscan_equals_sklearn():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    rng = np.random.default_rng(1)
    for _ in range(60):
        distance = _random_distance(rng, int(rng.integers(2, 60)))
        eps, min_samples = rng.uniform(0.05, 0.5), int(rng.integers(1, 6))
        expected = sklearn_cluster.DBSCAN(
            eps=eps, min_samples=min_samples, metric="precomputed"
        ).fit_predict(distance)
        np.testing.assert_array_equal(clustering.dbscan(distance, eps, min_samples), expected)


def test_border_point_joins_the_first_cluster():
    # Two clusters of four on a line and a border point within eps of one core of each.
    a = [0.0, 0.05, 0.1, 0.15]
    b = [0.45, 0.5, 0.55, 0.6]
    for points, expected in [
        (a + b + [0.3, 2.0], [0, 0, 0, 0, 1, 1, 1, 1, 0, -1]),
        (b + a + [0.3, 2.0], [0, 0, 0, 0, 1, 1, 1, 1, 0, -1]),
    ]:
        p = np.array(points)
        distance = np.abs(p[:, None] - p[None])
        np.testing.assert_array_equal(clustering.dbscan(distance, 0.16, 4), expected)
        np.testing.assert_array_equal(clustering.dbscan(sp.csr_matrix(distance), 0.16, 4), expected)


def test_dbscan_on_sparse_jaccard_equals_dense():
    x, _ = _separated_clusters([9, 5, 12, 3, 7, 1, 1], seed=2)
    x[:20] += 0.3 * np.random.default_rng(3).standard_normal((20, 64)).astype(np.float32)
    sparse = kreciprocal.jaccard_distance(x, 10, 6)
    dense = kreciprocal.densify(sparse)
    for eps in (0.3, 0.5, 0.7, 0.95):
        for min_samples in (1, 2, 4):
            expected = reference_dbscan(dense, eps, min_samples)
            np.testing.assert_array_equal(clustering.dbscan(sparse, eps, min_samples), expected)


def test_negative_distances_are_clipped_and_eps_above_one_links_everything():
    distance = sp.csr_matrix(np.array([[0.0, -1e-7], [-1e-7, 0.0]], np.float32))
    np.testing.assert_array_equal(clustering.dbscan(distance, 0.0, 2), [0, 0])
    lonely = sp.csr_matrix((3, 3), dtype=np.float32)  # no stored pair: every distance is 1
    np.testing.assert_array_equal(clustering.dbscan(lonely, 0.5, 1), [0, 1, 2])
    np.testing.assert_array_equal(clustering.dbscan(lonely, 1.0, 3), [0, 0, 0])
    np.testing.assert_array_equal(clustering.dbscan(lonely, 1.0, 4), [-1, -1, -1])
    assert clustering.dbscan(sp.csr_matrix((0, 0)), 0.5, 4).shape == (0,)
    with pytest.raises(ValueError):
        clustering.dbscan(lonely, 0.5, 0)


def test_cluster_features_recovers_separated_clusters(caplog):
    sizes = [9, 5, 12, 6, 7, 8, 10, 4]
    x, truth = _separated_clusters(sizes + [1, 1], seed=4)  # two singletons
    config = clustering.default_cluster_config()
    config.k1, config.eps = 20, 0.6
    with caplog.at_level(logging.INFO, logger="jaxreid"):
        labels = clustering.cluster_features(x, config)
    assert "8 clusters" in caplog.text
    for t in range(len(sizes)):
        assert len(set(labels[truth == t])) == 1 and labels[truth == t][0] >= 0
    assert len(set(labels[truth < len(sizes)])) == len(sizes)
    assert -1 in labels[truth >= len(sizes)]  # (the other singleton may border a cluster)
    # Clusters are numbered in order of their first point.
    firsts = [np.flatnonzero(labels == c)[0] for c in range(labels.max() + 1)]
    assert firsts == sorted(firsts)
    same_jax = clustering.cluster_features(x, {"k1": 20, "eps": 0.6, "knn_backend": "jax"})
    np.testing.assert_array_equal(same_jax, labels)


def test_degenerate_cases_warn_and_return(caplog):
    x, _ = _separated_clusters([8, 8, 8], seed=5)
    with caplog.at_level(logging.WARNING, logger="jaxreid"):
        labels = clustering.cluster_features(x, {"eps": 0.01, "min_samples": 20})
        assert np.all(labels == -1) and "every one of the 24 points is an outlier" in caplog.text
        caplog.clear()
        labels = clustering.cluster_features(x, {"eps": 1.0, "min_samples": 4})
        assert np.all(labels == 0) and "one cluster holds 24 of 24" in caplog.text
        caplog.clear()
        labels = clustering.cluster_features(x[:5], {"k1": 30})
        assert labels.shape == (5,) and "k1=30 > N=5" in caplog.text
        caplog.clear()
        assert clustering.cluster_features(x[:0]).shape == (0,)
        assert clustering.cluster_features(x[:1], {"min_samples": 1}).tolist() == [0]


def test_pseudo_label_stats_by_hand():
    stats = clustering.pseudo_label_stats(np.array([0, 0, 1, -1, 2, 2, 2, -1, 0, 0]))
    assert stats == {
        "num_samples": 10,
        "num_clusters": 3,
        "num_clustered": 8,
        "num_outliers": 2,
        "outlier_fraction": 0.2,
        "largest_cluster": 4,
        "smallest_cluster": 1,
        "mean_cluster_size": 8 / 3,
        "median_cluster_size": 3.0,
    }
    empty = clustering.pseudo_label_stats(np.full(3, -1))
    assert empty["num_clusters"] == 0 and empty["outlier_fraction"] == 1.0


def test_epoch_eps_moves_linearly_to_final_eps():
    assert [clustering.epoch_eps(0.5, 0.35, e, 4) for e in range(4)] == pytest.approx(
        [0.5, 0.45, 0.4, 0.35]
    )
    assert clustering.epoch_eps(0.5, 0.0, 3, 4) == 0.5  # off: eps throughout
    assert clustering.epoch_eps(0.5, 0.35, 0, 1) == 0.5  # one epoch: eps
    assert clustering.epoch_eps(0.5, 0.35, 9, 4) == pytest.approx(0.35)  # past the end

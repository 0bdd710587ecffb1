"""Camera affinity (jaxreid.pseudo_labels.camera_affinity): the affinity of a
camera network worked out by hand, the penalised kNN lists and Jaccard
distance against dense references, and the clustering switch."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import dense_encoding, dense_jaccard, dense_rank

from jaxreid.pseudo_labels import camera_affinity, clustering, kreciprocal


def _paired_cameras(people_per_pair: int = 3, noise: float = 0.05, seed: int = 0):
    """Cameras 0-1 and 2-3 each see their own people (one image per camera)."""
    rng = np.random.default_rng(seed)
    features, cameras, people = [], [], []
    for pair in range(2):
        for p in range(people_per_pair):
            centre = rng.standard_normal(16)
            for camera in (2 * pair, 2 * pair + 1):
                features.append(centre + noise * rng.standard_normal(16))
                cameras.append(camera)
                people.append(pair * people_per_pair + p)
    x = np.asarray(features, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), np.asarray(cameras), np.asarray(people)


def test_affinity_of_two_camera_pairs_by_hand():
    x, cameras, _ = _paired_cameras()
    ids, sims, idx = camera_affinity.per_camera_neighbors(x, cameras, 2)
    np.testing.assert_array_equal(ids, [0, 1, 2, 3])
    affinity = camera_affinity.estimate_affinity(cameras, ids, sims, idx)
    # Every image's nearest other-camera image is its person in the partner
    # camera, mutually: M[0, 1] = M[2, 3] = 3, every other count 0. R = M / 9,
    # rows divided by their maximum: 1 for the partner, 0 elsewhere.
    expected = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], float)
    np.testing.assert_allclose(affinity, expected)


def test_affinity_is_symmetric_with_unit_diagonal():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((120, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cameras = rng.integers(0, 4, size=120)
    affinity = camera_affinity.estimate_affinity(
        cameras, *camera_affinity.per_camera_neighbors(x, cameras, 3)
    )
    np.testing.assert_allclose(affinity, affinity.T)
    np.testing.assert_array_equal(np.diag(affinity), 1.0)
    assert ((affinity >= 0) & (affinity <= 1)).all()


def _dense_penalised(x, cameras, strength):
    ids, sims, idx = camera_affinity.per_camera_neighbors(x, cameras, 1)
    affinity = camera_affinity.estimate_affinity(cameras, ids, sims, idx)
    c = np.searchsorted(ids, cameras)
    s = x.astype(np.float64) @ x.T.astype(np.float64)
    return s - strength * (1 - affinity)[c[:, None], c[None, :]]


@pytest.mark.parametrize("seed", [0, 1])
def test_penalised_neighbors_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((90, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cameras = rng.integers(1, 4, size=90) * 2  # ids 2, 4, 6: not 0..C-1
    (sims, order), affinity, camera_index = camera_affinity.penalised_neighbors(
        x, cameras, 7, strength=0.3
    )
    dense = _dense_penalised(x, cameras, 0.3)
    expected = dense_rank(-dense)[:, :7]  # itself first, then decreasing, ties by index
    np.testing.assert_array_equal(order, expected)
    np.testing.assert_allclose(sims, np.take_along_axis(dense, expected, 1), atol=1e-5)
    assert affinity.shape == (3, 3) and np.allclose(np.diag(affinity), 1)
    np.testing.assert_array_equal(camera_index, np.searchsorted([2, 4, 6], cameras))


def test_penalised_jaccard_equals_dense_reference():
    x, cameras, _ = _paired_cameras(people_per_pair=12, noise=0.8, seed=3)
    k1, k2, strength = 9, 3, 0.2
    neighbors_result, affinity, camera_index = camera_affinity.penalised_neighbors(
        x, cameras, k1, strength
    )
    penalty = strength * (1 - affinity)
    result = kreciprocal.jaccard_distance(
        x, k1, k2, neighbors_result=neighbors_result, camera_penalty=(penalty, camera_index)
    )
    distance = 2.0 - 2.0 * _dense_penalised(x, cameras, strength)
    rank = dense_rank(distance)
    v = dense_encoding(distance, rank, k1, round(k1 / 2) + 1, k2)
    expected = np.maximum(dense_jaccard(v, v), 0.0)
    np.testing.assert_allclose(kreciprocal.densify(result), expected, atol=1e-5)
    plain = kreciprocal.densify(kreciprocal.jaccard_distance(x, k1, k2))
    assert np.abs(plain - expected).max() > 0.05, "the penalty must change the distance"


def test_clustering_with_camera_affinity_keeps_people_within_camera_pairs():
    x, cameras, people = _paired_cameras(people_per_pair=10, noise=0.6, seed=4)
    config = dict(k1=6, k2=2, eps=0.6, min_samples=2, knn_backend="faiss")
    off = clustering.cluster_features(x, config, cameras=cameras)
    np.testing.assert_array_equal(
        off, clustering.cluster_features(x, {**config, "camera_affinity": 0.0}, cameras)
    )
    on = clustering.cluster_features(x, {**config, "camera_affinity": 0.5}, cameras=cameras)

    def cross_pair_links(labels):
        pair = cameras // 2
        same = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)
        return int((same & (pair[:, None] != pair[None, :])).sum())

    # Measured on this set: 8 linked pairs across the camera pairs without, none with.
    assert cross_pair_links(off) > 0 and cross_pair_links(on) == 0
    with pytest.raises(ValueError, match="cameras"):
        clustering.cluster_features(x, {**config, "camera_affinity": 0.5})


@pytest.mark.parametrize("k1,k2,lambda_value", [(9, 3, 0.3), (6, 1, 0.0)])
def test_camera_aware_rerank_equals_dense_reference(k1, k2, lambda_value):
    """Re-ranking of the penalised similarity: the dense re-ranking (test_kreciprocal's
    reference) run on 2 - 2 s', each row divided by the maximum of the plain distance."""
    x, cameras, _ = _paired_cameras(people_per_pair=12, noise=0.8, seed=3)
    query_rows = np.arange(0, len(x), 3)
    gallery_rows = np.setdiff1d(np.arange(len(x)), query_rows)
    q, g = x[query_rows], x[gallery_rows]
    both = np.concatenate([cameras[query_rows], cameras[gallery_rows]])
    strength = 0.2
    result = kreciprocal.k_reciprocal_rerank(
        q, g, k1, k2, lambda_value, cameras=both, camera_affinity=strength
    )
    features = np.concatenate([q, g]).astype(np.float64)
    scale = (2.0 - 2.0 * features @ features.T).max(axis=1, keepdims=True)
    distance = (2.0 - 2.0 * _dense_penalised(features, both, strength)) / scale
    v = dense_encoding(distance, dense_rank(distance), k1 + 1, round(k1 / 2) + 1, k2)
    nq = len(q)
    jaccard = dense_jaccard(v[:nq], v)
    expected = ((1 - lambda_value) * jaccard + lambda_value * distance[:nq])[:, nq:]
    np.testing.assert_allclose(result, expected, atol=1e-5)
    plain = kreciprocal.k_reciprocal_rerank(q, g, k1, k2, lambda_value)
    assert np.abs(plain - expected).max() > 0.05, "the penalty must change the distance"
    with pytest.raises(ValueError, match="cameras"):
        kreciprocal.k_reciprocal_rerank(q, g, camera_affinity=strength)


def _camera_rank(distance, cameras, same):
    """Every row's own-camera (`same`) or other-camera list: itself first, then by
    distance, ties by index; -1 pads a row to the longest list."""
    rank = dense_rank(distance)
    keep = (cameras[rank] == cameras[:, None]) == same
    lists = [row[k] for row, k in zip(rank, keep, strict=True)]
    width = max(len(r) for r in lists)
    return np.array([np.pad(r, (0, width - len(r)), constant_values=-1) for r in lists])


def reference_camera_aware_jaccard(distance, cameras, k1_intra, k1_inter, k2_intra, k2_inter):
    """CA-Jaccard from its definition, dense: union of the own-camera and the
    other-camera k-reciprocal sets, softmax weights, query expansion over both lists."""
    n = len(distance)
    intra = _camera_rank(distance, cameras, True)
    inter = _camera_rank(distance, cameras, False)

    def reciprocal(rank, i, size):
        return [j for j in rank[i, :size] if j >= 0 and i in rank[j, :size]]

    v = np.zeros((n, n))
    for i in range(n):
        e = sorted(
            set(reciprocal(intra, i, k1_intra + 1)) | set(reciprocal(inter, i, k1_inter + 1))
        )
        w = np.exp(-distance[i, e])
        v[i, e] = w / w.sum()
    expanded = np.zeros_like(v)
    for i in range(n):
        rows = [j for j in [*intra[i, :k2_intra], *inter[i, :k2_inter]] if j >= 0]
        expanded[i] = v[rows].mean(axis=0)
    return np.maximum(dense_jaccard(expanded, expanded), 0.0)


@pytest.mark.parametrize(
    "sizes,strength", [((2, 4, 1, 5), 0.2), ((4, 4, 5, 2), 0.0), ((3, 3, 4, 2), 0.3)]
)
def test_camera_aware_jaccard_equals_dense_reference(sizes, strength):
    k1_intra, k1_inter, k2_intra, k2_inter = sizes[:4]
    x, cameras, _ = _paired_cameras(people_per_pair=12, noise=0.3, seed=5)
    cameras = cameras.copy()
    cameras[:2] = 7  # a camera of 2 images: shorter own-camera lists than k1_intra + 1
    intra, inter, affinity, camera_index = camera_affinity.intra_inter_neighbors(
        x, cameras, max(k1_intra + 1, k2_intra), max(k1_inter + 1, k2_inter), strength
    )
    assert (intra[1][:2] == -1).any(axis=1).all(), "the small camera must pad its lists"
    penalty = strength * (1 - affinity)
    result = kreciprocal.camera_aware_jaccard_distance(
        x,
        intra,
        inter,
        k1_intra=k1_intra,
        k1_inter=k1_inter,
        k2_intra=k2_intra,
        k2_inter=k2_inter,
        camera_penalty=(penalty, camera_index),
    )
    s = x.astype(np.float64) @ x.T.astype(np.float64)
    distance = 2.0 - 2.0 * (s - penalty[camera_index[:, None], camera_index[None, :]])
    expected = reference_camera_aware_jaccard(
        distance, cameras, k1_intra, k1_inter, k2_intra, k2_inter
    )
    np.testing.assert_allclose(kreciprocal.densify(result), expected, atol=1e-6)
    assert (result != result.T).nnz == 0
    assert (expected < 1).sum() > 2 * len(x) and (expected >= 1).any()


def test_camera_aware_jaccard_links_views_the_plain_distance_keeps_apart():
    """Two cameras whose every image carries the camera's own offset: each plain
    k-reciprocal set holds only same-camera images, so no pair across the cameras
    shares support (distance 1); the camera-aware sets always hold the other
    camera's nearest reciprocal images, and each person's two views come closest."""
    rng = np.random.default_rng(0)
    # Eight orthogonal people in dimensions 0-7, the cameras' offsets in 8-11 and
    # 12-15: cos 0.9 within a camera, 0.1 for one person across the cameras, 0 else.
    people = np.pad(2.0 * np.eye(8), ((0, 0), (0, 8)))
    offsets = np.zeros((2, 16))
    offsets[0, 8:12] = offsets[1, 12:16] = 3.0
    x = np.concatenate([people + offsets[c] + 0.01 * rng.standard_normal((8, 16)) for c in (0, 1)])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    cameras = np.repeat([0, 1], 8)
    plain = kreciprocal.densify(kreciprocal.jaccard_distance(x, k1=4, k2=1))
    np.testing.assert_array_equal(plain[:8, 8:], 1.0)
    intra, inter, _, camera_index = camera_affinity.intra_inter_neighbors(x, cameras, 4, 2, 0.0)
    aware = kreciprocal.densify(
        kreciprocal.camera_aware_jaccard_distance(
            x, intra, inter, k1_intra=3, k1_inter=1, k2_intra=1, k2_inter=1
        )
    )
    cross = aware[:8, 8:]
    assert (cross < 1).sum() >= 8
    np.testing.assert_array_equal(cross.argmin(axis=1), np.arange(8))


def test_cluster_features_with_camera_aware_jaccard():
    x, cameras, people = _paired_cameras(people_per_pair=10, noise=0.3, seed=6)
    config = dict(eps=0.6, min_samples=2, camera_aware_jaccard=True, k1_intra=1, k1_inter=1)
    labels = clustering.cluster_features(x, {**config, "k2_intra": 1, "k2_inter": 1}, cameras)
    # Each person's two views (one per camera) form one cluster: the camera-aware
    # sets are the image and its reciprocal nearest view in the other camera.
    assert (labels >= 0).all()
    np.testing.assert_array_equal(
        labels[:, None] == labels[None, :], people[:, None] == people[None, :]
    )
    with pytest.raises(ValueError, match="cameras"):
        clustering.cluster_features(x, config)

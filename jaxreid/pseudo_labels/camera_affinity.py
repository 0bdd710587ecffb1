"""Camera affinity for clustering: which cameras see the same people, learned
from the features (no identities), and the kNN lists of the penalised
similarity s'_ij = s_ij - strength * (1 - A[c_i, c_j]).

Why: in many camera networks a person is seen by a few cameras, not all
(CUHK03: every identity by one pair of its ten cameras). The clustering then
links images across cameras that never share a person; on the source OSNet's
CUHK03 training features 35% of the ten nearest other-camera images sit in
the one camera that can hold the match. Pairs of cameras that do share people
have more mutual nearest neighbours across them than their sizes predict;
that ratio is the affinity. Used by `clustering.cluster_features` through
`cluster.camera_affinity` (the strength; 0 turns it off).

Affinity: for every image its nearest image in any other camera; M[a, b] the
number of mutual such pairs between cameras a and b; R = M / (n_a n_b), each
row divided by its maximum, A = sqrt(R * R^T), A[a, a] = 1. A camera network
where all cameras share people gives A near 1 everywhere (no effect).
"""

from __future__ import annotations

import numpy as np

from jaxreid.pseudo_labels import neighbors


def per_camera_neighbors(
    features: np.ndarray, cameras: np.ndarray, k: int, backend: str = "faiss"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every image its k nearest images in each camera.

    Returns (camera ids (C,), similarities (N, C, k) float32, indices (N, C, k)
    int64); cameras with fewer than k images pad with similarity -inf, index -1.
    """
    ids = np.unique(cameras)
    n = len(features)
    sims = np.full((n, len(ids), k), -np.inf, np.float32)
    idx = np.full((n, len(ids), k), -1, np.int64)
    for b, camera in enumerate(ids):
        rows = np.flatnonzero(cameras == camera)
        kb = min(k, len(rows))
        s, j = neighbors.knn_query(features, features[rows], kb, backend)
        sims[:, b, :kb], idx[:, b, :kb] = s, rows[j]
    return ids, sims, idx


def estimate_affinity(
    cameras: np.ndarray, ids: np.ndarray, sims: np.ndarray, idx: np.ndarray
) -> np.ndarray:
    """(C, C) affinity of the cameras `ids` (module doc) from `per_camera_neighbors`."""
    camera_index = np.searchsorted(ids, cameras)
    n, num = len(cameras), len(ids)
    best = sims[:, :, 0].copy()
    best[np.arange(n), camera_index] = -np.inf  # other cameras only
    nearest_camera = np.argmax(best, axis=1)
    nearest = idx[np.arange(n), nearest_camera, 0]
    found = np.isfinite(best[np.arange(n), nearest_camera]) & (nearest >= 0)
    rows = np.flatnonzero(found)
    mutual = rows[nearest[nearest[rows]] == rows] if len(rows) else rows
    counts = np.zeros((num, num))
    np.add.at(counts, (camera_index[mutual], camera_index[nearest[mutual]]), 1.0)
    sizes = np.bincount(camera_index, minlength=num).astype(np.float64)
    ratio = counts / np.outer(sizes, sizes)
    ratio = ratio / np.maximum(ratio.max(axis=1, keepdims=True), 1e-300)
    affinity = np.sqrt(ratio * ratio.T)
    np.fill_diagonal(affinity, 1.0)
    return affinity


def penalised_neighbors(
    features: np.ndarray,
    cameras: np.ndarray,
    k: int,
    strength: float,
    backend: str = "faiss",
) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray, np.ndarray]:
    """The k nearest neighbours of every image under the penalised similarity.

    Returns ((similarities (N, k) float32, indices (N, k) int64), the (C, C)
    affinity A of the cameras np.unique(cameras), the index of every image's
    camera into it). Row i starts with (|x_i|^2, i), then decreasing
    similarity, ties by index: the convention of `neighbors.knn`.
    """
    features = np.asarray(features, np.float32)
    k = min(k, len(features))
    ids, sims, idx = per_camera_neighbors(features, cameras, k, backend)
    affinity = estimate_affinity(cameras, ids, sims, idx)
    penalty = strength * (1.0 - affinity)
    camera_index = np.searchsorted(ids, cameras)
    n = len(features)
    shifted = sims - penalty[camera_index][:, :, None].astype(np.float32)
    shifted, idx = shifted.reshape(n, -1), idx.reshape(n, -1)
    self_rows = idx == np.arange(n)[:, None]
    key = np.where(self_rows, np.inf, shifted)
    order = np.lexsort((np.where(idx < 0, n, idx), -key), axis=1)[:, :k]
    return (
        (
            np.ascontiguousarray(np.take_along_axis(shifted, order, axis=1)),
            np.ascontiguousarray(np.take_along_axis(idx, order, axis=1)),
        ),
        affinity,
        camera_index,
    )

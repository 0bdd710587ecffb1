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


def _nearest_first(sims: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first k of each row's candidates (N, M): the image itself first, then
    decreasing similarity, ties by index, padding (index -1) last."""
    n = len(sims)
    self_rows = idx == np.arange(n)[:, None]
    key = np.where(self_rows, np.inf, sims)
    order = np.lexsort((np.where(idx < 0, n, idx), -key), axis=1)[:, :k]
    return (
        np.ascontiguousarray(np.take_along_axis(sims, order, axis=1)),
        np.ascontiguousarray(np.take_along_axis(idx, order, axis=1)),
    )


def _penalised_lists(features, cameras, k, strength, backend):
    """per_camera_neighbors, its affinity, the camera index of every image and the
    candidates' similarities minus the penalty of their camera pair."""
    ids, sims, idx = per_camera_neighbors(features, cameras, k, backend)
    affinity = estimate_affinity(cameras, ids, sims, idx)
    penalty = strength * (1.0 - affinity)
    camera_index = np.searchsorted(ids, cameras)
    shifted = sims - penalty[camera_index][:, :, None].astype(np.float32)
    return shifted, idx, affinity, camera_index


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
    shifted, idx, affinity, camera_index = _penalised_lists(features, cameras, k, strength, backend)
    n = len(features)
    lists = _nearest_first(shifted.reshape(n, -1), idx.reshape(n, -1), k)
    return lists, affinity, camera_index


def intra_inter_neighbors(
    features: np.ndarray,
    cameras: np.ndarray,
    k_intra: int,
    k_inter: int,
    strength: float,
    backend: str = "faiss",
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], np.ndarray, np.ndarray]:
    """Every image's k_intra nearest images of its own camera (itself first) and
    its k_inter nearest of the other cameras under the penalised similarity (the
    two ranking lists of the camera-aware Jaccard distance,
    `kreciprocal.camera_aware_jaccard_distance`).

    Returns (intra (similarities, indices), inter (similarities, indices), the
    affinity A, the camera index of every image), lists (N, k_intra) and
    (N, k_inter); where a list runs out of images its entries are index -1,
    similarity -inf.
    """
    features = np.asarray(features, np.float32)
    shifted, idx, affinity, camera_index = _penalised_lists(
        features, cameras, max(k_intra, k_inter), strength, backend
    )
    n = len(features)
    rows = np.arange(n)
    intra = _nearest_first(shifted[rows, camera_index], idx[rows, camera_index], k_intra)
    shifted[rows, camera_index] = -np.inf
    idx[rows, camera_index] = -1
    inter = _nearest_first(shifted.reshape(n, -1), idx.reshape(n, -1), k_inter)
    return intra, inter, affinity, camera_index

"""Pseudo-labels for the clustering family: kNN -> sparse k-reciprocal Jaccard -> DBSCAN.

`dbscan` reproduces scikit-learn's `DBSCAN(metric="precomputed")` on a symmetric distance:
a point is its own neighbour and counts in `min_samples`; neighbours are pairs with distance
<= eps (negative distances clipped to 0); clusters are the connected components of the core
points; a border point (not core, within eps of a core point) joins the cluster with the lowest
label among the cores that reach it, which is the first cluster scikit-learn's scan in index
order reaches it with; clusters are numbered 0..C-1 in the order of their lowest core index
(scikit-learn's order); outliers are -1. It works on the sparse Jaccard matrix of
`jaxreid.pseudo_labels.kreciprocal.jaccard_distance`, where pairs not stored have distance 1.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.sparse import csgraph

from jaxreid.pseudo_labels import camera_affinity, kreciprocal, neighbors
from jaxreid.utils import l2_normalize

logger = logging.getLogger(__name__)


def default_cluster_config():
    """Defaults of the public cluster-contrast recipe (ml_collections.ConfigDict).

    Fields: k1, k2 (k-reciprocal sizes), eps, min_samples (DBSCAN), knn_backend ("faiss" |
    "jax"), knn_block_size (0 = from the memory budget), giant_cluster_fraction (warn when one
    cluster holds more than this fraction of the points; the training loop stops there,
    jaxreid.methods.cluster.degenerate_clustering), camera_centering (cluster features
    minus their camera's mean; see `camera_centered`), camera_bn (the training loop extracts
    each camera's images with that camera's batch-norm statistics; jaxreid.evaluate.camera_bn),
    camera_affinity (strength of the penalty on pairs of cameras that share few people,
    learned from the features; 0 = off; jaxreid.pseudo_labels.camera_affinity), final_eps
    (0 = eps at every epoch; else eps moves linearly to final_eps at the last epoch:
    `epoch_eps`), camera_aware_jaccard (the Jaccard distance of
    `kreciprocal.camera_aware_jaccard_distance` instead of the plain one, with its sizes
    k1_intra, k1_inter, k2_intra, k2_inter in place of k1, k2; the defaults are the
    public code's), min_cameras (clusters whose images come from fewer cameras become
    outliers: `camera_filter`; 1 = off), knn ("auto" | "exact" | "ivf" | "hnsw": the kNN
    index of the Jaccard distance, `jaxreid.pseudo_labels.neighbors`; "auto" is exact up to
    `neighbors.AUTO_EXACT_MAX` images, so every benchmark set clusters exactly), knn_nlist,
    knn_nprobe, knn_hnsw_m, knn_ef_search (the approximate indexes' parameters; 0 = derived
    from N, `neighbors.index_params`). The camera-affinity and camera-aware neighbour lists
    are per-camera searches and stay exact. algorithm ("dbscan" | "bottom_up": BUC's
    merging, `jaxreid.pseudo_labels.bottom_up`, in place of the Jaccard distance and DBSCAN,
    on the camera-centred features with camera_centering; eps, the k-reciprocal and the
    camera-affinity settings then do not apply) with merge_percent (each round
    merges this fraction of N cluster pairs), merge_rounds (rounds at each re-clustering),
    merge_first_rounds (rounds at the first; 0 = merge_rounds), merge_lambda (the diversity
    regulariser's weight on the two clusters' sizes) and merge_k (nearest neighbours per
    image giving the candidate pairs); BUC's defaults 0.05, 1 and 0.005.
    """
    import ml_collections

    return ml_collections.ConfigDict(
        dict(
            k1=30,
            k2=6,
            eps=0.6,
            min_samples=4,
            knn_backend="faiss",
            knn_block_size=0,
            giant_cluster_fraction=0.5,
            camera_centering=False,
            camera_bn=False,
            camera_affinity=0.0,
            final_eps=0.0,
            camera_aware_jaccard=False,
            k1_intra=5,
            k1_inter=20,
            k2_intra=2,
            k2_inter=4,
            min_cameras=1,
            knn="auto",
            knn_nlist=0,
            knn_nprobe=0,
            knn_hnsw_m=0,
            knn_ef_search=0,
            algorithm="dbscan",
            merge_percent=0.05,
            merge_rounds=1,
            merge_first_rounds=0,
            merge_lambda=0.005,
            merge_k=20,
        )
    )


def knn_settings(config: Any) -> tuple[str, neighbors.IndexParams]:
    """(index, parameters) of the cluster.knn* settings, for `neighbors.knn`."""
    params = _params(config)
    return params["knn"], neighbors.IndexParams(
        nlist=int(params["knn_nlist"]),
        nprobe=int(params["knn_nprobe"]),
        hnsw_m=int(params["knn_hnsw_m"]),
        ef_search=int(params["knn_ef_search"]),
    )


def epoch_eps(eps: float, final_eps: float, epoch: int, epochs: int) -> float:
    """DBSCAN's eps at `epoch` (0-based) of `epochs`: eps at the first, moving
    linearly to final_eps at the last (final_eps 0: eps throughout).

    Why: training compacts the features, so a fixed eps merges more people
    each epoch (HHCL on CUHK03 at eps 0.5: pairwise precision 51% before
    epoch 1, 41% before epoch 7; the epoch-7 features cluster at 63% precision
    / 56% recall at 0.35 against 42% / 65% at 0.5). Tightening from the first
    re-clustering (the eps of the most clusters, 0.3 from epoch 2) lost the
    cross-camera recall (27% -> 13%) and 1.8 mAP by epoch 3. 0.5 -> 0.35 over 8
    epochs: purer labels (cross-camera precision 54% vs 35%), 23.9 mAP against
    the fixed eps's 24.5 (README, CUHK03); off by default.
    """
    if not final_eps or epochs <= 1:
        return float(eps)
    return float(eps + (final_eps - eps) * min(epoch, epochs - 1) / (epochs - 1))


def camera_centered(features: np.ndarray, cameras: np.ndarray) -> np.ndarray:
    """Unit features minus the mean of their camera, re-normalised.

    Why: what all images of one camera share (background, light) pulls them into
    camera-bound clusters; removing each camera's mean lets more clusters span
    cameras (source OSNet on CUHK03, DBSCAN eps 0.5: cross-camera pair recall
    8.1% -> 11.4% at the same precision; benchmarks/pseudo_label_quality.py).
    """
    f = l2_normalize(np.asarray(features, np.float32))
    cameras = np.asarray(cameras)
    out = np.empty_like(f)
    for camera in np.unique(cameras):
        rows = cameras == camera
        out[rows] = f[rows] - f[rows].mean(0)
    return l2_normalize(out)


def dbscan(sparse_distance: sp.spmatrix | np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    """DBSCAN labels (int64, -1 = outlier) from a precomputed distance (see module doc).

    `sparse_distance`: (N, N) scipy sparse matrix whose missing entries mean distance 1 (the
    Jaccard convention), or a dense array. Expected symmetric; an asymmetric input is read by
    rows for the neighbour counts and core points are linked when either direction is <= eps.
    """
    if min_samples < 1:
        raise ValueError(f"min_samples must be >= 1, got {min_samples}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    n = sparse_distance.shape[0]
    if sparse_distance.shape != (n, n):
        raise ValueError(f"need a square distance matrix, got {sparse_distance.shape}")
    if n == 0:
        return np.zeros(0, np.int64)
    if eps >= 1.0 and sp.issparse(sparse_distance):
        # Every missing pair (distance 1) is a neighbour: all points are neighbours of all.
        return np.zeros(n, np.int64) if n >= min_samples else np.full(n, -1, np.int64)
    if sp.issparse(sparse_distance):
        coo = sp.coo_matrix(sparse_distance)
        close = np.maximum(coo.data, 0.0) <= eps
        rows, cols = coo.row[close], coo.col[close]
    else:
        rows, cols = np.nonzero(np.maximum(np.asarray(sparse_distance), 0.0) <= eps)
    diagonal = np.arange(n)
    # Boolean neighbourhood graph, each point its own neighbour; duplicates merge in tocsr.
    graph = sp.coo_matrix(
        (
            np.ones(len(rows) + n, np.int8),
            (np.concatenate([rows, diagonal]), np.concatenate([cols, diagonal])),
        ),
        shape=(n, n),
    ).tocsr()
    graph.data[:] = 1
    is_core = np.diff(graph.indptr) >= min_samples
    labels = np.full(n, -1, np.int64)
    core = np.flatnonzero(is_core)
    if len(core) == 0:
        return labels
    num_components, component = csgraph.connected_components(
        graph[core][:, core], directed=True, connection="weak"
    )
    # Number clusters by their lowest core index, as scikit-learn's scan does.
    first = np.full(num_components, n)
    np.minimum.at(first, component, core)
    rank = np.empty(num_components, np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(num_components)
    labels[core] = rank[component]
    # Border points: the lowest cluster label among the core points that have them within eps.
    g = graph.tocoo()
    reach = is_core[g.row] & ~is_core[g.col]
    border_label = np.full(n, num_components, np.int64)
    np.minimum.at(border_label, g.col[reach], labels[g.row[reach]])
    is_border = border_label < num_components
    labels[is_border] = border_label[is_border]
    return labels


def pseudo_label_stats(labels: np.ndarray) -> dict[str, Any]:
    """Cluster counts and sizes of a labelling (-1 = outlier), as plain Python numbers."""
    labels = np.asarray(labels)
    sizes = np.bincount(labels[labels >= 0]) if (labels >= 0).any() else np.zeros(0, np.int64)
    sizes = sizes[sizes > 0]
    num_outliers = int((labels < 0).sum())
    return {
        "num_samples": int(labels.size),
        "num_clusters": int(len(sizes)),
        "num_clustered": int(labels.size - num_outliers),
        "num_outliers": num_outliers,
        "outlier_fraction": float(num_outliers / labels.size) if labels.size else 0.0,
        "largest_cluster": int(sizes.max()) if len(sizes) else 0,
        "smallest_cluster": int(sizes.min()) if len(sizes) else 0,
        "mean_cluster_size": float(sizes.mean()) if len(sizes) else 0.0,
        "median_cluster_size": float(np.median(sizes)) if len(sizes) else 0.0,
    }


def _log_affinity(affinity: np.ndarray) -> None:
    logger.info("cluster_features: camera affinity\n%s", np.array2string(affinity, precision=2))


def _plain_distance(features, cameras, params, eps) -> sp.csr_matrix:
    """`kreciprocal.jaccard_distance` of the features (its kNN lists ranked by the
    penalised similarity of `camera_affinity` when cluster.camera_affinity > 0)."""
    neighbors_result = camera_penalty = None
    if float(params["camera_affinity"]) > 0:
        if cameras is None:
            raise ValueError("cluster.camera_affinity needs the images' cameras")
        strength = float(params["camera_affinity"])
        neighbors_result, affinity, camera_index = camera_affinity.penalised_neighbors(
            kreciprocal.unit_rows(features),
            np.asarray(cameras),
            int(params["k1"]),
            strength,
            params["knn_backend"],
        )
        camera_penalty = (strength * (1.0 - affinity), camera_index)
        _log_affinity(affinity)
    knn_index, knn_params = knn_settings(params)
    return kreciprocal.jaccard_distance(
        features,
        k1=int(params["k1"]),
        k2=int(params["k2"]),
        backend=params["knn_backend"],
        max_distance=eps if eps < 1.0 else None,
        knn_block_size=int(params["knn_block_size"]) or None,
        neighbors_result=neighbors_result,
        camera_penalty=camera_penalty,
        knn_index=knn_index,
        knn_params=knn_params,
    )


def _camera_aware_distance(features, cameras, params, eps) -> sp.csr_matrix:
    """`kreciprocal.camera_aware_jaccard_distance` of the features, its own-camera and
    other-camera lists ranked by the penalised similarity of `camera_affinity`."""
    if cameras is None:
        raise ValueError("cluster.camera_aware_jaccard needs the images' cameras")
    strength = float(params["camera_affinity"])
    k1_intra, k1_inter = int(params["k1_intra"]), int(params["k1_inter"])
    k2_intra, k2_inter = int(params["k2_intra"]), int(params["k2_inter"])
    intra, inter, affinity, camera_index = camera_affinity.intra_inter_neighbors(
        kreciprocal.unit_rows(features),
        np.asarray(cameras),
        max(k1_intra + 1, k2_intra),
        max(k1_inter + 1, k2_inter),
        strength,
        params["knn_backend"],
    )
    if strength > 0:
        _log_affinity(affinity)
    return kreciprocal.camera_aware_jaccard_distance(
        features,
        intra,
        inter,
        k1_intra=k1_intra,
        k1_inter=k1_inter,
        k2_intra=k2_intra,
        k2_inter=k2_inter,
        max_distance=eps if eps < 1.0 else None,
        camera_penalty=(strength * (1.0 - affinity), camera_index),
    )


def _params(config: Any) -> dict[str, Any]:
    """The fields of `default_cluster_config()` from a ConfigDict, mapping or
    object (missing fields take the defaults)."""
    params = dict(default_cluster_config())
    if config is not None:
        if isinstance(config, Mapping) or hasattr(config, "get"):  # dict, ConfigDict
            params.update({k: config.get(k, v) for k, v in params.items()})
        else:  # any object with attributes
            params.update({k: getattr(config, k, v) for k, v in params.items()})
    return params


def clustering_distance(
    features: np.ndarray, config: Any = None, cameras: np.ndarray | None = None, max_eps=None
) -> sp.csr_matrix:
    """The sparse Jaccard distance `cluster_features` clusters (camera centring,
    affinity and the camera-aware variant as `config` says), storing the pairs
    up to `max_eps` (default: config's eps), so that DBSCAN can run at any eps
    up to it without computing it again."""
    params = _params(config)
    features = np.asarray(features, dtype=np.float32)
    if params["camera_centering"]:
        if cameras is None:
            raise ValueError("cluster.camera_centering needs the images' cameras")
        features = camera_centered(features, cameras)
    eps = float(params["eps"] if max_eps is None else max_eps)
    if params["camera_aware_jaccard"]:
        return _camera_aware_distance(features, cameras, params, eps)
    return _plain_distance(features, cameras, params, eps)


def cluster_features(
    features: np.ndarray, config: Any = None, cameras: np.ndarray | None = None
) -> np.ndarray:
    """Pseudo-labels of (N, D) features: kNN -> Jaccard (k1, k2) -> DBSCAN (eps, min_samples).

    `config`: a ConfigDict or mapping with the fields of `default_cluster_config()` (missing
    fields take the defaults). Returns int64 labels, clusters 0..C-1 in order of their lowest
    core index, -1 = outlier. Degenerate results (all outliers, one giant cluster, N < k1) are
    logged as warnings and returned as they are. `min_cameras` is not applied here (see
    `camera_filter`).
    """
    eps = float(_params(config)["eps"])
    return multi_eps_labels(features, [eps], config, cameras)[0]


def multi_eps_labels(
    features: np.ndarray,
    eps_values: list[float],
    config: Any = None,
    cameras: np.ndarray | None = None,
) -> np.ndarray:
    """(G, N) int64 DBSCAN labels at each of `eps_values` (one granularity per
    row) on ONE Jaccard distance, computed once up to the largest eps; the
    other fields of `config` as in `cluster_features`."""
    params = _params(config)
    n = len(features)
    if n == 0:
        logger.warning("cluster_features: no features; returning no labels")
        return np.zeros((len(eps_values), 0), np.int64)
    start = time.perf_counter()
    distance = clustering_distance(features, params, cameras, max_eps=max(eps_values))
    jaccard_seconds = time.perf_counter() - start
    labelings = []
    for eps in eps_values:
        tick = time.perf_counter()
        labels = dbscan(distance, float(eps), int(params["min_samples"]))
        _log_labels(labels, float(eps), params, jaccard_seconds, time.perf_counter() - tick)
        labelings.append(labels)
    return np.stack(labelings)


def _log_labels(labels, eps, params, jaccard_seconds, dbscan_seconds) -> None:
    n = len(labels)
    stats = pseudo_label_stats(labels)
    logger.info(
        "cluster_features: N=%d, eps=%g -> %d clusters, %d outliers (%.1f%%), largest %d; "
        "jaccard %.2fs, dbscan %.2fs",
        n,
        eps,
        stats["num_clusters"],
        stats["num_outliers"],
        100 * stats["outlier_fraction"],
        stats["largest_cluster"],
        jaccard_seconds,
        dbscan_seconds,
    )
    if stats["num_clusters"] == 0:
        logger.warning(
            "cluster_features: every one of the %d points is an outlier (eps=%g, min_samples=%d)",
            n,
            eps,
            params["min_samples"],
        )
    elif stats["largest_cluster"] > params["giant_cluster_fraction"] * n:
        logger.warning(
            "cluster_features: one cluster holds %d of %d points (eps=%g)",
            stats["largest_cluster"],
            n,
            eps,
        )


def camera_filter(
    labels: np.ndarray, cameras: np.ndarray, min_cameras: int
) -> tuple[np.ndarray, dict[str, int]]:
    """Clusters whose images come from fewer than `min_cameras` distinct
    cameras become outliers; the others are renumbered 0..C'-1 in their order.

    Why: a cluster seen by one camera is mostly that camera's view of one
    scene (background, light), not a person across cameras, and training on
    it teaches camera features (JCL). Returns the new labels and
    {"removed_clusters", "removed_images"}.
    """
    labels = np.asarray(labels, np.int64)
    cameras = np.asarray(cameras, np.int64)
    num_clusters = int(labels.max(initial=-1)) + 1
    clustered = labels >= 0
    if min_cameras <= 1 or num_clusters == 0:
        return labels.copy(), {"removed_clusters": 0, "removed_images": 0}
    pairs = np.unique(labels[clustered] * (int(cameras.max()) + 1) + cameras[clustered])
    seen_by = np.bincount(pairs // (int(cameras.max()) + 1), minlength=num_clusters)
    present = np.bincount(labels[clustered], minlength=num_clusters) > 0
    keep = seen_by >= min_cameras
    new_id = np.where(keep, np.cumsum(keep) - 1, -1)
    out = np.where(clustered, new_id[np.maximum(labels, 0)], -1)
    return out, {
        "removed_clusters": int(np.sum(present & ~keep)),
        "removed_images": int(np.sum(clustered & (out < 0))),
    }


def labels_from_process_zero(
    features: np.ndarray,
    eps_values: list[float],
    config: Any = None,
    cameras: np.ndarray | None = None,
) -> np.ndarray:
    """`multi_eps_labels` computed on process 0 only and broadcast to every process.

    Why: in a multi-process run every host would otherwise cluster the same N features
    (at 10^6 images minutes of CPU each); process 0 clusters once and the (G, N) labels
    (4 bytes a label, 4 MB at 10^6) cross the network. The other processes only need N.
    A single process returns `multi_eps_labels` itself.
    """
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return multi_eps_labels(features, eps_values, config, cameras)
    if jax.process_index() == 0:
        labels = multi_eps_labels(features, eps_values, config, cameras)
    else:
        labels = np.zeros((len(eps_values), len(features)), np.int64)
    if labels.size and labels.max(initial=-1) >= 2**31 - 1:
        raise ValueError("labels_from_process_zero: more than 2^31 - 1 clusters")
    shared = multihost_utils.broadcast_one_to_all(labels.astype(np.int32))
    return np.asarray(shared).astype(np.int64)

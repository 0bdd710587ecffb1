"""Sparse k-reciprocal encoding: the Jaccard distance used for clustering, and re-ranking.

Both follow Zhong et al., "Re-ranking Person Re-identification with k-reciprocal Encoding"
(CVPR 2017) with the conventions of the two public implementations that results are compared to
(the cluster-contrast `compute_jaccard_distance` and the original `re_ranking`), but keep the
encoding V sparse: memory is O(N k) besides the output, never N x N.

Definitions (features L2-normalised, s = inner product, d = 2 - 2 s = squared Euclidean):

- `order[i]`: the neighbour list of i from `jaxreid.pseudo_labels.neighbors.knn` (i first,
  ties by index).
- R(i, k) = {j in order[i][:k] : i in order[j][:k]}, the k-reciprocal set (contains i).
- Expansion: E(i) = R(i, kf) U R(c, kh) over every c in R(i, kf) with
  |R(c, kh) & R(i, kf)| > 2/3 |R(c, kh)|, where kh = round(k1 / 2) + 1 (round half to even, as
  numpy's `around`).
- Weights: V_ij = exp(-dist(i, j)) / sum_{l in E(i)} exp(-dist(i, l)) for j in E(i), else 0.
- Local query expansion: V_i <- mean of V_j over j in order[i][:k2] (i included).
- Jaccard distance d_J(i, j) = 1 - sum_l min(V_il, V_jl) / sum_l max(V_il, V_jl); rows of V sum
  to 1, so with m = sum_l min(V_il, V_jl) this is 1 - m / (2 - m). Only pairs sharing a support
  column have d_J < 1.

Clustering (`jaccard_distance`, cluster-contrast conventions): kf = k1 (the k1-NN list includes
the point itself, as a FAISS search for k1 neighbours does), dist = 2 - 2 s, the result clipped
at 0. Re-ranking (`k_reciprocal_rerank`, original conventions): over all Q + G points, kf = k1 + 1
(the point and k1 others), dist = d / max_l d(i, l) (each row divided by its own maximum over all
Q + G points: the original divides by column maxima, then transposes), no clipping, and
final = (1 - lambda) d_J + lambda dist for query rows and gallery columns.

Deviations from the public code, all below 1e-5 on the result: V and the Jaccard sums are float64
(the public code uses float32 or float16), similarities come from the kNN search (FAISS or XLA
float32) and the tie order is the one documented in `jaxreid.pseudo_labels.neighbors`
(`np.argsort` order in the public code).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import scipy.sparse as sp

from jaxreid.pseudo_labels import neighbors
from jaxreid.utils import l2_normalize

logger = logging.getLogger(__name__)

# Bounds the per-chunk working set of the vectorised loops (elements of an int64/float64 array).
_CHUNK_ELEMENTS = 1_000_000


def unit_rows(features: np.ndarray) -> np.ndarray:
    """Rows at unit norm (float32). Features that already are unit-norm (within
    1e-5, norms in float64) come back as they are, without a copy or a change
    in the last bit; so do float16 ones (a memory map of 10^6 rows, say) within
    float16's 2e-3, the pairs' similarities then computed from them in float64."""
    if isinstance(features, np.ndarray) and features.dtype == np.float16:
        tolerance, step = 2e-3, max(1, _CHUNK_ELEMENTS // max(features.shape[-1], 1))
        if features.ndim == 2 and all(
            np.all(
                np.abs(np.linalg.norm(features[s : s + step].astype(np.float64), axis=1) - 1)
                <= tolerance
            )
            for s in range(0, len(features), step)
        ):
            return features
    features = np.asarray(features, dtype=np.float32)
    norms = np.sqrt(np.einsum("nd,nd->n", features, features, dtype=np.float64))
    if np.all(np.abs(norms - 1.0) <= 1e-5):
        return features
    return l2_normalize(features)


def half_k(k1: int) -> int:
    """round(k1 / 2) with numpy's round-half-to-even, as the public code does."""
    return int(np.around(k1 / 2))


# ---------------------------------------------------------------------------------------------
# Building blocks (all take the (N, K) neighbour lists from `jaxreid.pseudo_labels.neighbors.knn`)


def reciprocal_sets(order: np.ndarray, k: int) -> sp.csr_matrix:
    """R(i, k) as a boolean CSR matrix (row i = the set of i, column indices sorted).
    Negative entries of `order` (padding of a short list) are no neighbours."""
    n = len(order)
    k = min(k, order.shape[1])
    forward = np.sort(order[:, :k], axis=1)
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    cols = forward.ravel()
    listed = cols >= 0
    rows, cols = rows[listed], cols[listed]
    keys = rows * n + cols  # sorted: rows ascending, columns sorted within a row
    is_reciprocal = _contains(keys, cols * n + rows)
    return _csr_from_sorted(
        rows[is_reciprocal], cols[is_reciprocal], np.ones(int(is_reciprocal.sum()), bool), n
    )


def expanded_sets(reciprocal: sp.csr_matrix, reciprocal_half: sp.csr_matrix) -> sp.csr_matrix:
    """E(i): R(i) plus the half-size sets R(c) of its members c that overlap it by > 2/3."""
    n = reciprocal.shape[0]
    r_rows = _row_ids(reciprocal)
    r_keys = r_rows * n + reciprocal.indices  # sorted
    half_sizes = np.diff(reciprocal_half.indptr)
    out_rows, out_cols = [], []
    for start, stop in _row_chunks(reciprocal.indptr, half_sizes[reciprocal.indices]):
        lo, hi = reciprocal.indptr[start], reciprocal.indptr[stop]
        rows, cands = r_rows[lo:hi], reciprocal.indices[lo:hi].astype(np.int64)
        sizes = half_sizes[cands]
        entry, pos = _ragged(reciprocal_half.indptr[cands], sizes)
        members = reciprocal_half.indices[pos].astype(np.int64)
        member_rows = rows[entry]
        inside = _contains(r_keys, member_rows * n + members)
        overlap = np.bincount(entry, weights=inside, minlength=len(cands))
        qualifies = overlap > 2.0 / 3.0 * sizes
        take = qualifies[entry]
        keys = np.unique(np.concatenate([rows * n + cands, member_rows[take] * n + members[take]]))
        out_rows.append(keys // n)
        out_cols.append(keys % n)
    rows = np.concatenate(out_rows) if out_rows else np.zeros(0, np.int64)
    cols = np.concatenate(out_cols) if out_cols else np.zeros(0, np.int64)
    return _csr_from_sorted(rows, cols, np.ones(len(rows), bool), n)


def pair_similarities(
    features: np.ndarray,
    sims: np.ndarray,
    order: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    camera_penalty: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """s(rows[t], cols[t]) (float64): looked up in the kNN lists, computed for the rest
    (minus penalty[camera[i], camera[j]] where `camera_penalty` = (penalty, camera)
    says the kNN lists hold a penalised similarity). Negative list entries are padding."""
    n = len(order)
    perm = np.argsort(order, axis=1, kind="stable")
    sorted_order = np.take_along_axis(order, perm, axis=1)
    listed = (sorted_order >= 0).ravel()
    knn_keys = (np.arange(n, dtype=np.int64)[:, None] * n + sorted_order).ravel()[listed]
    knn_sims = np.take_along_axis(sims, perm, axis=1).ravel()[listed].astype(np.float64)
    keys = rows.astype(np.int64) * n + cols
    pos = np.minimum(np.searchsorted(knn_keys, keys), len(knn_keys) - 1)
    found = knn_keys[pos] == keys
    out = np.where(found, knn_sims[pos], 0.0)
    missing = np.flatnonzero(~found)
    step = max(1, _CHUNK_ELEMENTS // max(features.shape[1], 1))
    for s in range(0, len(missing), step):
        t = missing[s : s + step]
        out[t] = np.einsum("td,td->t", features[rows[t]], features[cols[t]], dtype=np.float64)
    if camera_penalty is not None and len(missing):
        penalty, camera = camera_penalty
        out[missing] -= penalty[camera[rows[missing]], camera[cols[missing]]]
    return out


def encode(expanded: sp.csr_matrix, distances: np.ndarray) -> sp.csr_matrix:
    """V: row-normalised exp(-distance) on the structure of `expanded` (float64 CSR)."""
    rows = _row_ids(expanded)
    # Subtracting each row's minimum distance (a softmax) changes nothing but overflow.
    row_min = np.full(expanded.shape[0], np.inf)
    np.minimum.at(row_min, rows, distances)
    weights = np.exp(-(distances - row_min[rows]))
    totals = np.bincount(rows, weights=weights, minlength=expanded.shape[0])
    return sp.csr_matrix(
        (weights / totals[rows], expanded.indices.copy(), expanded.indptr.copy()),
        shape=expanded.shape,
    )


def query_expansion(encoding: sp.csr_matrix, order: np.ndarray, k2: int) -> sp.csr_matrix:
    """V_i <- mean of V_j over the first k2 neighbours of i (i included); k2 = 1 is a no-op.
    Negative entries of `order` (padding) are left out of the mean."""
    if k2 <= 1:
        return encoding
    n = encoding.shape[0]
    k2 = min(k2, order.shape[1])
    first = order[:, :k2]
    listed = first >= 0
    counts = listed.sum(axis=1)
    averaging = sp.csr_matrix(
        (
            np.repeat(1.0 / np.maximum(counts, 1), counts),
            first[listed],
            np.concatenate([[0], np.cumsum(counts)]),
        ),
        shape=(n, n),
    )
    expanded = (averaging @ encoding).tocsr()
    expanded.sort_indices()
    return expanded


def jaccard_upper(encoding: sp.csr_matrix, max_distance: float | None = None):
    """Jaccard distances of all pairs i <= j sharing a support column of `encoding`.

    Returns (rows, cols, distance float64) with rows <= cols, d_J < 1, and d_J <= max_distance when
    given (clipped at 0). Cost O(sum over columns of nnz^2 / 2), memory bounded per chunk.
    """
    n = encoding.shape[0]
    csr = encoding.tocsr()
    csr.sort_indices()
    csc = csr.tocsc()  # row indices ascending within each column
    # Where each CSR entry sits in the CSC arrays, to start its column scan at its own row: CSC
    # order is by column, rows ascending, i.e. a stable sort of the CSR entries by column.
    # Positions and row ids in int32 where they fit: at 10^6 rows these arrays are the stage's
    # memory (4 x 10^7 entries).
    index_dtype = np.int32 if max(csr.nnz, n) < 2**31 else np.int64
    csc_pos = np.empty(csr.nnz, index_dtype)
    csc_pos[np.argsort(csr.indices, kind="stable")] = np.arange(csr.nnz, dtype=index_dtype)
    rest = csc.indptr[csr.indices + 1] - csc_pos  # entries j >= i in the same column
    csr_rows = _row_ids(csr, index_dtype)
    out = []
    aggregator = _PairSums(n)
    for start, stop in _row_chunks(csr.indptr, rest, max_rows=aggregator.max_rows):
        lo, hi = csr.indptr[start], csr.indptr[stop]
        entry, pos = _ragged(csc_pos[lo:hi], rest[lo:hi])
        mins = np.minimum(csr.data[lo:hi][entry], csc.data[pos])
        local_rows = csr_rows[lo:hi][entry] - start
        rows, cols, m = aggregator(local_rows, csc.indices[pos], mins)
        rows += start
        dist = np.maximum(1.0 - m / (2.0 - m), 0.0)
        dist[rows == cols] = 0.0  # exactly, whatever the rounding of sum_l V_il
        keep = dist < 1.0 if max_distance is None else dist <= max_distance
        out.append((rows[keep], cols[keep], dist[keep]))
    if not out:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return tuple(np.concatenate(parts) for parts in zip(*out, strict=True))


# ---------------------------------------------------------------------------------------------
# Public entry points


def jaccard_distance(
    features: np.ndarray,
    k1: int = 30,
    k2: int = 6,
    *,
    backend: str = "faiss",
    max_distance: float | None = None,
    knn_block_size: int | None = None,
    neighbors_result: tuple[np.ndarray, np.ndarray] | None = None,
    camera_penalty: tuple[np.ndarray, np.ndarray] | None = None,
    knn_index: str = "exact",
    knn_params: neighbors.IndexParams | None = None,
) -> sp.csr_matrix:
    """Sparse k-reciprocal Jaccard distance of all pairs (cluster-contrast conventions).

    Args:
      features: (N, D); L2-normalised here (no-op when they already are).
      k1, k2: k-reciprocal and query-expansion sizes (k1 counts the point itself).
      backend: kNN backend, "faiss" or "jax" (see `jaxreid.pseudo_labels.neighbors`).
      max_distance: keep only pairs with d_J <= max_distance (e.g. DBSCAN's eps) to save
        memory; None keeps every pair with d_J < 1.
      knn_block_size: rows per block of the JAX kNN (None: from its memory budget).
      neighbors_result: precomputed `neighbors.knn(features, >= k1)` output, to skip the search.
      camera_penalty: (penalty (C, C), camera index (N,)): `neighbors_result` ranks by
        s_ij - penalty[camera_i, camera_j] (`camera_affinity.penalised_neighbors`), and so
        do the pair distances here.
      knn_index, knn_params: the kNN index ("exact", "ivf", "hnsw", "auto") and its
        parameters (`jaxreid.pseudo_labels.neighbors`).

    Returns:
      (N, N) symmetric float32 CSR matrix, sorted indices: the stored entries are the pairs with
      d_J < 1 (and <= max_distance), the diagonal included with an explicit 0; every pair not
      stored has distance 1. Never call `eliminate_zeros` on it; use `densify` for small N.
    """
    features = unit_rows(features)
    n = len(features)
    if n == 0:
        return sp.csr_matrix((0, 0), dtype=np.float32)
    if k1 > n:
        logger.warning("jaccard_distance: k1=%d > N=%d; using k1=N", k1, n)
        k1 = n
    k2 = max(1, min(k2, k1))
    timer = _Timer()
    if neighbors_result is None:
        sims, order = neighbors.knn(
            features,
            k1,
            backend=backend,
            block_size=knn_block_size,
            index=knn_index,
            params=knn_params,
        )
    else:
        sims, order = (np.asarray(a) for a in neighbors_result)
    timer.lap("knn")
    rows, cols, dist = _sparse_jaccard(
        features,
        sims,
        order,
        k_forward=k1,
        k_half=half_k(k1) + 1,
        k2=k2,
        row_scale=None,
        max_distance=max_distance,
        timer=timer,
        camera_penalty=camera_penalty,
    )
    return _symmetric(rows, cols, dist, n, timer, "jaccard_distance")


def camera_aware_jaccard_distance(
    features: np.ndarray,
    intra: tuple[np.ndarray, np.ndarray],
    inter: tuple[np.ndarray, np.ndarray],
    *,
    k1_intra: int = 5,
    k1_inter: int = 20,
    k2_intra: int = 2,
    k2_inter: int = 4,
    max_distance: float | None = None,
    camera_penalty: tuple[np.ndarray, np.ndarray] | None = None,
) -> sp.csr_matrix:
    """Camera-aware Jaccard distance (after Chen et al., "CA-Jaccard", CVPR 2024).

    The plain k-reciprocal sets of a camera network are mostly same-camera
    images (they look alike), so two views of one person in different cameras
    share little support. Here each support is the union of the k-reciprocal
    set within the own camera's list and the one within the other cameras'
    list, so every image keeps cross-camera neighbours; no 2/3 expansion; the
    query expansion averages V over the first k2_intra entries of the own-camera
    list (the image itself first) and the first k2_inter of the other cameras'.

    Args:
      features: (N, D); L2-normalised here (no-op when they already are).
      intra, inter: (similarities, indices) of `camera_affinity.intra_inter_neighbors`:
        each image's own-camera list (itself first, >= k1_intra + 1 entries) and
        other-camera list (>= k1_inter + 1 entries); index -1 pads a short list.
      k1_intra, k1_inter: R_intra(i) = i and its reciprocal ones among its k1_intra
        nearest of its camera; R_inter(i) = the reciprocal ones among its k1_inter + 1
        nearest of the other cameras (the public code's sizes).
      k2_intra, k2_inter: query-expansion sizes of the two lists.
      max_distance, camera_penalty: as in `jaccard_distance` (the lists rank by the
        penalised similarity, and so do the weights).

    Returns: the (N, N) CSR matrix of `jaccard_distance`'s conventions.
    """
    features = unit_rows(features)
    n = len(features)
    if n == 0:
        return sp.csr_matrix((0, 0), dtype=np.float32)
    (intra_sims, intra_order), (inter_sims, inter_order) = (
        tuple(np.asarray(a) for a in lists) for lists in (intra, inter)
    )
    intra_order, inter_order = intra_order.astype(np.int64), inter_order.astype(np.int64)
    timer = _Timer()
    support = (
        reciprocal_sets(intra_order, k1_intra + 1) + reciprocal_sets(inter_order, k1_inter + 1)
    ).astype(bool)
    support.sort_indices()
    timer.lap("reciprocal")
    dist = 2.0 - 2.0 * pair_similarities(
        features,
        np.concatenate([intra_sims, inter_sims], axis=1),
        np.concatenate([intra_order, inter_order], axis=1),
        _row_ids(support),
        support.indices.astype(np.int64),
        camera_penalty,
    )
    expansion = np.concatenate([intra_order[:, :k2_intra], inter_order[:, :k2_inter]], axis=1)
    encoding = query_expansion(encode(support, dist), expansion, expansion.shape[1])
    timer.lap("encode")
    rows, cols, dist = jaccard_upper(encoding, max_distance)
    timer.lap("jaccard")
    return _symmetric(rows, cols, dist, n, timer, "camera_aware_jaccard_distance")


def _symmetric(rows, cols, dist, n, timer, name) -> sp.csr_matrix:
    """The (N, N) float32 CSR matrix of the upper-triangle pairs (rows <= cols) and their mirror."""
    offdiag = rows != cols
    full = sp.csr_matrix(
        (
            np.concatenate([dist, dist[offdiag]]).astype(np.float32),
            (np.concatenate([rows, cols[offdiag]]), np.concatenate([cols, rows[offdiag]])),
        ),
        shape=(n, n),
    )
    full.sort_indices()
    timer.lap("assemble")
    logger.info(
        "%s: N=%d, %d stored pairs (%.1f per row); %s", name, n, full.nnz, full.nnz / n, timer
    )
    return full


def densify(sparse_distance: sp.spmatrix) -> np.ndarray:
    """Dense (N, N) float32 copy of a sparse Jaccard matrix: stored values, 1 elsewhere."""
    coo = sp.coo_matrix(sparse_distance)
    dense = np.ones(coo.shape, np.float32)
    dense[coo.row, coo.col] = coo.data
    return dense


def k_reciprocal_rerank(
    query_features: np.ndarray,
    gallery_features: np.ndarray,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    *,
    backend: str = "faiss",
    knn_block_size: int | None = None,
    cameras: np.ndarray | None = None,
    camera_affinity: float = 0.0,
) -> np.ndarray:
    """k-reciprocal re-ranking (Zhong et al. 2017) of query vs gallery: (Q, G) float32 distance.

    Follows the original `re_ranking` over all Q + G points (queries are neighbours of each other
    and of the gallery, as there): original distance = squared Euclidean of the L2-normalised
    features, each row divided by its maximum over all Q + G points; R(i) from the k1 + 1 nearest
    (i included); final = (1 - lambda) * Jaccard + lambda * original. Memory: the (Q, G) output
    plus O((Q + G) k1); the kNN and the row maxima are blocked searches.

    camera_affinity > 0 (with `cameras`, the (Q + G,) cameras of the query then gallery rows):
    every similarity s_ij becomes s_ij - camera_affinity * (1 - A[c_i, c_j]), A the camera
    affinity of the Q + G features (`camera_affinity.penalised_neighbors`), in the neighbour
    lists, the Jaccard weights and the original distance alike (the row maxima stay those of
    the plain distance).
    """
    query = unit_rows(query_features)
    gallery = unit_rows(gallery_features)
    num_query, num_gallery = len(query), len(gallery)
    if num_query == 0 or num_gallery == 0:
        return np.zeros((num_query, num_gallery), np.float32)
    features = np.concatenate([query, gallery])
    n = len(features)
    k_forward = min(k1 + 1, n)
    k2 = max(1, min(k2, k_forward))
    timer = _Timer()
    camera_penalty = None
    if camera_affinity > 0:
        from jaxreid.pseudo_labels.camera_affinity import penalised_neighbors

        if cameras is None or len(cameras) != n:
            raise ValueError(f"camera_affinity needs the cameras of all {n} query + gallery rows")
        (sims, order), affinity, camera_index = penalised_neighbors(
            features, np.asarray(cameras), k_forward, camera_affinity, backend
        )
        camera_penalty = (camera_affinity * (1.0 - affinity), camera_index)
    else:
        sims, order = neighbors.knn(features, k_forward, backend=backend, block_size=knn_block_size)
    # max_l d(i, l) = 2 - 2 min_l s(i, l): the nearest neighbour of -x_i.
    min_sims = -neighbors.knn_query(
        -features, features, 1, backend=backend, block_size=knn_block_size
    )[0][:, 0].astype(np.float64)
    row_max = np.maximum(2.0 - 2.0 * min_sims, 1e-12)
    timer.lap("knn")
    rows, cols, jaccard = _sparse_jaccard(
        features,
        sims,
        order,
        k_forward=k_forward,
        k_half=half_k(k1) + 1,
        k2=k2,
        row_scale=row_max,
        max_distance=None,
        timer=timer,
        query_rows=num_query,
        column_offset=num_query,
        camera_penalty=camera_penalty,
    )
    out = np.ones((num_query, num_gallery), np.float32)
    out[rows, cols - num_query] = jaccard
    out *= 1.0 - lambda_value
    # The original distance part, blocked over queries so no (Q + G)^2 array is needed.
    step = max(1, _CHUNK_ELEMENTS // max(num_gallery, 1))
    for s in range(0, num_query, step):
        e = min(s + step, num_query)
        similarity = (query[s:e] @ gallery.T).astype(np.float64)
        if camera_penalty is not None:
            penalty, camera_index = camera_penalty
            similarity -= penalty[camera_index[s:e, None], camera_index[None, num_query:]]
        original = (2.0 - 2.0 * similarity) / row_max[s:e, None]
        out[s:e] += (lambda_value * original).astype(np.float32)
    timer.lap("final")
    logger.info("k_reciprocal_rerank: Q=%d, G=%d; %s", num_query, num_gallery, timer)
    return out


# ---------------------------------------------------------------------------------------------
# Internals


def _sparse_jaccard(
    features,
    sims,
    order,
    *,
    k_forward,
    k_half,
    k2,
    row_scale,
    max_distance,
    timer,
    query_rows=None,
    column_offset=0,
    camera_penalty=None,
):
    """kNN lists -> V -> query expansion -> Jaccard pairs (upper triangle, or query rows)."""
    n = len(order)
    order = np.asarray(order, dtype=np.int64)
    if order.shape[1] < k_forward:
        raise ValueError(f"need >= {k_forward} neighbours per row, got {order.shape[1]}")
    reciprocal = reciprocal_sets(order, k_forward)
    reciprocal_half = reciprocal_sets(order, min(k_half, k_forward))
    expanded = expanded_sets(reciprocal, reciprocal_half)
    timer.lap("reciprocal")
    e_rows = _row_ids(expanded)
    dist = 2.0 - 2.0 * pair_similarities(
        features, sims, order, e_rows, expanded.indices.astype(np.int64), camera_penalty
    )
    if row_scale is not None:
        dist = dist / row_scale[e_rows]
    encoding = query_expansion(encode(expanded, dist), order, k2)
    timer.lap("encode")
    logger.debug(
        "k-reciprocal: |R| %.1f, |E| %.1f, nnz(V) per row %.1f",
        reciprocal.nnz / n,
        expanded.nnz / n,
        encoding.nnz / n,
    )
    del reciprocal, reciprocal_half, expanded, e_rows, dist  # freed before the largest stage
    if query_rows is None:
        result = jaccard_upper(encoding, max_distance)
    else:
        result = _jaccard_rows(encoding, query_rows, column_offset)
    timer.lap("jaccard")
    return result


def _jaccard_rows(encoding, num_rows, column_offset):
    """Jaccard distance of rows [0, num_rows) vs columns >= column_offset sharing support."""
    n = encoding.shape[0]
    csr = encoding.tocsr()
    csc = csr.tocsc()
    # Only rows >= column_offset of each column are wanted (rows are sorted within a column).
    csc_cols = np.repeat(np.arange(n, dtype=np.int64), np.diff(csc.indptr))
    skipped = np.bincount(csc_cols[csc.indices < column_offset], minlength=n)
    first_of_entry = (csc.indptr[:-1] + skipped)[csr.indices]
    rest = csc.indptr[csr.indices + 1] - first_of_entry
    csr_rows = _row_ids(csr)
    aggregator = _PairSums(n)
    out = []
    for start, stop in _row_chunks(csr.indptr[: num_rows + 1], rest, max_rows=aggregator.max_rows):
        lo, hi = csr.indptr[start], csr.indptr[stop]
        entry, pos = _ragged(first_of_entry[lo:hi], rest[lo:hi])
        mins = np.minimum(csr.data[lo:hi][entry], csc.data[pos])
        rows, cols, m = aggregator(csr_rows[lo:hi][entry] - start, csc.indices[pos], mins)
        out.append((rows + start, cols, 1.0 - m / (2.0 - m)))
    return tuple(np.concatenate(parts) for parts in zip(*out, strict=True))


class _PairSums:
    """Sums values by (local row, column) in O(len) time without sorting.

    A dense (rows x N) accumulator is reused across chunks; only the touched cells are read and
    reset, found with a "last writer" stamp, so no chunk pays for zeroing or scanning N columns.
    """

    def __init__(self, n: int):
        self.n = max(n, 1)
        # At least 16 rows per chunk: at N = 10^6 one row per chunk meant 10^6 Python-level
        # iterations (O(N^2 / _CHUNK_ELEMENTS)); 16 rows cost 16 N x 12 bytes (192 MB).
        self.max_rows = max(16, _CHUNK_ELEMENTS // self.n)
        self.acc = np.zeros(self.max_rows * self.n)
        self.stamp = np.zeros(self.max_rows * self.n, np.int32)

    def __call__(self, local_rows, cols, values):
        keys = local_rows.astype(np.int64) * self.n + cols
        np.add.at(self.acc, keys, values)
        ticket = np.arange(len(keys), dtype=np.int32)
        self.stamp[keys] = ticket
        unique = keys[self.stamp[keys] == ticket]
        sums = self.acc[unique]
        self.acc[unique] = 0.0
        return unique // self.n, unique % self.n, sums


def _row_chunks(indptr, cost_per_entry, max_rows=None):
    """Consecutive row ranges whose summed per-entry cost stays near _CHUNK_ELEMENTS."""
    num_rows = len(indptr) - 1
    if num_rows <= 0:
        return
    entry_cost = np.concatenate([[0], np.cumsum(cost_per_entry, dtype=np.int64)])
    row_cost = entry_cost[indptr]
    start = 0
    while start < num_rows:
        stop = int(np.searchsorted(row_cost, row_cost[start] + _CHUNK_ELEMENTS, side="right")) - 1
        stop = max(stop, start + 1)
        if max_rows is not None:
            stop = min(stop, start + max_rows)
        stop = min(stop, num_rows)
        yield start, stop
        start = stop


def _ragged(starts, lengths):
    """For groups g with `lengths[g]` items at starts[g], starts[g] + 1, ...: (group, position)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    group = np.repeat(np.arange(len(lengths)), lengths)
    offsets = np.cumsum(lengths) - lengths
    pos = np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(
        np.asarray(starts, dtype=np.int64) - offsets, lengths
    )
    return group, pos


def _contains(sorted_keys, queries):
    """Elementwise `queries in sorted_keys`."""
    if len(sorted_keys) == 0:
        return np.zeros(len(queries), bool)
    pos = np.minimum(np.searchsorted(sorted_keys, queries), len(sorted_keys) - 1)
    return sorted_keys[pos] == queries


def _row_ids(matrix: sp.csr_matrix, dtype=np.int64) -> np.ndarray:
    return np.repeat(np.arange(matrix.shape[0], dtype=dtype), np.diff(matrix.indptr))


def _csr_from_sorted(rows, cols, data, n):
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    return sp.csr_matrix((data, cols.astype(np.int64), indptr), shape=(n, n))


class _Timer:
    def __init__(self):
        self.last = time.perf_counter()
        self.laps: list[tuple[str, float]] = []

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps.append((name, now - self.last))
        self.last = now

    def __str__(self) -> str:
        return ", ".join(f"{name} {sec:.2f}s" for name, sec in self.laps)

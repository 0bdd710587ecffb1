"""Bottom-up cluster merging (BUC: Lin et al., "A bottom-up clustering approach
to unsupervised person re-identification", AAAI 2019), a pseudo-label option
beside DBSCAN (`cluster.algorithm = "bottom_up"`).

Every image starts as its own cluster. A round merges cluster pairs in order
of their dissimilarity

    D(A, B) = min_{a in A, b in B} ||x_a - x_b||^2 + lambda (|A| + |B|)

(minimum-distance linkage on unit features, plus the diversity regulariser:
small clusters merge first, so no giant cluster swallows the others) until
`num_to_merge` pairs have merged. As in the authors' code, the sizes are
those at the start of the round and the pairs are image pairs taken in
ascending order: the first pair joining two clusters is their minimum
distance, and a later pair inside an already merged cluster changes nothing.

Sparse: the candidate pairs are each image and its `k` nearest neighbours
(`jaxreid.pseudo_labels.neighbors.knn`), never the N x N matrix the authors
build; two clusters with no such pair between them never merge in a round.
When the candidates run out before `num_to_merge` merges the round merges
fewer, and the count says so (`merge_round` returns it; `merge_labels` logs
it).

Across epochs the merges accumulate: each re-clustering continues from the
previous epoch's labels (`previous`), as BUC does after each training step;
without them (`previous` None) it replays every round so far on the current
features from singletons.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from jaxreid.pseudo_labels import neighbors
from jaxreid.utils import l2_normalize

logger = logging.getLogger(__name__)


def compact_labels(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 0..C-1 in order of each cluster's first image; every
    negative label becomes a cluster of its own (a singleton)."""
    labels = np.asarray(labels, np.int64).copy()
    loose = labels < 0
    labels[loose] = labels.max(initial=-1) + 1 + np.arange(int(loose.sum()))
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


def _find(parent: np.ndarray, a: int) -> int:
    root = a
    while parent[root] != root:
        root = parent[root]
    while parent[a] != root:  # path compression
        parent[a], a = root, parent[a]
    return root


def merge_round(
    labels: np.ndarray,
    first: np.ndarray,
    second: np.ndarray,
    distances: np.ndarray,
    num_to_merge: int,
    diversity: float,
) -> tuple[np.ndarray, int]:
    """One round of merging over candidate image pairs.

    Args:
      labels: (N,) current clusters (negative: a singleton).
      first, second: (M,) image indices of the candidate pairs.
      distances: (M,) their feature distances (squared Euclidean of unit rows).
      num_to_merge: merges wanted this round (at most clusters - 1 happen).
      diversity: lambda of the size term (0 = plain minimum-distance linkage).

    Returns:
      (labels 0..C'-1 in order of each cluster's first image, merges done).
    """
    labels = compact_labels(labels)
    num_clusters = int(labels.max(initial=-1)) + 1
    sizes = np.bincount(labels, minlength=num_clusters)
    a, b = labels[first], labels[second]
    apart = a != b
    a, b = a[apart], b[apart]
    score = np.asarray(distances, np.float64)[apart] + diversity * (sizes[a] + sizes[b])
    # Ties: by the pair's cluster ids, so the order never depends on the input order.
    order = np.lexsort((np.maximum(a, b), np.minimum(a, b), score))
    parent = np.arange(num_clusters)
    target = min(int(num_to_merge), max(num_clusters - 1, 0))
    merged = 0
    for index in order:
        if merged >= target:
            break
        ra, rb = _find(parent, int(a[index])), _find(parent, int(b[index]))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
            merged += 1
    roots = np.array([_find(parent, c) for c in range(num_clusters)], np.int64)
    return compact_labels(roots[labels] if num_clusters else labels), merged


def candidate_pairs(
    features: np.ndarray, k: int, backend: str = "faiss", index: str = "auto", params=None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first, second, squared distance) of every image and its k nearest
    other images (unit features)."""
    f = l2_normalize(np.asarray(features, np.float32))
    n = len(f)
    if n < 2:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0, np.float64)
    sims, idx = neighbors.knn(f, min(k + 1, n), backend, index=index, params=params)
    first = np.repeat(np.arange(n), idx.shape[1] - 1)
    second = idx[:, 1:].reshape(-1)  # column 0 is the image itself
    distance = np.maximum(2.0 - 2.0 * sims[:, 1:].reshape(-1).astype(np.float64), 0.0)
    return first, second, distance


def merge_labels(
    features: np.ndarray,
    previous: np.ndarray | None,
    rounds: int,
    num_to_merge: int,
    diversity: float,
    k: int,
    backend: str = "faiss",
    index: str = "auto",
    params=None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """`rounds` merge rounds of `num_to_merge` merges each on (N, D) features,
    from `previous` labels (None or negatives: singletons).

    Returns (labels 0..C-1, stats): clusters before and after, merges done,
    merges wanted, seconds."""
    start = time.perf_counter()
    n = len(features)
    labels = compact_labels(np.full(n, -1) if previous is None else previous)
    before = int(labels.max(initial=-1)) + 1
    first, second, distance = candidate_pairs(features, k, backend, index, params)
    merges, wanted = 0, 0
    for _ in range(rounds):
        clusters = int(labels.max(initial=-1)) + 1
        want = min(num_to_merge, max(clusters - 1, 0))
        labels, done = merge_round(labels, first, second, distance, want, diversity)
        merges, wanted = merges + done, wanted + want
    stats = {
        "clusters_before": before,
        "clusters_after": int(labels.max(initial=-1)) + 1,
        "merges": merges,
        "merges_wanted": wanted,
        "merge_s": time.perf_counter() - start,
    }
    logger.info(
        "bottom_up: N=%d, %d rounds of %d merges (lambda %g, %d neighbours): %d -> %d "
        "clusters, %d merges (%.2fs)",
        n,
        rounds,
        num_to_merge,
        diversity,
        k,
        before,
        stats["clusters_after"],
        merges,
        stats["merge_s"],
    )
    if merges < wanted:
        logger.warning(
            "bottom_up: %d of the %d merges wanted found no candidate pair (each image's %d "
            "nearest neighbours are already in its cluster); raise cluster.merge_k",
            wanted - merges,
            wanted,
            k,
        )
    return labels, stats


def epoch_labels(
    features: np.ndarray,
    previous: np.ndarray | None,
    epoch: int,
    params: Any,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The labels of the re-clustering at `epoch` (0-based) under the cluster
    section `params` (merge_percent, merge_rounds, merge_first_rounds,
    merge_lambda, merge_k, knn_backend, knn*): `merge_first_rounds` rounds at
    epoch 0 and `merge_rounds` at each later one, each merging merge_percent
    of N, from `previous` (None: every round so far from singletons)."""
    from jaxreid.pseudo_labels.clustering import knn_settings

    n = len(features)
    first_rounds = int(params["merge_first_rounds"]) or int(params["merge_rounds"])
    if previous is None:
        rounds = first_rounds + epoch * int(params["merge_rounds"])
    else:
        rounds = first_rounds if epoch == 0 else int(params["merge_rounds"])
    index, knn_params = knn_settings(params)
    return merge_labels(
        features,
        previous,
        rounds,
        max(int(float(params["merge_percent"]) * n), 1),
        float(params["merge_lambda"]),
        int(params["merge_k"]),
        params["knn_backend"],
        index,
        knn_params,
    )


ALGORITHMS = ("dbscan", "bottom_up")


def merge_problems(config: Any) -> list[str]:
    """'cluster.* = value: fix' lines of the algorithm choice and, with
    "bottom_up", of its settings."""
    from jaxreid.validate import number_problems

    algorithm = config.cluster.get("algorithm", "dbscan")
    if algorithm not in ALGORITHMS:
        return [f"cluster.algorithm = {algorithm!r}: unknown; one of {', '.join(ALGORITHMS)}"]
    if algorithm != "bottom_up":
        return []
    problems = number_problems(
        config,
        ("cluster.merge_percent", 0, 1, "(]", "BUC: 0.05 of the images a round"),
        ("cluster.merge_lambda", 0, None, "[)", "BUC: 0.005; 0 = no diversity term"),
    )
    for key, low, meaning in (
        ("merge_rounds", 0, "rounds at each re-clustering after the first; BUC: 1"),
        ("merge_first_rounds", 0, "rounds at the first re-clustering; 0 = merge_rounds"),
        ("merge_k", 1, "neighbours per image giving the candidate pairs; 20"),
    ):
        value = config.cluster.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            problems.append(
                f"cluster.{key} = {value!r}: must be a whole number >= {low} ({meaning})"
            )
    return problems

"""mAP and CMC under the Market-1501 protocol, vectorised over query chunks.

Protocol, per query: gallery entries with the query's pid AND camera are
removed (same view of the same person), as are gallery entries with pid -1
(junk; the dataset readers already drop them, a caller passing them gets them
ignored). Distractors (pid 0) stay and count as wrong matches (queries are
expected never to have pid 0). The remaining entries are ranked by ascending
distance with a stable sort: ties are broken by gallery index, exactly as
`np.argsort(kind="stable")`.

AP = mean over the true matches of the precision at that match (hits so far /
rank among the kept entries), as in the Market-1501 and TorchReID code. CMC at
rank r = 1 when the first true match is at a rank <= r. Queries without any
true match left in the gallery are excluded from every average and reported
through `num_valid_queries`.
"""

from __future__ import annotations

import numpy as np

from jaxreid.evaluate.distances import DEFAULT_MAX_BLOCK_BYTES

JUNK_PID = -1

# Bytes of working memory per (query, gallery) element of a chunk: the int64
# sort order, gathered pids and cameras (int64 each), cumulative counts (two
# int64) and a few boolean masks.
_BYTES_PER_ELEMENT = 8 * 5 + 4


def _as_labels(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-d, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"{name} must be integers, got {x.dtype}")
    return x.astype(np.int64, copy=False)


def ranked_gallery(
    distances: np.ndarray,
    query_pid: int,
    query_cam: int,
    gallery_pids: np.ndarray,
    gallery_cams: np.ndarray,
) -> np.ndarray:
    """Gallery indices of one query in protocol order (filtered, stable ranking)."""
    gallery_pids, gallery_cams = np.asarray(gallery_pids), np.asarray(gallery_cams)
    order = np.argsort(np.asarray(distances), kind="stable")
    pids, cams = gallery_pids[order], gallery_cams[order]
    removed = ((pids == query_pid) & (cams == query_cam)) | (pids == JUNK_PID)
    return order[~removed]


def evaluate_ranking(
    distmat: np.ndarray,
    query_pids: np.ndarray,
    gallery_pids: np.ndarray,
    query_cams: np.ndarray,
    gallery_cams: np.ndarray,
    max_rank: int = 10,
    *,
    max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
) -> dict:
    """Market-1501 mAP and CMC of a (Q, G) distance matrix (smaller = closer).

    Returns a dict with mAP, rank1, rank5, rank10 (floats in [0, 1]), cmc (float
    array of length `max_rank`, cmc[r - 1] = rank-r accuracy), num_queries and
    num_valid_queries (ints). With no valid query the metrics are NaN.
    Queries are processed in chunks whose working memory stays near
    `max_block_bytes` (one query per chunk at least).
    """
    distmat = np.asarray(distmat)
    query_pids = _as_labels(query_pids, "query_pids")
    gallery_pids = _as_labels(gallery_pids, "gallery_pids")
    query_cams = _as_labels(query_cams, "query_cams")
    gallery_cams = _as_labels(gallery_cams, "gallery_cams")
    num_query, num_gallery = len(query_pids), len(gallery_pids)
    if distmat.shape != (num_query, num_gallery):
        raise ValueError(
            f"distmat has shape {distmat.shape}, expected (num_queries, num_gallery) = "
            f"({num_query}, {num_gallery})"
        )
    if len(query_cams) != num_query or len(gallery_cams) != num_gallery:
        raise ValueError("pids and cams must have the same length on each side")
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")

    # first_rank: 1-based rank (among kept entries) of the first true match;
    # 0 for queries without any true match.
    first_rank = np.zeros(num_query, np.int64)
    average_precision = np.zeros(num_query, np.float64)
    chunk = max(1, int(max_block_bytes) // max(num_gallery * _BYTES_PER_ELEMENT, 1))
    for start in range(0, num_query, chunk):
        stop = min(start + chunk, num_query)
        order = np.argsort(distmat[start:stop], axis=1, kind="stable")
        pids = gallery_pids[order]
        same_pid = pids == query_pids[start:stop, None]
        removed = same_pid & (gallery_cams[order] == query_cams[start:stop, None])
        removed |= pids == JUNK_PID
        del pids
        kept = ~removed
        hit = same_pid & kept
        rank = np.cumsum(kept, axis=1)  # rank of each kept entry among kept ones
        hits_so_far = np.cumsum(hit, axis=1)
        num_hits = hits_so_far[:, -1] if num_gallery else np.zeros(stop - start, np.int64)
        precision = np.divide(hits_so_far, rank, out=np.zeros(hit.shape), where=hit)
        average_precision[start:stop] = precision.sum(axis=1) / np.maximum(num_hits, 1)
        has_hit = num_hits > 0
        if num_gallery:
            first = np.argmax(hit, axis=1)
            first_rank[start:stop] = np.where(has_hit, rank[np.arange(stop - start), first], 0)

    valid = first_rank > 0
    num_valid = int(valid.sum())
    ranks = first_rank[valid]

    def cmc_at(r: int) -> float:
        return float(np.mean(ranks <= r)) if num_valid else float("nan")

    return {
        "mAP": float(average_precision[valid].mean()) if num_valid else float("nan"),
        "rank1": cmc_at(1),
        "rank5": cmc_at(5),
        "rank10": cmc_at(10),
        "cmc": np.array([cmc_at(r) for r in range(1, max_rank + 1)]),
        "num_queries": num_query,
        "num_valid_queries": num_valid,
    }

"""k-nearest neighbours by inner product: exact (FAISS on the host, or matmul + top-k in JAX),
or approximate with FAISS's IVF-Flat or HNSW-Flat indexes for large N.

Conventions shared by both backends (so the k-reciprocal code downstream sees the same lists):

- Features are expected L2-normalised; the score is the inner product, i.e. cosine similarity.
  Results are `(similarities, indices)`, both `(num_queries, k)`, similarities DEcreasing along a
  row (float32), indices int64. Convert with `squared_euclidean = 2 - 2 * similarity`.
- `knn(features, k)` (every point against all points) puts the point itself first in its own row,
  whatever the floating point says (a duplicate vector never displaces it).
- Ties are ordered by increasing database index. "Tie" means equal up to `tie_tolerance`: each
  backend fetches `k + extra_candidates` candidates in float32; rows where two neighbouring
  candidates among the first k + 1 differ by <= `tie_tolerance` have their candidate
  similarities recomputed in float64 on the host and are re-sorted by (similarity desc, index
  asc). Float32 rounding differs between FAISS and XLA by far less than the tolerance, so both
  backends return the same neighbour sets and the same order (exact duplicates included), unless
  a group of ties extends beyond the `k + extra_candidates` candidates fetched.

Approximate search (`index="ivf" | "hnsw"`, or `"auto"` above `AUTO_EXACT_MAX` database rows):
the candidates come from an IVF-Flat index (k-means coarse quantiser, the rows of the `nprobe`
nearest of `nlist` lists scanned) or FAISS's `IndexHNSWFlat` (graph of `hnsw_m` links,
`ef_search` beam); both keep the vectors uncompressed, so a candidate's similarity is the same
float32 inner product as the exact search's, and the same ordering step runs on them: self first
(a point its index did not return replaces its last candidate), ties by index, near-ties
re-ranked in float64. What does not hold: the candidate SET may miss true neighbours (recall < 1;
`benchmarks/clustering_scale.py` measures it), so a returned list is the exact order of the
neighbours found, and a tie group can be cut differently than the exact search would. Below
`AUTO_EXACT_MAX`, `"auto"` IS the exact search (same code path, bit-identical results).

On the CPU the IVF search is `_blocked_ivf_search`: FAISS k-means lists, scanned list by list
with one BLAS product per list, the candidates of FAISS's `IndexIVFFlat` with the same centroids
at ~20x its speed for D = 2048 (FAISS scans a list one vector pair at a time). Where FAISS sees
a GPU it is FAISS's `GpuIndexIVFFlat`. HNSW has no FAISS GPU index and stays on the host.

Parameters derived from N when 0 (`index_params`):

- IVF: nlist = the power of two nearest 2 sqrt(N) (at least 1, at most N // 39, FAISS's minimum
  of training points per list), k-means on min(N, 64 nlist) evenly spaced rows; nprobe = 16
  (at most nlist). Why: the work is k-means (640 nlist^2 D), the assignment to lists
  (N nlist D) and the scan (N nprobe (N / nlist) D). A fixed nprobe over lists of ~sqrt(N) / 2
  rows keeps the scan at 8 sqrt(N) rows per query; an identity of 5-30 images and its
  look-alikes sit in one or two lists. On the identity sets of `benchmarks/clustering_scale.py`
  the exact neighbours of every identity image are found at 10^5 and 10^6 rows; the misses
  are the outliers' neighbours, random rows at near-equal similarity.
- HNSW: M = 32 (FAISS's recommended 16-64 for high-dimensional data), efConstruction = 2 M,
  efSearch = max(128, 4 (k + extra_candidates)) (at 2 (k + extra), 76 for k = 30, recall@20 was
  0.88 on the 10^5 x 512 identity set of `benchmarks/clustering_scale.py`).

Approximate indexes read `database` and the queries in row chunks (float16 or memory-mapped
arrays are never copied whole to float32).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)

BACKENDS = ("faiss", "jax")
INDEXES = ("exact", "ivf", "hnsw", "auto")
# "auto" searches exactly up to this many database rows (CUHK03's 7,365, Market's 12,936 and
# MSMT17's 32,621 training images are far below), IVF above. At 10^5 x 2048 on 2 CPU cores the
# exact kNN takes 152 s, IVF 24 s at ARI 0.993 against the exact clustering, HNSW 103 s
# (docs/results/clustering_scale.md).
AUTO_EXACT_MAX = 100_000
AUTO_INDEX = "ivf"
# Rows per chunk when an approximate index reads the database or the queries.
_CHUNK_ROWS = 16384


@dataclasses.dataclass(frozen=True)
class IndexParams:
    """Approximate-index parameters; 0 means derived from N (`index_params`)."""

    nlist: int = 0
    nprobe: int = 0
    hnsw_m: int = 0
    ef_search: int = 0


def resolve_index(index: str, num_database: int) -> str:
    """The index actually used: "auto" is "exact" up to AUTO_EXACT_MAX rows, else AUTO_INDEX."""
    if index not in INDEXES:
        raise ValueError(f"index must be one of {INDEXES}, got {index!r}")
    if index == "auto":
        return "exact" if num_database <= AUTO_EXACT_MAX else AUTO_INDEX
    return index


def index_params(
    num_database: int, num_candidates: int, params: IndexParams | None = None
) -> dict[str, int]:
    """The IVF and HNSW parameters for a database of N rows (module doc), overrides applied."""
    params = params or IndexParams()
    n = max(int(num_database), 1)
    nlist = 2 ** int(round(np.log2(max(2 * np.sqrt(n), 1.0))))
    nlist = int(params.nlist) or max(1, min(nlist, n // 39))
    nprobe = int(params.nprobe) or 16
    hnsw_m = int(params.hnsw_m) or 32
    ef_search = int(params.ef_search) or max(128, 4 * int(num_candidates))
    return dict(
        nlist=nlist,
        nprobe=min(nprobe, nlist),
        hnsw_m=hnsw_m,
        ef_construction=2 * hnsw_m,
        ef_search=ef_search,
    )


def knn(
    features: np.ndarray,
    k: int,
    backend: str = "faiss",
    *,
    block_size: int | None = None,
    memory_budget_bytes: int = 256 * 2**20,
    extra_candidates: int = 8,
    tie_tolerance: float = 1e-5,
    symmetric: bool = True,
    index: str = "exact",
    params: IndexParams | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest neighbours of every row of `features` among all rows, itself first.

    Args:
      features: (N, D) float array, L2-normalised.
      k: neighbours per row including the point itself; clipped to N.
      backend: "faiss" (host; GPU index when faiss-gpu sees a GPU) or "jax" (default device).
      block_size: rows per JAX block; default from `memory_budget_bytes`.
      memory_budget_bytes: bound on the float32 similarity blocks of the JAX backend.
      extra_candidates: candidates fetched beyond k to order ties consistently.
      tie_tolerance: similarity gap under which neighbours count as tied (see module doc).
      symmetric: JAX backend only: compute each (block_i, block_j) similarity block once for
        i <= j and use it for the rows of both blocks (S_ji = S_ij^T), half the matmul work.
        False runs the query-block path of `knn_query` (block x N similarities).
      index: "exact", "ivf", "hnsw" or "auto" (module doc); the approximate indexes ignore
        `backend` (host BLAS, or FAISS's GPU IVF where FAISS sees a GPU).
      params: approximate-index parameters (0 fields derived from N).

    Returns:
      (similarities (N, k) float32, indices (N, k) int64), row i starting with (|x_i|^2, i).
    """
    mode = "symmetric" if symmetric else "self"
    return _search(
        features,
        features,
        k,
        backend,
        mode,
        block_size,
        memory_budget_bytes,
        extra_candidates,
        tie_tolerance,
        index,
        params,
    )


def knn_query(
    queries: np.ndarray,
    database: np.ndarray,
    k: int,
    backend: str = "faiss",
    *,
    block_size: int | None = None,
    memory_budget_bytes: int = 256 * 2**20,
    extra_candidates: int = 8,
    tie_tolerance: float = 1e-5,
    index: str = "exact",
    params: IndexParams | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest rows of `database` for every query (query-vs-gallery; no self convention).

    Same arguments and return convention as `knn`; k is clipped to len(database).
    """
    return _search(
        queries,
        database,
        k,
        backend,
        "query",
        block_size,
        memory_budget_bytes,
        extra_candidates,
        tie_tolerance,
        index,
        params,
    )


def _search(
    queries,
    database,
    k,
    backend,
    mode,
    block_size,
    memory_budget_bytes,
    extra_candidates,
    tie_tolerance,
    index="exact",
    params=None,
):
    self_first = mode != "query"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    index = resolve_index(index, len(database))
    if index == "exact":
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        database = np.ascontiguousarray(database, dtype=np.float32)
    if queries.ndim != 2 or database.ndim != 2 or queries.shape[1] != database.shape[1]:
        raise ValueError(f"need (Q, D) and (N, D) arrays, got {queries.shape}, {database.shape}")
    num_queries, num_database = len(queries), len(database)
    k = min(int(k), num_database)
    if k <= 0 or num_queries == 0:
        return np.zeros((num_queries, 0), np.float32), np.zeros((num_queries, 0), np.int64)
    num_candidates = min(k + max(int(extra_candidates), 0), num_database)
    start = time.perf_counter()
    if index != "exact":
        sims, idx = _approximate_search(
            queries,
            database,
            num_candidates,
            index,
            index_params(num_database, num_candidates, params),
        )
    elif backend == "faiss":
        sims, idx = _faiss_search(queries, database, num_candidates)
    elif mode == "symmetric":
        sims, idx = _jax_symmetric_search(database, num_candidates, block_size, memory_budget_bytes)
    else:
        sims, idx = _jax_search(
            queries, database, num_candidates, self_first, block_size, memory_budget_bytes
        )
    sims, idx = _order_candidates(queries, database, sims, idx, k, self_first, tie_tolerance)
    logger.debug(
        "knn %s/%s: %d x %d, k=%d in %.2fs",
        backend,
        index,
        num_queries,
        num_database,
        k,
        time.perf_counter() - start,
    )
    return sims, idx


def _import_faiss():
    try:
        import faiss
    except ImportError as e:
        raise ImportError(
            "backend='faiss' needs the faiss package: `pip install faiss-cpu` (or faiss-gpu), "
            "or use backend='jax'"
        ) from e
    return faiss


def _faiss_search(queries, database, num_candidates):
    faiss = _import_faiss()
    if faiss.get_num_gpus() > 0:
        index = faiss.GpuIndexFlatIP(faiss.StandardGpuResources(), database.shape[1])
        index.add(database)
        sims, idx = index.search(queries, num_candidates)
    else:
        # IndexFlatIP's exact search without building the index, which would copy the database.
        sims, idx = faiss.knn(queries, database, num_candidates, metric=faiss.METRIC_INNER_PRODUCT)
    return sims, idx.astype(np.int64)


def _rows_f32(array, start, stop):
    return np.ascontiguousarray(array[start:stop], dtype=np.float32)


def _approximate_search(queries, database, num_candidates, index, params):
    """Candidates from an IVF (k-means lists) or a FAISS HNSW-Flat index on `database`."""
    faiss = _import_faiss()
    if index == "ivf" and faiss.get_num_gpus() == 0:
        return _blocked_ivf_search(queries, database, num_candidates, params)
    n, dim = database.shape
    tick = time.perf_counter()
    if index == "ivf":
        searcher = faiss.IndexIVFFlat(
            faiss.IndexFlatIP(dim), dim, params["nlist"], faiss.METRIC_INNER_PRODUCT
        )
        searcher = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, searcher)
        searcher.train(_training_rows(database, params["nlist"]))
        searcher.nprobe = params["nprobe"]
    elif index == "hnsw":
        searcher = faiss.IndexHNSWFlat(dim, params["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
        searcher.hnsw.efConstruction = params["ef_construction"]
    else:
        raise ValueError(f"unknown approximate index {index!r}")
    for s in range(0, n, _CHUNK_ROWS):
        searcher.add(_rows_f32(database, s, s + _CHUNK_ROWS))
        if n > 4 * _CHUNK_ROWS:
            logger.info("knn %s: added %d of %d rows", index, min(s + _CHUNK_ROWS, n), n)
    build = time.perf_counter() - tick
    if index == "hnsw":
        searcher.hnsw.efSearch = params["ef_search"]
    sims = np.empty((len(queries), num_candidates), np.float32)
    idx = np.empty((len(queries), num_candidates), np.int64)
    for s in range(0, len(queries), _CHUNK_ROWS):
        sims[s : s + _CHUNK_ROWS], idx[s : s + _CHUNK_ROWS] = searcher.search(
            _rows_f32(queries, s, s + _CHUNK_ROWS), num_candidates
        )
        if len(queries) > 4 * _CHUNK_ROWS:
            logger.info(
                "knn %s: %d of %d queries", index, min(s + _CHUNK_ROWS, len(queries)), len(queries)
            )
    logger.info(
        "knn %s %s: built on %d x %d in %.1fs, searched %d queries in %.1fs",
        index,
        params,
        n,
        dim,
        build,
        len(queries),
        time.perf_counter() - tick - build,
    )
    # Lists shorter than num_candidates (IVF: too few rows in the probed lists) pad with -1.
    short = idx < 0
    if short.any():
        sims[short] = -np.inf
    return sims, idx


def _training_rows(database, nlist):
    """min(N, 64 nlist) evenly spaced rows as float32, the k-means training set: FAISS would
    otherwise sample 256 per list itself, which at 10^6 rows costs more than the search."""
    n = len(database)
    rows = np.linspace(0, n - 1, min(n, 64 * nlist)).astype(np.int64)
    return np.ascontiguousarray(database[rows], dtype=np.float32)


def ivf_centroids(database: np.ndarray, nlist: int) -> np.ndarray:
    """(nlist, D) float32 coarse centroids: FAISS spherical k-means (10 iterations, seed 1234)
    on `_training_rows`, the lists of the CPU IVF search."""
    faiss = _import_faiss()
    kmeans = faiss.Kmeans(
        database.shape[1],
        int(nlist),
        niter=10,
        spherical=True,
        seed=1234,
        max_points_per_centroid=64,
    )
    kmeans.train(_training_rows(database, nlist))
    return kmeans.centroids


def _nearest_lists(array, centroids, num_lists):
    """(len(array), num_lists) int32 ids of the nearest centroids by inner product, read in
    chunks."""
    faiss = _import_faiss()
    out = np.empty((len(array), num_lists), np.int32)
    for s in range(0, len(array), _CHUNK_ROWS):
        _, out[s : s + _CHUNK_ROWS] = faiss.knn(
            _rows_f32(array, s, s + _CHUNK_ROWS),
            centroids,
            num_lists,
            metric=faiss.METRIC_INNER_PRODUCT,
        )
    return out


def _group_by_list(list_ids, nlist):
    """Positions of `list_ids` sorted by list (stable) and the (nlist + 1) list offsets."""
    order = np.argsort(list_ids, kind="stable")
    return order, np.searchsorted(list_ids[order], np.arange(nlist + 1))


def _gather_f32(array, rows, out):
    """array[rows] as float32 into the first len(rows) rows of the reused buffer `out`; reusing
    it avoids faulting in fresh pages for every list."""
    view = out[: len(rows)]
    if array.dtype == np.float32:
        np.take(array, rows, axis=0, out=view)
    else:
        view[...] = np.take(array, rows, axis=0)
    return view


def _blocked_ivf_search(queries, database, num_candidates, params, centroids=None):
    """IVF-Flat search computed list by list with BLAS (the CPU "ivf" index).

    The candidates are those of a FAISS `IndexIVFFlat` with the same centroids and nprobe: every
    query scans the database rows of its `nprobe` nearest lists. FAISS's CPU IVF computes those
    inner products one vector pair at a time (~6 GFLOP/s at D = 2048 on two cores); here the
    search is inverted: for each list, the queries that probe it form one matrix, and one
    `faiss.knn` call (a BLAS matrix product, ~120 GFLOP/s) gives their best rows of the list,
    merged into each query's running top `num_candidates`.
    """
    faiss = _import_faiss()
    nlist, nprobe = params["nlist"], params["nprobe"]
    num_queries, dim = queries.shape
    tick = time.perf_counter()
    if centroids is None:
        centroids = ivf_centroids(database, nlist)
    nlist = len(centroids)
    trained = time.perf_counter()
    probes = _nearest_lists(queries, centroids, nprobe)
    primary = probes[:, 0] if queries is database else _nearest_lists(database, centroids, 1)[:, 0]
    members, member_offsets = _group_by_list(primary, nlist)
    probe_order, probe_offsets = _group_by_list(probes.ravel(), nlist)
    probing_queries = probe_order // nprobe  # ascending within a list: the sort is stable
    del probes, probe_order
    assigned = time.perf_counter()
    sims = np.full((num_queries, num_candidates), -np.inf, np.float32)
    idx = np.full((num_queries, num_candidates), -1, np.int64)
    query_buffer = np.empty((int(np.diff(probe_offsets).max(initial=0)), dim), np.float32)
    list_buffer = np.empty((int(np.diff(member_offsets).max(initial=0)), dim), np.float32)
    report = max(1, nlist // 8)
    for list_id in range(nlist):
        rows = members[member_offsets[list_id] : member_offsets[list_id + 1]]
        asking = probing_queries[probe_offsets[list_id] : probe_offsets[list_id + 1]]
        if len(rows) and len(asking):
            found_sims, found = faiss.knn(
                _gather_f32(queries, asking, query_buffer),
                _gather_f32(database, rows, list_buffer),
                min(num_candidates, len(rows)),
                metric=faiss.METRIC_INNER_PRODUCT,
            )
            both_sims = np.concatenate([sims[asking], found_sims], axis=1)
            both = np.concatenate([idx[asking], rows[found]], axis=1)
            keep = np.argpartition(-both_sims, num_candidates - 1, axis=1)[:, :num_candidates]
            sims[asking] = np.take_along_axis(both_sims, keep, axis=1)
            idx[asking] = np.take_along_axis(both, keep, axis=1)
        if num_queries > 4 * _CHUNK_ROWS and (list_id + 1) % report == 0:
            logger.info("knn ivf: searched %d of %d lists", list_id + 1, nlist)
    logger.info(
        "knn ivf %s: k-means %.1fs, %d queries assigned to lists in %.1fs, searched in %.1fs",
        params,
        trained - tick,
        num_queries,
        assigned - trained,
        time.perf_counter() - assigned,
    )
    return sims, idx


def _default_block_size(num_queries, num_database, memory_budget_bytes):
    # Two (block x N) float32 buffers live at once: the similarities and top_k's work copy.
    rows = max(8, int(memory_budget_bytes) // (8 * max(num_database, 1)))
    rows = min(rows, 8192, num_queries)
    return max(1, rows)


@functools.partial(jax.jit, static_argnames=("k", "self_first"))
def _block_top_k(query_block, database, offset, k, self_first):
    sims = jnp.dot(query_block, database.T, precision=jax.lax.Precision.HIGHEST)
    if self_first:
        rows = offset + jnp.arange(query_block.shape[0])
        is_self = rows[:, None] == jnp.arange(database.shape[0])[None, :]
        sims = jnp.where(is_self, jnp.inf, sims)
    return jax.lax.top_k(sims, k)


def _jax_search(queries, database, num_candidates, self_first, block_size, memory_budget_bytes):
    num_queries = len(queries)
    block = block_size or _default_block_size(num_queries, len(database), memory_budget_bytes)
    block = min(int(block), num_queries)
    database_device = jnp.asarray(database)
    outputs = []
    for start in range(0, num_queries, block):
        # The last block is zero-padded to the same shape: `_block_top_k` compiles once.
        outputs.append(
            _block_top_k(
                _padded_block(queries, start, block),
                database_device,
                jnp.int32(start),
                num_candidates,
                self_first,
            )
        )
    sims = np.concatenate([np.asarray(s) for s, _ in outputs])[:num_queries]
    idx = np.concatenate([np.asarray(i) for _, i in outputs])[:num_queries].astype(np.int64)
    return sims, idx


def _padded_block(array, start, size):
    """array[start:start + size] on the device, zero rows appended up to `size` rows."""
    part = array[start : start + size]
    if len(part) < size:
        part = np.concatenate([part, np.zeros((size - len(part), array.shape[1]), array.dtype)])
    return jnp.asarray(part)


def _merge_top_k(best, candidates, k):
    """Top k of two (B, k) candidate lists; on equal values `best` (earlier blocks) wins."""
    sims = jnp.concatenate([best[0], candidates[0]], axis=1)
    idx = jnp.concatenate([best[1], candidates[1]], axis=1)
    top, pos = jax.lax.top_k(sims, k)
    return top, jnp.take_along_axis(idx, pos, axis=1)


@functools.partial(jax.jit, static_argnames=("k",))
def _pair_top_k(x_i, x_j, best_i, best_j, block_i, block_j, num_valid, k):
    """One similarity block S = X_i X_j^T updates the running top k of both blocks' rows."""
    size = x_i.shape[0]
    rows = block_i * size + jnp.arange(size)
    cols = block_j * size + jnp.arange(size)
    sims = jnp.dot(x_i, x_j.T, precision=jax.lax.Precision.HIGHEST)
    sims = jnp.where(rows[:, None] == cols[None, :], jnp.inf, sims)  # self first
    by_row = jnp.where(cols[None, :] < num_valid, sims, -jnp.inf)
    top, pos = jax.lax.top_k(by_row, k)
    new_i = _merge_top_k(best_i, (top, cols[pos]), k)
    # On the diagonal block the rows above already saw every column.
    by_col = jnp.where((rows[None, :] < num_valid) & (block_i != block_j), sims.T, -jnp.inf)
    top, pos = jax.lax.top_k(by_col, k)
    new_j = _merge_top_k(best_j, (top, rows[pos]), k)
    return new_i, new_j


def _jax_symmetric_search(features, num_candidates, block_size, memory_budget_bytes):
    n, dim = features.shape
    if block_size:
        block = int(block_size)
    else:
        # S, its two masked copies and top_k's work copy: ~4 (block x block) float32 buffers.
        block = min(max(int(np.sqrt(memory_budget_bytes / 16)), 256), 8192)
    # Equal blocks that cover n with little padding (multiples of 8 rows).
    num_blocks = -(-n // max(block, 1))
    rows_per_block = -(-n // num_blocks)
    block = max(-(-rows_per_block // 8) * 8, num_candidates)
    num_blocks = -(-n // block)
    blocks = [_padded_block(features, b * block, block) for b in range(num_blocks)]
    empty = (
        jnp.full((block, num_candidates), -jnp.inf, jnp.float32),
        jnp.full((block, num_candidates), -1, jnp.int32),
    )
    best = [empty] * num_blocks
    # Row block r receives column blocks in increasing order, so ties keep the lower index.
    for i in range(num_blocks):
        for j in range(i, num_blocks):
            new_i, new_j = _pair_top_k(
                blocks[i],
                blocks[j],
                best[i],
                best[j],
                jnp.int32(i),
                jnp.int32(j),
                jnp.int32(n),
                num_candidates,
            )
            best[i] = new_i
            if j != i:
                best[j] = new_j
    sims = np.concatenate([np.asarray(s) for s, _ in best])[:n]
    idx = np.concatenate([np.asarray(i) for _, i in best])[:n].astype(np.int64)
    return sims, idx


def _order_candidates(queries, database, sims, idx, k, self_first, tie_tolerance):
    """Self first, ties by index, near-ties resolved in float64; keeps the first k. Rows are
    independent: done `_CHUNK_ROWS` at a time, so the work copies stay small at 10^6 rows."""
    num_queries = len(idx)
    out_sims = np.empty((num_queries, min(k, idx.shape[1])), np.float32)
    out_idx = np.empty(out_sims.shape, np.int64)
    num_tied = 0
    for s in range(0, num_queries, _CHUNK_ROWS):
        chunk = slice(s, s + _CHUNK_ROWS)  # views: _order_rows makes the one work copy
        out_sims[chunk], out_idx[chunk], tied = _order_rows(
            queries,
            database,
            sims[chunk],
            idx[chunk],
            np.arange(s, min(s + _CHUNK_ROWS, num_queries)),
            k,
            self_first,
            tie_tolerance,
        )
        num_tied += tied
    logger.debug("knn: %d of %d rows with near-ties re-ranked in float64", num_tied, num_queries)
    return out_sims, out_idx


def _order_rows(queries, database, sims, idx, rows, k, self_first, tie_tolerance):
    """`_order_candidates` of the query rows `rows`; also returns how many had near-ties."""
    sims = np.array(sims, dtype=np.float32)
    idx = np.array(idx, dtype=np.int64)
    if self_first:
        is_self = idx == rows[:, None]
        # A point missing from its own candidates (only possible with many duplicates)
        # replaces its last candidate.
        missing = ~is_self.any(axis=1)
        idx[missing, -1] = rows[missing]
        is_self[missing, -1] = True
        sims[is_self] = np.inf
    order = np.lexsort((idx, -sims), axis=1)
    sims = np.take_along_axis(sims, order, axis=1)
    idx = np.take_along_axis(idx, order, axis=1)
    # Near-ties among the first k + 1 candidates decide sets and prefixes: recompute exactly.
    head = sims[:, : k + 1]
    gaps = head[:, :-1] - head[:, 1:]
    tied = np.flatnonzero((gaps <= tie_tolerance).any(axis=1))
    if len(tied):
        exact = _exact_similarities(queries, rows[tied], database, idx[tied])
        if self_first:
            exact[idx[tied] == rows[tied][:, None]] = np.inf
        order = np.lexsort((idx[tied], -exact), axis=1)
        idx[tied] = np.take_along_axis(idx[tied], order, axis=1)
        sims[tied] = np.take_along_axis(exact, order, axis=1).astype(np.float32)
    sims, idx = sims[:, :k], idx[:, :k]
    if self_first:
        sims[:, 0] = _exact_similarities(queries, rows, database, rows[:, None])[:, 0]
    return sims, idx, len(tied)


def _exact_similarities(queries, query_rows, database, idx, max_elements=2**21):
    """float64 <queries[query_rows[r]], database[idx[r, c]]>, in chunks of bounded memory."""
    out = np.empty(idx.shape, np.float64)
    step = max(1, max_elements // (idx.shape[1] * queries.shape[1]))
    for s in range(0, len(idx), step):
        q = queries[query_rows[s : s + step]].astype(np.float64)
        out[s : s + step] = np.einsum(
            "qd,qmd->qm", q, database[idx[s : s + step]].astype(np.float64)
        )
    return out

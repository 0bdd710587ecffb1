"""Query x gallery distance matrices, computed tile by tile in numpy.

numpy (BLAS matmul) rather than jax: evaluation sets are host arrays, the
result (Q, G) is wanted on the host for ranking, and a 20,000 x 20,000 float32
matrix (1.6 GB) would not fit every accelerator next to a model anyway. The
quadratic temporaries live in tiles of at most `max_block_bytes` (whole rows
when a row fits, else column blocks too); besides the (Q, G) float32 output the
only other memory is O((Q + G) * D) for normalised / reordered input copies.
Arithmetic is float32 (float64 when an input is float64); the output is float32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from jaxreid.utils import l2_normalize

DEFAULT_MAX_BLOCK_BYTES = 256 * 2**20


def _compute_dtype(*arrays: np.ndarray) -> np.dtype:
    return np.result_type(*(a.dtype for a in arrays), np.float32)


def _tiles(
    num_rows: int, num_cols: int, bytes_per_element: int, max_block_bytes: int
) -> Iterator[tuple[slice, slice]]:
    """Row/column slices whose temporaries fit in `max_block_bytes`.

    Full-width row blocks when one row fits, else column blocks as well; a
    single element is the smallest tile, whatever the budget.
    """
    budget = max(int(max_block_bytes) // bytes_per_element, 1)  # elements per tile
    cols = min(num_cols, budget) if num_cols else 1
    rows = max(budget // max(cols, 1), 1)
    for r in range(0, num_rows, rows):
        for c in range(0, num_cols, cols):
            yield slice(r, min(r + rows, num_rows)), slice(c, min(c + cols, num_cols))


def _check_pair(q: np.ndarray, g: np.ndarray, ndim: int, what: str) -> None:
    if q.ndim != ndim or g.ndim != ndim:
        raise ValueError(f"{what} must be {ndim}-d, got shapes {q.shape} and {g.shape}")
    if q.shape[1:] != g.shape[1:]:
        raise ValueError(f"{what}: query {q.shape} and gallery {g.shape} differ after axis 0")


def _euclidean_tile(q: np.ndarray, g: np.ndarray, q_sq: np.ndarray, g_sq: np.ndarray) -> np.ndarray:
    """sqrt(max(|q|^2 + |g|^2 - 2 q.g, 0)) with one (rows, cols) temporary."""
    d = q @ g.T
    d *= -2
    d += q_sq[:, None]
    d += g_sq[None, :]
    np.maximum(d, 0, out=d)  # rounding can make near-duplicates slightly negative
    return np.sqrt(d, out=d)


def _blocked(
    num_rows: int,
    num_cols: int,
    temporaries: int,
    itemsize: int,
    max_block_bytes: int,
    tile_fn: Callable[[slice, slice], np.ndarray],
) -> np.ndarray:
    out = np.empty((num_rows, num_cols), np.float32)
    for rows, cols in _tiles(num_rows, num_cols, temporaries * itemsize, max_block_bytes):
        out[rows, cols] = tile_fn(rows, cols)
    return out


def cosine_distance(
    q: np.ndarray, g: np.ndarray, *, max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES
) -> np.ndarray:
    """1 - <q, g> of the L2-normalised features: (Q, D), (G, D) -> (Q, G) float32."""
    q, g = np.asarray(q), np.asarray(g)
    _check_pair(q, g, 2, "features")
    q, g = l2_normalize(q), l2_normalize(g)

    def tile(rows: slice, cols: slice) -> np.ndarray:
        d = q[rows] @ g[cols].T
        return np.subtract(1, d, out=d)

    return _blocked(len(q), len(g), 1, _compute_dtype(q, g).itemsize, max_block_bytes, tile)


def euclidean_distance(
    q: np.ndarray, g: np.ndarray, *, max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES
) -> np.ndarray:
    """||q - g|| (not squared) of the features as given: -> (Q, G) float32."""
    q, g = np.asarray(q), np.asarray(g)
    _check_pair(q, g, 2, "features")
    dtype = _compute_dtype(q, g)
    q, g = q.astype(dtype, copy=False), g.astype(dtype, copy=False)
    q_sq, g_sq = np.einsum("nd,nd->n", q, q), np.einsum("nd,nd->n", g, g)

    def tile(rows: slice, cols: slice) -> np.ndarray:
        return _euclidean_tile(q[rows], g[cols], q_sq[rows], g_sq[cols])

    return _blocked(len(q), len(g), 1, dtype.itemsize, max_block_bytes, tile)


def scl_distance(
    q_global: np.ndarray,
    g_global: np.ndarray,
    q_stripes: np.ndarray,
    g_stripes: np.ndarray,
    q_cams: np.ndarray,
    g_cams: np.ndarray,
    lam_g: float = 0.5,
    lam_c: float = 0.05,
    *,
    max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
) -> np.ndarray:
    """The SCL test distance (scl-method.md, Evaluation), features as given.

        lam_g * cdist(global) + (1 - lam_g) * mean_p cdist(stripe p)
        + lam_c * [same camera]

    cdist is the Euclidean (not squared) distance. Globals are (N, D), stripes
    (N, P, D/P), cameras (N,) integers; the features are used as given (the
    model outputs them L2-normalised). Returns (Q, G) float32.
    """
    qg, gg = np.asarray(q_global), np.asarray(g_global)
    qs, gs = np.asarray(q_stripes), np.asarray(g_stripes)
    qc, gc = np.asarray(q_cams).reshape(-1), np.asarray(g_cams).reshape(-1)
    _check_pair(qg, gg, 2, "global features")
    _check_pair(qs, gs, 3, "stripe features")
    if not len(qg) == len(qs) == len(qc) or not len(gg) == len(gs) == len(gc):
        raise ValueError(
            "global features, stripes and cameras must have the same length: "
            f"query {len(qg)}/{len(qs)}/{len(qc)}, gallery {len(gg)}/{len(gs)}/{len(gc)}"
        )
    dtype = _compute_dtype(qg, gg, qs, gs)
    qg, gg = qg.astype(dtype, copy=False), gg.astype(dtype, copy=False)
    # (P, N, D/P) contiguous per stripe, so each stripe's tile is a plain matmul.
    qs = np.ascontiguousarray(qs.transpose(1, 0, 2), dtype=dtype)
    gs = np.ascontiguousarray(gs.transpose(1, 0, 2), dtype=dtype)
    num_stripes = qs.shape[0]
    qg_sq, gg_sq = np.einsum("nd,nd->n", qg, qg), np.einsum("nd,nd->n", gg, gg)
    qs_sq, gs_sq = np.einsum("pnd,pnd->pn", qs, qs), np.einsum("pnd,pnd->pn", gs, gs)
    stripe_weight = (1.0 - lam_g) / max(num_stripes, 1)

    def tile(rows: slice, cols: slice) -> np.ndarray:
        acc = _euclidean_tile(qg[rows], gg[cols], qg_sq[rows], gg_sq[cols])
        acc *= lam_g
        for p in range(num_stripes):
            d = _euclidean_tile(qs[p, rows], gs[p, cols], qs_sq[p, rows], gs_sq[p, cols])
            d *= stripe_weight
            acc += d
        acc += lam_c * (qc[rows, None] == gc[None, cols])
        return acc

    # Temporaries per element: accumulator, one stripe tile, the camera mask.
    return _blocked(len(qg), len(gg), 3, dtype.itemsize, max_block_bytes, tile)

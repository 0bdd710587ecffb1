"""SCL selection of positives and negatives against the banks, on the device.

For sample i of the batch and every bank row j (scl-method.md):

    d_ij = lam_g * ||g_i - G_j||^2
         + (1 - lam_g) * (1/P) * sum_p ||l_ip - L_pj||^2
         + lam_c * [c_i == c_j]

Rows sorted by ascending d_ij with j = i dropped give the candidate list
[i ; k positives ; n negatives] that the loss consumes.

No N x N matrix is ever formed: the batch (B rows) is compared with all N
bank rows, in one (B, N) matmul while B * N is moderate, else block by block
(`block_size` rows) under `lax.scan` with a running best k + n per sample, so
extra memory is O(B * P * block_size) (plus a copy of the block's rows)
whatever N is (N = 1,000,000 in the benchmark).
Squared distances use |a|^2 + |b|^2 - 2 a.b with the bank's row norms
computed on the fly, so nothing assumes unit-norm rows, or, with
`unit_rows=True`, taken as 1 for G and P for L (unit per stripe).

Ties are broken towards the lower bank index (as a stable argsort), on both
the blocked and the one-shot path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxreid.methods.scl.banks import SCLBanks

# block_size=None: one pass over the whole bank while the largest intermediate,
# the (P, R, B) per-stripe dot products, has at most this many entries (64 MiB
# in float32), blocks of that size beyond. On a CPU one pass is the fastest
# (slicing a block copies it); blocks bound memory at large B * P * N.
MAX_DISTANCES_PER_BLOCK = 1 << 24


def _block_distances(
    g: jax.Array,
    l: jax.Array,  # noqa: E741 -- the spec's name for the local features
    batch_indices: jax.Array,
    batch_cams: jax.Array,
    global_rows: jax.Array,
    local_rows: jax.Array,
    cam_rows: jax.Array,
    row_ids: jax.Array,
    lam_g: float,
    lam_c: float,
    unit_rows: bool,
) -> tuple[jax.Array, jax.Array]:
    """(B, R) d_ij of the batch against R bank rows, self at +inf, and the
    (B, R) mask of rows from the sample's own camera."""
    num_stripes = local_rows.shape[0]
    g_sq = jnp.sum(g * g, axis=-1)[:, None]
    l_sq = jnp.sum(l * l, axis=(1, 2))[:, None]
    if unit_rows:
        bank_g_sq, bank_l_sq = 1.0, float(num_stripes)
    else:  # one more pass over both banks (~25% of the selection time on a CPU)
        bank_g_sq = jnp.sum(global_rows * global_rows, axis=-1)[None, :]
        bank_l_sq = jnp.sum(local_rows * local_rows, axis=(0, 2))[None, :]
    d_global = g_sq + bank_g_sq - 2.0 * (g @ global_rows.T)
    # A dot batched over stripes, then summed: on CPU ~4x faster than contracting
    # (p, d) in one einsum, which makes XLA transpose the bank block first.
    local_dots = jnp.einsum("prd,pbd->prb", local_rows, jnp.transpose(l, (1, 0, 2)))
    d_local = l_sq + bank_l_sq - 2.0 * jnp.sum(local_dots, axis=0).T
    dist = lam_g * d_global + (1.0 - lam_g) / num_stripes * d_local
    same_camera = batch_cams[:, None] == cam_rows[None, :]
    dist = dist + lam_c * same_camera.astype(dist.dtype)
    return jnp.where(row_ids[None, :] == batch_indices[:, None], jnp.inf, dist), same_camera


def _smallest(dist: jax.Array, count: int, use_approx: bool, recall_target: float):
    """(values, positions) of the `count` smallest entries per row, ascending."""
    if use_approx:
        vals, pos = jax.lax.approx_min_k(dist, count, recall_target=recall_target)
        # approx_min_k does not promise an order; sort the few survivors.
        order = jnp.argsort(vals, axis=-1, stable=True)
        return jnp.take_along_axis(vals, order, -1), jnp.take_along_axis(pos, order, -1)
    neg_vals, pos = jax.lax.top_k(-dist, count)
    return -neg_vals, pos


def _nearest(
    distances,
    banks: SCLBanks,
    b: int,
    block_size: int,
    use_approx: bool,
    recall_target: float,
    dtype,
    rankings: tuple[tuple[int, bool], ...],
) -> list[tuple[jax.Array, jax.Array]]:
    """For each (count, own_camera) of `rankings`: the (B, count) smallest d_ij
    and their bank rows, ascending, over all rows or (own_camera) the rows of
    the sample's camera. One distance pass over the bank serves all rankings."""

    def ranked(dist, same_camera):
        return [
            _smallest(
                jnp.where(same_camera, dist, jnp.inf) if own_camera else dist,
                count,
                use_approx,
                recall_target,
            )
            for count, own_camera in rankings
        ]

    num_rows = banks.global_bank.shape[0]
    if block_size >= num_rows:
        row_ids = jnp.arange(num_rows, dtype=jnp.int32)
        dist, same_camera = distances(banks.global_bank, banks.local_bank, banks.cameras, row_ids)
        return [(vals, idx.astype(jnp.int32)) for vals, idx in ranked(dist, same_camera)]
    block = max(int(block_size), *(count for count, _ in rankings))
    num_blocks = -(-num_rows // block)
    # The last block is shifted back to end at N (no padding copy of the bank);
    # the rows it shares with the previous block are masked out.
    starts = jnp.minimum(jnp.arange(num_blocks, dtype=jnp.int32) * block, num_rows - block)

    def scan_block(carry, xs):
        b_id, start = xs
        global_rows = jax.lax.dynamic_slice_in_dim(banks.global_bank, start, block, 0)
        local_rows = jax.lax.dynamic_slice_in_dim(banks.local_bank, start, block, 1)
        cam_rows = jax.lax.dynamic_slice_in_dim(banks.cameras, start, block, 0)
        row_ids = start + jnp.arange(block, dtype=jnp.int32)
        dist, same_camera = distances(global_rows, local_rows, cam_rows, row_ids)
        dist = jnp.where(row_ids[None, :] < b_id * block, jnp.inf, dist)
        merged = []
        for (best_vals, best_idx), (vals, pos) in zip(
            carry, ranked(dist, same_camera), strict=True
        ):
            # Running best first, so equal distances keep the lower (earlier) index.
            all_vals = jnp.concatenate([best_vals, vals], axis=1)
            all_idx = jnp.concatenate([best_idx, start + pos.astype(jnp.int32)], axis=1)
            neg_vals, keep = jax.lax.top_k(-all_vals, best_vals.shape[1])
            merged.append((-neg_vals, jnp.take_along_axis(all_idx, keep, axis=1)))
        return merged, None

    init = [
        (jnp.full((b, count), jnp.inf, dtype), jnp.full((b, count), -1, jnp.int32))
        for count, _ in rankings
    ]
    block_ids = jnp.arange(num_blocks, dtype=jnp.int32)
    best, _ = jax.lax.scan(scan_block, init, (block_ids, starts))
    return best


def select_candidates(
    g: jax.Array,
    l: jax.Array,  # noqa: E741
    batch_indices: jax.Array,
    batch_cams: jax.Array,
    banks: SCLBanks,
    k: int = 7,
    n: int = 500,
    lam_g: float = 0.5,
    lam_c: float = 0.05,
    block_size: int | None = None,
    use_approx: bool = False,
    recall_target: float = 0.95,
    return_distances: bool = False,
    unit_rows: bool = False,
    own_camera_negatives: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Candidate list [self ; k nearest ; next n] of every batch sample.

    Args:
      g: (B, D) global features of the batch.
      l: (B, P, D/P) stripe features of the batch.
      batch_indices: (B,) bank row of every sample (excluded from its own ranking).
      batch_cams: (B,) camera of every sample.
      banks: SCLBanks (uses G, L and cameras).
      k, n: numbers of positives and negatives (static).
      lam_g, lam_c: distance weights (may be traced).
      block_size: bank rows compared per scan step (static); >= N gives one
        (B, N) distance matrix; None (default) picks one pass while B * P * N
        <= MAX_DISTANCES_PER_BLOCK (N = 262,144 at B = P = 8) and blocks of
        that many entries beyond. Raised to k + n if smaller.
      use_approx: use `lax.approx_min_k` per block (TPU-friendly) instead of
        exact `lax.top_k`; the merge across blocks stays exact.
      recall_target: recall of `approx_min_k`.
      return_distances: also return the (B, k + n) d_ij of columns 1..
      unit_rows: take |G_j| = 1 and |L_pj| = 1 instead of computing the bank's
        row norms (saves a pass over both banks). True for banks made by
        `init_banks` from the model's normalised outputs and kept by the
        update rule, which normalises every row it writes.
      own_camera_negatives: the k positives from all rows, the n negatives the
        nearest rows of the sample's own camera that are not positives; where
        the camera has fewer, the missing columns are -1 (absent: the loss
        leaves them out).

    Returns:
      candidates (B, 1 + k + n) int32: column 0 = batch_indices, then bank rows
      by ascending d_ij. With return_distances, (candidates, distances).
    """
    num_rows = banks.global_bank.shape[0]
    count = k + n
    if count > num_rows - 1:
        raise ValueError(f"k + n = {count} candidates need more than {num_rows - 1} other rows")
    dtype = banks.global_bank.dtype
    # Selection is never trained through (the candidates are integers anyway).
    g = jax.lax.stop_gradient(jnp.asarray(g, dtype))
    l = jax.lax.stop_gradient(jnp.asarray(l, dtype))  # noqa: E741
    batch_indices = jnp.asarray(batch_indices, jnp.int32)
    batch_cams = jnp.asarray(batch_cams, jnp.int32)
    b = g.shape[0]
    distances = functools.partial(
        _block_distances,
        g,
        l,
        batch_indices,
        batch_cams,
        lam_g=lam_g,
        lam_c=lam_c,
        unit_rows=unit_rows,
    )

    if block_size is None:
        block_size = max(MAX_DISTANCES_PER_BLOCK // (b * banks.local_bank.shape[0]), 1)
    nearest = functools.partial(
        _nearest, distances, banks, b, block_size, use_approx, recall_target, dtype
    )
    if not own_camera_negatives:
        [(best_vals, best_idx)] = nearest(((count, False),))
    else:
        # At most k of the k + n nearest own-camera rows are positives: dropping
        # them leaves the n nearest own-camera non-positives.
        (pos_vals, pos_idx), (neg_vals, neg_idx) = nearest(((k, False), (count, True)))
        is_positive = jnp.any(neg_idx[:, :, None] == pos_idx[:, None, :], axis=-1)
        neg_vals = jnp.where(is_positive, jnp.inf, neg_vals)
        order = jnp.argsort(neg_vals, axis=-1, stable=True)[:, :n]
        neg_vals = jnp.take_along_axis(neg_vals, order, -1)
        # A camera with fewer than n other non-positive rows: the rest are absent.
        neg_idx = jnp.where(jnp.isinf(neg_vals), -1, jnp.take_along_axis(neg_idx, order, -1))
        best_vals = jnp.concatenate([pos_vals, neg_vals], 1)
        best_idx = jnp.concatenate([pos_idx, neg_idx], 1)

    candidates = jnp.concatenate([batch_indices[:, None], best_idx], axis=1)
    if return_distances:
        return candidates, best_vals
    return candidates


def random_candidates(
    rng: jax.Array,
    batch_indices: jax.Array,
    num_rows: int,
    k: int = 7,
    n: int = 500,
    replace: bool = True,
) -> jax.Array:
    """Warm-up candidates: [self ; k + n rows drawn uniformly from j != i].

    Args:
      rng: PRNG key.
      batch_indices: (B,) bank rows of the batch.
      num_rows: N (static).
      k, n: the list has the same 1 + k + n columns as `select_candidates`, so
        the compiled step keeps one shape across warm-up and later epochs.
      replace: True (default) draws with replacement: O(B (k + n)) work at any
        N; a negative may repeat (expected ~(k+n)^2 / 2N repeats per row, ~10
        of 507 at N = 12,936). False draws a uniform subset without
        replacement (top-(k+n) of B x N random keys: O(B N) work and memory).

    Returns:
      (B, 1 + k + n) int32, never i in columns 1.., all in [0, N).
    """
    count = k + n
    batch_indices = jnp.asarray(batch_indices, jnp.int32)
    b = batch_indices.shape[0]
    if count > num_rows - 1:
        raise ValueError(f"k + n = {count} candidates need more than {num_rows - 1} other rows")
    if replace:
        # Uniform over the N - 1 rows j != i: draw in [0, N-1) and skip over i.
        draws = jax.random.randint(rng, (b, count), 0, num_rows - 1, dtype=jnp.int32)
        others = draws + (draws >= batch_indices[:, None]).astype(jnp.int32)
    else:
        keys = jax.random.uniform(rng, (b, num_rows))
        self_mask = jnp.arange(num_rows, dtype=jnp.int32)[None, :] == batch_indices[:, None]
        _, others = jax.lax.top_k(jnp.where(self_mask, -1.0, keys), count)
        others = others.astype(jnp.int32)
    return jnp.concatenate([batch_indices[:, None], others], axis=1)

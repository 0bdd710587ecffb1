"""SCL memory banks (global, local, mixture) and their pure update functions.

The three banks of scl-method.md live in one pytree, `SCLBanks`, that the
compiled train step carries and returns. Every update is a function
`old banks -> new banks`; nothing is mutated in place (under `jax.jit` with the
banks donated XLA still writes the touched rows in place).

All updates share one rule, applied to one bank row `m` and one feature `x`:

    m <- normalize((m + x) / 2)        (normalize(v) = v / max(|v|, 1e-12))

The epsilon guard keeps a zero row (the mixture bank starts at zeros) and a
zero feature NaN-free: (0 + x)/2 normalised is x/|x|, and 0 stays 0.

Order of updates (the ambiguous part of the spec, made precise here)
--------------------------------------------------------------------
A list of (row, x) updates is applied one after the other in list order, so a
row hit several times is chained: the second update sees the first's result.

* Feature banks: update u = batch position i (local: per stripe p, in batch
  order). The loader never repeats an index within a batch; if it does, the
  occurrences are chained in batch order (not "last write wins").
* Mixture bank, `order="global_then_local"` (default, the clean variant):
  first a whole-batch pass with x = g_i -- for i in batch order, for each
  positive j of i (i itself first) -- then a second whole-batch pass with
  x = concat_p(l_ip) in the same (i, j) order: each branch's update one pass
  over the batch after that branch's loss, global branch first, as
  memory-bank code usually does (an earlier spec said so; the release does
  otherwise, see `order="release"`).
  `order="per_sample"` is the other reading: for i in batch order, all of i's
  positives with g_i, then all of i's positives with concat_p(l_ip).
* `order="release"`: what the authors' release does (scl-method.md, corrected):
  the local branch first, candidate columns k, k-1, ..., 0, each column in
  batch order, then the global branch the same way (jaxreid.methods.scl.release).

Modes
-----
* `"sequential"`: the literal list, one update per `lax.fori_loop` iteration.
  The reference and the training default (`method.mixture_update`); cost
  grows with the number of updates (2 B (k+1) for M).
* `"vectorized"`: exact as well, not an approximation. Updates to
  different rows commute, so only the order *within* a row matters. Each
  update gets its occurrence rank within its row (stable sort), and round r
  applies every update of rank r with one gather + one scatter (its rows are
  distinct by construction). The number of rounds is the largest number of
  hits on one row (>= 2 for the mixture bank: every positive is hit by g and
  by l), usually a handful, instead of 2 B (k+1) loop iterations. It performs
  the same arithmetic per row as "sequential", so results agree to float
  rounding (tests check 1e-6).

Both modes chain the touched rows in a small (U, D) workspace and write them
back with one scatter, so the (N, D) banks are never carried by a loop (which
would make XLA copy them).

A negative row index means "no update" (used for the warm-up, where the only
positive of i is i itself).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxreid.utils import l2_normalize

_EPS = 1e-12
_MODES = ("sequential", "vectorized")
_ORDERS = ("global_then_local", "per_sample", "release")


@struct.dataclass
class SCLBanks:
    """The SCL state that is never trained by gradient.

    global_bank:  (N, D)      G, unit rows, used for selection.
    local_bank:   (P, N, D/P) L, unit rows per stripe, used for selection.
    mixture_bank: (N, D)      M, global and concatenated-local features mixed
                              in the same rows: the "classifier" of the loss.
    cameras:      (N,) int32  camera id of every training image (free metadata).
    """

    global_bank: jax.Array
    local_bank: jax.Array
    mixture_bank: jax.Array
    cameras: jax.Array

    @property
    def num_rows(self) -> int:
        return self.global_bank.shape[0]


def init_banks(
    global_features: jax.Array,
    local_features: jax.Array,
    cameras: jax.Array,
    dtype: jnp.dtype = jnp.float32,
    mixture_init: str = "zeros",
) -> SCLBanks:
    """Banks from a forward pass of the initial model over the whole train set.

    Args:
      global_features: (N, D) the model's "global" output (already unit-norm).
      local_features: (N, P, D/P) the model's "stripes" output (unit per stripe).
      cameras: (N,) camera ids.
      dtype: bank dtype.
      mixture_init: "zeros" (M at zeros, as the released code) or "features":
        M[i] = normalize(g_i + concat_p(l_ip) / sqrt(P)), what one update of an
        empty row with the sample's own features gives (local, then global).

    Returns:
      SCLBanks with G and L set to the features as given and M as `mixture_init` says.
    """
    global_features = jnp.asarray(global_features, dtype)
    local_features = jnp.asarray(local_features, dtype)
    n, d = global_features.shape
    if local_features.ndim != 3 or local_features.shape[0] != n:
        raise ValueError(f"local features must be (N={n}, P, D/P), got {local_features.shape}")
    _, p, dp = local_features.shape
    if p * dp != d:
        # M stores both kinds of vector in the same rows, so their sizes must agree.
        raise ValueError(f"P * D/P = {p * dp} must equal the global dimension D = {d}")
    cameras = jnp.asarray(cameras, jnp.int32)
    if cameras.shape != (n,):
        raise ValueError(f"cameras must be ({n},), got {cameras.shape}")
    if mixture_init == "zeros":
        mixture = jnp.zeros((n, d), dtype)
    elif mixture_init == "features":
        concat = local_features.reshape(n, d).astype(jnp.float32) / jnp.sqrt(p)
        mixture = l2_normalize(global_features.astype(jnp.float32) + concat).astype(dtype)
    else:
        raise ValueError(f"mixture_init must be 'zeros' or 'features', got {mixture_init!r}")
    return SCLBanks(
        global_bank=global_features,
        local_bank=jnp.transpose(local_features, (1, 0, 2)),
        mixture_bank=mixture,
        cameras=cameras,
    )


def _blend_normalize(m: jax.Array, x: jax.Array) -> jax.Array:
    """normalize((m + x) / 2) along the last axis; zero stays zero (no NaN)."""
    v = 0.5 * (m + x)
    sq = jnp.sum(v * v, axis=-1, keepdims=True)
    return v * jax.lax.rsqrt(jnp.maximum(sq, _EPS * _EPS))


def _row_segments(rows: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
    """Per update: a slot shared by all updates of its row, and its occurrence rank.

    rank[u] = how many earlier updates hit the same row (-1 for skipped updates);
    slots are 0..(number of distinct rows - 1).
    """
    valid = rows >= 0
    key = jnp.where(valid, rows, num_rows)
    perm = jnp.argsort(key, stable=True)  # stable: equal rows keep list order
    sorted_key = key[perm]
    pos = jnp.arange(rows.shape[0], dtype=jnp.int32)
    is_start = jnp.concatenate([jnp.ones((1,), bool), sorted_key[1:] != sorted_key[:-1]])
    segment_start = jax.lax.cummax(jnp.where(is_start, pos, 0))
    slot = jnp.zeros_like(pos).at[perm].set(jnp.cumsum(is_start, dtype=jnp.int32) - 1)
    rank = jnp.zeros_like(pos).at[perm].set(pos - segment_start)
    return slot, jnp.where(valid, rank, -1)


def apply_row_updates(
    bank: jax.Array, rows: jax.Array, xs: jax.Array, mode: str = "vectorized"
) -> jax.Array:
    """bank[rows[u]] <- normalize((bank[rows[u]] + xs[u]) / 2) for u in list order.

    The touched rows are copied into a (U, D) workspace, chained there, and
    written back with one scatter: loops never carry the (N, D) bank, so under
    jit with the bank donated XLA updates it in place instead of copying it.

    Args:
      bank: (R, D) rows to update.
      rows: (U,) int row per update; negative = skip.
      xs: (U, D) features.
      mode: "sequential" or "vectorized" (both exact, see module docstring).

    Returns:
      The new (R, D) bank.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    bank = jnp.asarray(bank)
    num_rows, num_updates = bank.shape[0], rows.shape[0]
    rows = jnp.asarray(rows, jnp.int32)
    xs = jax.lax.stop_gradient(jnp.asarray(xs, bank.dtype))
    slot, rank = _row_segments(rows, num_rows)
    valid = rank >= 0
    # Every update of a row writes the same old value into the row's slot.
    work = jnp.zeros((num_updates, bank.shape[1]), bank.dtype)
    work = work.at[slot].set(bank[jnp.clip(rows, 0, num_rows - 1)])

    if mode == "sequential":

        def body(u, work):
            old = jax.lax.dynamic_slice_in_dim(work, slot[u], 1, axis=0)
            new = jnp.where(valid[u], _blend_normalize(old, xs[u][None]), old)
            return jax.lax.dynamic_update_slice_in_dim(work, new, slot[u], axis=0)

        work = jax.lax.fori_loop(0, num_updates, body, work)
    else:
        num_rounds = jnp.max(rank, initial=-1) + 1

        def round_body(carry):
            r, work = carry
            # The slots of one round are distinct; the others go out of range and drop.
            target = jnp.where(rank == r, slot, num_updates)
            new = _blend_normalize(work[slot], xs)
            return r + 1, work.at[target].set(new, mode="drop")

        _, work = jax.lax.while_loop(
            lambda carry: carry[0] < num_rounds, round_body, (jnp.int32(0), work)
        )
    # One writer per touched row (its first update), skipped updates dropped.
    target = jnp.where(rank == 0, rows, num_rows)
    return bank.at[target].set(work[slot], mode="drop")


def update_feature_banks(
    banks: SCLBanks,
    indices: jax.Array,
    g: jax.Array,
    l: jax.Array,  # noqa: E741 -- the spec's name for the local features
    mode: str = "vectorized",
) -> SCLBanks:
    """G[i] <- normalize(0.5 G[i] + 0.5 g_i); L[p, i] likewise per stripe.

    Args:
      banks: current banks.
      indices: (B,) int bank row of every batch sample (negative = skip).
      g: (B, D) global features.
      l: (B, P, D/P) local (stripe) features.
      mode: see `apply_row_updates`. Repeated indices are chained in batch order.

    Returns:
      Banks with new G and L (M and cameras unchanged).
    """
    indices = jnp.asarray(indices, jnp.int32)
    new_global = apply_row_updates(banks.global_bank, indices, g, mode)

    p, n, dp = banks.local_bank.shape
    b = indices.shape[0]
    # One flat (P*N, D/P) table: stripe p of image i is row p*N + i.
    stripe_rows = jnp.arange(p, dtype=jnp.int32)[:, None] * n + indices[None, :]
    stripe_rows = jnp.where(indices[None, :] >= 0, stripe_rows, -1).reshape(p * b)
    stripe_feats = jnp.transpose(l, (1, 0, 2)).reshape(p * b, dp)
    new_local = apply_row_updates(
        banks.local_bank.reshape(p * n, dp), stripe_rows, stripe_feats, mode
    ).reshape(p, n, dp)
    return banks.replace(global_bank=new_global, local_bank=new_local)


def mixture_update_list(
    positives: jax.Array,
    g: jax.Array,
    l_concat: jax.Array,
    order: str = "global_then_local",
) -> tuple[jax.Array, jax.Array]:
    """The mixture bank's (rows, xs) update list in the defined order (module docstring)."""
    if order not in _ORDERS:
        raise ValueError(f"order must be one of {_ORDERS}, got {order!r}")
    b, kp1 = positives.shape
    d = g.shape[-1]
    feats = jnp.stack([g, l_concat], axis=0)  # (2, B, D)
    if order == "global_then_local":
        rows = jnp.broadcast_to(positives[None], (2, b, kp1))
        xs = jnp.broadcast_to(feats[:, :, None, :], (2, b, kp1, d))
    elif order == "release":
        # (local, global) x columns k..0 x batch: the release's backward calls
        # (newest first), each updating its column in batch order.
        rows = jnp.broadcast_to(positives.T[None, ::-1], (2, kp1, b))
        xs = jnp.broadcast_to(feats[::-1, None, :, :], (2, kp1, b, d))
    else:  # per_sample: (B, 2, k+1)
        rows = jnp.broadcast_to(positives[:, None], (b, 2, kp1))
        xs = jnp.broadcast_to(jnp.swapaxes(feats, 0, 1)[:, :, None, :], (b, 2, kp1, d))
    return rows.reshape(-1), xs.reshape(-1, d)


def update_mixture_bank(
    mixture: jax.Array,
    positives: jax.Array,
    g: jax.Array,
    l_concat: jax.Array,
    mode: str = "vectorized",
    order: str = "global_then_local",
) -> jax.Array:
    """M[j] <- normalize((M[j] + x)/2) for every positive j of every sample i.

    Args:
      mixture: (N, D) mixture bank.
      positives: (B, k+1) int, column 0 the sample itself; negative = skip.
      g: (B, D) global features.
      l_concat: (B, D) concatenated stripe features (norm sqrt(P)).
      mode: "vectorized" (default) or "sequential"; both exact (module docstring).
      order: "global_then_local" (default), "per_sample" or "release" (module
        docstring).

    Returns:
      The new (N, D) mixture bank.
    """
    rows, xs = mixture_update_list(
        jnp.asarray(positives, jnp.int32), jnp.asarray(g), jnp.asarray(l_concat), order
    )
    return apply_row_updates(mixture, rows, xs, mode)


def update_banks(
    banks: SCLBanks,
    indices: jax.Array,
    g: jax.Array,
    l: jax.Array,  # noqa: E741
    candidates: jax.Array,
    k: int,
    warmup: bool | jax.Array = False,
    mode: str = "vectorized",
    order: str = "global_then_local",
) -> SCLBanks:
    """All bank updates after a step: G, L, then M with the step's positives.

    Args:
      banks: current banks.
      indices: (B,) bank rows of the batch.
      g: (B, D) global features; l: (B, P, D/P) stripe features.
      candidates: (B, 1 + k + n) from selection (column 0 = the sample itself).
      k: number of positives besides the sample itself.
      warmup: during warm-up the only positive is the sample itself (the
        other columns are random negatives); a Python or traced bool.
      mode, order: see `update_mixture_bank`.

    A negative index skips every write of its sample (the train step passes
    -1 for all when the loss is not finite). The step also makes the writes
    wait for the gradients (the loss reads M in its backward pass), so that
    XLA updates the donated banks in place (jaxreid.step.computed_after).
    """
    indices = jnp.asarray(indices, jnp.int32)
    positives = jnp.asarray(candidates[:, : k + 1], jnp.int32)
    not_self = jnp.arange(k + 1)[None, :] > 0
    skip = jnp.logical_or(jnp.logical_and(warmup, not_self), (indices < 0)[:, None])
    positives = jnp.where(skip, -1, positives)
    banks = update_feature_banks(banks, indices, g, l, mode)
    b = g.shape[0]
    mixture = update_mixture_bank(banks.mixture_bank, positives, g, l.reshape(b, -1), mode, order)
    return banks.replace(mixture_bank=mixture)

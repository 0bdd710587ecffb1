"""What the authors' release does where it differs from the clean definition
(scl-method.md, "The three memory banks" and "Warm-up").

The release's loss is one autograd call per (branch, candidate column a); its
backward pass runs the calls newest first -- the local branch, columns
a = k, ..., 0, then the global branch, columns k, ..., 0 -- and each call
(1) computes its gradient contribution from the mixture bank M as the calls
before it left it, then (2) moves M[cand[i, a]] towards the branch's feature
of sample i, for i in batch order. So:

* `release_gradient_loss`: the loss value of the clean definition (every
  forward call reads the step's initial M) with the release's gradient
  (a `jax.custom_vjp` replaying the calls in that order);
* banks.mixture_update_list(order="release"): the same updates in the same
  order, so M after the step is the release's;
* `release_warmup_candidates`: one shuffle of all rows per batch, the
  position (not the value) i removed, so i can be among its own negatives;
* `capped_negatives`: n capped at N - k - 1 as the release does.

Within a batch-norm group the gradient replays the group's calls; with the
paper's configuration (batch 8, one group) that is the release's batch.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from jaxreid.methods.scl.banks import _blend_normalize, _row_segments
from jaxreid.methods.scl.loss import candidate_weights, scl_loss


def capped_negatives(n: int, k: int, num_rows: int) -> int:
    """The release's n: at most N - k - 1 (a warning when that caps it)."""
    capped = min(n, num_rows - k - 1)
    if capped < n:
        logging.getLogger("jaxreid").warning(
            "method.n = %d negatives, but %d bank rows leave only %d: n capped at %d "
            "(as the release does)",
            n,
            num_rows,
            capped,
            capped,
        )
    return capped


def release_warmup_candidates(
    rng: jax.Array, batch_indices: jax.Array, num_rows: int, k: int, n: int
) -> jax.Array:
    """(B, 1 + k + n) warm-up candidates as the release draws them: one
    permutation of all N rows shared by the batch; row i takes its first
    k + n entries after deleting the entry at POSITION i (so the value i may
    remain, and rows of a batch share most negatives). No replacement."""
    count = k + n
    if count > num_rows - 1:
        raise ValueError(f"k + n = {count} candidates need more than {num_rows - 1} other rows")
    batch_indices = jnp.asarray(batch_indices, jnp.int32)
    order = jax.random.permutation(rng, num_rows).astype(jnp.int32)
    positions = jnp.arange(count, dtype=jnp.int32)[None, :]
    taken = positions + (positions >= batch_indices[:, None]).astype(jnp.int32)
    return jnp.concatenate([batch_indices[:, None], order[taken]], axis=1)


def _call_order(k: int, warmup: bool) -> list[tuple[int, int]]:
    """(branch, column) of the release's backward calls; branch 1 = local, 0 = global."""
    columns = [0] if warmup else list(range(k + 1))
    return [(1, a) for a in reversed(columns)] + [(0, a) for a in reversed(columns)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def release_gradient_loss(
    g: jax.Array,
    l_concat: jax.Array,
    mixture_bank: jax.Array,
    candidates: jax.Array,
    k: int,
    lam_t: float,
    lam_p: float,
    alpha: float,
    temperature: float,
    warmup: bool,
) -> jax.Array:
    """The SCL loss (loss.scl_loss's value) whose gradient with respect to
    g and l_concat is the release's (module docstring). No gradient reaches
    the bank or the candidates."""
    return scl_loss(
        g, l_concat, mixture_bank, candidates, k, lam_t, lam_p, alpha, temperature, warmup
    )


def _forward(g, l_concat, mixture_bank, candidates, k, lam_t, lam_p, alpha, temperature, warmup):
    value = release_gradient_loss(
        g, l_concat, mixture_bank, candidates, k, lam_t, lam_p, alpha, temperature, warmup
    )
    return value, (g, l_concat, mixture_bank, candidates)


def _backward(k, lam_t, lam_p, alpha, temperature, warmup, residuals, cotangent):
    g, l_concat, bank, candidates = residuals
    bank = jax.lax.stop_gradient(bank)
    candidates = jnp.asarray(candidates, jnp.int32)
    b, c = candidates.shape
    x = jnp.stack([g, l_concat]).astype(bank.dtype)  # (2, B, D): global, local
    scale = 1.0 / temperature
    gathered = bank[jnp.maximum(candidates, 0)]  # (B, C, D): the initial M every call read
    # -1: an absent negative (own-camera selection), out of the softmax.
    present = (candidates >= 0)[None]
    probs = jax.nn.softmax(scale * jnp.einsum("sbd,bcd->sbc", x, gathered), axis=-1, where=present)
    weights = candidate_weights(c, k, lam_t, alpha, warmup)
    branch_weight = jnp.asarray([1.0 - lam_p, lam_p], bank.dtype)

    # Only the positive columns' rows change: chain their updates in a small
    # (S, D) workspace, one slot per distinct row. A call's gradient is then
    # (its d logits) . M0[cand] -- summed over all calls at the end -- plus,
    # for the candidate entries whose row has moved, the change of that row.
    columns = 1 if warmup else k + 1
    written = candidates[:, :columns].reshape(-1)
    num_slots = written.shape[0]
    slot, _ = _row_segments(written, bank.shape[0])
    slot_row = jnp.full((num_slots,), -1, jnp.int32).at[slot].set(written)
    base = jnp.zeros((num_slots, bank.shape[1]), bank.dtype).at[slot].set(bank[written])
    work = base
    # match[b, c, s]: candidate entry (b, c) is the row of slot s.
    match = (candidates[:, :, None] == slot_row[None, None, :]).astype(bank.dtype)
    slots = slot.reshape(b, columns)
    total_d_logits = jnp.zeros_like(probs)
    grads = jnp.zeros_like(x)
    for branch, column in _call_order(k, warmup):
        # d(loss)/d(logits) of this call: its CE term's weight, mean over the batch.
        target = jax.nn.one_hot(column, c, dtype=bank.dtype)
        d_logits = branch_weight[branch] * weights[column] * (probs[branch] - target) / b
        total_d_logits = total_d_logits.at[branch].add(d_logits)
        moved = jnp.einsum("bc,bcs->bs", d_logits, match) @ (work - base)
        grads = grads.at[branch].add(scale * moved)

        def update(i, work, branch=branch, column=column):
            s = slots[i, column]
            row = jax.lax.dynamic_slice_in_dim(work, s, 1, axis=0)
            new = _blend_normalize(row, x[branch, i][None])
            return jax.lax.dynamic_update_slice_in_dim(work, new, s, axis=0)

        work = jax.lax.fori_loop(0, b, update, work)
    grads = grads + scale * jnp.einsum("sbc,bcd->sbd", total_d_logits, gathered)
    grads = cotangent * grads
    return grads[0].astype(g.dtype), grads[1].astype(l_concat.dtype), None, None


release_gradient_loss.defvjp(_forward, _backward)

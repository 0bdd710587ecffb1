"""SCL memory banks against literal NumPy loops over the spec's update rules."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import unit

from jaxreid.methods.scl import banks as memory
from jaxreid.step import computed_after

N, D, P, B, K = 40, 16, 4, 6, 3


def _np_blend(row, x):
    v = 0.5 * (row + x)
    return v / max(np.linalg.norm(v), 1e-12)


def _np_apply(bank, rows, xs):
    bank = np.array(bank, np.float64)
    for r, x in zip(rows, xs, strict=True):
        if r >= 0:
            bank[r] = _np_blend(bank[r], x)
    return bank


def _np_mixture(mixture, positives, g, l_concat, order):
    """The spec's loops: for i in batch order, for each positive j (self first)."""
    m = np.array(mixture, np.float64)
    if order == "global_then_local":
        for x in (g, l_concat):
            for i in range(len(positives)):
                for j in positives[i]:
                    if j >= 0:
                        m[j] = _np_blend(m[j], x[i])
    else:
        for i in range(len(positives)):
            for x in (g, l_concat):
                for j in positives[i]:
                    if j >= 0:
                        m[j] = _np_blend(m[j], x[i])
    return m


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    g_bank = unit(rng.normal(size=(N, D))).astype(np.float32)
    l_bank = unit(rng.normal(size=(N, P, D // P))).astype(np.float32)
    cams = rng.integers(0, 3, N)
    banks = memory.init_banks(g_bank, l_bank, cams)
    # Non-zero mixture rows so the blend does more than copy the feature.
    banks = banks.replace(mixture_bank=jnp.asarray(unit(rng.normal(size=(N, D))), jnp.float32))
    g = unit(rng.normal(size=(B, D))).astype(np.float32)
    st = unit(rng.normal(size=(B, P, D // P))).astype(np.float32)
    return rng, banks, g, st


def test_init_banks_layout():
    rng = np.random.default_rng(1)
    g = rng.normal(size=(5, 8)).astype(np.float32)
    st = rng.normal(size=(5, 2, 4)).astype(np.float32)
    banks = memory.init_banks(g, st, np.arange(5))
    assert banks.local_bank.shape == (2, 5, 4)
    np.testing.assert_array_equal(banks.local_bank[1, 3], st[3, 1])
    np.testing.assert_array_equal(banks.global_bank, g)
    np.testing.assert_array_equal(banks.mixture_bank, np.zeros((5, 8)))
    assert banks.cameras.dtype == jnp.int32 and banks.num_rows == 5
    with pytest.raises(ValueError, match="must equal"):
        memory.init_banks(g, st[:, :, :3], np.arange(5))
    # A pytree: jit passes it through.
    out = jax.jit(lambda b: b)(banks)
    np.testing.assert_array_equal(out.local_bank, banks.local_bank)


def test_mixture_init_features_is_one_update_from_zeros():
    # "features": the row one update of an empty M row leaves, with the
    # sample's own concat(l) then g (the release's order: local branch first).
    rng = np.random.default_rng(2)
    g = unit(rng.normal(size=(4, 8))).astype(np.float32)
    st = unit(rng.normal(size=(4, 2, 4))).astype(np.float32)
    banks = memory.init_banks(g, st, np.arange(4), mixture_init="features")
    expected = [_np_blend(_np_blend(np.zeros(8), st[i].reshape(-1)), g[i]) for i in range(4)]
    np.testing.assert_allclose(banks.mixture_bank, np.stack(expected), atol=1e-6)
    # By hand: concat(l) has norm sqrt(P) = sqrt(2), so M = unit(g + concat(l) / sqrt(2)).
    np.testing.assert_allclose(
        banks.mixture_bank, unit(g + st.reshape(4, 8) / np.sqrt(2)), atol=1e-6
    )
    with pytest.raises(ValueError, match="mixture_init"):
        memory.init_banks(g, st, np.arange(4), mixture_init="ones")


def test_zero_rows_stay_finite():
    bank = jnp.zeros((3, 4))
    x = jnp.asarray([[3.0, 0, 4, 0], [0, 0, 0, 0]])
    for mode in ("sequential", "vectorized"):
        out = np.asarray(memory.apply_row_updates(bank, jnp.asarray([0, 1]), x, mode))
        np.testing.assert_allclose(out[0], [0.6, 0, 0.8, 0], atol=1e-7)
        np.testing.assert_array_equal(out[1:], 0.0)  # 0 + 0 stays 0, no NaN


@pytest.mark.parametrize("mode", ["sequential", "vectorized"])
def test_feature_banks_unique_indices(data, mode):
    _, banks, g, st = data
    idx = np.array([5, 0, 39, 17, 2, 30])
    new = memory.update_feature_banks(banks, jnp.asarray(idx), g, st, mode)
    want_g = _np_apply(banks.global_bank, idx, g)
    np.testing.assert_allclose(new.global_bank, want_g, atol=1e-6)
    for p in range(P):
        want_l = _np_apply(banks.local_bank[p], idx, st[:, p])
        np.testing.assert_allclose(new.local_bank[p], want_l, atol=1e-6)
    np.testing.assert_array_equal(new.mixture_bank, banks.mixture_bank)
    # Untouched rows are bit-identical.
    rest = np.setdiff1d(np.arange(N), idx)
    np.testing.assert_array_equal(new.global_bank[rest], banks.global_bank[rest])


@pytest.mark.parametrize("mode", ["sequential", "vectorized"])
def test_feature_banks_duplicates_chain_in_batch_order(data, mode):
    _, banks, g, st = data
    idx = np.array([7, 3, 7, -1, 7, 3])  # -1 = skip
    new = memory.update_feature_banks(banks, jnp.asarray(idx), g, st, mode)
    np.testing.assert_allclose(new.global_bank, _np_apply(banks.global_bank, idx, g), atol=1e-6)
    for p in range(P):
        want = _np_apply(banks.local_bank[p], idx, st[:, p])
        np.testing.assert_allclose(new.local_bank[p], want, atol=1e-6)


@pytest.mark.parametrize("order", ["global_then_local", "per_sample"])
@pytest.mark.parametrize("mode", ["sequential", "vectorized"])
def test_mixture_update_matches_spec_loops(data, mode, order):
    rng, banks, g, st = data
    l_concat = st.reshape(B, -1)
    # Rows repeat across samples' positive lists (and the self of one sample is
    # a positive of another); -1 entries are skipped.
    positives = np.array(
        [[0, 5, 9, 1], [1, 0, 5, 12], [2, 9, -1, 5], [3, 4, 0, 1], [4, 3, 22, 9], [5, 0, 1, 2]]
    )
    update = jax.jit(functools.partial(memory.update_mixture_bank, mode=mode, order=order))
    new = update(banks.mixture_bank, jnp.asarray(positives), g, l_concat)
    want = _np_mixture(banks.mixture_bank, positives, g, l_concat, order)
    np.testing.assert_allclose(new, want, atol=2e-6)
    # The two orders really differ on this input (the choice matters).
    other = "per_sample" if order == "global_then_local" else "global_then_local"
    assert (
        np.abs(want - _np_mixture(banks.mixture_bank, positives, g, l_concat, other)).max() > 1e-3
    )
    np.testing.assert_allclose(np.linalg.norm(new[positives[positives >= 0]], axis=1), 1, atol=1e-6)


def test_mixture_from_zeros_is_normalised_feature():
    g = np.array([[3.0, 4.0, 0, 0]], np.float32)
    l_concat = np.array([[0, 0, 2.0, 0]], np.float32)
    m = memory.update_mixture_bank(jnp.zeros((2, 4)), jnp.asarray([[1]]), g, l_concat)
    # Row 1: 0 -> g/|g| = (.6, .8, 0, 0) -> normalize(that + (0, 0, 2, 0)).
    want = np.array([0.6, 0.8, 2.0, 0]) / np.linalg.norm([0.6, 0.8, 2.0, 0])
    np.testing.assert_allclose(m[1], want, atol=1e-6)
    np.testing.assert_array_equal(m[0], 0.0)


def test_vectorized_equals_sequential_random_lists():
    rng = np.random.default_rng(3)
    bank = jnp.asarray(unit(rng.normal(size=(30, 8))), jnp.float32)
    xs = jnp.asarray(rng.normal(size=(64, 8)) * 3, jnp.float32)
    seq = jax.jit(functools.partial(memory.apply_row_updates, mode="sequential"))
    vec = jax.jit(functools.partial(memory.apply_row_updates, mode="vectorized"))
    unique_rows = jnp.asarray(rng.permutation(30)[:20])
    np.testing.assert_allclose(
        vec(bank, unique_rows, xs[:20]), seq(bank, unique_rows, xs[:20]), atol=1e-7
    )
    # Heavy repeats (a row hit up to ~10 times): still exact, per-row order kept.
    rows = jnp.asarray(rng.integers(-1, 8, 64))
    np.testing.assert_allclose(vec(bank, rows, xs), seq(bank, rows, xs), atol=1e-6)
    np.testing.assert_allclose(vec(bank, rows, xs), _np_apply(bank, rows, xs), atol=1e-6)


@pytest.mark.parametrize("warmup", [False, True])
def test_update_banks_positives_and_warmup(data, warmup):
    _, banks, g, st = data
    idx = np.array([10, 11, 12, 13, 14, 15])
    rng = np.random.default_rng(4)
    candidates = np.concatenate([idx[:, None], rng.integers(20, N, (B, K + 5))], axis=1)
    step = jax.jit(
        lambda b, w: memory.update_banks(b, jnp.asarray(idx), g, st, jnp.asarray(candidates), K, w)
    )
    new = step(banks, jnp.asarray(warmup))  # traced flag: one compile for both phases
    positives = candidates[:, : K + 1].copy()
    if warmup:
        positives[:, 1:] = -1
    want = _np_mixture(banks.mixture_bank, positives, g, st.reshape(B, -1), "global_then_local")
    np.testing.assert_allclose(new.mixture_bank, want, atol=2e-6)
    np.testing.assert_allclose(new.global_bank, _np_apply(banks.global_bank, idx, g), atol=1e-6)
    if warmup:
        np.testing.assert_array_equal(new.mixture_bank[20:], banks.mixture_bank[20:])


def test_update_banks_with_negative_indices_is_identity(data):
    """The train step passes indices of -1 for a non-finite step: nothing is written."""
    _, banks, g, st = data
    candidates = jnp.tile(jnp.arange(1 + K + 4, dtype=jnp.int32), (B, 1))
    step = jax.jit(lambda b, idx: memory.update_banks(b, idx, g, st, candidates, K))
    same = step(banks, jnp.full(B, -1, jnp.int32))
    for new, old in zip(jax.tree.leaves(same), jax.tree.leaves(banks), strict=True):
        np.testing.assert_array_equal(new, old)
    changed = step(banks, jnp.arange(B, dtype=jnp.int32))
    assert np.abs(np.asarray(changed.mixture_bank) - np.asarray(banks.mixture_bank)).max() > 0.1


def test_step_updates_donated_banks_in_place(data):
    """Selection-like reads, a loss gradient, then update_banks with the features
    computed after the gradients (as the train step does): no bank copy."""
    _, banks, g, st = data
    idx = jnp.arange(B, dtype=jnp.int32)

    def step(banks, g, st):
        dist = g @ banks.global_bank.T + jnp.einsum("bpd,pnd->bn", st, banks.local_bank)
        candidates = jnp.concatenate([idx[:, None], jax.lax.top_k(-dist, K + 2)[1]], axis=1)
        grads = jax.grad(lambda g: jnp.sum(banks.mixture_bank[candidates] @ g[0]))(g)
        ok = jnp.all(jnp.isfinite(grads))
        g, st = computed_after((g, st), (candidates, grads))
        rows = jnp.where(ok, idx, -1)
        return memory.update_banks(banks, rows, g, st, candidates, K), grads

    hlo = jax.jit(step, donate_argnums=0).lower(banks, g, st).compile().as_text()
    bank_shapes = (f"f32[{N},{D}]", f"f32[{P},{N},{D // P}]", f"f32[{P * N},{D // P}]")
    copies = [ln for ln in hlo.splitlines() if " copy(" in ln and any(s in ln for s in bank_shapes)]
    assert not copies, copies

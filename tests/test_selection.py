"""SCL selection against a brute-force NumPy argsort of the full distance matrix."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import unit

from jaxreid.methods.scl import banks as memory
from jaxreid.methods.scl import selection

N, D, P, B = 257, 32, 4, 5
LAM_G, LAM_C = 0.5, 0.05


def _np_distances(g, st, batch_idx, batch_cams, g_bank, l_bank, cams, lam_g, lam_c):
    """d_ij of the spec, literally, in float64; self at +inf."""
    g, st, g_bank, l_bank = (np.asarray(a, np.float64) for a in (g, st, g_bank, l_bank))
    d_global = ((g[:, None, :] - g_bank[None]) ** 2).sum(-1)
    num_stripes = st.shape[1]
    d_local = sum(
        ((st[:, None, p, :] - l_bank[None, :, p, :]) ** 2).sum(-1) for p in range(num_stripes)
    )
    d = lam_g * d_global + (1 - lam_g) * d_local / num_stripes
    d = d + lam_c * (np.asarray(batch_cams)[:, None] == np.asarray(cams)[None])
    d[np.arange(len(batch_idx)), batch_idx] = np.inf
    return d


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    g_bank = unit(rng.normal(size=(N, D))).astype(np.float32)
    l_bank = unit(rng.normal(size=(N, P, D // P))).astype(np.float32)
    cams = rng.integers(0, 4, N)
    banks = memory.init_banks(g_bank, l_bank, cams)
    batch_idx = np.array([0, 100, 256, 17, 128])
    # Batch features: the bank rows plus noise (as after a training step).
    g = unit(g_bank[batch_idx] + 0.3 * rng.normal(size=(B, D))).astype(np.float32)
    st = unit(l_bank[batch_idx] + 0.3 * rng.normal(size=(B, P, D // P))).astype(np.float32)
    d = _np_distances(g, st, batch_idx, cams[batch_idx], g_bank, l_bank, cams, LAM_G, LAM_C)
    return banks, g, st, batch_idx, cams[batch_idx], d


@pytest.mark.parametrize("unit_rows", [False, True])
@pytest.mark.parametrize("block_size", [None, 64, 100, 256, 300, 7])
def test_matches_brute_force(problem, block_size, unit_rows):
    banks, g, st, batch_idx, batch_cams, d = problem
    k, n = 7, 33
    order = np.argsort(d, axis=1, kind="stable")[:, : k + n]
    # Distinct distances: the reference order is unique at float32 resolution.
    assert np.diff(np.take_along_axis(d, order, 1), axis=1).min() > 1e-5
    select = jax.jit(
        functools.partial(
            selection.select_candidates, k=k, n=n, block_size=block_size, return_distances=True
        )
    )
    cand, dist = select(
        g, st, jnp.asarray(batch_idx), jnp.asarray(batch_cams), banks, lam_g=LAM_G, lam_c=LAM_C
    )
    assert cand.shape == (B, 1 + k + n) and cand.dtype == jnp.int32
    np.testing.assert_array_equal(cand[:, 0], batch_idx)
    np.testing.assert_array_equal(cand[:, 1:], order)
    np.testing.assert_allclose(dist, np.take_along_axis(d, order, 1), atol=2e-5)
    assert not np.any(cand[:, 1:] == batch_idx[:, None])


def test_auto_blocks_beyond_the_one_shot_limit(problem, monkeypatch):
    banks, g, st, batch_idx, batch_cams, d = problem
    # 800 entries per block at B = 5, P = 4: blocks of 40 rows (k + n = 40), 7 blocks.
    monkeypatch.setattr(selection, "MAX_DISTANCES_PER_BLOCK", 800)
    jaxpr = jax.make_jaxpr(
        functools.partial(selection.select_candidates, k=7, n=33, lam_g=LAM_G, lam_c=LAM_C)
    )(g, st, batch_idx, batch_cams, banks)
    assert "scan" in str(jaxpr)
    cand = selection.select_candidates(
        g, st, batch_idx, batch_cams, banks, k=7, n=33, lam_g=LAM_G, lam_c=LAM_C
    )
    np.testing.assert_array_equal(cand[:, 1:], np.argsort(d, axis=1, kind="stable")[:, :40])


@pytest.mark.parametrize("n", [20, 70])
@pytest.mark.parametrize("block_size", [None, 64, 7])
def test_own_camera_negatives_match_brute_force(problem, block_size, n):
    banks, g, st, batch_idx, batch_cams, d = problem
    k = 7
    cams = np.asarray(banks.cameras)
    select = jax.jit(
        functools.partial(
            selection.select_candidates,
            k=k,
            n=n,
            block_size=block_size,
            own_camera_negatives=True,
            return_distances=True,
        )
    )
    cand, dist = select(
        g, st, jnp.asarray(batch_idx), jnp.asarray(batch_cams), banks, lam_g=LAM_G, lam_c=LAM_C
    )
    cand = np.asarray(cand)
    for i in range(B):
        order = np.argsort(d[i], kind="stable")
        positives = order[:k]
        own = [j for j in order if cams[j] == batch_cams[i] and j not in positives]
        own = [j for j in own if np.isfinite(d[i, j])][:n]
        # Every camera holds about 64 rows: n = 70 leaves absent columns.
        want = np.concatenate([positives, own, np.full(n - len(own), -1)])
        np.testing.assert_array_equal(cand[i, 1:], want)
        np.testing.assert_allclose(dist[i, : k + len(own)], d[i, want[: k + len(own)]], atol=2e-5)
    assert (n == 70) == bool(np.any(cand == -1))


def test_camera_term_changes_ranking(problem):
    banks, g, st, batch_idx, batch_cams, _ = problem
    # A camera bonus larger than any feature distance (max 4): same-camera rows go last.
    cand = selection.select_candidates(
        g, st, batch_idx, batch_cams, banks, k=3, n=20, lam_c=10.0, block_size=50
    )
    cams = np.asarray(banks.cameras)
    assert np.all(cams[np.asarray(cand[:, 1:])] != batch_cams[:, None])


def test_ties_break_towards_lower_index():
    # Features on a coarse grid: every distance is exact in float32 and many tie.
    rng = np.random.default_rng(1)
    n_rows, p, dp = 150, 2, 4
    g_bank = rng.integers(-1, 2, (n_rows, p * dp)).astype(np.float32) / 2
    l_bank = rng.integers(-1, 2, (n_rows, p, dp)).astype(np.float32) / 2
    cams = rng.integers(0, 2, n_rows)
    banks = memory.init_banks(g_bank, l_bank, cams)
    idx = np.array([3, 149, 77])
    d = _np_distances(g_bank[idx], l_bank[idx], idx, cams[idx], g_bank, l_bank, cams, 0.5, 0.25)
    want = np.argsort(d, axis=1, kind="stable")[:, :40]
    assert len(np.unique(d[0])) < n_rows // 2  # really many ties
    for block_size in (None, 40, 64):
        cand = selection.select_candidates(
            g_bank[idx],
            l_bank[idx],
            idx,
            cams[idx],
            banks,
            k=5,
            n=35,
            lam_g=0.5,
            lam_c=0.25,
            block_size=block_size,
        )
        np.testing.assert_array_equal(cand[:, 1:], want)


def test_approx_path(problem):
    banks, g, st, batch_idx, batch_cams, d = problem
    k, n = 7, 33
    cand = selection.select_candidates(
        g,
        st,
        batch_idx,
        batch_cams,
        banks,
        k=k,
        n=n,
        lam_g=LAM_G,
        lam_c=LAM_C,
        block_size=128,
        use_approx=True,
    )
    want = np.argsort(d, axis=1)[:, : k + n]
    recall = np.mean(
        [len(np.intersect1d(a, b)) / (k + n) for a, b in zip(cand[:, 1:], want, strict=True)]
    )
    assert recall >= 0.95
    # Whatever was found comes out in ascending distance.
    got_d = np.take_along_axis(d, np.asarray(cand[:, 1:]), 1)
    assert np.all(np.diff(got_d, axis=1) >= -1e-6)


def test_too_few_rows_raises(problem):
    banks, g, st, batch_idx, batch_cams, _ = problem
    with pytest.raises(ValueError, match="candidates"):
        selection.select_candidates(g, st, batch_idx, batch_cams, banks, k=6, n=N - 6)


@pytest.mark.parametrize("replace", [True, False])
def test_random_candidates(replace):
    idx = jnp.asarray([0, 4, 2, 9])
    draw = jax.jit(
        functools.partial(selection.random_candidates, num_rows=10, k=2, n=5, replace=replace)
    )
    cand = np.asarray(draw(jax.random.key(0), idx))
    assert cand.shape == (4, 8) and cand.dtype == np.int32
    np.testing.assert_array_equal(cand[:, 0], idx)
    assert np.all((cand[:, 1:] >= 0) & (cand[:, 1:] < 10))
    assert not np.any(cand[:, 1:] == np.asarray(idx)[:, None])
    if not replace:
        assert all(len(set(row)) == 8 for row in cand)
    # Uniform over j != i: 100 draws of 7 for sample 4 cover the 9 others evenly.
    keys = jax.random.split(jax.random.key(1), 100)
    many = np.asarray(jax.vmap(draw, in_axes=(0, None))(keys, idx))[:, 1, 1:].ravel()
    counts = np.bincount(many, minlength=10)
    assert counts[4] == 0
    expected = len(many) / 9
    assert np.all(np.abs(np.delete(counts, 4) - expected) < 0.35 * expected)

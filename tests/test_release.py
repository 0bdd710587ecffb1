"""SCL's release modes against a NumPy transcription of the corrected spec
(scl-method.md): the mixture bank after a step and the gradient of the
release's sequential backward, in float64; the warm-up candidates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import unit

from jaxreid.methods.scl import banks, release
from jaxreid.methods.scl.loss import scl_loss

N, D, P, B, K, NEG = 300, 64, 8, 8, 7, 50
LAM_T, LAM_P, ALPHA, TAU = 0.5, 0.5, 1.75, 0.1


def numpy_release(m0, g, lc, cand, k, warmup):
    """The release's backward, call by call: the local branch, columns k..0,
    then the global branch; each call's gradient from M as it is, then its
    column's updates in batch order. Returns (M after, grad g, grad lc)."""
    m = m0.astype(np.float64).copy()
    b, c = cand.shape
    cof = np.zeros(c)
    cof[0] = LAM_T
    if not warmup:
        cof[1 : k + 1] = ALPHA * (1 - LAM_T) / k
    x = {"g": g, "l": lc}
    probs = {}
    for name in x:
        z = np.einsum("bd,bcd->bc", x[name], m0[cand]) / TAU
        z = np.where(cand >= 0, z, -np.inf)  # -1: an absent negative
        z = np.exp(z - z.max(axis=1, keepdims=True))
        probs[name] = z / z.sum(axis=1, keepdims=True)
    grad = {name: np.zeros_like(v) for name, v in x.items()}
    columns = [0] if warmup else list(range(k + 1))
    for name, weight in (("l", LAM_P), ("g", 1 - LAM_P)):
        for a in reversed(columns):
            d_logits = weight * cof[a] * (probs[name] - np.eye(c)[a]) / b
            for i in range(b):
                present = cand[i] >= 0
                grad[name][i] += d_logits[i, present] @ m[cand[i, present]] / TAU
            for i in range(b):
                row = cand[i, a]
                m[row] = unit((m[row] + x[name][i]) / 2)
    return m, grad["g"], grad["l"]


def _inputs(seed, zero_bank=False, overlap=True):
    rng = np.random.default_rng(seed)
    m0 = np.zeros((N, D)) if zero_bank else unit(rng.normal(size=(N, D)))
    g = unit(rng.normal(size=(B, D)))
    lc = unit(rng.normal(size=(B, P, D // P))).reshape(B, D)  # norm sqrt(P)
    indices = rng.choice(N, B, replace=False)
    # Positives drawn from a pool of 12 rows: many rows are hit several times
    # in one step (by several samples and both branches).
    pool = rng.choice(np.setdiff1d(np.arange(N), indices), 12, replace=False)
    positives = np.stack([rng.choice(pool if overlap else N, K, replace=False) for _ in range(B)])
    negatives = np.stack([rng.choice(N, NEG, replace=False) for _ in range(B)])
    cand = np.concatenate([indices[:, None], positives, negatives], axis=1)
    return m0, g, lc, cand


def _jax_release(m0, g, lc, cand, warmup):
    with jax.enable_x64(True):
        args = [jnp.asarray(v) for v in (g, lc, m0)] + [jnp.asarray(cand, jnp.int32)]
        grads = jax.grad(release.release_gradient_loss, argnums=(0, 1))(
            *args, K, LAM_T, LAM_P, ALPHA, TAU, warmup
        )
        value = release.release_gradient_loss(*args, K, LAM_T, LAM_P, ALPHA, TAU, warmup)
        clean = scl_loss(*args, K, LAM_T, LAM_P, ALPHA, TAU, warmup)
        positives = args[3][:, : K + 1]
        if warmup:
            positives = positives.at[:, 1:].set(-1)
        bank = banks.update_mixture_bank(args[2], positives, args[0], args[1], order="release")
        return (np.asarray(bank), *(np.asarray(v) for v in grads), float(value), float(clean))


@pytest.mark.parametrize("warmup", [False, True])
@pytest.mark.parametrize("zero_bank", [False, True])
def test_bank_and_gradient_equal_the_release(warmup, zero_bank):
    m0, g, lc, cand = _inputs(0, zero_bank)
    if warmup:
        cand[:, 1:] = np.random.default_rng(1).choice(N, (B, K + NEG))
    bank, grad_g, grad_l, value, clean = _jax_release(m0, g, lc, cand, warmup)
    want_bank, want_g, want_l = numpy_release(m0, g, lc, cand, K, warmup)
    # Several updates of one row in one step: the order matters.
    hits = np.bincount(cand[:, : 1 if warmup else K + 1].ravel(), minlength=N)
    assert warmup or hits.max() >= 4
    np.testing.assert_allclose(bank, want_bank, rtol=0, atol=1e-6)
    np.testing.assert_allclose(grad_g, want_g, rtol=0, atol=1e-6)
    np.testing.assert_allclose(grad_l, want_l, rtol=0, atol=1e-6)
    assert value == clean  # the release's loss value is the clean one
    if zero_bank:
        # From M = 0 the clean gradient is exactly zero, the release's is not.
        with jax.enable_x64(True):
            clean_grad = jax.grad(scl_loss)(
                jnp.asarray(g), jnp.asarray(lc), jnp.asarray(m0), jnp.asarray(cand), K
            )
        assert np.all(np.asarray(clean_grad) == 0)
        assert np.abs(want_g).max() > 1e-3 and np.abs(grad_g).max() > 1e-3


def test_absent_negatives_leave_the_release_softmax():
    m0, g, lc, cand = _inputs(2)
    cand[0, -5:] = -1
    cand[3, -1] = -1
    bank, grad_g, grad_l, value, clean = _jax_release(m0, g, lc, cand, False)
    want_bank, want_g, want_l = numpy_release(m0, g, lc, cand, K, False)
    np.testing.assert_allclose(bank, want_bank, rtol=0, atol=1e-6)
    np.testing.assert_allclose(grad_g, want_g, rtol=0, atol=1e-6)
    np.testing.assert_allclose(grad_l, want_l, rtol=0, atol=1e-6)
    assert value == clean


def test_release_order_differs_from_global_first():
    m0, g, lc, cand = _inputs(2)
    with jax.enable_x64(True):
        args = [jnp.asarray(v) for v in (m0, cand[:, : K + 1], g, lc)]
        release_bank = banks.update_mixture_bank(*args, order="release")
        clean_bank = banks.update_mixture_bank(*args, order="global_then_local")
    assert np.abs(np.asarray(release_bank) - np.asarray(clean_bank)).max() > 0.05


def test_warmup_candidates_are_one_shared_shuffle_with_position_removal():
    key = jax.random.key(3)
    num_rows, k, n = 60, 3, 17
    indices = jnp.asarray([0, 5, 19, 20, 41, 59], jnp.int32)
    cand = np.asarray(release.release_warmup_candidates(key, indices, num_rows, k, n))
    order = np.asarray(jax.random.permutation(key, num_rows))
    for row, i in zip(cand, np.asarray(indices), strict=True):
        assert row[0] == i
        np.testing.assert_array_equal(row[1:], np.delete(order, i)[: k + n])
        assert len(set(row[1:])) == k + n  # without replacement
    # Rows whose index is past the first k + n positions share every negative.
    np.testing.assert_array_equal(cand[3, 1:], cand[4, 1:])


def test_warmup_candidates_contain_the_sample_as_often_as_the_release():
    """Value i is kept when its position in the shuffle is among the first
    k + n after deleting position i: probability (k + n) / N for i >= k + n,
    else ((k + n) - 1) / (N - 1) ... measured over 3000 shuffles against the
    same rule applied with NumPy shuffles."""
    num_rows, k, n, draws = 40, 2, 10, 3000
    indices = jnp.asarray([3, 30], jnp.int32)
    keys = jax.random.split(jax.random.key(4), draws)
    sample = jax.vmap(lambda key: release.release_warmup_candidates(key, indices, num_rows, k, n))
    cand = np.asarray(sample(keys))
    own = (cand[:, :, 1:] == np.asarray(indices)[None, :, None]).any(axis=2).mean(axis=0)
    rng = np.random.default_rng(0)
    ref = np.zeros(2)
    for _ in range(draws):
        order = rng.permutation(num_rows)
        for r, i in enumerate((3, 30)):
            ref[r] += i in np.delete(order, i)[: k + n]
    ref /= draws
    np.testing.assert_allclose(own, ref, atol=0.04)
    assert own.min() > 0.15  # the sample is among its own negatives about 1 in 4 times


def test_negatives_are_capped_like_the_release(caplog):
    assert release.capped_negatives(500, 7, 300) == 292
    assert "capped at 292" in caplog.text
    assert release.capped_negatives(50, 7, 300) == 50


def test_release_modes_train_through_the_step(tiny_root, tmp_path):
    """Warm-up then selection with every release switch on: the run is finite
    and differs from the clean run from the second step on (the first step
    starts from M = 0, where both give the same loss value)."""
    from helpers import step_losses, tiny_config, tiny_data

    from jaxreid.train import train_and_evaluate

    losses = {}
    for mode in ("clean", "release"):
        config = tiny_config(
            tiny_root,
            **{
                "method.mixture_update": "release" if mode == "release" else "sequential",
                "method.gradient": mode,
                "method.warmup_sampling": mode,
            },
        )
        workdir = str(tmp_path / mode)
        train_and_evaluate(config, workdir, tiny_data(config), log=lambda s: None)
        losses[mode] = step_losses(workdir)
    assert len(losses["release"]) == 6 and np.all(np.isfinite(losses["release"]))
    assert losses["release"][0] == pytest.approx(losses["clean"][0], abs=1e-6)
    assert losses["release"][1:] != losses["clean"][1:]


@pytest.mark.slow
def test_release_modes_same_bits_on_1_and_4_devices(tiny_root, tmp_path):
    """The release switches keep device-count invariance (4 batch-norm groups)."""
    from helpers import DEVICE_RUN, run_on_devices, step_losses

    overrides = {
        **DEVICE_RUN,
        "method.mixture_update": "release",
        "method.gradient": "release",
        "method.warmup_sampling": "release",
    }
    one = run_on_devices(1, tiny_root, str(tmp_path / "one"), overrides)
    four = run_on_devices(4, tiny_root, str(tmp_path / "four"), overrides)
    assert len(step_losses(str(tmp_path / "one"))) == 6
    assert step_losses(str(tmp_path / "four")) == step_losses(str(tmp_path / "one"))
    assert four["final"] == one["final"]


def test_own_camera_negatives_train_through_the_step(tiny_root, tmp_path):
    """SCL with `method.camera_negatives`: a finite run whose losses equal the
    plain run's through the warm-up (no selection there) and differ after it."""
    from helpers import step_losses, tiny_config, tiny_data

    from jaxreid.train import train_and_evaluate

    losses = {}
    for own in (False, True):
        config = tiny_config(tiny_root, **{"method.camera_negatives": own})
        workdir = str(tmp_path / str(own))
        train_and_evaluate(config, workdir, tiny_data(config), log=lambda s: None)
        losses[own] = step_losses(workdir)
    assert len(losses[True]) == 6 and np.all(np.isfinite(losses[True]))
    assert losses[True][:3] == losses[False][:3]
    assert losses[True][3:] != losses[False][3:]

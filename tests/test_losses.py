"""SCL loss value and gradient against a direct NumPy transcription of the spec."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreid.methods.scl import loss as losses

N, D, P, B, K, NEG = 30, 16, 4, 3, 3, 6
HP = dict(lam_t=0.5, lam_p=0.3, alpha=1.75, temperature=0.1)


def _np_branch_loss(x, mixture, cand, k, lam_t, alpha, temperature, warmup):
    """loss(x) = sum_{a=0..k} w_a * CE(z, target=a), z_a = t <x, M[cand_a]>, t = 1/temperature."""
    t = 1.0 / temperature
    z = t * np.array([x @ mixture[j] for j in cand])
    log_softmax = z - np.log(np.sum(np.exp(z - z.max()))) - z.max()
    total = lam_t * -log_softmax[0]
    if not warmup:
        for a in range(1, k + 1):
            total += alpha * (1 - lam_t) / k * -log_softmax[a]
    return total


def _np_loss(g, l_concat, mixture, candidates, k, lam_t, lam_p, alpha, temperature, warmup):
    per_sample = [
        lam_p
        * _np_branch_loss(l_concat[i], mixture, candidates[i], k, lam_t, alpha, temperature, warmup)
        + (1 - lam_p)
        * _np_branch_loss(g[i], mixture, candidates[i], k, lam_t, alpha, temperature, warmup)
        for i in range(len(g))
    ]
    return float(np.mean(per_sample))


def _np_grad(x, mixture, candidates, k, lam_t, alpha, temperature, warmup, scale):
    """Hand-derived d loss / d x_i = scale * t * sum_c (W p_c - w_c) M[cand_c]."""
    t = 1.0 / temperature
    w = np.zeros(candidates.shape[1])
    w[0] = lam_t
    if not warmup:
        w[1 : k + 1] = alpha * (1 - lam_t) / k
    grads = []
    for i in range(len(x)):
        rows = mixture[candidates[i]]
        z = t * rows @ x[i]
        prob = np.exp(z - z.max())
        prob /= prob.sum()
        grads.append(scale * t * ((w.sum() * prob - w) @ rows))
    return np.array(grads)


@pytest.fixture
def inputs():
    rng = np.random.default_rng(0)
    mixture = rng.normal(size=(N, D))
    mixture /= np.linalg.norm(mixture, axis=1, keepdims=True)
    mixture[7] = 0.0  # rows never updated yet are zero
    g = rng.normal(size=(B, D))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    stripes = rng.normal(size=(B, P, D // P))
    stripes /= np.linalg.norm(stripes, axis=2, keepdims=True)
    l_concat = stripes.reshape(B, D)  # norm sqrt(P)
    candidates = np.stack([rng.permutation(N)[: 1 + K + NEG] for _ in range(B)])
    candidates[1, 4] = 7
    return g, l_concat, mixture, candidates


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("warmup", [False, True])
def test_value_and_gradient_match_spec(inputs, warmup, dense):
    g, l_concat, mixture, candidates = inputs
    args = (
        jnp.asarray(g, jnp.float32),
        jnp.asarray(l_concat, jnp.float32),
        jnp.asarray(mixture, jnp.float32),
        jnp.asarray(candidates),
    )
    loss_fn = functools.partial(losses.scl_loss, k=K, warmup=warmup, dense_logits=dense, **HP)
    value, (grad_g, grad_l) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(*args)
    want = _np_loss(g, l_concat, mixture, candidates, K, warmup=warmup, **HP)
    np.testing.assert_allclose(value, want, rtol=1e-5)

    hp = dict(
        k=K, lam_t=HP["lam_t"], alpha=HP["alpha"], temperature=HP["temperature"], warmup=warmup
    )
    want_g = _np_grad(g, mixture, candidates, scale=(1 - HP["lam_p"]) / B, **hp)
    want_l = _np_grad(l_concat, mixture, candidates, scale=HP["lam_p"] / B, **hp)
    np.testing.assert_allclose(grad_g, want_g, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(grad_l, want_l, atol=1e-5, rtol=1e-4)

    # The hand-derived formula itself, checked by central differences in float64.
    def numeric(which, i, c, eps=1e-6):
        values = []
        for step in (eps, -eps):
            x = (g, l_concat)[which].copy()
            x[i, c] += step
            pair = (x, l_concat) if which == 0 else (g, x)
            values.append(_np_loss(*pair, mixture, candidates, K, warmup=warmup, **HP))
        return (values[0] - values[1]) / (2 * eps)

    for i, c in [(0, 0), (2, 5), (1, D - 1)]:
        np.testing.assert_allclose(numeric(0, i, c), want_g[i, c], atol=1e-6)
        np.testing.assert_allclose(numeric(1, i, c), want_l[i, c], atol=1e-6)


@pytest.mark.parametrize("dense", [False, True])
def test_absent_negatives_are_left_out(inputs, dense):
    g, l_concat, mixture, candidates = inputs
    candidates = candidates.copy()
    candidates[0, -2:] = -1  # own-camera selection: fewer negatives for row 0
    candidates[2, -1] = -1
    loss_fn = functools.partial(losses.scl_loss, k=K, dense_logits=dense, **HP)
    value, (grad_g, grad_l) = jax.value_and_grad(loss_fn, argnums=(0, 1))(
        *(jnp.asarray(a, jnp.float32) for a in (g, l_concat, mixture)), jnp.asarray(candidates)
    )
    # Reference: every sample alone with its present columns only.
    want, want_g, want_l = 0.0, [], []
    hp = dict(k=K, **{n: HP[n] for n in ("lam_t", "alpha", "temperature")}, warmup=False)
    for i in range(B):
        row = candidates[i][candidates[i] >= 0][None]
        one = (g[i : i + 1], l_concat[i : i + 1], mixture, row)
        want += _np_loss(*one, K, warmup=False, **HP) / B
        want_g.append(_np_grad(g[i : i + 1], mixture, row, scale=(1 - HP["lam_p"]) / B, **hp))
        want_l.append(_np_grad(l_concat[i : i + 1], mixture, row, scale=HP["lam_p"] / B, **hp))
    np.testing.assert_allclose(value, want, rtol=1e-5)
    np.testing.assert_allclose(grad_g, np.concatenate(want_g), atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(grad_l, np.concatenate(want_l), atol=1e-5, rtol=1e-4)


def test_warmup_keeps_only_self_term(inputs):
    g, l_concat, mixture, candidates = inputs
    warm = losses.scl_loss(g, l_concat, mixture, candidates, k=K, warmup=True, **HP)
    full, terms = losses.scl_loss_terms(g, l_concat, mixture, candidates, k=K, **HP)
    no_pos = losses.scl_loss(g, l_concat, mixture, candidates, k=K, **{**HP, "alpha": 0.0})
    np.testing.assert_allclose(warm, no_pos, rtol=1e-6)  # alpha = 0 drops a >= 1 too
    assert float(full) > float(warm)
    np.testing.assert_allclose(
        full,
        HP["lam_p"] * terms["loss_local"] + (1 - HP["lam_p"]) * terms["loss_global"],
        rtol=1e-6,
    )
    # A traced flag gives the same numbers as the Python one (one compile, both phases).
    traced = jax.jit(functools.partial(losses.scl_loss, k=K, **HP))
    np.testing.assert_allclose(
        traced(g, l_concat, mixture, candidates, warmup=True), warm, rtol=1e-6
    )
    np.testing.assert_allclose(
        traced(g, l_concat, mixture, candidates, warmup=False), full, rtol=1e-6
    )


def test_no_gradient_into_mixture_bank(inputs):
    g, l_concat, mixture, candidates = inputs
    grad_m = jax.grad(losses.scl_loss, argnums=2)(
        jnp.asarray(g),
        jnp.asarray(l_concat),
        jnp.asarray(mixture),
        jnp.asarray(candidates),
        k=K,
        **HP,
    )
    np.testing.assert_array_equal(grad_m, np.zeros_like(mixture))


def test_zero_bank_gives_uniform_cross_entropy(inputs):
    g, l_concat, _, candidates = inputs
    c = candidates.shape[1]
    loss = losses.scl_loss(g, l_concat, np.zeros((N, D)), candidates, k=K, **HP)
    weight_sum = HP["lam_t"] + HP["alpha"] * (1 - HP["lam_t"])
    np.testing.assert_allclose(loss, weight_sum * np.log(c), rtol=1e-6)

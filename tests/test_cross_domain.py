"""Two-domain training (a labelled source beside the unlabelled target) and
the cross-domain methods sal, clc and ppan: their building blocks against
NumPy (value and gradient), the combined training set and its sampler, the
target's labels never read, and a resume after SIGINT."""

from __future__ import annotations

import dataclasses
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CLUSTER, step_losses, tiny_config

from jaxreid.data import synthetic
from jaxreid.data.samplers import TwoDomainSampler
from jaxreid.methods import SOURCE_DOMAIN, TARGET_DOMAIN
from jaxreid.methods import domain_losses as dl
from jaxreid.train import Data, TrainingInterrupted, train_and_evaluate, with_source
from jaxreid.utils import UserError
from jaxreid.validate import validate

jax.config.update("jax_enable_x64", False)


def _numeric_grad(f, x, eps=1e-3):
    """Central differences of a scalar NumPy function, in float64."""
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += eps
        down[i] -= eps
        grad[i] = (f(up) - f(down)) / (2 * eps)
    return grad


def _check(loss_jax, loss_np, x, rtol=2e-4, atol=2e-5):
    value = float(loss_jax(jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(value, loss_np(np.asarray(x, np.float64)), rtol=rtol, atol=atol)
    grad = np.asarray(jax.grad(loss_jax)(jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(grad, _numeric_grad(loss_np, x), rtol=2e-2, atol=2e-4)


# ----------------------------------------------------------- building blocks


def _np_mmd(x, is_source, bandwidths=dl.BANDWIDTHS):
    d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
    n = len(x)
    scale = d2.sum() / (n * n - n)
    k = sum(np.exp(-d2 / (2 * m * scale)) for m in bandwidths)
    s, t = is_source, ~is_source
    return k[s][:, s].mean() + k[t][:, t].mean() - 2 * k[s][:, t].mean()


def test_mmd_matches_numpy_value_and_gradient():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 3))
    is_source = np.array([1, 0, 1, 1, 0, 0, 1], bool)

    # The bandwidth scale carries no gradient: hold it at its value in NumPy.
    def np_loss(v):
        d2 = ((v[:, None] - v[None]) ** 2).sum(-1)
        d2x = ((x[:, None] - x[None]) ** 2).sum(-1)
        scale = d2x.sum() / (7 * 6)
        k = sum(np.exp(-d2 / (2 * m * scale)) for m in dl.BANDWIDTHS)
        s, t = is_source, ~is_source
        return k[s][:, s].mean() + k[t][:, t].mean() - 2 * k[s][:, t].mean()

    np.testing.assert_allclose(np_loss(x), _np_mmd(x, is_source))
    _check(lambda v: dl.mmd(v, jnp.asarray(is_source)), np_loss, x)
    # Same distribution -> near 0; shifted target -> clearly more.
    same = rng.normal(size=(200, 3))
    split = np.arange(200) < 100
    shifted = same + 2.0 * ~split[:, None]
    assert float(dl.mmd(jnp.asarray(same), jnp.asarray(split))) < 0.05
    assert float(dl.mmd(jnp.asarray(shifted), jnp.asarray(split))) > 0.5


def test_coral_matches_numpy_value_and_gradient():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 3))
    is_source = np.array([1, 1, 0, 1, 0, 0, 1, 0], bool)

    def np_loss(v):
        cs, ct = np.cov(v[is_source].T), np.cov(v[~is_source].T)
        return ((cs - ct) ** 2).sum() / (4 * 3 * 3)

    _check(lambda v: dl.coral(v, jnp.asarray(is_source)), np_loss, x)


def test_agent_consistency_matches_numpy_and_ignores_the_reference_gradient():
    rng = np.random.default_rng(2)
    logits, reference = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    use = np.array([1, 0, 1, 1, 0], bool)
    tau = 0.7

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    def np_loss(z):
        p, q = softmax(z / tau), softmax(reference / tau)
        kl = (q * (np.log(q) - np.log(p))).sum(-1)
        return kl[use].mean()

    _check(
        lambda z: dl.agent_consistency(z, jnp.asarray(reference), tau, jnp.asarray(use)),
        np_loss,
        logits,
    )
    grad_ref = jax.grad(
        lambda r: dl.agent_consistency(jnp.asarray(logits), r, tau, jnp.asarray(use))
    )(jnp.asarray(reference, jnp.float32))
    assert not np.any(np.asarray(grad_ref))
    # The same distribution: no loss.
    assert float(dl.agent_consistency(jnp.asarray(logits), jnp.asarray(logits), tau, use)) < 1e-6


def _np_ce(z, y, eps):
    z = z - z.max(-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
    c = z.shape[-1]
    q = np.eye(c)[y] * (1 - eps) + eps / c
    return -(q * log_p).sum(-1)


def test_dual_classification_matches_numpy_value_and_gradient():
    rng = np.random.default_rng(3)
    source_logits, target_logits = rng.normal(size=(6, 5)), rng.normal(size=(6, 4))
    source_labels = np.array([0, 4, -1, -1, 2, -1])
    target_labels = np.array([-1, -1, 3, 0, -1, -1])  # the last row: an outlier

    def np_source(z):
        use = source_labels >= 0
        return _np_ce(z[use], source_labels[use], 0.1).mean()

    def np_target(z):
        use = target_labels >= 0
        return _np_ce(z[use], target_labels[use], 0.0).mean()

    def both(s, t):
        return dl.dual_classification(
            s, jnp.asarray(source_labels), t, jnp.asarray(target_labels), 0.1
        )

    _check(lambda s: both(s, jnp.asarray(target_logits))[0], np_source, source_logits)
    _check(lambda t: both(jnp.asarray(source_logits), t)[1], np_target, target_logits)


def test_cross_domain_triplet_matches_brute_force_value_and_gradient():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(8, 3))
    # Label 0 in both domains names two different people.
    labels = np.array([0, 0, 1, 1, 0, 0, 2, -1])
    domains = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    margin = 0.3

    def np_loss(v):
        d = np.sqrt(((v[:, None] - v[None]) ** 2).sum(-1))
        gaps = []
        for i in range(8):
            if labels[i] < 0:
                continue
            pos = [
                j
                for j in range(8)
                if j != i and labels[j] == labels[i] and domains[j] == domains[i]
            ]
            neg = [
                j
                for j in range(8)
                if labels[j] >= 0 and (labels[j] != labels[i] or domains[j] != domains[i])
            ]
            if pos and neg:
                gaps.append(max(0.0, max(d[i, pos]) - min(d[i, neg]) + margin))
        return np.mean(gaps)

    _check(
        lambda v: dl.cross_domain_triplet(v, jnp.asarray(labels), jnp.asarray(domains), margin),
        np_loss,
        x,
    )


def test_source_identity_weights_and_weighted_cross_entropy():
    centroids = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    target = np.array([[1.0, 0.05], [0.9, 0.1]])  # near identity 0, far from identity 1
    # Cosines by hand: 1 / 1.00125, 0.1 / 0.90554, 1 / (sqrt(2) 0.90554).
    nearest = np.array([0.998752, 0.110432, 0.780869])
    scaled = (nearest - nearest.min()) / (nearest.max() - nearest.min())
    for alpha in (0.0, 0.5, 1.0):
        weights = dl.source_identity_weights(centroids, target, alpha, floor=0.2)
        expected = 1 - alpha + alpha * np.maximum(scaled, 0.2)
        np.testing.assert_allclose(weights, expected, atol=1e-5)
    assert dl.progress(0, 5) == 0 and dl.progress(2, 5) == 0.5 and dl.progress(4, 5) == 1

    rng = np.random.default_rng(5)
    logits = rng.normal(size=(5, 3))
    labels = np.array([0, 1, 2, -1, 1])
    w = np.array([1.0, 0.25, 0.5])

    def np_loss(z):
        use = labels >= 0
        ce = _np_ce(z[use], labels[use], 0.1)
        return (w[labels[use]] * ce).sum() / w[labels[use]].sum()

    _check(
        lambda z: dl.weighted_cross_entropy(z, jnp.asarray(labels), jnp.asarray(w), 0.1),
        np_loss,
        logits,
    )


# ----------------------------------------------------------- the training set


@pytest.fixture(scope="module")
def source_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("source") / "synthetic")
    synthetic.generate(
        root, num_ids=12, num_cameras=2, images_per_id_per_camera=2, seed=11, num_distractors=0
    )
    return root


def _two_domain_config(target_root, source_root, method, **overrides):
    heads = {"ppan": "scl"}
    settings = {"method.temperature": 0.05} if method in ("clc", "ppan") else {}
    return tiny_config(
        target_root,
        **{
            "method.name": method,
            "data.source_root": source_root,
            "model.head": heads.get(method, "fc"),
            "model.embed_dim": 32,
            "model.bn_group_size": 0,
            "train.batch_size": 16,
            "train.num_instances": 2,
            "train.epochs": 2,
            "train.steps_per_epoch": 2,
            "train.eval_every": 2,
            **CLUSTER,
            "cluster.eps": 0.45,
            **settings,
            **overrides,
        },
    )


def _data(config) -> Data:
    from jaxreid.data.loading import load_data

    return load_data(config, lambda s: None)


def test_the_two_domain_set_hides_the_target_identities(tiny_root, source_root):
    config = _two_domain_config(tiny_root, source_root, "sal")
    data = _data(config)
    combined, domains = with_source(data)
    n_t, n_s = len(data.train.records), len(data.source.records)
    assert len(combined.train.images) == n_t + n_s
    np.testing.assert_array_equal(domains[:n_t], TARGET_DOMAIN)
    np.testing.assert_array_equal(domains[n_t:], SOURCE_DOMAIN)
    np.testing.assert_array_equal(combined.train.images[:n_t], data.train.images)
    np.testing.assert_array_equal(combined.train.pids[:n_t], -1)
    np.testing.assert_array_equal(combined.train.pids[n_t:], data.source.pids)
    # Source cameras are cameras of their own, after the target's.
    assert combined.train.cameras[n_t:].min() > data.train.cameras.max()
    # One domain: unchanged.
    one, domains = with_source(dataclasses.replace(data, source=None))
    assert one.train is data.train and not domains.any()


def test_two_domain_batches_are_source_pk_then_target():
    labels = np.array([-1] * 10 + [0, 0, 1, 1, 2, 2, 3, 3])
    domains = np.array([0] * 10 + [1] * 8)
    cameras = np.array([0, 1] * 5 + [2, 3] * 4)
    sampler = TwoDomainSampler(labels, cameras, domains, 8, 4, 2, seed=3, num_steps=5)
    batches = sampler.epoch_batches(1)
    assert batches.shape == (5, 8)
    assert np.all(domains[batches[:, :4]] == 1) and np.all(domains[batches[:, 4:]] == 0)
    for batch in batches:  # P x K over the source: 2 identities x 2 images
        ids, counts = np.unique(labels[batch[:4]], return_counts=True)
        assert len(ids) == 2 and set(counts) == {2}
        assert len(set(batch[4:])) == 4  # the target: a shuffle, no repeats
    np.testing.assert_array_equal(batches, sampler.epoch_batches(1))  # a function of the epoch
    assert not np.array_equal(batches, sampler.epoch_batches(2))
    # Target pseudo-labels: the target part is P x K over them.
    labels[:10] = [0, 0, 1, 1, 2, 2, -1, -1, 3, 3]
    batches = TwoDomainSampler(labels, cameras, domains, 8, 4, 2, seed=3).epoch_batches(0)
    for batch in batches:
        ids, counts = np.unique(labels[batch[4:]], return_counts=True)
        assert len(ids) == 2 and set(counts) == {2} and ids.min() >= 0


def test_the_source_goes_with_a_cross_domain_method(tiny_root, source_root):
    with pytest.raises(UserError, match=r"data.source_root = '': method 'sal' trains on"):
        validate(_two_domain_config(tiny_root, "", "sal"))
    with pytest.raises(UserError, match=r"method 'cluster_contrast' trains on the target alone"):
        validate(_two_domain_config(tiny_root, source_root, "cluster_contrast"))
    with pytest.raises(UserError, match=r"train.source_batch_size = 3: must be a multiple"):
        validate(
            _two_domain_config(tiny_root, source_root, "sal", **{"train.source_batch_size": 3})
        )
    with pytest.raises(UserError, match=r"model.head = 'scl': ppan's part branches|sal"):
        validate(_two_domain_config(tiny_root, source_root, "sal", **{"model.head": "scl"}))
    validate(_two_domain_config(tiny_root, source_root, "ppan"))


# ----------------------------------------------------------- the methods train


def _shuffled(data: Data, split: str, seed: int) -> Data:
    part = getattr(data, split)
    ids = np.unique(part.pids)
    new = np.random.default_rng(seed).permutation(ids.max() + 1000)[: len(ids)] + 1
    mapping = dict(zip(ids.tolist(), new.tolist(), strict=True))
    records = [dataclasses.replace(r, pid=mapping[r.pid]) for r in part.records]
    return dataclasses.replace(data, **{split: dataclasses.replace(part, records=records)})


@pytest.mark.parametrize("method", ["sal", "clc", "ppan"])
def test_each_method_trains_without_reading_the_target_identities(
    tiny_root, source_root, tmp_path, method
):
    """A short run of each method; the same run with the target's identities
    shuffled gives the same bits, with the source's shuffled not (the test
    can tell)."""
    config = _two_domain_config(tiny_root, source_root, method)
    data = _data(config)
    a = train_and_evaluate(config, str(tmp_path / "a"), data, log=lambda s: None)
    losses = step_losses(str(tmp_path / "a"))
    assert len(losses) == 4 and np.all(np.isfinite(losses))
    assert a["final"]["plain"]["mAP"] > 0
    b = train_and_evaluate(
        config, str(tmp_path / "b"), _shuffled(data, "train", 7), log=lambda s: None
    )
    assert step_losses(str(tmp_path / "b")) == losses and b["history"] == a["history"]
    if method != "ppan":  # ppan's centroids are the identities': a relabelling permutes them
        train_and_evaluate(
            config, str(tmp_path / "c"), _shuffled(data, "source", 7), log=lambda s: None
        )
        assert step_losses(str(tmp_path / "c")) != losses


def test_a_two_domain_run_resumes_after_sigint_with_the_same_metrics(
    tiny_root, source_root, tmp_path
):
    """clc: both samplers P x K (source identities, target clusters); Ctrl-C
    after step 3 (mid-epoch 2), the same command again."""
    config = _two_domain_config(tiny_root, source_root, "clc", **{"train.log_every": 1})
    data = _data(config)
    straight = train_and_evaluate(config, str(tmp_path / "a"), data, log=lambda s: None)

    def interrupt_at_step_3(line: str) -> None:
        if line.startswith("step 3/"):
            os.kill(os.getpid(), signal.SIGINT)

    workdir = str(tmp_path / "b")
    with pytest.raises(TrainingInterrupted, match="stopped at step 3"):
        train_and_evaluate(config, workdir, data, log=interrupt_at_step_3)
    resumed = train_and_evaluate(config, workdir, data, log=lambda s: None)
    np.testing.assert_allclose(step_losses(workdir), step_losses(str(tmp_path / "a")), rtol=1e-6)
    assert resumed["final"] == straight["final"]

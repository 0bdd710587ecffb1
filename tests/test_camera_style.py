"""Camera-style learning (MCSL): AdaIN re-styling against NumPy (a re-styled
map has its target camera's statistics), the per-camera running styles
(ratio estimates that survive the step's averaging over groups), the model's
re-styled outputs, the wrapped loss and gradient against NumPy, a checkpoint
round trip, and a short synthetic training whose mAP rises."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import cluster_config, step_losses, tiny_data
from test_cluster_training import CAMERA_AWARE, LEARN, MIN_GAIN, learn_root  # noqa: F401

from jaxreid import models
from jaxreid.config_base import base_config
from jaxreid.methods import Batch, EpochPlan, Method, TrainSet, get_method
from jaxreid.methods.camera_style import with_camera_style
from jaxreid.models.camera_style import STYLE_SALT, CameraStyle, adain, channel_stats
from jaxreid.train import TrainingInterrupted, train_and_evaluate
from jaxreid.utils import UserError
from jaxreid.validate import config_problems

EPS = 1e-5


def _np_stats(x):
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=(1, 2))
    std = np.sqrt(x.var(axis=(1, 2)) + EPS)
    return mean, std


def _maps(batch=4, seed=0, channels=3):
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 3.0, size=(batch, 1, 1, channels))
    shift = rng.normal(size=(batch, 1, 1, channels))
    return (rng.normal(size=(batch, 6, 5, channels)) * scale + shift).astype(np.float32)


# ------------------------------------------------------------------ AdaIN


def test_adain_matches_numpy_and_gives_the_target_statistics():
    x = _maps()
    rng = np.random.default_rng(1)
    mean = rng.normal(size=(4, 3)).astype(np.float32)
    std = rng.uniform(0.2, 2.0, size=(4, 3)).astype(np.float32)
    y = np.asarray(adain(jnp.asarray(x), jnp.asarray(mean), jnp.asarray(std)))
    mu, sigma = _np_stats(x)
    expected = (x - mu[:, None, None]) / sigma[:, None, None] * std[:, None, None] + mean[
        :, None, None
    ]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    # The re-styled map's own statistics are the target's (the eps inside
    # sigma(x) shrinks its std by sqrt(var / (var + eps)), here < 1e-5).
    y_mean, y_std = _np_stats(y)
    np.testing.assert_allclose(y_mean, mean, atol=1e-5)
    np.testing.assert_allclose(y_std, std, rtol=1e-4)
    np.testing.assert_allclose(channel_stats(jnp.asarray(x))[1], sigma, rtol=1e-5)


# ---------------------------------------------------------- running styles


def _np_update(sums, weights, x, cameras, m):
    """The module doc's ratio-estimate update, one camera at a time."""
    mu, sigma = _np_stats(x)
    mean_sum, std_sum = sums
    mean_sum, std_sum, weights = mean_sum.copy(), std_sum.copy(), weights.copy()
    for c in range(len(weights)):
        rows = cameras == c
        if rows.any():
            mean_sum[c] = (1 - m) * mean_sum[c] + m * mu[rows].mean(0)
            std_sum[c] = (1 - m) * std_sum[c] + m * sigma[rows].mean(0)
            weights[c] = (1 - m) * weights[c] + m
    return (mean_sum, std_sum), weights


def _table(module):
    mean, std, seen = module.table()
    return np.asarray(mean), np.asarray(std), np.asarray(seen)


def test_running_styles_against_numpy():
    style = CameraStyle(3, num_cameras=5, styles=2, stage="stem", momentum=0.3)
    sums, weights = (np.zeros((5, 3)), np.zeros((5, 3))), np.zeros(5)
    for step, cameras in enumerate(([0, 0, 2, 2], [2, 3, 3, 0])):
        x = _maps(seed=step)
        style.update(jnp.asarray(x), jnp.asarray(cameras))
        sums, weights = _np_update(sums, weights, x, np.array(cameras), 0.3)
    mean, std, seen = _table(style)
    np.testing.assert_array_equal(seen, [True, False, True, True, False])
    used = weights > 0
    np.testing.assert_allclose(mean[used], sums[0][used] / weights[used, None], rtol=1e-5)
    np.testing.assert_allclose(std[used], sums[1][used] / weights[used, None], rtol=1e-5)
    # A camera seen once has exactly its batch's style (no pull towards zero).
    mu, sigma = _np_stats(_maps(seed=1))
    np.testing.assert_allclose(mean[3], mu[[1, 2]].mean(0), rtol=1e-5)
    np.testing.assert_allclose(std[3], sigma[[1, 2]].mean(0), rtol=1e-5)


def test_averaging_the_groups_statistics_keeps_each_cameras_style():
    """The step averages the new batch statistics of its groups: a camera in
    one group only keeps that group's style, not half of it."""
    a, b = (CameraStyle(3, 4, 1, "stem", 0.1) for _ in range(2))
    xa, xb = _maps(seed=3), _maps(seed=4)
    a.update(jnp.asarray(xa), jnp.array([0, 0, 0, 0]))
    b.update(jnp.asarray(xb), jnp.array([1, 1, 1, 1]))
    averaged = CameraStyle(3, 4, 1, "stem", 0.1)
    for name in ("mean_sum", "std_sum", "weight"):
        getattr(averaged, name)[...] = (getattr(a, name)[...] + getattr(b, name)[...]) / 2
    mean, std, seen = _table(averaged)
    np.testing.assert_array_equal(seen, [True, True, False, False])
    np.testing.assert_allclose(mean[0], _np_stats(xa)[0].mean(0), rtol=1e-5)
    np.testing.assert_allclose(std[1], _np_stats(xb)[1].mean(0), rtol=1e-5)


def test_restyled_copies_carry_their_target_cameras_statistics():
    style = CameraStyle(3, num_cameras=4, styles=3, stage="stem", momentum=0.5)
    style.update(jnp.asarray(_maps(seed=5)), jnp.array([1, 2, 3, 1]))  # cameras seen before
    x, cameras, key = jnp.asarray(_maps(seed=6)), jnp.array([0, 1, 0, 2]), jax.random.key(9)
    twin = nnx.clone(style)
    out = style(x, cameras, key)
    assert out.shape == (16, 6, 5, 3)
    np.testing.assert_array_equal(out[:4], x)  # the originals first
    twin.update(x, cameras)
    chosen = np.asarray(twin.targets(jax.random.fold_in(key, STYLE_SALT), cameras))
    mean, std, _ = _table(twin)
    assert chosen.shape == (3, 4)
    assert np.all(chosen != np.asarray(cameras)[None, :])  # never the image's own camera
    for k in range(3):
        copy_mean, copy_std = _np_stats(out[4 * (k + 1) : 4 * (k + 2)])
        np.testing.assert_allclose(copy_mean, mean[chosen[k]], atol=1e-5)
        np.testing.assert_allclose(copy_std, std[chosen[k]], rtol=1e-4)


def test_targets_are_seen_cameras_other_than_the_own():
    style = CameraStyle(2, num_cameras=6, styles=1, stage="stem", momentum=0.1)
    style.update(jnp.ones((3, 2, 2, 2)), jnp.array([1, 3, 4]))
    cameras = jnp.array([1, 3, 4, 0] * 250)
    chosen = np.asarray(style.targets(jax.random.key(0), cameras))[0]
    own = np.asarray(cameras)
    assert set(chosen.tolist()) <= {1, 3, 4} and np.all(chosen != own)
    # Uniform over the others: camera 0's images (3 choices) reach each.
    counts = np.bincount(chosen[own == 0], minlength=6)[[1, 3, 4]]
    assert counts.min() > 250 / 3 * 0.7
    # Only its own camera seen: the image keeps its own.
    alone = CameraStyle(2, num_cameras=3, styles=2, stage="stem", momentum=0.1)
    alone.update(jnp.ones((2, 2, 2, 2)), jnp.array([2, 2]))
    np.testing.assert_array_equal(alone.targets(jax.random.key(1), jnp.array([2, 2])), 2)


# ------------------------------------------------------------------ model


def _model(styles, backbone="osnet_x0_25", stage="stem"):
    c = models.default_model_config()
    c.update(backbone=backbone, head="bnneck", embed_dim=0, bn_group_size=4)
    c.camera_style.update(styles=styles, stage=stage, num_cameras=4)
    return models.split_model(models.build_model(c, rngs=nnx.Rngs(0)))


def _images(batch=4):
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.uniform(0, 255, (batch, 128, 64, 3)).astype(np.float32))


@pytest.mark.parametrize(
    "backbone, stage",
    [
        ("osnet_x0_25", "stem"),
        ("osnet_x0_25", "stage1"),
        ("resnet18", "stage1"),
        ("efficientnet_lite0", "stem"),
    ],
)
def test_model_returns_the_copies_in_training_only(backbone, stage):
    graphdef, params, stats = _model(2, backbone, stage)
    plain = _model(0, backbone, stage)
    images, cameras, key = _images(), jnp.array([0, 1, 2, 1]), jax.random.key(0)
    out, new_stats = models.apply_model(
        graphdef, params, stats, images, True, rng=key, cameras=cameras
    )
    assert out["global"].shape[0] == 4
    assert out["styled/global"].shape == (2, *out["global"].shape)
    assert not np.allclose(out["styled/global"][0], out["global"])
    # Batch norm keeps a group per copy: the originals' outputs are the plain model's,
    # up to the rounding of convolutions over a batch three times larger. That
    # rounding reached 8.4e-5 (Lite0) and 2.5e-5 (OSNet) on a 2-core AMD EPYC
    # (Zen 3) in CI, 0 and 2.9e-5 there in a plain process; outputs are ~1.7 at
    # most. A batch-norm leak moves them by 2-3: changing one other image of the
    # plain model's batch moved rows 0-2 by up to 3.06 (OSNet), 3.28 (Lite0),
    # 2.04 (ResNet-18).
    reference, _ = models.apply_model(*plain, images, True, rng=key, cameras=cameras)
    np.testing.assert_allclose(out["global"], reference["global"], rtol=0, atol=1e-3)
    # The styles are batch statistics: the training step returns them.
    table = new_stats["camera_style"]
    np.testing.assert_allclose(table["weight"][...], [0.1, 0.1, 0.1, 0.0], rtol=1e-6)
    evaluated, _ = models.apply_model(graphdef, params, stats, images, False)
    assert not any(k.startswith("styled/") for k in evaluated)
    np.testing.assert_allclose(
        evaluated["global"], models.apply_model(*plain, images, False)[0]["global"], rtol=1e-6
    )
    with pytest.raises(ValueError, match="pass apply_model the batch's cameras with the key"):
        models.apply_model(graphdef, params, stats, images, True, rng=key)
    # Without a key (camera_bn's statistics pass): the plain model's forward.
    unstyled, stats_only = models.apply_model(graphdef, params, stats, images, True)
    np.testing.assert_array_equal(
        unstyled["global"], models.apply_model(*plain, images, True)[0]["global"]
    )
    assert not any(k.startswith("styled/") for k in unstyled)
    np.testing.assert_array_equal(stats_only["camera_style"]["weight"][...], 0.0)


def test_camera_bn_statistics_ignore_the_training_only_layers():
    """cluster.camera_bn / eval.camera_bn estimate each camera's batch-norm
    statistics in a train-mode pass without a key: with camera styles and a
    WaveBlock on, the statistics are the plain model's."""
    from jaxreid.evaluate.camera_bn import camera_batch_stats

    def build(styles, rate):
        c = models.default_model_config()
        c.update(backbone="osnet_x0_25", head="bnneck", embed_dim=0, bn_group_size=0)
        c.camera_style.update(styles=styles, num_cameras=4)
        c.waveblock.rate = rate
        return models.split_model(models.build_model(c, rngs=nnx.Rngs(0)))

    images = np.asarray(_images(6)).astype(np.uint8)
    cameras = np.array([0, 0, 1, 1, 1, 0])
    both = camera_batch_stats(*build(1, 1.5), images, cameras, batch_size=3)
    plain = camera_batch_stats(*build(0, 1.0), images, cameras, batch_size=3)

    def leaves(tree):
        flat = jax.tree_util.tree_leaves_with_path(tree)
        return {jax.tree_util.keystr(path): np.asarray(v) for path, v in flat}

    for camera in (0, 1):
        expected, got = leaves(plain[camera]), leaves(both[camera])
        assert set(expected) < set(got)  # and the style table's
        for key, value in expected.items():
            np.testing.assert_array_equal(got[key], value, err_msg=key)


# ------------------------------------------------------------ the wrapper


def _toy_method(weight):
    """A method whose loss is weight . mean(global) (and 'extra' summed)."""

    def loss(outputs, memory, batch, rng, phase):
        value = jnp.mean(outputs["global"] @ weight) + jnp.sum(outputs["extra"])
        return value, None, {"toy": value}

    return Method(
        "toy",
        lambda train: None,
        lambda *a: EpochPlan(),
        loss,
        lambda memory, *a: memory,
        feature_keys=("global",),
    )


def test_wrapped_loss_and_gradient_match_numpy():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(5,)).astype(np.float32)
    g = rng.normal(size=(3, 5)).astype(np.float32)
    styled = rng.normal(size=(2, 3, 5)).astype(np.float32)
    extra = rng.normal(size=(3,)).astype(np.float32)
    styled_extra = rng.normal(size=(2, 3)).astype(np.float32)
    config = base_config()
    config.model.camera_style.update(styles=2, styled_weight=0.6, invariance_weight=0.8)
    method = with_camera_style(_toy_method(jnp.asarray(w)), config)
    batch = Batch(indices=jnp.arange(3), cameras=jnp.zeros(3, jnp.int32))

    def total(gv, sv):
        outputs = {"global": gv, "extra": extra, "styled/global": sv, "styled/extra": styled_extra}
        value, _, metrics = method.loss(outputs, None, batch, None, None)
        return value, metrics

    (value, metrics), grads = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(
        jnp.asarray(g), jnp.asarray(styled)
    )

    def np_total(gv, sv):
        def toy(x, e):
            return np.mean(x @ w) + np.sum(e)

        unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
        copies = np.mean([toy(sv[k], styled_extra[k]) for k in range(2)])
        invariance = np.mean(1 - np.sum(unit(sv) * unit(gv)[None], -1))
        return toy(gv, extra) + 0.6 * copies + 0.8 * invariance, copies, invariance

    expected, copies, invariance = np_total(g.astype(np.float64), styled.astype(np.float64))
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_styled"], copies, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_invariance"], invariance, rtol=1e-5)
    # The original's gradient: the toy loss only (the invariance holds it fixed).
    np.testing.assert_allclose(grads[0], np.tile(w / 3, (3, 1)), rtol=1e-5)
    numeric = np.zeros_like(styled, np.float64)
    for index in np.ndindex(styled.shape):
        up, down = styled.astype(np.float64), styled.astype(np.float64)
        up[index] += 1e-5
        down[index] -= 1e-5
        numeric[index] = (np_total(g, up)[0] - np_total(g, down)[0]) / 2e-5
    np.testing.assert_allclose(grads[1], numeric, rtol=1e-3, atol=1e-5)


def test_settings_are_checked_and_cameras_must_fit_the_table(tiny_root, tmp_path):
    config = base_config()
    config.model.camera_style.styles = -1
    config.model.camera_style.stage = "stage3"
    problems = config_problems(config)
    assert any(p.startswith("model.camera_style.styles = -1") for p in problems)
    assert any(p.startswith("model.camera_style.stage = 'stage3'") for p in problems)
    vit = base_config()
    vit.model.backbone = "vit_tiny"
    vit.model.camera_style.styles = 1
    assert any("not vit_tiny" in p for p in config_problems(vit))
    config = cluster_config(tiny_root, **{"model.camera_style.styles": 1})
    config.model.camera_style.num_cameras = 2
    train = TrainSet(np.array([0, 3, 1]), np.zeros(3), lambda: {}, {"global": (4,)})
    with pytest.raises(UserError, match=r"num_cameras = 2: .* up to 3; set it to at least 4"):
        get_method(config).init_memory(train)


# --------------------------------------------------------------- training

STYLE = {"model.camera_style.styles": 1, "model.camera_style.num_cameras": 8}


def test_checkpoint_round_trip_resumes_the_same_run(tiny_root, tmp_path):
    """The styles are batch statistics: saved with the checkpoint, and a run
    stopped mid-epoch and at an epoch end resumes to the same losses."""
    from jaxreid.checkpoints import restore_model

    tight = {"cluster.eps": 0.45, **STYLE}
    config = cluster_config(tiny_root, **tight)
    data = tiny_data(config)
    straight = train_and_evaluate(config, str(tmp_path / "a"), data, log=lambda s: None)
    interrupted = str(tmp_path / "b")
    for budget in (2, 1):
        with pytest.raises(TrainingInterrupted):
            train_and_evaluate(
                cluster_config(tiny_root, **tight, **{"train.stop_after_steps": budget}),
                interrupted,
                data,
                log=lambda s: None,
            )
    resumed = train_and_evaluate(config, interrupted, data, log=lambda s: None)
    np.testing.assert_allclose(
        step_losses(interrupted), step_losses(str(tmp_path / "a")), rtol=1e-6
    )
    assert resumed["final"] == straight["final"]
    graphdef, params, stats = models.split_model(models.build_model(config.model, rngs=nnx.Rngs(0)))
    _, restored, step = restore_model(
        os.path.join(interrupted, "checkpoints", "latest"), params, stats
    )
    assert step == 6
    weight = np.asarray(restored["camera_style"]["weight"][...])
    assert np.all(weight[np.unique(data.train.cameras)] > 0)
    with open(os.path.join(tmp_path / "a", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert all(r["loss_invariance"] > 0 for r in rows if "loss" in r)


def test_short_training_with_camera_styles_raises_map(learn_root, tmp_path):  # noqa: F811
    config = cluster_config(learn_root, "hhcl", **{**LEARN, **CAMERA_AWARE, **STYLE})
    result = train_and_evaluate(config, str(tmp_path), tiny_data(config), log=print)
    before, after = result["initial"]["plain"]["mAP"], result["final"]["plain"]["mAP"]
    print(f"hhcl + camera styles: mAP {before:.4f} -> {after:.4f} ({after - before:+.4f})")
    assert np.all(np.isfinite(step_losses(str(tmp_path))))
    assert after > before + MIN_GAIN, (before, after)

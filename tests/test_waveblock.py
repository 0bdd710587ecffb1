"""WaveBlock (jaxreid/models/waveblock.py): the kept block is unscaled and
every other row scaled by the rate, a block per sample from the key, identity
in eval; in the model it is off by default (the same program as a config
without the setting) and acts on the backbone's map in training only."""

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
from jaxreid.models.waveblock import WaveBlock, wave_mask
from jaxreid.train import train_and_evaluate
from jaxreid.validate import config_problems


def _map(batch=6, height=16, width=4, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(batch, height, width, channels)).astype(np.float32))


@pytest.mark.parametrize(
    "height, ratio, rows", [(16, 0.3, 5), (8, 0.3, 2), (5, 0.01, 1), (4, 1.0, 4)]
)
def test_kept_block_is_unscaled_and_the_rest_scaled_by_the_rate(height, ratio, rows):
    x = _map(height=height)
    y = np.asarray(WaveBlock(ratio, 1.5)(x, True, jax.random.key(3)))
    x = np.asarray(x)
    for b in range(len(x)):
        kept = [r for r in range(height) if np.array_equal(y[b, r], x[b, r])]
        waved = [r for r in range(height) if np.allclose(y[b, r], 1.5 * x[b, r], rtol=1e-6)]
        # round(ratio * height) consecutive rows kept (at least one), all others waved.
        assert len(kept) == rows and kept == list(range(kept[0], kept[0] + rows)), kept
        assert sorted(kept + waved) == list(range(height))


def test_mask_values_and_every_block_position_is_drawn():
    mask = np.asarray(wave_mask(jax.random.key(0), 4000, 16, 0.3, 0.5))
    assert set(np.unique(mask)) == {0.5, 1.0}
    assert np.all((mask == 1).sum(1) == 5)
    starts = np.argmax(mask == 1, axis=1)
    # Uniform over the 12 positions a 5-row block can take in 16 rows.
    counts = np.bincount(starts, minlength=12)
    assert len(counts) == 12 and counts.min() > 4000 / 12 * 0.8


def test_eval_and_a_pass_without_a_key_are_the_identity():
    x = _map()
    block = WaveBlock(0.3, 1.5)
    assert block(x, False, None) is x
    assert block(x, False, jax.random.key(0)) is x
    # camera_bn's statistics pass trains batch norm without a key: no wave.
    assert block(x, True, None) is x


def test_different_keys_give_different_blocks():
    x = jnp.ones((32, 16, 1, 1))
    a = WaveBlock(0.3, 2.0)(x, True, jax.random.key(0))
    again = WaveBlock(0.3, 2.0)(x, True, jax.random.key(0))
    b = WaveBlock(0.3, 2.0)(x, True, jax.random.key(1))
    np.testing.assert_array_equal(a, again)
    assert not np.array_equal(a, b)
    # One block per sample: the 32 samples do not all share one.
    assert len({tuple(np.asarray(a[i, :, 0, 0])) for i in range(32)}) > 1


# ------------------------------------------------------------------ in the model


def _model_config(**waveblock):
    c = models.default_model_config()
    c.update(backbone="osnet_x0_25", head="bnneck", embed_dim=0, bn_group_size=0)
    c.waveblock.update(waveblock)
    return c


def _images(batch=4, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.uniform(0, 255, (batch, 128, 64, 3)).astype(np.float32))


def _apply(config, train, rng=None):
    model = models.build_model(config, rngs=nnx.Rngs(0))
    graphdef, params, stats = models.split_model(model)
    return models.apply_model(graphdef, params, stats, _images(), train, rng=rng)[0]


def test_off_by_default_and_the_same_program_as_without_the_setting():
    config = _model_config()
    assert config.waveblock.rate == 1.0
    model = models.build_model(config, rngs=nnx.Rngs(0))
    assert model.waveblock is None
    older = models.default_model_config()
    older.update(backbone="osnet_x0_25", head="bnneck", embed_dim=0, bn_group_size=0)
    del older["waveblock"]  # a config saved before the setting existed

    def program(c):
        model = models.build_model(c, rngs=nnx.Rngs(0))
        graphdef, params, stats = models.split_model(model)

        def forward(p, s, images, key):
            return models.apply_model(graphdef, p, s, images, True, rng=key)

        return str(jax.make_jaxpr(forward)(params, stats, _images(), jax.random.key(0)))

    assert program(config) == program(older)


def test_model_waves_in_training_only():
    plain, waved = _model_config(), _model_config(rate=1.5, height_ratio=0.3)
    np.testing.assert_array_equal(
        _apply(plain, False)["global"], _apply(waved, False)["global"]
    )  # no parameters of its own: eval is the same model
    key = jax.random.key(7)
    base = _apply(plain, True, key)["global"]
    a = _apply(waved, True, key)["global"]
    assert not np.allclose(a, base)
    np.testing.assert_array_equal(a, _apply(waved, True, key)["global"])
    assert not np.allclose(a, _apply(waved, True, jax.random.key(8))["global"])
    np.testing.assert_array_equal(_apply(waved, True)["global"], _apply(plain, True)["global"])


@pytest.mark.parametrize("key, value", [("rate", 0.0), ("rate", -1.0), ("height_ratio", 0.0)])
def test_settings_are_checked(key, value):
    config = base_config()
    config.model.waveblock[key] = value
    assert any(p.startswith(f"model.waveblock.{key} = {value}") for p in config_problems(config))


# ------------------------------------------------------------------ JCL


def test_short_jcl_training_raises_map(learn_root, tmp_path):  # noqa: F811
    """JCL (configs/cuhk03_jcl.py's combination): joint memories, clusters of
    one camera made outliers, a WaveBlock in training, on the synthetic set."""
    overrides = {
        **LEARN,
        **CAMERA_AWARE,
        "cluster.min_cameras": 2,
        "model.waveblock.rate": 1.5,
        "model.waveblock.height_ratio": 0.3,
    }
    config = cluster_config(learn_root, "joint", **overrides)
    result = train_and_evaluate(config, str(tmp_path), tiny_data(config), log=print)
    before, after = result["initial"]["plain"]["mAP"], result["final"]["plain"]["mAP"]
    print(f"jcl: mAP {before:.4f} -> {after:.4f} ({after - before:+.4f})")
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    removed = [r["cluster/camera_filter_clusters"] for r in rows if "cluster/num_clusters" in r]
    assert len(removed) == 4  # logged at every re-clustering
    assert np.all(np.isfinite(step_losses(str(tmp_path))))
    assert after > before + MIN_GAIN, (before, after)

"""Camera batch norm at extraction (jaxreid.evaluate.camera_bn)."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
from flax import nnx

from jaxreid import models
from jaxreid.augment import IMAGENET_MEAN, IMAGENET_STD, normalize
from jaxreid.config_base import base_config
from jaxreid.evaluate.camera_bn import camera_batch_stats, extract_by_camera
from jaxreid.evaluate.protocol import query_gallery_features

HEIGHT, WIDTH = 32, 16


def _model():
    config = models.default_model_config()
    config.update(backbone="resnet18", embed_dim=64, num_stripes=4, bn_group_size=0)
    return models.split_model(models.build_model(config, nnx.Rngs(0)))


def _camera_images(n: int, seed: int) -> np.ndarray:
    # Smooth images (a few blobs) so that a colour shift is the only camera cue.
    rng = np.random.default_rng(seed)
    base = rng.uniform(40, 200, (n, HEIGHT // 4, WIDTH // 4, 3))
    return np.repeat(np.repeat(base, 4, axis=1), 4, axis=2).astype(np.uint8)


def test_camera_stats_are_each_cameras_own_statistics():
    graphdef, params, batch_stats = _model()
    images = np.concatenate([_camera_images(8, 0), _camera_images(8, 1) // 2 + 100])
    cameras = np.array([3] * 8 + [7] * 8)
    order = np.random.default_rng(2).permutation(16)  # cameras interleaved
    images, cameras = images[order], cameras[order]
    stats = camera_batch_stats(
        graphdef, params, batch_stats, images, cameras, batch_size=8, max_images=8
    )
    assert sorted(stats) == [3, 7]
    # Reference for the first batch norm: its input (the stem convolution of the
    # normalised pixels) over the camera's 8 images, mean and unbiased variance.
    model = nnx.merge(graphdef, params, batch_stats)
    for camera in (3, 7):
        x = normalize(images[cameras == camera].astype(np.float32), IMAGENET_MEAN, IMAGENET_STD)
        conv = np.asarray(model.backbone.conv1(x), np.float64)
        got = stats[camera]["backbone"]["bn1"]
        np.testing.assert_allclose(got["mean"][...], conv.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(
            got["var"][...], conv.var((0, 1, 2), ddof=1), rtol=1e-4, atol=1e-5
        )
    # The two cameras differ: the statistics are not the model's running ones.
    assert not np.allclose(
        stats[3]["backbone"]["bn1"]["mean"][...], stats[7]["backbone"]["bn1"]["mean"][...]
    )


def test_batches_are_averaged_and_the_draw_is_capped():
    graphdef, params, batch_stats = _model()
    images = _camera_images(8, 0)
    cameras = np.zeros(8, np.int64)
    one = camera_batch_stats(graphdef, params, batch_stats, images, cameras, batch_size=8)
    halves = camera_batch_stats(graphdef, params, batch_stats, images, cameras, batch_size=4)
    # Means: the mean of two equal batches' means is the mean of all 8.
    np.testing.assert_allclose(
        halves[0]["backbone"]["bn1"]["mean"][...],
        one[0]["backbone"]["bn1"]["mean"][...],
        rtol=1e-4,
        atol=1e-5,
    )
    # max_images 4 of 8 with batch 4: the statistics of one batch of 4 images.
    capped = camera_batch_stats(
        graphdef, params, batch_stats, images, cameras, batch_size=4, max_images=4, seed=5
    )
    model = nnx.merge(graphdef, params, batch_stats)
    x = normalize(images.astype(np.float32), IMAGENET_MEAN, IMAGENET_STD)
    conv = np.asarray(model.backbone.conv1(x), np.float64)
    means = conv.mean((1, 2))  # per image
    got = np.asarray(capped[0]["backbone"]["bn1"]["mean"][...])
    # Some 4-subset of the 8 images gives exactly these means.
    assert any(
        np.allclose(means[list(subset)].mean(0), got, rtol=1e-4, atol=1e-5)
        for subset in itertools.combinations(range(8), 4)
    )


def test_extract_by_camera_keeps_the_order_and_falls_back_for_unknown_cameras():
    images = np.arange(6)[:, None].astype(np.float32)
    cameras = np.array([2, 0, 2, 5, 0, 2])

    def extract(stats, part):
        return {"global": part * 10 + stats}

    out = extract_by_camera(extract, -1.0, images, cameras, {0: 1.0, 2: 2.0})
    # camera 5 has no statistics: the given batch_stats (-1) is used.
    np.testing.assert_array_equal(out["global"][:, 0], [2, 11, 22, -1 + 30, 41, 52])


def test_camera_bn_removes_a_cameras_colour_shift_at_evaluation():
    graphdef, params, batch_stats = _model()
    query = _camera_images(16, 0)
    # The same scenes through another camera with half the contrast (around the
    # normalisation's mean, so that the normalised pixels are exactly halved):
    # with each camera's own statistics every batch norm undoes the factor.
    mean = np.asarray(IMAGENET_MEAN, np.float32)
    gallery = np.round(mean + 0.5 * (query.astype(np.float32) - mean)).astype(np.uint8)
    data = SimpleNamespace(
        query=SimpleNamespace(images=query, cameras=np.zeros(16, np.int64)),
        gallery=SimpleNamespace(images=gallery, cameras=np.ones(16, np.int64)),
    )
    config = base_config()
    config.train.batch_size = 8
    # Train-mode statistics of an untrained model's random weights differ from its
    # initial running ones; give both runs the same starting point: the model's
    # statistics over all 32 images.
    pooled = camera_batch_stats(
        graphdef,
        params,
        batch_stats,
        np.concatenate([query, gallery]),
        np.zeros(32, np.int64),
        batch_size=8,
    )[0]

    def pair_similarity(camera_bn: bool) -> float:
        config.eval.camera_bn = camera_bn
        q, g = query_gallery_features(config, graphdef, params, pooled, data)
        q = q["global"] / np.linalg.norm(q["global"], axis=1, keepdims=True)
        g = g["global"] / np.linalg.norm(g["global"], axis=1, keepdims=True)
        return float((q * g).sum(1).mean())

    shared, per_camera = pair_similarity(False), pair_similarity(True)
    # Measured 0.01 and 0.81 (not 1: the halved pixels are rounded to integers,
    # and the untrained network is sensitive to small differences).
    assert shared < 0.2
    assert per_camera > 0.6


def test_rejects_nothing_to_estimate():
    graphdef, params, batch_stats = _model()
    with pytest.raises(ValueError, match="max_images"):
        camera_batch_stats(
            graphdef,
            params,
            batch_stats,
            _camera_images(4, 0),
            np.zeros(4, np.int64),
            batch_size=4,
            max_images=0,
        )

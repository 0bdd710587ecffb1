"""On-device augmentation properties and sampler invariants."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreid import augment
from jaxreid.data.samplers import CameraGroupSampler, IdentitySampler, ShuffleSampler


def _images(batch=6, height=16, width=8, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(1, 256, (batch, height, width, 3), dtype=np.uint8))


def test_flip_is_exact_mirror():
    x = _images().astype(jnp.float32)
    mask = jnp.array([True, False, True, False, False, True])
    out = augment.horizontal_flip(x, mask)
    np.testing.assert_array_equal(out[0], x[0, :, ::-1])
    np.testing.assert_array_equal(out[1], x[1])
    np.testing.assert_array_equal(augment.horizontal_flip(out, mask), x)


def test_pad_and_crop_shape_and_content():
    x = _images().astype(jnp.float32)
    out = augment.pad_and_crop(jax.random.key(1), x, pad=3)
    assert out.shape == x.shape
    # Every crop is a shifted window of the zero-padded image: non-zero pixels
    # of the output appear in the original at a constant offset.
    padded = np.pad(np.asarray(x), ((0, 0), (3, 3), (3, 3), (0, 0)))
    for i in range(x.shape[0]):
        found = [
            (dy, dx)
            for dy in range(7)
            for dx in range(7)
            if np.array_equal(padded[i, dy : dy + 16, dx : dx + 8], np.asarray(out[i]))
        ]
        assert found, "crop is not a window of the padded image"


def test_random_erasing_area_bounds_and_fill():
    x = jnp.full((256, 64, 32, 3), 7.0)
    fill = (100.0, 150.0, 200.0)
    out = augment.random_erasing(jax.random.key(0), x, 1.0, (0.02, 0.4), 0.3, fill)
    erased = np.all(np.asarray(out) == np.asarray(fill), axis=-1)
    untouched = np.all(np.asarray(out) == 7.0, axis=-1)
    assert np.all(erased | untouched)
    areas = erased.reshape(256, -1).mean(axis=1)
    # Rounding h and w moves the area a little beyond the drawn [0.02, 0.4].
    assert areas.min() >= 0.015 and areas.max() <= 0.45
    assert (areas > 0).mean() > 0.99
    # Each erased region is one axis-aligned rectangle.
    for mask in erased[:20]:
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()
        assert mask.sum() == len(rows) * len(cols)


def test_erasing_probability_zero_and_half():
    x = jnp.zeros((400, 16, 8, 3))
    assert augment.random_erasing(jax.random.key(0), x, 0.0, (0.02, 0.4), 0.3, (1, 1, 1)) is x
    out = augment.random_erasing(jax.random.key(0), x, 0.5, (0.02, 0.4), 0.3, (1.0, 1.0, 1.0))
    fraction = float(np.mean(np.asarray(out).reshape(400, -1).max(axis=1) > 0))
    assert 0.4 < fraction < 0.6


def test_augment_batch_deterministic_and_jittable():
    options = augment.AugmentOptions(flip=True, pad=2, erasing_prob=0.5)
    fn = jax.jit(augment.augment_batch, static_argnums=2)
    x = _images()
    a = fn(jax.random.key(3), x, options)
    b = fn(jax.random.key(3), x, options)
    c = fn(jax.random.key(4), x, options)
    assert a.dtype == jnp.float32 and a.shape == x.shape
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    plain = augment.augment_batch(jax.random.key(0), x, augment.AugmentOptions(flip=False))
    np.testing.assert_array_equal(plain, x.astype(jnp.float32))


def test_normalize():
    x = jnp.full((1, 2, 2, 3), 127.0)
    out = augment.normalize(x, (127.0, 0.0, 27.0), (128.0, 127.0, 50.0))
    np.testing.assert_allclose(out[0, 0, 0], [0.0, 1.0, 2.0])


def test_shuffle_sampler_covers_epoch_and_is_resumable():
    sampler = ShuffleSampler(103, 10, seed=5)
    batches = sampler.epoch_batches(0)
    assert batches.shape == (10, 10)
    assert len(np.unique(batches)) == 100  # each image at most once
    np.testing.assert_array_equal(batches, ShuffleSampler(103, 10, seed=5).epoch_batches(0))
    assert not np.array_equal(batches, sampler.epoch_batches(1))
    # Resume at step 4 = the rest of the same epoch.
    np.testing.assert_array_equal(sampler.epoch_batches(0)[4:], batches[4:])


def test_identity_sampler_invariants():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(12), 6)
    labels[::7] = -1  # outliers
    cameras = rng.integers(0, 4, labels.shape)
    sampler = IdentitySampler(labels, cameras, batch_size=16, num_instances=4, seed=1)
    batches = sampler.epoch_batches(2)
    assert batches.shape == (len(sampler), 16)
    for batch in batches:
        assert np.all(labels[batch] >= 0)
        groups = labels[batch].reshape(4, 4)
        assert np.all(groups == groups[:, :1])  # K images of one identity
        assert len(np.unique(groups[:, 0])) == 4  # P distinct identities
        for group in batch.reshape(4, 4):
            pid = labels[group[0]]
            available = len(np.unique(cameras[labels == pid]))
            # Different cameras preferred: as many as the identity has (up to K).
            assert len(np.unique(cameras[group])) == min(4, available)
    np.testing.assert_array_equal(batches, sampler.epoch_batches(2))
    with pytest.raises(ValueError, match="multiple of num_instances"):
        IdentitySampler(labels, cameras, batch_size=10, num_instances=4)


def test_camera_group_sampler_one_camera_per_group():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(20), 8)
    labels[::9] = -1  # outliers
    cameras = rng.integers(0, 3, labels.shape)
    cameras[labels == 19] = 3  # camera 3: one identity, too few for a group of 2
    sampler = CameraGroupSampler(labels, cameras, 16, 4, 8, seed=1, num_steps=200)
    batches = sampler.epoch_batches(0)
    assert batches.shape == (200, 16)
    np.testing.assert_array_equal(batches, sampler.epoch_batches(0))  # resumable
    assert not np.array_equal(batches, sampler.epoch_batches(1))
    groups = batches.reshape(-1, 8)
    assert np.all(labels[groups] >= 0)
    drawn = cameras[groups[:, 0]]
    assert np.all(cameras[groups] == drawn[:, None])  # one camera per group
    assert 3 not in drawn
    for group in groups:
        pids = labels[group].reshape(2, 4)
        assert np.all(pids == pids[:, :1]) and pids[0, 0] != pids[1, 0]
    # Cameras drawn in proportion to their sampled images.
    sizes = np.asarray([np.sum((labels >= 0) & (cameras == c)) for c in range(3)])
    shares = np.bincount(drawn, minlength=3) / len(drawn)
    np.testing.assert_allclose(shares, sizes / sizes.sum(), atol=0.05)
    # Every (camera, identity) pair comes round within a camera's queue.
    pairs = {(int(cameras[g[0]]), int(labels[g[0]])) for g in groups.reshape(-1, 4)}
    expected = {(int(c), int(p)) for c, p in zip(cameras, labels, strict=True) if p >= 0 and c < 3}
    assert pairs == expected
    one = labels == 19
    with pytest.raises(ValueError, match="no camera has 2"):
        CameraGroupSampler(labels[one], cameras[one], 16, 4, 8)
    with pytest.raises(ValueError, match="multiple of the batch-norm group"):
        CameraGroupSampler(labels, cameras, 16, 4, 6)

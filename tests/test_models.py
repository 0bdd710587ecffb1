"""Backbones, heads, ghost batch norm, pooling and the pure apply_model core."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxreid import models
from jaxreid.models import winograd
from jaxreid.models.cpu_kernels import (
    conv2d,
    conv_padding,
    depthwise_conv_same,
    normalize_groups,
    pointwise_conv,
    space_to_depth_conv,
)
from jaxreid.models.layers import (
    IBN,
    AvgPool,
    Conv,
    DepthwiseConv,
    GeM,
    GhostBatchNorm,
    PointwiseConv,
    export_mode,
    stripe_bins,
    stripe_pool,
)

# 128 x 64 inputs keep every map >= 8 x 4 (last stride 1): XLA's CPU convolution is
# pathologically slow on maps of a few pixels (e.g. 4 x 2 x 512 channels).
HEIGHT, WIDTH = 128, 64


def _config(**overrides):
    config = models.default_model_config()
    config.update(backbone="resnet18", embed_dim=64, num_stripes=4)
    config.update(overrides)
    return config


def _images(batch, seed=0, height=HEIGHT, width=WIDTH):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.uniform(0, 255, (batch, height, width, 3)).astype(np.float32))


def _set(variable, value):
    variable[...] = jnp.asarray(value, jnp.float32)


# ------------------------------------------------------------------ ghost BN


def _reference_bn(x, scale, bias, eps=1e-5):
    axes = tuple(range(x.ndim - 1))
    mean, var = x.mean(axes), x.var(axes)  # biased, as torch uses to normalise
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def test_ghost_bn_normalises_each_group_separately_and_updates_running_stats():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (8, 3, 2, 5)).astype(np.float32)
    x[4:] = x[4:] * 0.2 - 7.0  # the two groups have very different statistics
    scale, bias = rng.uniform(0.5, 2, 5), rng.normal(size=5)
    bn = GhostBatchNorm(5, group_size=4)
    _set(bn.scale, scale)
    _set(bn.bias, bias)

    y = np.asarray(bn(jnp.asarray(x), train=True))

    expected = np.concatenate(
        [_reference_bn(x[:4], scale, bias), _reference_bn(x[4:], scale, bias)]
    )
    np.testing.assert_allclose(y, expected, atol=2e-5)
    # running stats: momentum 0.1 on the mean over groups of the group mean and of
    # the UNBIASED group variance (torch's running_var convention).
    groups = x.reshape(2, 4 * 3 * 2, 5)
    group_mean = groups.mean(1).mean(0)
    group_var = groups.var(1, ddof=1).mean(0)
    np.testing.assert_allclose(bn.mean[...], 0.1 * group_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * group_var, rtol=1e-5)

    with pytest.raises(ValueError, match="not divisible"):
        bn(jnp.asarray(x[:6]), train=True)


def test_ghost_bn_whole_batch_matches_torch_batchnorm_train_and_eval():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x = rng.normal(1.0, 2.0, (6, 4, 3, 5)).astype(np.float32)
    bn = GhostBatchNorm(5, group_size=0)
    reference = torch.nn.BatchNorm2d(5, momentum=0.1, eps=1e-5)

    for step in range(2):
        y = bn(jnp.asarray(x + step), train=True)
        y_ref = reference.train()(torch.from_numpy(x + step).permute(0, 3, 1, 2))
        np.testing.assert_allclose(y, y_ref.permute(0, 2, 3, 1).detach().numpy(), atol=2e-5)
    np.testing.assert_allclose(bn.mean[...], reference.running_mean.numpy(), rtol=1e-5)
    np.testing.assert_allclose(bn.var[...], reference.running_var.numpy(), rtol=1e-5)

    y = bn(jnp.asarray(x), train=False)
    y_ref = reference.eval()(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    np.testing.assert_allclose(y, y_ref.detach().numpy(), atol=2e-5)


def test_ghost_bn_eval_uses_running_stats_and_keeps_them():
    bn = GhostBatchNorm((2, 3), group_size=2)  # feature shape (P, D): P BatchNorm1d
    mean, var = np.arange(6.0).reshape(2, 3), np.linspace(0.5, 3, 6).reshape(2, 3)
    _set(bn.mean, mean)
    _set(bn.var, var)
    x = np.random.default_rng(2).normal(size=(4, 2, 3)).astype(np.float32)

    y = bn(jnp.asarray(x), train=False)

    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(bn.mean[...], mean.astype(np.float32))
    # in training each (p, d) channel is normalised over its group of samples only
    y = np.asarray(bn(jnp.asarray(x), train=True))
    np.testing.assert_allclose(y[:2].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(y[2:].mean(0), 0, atol=1e-5)


# ----------------------------------------------------------- pooling, IBN


def test_gem_with_p_one_is_average_pooling_and_p_three_matches_formula():
    x = jnp.asarray(np.random.default_rng(3).uniform(0, 2, (2, 4, 3, 5)).astype(np.float32))
    gem = GeM()
    assert float(gem.p[...][0]) == 3.0
    expected = np.power(np.power(np.maximum(np.asarray(x), 1e-6), 3).mean((1, 2)), 1 / 3)
    np.testing.assert_allclose(gem(x), expected, rtol=1e-5)
    _set(gem.p, [1.0])
    np.testing.assert_allclose(gem(x), AvgPool()(x), rtol=1e-6)
    # p is a trainable parameter: it gets a finite, non-zero gradient
    graphdef, state = nnx.split(GeM())
    grads = jax.grad(lambda state: nnx.merge(graphdef, state)(x).sum())(state)
    assert np.isfinite(grads["p"][...]).all() and float(jnp.abs(grads["p"][...]).max()) > 0


@pytest.mark.parametrize(
    "height, stripes, bins",
    [
        (16, 8, [(2 * i, 2 * i + 2) for i in range(8)]),
        (4, 3, [(0, 2), (1, 3), (2, 4)]),
        (7, 3, [(0, 3), (2, 5), (4, 7)]),
        (2, 4, [(0, 1), (0, 1), (1, 2), (1, 2)]),
    ],
)
def test_stripe_bins_follow_adaptive_avg_pool(height, stripes, bins):
    assert stripe_bins(height, stripes) == bins
    x = np.random.default_rng(4).normal(size=(2, height, 3, 5)).astype(np.float32)
    expected = np.stack([x[:, a:b].mean((1, 2)) for a, b in bins], axis=1)
    np.testing.assert_allclose(stripe_pool(jnp.asarray(x), stripes), expected, atol=1e-6)


def test_stripe_pool_matches_torch_adaptive_avg_pool():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(5).normal(size=(2, 7, 3, 4)).astype(np.float32)
    reference = torch.nn.AdaptiveAvgPool2d((3, 1))(torch.from_numpy(x).permute(0, 3, 1, 2))
    np.testing.assert_allclose(
        stripe_pool(jnp.asarray(x), 3), reference[..., 0].permute(0, 2, 1).numpy(), atol=1e-6
    )


def _grouped_conv(x, kernel, stride):
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )


@pytest.mark.parametrize(
    "batch, height, width, stride, kernel",
    # batches 2, 8 and 5: the kernel gradient loops over chunks of 2, 4 and 1 images;
    # a map smaller than the kernel (most of the padded input is never read)
    [(2, 9, 6, 2, 3), (8, 7, 5, 1, 5), (5, 8, 8, 2, 5), (2, 3, 2, 1, 5), (2, 3, 4, 2, 5)],
)
def test_depthwise_conv_and_its_vjp_match_grouped_convolution(batch, height, width, stride, kernel):
    conv = DepthwiseConv(6, kernel, stride, dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (batch, height, width, 6))
    out_shape = (batch, -(-height // stride), -(-width // stride), 6)
    cotangent = jax.random.normal(jax.random.key(2), out_shape)

    @jax.jit  # one compile instead of one per eager op
    def outputs_and_vjps(x, w, cotangent):
        out, vjp = jax.vjp(lambda x, w: depthwise_conv_same(x, w, stride), x, w)
        ref, vjp_ref = jax.vjp(lambda x, w: _grouped_conv(x, w, stride), x, w)
        return (out, *vjp(cotangent)), (ref, *vjp_ref(cotangent))

    ours, reference = outputs_and_vjps(x, conv.kernel[...], cotangent)
    # forward, input gradient and kernel gradient (the hand-written VJP)
    for got, expected in zip(ours, reference, strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_depthwise_training_step_computes_each_tap_sum_once():
    # Between two batch norms (as in EfficientNet) XLA:CPU fused the plain
    # k*k-tap sum into each of its consumers and recomputed it there (11
    # computations held the nine taps, against 3 with `_shifted_sum_once`):
    # the forward, the input gradient and the kernel gradient, once each.
    def batch_norm(x, scale):
        return normalize_groups(x[None], scale, 0.1 * scale, (1, 2, 3), 1e-5)[0][0]

    def loss(x, kernel, scale):
        y = depthwise_conv_same(jnp.clip(batch_norm(x, scale), 0, 6), kernel, 1)
        return jnp.sum(jnp.square(jnp.clip(batch_norm(y, 1.5 * scale), 0, 6)))

    args = jnp.ones((8, 8, 4, 64)), jnp.ones((3, 3, 1, 64)), jnp.ones(64)
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile().as_text()
    computations = re.split(r"\n(?=\S)", hlo)  # top-level blocks: one per computation
    assert sum(c.count(" slice(") >= 9 for c in computations) == 3


@pytest.mark.parametrize(
    "size, kernel, stride, padding",
    # ResNet's 3x3 (stride 1 and 2) and 7x7 stem, EfficientNet's "SAME" stem, odd sizes
    # and maps no larger than the kernel (the per-tap input gradient)
    [
        ((8, 6), 3, 1, 1),
        ((9, 7), 3, 2, 1),
        ((10, 8), 3, 2, 1),
        ((16, 10), 7, 2, 3),
        ((9, 8), 3, 2, "SAME"),
        ((4, 2), 3, 1, 1),
        ((3, 3), 3, 2, "SAME"),
    ],
)
def test_conv_vjp_matches_autodiff_of_the_convolution(size, kernel, stride, padding):
    x = jax.random.normal(jax.random.key(1), (2, *size, 5))
    w = jax.random.normal(jax.random.key(2), (kernel, kernel, 5, 4))
    pads = conv_padding(size, kernel, stride, padding)

    def reference(x, w):
        return jax.lax.conv_general_dilated(
            x, w, (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    out, vjp = jax.vjp(lambda x, w: conv2d(x, w, stride, pads), x, w)
    expected, vjp_ref = jax.vjp(reference, x, w)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    cotangent = jax.random.normal(jax.random.key(3), out.shape)
    for got, want in zip(vjp(cotangent), vjp_ref(cotangent), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize(
    "size, padding",
    # ResNet's padding 1; no padding; uneven padding; sizes that leave partial
    # tiles at the bottom and right, a map of one tile.
    [((8, 6), 1), ((9, 7), 1), ((6, 11), 0), ((5, 4), ((2, 0), (1, 2))), ((4, 4), 1)],
)
def test_winograd_conv3x3_and_its_vjp_match_the_direct_convolution_in_float64(size, padding):
    pads = conv_padding(size, 3, 1, padding) if isinstance(padding, int) else padding
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(2, *size, 5)))
        w = jnp.asarray(rng.normal(size=(3, 3, 5, 4)))

        def reference(x, w):
            return jax.lax.conv_general_dilated(
                x, w, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC")
            )

        out, vjp = jax.vjp(lambda x, w: winograd.conv3x3(x, w, pads), x, w)
        expected, vjp_ref = jax.vjp(reference, x, w)
        assert out.dtype == jnp.float64
        np.testing.assert_allclose(out, expected, atol=1e-11)
        cotangent = jnp.asarray(rng.normal(size=out.shape))
        for got, want in zip(vjp(cotangent), vjp_ref(cotangent), strict=True):
            np.testing.assert_allclose(got, want, atol=1e-11)


def test_winograd_conv3x3_float32_error_near_the_direct_convolution():
    # ResNet's layer1 shape. F(4x4, 3x3) loses about 4 bits against the direct
    # convolution (its transforms scale by up to 8 and 1/24): measured 4.9e-6
    # of the largest output against 3.2e-7, well inside float32 training noise.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 16, 8, 64))
    w = rng.normal(size=(3, 3, 64, 64)) * 0.05
    pads = ((1, 1), (1, 1))

    def direct(x, w):
        return jax.lax.conv_general_dilated(
            x, w, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    with jax.enable_x64(True):
        exact = np.asarray(direct(jnp.asarray(x), jnp.asarray(w)))
    x32, w32 = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
    scale = np.abs(exact).max()
    wino_error = np.abs(np.asarray(winograd.conv3x3(x32, w32, pads)) - exact).max() / scale
    direct_error = np.abs(np.asarray(direct(x32, w32)) - exact).max() / scale
    assert direct_error < 1e-6
    assert wino_error < 2e-5


def test_winograd_applies_only_to_3x3_stride_1_on_larger_maps():
    assert winograd.applies((2, 8, 6, 5), (3, 3, 5, 4), 1, ((1, 1), (1, 1)))
    assert not winograd.applies((2, 8, 6, 5), (3, 3, 5, 4), 2, ((1, 1), (1, 1)))  # stride
    assert not winograd.applies((2, 8, 6, 5), (7, 7, 5, 4), 1, ((3, 3), (3, 3)))  # 7x7
    assert not winograd.applies((2, 3, 6, 5), (3, 3, 5, 4), 1, ((1, 1), (1, 1)))  # 3 rows
    assert not winograd.applies((2, 8, 6, 5), (3, 3, 5, 4), 1, ((3, 3), (1, 1)))  # pad 3


def test_conv_routes_winograd_only_when_asked_and_stems_through_space_to_depth():
    pads = ((1, 1), (1, 1))
    x = jax.random.normal(jax.random.key(0), (2, 8, 6, 5))
    plain = Conv(5, 4, 3, 1, 1, dtype=jnp.float32, rngs=nnx.Rngs(0))
    fast = Conv(5, 4, 3, 1, 1, dtype=jnp.float32, rngs=nnx.Rngs(0), winograd=True)
    kernel = plain.kernel[...]
    np.testing.assert_array_equal(plain(x), conv2d(x, kernel, 1, pads))
    np.testing.assert_array_equal(fast(x), winograd.conv3x3(x, kernel, pads))
    strided = Conv(5, 4, 3, 2, 1, dtype=jnp.float32, rngs=nnx.Rngs(0), winograd=True)
    np.testing.assert_array_equal(strided(x), conv2d(x, kernel, 2, pads))  # not Winograd's
    stem = Conv(3, 4, 7, 2, 3, dtype=jnp.float32, rngs=nnx.Rngs(0))
    image = jax.random.normal(jax.random.key(1), (2, 16, 10, 3))
    stem_pads = ((3, 3), (3, 3))
    np.testing.assert_array_equal(
        stem(image), space_to_depth_conv(image, stem.kernel[...], stem_pads)
    )
    with export_mode():  # exporters get the plain convolution
        np.testing.assert_array_equal(stem(image), conv2d(image, stem.kernel[...], 2, stem_pads))


@pytest.mark.parametrize(
    "size, kernel, padding",
    # ResNet's / OSNet's 7x7 stem, EfficientNet's "SAME" 3x3 stem, odd sizes
    [((16, 10), 7, 3), ((15, 9), 7, 3), ((9, 8), 3, "SAME"), ((8, 8), 3, "SAME")],
)
def test_space_to_depth_conv_and_its_vjp_match_the_stride_2_convolution(size, kernel, padding):
    pads = conv_padding(size, kernel, 2, padding)
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(2, *size, 3)))
        w = jnp.asarray(rng.normal(size=(kernel, kernel, 3, 4)))

        def reference(x, w):
            return jax.lax.conv_general_dilated(
                x, w, (2, 2), pads, dimension_numbers=("NHWC", "HWIO", "NHWC")
            )

        out, vjp = jax.vjp(lambda x, w: space_to_depth_conv(x, w, pads), x, w)
        expected, vjp_ref = jax.vjp(reference, x, w)
        np.testing.assert_allclose(out, expected, atol=1e-11)
        cotangent = jnp.asarray(rng.normal(size=out.shape))
        for got, want in zip(vjp(cotangent), vjp_ref(cotangent), strict=True):
            np.testing.assert_allclose(got, want, atol=1e-11)


def test_pointwise_conv_matches_strided_1x1_convolution():
    conv = PointwiseConv(4, 3, stride=2, dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 7, 6, 4))
    expected = jax.lax.conv_general_dilated(
        x, conv.kernel[...], (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(conv(x), expected, atol=1e-5)

    # the hand-written VJP (input and kernel gradients) against the convolution's
    def conv_1x1(x, kernel):
        return jax.lax.conv_general_dilated(
            x, kernel, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    cotangent = jax.random.normal(jax.random.key(2), expected.shape)
    kernel = conv.kernel[...]
    _, vjp = jax.vjp(lambda x, w: pointwise_conv(x[:, ::2, ::2], w[0, 0]), x, kernel)
    _, vjp_ref = jax.vjp(conv_1x1, x, kernel)
    for got, want in zip(vjp(cotangent), vjp_ref(cotangent), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_batch_norm_vjp_matches_autodiff_of_its_forward():
    """normalize_groups' hand-written VJP, with cotangents on all three outputs
    (the normalised map, the group mean and the biased group variance)."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(1.5, 2.0, (2, 4, 3, 2, 5)), jnp.float32)  # 2 groups of 4
    scale = jnp.asarray(rng.uniform(0.5, 2.0, 5), jnp.float32)
    bias = jnp.asarray(rng.normal(size=5), jnp.float32)
    axes = (1, 2, 3)

    def reference(x, scale, bias):
        mean = x.mean(axes, keepdims=True)
        var = jnp.square(x - mean).mean(axes, keepdims=True)
        return (x - mean) / jnp.sqrt(var + 1e-3) * scale + bias, mean, var

    outputs, vjp = jax.vjp(lambda *a: normalize_groups(*a, axes, 1e-3), x, scale, bias)
    expected, vjp_ref = jax.vjp(reference, x, scale, bias)
    cotangents = tuple(jnp.asarray(rng.normal(size=o.shape), jnp.float32) for o in expected)
    for got, want in zip(outputs, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    for got, want in zip(vjp(cotangents), vjp_ref(cotangents), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_ibn_instance_normalises_first_half_per_sample():
    ibn = IBN(6)
    assert ibn.half == 3 and ibn.BN.feature_shape == (3,)
    x = np.random.default_rng(6).normal(3.0, 2.0, (4, 5, 4, 6)).astype(np.float32)
    y = np.asarray(ibn(jnp.asarray(x), train=True))
    # instance half: zero mean / unit variance per sample and channel
    np.testing.assert_allclose(y[..., :3].mean((1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(y[..., :3].var((1, 2)), 1, atol=1e-3)
    # ... and independent of the other samples, unlike the batch-norm half
    x2 = x.copy()
    x2[1:] += 10.0
    y2 = np.asarray(ibn(jnp.asarray(x2), train=True))
    np.testing.assert_allclose(y2[0, ..., :3], y[0, ..., :3], atol=1e-5)
    assert np.abs(y2[0, ..., 3:] - y[0, ..., 3:]).max() > 0.1


def test_ibn_a_only_in_layers_1_to_3():
    model = nnx.eval_shape(lambda: models.build_model(_config(ibn=True), nnx.Rngs(0)))
    backbone = model.backbone
    for stage in (backbone.layer1, backbone.layer2, backbone.layer3):
        assert all(isinstance(block.bn1, IBN) for block in stage)
        assert all(isinstance(block.bn2, GhostBatchNorm) for block in stage)
    assert all(isinstance(block.bn1, GhostBatchNorm) for block in backbone.layer4)
    assert isinstance(backbone.bn1, GhostBatchNorm)


# --------------------------------------------------------------------- shapes


def _abstract_outputs(config, height, width, batch=2):
    model = nnx.eval_shape(lambda: models.build_model(config, nnx.Rngs(0)))
    graphdef, params, stats = models.split_model(model)
    images = jax.ShapeDtypeStruct((batch, height, width, 3), jnp.float32)

    def run(params, stats, images):
        merged = nnx.merge(graphdef, params, stats)
        return merged.backbone(images, train=False), merged(images, train=False)

    return jax.eval_shape(run, params, stats, images)


@pytest.mark.parametrize(
    "backbone, last_stride, feature_map",
    [
        ("resnet50", 1, (16, 8, 2048)),
        ("resnet50", 2, (8, 4, 2048)),
        ("resnet34", 1, (16, 8, 512)),
        ("efficientnet_lite0", 1, (16, 8, 1280)),
        ("efficientnet_lite0", 2, (8, 4, 1280)),
    ],
)
def test_feature_map_and_output_shapes_at_256x128(backbone, last_stride, feature_map):
    config = models.default_model_config()
    config.update(backbone=backbone, last_stride=last_stride)
    fmap, outputs = _abstract_outputs(config, 256, 128)
    assert fmap.shape == (2, *feature_map)
    assert feature_map[-1] == models.feature_dim(backbone)
    assert outputs["global"].shape == (2, 2048) and outputs["global"].dtype == jnp.float32
    assert outputs["stripes"].shape == (2, 8, 256)
    assert models.embedding_dim(config) == 2048


def test_bnneck_shapes_and_no_projection_when_embed_dim_is_zero():
    config = _config(head="bnneck", embed_dim=0, backbone="resnet50", pooling="gem")
    _, outputs = _abstract_outputs(config, 256, 128)
    assert outputs["global"].shape == (2, 2048) and "stripes" not in outputs
    assert outputs["pre_bn"].shape == (2, 2048)
    assert models.embedding_dim(config) == 2048
    config.embed_dim = 256
    _, outputs = _abstract_outputs(config, 256, 128)
    assert outputs["global"].shape == (2, 256) == outputs["pre_bn"].shape


def test_config_errors():
    with pytest.raises(ValueError, match="multiple of num_stripes"):
        models.build_model(_config(embed_dim=30), nnx.Rngs(0))
    with pytest.raises(ValueError, match="winograd is only available for the ResNets"):
        models.build_model(_config(backbone="efficientnet_lite0", winograd=True), nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown backbone"):
        models.build_model(_config(backbone="vgg16"), nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown head"):
        models.build_model(_config(head="arcface"), nnx.Rngs(0))


# ------------------------------------------------- the compiled functional core


@pytest.fixture(scope="module")
def resnet18_scl():
    """One model, two compiled functions shared by the tests below (compiles are
    the expensive part on CPU): eval forward, and train forward + backward."""
    config = _config(pooling="gem", bn_group_size=2)
    graphdef, params, stats = models.split_model(models.build_model(config, nnx.Rngs(0)))
    evaluate = jax.jit(lambda p, s, x: models.apply_model(graphdef, p, s, x, train=False))

    def loss(params, stats, images):
        outputs, new_stats = models.apply_model(graphdef, params, stats, images, train=True)
        return sum(jnp.sum(v) for v in outputs.values()), (outputs, new_stats)

    train = jax.jit(jax.value_and_grad(loss, has_aux=True))
    return params, stats, evaluate, train


def test_split_model_state_is_params_and_batch_stats_only(resnet18_scl):
    params, stats, _, _ = resnet18_scl
    param_paths = {p for p, _ in nnx.to_flat_state(params)}
    stat_paths = {p for p, _ in nnx.to_flat_state(stats)}
    assert ("head", "pool", "p") in param_paths
    assert ("backbone", "bn1", "mean") in stat_paths
    assert ("backbone", "bn1", "mean") not in param_paths
    assert all(p[-1] in ("mean", "var") for p in stat_paths)
    assert all(v[...].dtype == jnp.float32 for _, v in nnx.to_flat_state(params))


def test_scl_outputs_unit_norm_gradients_and_purity(resnet18_scl):
    params, stats, evaluate, train = resnet18_scl
    images = _images(4)
    stats_before = jax.tree.map(np.array, stats)

    (value, (train_out, train_stats)), grads = train(params, stats, images)
    eval_out, eval_stats = evaluate(params, stats, images)
    again, _ = evaluate(params, stats, images)

    assert train_out["global"].shape == (4, 64) and train_out["stripes"].shape == (4, 4, 16)
    assert train_out["pre_bn"].shape == (4, 64)
    for out in (train_out, eval_out):
        np.testing.assert_allclose(jnp.linalg.norm(out["global"], axis=-1), 1, atol=1e-5)
        np.testing.assert_allclose(jnp.linalg.norm(out["stripes"], axis=-1), 1, atol=1e-5)
    # eval: batch_stats returned unchanged; train: running stats moved
    jax.tree.map(np.testing.assert_array_equal, eval_stats, stats)
    assert np.abs(train_stats["backbone"]["bn1"]["mean"][...]).max() > 0
    assert jax.tree.structure(train_stats) == jax.tree.structure(stats)
    # nothing passed in was mutated; same inputs -> same outputs
    jax.tree.map(np.testing.assert_array_equal, stats_before, jax.tree.map(np.array, stats))
    np.testing.assert_array_equal(again["global"], eval_out["global"])
    # gradients are finite and reach the backbone, both heads and GeM's p
    assert np.isfinite(value)
    norms = {path: float(jnp.linalg.norm(g[...])) for path, g in nnx.to_flat_state(grads)}
    assert all(np.isfinite(n) for n in norms.values())
    for path in (("head", "pool", "p"), ("backbone", "conv1", "kernel"), ("head", "stripe_kernel")):
        assert norms[path] > 0, path


def test_ghost_bn_group_size_makes_samples_depend_only_on_their_group(resnet18_scl):
    params, stats, _, train = resnet18_scl  # bn_group_size = 2
    images = _images(4, seed=1)
    (_, (out, _)), _ = train(params, stats, images)
    changed = images.at[2:].set(255.0 - images[2:])
    (_, (out_changed, _)), _ = train(params, stats, changed)
    # group 0 (samples 0, 1) is unaffected by what happens in group 1
    np.testing.assert_allclose(out_changed["global"][:2], out["global"][:2], atol=1e-5)
    assert np.abs(out_changed["global"][2:] - out["global"][2:]).max() > 1e-3


def test_bfloat16_runs_with_float32_params_and_outputs_close_to_float32():
    outputs = {}
    for dtype in ("float32", "bfloat16"):
        config = _config(dtype=dtype, head="bnneck", embed_dim=0)
        model = models.build_model(config, nnx.Rngs(0))
        graphdef, params, stats = models.split_model(model)
        assert all(v[...].dtype == jnp.float32 for _, v in nnx.to_flat_state(params))
        outputs[dtype], _ = jax.jit(models.apply_model, static_argnums=(0, 4))(
            graphdef, params, stats, _images(2, seed=3), False
        )
    low, high = outputs["bfloat16"]["global"], outputs["float32"]["global"]
    assert low.dtype == jnp.float32 and outputs["bfloat16"]["pre_bn"].dtype == jnp.float32
    cosine = jnp.sum(low * high, -1)  # both unit norm in eval
    assert float(cosine.min()) > 0.99
    assert float(jnp.abs(low - high).max()) > 0  # really computed in lower precision

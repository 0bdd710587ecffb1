"""Building blocks shared by the backbones and heads: ghost batch norm, instance
norm, IBN-a, pooling (average / GeM / horizontal stripes) and L2 normalisation.

All normalisation statistics are computed in float32 whatever the compute dtype,
and every norm layer casts its output back to its input dtype, so a bfloat16
network stays bfloat16 between layers while the statistics stay exact.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# torch's BatchNorm momentum 0.1 (running = 0.9 * running + 0.1 * batch), i.e. flax
# momentum 0.9. Same value for every norm layer of every model.
BN_MOMENTUM = 0.1


def _host_normal(key: jax.Array, shape: tuple[int, ...], std: float, dtype) -> jax.Array:
    """std * N(0, 1) drawn with numpy (PCG64 seeded from the jax key's data).

    Why: eager jax.random draws compile one XLA program per distinct shape, which
    made building a ResNet-50 take > 10 s on a 2-core CPU; numpy needs no
    compilation. Under tracing (jit / eval_shape) the same numpy draw runs as a
    pure_callback, so a given key gives the same weights either way.
    """
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    out_dtype = np.dtype(dtype)

    def sample(key_data) -> np.ndarray:
        rng = np.random.default_rng(np.asarray(key_data, np.uint32).ravel())
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(out_dtype)

    try:
        host_data = np.asarray(data)
    except jax.errors.TracerArrayConversionError:
        return jax.pure_callback(sample, jax.ShapeDtypeStruct(shape, out_dtype), data)
    return jnp.asarray(sample(host_data))


def he_normal_fan_out(in_axis: int = -2, out_axis: int = -1, batch_axis: Sequence[int] = ()):
    """torch's kaiming_normal_(mode="fan_out", nonlinearity="relu"): N(0, 2 / fan_out)
    with fan_out = out features x receptive field (batch axes excluded)."""

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        shape = tuple(shape)
        skip = {a % len(shape) for a in (in_axis, out_axis, *batch_axis)}
        receptive = math.prod(d for a, d in enumerate(shape) if a not in skip)
        return _host_normal(key, shape, math.sqrt(2.0 / (shape[out_axis] * receptive)), dtype)

    return init


def host_zeros(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    """Zeros without an XLA compile per shape (see _host_normal)."""
    del key
    return jnp.asarray(np.zeros(tuple(shape), np.dtype(dtype)))


def _filled(shape: tuple[int, ...], value: float) -> jax.Array:
    return jnp.asarray(np.full(shape, value, np.float32))


kaiming_fan_out = he_normal_fan_out()


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def normalize_groups(
    grouped: jax.Array, scale: jax.Array, bias: jax.Array, axes: tuple[int, ...], epsilon: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training batch norm of float32 `grouped` over `axes` (per group):
    (scale * xhat + bias, mean, biased variance), statistics kept as size-1 axes.

    The hand-written VJP is the textbook one (two sums, then one elementwise
    pass that recomputes xhat from x): about half the time of autodiff of the
    same forward on CPU, whose passes over the activations were half of
    EfficientNet-Lite0's backward.
    """
    return _normalize_groups_fwd(grouped, scale, bias, axes, epsilon)[0]


def _normalize_groups_fwd(grouped, scale, bias, axes, epsilon):
    mean = jnp.mean(grouped, axes, keepdims=True)
    var = jnp.mean(jnp.square(grouped - mean), axes, keepdims=True)
    rstd = jax.lax.rsqrt(var + epsilon)
    y = (grouped - mean) * rstd * scale + bias
    return (y, mean, var), (grouped, mean, rstd, scale)


def _normalize_groups_bwd(axes, epsilon, residuals, cotangents):
    x, mean, rstd, scale = residuals
    g, g_mean, g_var = cotangents
    n = math.prod(x.shape[a] for a in axes)
    xhat = (x - mean) * rstd
    # Two plain sums: XLA:CPU's variadic (fused) reduction over these axes is slower.
    sum_g = jnp.sum(g, axes, keepdims=True)
    sum_g_xhat = jnp.sum(g * xhat, axes, keepdims=True)
    every_group = (0, *axes)
    grad_bias = jnp.sum(sum_g, every_group).reshape(scale.shape)
    grad_scale = jnp.sum(sum_g_xhat, every_group).reshape(scale.shape)
    grad_x = (scale * rstd) * (g - (sum_g + xhat * sum_g_xhat) / n)
    # The statistics are outputs too (running averages): their own cotangents.
    grad_x = grad_x + g_mean / n + g_var * (2.0 / n) * (x - mean)
    return grad_x, grad_scale, grad_bias


normalize_groups.defvjp(_normalize_groups_fwd, _normalize_groups_bwd)


class GhostBatchNorm(nnx.Module):
    """Batch norm whose training statistics come from fixed groups of samples.

    In training the batch (axis 0) is cut into consecutive groups of `group_size`
    samples (0 = the whole batch) and each group is normalised with its own mean
    and biased variance over the samples and every axis between the batch axis and
    the feature axes. The result therefore depends only on the group size, never
    on how many devices the batch is sharded over.

    Running statistics (used in eval) follow torch: running = (1 - m) * running +
    m * batch with m = 0.1, where the batch mean is the mean over groups of the
    group means and the batch variance is the mean over groups of the UNBIASED
    group variances (n / (n - 1) with n = elements per channel in a group), as
    torch's running_var. With one group this is exactly torch's BatchNorm; with
    several it estimates the within-group variance that training normalises with.

    `feature_shape` is the trailing shape that gets its own statistics: (C,) for an
    (B, H, W, C) map or (B, C) vector; (P, D) for P independent BatchNorm1d layers
    applied to (B, P, D) stripes.
    """

    def __init__(
        self,
        feature_shape: int | Sequence[int],
        *,
        group_size: int = 0,
        epsilon: float = 1e-5,
        use_bias: bool = True,
    ):
        if isinstance(feature_shape, int):
            feature_shape = (feature_shape,)
        self.feature_shape = tuple(int(d) for d in feature_shape)
        self.group_size = int(group_size)
        self.epsilon = float(epsilon)
        self.scale = nnx.Param(_filled(self.feature_shape, 1.0))
        # BN-neck layers have no bias (the torch recipe freezes it at zero).
        self.bias = nnx.Param(_filled(self.feature_shape, 0.0)) if use_bias else None
        self.mean = nnx.BatchStat(_filled(self.feature_shape, 0.0))
        self.var = nnx.BatchStat(_filled(self.feature_shape, 1.0))

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        nfeat = len(self.feature_shape)
        if x.shape[x.ndim - nfeat :] != self.feature_shape:
            raise ValueError(f"expected trailing shape {self.feature_shape}, got {x.shape}")
        x32 = x.astype(jnp.float32)
        if train:
            batch = x.shape[0]
            group = self.group_size or batch
            if batch % group:
                raise ValueError(f"batch size {batch} is not divisible by bn_group_size {group}")
            grouped = x32.reshape((batch // group, group) + x.shape[1:])
            axes = tuple(range(1, grouped.ndim - nfeat))
            bias = self.bias[...] if self.bias is not None else jnp.zeros_like(self.scale[...])
            y, mean, var = normalize_groups(grouped, self.scale[...], bias, axes, self.epsilon)
            y = y.reshape(x.shape)
            n = math.prod(grouped.shape[a] for a in axes)
            unbiased = var * (n / (n - 1)) if n > 1 else var
            stats_shape = (batch // group,) + self.feature_shape
            batch_mean = mean.reshape(stats_shape).mean(0)
            batch_var = unbiased.reshape(stats_shape).mean(0)
            m = BN_MOMENTUM
            self.mean[...] = (1 - m) * self.mean[...] + m * jax.lax.stop_gradient(batch_mean)
            self.var[...] = (1 - m) * self.var[...] + m * jax.lax.stop_gradient(batch_var)
            return y.astype(x.dtype)
        y = (x32 - self.mean[...]) * jax.lax.rsqrt(self.var[...] + self.epsilon)
        y = y * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(x.dtype)


class InstanceNorm(nnx.Module):
    """Affine instance norm of (B, H, W, C): torch InstanceNorm2d(affine=True),
    always instance statistics (no running stats), biased variance."""

    def __init__(self, num_features: int, *, epsilon: float = 1e-5):
        self.epsilon = float(epsilon)
        self.scale = nnx.Param(_filled((num_features,), 1.0))
        self.bias = nnx.Param(_filled((num_features,), 0.0))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean((1, 2), keepdims=True)
        var = jnp.square(x32 - mean).mean((1, 2), keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class IBN(nnx.Module):
    """IBN-a norm (Pan et al., IBN-Net): the first `num_features // 2` channels go
    through an affine InstanceNorm, the rest through batch norm. Attribute names
    `IN` / `BN` mirror IBN-Net's checkpoints (`layer1.0.bn1.IN.weight`, ...)."""

    def __init__(self, num_features: int, *, group_size: int = 0, epsilon: float = 1e-5):
        self.half = num_features // 2
        self.IN = InstanceNorm(self.half, epsilon=epsilon)
        self.BN = GhostBatchNorm(num_features - self.half, group_size=group_size, epsilon=epsilon)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        return jnp.concatenate(
            [self.IN(x[..., : self.half]), self.BN(x[..., self.half :], train)], axis=-1
        )


# Set by `export_friendly()`: models are being traced for ONNX export.
_EXPORTING = False


@contextlib.contextmanager
def export_friendly():
    """Trace the models with formulations an ONNX exporter maps to standard
    operators (same forward values; training keeps the XLA-friendly ones)."""
    global _EXPORTING
    previous, _EXPORTING = _EXPORTING, True
    try:
        yield
    finally:
        _EXPORTING = previous


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """torch MaxPool2d(3, stride=2, padding=1) on NHWC: padding never wins the max.

    reduce_window with a scalar -inf init (lax recognises the max monoid, so
    it is differentiable); under `export_friendly()` the max of the nine
    strided slices of the -inf-padded map, the same values (exporters turn the
    NHWC reduce_window into a pooling ONNX Runtime rejects)."""
    if not _EXPORTING:
        return jax.lax.reduce_window(
            x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
        )
    _, h, w, _ = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    out_h, out_w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    out = None
    for i in range(3):
        for j in range(3):
            window = padded[:, i : i + 2 * out_h - 1 : 2, j : j + 2 * out_w - 1 : 2]
            out = window if out is None else jnp.maximum(out, window)
    return out


def avg_pool(feature_map: jax.Array) -> jax.Array:
    """Global average pool (B, H, W, C) -> (B, C) in float32."""
    return feature_map.astype(jnp.float32).mean((1, 2))


class GeM(nnx.Module):
    """Generalised-mean pooling, (mean(clamp(x, eps)^p))^(1/p) with a trainable p
    (init 3); p = 1 is average pooling, p -> inf max pooling."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        self.p = nnx.Param(_filled((1,), p))
        self.eps = float(eps)

    def __call__(self, feature_map: jax.Array) -> jax.Array:
        p = self.p[...]
        x = jnp.maximum(feature_map.astype(jnp.float32), self.eps)
        if _EXPORTING:
            # x^p as exp(p log x) (x >= eps > 0): jax2onnx's power cannot
            # broadcast the exponent against a symbolic batch dimension.
            return jnp.exp(jnp.log(jnp.exp(jnp.log(x) * p).mean((1, 2))) / p)
        return jnp.power(jnp.power(x, p).mean((1, 2)), 1.0 / p)


class AvgPool(nnx.Module):
    """Module wrapper of `avg_pool` so heads can hold either pooling."""

    def __call__(self, feature_map: jax.Array) -> jax.Array:
        return avg_pool(feature_map)


def make_pool(pooling: str) -> nnx.Module:
    if pooling == "avg":
        return AvgPool()
    if pooling == "gem":
        return GeM()
    raise ValueError(f"unknown pooling {pooling!r}; expected 'avg' or 'gem'")


def stripe_bins(height: int, num_stripes: int) -> list[tuple[int, int]]:
    """Row ranges [start, end) of the P horizontal stripes of a map of `height` rows.

    Same bins as torch's AdaptiveAvgPool2d((P, 1)): start = floor(p * H / P),
    end = ceil((p + 1) * H / P). When P divides H these are P disjoint stripes of
    H / P rows; otherwise neighbouring stripes share a boundary row (e.g. H = 4,
    P = 3 -> rows [0, 2), [1, 3), [2, 4)), and when P > H rows are repeated.
    """
    return [
        (p * height // num_stripes, -((-(p + 1) * height) // num_stripes))
        for p in range(num_stripes)
    ]


def stripe_pool(feature_map: jax.Array, num_stripes: int) -> jax.Array:
    """Average pool of each horizontal stripe: (B, H, W, C) -> (B, P, C), float32.

    One einsum against a static (P, H) averaging matrix built from `stripe_bins`.
    """
    height, width = feature_map.shape[1], feature_map.shape[2]
    weights = np.zeros((num_stripes, height), np.float32)
    for p, (start, end) in enumerate(stripe_bins(height, num_stripes)):
        weights[p, start:end] = 1.0 / ((end - start) * width)
    rows = feature_map.astype(jnp.float32).sum(2)  # (B, H, C)
    return jnp.einsum("ph,bhc->bpc", weights, rows, precision=jax.lax.Precision.HIGHEST)


# ----------------------------------------------------------------- convolutions
# XLA's CPU backend is slow on two convolution kinds this project uses a lot
# (measured on the 2-core dev machine, batch 8): the backward of 1x1 convolutions
# (6x slower than the same matmul) and grouped (depthwise) convolutions (10-100x
# slower than a sum of shifted copies). These modules keep nnx.Conv's parameter
# layout (kernel (kh, kw, in / groups, out)) so checkpoints map the same way.


class PointwiseConv(nnx.Module):
    """1x1 convolution without bias as a matmul; stride s keeps every s-th pixel
    (torch Conv2d(k=1, stride=s, padding=0) and TF "SAME" for k = 1 alike)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, *, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(kaiming_fan_out(rngs.params(), (1, 1, in_ch, out_ch)))
        self.stride = stride
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.stride > 1:
            x = x[:, :: self.stride, :: self.stride]
        return pointwise_conv(x.astype(self.dtype), self.kernel[...][0, 0].astype(self.dtype))


@jax.custom_vjp
def pointwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """(B, H, W, C) x (C, D) -> (B, H, W, D): a 1x1 convolution as a matmul.

    The VJP writes the kernel gradient as (g^T x)^T over the flattened pixels.
    Autodiff's form made XLA:CPU lay the activation out transposed for the
    matmul, in a copy fused with its producers (batch norm, ReLU) that took
    10x the matmul itself (~30% of EfficientNet-Lite0's backward).
    """
    return jnp.einsum("bhwc,cd->bhwd", x, kernel)


def _pointwise_fwd(x, kernel):
    return pointwise_conv(x, kernel), (x, kernel)


def _pointwise_bwd(residuals, grad):
    x, kernel = residuals
    pixels = math.prod(x.shape[:-1])
    grad_kernel = jnp.einsum(
        "nd,nc->dc", grad.reshape(pixels, grad.shape[-1]), x.reshape(pixels, x.shape[-1])
    ).T
    grad_x = jnp.einsum("bhwd,cd->bhwc", grad, kernel)
    return grad_x, grad_kernel.astype(kernel.dtype)


pointwise_conv.defvjp(_pointwise_fwd, _pointwise_bwd)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding along one axis (the odd pixel goes after)."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _shifted_sum(padded: jax.Array, kernel: jax.Array, stride: int, out_h: int, out_w: int):
    """sum_ij padded[:, i + s*y, j + s*x, c] * kernel[i, j, 0, c], float32 accumulation."""
    k = kernel.shape[0]
    out = jnp.zeros((padded.shape[0], out_h, out_w, padded.shape[3]), jnp.float32)
    for i in range(k):
        for j in range(k):
            window = padded[
                :,
                i : i + (out_h - 1) * stride + 1 : stride,
                j : j + (out_w - 1) * stride + 1 : stride,
            ]
            out = out + (window * kernel[i, j, 0]).astype(jnp.float32)
    return out


def _pad_same(x: jax.Array, k: int, stride: int) -> tuple[jax.Array, int, int]:
    (top, bottom), (left, right) = (_same_padding(x.shape[a], k, stride) for a in (1, 2))
    return jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0))), top, left


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_conv_same(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Depthwise kxk convolution with TF "SAME" padding, as shifted sums.

    The hand-written VJP is again shifted sums (input gradient: the dilated,
    padded cotangent correlated with the flipped kernel; kernel gradient: one
    reduction per tap), 2-3x faster on CPU than differentiating the slices.
    """
    return _depthwise_same(x, kernel, stride, _shifted_sum)


def _depthwise_same(x: jax.Array, kernel: jax.Array, stride: int, tap_sum) -> jax.Array:
    """The forward of `depthwise_conv_same`, its k*k-tap sum done by `tap_sum`."""
    padded, _, _ = _pad_same(x, kernel.shape[0], stride)
    out_h, out_w = -(-x.shape[1] // stride), -(-x.shape[2] // stride)
    return tap_sum(padded, kernel, stride, out_h, out_w).astype(x.dtype)


def _shifted_sum_once(padded: jax.Array, kernel: jax.Array, stride: int, out_h: int, out_w: int):
    """`_shifted_sum` as its own XLA computation, whose output is written once.

    Why: in a training step XLA:CPU fused the plain k*k-tap sum into every
    consumer of its result (batch-norm statistics, normalisation, ReLU6 and
    their backward) and recomputed it there: 9 times per layer in
    EfficientNet-Lite0. The branch of a conditional is a fusion boundary; the
    predicate is always true, but XLA cannot see it through the barrier (a
    barrier on the sum itself does not survive XLA's CPU pipeline).
    """
    shape = (padded.shape[0], out_h, out_w, padded.shape[3])
    always = jax.lax.optimization_barrier(jnp.bool_(True))
    return jax.lax.cond(
        always,
        lambda p, k: _shifted_sum(p, k, stride, out_h, out_w),
        lambda p, k: jnp.zeros(shape, jnp.float32),
        padded,
        kernel,
    )


def _depthwise_fwd(x, kernel, stride):
    # Only under differentiation (a training step); inference keeps the plain
    # sum, which its single consumer fuses without recomputing.
    return _depthwise_same(x, kernel, stride, _shifted_sum_once), (x, kernel)


def _depthwise_bwd(stride, residuals, grad):
    x, kernel = residuals
    k = kernel.shape[0]
    padded, top, left = _pad_same(x, k, stride)
    channels = padded.shape[3]
    height, width = x.shape[1], x.shape[2]
    out_h, out_w = grad.shape[1], grad.shape[2]
    # input gradient: scatter of grad * kernel = dilate grad by the stride, pad it
    # so that a correlation with the flipped kernel yields exactly (H, W) (not
    # the padded map, then cropped: 3x the work on the 8x4 maps of 5x5 layers).
    dilated = jax.lax.pad(
        grad,
        jnp.zeros((), grad.dtype),
        (
            (0, 0, 0),
            (k - 1 - top, height - 1 - (out_h - 1) * stride + top, stride - 1),
            (k - 1 - left, width - 1 - (out_w - 1) * stride + left, stride - 1),
            (0, 0, 0),
        ),
    )
    grad_x = _shifted_sum_once(dilated, kernel[::-1, ::-1], 1, height, width).astype(x.dtype)
    # Kernel gradient: per chunk of images, the k*k tap products summed in one
    # variadic reduction (one pass). The loop keeps XLA from fusing the
    # producers of `grad` (batch norm backward, this layer's forward) into the
    # k*k products, which recomputed them once per tap (5-10x slower).
    batch = x.shape[0]
    chunk = max(c for c in range(1, min(batch, 4) + 1) if batch % c == 0)

    def chunk_taps(total, chunk_data):
        p, g = chunk_data
        products = tuple(
            (
                p[
                    :,
                    i : i + (out_h - 1) * stride + 1 : stride,
                    j : j + (out_w - 1) * stride + 1 : stride,
                ]
                * g
            ).astype(jnp.float32)
            for i in range(k)
            for j in range(k)
        )
        sums = jax.lax.reduce(
            products,
            tuple(jnp.float32(0) for _ in products),
            lambda a, b: tuple(u + v for u, v in zip(a, b, strict=True)),
            (0, 1, 2),
        )
        return total + jnp.stack(sums), None

    taps, _ = jax.lax.scan(
        chunk_taps,
        jnp.zeros((k * k, channels), jnp.float32),
        (
            padded.reshape(batch // chunk, chunk, *padded.shape[1:]),
            grad.reshape(batch // chunk, chunk, *grad.shape[1:]),
        ),
    )
    grad_kernel = taps.reshape(k, k, 1, channels).astype(kernel.dtype)
    return grad_x, grad_kernel


depthwise_conv_same.defvjp(_depthwise_fwd, _depthwise_bwd)


def conv_padding(
    size: tuple[int, int], kernel: int, stride: int, padding: str | int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Explicit ((top, bottom), (left, right)): TF "SAME" or torch's symmetric int."""
    if padding == "SAME":
        return tuple(_same_padding(n, kernel, stride) for n in size)
    return ((padding, padding), (padding, padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding: tuple) -> jax.Array:
    """kxk convolution (B, H, W, C) x (k, k, C, D), explicit padding.

    The VJP uses only forward-form convolutions and matmuls: the input gradient
    is the (stride-dilated) cotangent correlated with the flipped kernel, the
    kernel gradient a matmul over image patches. Autodiff's gradient
    convolutions run 5-90x slower inside a loop body on XLA:CPU (the train
    step loops over batch-norm groups), where forward convolutions and
    matmuls keep their speed.
    """
    k = kernel.shape[0]
    if min(x.shape[1], x.shape[2]) > k:
        return jax.lax.conv_general_dilated(
            x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    # Maps no larger than the kernel: XLA swaps the convolution's operands into
    # a slow form; a patch matmul instead.
    patches = _patches(x, k, stride, padding)
    return jnp.einsum("bhwp,pd->bhwd", patches, kernel.reshape(-1, kernel.shape[-1]))


def _patches(x: jax.Array, k: int, stride: int, padding: tuple) -> jax.Array:
    """(B, H', W', k*k*C) image patches of the padded input, taps major."""
    padded = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    out_h = (padded.shape[1] - k) // stride + 1
    out_w = (padded.shape[2] - k) // stride + 1
    return jnp.concatenate(
        [
            padded[
                :,
                i : i + (out_h - 1) * stride + 1 : stride,
                j : j + (out_w - 1) * stride + 1 : stride,
            ]
            for i in range(k)
            for j in range(k)
        ],
        axis=-1,
    )


def _conv2d_fwd(x, kernel, stride, padding):
    return conv2d(x, kernel, stride, padding), (x, kernel)


def _conv2d_bwd(stride, padding, residuals, grad):
    x, kernel = residuals
    k = kernel.shape[0]
    (top, _), (left, _) = padding
    _, height, width, channels = x.shape
    out_h, out_w = grad.shape[1], grad.shape[2]
    flipped = jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))
    if min(height, width) > k:
        # input gradient: dilate the cotangent by the stride, pad it so that a
        # stride-1 correlation with the flipped, transposed kernel yields (H, W).
        dilated = jax.lax.pad(
            grad,
            jnp.zeros((), grad.dtype),
            ((0, 0, 0), (0, 0, stride - 1), (0, 0, stride - 1), (0, 0, 0)),
        )
        pad_h = (k - 1 - top, height - 1 - (out_h - 1) * stride + top)
        pad_w = (k - 1 - left, width - 1 - (out_w - 1) * stride + left)
        grad_x = jax.lax.conv_general_dilated(
            dilated, flipped, (1, 1), (pad_h, pad_w), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    else:
        # Maps smaller than the kernel: XLA would swap that convolution's
        # operands into a slow form. One matmul per tap, each added where its
        # pixels came from (the transposed patch extraction).
        padded_shape = (grad.shape[0], height + sum(padding[0]), width + sum(padding[1]), channels)
        grad_padded = jnp.zeros(padded_shape, jnp.float32)
        for i in range(k):
            for j in range(k):
                tap = jnp.einsum("bhwd,cd->bhwc", grad, kernel[i, j]).astype(jnp.float32)
                grad_padded = grad_padded.at[
                    :,
                    i : i + (out_h - 1) * stride + 1 : stride,
                    j : j + (out_w - 1) * stride + 1 : stride,
                ].add(tap)
        grad_x = grad_padded[:, top : top + height, left : left + width]
    if min(height, width) > k:
        grad_kernel = _conv2d_kernel_grad(x, grad, k, stride, padding)
    else:
        # kernel gradient: (patches^T g) with the patches of the padded input.
        patches = _patches(x, k, stride, padding)
        pixels = grad.shape[0] * out_h * out_w
        grad_kernel = jnp.einsum(
            "nd,nc->dc", grad.reshape(pixels, grad.shape[-1]), patches.reshape(pixels, -1)
        ).T.reshape(kernel.shape)
    return grad_x.astype(x.dtype), grad_kernel.astype(kernel.dtype)


def pad_to(x: jax.Array, top: int, left: int, rows: int, cols: int) -> jax.Array:
    """(B, H, W, C) with `top` / `left` zero rows / columns before it, then
    zero-padded or cropped at the bottom and right to exactly (rows, cols)."""
    height, width = x.shape[1], x.shape[2]
    pads = ((0, 0), (top, max(rows - height - top, 0)), (left, max(cols - width - left, 0)), (0, 0))
    return jnp.pad(x, pads)[:, :rows, :cols]


def _conv2d_kernel_grad(x, grad, k: int, stride: int, padding: tuple) -> jax.Array:
    """dW[i, j, c, d] = sum_{b,y,x} xpad[b, i + s y, j + s x, c] g[b, y, x, d], as a
    forward convolution of x with its batch and channel axes swapped (batch C,
    features B) by g as the kernel (out_h x out_w, B -> D, dilated by the stride).

    Why: the image-patch matmul materialised k*k shifted copies of x, into
    each of which XLA fused x's producer (batch norm + ReLU), and its
    concatenation ran far below memory speed (a third of a ResNet-50 step);
    autodiff's weight-gradient convolution is 100x slower inside the step's
    loop over groups. This forward form: layer4 3x3 kernel gradient 44 -> 31 ms.
    """
    (top, _), (left, _) = padding
    out_h, out_w = grad.shape[1], grad.shape[2]
    # The rows and columns of the padded input the forward read.
    need_h, need_w = stride * (out_h - 1) + k, stride * (out_w - 1) + k
    padded = pad_to(x, top, left, need_h, need_w)
    out = jax.lax.conv_general_dilated(
        jnp.transpose(padded, (3, 1, 2, 0)),  # (C, H, W, B)
        jnp.transpose(grad, (1, 2, 0, 3)),  # (out_h, out_w, B, D)
        (1, 1),
        "VALID",
        rhs_dilation=(stride, stride),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )  # (C, k, k, D)
    return jnp.transpose(out, (1, 2, 0, 3))


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def space_to_depth_conv(x: jax.Array, kernel: jax.Array, padding: tuple) -> jax.Array:
    """A stride-2 kxk convolution as a stride-1 one over 2x2 pixel blocks: the
    padded input's 2x2 blocks become 4C channels, the kernel (zero-padded to
    even size) (k'/2, k'/2, 4C, D). For stems of few input channels, whose
    stride-2 form XLA:CPU runs at half PyTorch's speed."""
    k = kernel.shape[0]
    even_k = k + k % 2
    (top, _), (left, _) = padding
    batch, height, width, channels = x.shape
    out_h = (height + sum(padding[0]) - k) // 2 + 1
    out_w = (width + sum(padding[1]) - k) // 2 + 1
    rows, cols = 2 * (out_h - 1) + even_k, 2 * (out_w - 1) + even_k
    blocks = pad_to(x, top, left, rows, cols).reshape(batch, rows // 2, 2, cols // 2, 2, channels)
    blocks = jnp.transpose(blocks, (0, 1, 3, 2, 4, 5)).reshape(
        batch, rows // 2, cols // 2, 4 * channels
    )
    even = jnp.pad(kernel, ((0, even_k - k), (0, even_k - k), (0, 0), (0, 0)))
    even = even.reshape(even_k // 2, 2, even_k // 2, 2, channels, -1)
    even = jnp.transpose(even, (0, 2, 1, 3, 4, 5)).reshape(
        even_k // 2, even_k // 2, 4 * channels, -1
    )
    return conv2d(blocks, even, 1, ((0, 0), (0, 0)))


class Conv(nnx.Module):
    """kxk convolution without bias, nnx.Conv's parameter layout (kernel (k, k,
    in, out)); on the CPU through `conv2d`'s gradient, elsewhere autodiff's.

    On the CPU, stride-2 stems (<= 4 input channels) run as `space_to_depth_conv`
    and, with `winograd`, 3x3 stride-1 ones as `winograd.conv3x3` (faster
    steps, several times longer compilation)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        stride: int = 1,
        padding: str | int = 0,
        *,
        dtype,
        rngs: nnx.Rngs,
        winograd: bool = False,
    ):
        self.kernel = nnx.Param(kaiming_fan_out(rngs.params(), (kernel, kernel, in_ch, out_ch)))
        self.stride = stride
        self.padding = padding
        self.dtype = dtype
        self.winograd = winograd

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        padding = conv_padding(x.shape[1:3], kernel.shape[0], self.stride, self.padding)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if jax.default_backend() == "cpu":
            if _EXPORTING:
                return conv2d(x, kernel, self.stride, padding)
            if self.stride == 2 and x.shape[-1] <= 4:
                return space_to_depth_conv(x, kernel, padding)
            if self.winograd:
                from jaxreid.models import winograd  # it imports this module

                if winograd.applies(x.shape, kernel.shape, self.stride, padding):
                    return winograd.conv3x3(x, kernel, padding)
            return conv2d(x, kernel, self.stride, padding)
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            (self.stride, self.stride),
            padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )


class DepthwiseConv(nnx.Module):
    """kxk depthwise convolution, TF "SAME" padding, no bias; kernel (k, k, 1, C)
    as nnx.Conv(feature_group_count=C) stores it. Shifted sums on CPU (see
    above), the native grouped convolution on other backends."""

    def __init__(self, channels: int, kernel: int, stride: int, *, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(kaiming_fan_out(rngs.params(), (kernel, kernel, 1, channels)))
        self.stride = stride
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        kernel = self.kernel[...].astype(self.dtype)
        if jax.default_backend() == "cpu":
            return depthwise_conv_same(x, kernel, self.stride)
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            (self.stride, self.stride),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=x.shape[-1],
        )

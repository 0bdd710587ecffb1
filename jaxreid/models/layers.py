"""Building blocks shared by the backbones and heads: ghost batch norm, instance
norm, IBN-a, pooling (average / GeM / horizontal stripes) and L2 normalisation,
the convolution modules, the initialisers, and the export switch (`export_mode`).

The CPU training kernels these layers call (custom VJPs) live in cpu_kernels.py.

All normalisation statistics are computed in float32 whatever the compute dtype,
and every norm layer casts its output back to its input dtype, so a bfloat16
network stays bfloat16 between layers while the statistics stay exact.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxreid.augment import normalize
from jaxreid.models import cpu_kernels, winograd

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
            y, mean, var = cpu_kernels.normalize_groups(
                grouped, self.scale[...], bias, axes, self.epsilon
            )
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
        if exporting():
            scale, shift = self.folded()
            return (x32 * scale + shift).astype(x.dtype)
        y = (x32 - self.mean[...]) * jax.lax.rsqrt(self.var[...] + self.epsilon)
        y = y * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(x.dtype)

    def folded(self) -> tuple[jax.Array, jax.Array]:
        """The eval-mode norm as x * scale + shift, both of `feature_shape`
        (host constants when the weights are concrete, see `host_constants`)."""
        gamma, mean, var = host_constants(self.scale[...], self.mean[...], self.var[...])
        scale = gamma * (var + self.epsilon) ** -0.5
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + host_constants(self.bias[...])[0]
        return scale, shift


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


# True inside `export_mode()`: models are being traced for ONNX export. A
# context variable, not a module global: the setting belongs to the code that
# traces inside the `with` block (jax traces in the calling thread).
_EXPORTING: contextvars.ContextVar[bool] = contextvars.ContextVar("exporting", default=False)


def exporting() -> bool:
    """Whether the layers are being traced inside `export_mode()`."""
    return _EXPORTING.get()


@contextlib.contextmanager
def export_mode():
    """Trace the models with formulations an ONNX exporter maps to standard
    operators (same forward values; training keeps the XLA-friendly ones)."""
    token = _EXPORTING.set(True)
    try:
        yield
    finally:
        _EXPORTING.reset(token)


export_friendly = export_mode  # its former name


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """torch MaxPool2d(3, stride=2, padding=1) on NHWC: padding never wins the max.

    reduce_window with a scalar -inf init (lax recognises the max monoid, so
    it is differentiable). Under `export_mode()` the -inf padding is explicit
    and the pooling `nnx.max_pool` with "VALID" windows: jax2onnx maps that to
    one ONNX MaxPool, where it maps the NHWC reduce_window to a MaxPool over
    four spatial axes that ONNX Runtime rejects."""
    pads = ((0, 0), (1, 1), (1, 1), (0, 0))
    if exporting():
        padded = jnp.pad(x, pads, constant_values=-jnp.inf)
        return nnx.max_pool(padded, window_shape=(3, 3), strides=(2, 2), padding="VALID")
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), pads)


def avg_pool(feature_map: jax.Array) -> jax.Array:
    """Global average pool (B, H, W, C) -> (B, C) in float32."""
    return _spatial_mean(feature_map.astype(jnp.float32))


def _spatial_mean(x: jax.Array) -> jax.Array:
    """x.mean((1, 2)) of a (B, H, W, C) map. Under `export_mode()` the mean
    is taken over an NCHW view: the transpose cancels against the one jax2onnx
    writes after the last NCHW Conv, and the runtime reduces contiguous
    planes instead of transposing the map back to NHWC first."""
    if exporting():
        return jnp.transpose(x, (0, 3, 1, 2)).mean((2, 3))
    return x.mean((1, 2))


class GeM(nnx.Module):
    """Generalised-mean pooling, (mean(clamp(x, eps)^p))^(1/p) with a trainable p
    (init 3); p = 1 is average pooling, p -> inf max pooling."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        self.p = nnx.Param(_filled((1,), p))
        self.eps = float(eps)

    def __call__(self, feature_map: jax.Array) -> jax.Array:
        p = self.p[...]
        x = jnp.maximum(feature_map.astype(jnp.float32), self.eps)
        if exporting():
            # lax.pow with a scalar exponent: one ONNX Pow each way (jax2onnx's
            # jnp.power cannot broadcast against a symbolic batch dimension).
            (p,) = host_constants(p[0])
            return jax.lax.pow(_spatial_mean(jax.lax.pow(x, p)), 1.0 / p)
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
# On the CPU these modules run cpu_kernels.py's convolutions (XLA:CPU is slow
# on 1x1 convolutions' backward and on grouped ones). They keep nnx.Conv's
# parameter layout (kernel (kh, kw, in / groups, out)) so checkpoints map the
# same way. Under `export_mode()` each is one nnx.Conv instead (`export_conv`),
# with the batch norm that follows it folded in (`conv_bn`).


def host_constants(*arrays: jax.Array) -> tuple:
    """The arrays as float32 numpy arrays when concrete (an export closes over
    the weights), else as they are (traced).

    Why: the export-mode folding then runs on the host and the graph gets its
    results as constants; jnp on concrete arrays under the export's trace
    compiled one XLA program per shape (8 of the 13 s EfficientNet-Lite0's
    export took). The folding uses operators only, valid for both kinds.
    """
    try:
        return tuple(np.asarray(a, np.float32) for a in arrays)
    except jax.errors.TracerArrayConversionError:
        return arrays


def export_conv(
    x: jax.Array,
    kernel: jax.Array,
    stride: int,
    padding: str | tuple,
    *,
    dtype,
    groups: int = 1,
    scale: jax.Array | None = None,
    shift: jax.Array | None = None,
) -> jax.Array:
    """conv(x, kernel * scale) + shift as one flax nnx.Conv; `scale` and `shift`
    (per output channel) are a folded batch norm, None for a bare convolution.

    Why nnx.Conv: jax2onnx maps it to exactly one ONNX Conv (group, pads and
    the bias as its inputs, the kernel pre-transposed to OIHW), which runtimes
    fuse with the activation that follows; a lax convolution plus a bias add
    leaves an Add and a Transpose pair around every convolution.
    """
    (kernel,) = host_constants(kernel)
    if scale is not None:
        kernel = kernel * scale
    # Built outside the trace: its (unused) random key must not enter the graph.
    with jax.ensure_compile_time_eval():
        conv = nnx.Conv(
            kernel.shape[2] * groups,
            kernel.shape[3],
            kernel.shape[:2],
            strides=stride,
            padding=padding,
            feature_group_count=groups,
            use_bias=shift is not None,
            dtype=dtype,
            kernel_init=lambda *_: kernel,
            bias_init=lambda *_: shift,
            rngs=nnx.Rngs(0),
        )
    return conv(x)


def conv_bn(conv: nnx.Module, norm: nnx.Module, x: jax.Array, train: bool) -> jax.Array:
    """norm(conv(x), train). Under `export_mode()` in eval, a GhostBatchNorm is
    folded into the convolution's kernel and bias (one ONNX Conv, as PyTorch's
    exporter folds BatchNorm2d)."""
    if exporting() and not train and isinstance(norm, GhostBatchNorm):
        scale, shift = norm.folded()
        return conv.exported(x, scale, shift)
    return norm(conv(x), train)


def normalize_pixels(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """float32 (x - mean) / std per channel of (B, H, W, 3) pixels
    (`augment.normalize`). Under `export_mode()` one multiply-add between two
    transposes to NCHW and back: the second cancels against the transpose
    jax2onnx puts before the stem's Conv, and runtimes broadcast per-channel
    constants over NCHW planes far faster than over a trailing axis of 3."""
    x = images.astype(jnp.float32)
    if not exporting():
        return normalize(x, mean, std)
    scale = 1.0 / np.asarray(std, np.float32)[:, None, None]
    shift = -np.asarray(mean, np.float32)[:, None, None] * scale
    nchw = jnp.transpose(x, (0, 3, 1, 2)) * scale + shift
    return jnp.transpose(nchw, (0, 2, 3, 1))


def relu6(x: jax.Array) -> jax.Array:
    """jax.nn.relu6; under `export_mode()` a clip with scalar bounds, which
    jax2onnx maps to one ONNX Clip (runtimes fuse it into the convolution
    before it) instead of Max and Min."""
    if exporting():
        return jnp.clip(x, 0.0, 6.0)
    return jax.nn.relu6(x)


class PointwiseConv(nnx.Module):
    """1x1 convolution without bias as a matmul; stride s keeps every s-th pixel
    (torch Conv2d(k=1, stride=s, padding=0) and TF "SAME" for k = 1 alike)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, *, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(kaiming_fan_out(rngs.params(), (1, 1, in_ch, out_ch)))
        self.stride = stride
        self.dtype = dtype

    def exported(self, x: jax.Array, scale=None, shift=None) -> jax.Array:
        """The export-mode form (`export_conv`): a 1x1 Conv with the stride."""
        kernel = self.kernel[...]
        return export_conv(
            x, kernel, self.stride, "VALID", dtype=self.dtype, scale=scale, shift=shift
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        if exporting():
            return self.exported(x)
        if self.stride > 1:
            x = x[:, :: self.stride, :: self.stride]
        return cpu_kernels.pointwise_conv(
            x.astype(self.dtype), self.kernel[...][0, 0].astype(self.dtype)
        )


class Conv(nnx.Module):
    """kxk convolution without bias, nnx.Conv's parameter layout (kernel (k, k,
    in, out)); on the CPU through `cpu_kernels.conv2d`'s gradient, elsewhere
    autodiff's.

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

    def exported(self, x: jax.Array, scale=None, shift=None) -> jax.Array:
        """The export-mode form (`export_conv`), explicit padding."""
        kernel = self.kernel[...]
        padding = cpu_kernels.conv_padding(x.shape[1:3], kernel.shape[0], self.stride, self.padding)
        return export_conv(
            x, kernel, self.stride, padding, dtype=self.dtype, scale=scale, shift=shift
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        if exporting():
            return self.exported(x)
        kernel = self.kernel[...]
        padding = cpu_kernels.conv_padding(x.shape[1:3], kernel.shape[0], self.stride, self.padding)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if jax.default_backend() == "cpu":
            if self.stride == 2 and x.shape[-1] <= 4:
                return cpu_kernels.space_to_depth_conv(x, kernel, padding)
            if self.winograd and winograd.applies(x.shape, kernel.shape, self.stride, padding):
                return winograd.conv3x3(x, kernel, padding)
            return cpu_kernels.conv2d(x, kernel, self.stride, padding)
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            (self.stride, self.stride),
            padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )


class DepthwiseConv(nnx.Module):
    """kxk depthwise convolution, TF "SAME" padding, no bias; kernel (k, k, 1, C)
    as nnx.Conv(feature_group_count=C) stores it. Shifted sums on CPU
    (`cpu_kernels.depthwise_conv_same`), the native grouped convolution on
    other backends."""

    def __init__(self, channels: int, kernel: int, stride: int, *, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(kaiming_fan_out(rngs.params(), (kernel, kernel, 1, channels)))
        self.stride = stride
        self.dtype = dtype

    def exported(self, x: jax.Array, scale=None, shift=None) -> jax.Array:
        """The export-mode form (`export_conv`): one grouped Conv, group = C."""
        kernel = self.kernel[...]
        padding = cpu_kernels.conv_padding(x.shape[1:3], kernel.shape[0], self.stride, "SAME")
        return export_conv(
            x,
            kernel,
            self.stride,
            padding,
            dtype=self.dtype,
            groups=kernel.shape[-1],
            scale=scale,
            shift=shift,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        if exporting():
            return self.exported(x)
        x = x.astype(self.dtype)
        kernel = self.kernel[...].astype(self.dtype)
        if jax.default_backend() == "cpu":
            return cpu_kernels.depthwise_conv_same(x, kernel, self.stride)
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            (self.stride, self.stride),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=x.shape[-1],
        )

"""The CPU training kernels: operations XLA:CPU runs slowly in their plain or
autodiff form, each written with a hand-made VJP (jax.custom_vjp).

- `normalize_groups`: training batch norm of groups of samples (GhostBatchNorm).
- `pointwise_conv`: 1x1 convolution as a matmul (PointwiseConv).
- `depthwise_conv_same`: depthwise convolution as shifted sums (DepthwiseConv).
- `conv2d`, `space_to_depth_conv`: kxk convolutions whose gradients use only
  forward-form convolutions and matmuls (Conv); `conv_padding` and `pad_to`
  are their padding helpers (`pad_to` also serves winograd.py).

XLA's CPU backend is slow on two convolution kinds this project uses a lot
(measured on the 2-core dev machine, batch 8): the backward of 1x1 convolutions
(6x slower than the same matmul) and grouped (depthwise) convolutions (10-100x
slower than a sum of shifted copies). The modules of layers.py that call these
keep nnx.Conv's parameter layout (kernel (kh, kw, in / groups, out)) so
checkpoints map the same way.

This module imports nothing of jaxreid, so layers.py and winograd.py can both
build on it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


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

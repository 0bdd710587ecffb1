"""3x3 stride-1 convolution by Winograd's minimal filtering, F(4x4, 3x3).

Each 4x4 output tile is computed from a 6x6 input tile with 36 products per
(input, output) channel pair instead of 144: the input tiles and the kernel
are transformed (B^T d B, G g G^T), multiplied position by position as 36
matrix products over the channels, and transformed back (A^T m A). On the
CPU the convolutions are most of a ResNet's step, and XLA:CPU runs them as
direct convolutions; the transforms are elementwise sums XLA fuses.

Used by layers.Conv on the CPU when the model config asks (`model.winograd`,
on in the ResNet-50 paper configs): the ResNet-50 SCL step runs faster
(2-core AMD EPYC, b8 2.1 -> 2.3 img/s in benchmarks/train_step.py), but
XLA:CPU compiles the transforms slowly (its first step 45 -> 125 s), so it is
off by default.

The gradient stays in the transformed domain too: the input gradient is the
same convolution of the cotangent with the flipped kernel, the kernel
gradient 36 products V^T (A dY A^T) folded back by G^T . G. Matrices from
Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2016).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxreid.models.cpu_kernels import pad_to

TILE = 4  # output pixels per tile side
ALPHA = TILE + 2  # input pixels per tile side

B_T = np.array(
    [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ],
    np.float64,
)
G = np.array(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
    np.float64,
)
A_T = np.array(
    [
        [1, 1, 1, 1, 1, 0],
        [0, 1, -1, 2, -2, 0],
        [0, 1, 1, 4, 4, 0],
        [0, 1, -1, 8, -8, 1],
    ],
    np.float64,
)


def _combine(parts: list, rows: np.ndarray) -> list:
    """[sum_i rows[a, i] * parts[i] for each row a], skipping zero terms."""
    out = []
    for row in rows:
        total = None
        for coefficient, part in zip(row, parts, strict=True):
            if coefficient == 0:
                continue
            term = part if coefficient == 1 else part * coefficient
            total = term if total is None else total + term
        out.append(total)
    return out


def _transform_2d(tiles: list[list], left: np.ndarray) -> list:
    """left @ T @ left^T for a grid of arrays T[i][j] (each an array over
    tiles and channels): rows first, then columns; flattened row-major."""
    rows = [_combine([tiles[i][j] for i in range(len(tiles))], left) for j in range(len(tiles[0]))]
    # rows[j][a] = sum_i left[a, i] T[i][j]
    return [
        v
        for a in range(left.shape[0])
        for v in _combine([rows[j][a] for j in range(len(rows))], left)
    ]


def _tiles_shape(height: int, width: int) -> tuple[int, int]:
    """Tiles along each axis for an output of (height, width)."""
    return -(-height // TILE), -(-width // TILE)


def _input_transform(padded: jax.Array, tiles_h: int, tiles_w: int) -> jax.Array:
    """(B, >= 4 th + 2, >= 4 tw + 2, C) -> V (36, B * th * tw, C)."""
    batch, channels = padded.shape[0], padded.shape[-1]
    grid = [
        [
            padded[
                :, i : i + TILE * (tiles_h - 1) + 1 : TILE, j : j + TILE * (tiles_w - 1) + 1 : TILE
            ]
            for j in range(ALPHA)
        ]
        for i in range(ALPHA)
    ]
    v = jnp.stack(_transform_2d(grid, B_T))
    return v.reshape(ALPHA * ALPHA, batch * tiles_h * tiles_w, channels)


def _kernel_transform(kernel: jax.Array) -> jax.Array:
    """(3, 3, C, D) -> U (36, C, D) = G g G^T per channel pair."""
    # Elementwise sums: as an einsum with G, XLA transposed the kernel around
    # two small products (71 ms against ~10 for 512 x 512 channels).
    return jnp.stack(_transform_2d([[kernel[i, j] for j in range(3)] for i in range(3)], G))


def _output_transform(m: jax.Array, batch: int, tiles_h: int, tiles_w: int) -> jax.Array:
    """M (36, B * th * tw, D) -> (B, 4 th, 4 tw, D)."""
    grid = [[m[a * ALPHA + b] for b in range(ALPHA)] for a in range(ALPHA)]
    y = jnp.stack(_transform_2d(grid, A_T))  # (16, T, D), row-major (p, q)
    y = y.reshape(TILE, TILE, batch, tiles_h, tiles_w, -1)
    y = jnp.transpose(y, (2, 3, 0, 4, 1, 5))
    return y.reshape(batch, tiles_h * TILE, tiles_w * TILE, -1)


def _output_transform_transposed(grad: jax.Array, tiles_h: int, tiles_w: int) -> jax.Array:
    """The adjoint of `_output_transform`: (B, 4 th, 4 tw, D) -> (36, T, D)."""
    batch = grad.shape[0]
    g = grad.reshape(batch, tiles_h, TILE, tiles_w, TILE, -1)
    grid = [
        [g[:, :, p, :, q].reshape(batch * tiles_h * tiles_w, -1) for q in range(TILE)]
        for p in range(TILE)
    ]
    return jnp.stack(_transform_2d(grid, A_T.T))


def _pad_for_tiles(x: jax.Array, padding: tuple, out_h: int, out_w: int) -> jax.Array:
    """x padded as the convolution pads it, then with zeros (or cropped) to
    exactly the 4 th + 2 rows and 4 tw + 2 columns the tiles read."""
    (top, _), (left, _) = padding
    tiles_h, tiles_w = _tiles_shape(out_h, out_w)
    return pad_to(x, top, left, TILE * tiles_h + 2, TILE * tiles_w + 2)


def _forward(
    x: jax.Array, kernel: jax.Array, padding: tuple, transposed: bool = False
) -> tuple[jax.Array, jax.Array]:
    """(output, V) of the convolution; `transposed`: kernel (3, 3, D, C), used
    as its transpose (the input gradient's kernel, without a transposed copy)."""
    (top, bottom), (left, right) = padding
    batch, height, width, _ = x.shape
    out_h, out_w = height + top + bottom - 2, width + left + right - 2
    tiles_h, tiles_w = _tiles_shape(out_h, out_w)
    v = _input_transform(_pad_for_tiles(x, padding, out_h, out_w), tiles_h, tiles_w)
    u = _kernel_transform(kernel)
    m = jnp.einsum("ktc,kdc->ktd" if transposed else "ktc,kcd->ktd", v, u)
    y = _output_transform(m, batch, tiles_h, tiles_w)
    return y[:, :out_h, :out_w], v


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3(x: jax.Array, kernel: jax.Array, padding: tuple) -> jax.Array:
    """(B, H, W, C) x (3, 3, C, D) stride 1, explicit padding ((top, bottom),
    (left, right)) -> (B, H', W', D), as a Winograd F(4x4, 3x3) convolution."""
    return _forward(x, kernel, padding)[0]


def _conv3x3_fwd(x, kernel, padding):
    y, v = _forward(x, kernel, padding)
    return y, (v, kernel, x.shape)


def _conv3x3_bwd(padding, residuals, grad):
    v, kernel, x_shape = residuals
    (top, _), (left, _) = padding
    height, width = x_shape[1], x_shape[2]
    out_h, out_w = grad.shape[1], grad.shape[2]
    # Input gradient: the cotangent correlated with the flipped, transposed
    # kernel, padded so that the result has the input's size.
    back_padding = ((2 - top, height - out_h + top), (2 - left, width - out_w + left))
    grad_x = _forward(grad, kernel[::-1, ::-1], back_padding, transposed=True)[0]
    # Kernel gradient: dU = V^T (A dY A^T) per position, then G^T dU G.
    tiles_h, tiles_w = _tiles_shape(out_h, out_w)
    grad_tiles = jnp.pad(
        grad, ((0, 0), (0, TILE * tiles_h - out_h), (0, TILE * tiles_w - out_w), (0, 0))
    )
    grad_m = _output_transform_transposed(grad_tiles, tiles_h, tiles_w)
    grad_u = jnp.einsum("ktd,ktc->kdc", grad_m, v)
    grad_u = jnp.transpose(grad_u, (0, 2, 1))
    grid = [[grad_u[a * ALPHA + b] for b in range(ALPHA)] for a in range(ALPHA)]
    grad_kernel = jnp.stack(_transform_2d(grid, G.T)).reshape(kernel.shape)
    return grad_x.astype(grad.dtype), grad_kernel.astype(kernel.dtype)


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def applies(x_shape: tuple, kernel_shape: tuple, stride: int, padding: tuple) -> bool:
    """Whether `conv3x3` can compute this convolution: 3x3, stride 1, padding
    of 0-2 per side, and maps larger than the kernel (smaller ones are mostly
    padding)."""
    return (
        tuple(kernel_shape[:2]) == (3, 3)
        and stride == 1
        and all(0 <= p <= 2 for side in padding for p in side)
        and min(x_shape[1], x_shape[2]) > 3
    )

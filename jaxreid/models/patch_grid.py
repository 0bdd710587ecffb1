"""A fixed grid of patch features on the backbone's map (PAUL's PatchNet with
its patch generator frozen, as its unsupervised training leaves it: Yang et
al., "Patch-based discriminative feature learning for unsupervised person
re-identification", CVPR 2019).

Settings (`model.patch_grid`; rows 0, the default, builds nothing and leaves
every other model's program as it was):

  rows, cols  the map is cut into rows x cols cells (bins as torch's
              AdaptiveAvgPool2d((rows, cols)): neighbouring cells share a
              boundary row or column when the size does not divide the map).
              PAUL: 6 x 1, six horizontal bands.
  dim         each cell's projection width (PAUL: 256).

Each cell is average-pooled, projected by its own Linear(C, dim) and its own
batch norm (PAUL: a 1x1 convolution + BatchNorm2d per patch, no ReLU) and
L2-normalised: output "grid_patches" (B, rows * cols, dim), row-major cells.
The P Linears are one stacked (P, C, dim) kernel, as the SCL head's stripes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxreid.models.layers import GhostBatchNorm, he_normal_fan_out, host_zeros, stripe_bins
from jaxreid.utils import l2_normalize

_kernel_init = he_normal_fan_out(batch_axis=(0,))


def default_patch_grid_config() -> ml_collections.ConfigDict:
    """`model.patch_grid`: off (rows 0). PAUL: 6 x 1 cells of 256 dimensions."""
    return ml_collections.ConfigDict(dict(rows=0, cols=1, dim=256))


def patch_grid_enabled(config: ml_collections.ConfigDict) -> bool:
    """Whether the model config asks for the grid (absent from older saved configs: off)."""
    block = config.get("patch_grid")
    return block is not None and int(block.rows) > 0


def patch_grid_problems(config: ml_collections.ConfigDict) -> list[str]:
    """'model.patch_grid.* = value: fix' lines of a whole config."""
    block = config.model.get("patch_grid")
    if block is None or block.rows == 0:
        return []
    problems = []
    for key, high, meaning in (
        ("rows", 16, "PAUL: 6 horizontal bands"),
        ("cols", 8, "1 = full-width bands"),
        ("dim", None, "PAUL: 256"),
    ):
        value = block.get(key)
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < 1
            or (high and value > high)
        ):
            where = f"in [1, {high}]" if high else ">= 1"
            problems.append(
                f"model.patch_grid.{key} = {value!r}: must be a whole number {where} ({meaning})"
            )
    return problems


def cell_weights(height: int, width: int, rows: int, cols: int) -> np.ndarray:
    """(rows * cols, height * width) averaging weights of the grid's cells."""
    weights = np.zeros((rows * cols, height, width), np.float32)
    for r, (top, bottom) in enumerate(stripe_bins(height, rows)):
        for c, (left, right) in enumerate(stripe_bins(width, cols)):
            weights[r * cols + c, top:bottom, left:right] = 1.0 / ((bottom - top) * (right - left))
    return weights.reshape(rows * cols, height * width)


class PatchGrid(nnx.Module):
    """(B, H, W, C) map -> {"grid_patches": (B, rows * cols, dim)} unit rows."""

    def __init__(
        self,
        channels: int,
        config: ml_collections.ConfigDict,
        *,
        rngs: nnx.Rngs,
        bn_group_size: int = 0,
    ):
        self.rows, self.cols, dim = int(config.rows), int(config.cols), int(config.dim)
        cells = self.rows * self.cols
        self.kernel = nnx.Param(_kernel_init(rngs.params(), (cells, channels, dim), jnp.float32))
        self.bias = nnx.Param(host_zeros(None, (cells, dim)))
        self.bn = GhostBatchNorm((cells, dim), group_size=bn_group_size)

    def __call__(self, feature_map: jax.Array, train: bool) -> dict[str, jax.Array]:
        b, height, width, channels = feature_map.shape
        weights = cell_weights(height, width, self.rows, self.cols)  # static
        flat = feature_map.astype(jnp.float32).reshape(b, height * width, channels)
        pooled = jnp.einsum(
            "pk,bkc->bpc", weights, flat, precision=jax.lax.Precision.HIGHEST
        )  # (B, P, C)
        projected = jnp.einsum("bpc,pcd->bpd", pooled, self.kernel[...]) + self.bias[...]
        return {"grid_patches": l2_normalize(self.bn(projected, train).astype(jnp.float32))}

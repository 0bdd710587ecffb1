"""ResNet-18/34/50 in the torchvision layout (v1.5: stride on the 3x3 conv).

Module and attribute names mirror torchvision's state-dict keys (conv1, bn1,
layer1..layer4, blocks conv1/bn1/..., downsample.0 / downsample.1) so a torchvision
checkpoint maps onto the parameters by name (see pretrained.py). Options for
re-identification: the stride of layer4 (`last_stride` 1 gives a 16 x 8 map at
256 x 128) and IBN-a (the first norm of every block of layer1-3 is half instance
norm, half batch norm; layer4 and the stem stay plain).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxreid.augment import IMAGENET_MEAN, IMAGENET_STD
from jaxreid.models.layers import (
    IBN,
    Conv,
    GhostBatchNorm,
    PointwiseConv,
    conv_bn,
    max_pool_3x3_s2,
    normalize_pixels,
)

# name -> (block kind, blocks per stage)
RESNET_DEPTHS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}


# hook(i, x) -> x: called by a backbone on its map after the stem (i = 0) and
# after each following stage but the last (i = 1, 2, ...); the map it returns
# goes on (jaxreid.models.camera_style re-styles a shallow one). None: no call.
StageHook = Callable[[int, jax.Array], jax.Array]


@dataclasses.dataclass
class LayerFactory:
    """Creates convs and norms with the network-wide dtype and BN group size."""

    rngs: nnx.Rngs
    dtype: jnp.dtype = jnp.float32
    bn_group_size: int = 0
    bn_epsilon: float = 1e-5
    winograd: bool = False  # 3x3 stride-1 convs by Winograd on the CPU (layers.Conv)

    def conv(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        stride: int = 1,
        padding: str | int = 0,
    ) -> Conv | PointwiseConv:
        """Bias-free conv; 1x1 ones as a matmul (fast backward on CPU).
        `padding`: "SAME" (TF) or an int (torch's symmetric padding)."""
        if kernel == 1:
            return PointwiseConv(in_ch, out_ch, stride, dtype=self.dtype, rngs=self.rngs)
        return Conv(
            in_ch,
            out_ch,
            kernel,
            stride,
            padding,
            dtype=self.dtype,
            rngs=self.rngs,
            winograd=self.winograd,
        )

    def bn(self, num_features: int) -> GhostBatchNorm:
        return GhostBatchNorm(num_features, group_size=self.bn_group_size, epsilon=self.bn_epsilon)

    def norm(self, num_features: int, ibn: bool) -> GhostBatchNorm | IBN:
        if ibn:
            return IBN(num_features, group_size=self.bn_group_size, epsilon=self.bn_epsilon)
        return self.bn(num_features)


def _downsample(make: LayerFactory, in_ch: int, out_ch: int, stride: int) -> nnx.List | None:
    if stride == 1 and in_ch == out_ch:
        return None
    return nnx.List([make.conv(in_ch, out_ch, 1, stride), make.bn(out_ch)])


def _shortcut(downsample: nnx.List | None, x: jax.Array, train: bool) -> jax.Array:
    if downsample is None:
        return x
    conv, bn = downsample
    return conv_bn(conv, bn, x, train)


class BasicBlock(nnx.Module):
    expansion = 1

    def __init__(self, make: LayerFactory, in_ch: int, planes: int, stride: int, ibn: bool):
        self.conv1 = make.conv(in_ch, planes, 3, stride, padding=1)
        self.bn1 = make.norm(planes, ibn)
        self.conv2 = make.conv(planes, planes, 3, 1, padding=1)
        self.bn2 = make.bn(planes)
        self.downsample = _downsample(make, in_ch, planes, stride)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = jax.nn.relu(conv_bn(self.conv1, self.bn1, x, train))
        y = conv_bn(self.conv2, self.bn2, y, train)
        return jax.nn.relu(y + _shortcut(self.downsample, x, train))


class Bottleneck(nnx.Module):
    expansion = 4

    def __init__(self, make: LayerFactory, in_ch: int, planes: int, stride: int, ibn: bool):
        out_ch = planes * self.expansion
        self.conv1 = make.conv(in_ch, planes, 1)
        self.bn1 = make.norm(planes, ibn)
        self.conv2 = make.conv(planes, planes, 3, stride, padding=1)
        self.bn2 = make.bn(planes)
        self.conv3 = make.conv(planes, out_ch, 1)
        self.bn3 = make.bn(out_ch)
        self.downsample = _downsample(make, in_ch, out_ch, stride)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = jax.nn.relu(conv_bn(self.conv1, self.bn1, x, train))
        y = jax.nn.relu(conv_bn(self.conv2, self.bn2, y, train))
        y = conv_bn(self.conv3, self.bn3, y, train)
        return jax.nn.relu(y + _shortcut(self.downsample, x, train))


class ResNet(nnx.Module):
    """Feature extractor: float32 RGB pixels [0, 255] (B, H, W, 3) -> (B, h, w, C).

    Input is normalised with ImageNet mean/std first (torchvision's recipe).
    """

    def __init__(
        self,
        name: str,
        *,
        rngs: nnx.Rngs,
        last_stride: int = 2,
        ibn: bool = False,
        dtype: jnp.dtype = jnp.float32,
        bn_group_size: int = 0,
        winograd: bool = False,
    ):
        if name not in RESNET_DEPTHS:
            raise ValueError(f"unknown ResNet {name!r}; expected one of {sorted(RESNET_DEPTHS)}")
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        kind, depths = RESNET_DEPTHS[name]
        block = BasicBlock if kind == "basic" else Bottleneck
        make = LayerFactory(rngs=rngs, dtype=dtype, bn_group_size=bn_group_size, winograd=winograd)
        self.conv1 = make.conv(3, 64, 7, 2, padding=3)
        self.bn1 = make.bn(64)
        in_ch = 64
        stages = []
        for index, (planes, depth) in enumerate(zip((64, 128, 256, 512), depths, strict=True)):
            stride = 1 if index == 0 else (last_stride if index == 3 else 2)
            blocks = []
            for b in range(depth):
                stage_ibn = ibn and index < 3
                blocks.append(block(make, in_ch, planes, stride if b == 0 else 1, stage_ibn))
                in_ch = planes * block.expansion
            stages.append(nnx.List(blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.num_features = in_ch

    def __call__(self, images: jax.Array, train: bool, hook: StageHook | None = None) -> jax.Array:
        x = normalize_pixels(images, IMAGENET_MEAN, IMAGENET_STD)
        x = jax.nn.relu(conv_bn(self.conv1, self.bn1, x, train))
        x = max_pool_3x3_s2(x)
        for index, stage in enumerate((self.layer1, self.layer2, self.layer3, self.layer4)):
            if hook is not None:
                x = hook(index, x)
            for block in stage:
                x = block(x, train)
        return x

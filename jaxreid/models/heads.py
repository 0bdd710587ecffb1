"""Embedding heads on top of a (B, h, w, C) feature map.

SCLHead follows scl-method.md: global = pool -> Linear(C, D) -> BatchNorm1d ->
L2-normalise; stripes = P horizontal stripes, each average-pooled -> its own
Linear(C, D/P) -> its own BatchNorm1d -> L2-normalise. The P stripe Linears are
stored stacked as one (P, C, D/P) kernel and the P BatchNorm1d as one norm with
feature shape (P, D/P): the same maths as P separate layers, one einsum instead
of P small matmuls.

BNNeckHead is the usual re-id BN neck: pool -> [Linear(C, D)] -> BatchNorm
without bias; "global" is the BN output in training and its L2-normalised value
in eval.

FCHead is torchreid's embedding (OSNet's `fc`): pool -> Linear(C, D) ->
BatchNorm1d -> ReLU; "global" is that feature (L2-normalised in eval), so a
torchreid checkpoint's own feature is reproduced exactly.

A transformer backbone gives a `TokenMap` instead of a map: its patch tokens as
the (B, h, w, C) grid (stripes and avg / GeM pooling use it as a CNN's map) and
its [CLS] token, which pooling "cls" takes as the pooled feature.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxreid.models.layers import (
    GhostBatchNorm,
    he_normal_fan_out,
    host_zeros,
    kaiming_fan_out,
    make_pool,
    stripe_pool,
)
from jaxreid.utils import l2_normalize


class TokenMap(NamedTuple):
    """A transformer backbone's output: the patch tokens as a (B, h, w, C)
    grid and the [CLS] token (B, C)."""

    grid: jax.Array
    cls: jax.Array


POOLINGS = ("avg", "gem", "cls")


def _make_pool(pooling: str) -> nnx.Module | None:
    """The global branch's pooling; None for "cls" (the [CLS] token)."""
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
    return None if pooling == "cls" else make_pool(pooling)


def _pooled(pool: nnx.Module | None, features: jax.Array | TokenMap) -> jax.Array:
    """(B, C) float32 global input: the pooled map, or a TokenMap's [CLS] token
    (pool None) or its pooled grid."""
    if isinstance(features, TokenMap):
        return features.cls.astype(jnp.float32) if pool is None else pool(features.grid)
    if pool is None:
        raise ValueError('pooling "cls" needs a transformer backbone (a [CLS] token)')
    return pool(features)


def _grid(features: jax.Array | TokenMap) -> jax.Array:
    return features.grid if isinstance(features, TokenMap) else features


# He-normal fan-out for the stacked (P, C, D/P) stripe kernel: fan_out = D/P.
_stripe_kernel_init = he_normal_fan_out(batch_axis=(0,))


def _linear(in_dim: int, out_dim: int, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        in_dim,
        out_dim,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=kaiming_fan_out,
        bias_init=host_zeros,
        rngs=rngs,
    )


def _classifier(dim: int, num_classes: int, dtype, rngs: nnx.Rngs) -> nnx.Linear | None:
    """Bias-free identity classifier (supervised training), small init as the
    BoT baseline (std 0.001); None when num_classes is 0."""
    if not num_classes:
        return None
    return nnx.Linear(
        dim,
        num_classes,
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nnx.initializers.normal(0.001),
        rngs=rngs,
    )


class SCLHead(nnx.Module):
    """Outputs "global" (B, D) and "stripes" (B, P, D/P), both unit norm, and
    "pre_bn" (B, D), the global Linear output before its BatchNorm.

    The global branch uses `pooling` (avg, GeM or a transformer's [CLS]);
    stripes are always averaged, as the method specifies. Stripe rows follow
    `layers.stripe_bins` (torch's AdaptiveAvgPool2d((P, 1)) bins when P does
    not divide the map height).
    """

    def __init__(
        self,
        in_features: int,
        *,
        embed_dim: int,
        num_stripes: int,
        pooling: str,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        bn_group_size: int = 0,
    ):
        if num_stripes < 1 or embed_dim % num_stripes:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be a positive multiple of num_stripes "
                f"({num_stripes})"
            )
        self.num_stripes = num_stripes
        self.dtype = dtype
        stripe_dim = embed_dim // num_stripes
        self.pool = _make_pool(pooling)
        self.global_fc = _linear(in_features, embed_dim, dtype, rngs)
        self.global_bn = GhostBatchNorm(embed_dim, group_size=bn_group_size)
        self.stripe_kernel = nnx.Param(
            _stripe_kernel_init(rngs.params(), (num_stripes, in_features, stripe_dim), jnp.float32)
        )
        self.stripe_bias = nnx.Param(host_zeros(None, (num_stripes, stripe_dim)))
        self.stripe_bn = GhostBatchNorm((num_stripes, stripe_dim), group_size=bn_group_size)

    def __call__(self, features: jax.Array | TokenMap, train: bool) -> dict[str, jax.Array]:
        pre_bn = self.global_fc(_pooled(self.pool, features).astype(self.dtype))
        global_embedding = l2_normalize(self.global_bn(pre_bn, train).astype(jnp.float32))
        stripes = stripe_pool(_grid(features), self.num_stripes).astype(self.dtype)
        local = jnp.einsum("bpc,pcd->bpd", stripes, self.stripe_kernel[...].astype(self.dtype))
        local = local + self.stripe_bias[...].astype(self.dtype)
        local = l2_normalize(self.stripe_bn(local, train).astype(jnp.float32))
        return {"global": global_embedding, "stripes": local, "pre_bn": pre_bn}


class BNNeckHead(nnx.Module):
    """pool -> optional Linear(C, embed_dim) -> BatchNorm (no bias).

    embed_dim 0 or equal to C means no projection (D = C). Outputs "pre_bn" (the
    feature entering the BN, (B, D)) and "global" (BN output; L2-normalised in
    eval only, so training losses see the raw BN-neck feature). With
    `num_classes` > 0 (supervised training) a bias-free linear classifier on
    the BN output adds "logits" (B, num_classes) in train mode.
    """

    def __init__(
        self,
        in_features: int,
        *,
        embed_dim: int,
        pooling: str,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        bn_group_size: int = 0,
        num_classes: int = 0,
    ):
        self.dtype = dtype
        self.pool = _make_pool(pooling)
        if embed_dim and embed_dim != in_features:
            self.projection = _linear(in_features, embed_dim, dtype, rngs)
            dim = embed_dim
        else:
            self.projection = None
            dim = in_features
        self.bn = GhostBatchNorm(dim, group_size=bn_group_size, use_bias=False)
        # Assigned once: nnx fixes an attribute's kind, data or static, at
        # first assignment.
        self.classifier = _classifier(dim, num_classes, dtype, rngs)

    def __call__(self, features: jax.Array | TokenMap, train: bool) -> dict[str, jax.Array]:
        pre_bn = _pooled(self.pool, features)
        if self.projection is not None:
            pre_bn = self.projection(pre_bn.astype(self.dtype))
        neck = self.bn(pre_bn, train).astype(jnp.float32)
        if not train:
            return {"global": l2_normalize(neck), "pre_bn": pre_bn}
        outputs = {"global": neck, "pre_bn": pre_bn}
        if self.classifier is not None:
            outputs["logits"] = self.classifier(neck.astype(self.dtype)).astype(jnp.float32)
        return outputs


class FCHead(nnx.Module):
    """pool -> Linear(C, D) -> BatchNorm1d -> ReLU (torchreid's `fc`, keys
    fc.0.* / fc.1.*). Outputs "global" (the feature; L2-normalised in eval) and
    "pre_bn" (the same feature, for the triplet loss as torchreid uses it); with
    `num_classes` > 0 a bias-free classifier adds "logits" in train mode."""

    def __init__(
        self,
        in_features: int,
        *,
        embed_dim: int,
        pooling: str,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        bn_group_size: int = 0,
        num_classes: int = 0,
    ):
        if embed_dim < 1:
            raise ValueError(f"head 'fc' needs embed_dim >= 1, got {embed_dim}")
        self.dtype = dtype
        self.pool = _make_pool(pooling)
        self.fc = nnx.List(
            [
                _linear(in_features, embed_dim, dtype, rngs),
                GhostBatchNorm(embed_dim, group_size=bn_group_size),
            ]
        )
        self.classifier = _classifier(embed_dim, num_classes, dtype, rngs)

    def __call__(self, features: jax.Array | TokenMap, train: bool) -> dict[str, jax.Array]:
        linear, norm = self.fc
        hidden = linear(_pooled(self.pool, features).astype(self.dtype))
        feature = jax.nn.relu(norm(hidden, train)).astype(jnp.float32)
        if not train:
            return {"global": l2_normalize(feature), "pre_bn": feature}
        outputs = {"global": feature, "pre_bn": feature}
        if self.classifier is not None:
            outputs["logits"] = self.classifier(feature.astype(self.dtype)).astype(jnp.float32)
        return outputs

"""SDFT's stripe fusion: part tokens that interact with the global token.

On a transformer's output (`heads.TokenMap`), P part tokens are the means of
P horizontal bands of the patch grid (`layers.stripe_bins`), each plus a
learned part embedding (so the blocks can tell the parts apart). The [CLS]
token and the P part tokens pass together through `depth` extra pre-norm
transformer blocks and a LayerNorm: the global token attends to the parts and
each part to the global token and to the other parts. The fused tokens then
go through the SCL head's projections, the fused [CLS] as the global feature
and the fused parts as the P stripes, so the outputs ("global", "stripes",
"pre_bn") are the SCL head's and every stripe-using method works on them.

The fusion blocks have the backbone's width and heads; `copy_block` starts
them from the backbone's last block (as TransReID's jigsaw branch starts from
a copy of the last layer), so an imported model's fused [CLS] starts close to
its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxreid.models.heads import SCLHead, TokenMap
from jaxreid.models.layers import _host_normal, stripe_pool
from jaxreid.models.vit import INIT_STD, Block, _layer_norm


class FusionHead(nnx.Module):
    """TokenMap -> {"global" (B, D), "stripes" (B, P, D/P), "pre_bn" (B, D)}."""

    def __init__(
        self,
        width: int,
        heads: int,
        *,
        depth: int,
        embed_dim: int,
        num_stripes: int,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        bn_group_size: int = 0,
    ):
        if depth < 1:
            raise ValueError(f"the fusion head needs at least one block, got depth {depth}")
        self.num_stripes = num_stripes
        self.dtype = dtype
        self.part_embed = nnx.Param(
            _host_normal(rngs.params(), (1, num_stripes, width), INIT_STD, jnp.float32)
        )
        self.blocks = nnx.List(
            [Block(width, heads, 0.0, dtype=dtype, rngs=rngs) for _ in range(depth)]
        )
        self.norm = _layer_norm(width, dtype, rngs)
        self.project = SCLHead(
            width,
            embed_dim=embed_dim,
            num_stripes=num_stripes,
            pooling="cls",
            rngs=rngs,
            dtype=dtype,
            bn_group_size=bn_group_size,
        )

    def fused_tokens(self, features: TokenMap) -> tuple[jax.Array, jax.Array]:
        """(fused [CLS] (B, C), fused parts (B, P, C)) after the blocks and norm."""
        if not isinstance(features, TokenMap):
            raise ValueError("the fusion head needs a transformer backbone (a [CLS] token)")
        parts = stripe_pool(features.grid, self.num_stripes)  # (B, P, C) float32
        parts = (parts + self.part_embed[...]).astype(self.dtype)
        x = jnp.concatenate([features.cls[:, None].astype(self.dtype), parts], axis=1)
        for block in self.blocks:
            x = block(x, None)
        x = self.norm(x)
        return x[:, 0], x[:, 1:]

    def __call__(self, features: TokenMap, train: bool) -> dict[str, jax.Array]:
        cls, parts = self.fused_tokens(features)
        # Parts as a (B, P, 1, C) grid: P stripes of one row each are the parts.
        return self.project(TokenMap(grid=parts[:, :, None], cls=cls), train)

    def copy_block(self, block: Block) -> None:
        """Every fusion block takes `block`'s parameters (the backbone's last)."""
        values = nnx.state(block, nnx.Param)
        for fusion_block in self.blocks:
            nnx.update(fusion_block, jax.tree.map(jnp.array, values))

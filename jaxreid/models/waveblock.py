"""WaveBlock: a training-only feature-map augmentation (Attentive WaveBlock,
Wang et al.; JCL's WaveBlock attention module without its attention).

In training, each sample keeps one random horizontal block of its feature map
(`height_ratio` of the rows, whole width) as it is and multiplies every other
row by `rate` ("waves" it), so the head cannot rely on the same body part in
every view. Identity in eval mode, and in a train-mode pass without a key
(the batch-statistics pass of jaxreid.evaluate.camera_bn). The block's
position comes from the key the step passes to the model (one draw per
sample).

Settings (`model.waveblock`): rate (1 = off, the default; > 1 amplifies the
rows outside the block, < 1 damps them), height_ratio (the kept block's share
of the map's height, rounded to whole rows, at least one).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

WAVEBLOCK_SALT = 0x77617665


def default_waveblock_config() -> ml_collections.ConfigDict:
    """`model.waveblock`: off (rate 1); JCL's setting is rate 1.5, height_ratio 0.3."""
    return ml_collections.ConfigDict(dict(rate=1.0, height_ratio=0.3))


def waveblock_enabled(config: ml_collections.ConfigDict) -> bool:
    """Whether the model config (`model`) asks for a WaveBlock (absent from
    older saved configs: off)."""
    block = config.get("waveblock")
    return block is not None and float(block.rate) != 1.0


def waveblock_problems(config: ml_collections.ConfigDict) -> list[str]:
    """'model.waveblock.* = value: fix' lines of a whole config."""
    from jaxreid.validate import number_problems

    if config.model.get("waveblock") is None:
        return []
    return number_problems(
        config,
        ("model.waveblock.rate", 0, None, "()", "1 = off; JCL uses 1.5"),
        ("model.waveblock.height_ratio", 0, 1, "(]", "the kept block's share; JCL uses 0.3"),
    )


def wave_mask(
    rng: jax.Array, batch: int, height: int, height_ratio: float, rate: float
) -> jax.Array:
    """(batch, height) float32 row factors: 1 on each sample's random block of
    max(1, round(height_ratio * height)) consecutive rows, `rate` elsewhere."""
    rows = min(height, max(1, round(height_ratio * height)))
    start = jax.random.randint(rng, (batch, 1), 0, height - rows + 1)
    index = jnp.arange(height)[None, :]
    kept = (index >= start) & (index < start + rows)
    return jnp.where(kept, 1.0, rate).astype(jnp.float32)


class WaveBlock(nnx.Module):
    """(B, h, w, C) feature map -> the same, waved in training (module doc)."""

    def __init__(self, height_ratio: float, rate: float):
        self.height_ratio = float(height_ratio)
        self.rate = float(rate)

    def __call__(self, x: jax.Array, train: bool, rng: jax.Array | None) -> jax.Array:
        if not train or rng is None:  # eval, or a statistics-only pass (camera_bn)
            return x
        # Apart from the model's other draws from the same key (drop-path).
        key = jax.random.fold_in(rng, WAVEBLOCK_SALT)
        mask = wave_mask(key, x.shape[0], x.shape[1], self.height_ratio, self.rate)
        return x * mask[:, :, None, None].astype(x.dtype)

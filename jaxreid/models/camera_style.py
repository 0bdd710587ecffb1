"""Camera styles of shallow feature maps (MCSL: every training image seen in
every camera's style, without CamStyle's GANs).

A camera's style is the channel-wise mean and standard deviation of the
shallow feature maps of its images (after the stem or stage 1): the average
over its images of each map's per-channel spatial mean mu(x) and standard
deviation sigma(x), kept as running statistics per camera in the model's
batch statistics (so checkpointed and resumed with them). In training, each
image's map x is also re-styled to `styles` other cameras c drawn at random
among those already seen (AdaIN):

    restyle(x, c) = std_c * (x - mu(x)) / sigma(x) + mean_c

and the rest of the network runs on the original and the re-styled maps
stacked along the batch (batch norm keeps one group per copy when
model.bn_group_size is the training group). The model then returns every
output for the originals, and each output k of the re-styled copies as
"styled/k" (K, B, ...); `jaxreid.methods.camera_style` adds the method's
loss on them and an invariance term. Eval mode never re-styles, nor does a
train-mode pass without a key (the batch-statistics pass of
jaxreid.evaluate.camera_bn: its statistics are the plain maps').

The running statistics are ratio estimates: sums s_c <- (1 - m p_c) s_c +
m p_c x_c and weights w_c <- (1 - m p_c) w_c + m p_c (p_c = 1 when camera c
is in the batch), style = s_c / w_c. The training step averages the batch
statistics of its groups; a ratio of two averages stays a weighted mean of
the groups' statistics, where averaging the styles themselves would pull an
absent camera's style towards zero.

Settings (`model.camera_style`): styles (target styles per image, 0 = off),
stage ("stem" | "stage1"), num_cameras (rows of the table, above the largest
camera id), momentum m, styled_weight (the method's loss on the re-styled
copies), invariance_weight (1 - cos between each re-styled global feature and
its original, the original held fixed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

STAGES = ("stem", "stage1")
STYLE_SALT = 0x7374796C  # folded into the model key: apart from its other draws
STYLED = "styled/"  # prefix of the re-styled copies' outputs


def default_camera_style_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            styles=0,
            stage="stem",
            num_cameras=16,
            momentum=0.1,
            styled_weight=1.0,
            invariance_weight=1.0,
        )
    )


def camera_style_enabled(config: ml_collections.ConfigDict) -> bool:
    """Whether the model config (`model`) re-styles (absent from older saved configs: no)."""
    block = config.get("camera_style")
    return block is not None and int(block.styles) > 0


def camera_style_problems(config: ml_collections.ConfigDict) -> list[str]:
    """'model.camera_style.* = value: fix' lines of a whole config."""
    from jaxreid.validate import choice_problems, number_problems

    block = config.model.get("camera_style")
    if block is None:
        return []
    problems = []
    for key in ("styles", "num_cameras"):
        value = block[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < (key == "num_cameras"):
            problems.append(
                f"model.camera_style.{key} = {value!r}: must be a whole number >= "
                f"{int(key == 'num_cameras')}"
                + (" (0 = off; 1 is usual)" if key == "styles" else " (above every camera id)")
            )
    problems += choice_problems(config, ("model.camera_style.stage", STAGES))
    problems += number_problems(
        config,
        ("model.camera_style.momentum", 0, 1, "(]", "the batch's weight; 0.1 is usual"),
        ("model.camera_style.styled_weight", 0, None, "[)"),
        ("model.camera_style.invariance_weight", 0, None, "[)"),
    )
    if camera_style_enabled(config.model) and config.model.backbone.startswith("vit"):
        problems.append(
            f"model.camera_style.styles = {block.styles}: camera styles re-style the "
            f"shallow maps of the CNN backbones, not {config.model.backbone}; set it to 0"
        )
    return problems


def shallow_channels(backbone: str, stage: str) -> int:
    """Channels of `backbone`'s map after the stem or stage 1."""
    from jaxreid.models.efficientnet import LITE0_STAGES, STEM_CHANNELS
    from jaxreid.models.osnet import OSNET_WIDTHS
    from jaxreid.models.resnet import RESNET_DEPTHS

    index = STAGES.index(stage)
    if backbone in RESNET_DEPTHS:
        return 64 * (1 if index == 0 or RESNET_DEPTHS[backbone][0] == "basic" else 4)
    if backbone in OSNET_WIDTHS:
        return OSNET_WIDTHS[backbone][index]
    if backbone == "efficientnet_lite0":
        return (STEM_CHANNELS, LITE0_STAGES[0][-1])[index]
    raise ValueError(f"model.camera_style: no shallow stages known for {backbone!r}")


def channel_stats(x: jax.Array, eps: float = 1e-5) -> tuple[jax.Array, jax.Array]:
    """(mean, std) of each map's channels over its pixels: (B, C) each, float32;
    std = sqrt(biased variance + eps)."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=(1, 2))
    var = jnp.mean(jnp.square(x - mean[:, None, None, :]), axis=(1, 2))
    return mean, jnp.sqrt(var + eps)


def adain(x: jax.Array, mean: jax.Array, std: jax.Array, eps: float = 1e-5) -> jax.Array:
    """x (B, h, w, C) re-styled to per-sample target statistics (B, C):
    std * (x - mu(x)) / sigma(x) + mean, in x's dtype."""
    mu, sigma = channel_stats(x, eps)
    y = (x.astype(jnp.float32) - mu[:, None, None, :]) / sigma[:, None, None, :]
    return (y * std[:, None, None, :] + mean[:, None, None, :]).astype(x.dtype)


class CameraStyle(nnx.Module):
    """The per-camera style table and the training-time re-styling (module doc)."""

    def __init__(self, channels: int, num_cameras: int, styles: int, stage: str, momentum: float):
        self.styles = int(styles)
        self.stage = STAGES.index(stage)
        self.momentum = float(momentum)
        self.num_cameras = int(num_cameras)
        zeros = jnp.zeros((num_cameras, channels), jnp.float32)
        self.mean_sum = nnx.BatchStat(zeros)
        self.std_sum = nnx.BatchStat(zeros)
        self.weight = nnx.BatchStat(jnp.zeros((num_cameras,), jnp.float32))

    def table(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(mean (NC, C), std (NC, C), seen (NC,) bool) of the running styles."""
        weight = self.weight[...]
        seen = weight > 0
        scale = jnp.where(seen, 1.0 / jnp.where(seen, weight, 1.0), 0.0)[:, None]
        return self.mean_sum[...] * scale, self.std_sum[...] * scale, seen

    def update(self, x: jax.Array, cameras: jax.Array) -> None:
        """Moves the styles of the batch's cameras towards its maps' statistics."""
        mean, std = jax.tree.map(jax.lax.stop_gradient, channel_stats(x))
        onehot = (cameras[:, None] == jnp.arange(self.num_cameras)[None, :]).astype(jnp.float32)
        count = jnp.sum(onehot, axis=0)
        step = self.momentum * (count > 0).astype(jnp.float32)  # m p_c
        per_camera = onehot.T / jnp.maximum(count, 1.0)[:, None]  # (NC, B) means
        keep = (1.0 - step)[:, None]
        self.mean_sum[...] = keep * self.mean_sum[...] + step[:, None] * (per_camera @ mean)
        self.std_sum[...] = keep * self.std_sum[...] + step[:, None] * (per_camera @ std)
        self.weight[...] = (1.0 - step) * self.weight[...] + step

    def targets(self, rng: jax.Array, cameras: jax.Array) -> jax.Array:
        """(K, B) target cameras: uniform over the seen cameras other than each
        image's own (its own when it is the only one seen)."""
        _, _, seen = self.table()
        others = seen[None, :] & (jnp.arange(self.num_cameras)[None, :] != cameras[:, None])
        own = jnp.arange(self.num_cameras)[None, :] == cameras[:, None]
        allowed = jnp.where(jnp.any(others, axis=1, keepdims=True), others, own)
        logits = jnp.where(allowed, 0.0, -jnp.inf)
        return jax.random.categorical(rng, logits, axis=-1, shape=(self.styles, len(cameras)))

    def __call__(self, x: jax.Array, cameras: jax.Array | None, rng: jax.Array | None):
        """Training: (B, h, w, C) -> ((1 + K) B, h, w, C), the originals first,
        then the K re-styled copies (each of the batch in order)."""
        if cameras is None or rng is None:
            raise ValueError(
                "model.camera_style re-styles to other cameras in training: pass apply_model "
                "the batch's cameras with the key (cameras=..., rng=...), as the training step does"
            )
        if int(cameras.shape[0]) != int(x.shape[0]):
            raise ValueError(f"{cameras.shape[0]} cameras for a batch of {x.shape[0]} maps")
        self.update(x, cameras)
        mean, std, _ = self.table()
        chosen = self.targets(jax.random.fold_in(rng, STYLE_SALT), cameras)
        copies = [adain(x, mean[c], std[c]) for c in chosen]
        return jnp.concatenate([x, *copies], axis=0)

    def split(self, outputs: dict[str, jax.Array], batch: int) -> dict[str, jax.Array]:
        """The model's outputs over the stacked batch -> the originals' outputs
        and each output's re-styled copies as "styled/<key>" (K, B, ...)."""
        result = {k: v[:batch] for k, v in outputs.items()}
        for k, v in outputs.items():
            result[STYLED + k] = v[batch:].reshape(self.styles, batch, *v.shape[1:])
        return result

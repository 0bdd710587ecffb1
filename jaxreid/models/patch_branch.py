"""PISL's patch branch: P patches of the backbone's map placed by affine
thetas, and a diffusion model over those thetas (the Spatial Diffusion Model).

Settings (`model.patches`; num 0, the default, builds no branch and leaves
every other model's program as it was):

  num              P patches
  diffusion_steps  T of the cosine schedule (PISL: 1000)
  sampling_steps   DDIM steps of the thetas used at extraction (T = the full
                   chain; 5 a cheap one; 0 = the proposal's thetas, no diffusion)
  hidden, time_dim the denoiser's width and time embedding

theta = band_p + offset: the offsets are relative to P equal horizontal bands
(`patch_sampler.band_thetas`), so an untrained branch cuts stripes.

Training (`train=True` with a key):
  proposal   an MLP of the pooled map (PISL's spatial transformer localisation
             network) gives the offsets; "patches" (B, P, C) are the pooled
             patches of the map at those thetas, each patch its own BatchNorm,
             unit norm: the patch losses train the proposal through the sampler.
  diffusion  x0 = the proposal's offsets (held fixed), t ~ U{0 .. T-1}, eps ~
             N(0, I), x_t = q_sample(x0, t, eps); the denoiser, conditioned on
             the pooled map (held fixed), predicts eps: "noise", "noise_pred",
             and "theta_denoised" = band + x0_hat(x_t, eps_hat) clipped to
             [-1, 1], with "patches_denoised" (B, P, C) the unit pooled patches
             of the (fixed) map at theta_denoised: the SCD loss moves the
             denoiser only.
Extraction (`train=False`): thetas from `sampling_steps` DDIM steps (eta 0)
from x_T = 0, conditioned on the pooled map: deterministic, so an image's
features do not depend on its batch; "patches" as in training, "theta".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from jaxreid import diffusion
from jaxreid.models.layers import GhostBatchNorm, host_zeros
from jaxreid.models.patch_sampler import band_thetas, pooled_patches
from jaxreid.utils import l2_normalize


def default_patch_config() -> ml_collections.ConfigDict:
    """`model.patches`: off (num 0). PISL: 3 patches, T = 1000."""
    return ml_collections.ConfigDict(
        dict(num=0, diffusion_steps=1000, sampling_steps=5, hidden=256, time_dim=64)
    )


def patches_enabled(config: ml_collections.ConfigDict) -> bool:
    """Whether the model config asks for the branch (absent from older saved configs: off)."""
    block = config.get("patches")
    return block is not None and int(block.num) > 0


def patch_problems(config: ml_collections.ConfigDict) -> list[str]:
    """'model.patches.* = value: fix' lines of a whole config."""
    from jaxreid.validate import number_problems

    block = config.model.get("patches")
    if block is None or int(block.num) == 0:
        return []
    problems = number_problems(
        config,
        ("model.patches.num", 1, 16, "[]", "PISL uses 3"),
        ("model.patches.diffusion_steps", 1, None, "[)", "PISL: 1000"),
        ("model.patches.hidden", 1, None, "[)", "256"),
        ("model.patches.time_dim", 2, None, "[)", "64"),
    )
    steps, total = int(block.sampling_steps), int(block.diffusion_steps)
    if not 0 <= steps <= total:
        problems.append(
            f"model.patches.sampling_steps = {steps}: between 0 (the proposal's thetas) and "
            f"model.patches.diffusion_steps = {total} (the full chain); 5 is a cheap DDIM"
        )
    return problems


class PatchBranch(nnx.Module):
    """(B, H, W, C) map -> patch outputs (module docstring)."""

    def __init__(
        self,
        channels: int,
        config: ml_collections.ConfigDict,
        *,
        rngs: nnx.Rngs,
        bn_group_size: int = 0,
    ):
        self.num = int(config.num)
        self.diffusion_steps = int(config.diffusion_steps)
        self.sampling_steps = int(config.sampling_steps)
        hidden = int(config.hidden)
        dim = self.num * 6
        self.proposal = nnx.List(
            [
                nnx.Linear(channels, hidden, rngs=rngs),
                # Zero: every theta starts at its band.
                nnx.Linear(hidden, dim, kernel_init=host_zeros, bias_init=host_zeros, rngs=rngs),
            ]
        )
        self.bn = GhostBatchNorm((self.num, channels), group_size=bn_group_size)
        self.denoiser = diffusion.Denoiser(
            dim, channels, hidden=hidden, time_dim=int(config.time_dim), rngs=rngs
        )

    def _features(self, feature_map: jax.Array, theta: jax.Array, train: bool) -> jax.Array:
        return l2_normalize(self.bn(pooled_patches(feature_map, theta), train))

    def __call__(
        self, feature_map: jax.Array, train: bool, rng: jax.Array | None = None
    ) -> dict[str, jax.Array]:
        feature_map = feature_map.astype(jnp.float32)
        b = feature_map.shape[0]
        band = band_thetas(self.num)
        pooled = jnp.mean(feature_map, axis=(1, 2))
        condition = jax.lax.stop_gradient(pooled)
        schedule = diffusion.cosine_schedule(self.diffusion_steps)

        def denoise(x_t, t):
            return self.denoiser(x_t, t, condition)

        if not train:
            if self.sampling_steps:
                offsets = diffusion.sample(
                    denoise,
                    schedule,
                    jnp.zeros((b, self.num * 6), jnp.float32),
                    jax.random.key(0),  # unused: eta 0
                    self.sampling_steps,
                    eta=0.0,
                )
            else:
                offsets = self._offsets(pooled)
            theta = band + offsets.reshape(b, self.num, 2, 3)
            return {"patches": self._features(feature_map, theta, False), "theta": theta}

        offsets = self._offsets(pooled)
        theta = band + offsets.reshape(b, self.num, 2, 3)
        outputs = {"patches": self._features(feature_map, theta, True), "theta": theta}
        if rng is None:  # a statistics-only pass (camera batch norm): no diffusion draws
            return outputs
        k_t, k_noise = jax.random.split(rng)
        t = jax.random.randint(k_t, (b,), 0, self.diffusion_steps)
        noise = jax.random.normal(k_noise, offsets.shape, jnp.float32)
        x_t = diffusion.q_sample(schedule, jax.lax.stop_gradient(offsets), t, noise)
        noise_pred = denoise(x_t, t)
        x0 = jnp.clip(diffusion.predict_x0(schedule, x_t, t, noise_pred), -1.0, 1.0)
        denoised = band + x0.reshape(b, self.num, 2, 3)
        patches = pooled_patches(jax.lax.stop_gradient(feature_map), denoised)
        outputs.update(
            noise=noise,
            noise_pred=noise_pred,
            theta_denoised=denoised,
            patches_denoised=l2_normalize(patches),
        )
        return outputs

    def _offsets(self, pooled: jax.Array) -> jax.Array:
        first, second = self.proposal
        return second(jax.nn.relu(first(pooled)))

"""SDFT's fusion head (jaxreid/models/fusion.py): the fused tokens equal a
PyTorch transcription of the same weights, the blocks start from the
backbone's last block, and the head serves the stripe methods through the
model (outputs, config checks)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxreid import models
from jaxreid.models.fusion import FusionHead
from jaxreid.models.heads import TokenMap
from jaxreid.models.layers import stripe_bins

WIDTH, HEADS, STRIPES = 24, 3, 4


def _head(depth=2, seed=0):
    return FusionHead(
        WIDTH,
        HEADS,
        depth=depth,
        embed_dim=16,
        num_stripes=STRIPES,
        rngs=nnx.Rngs(seed),
    )


def _randomise(module, seed):
    """Every parameter of `module` drawn at O(1) (init leaves LayerNorms at 1 / 0)."""
    state = nnx.state(module, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    new = [
        jnp.asarray(rng.normal(size=x.shape) * 0.3 + (x == 1) * 1.0, jnp.float32) for x in leaves
    ]
    nnx.update(module, jax.tree.unflatten(treedef, new))


def _torch_block(torch, block):
    """torch_vit.Block holding `block`'s parameters."""
    from torch_vit import Block

    net = Block(WIDTH, HEADS)
    p = nnx.state(block, nnx.Param)

    def tensor(x, transpose=False):
        x = np.asarray(x[...])
        return torch.from_numpy(np.ascontiguousarray(x.T if transpose else x))

    with torch.no_grad():
        for name in ("norm1", "norm2"):
            getattr(net, name).weight.copy_(tensor(p[name]["scale"]))
            getattr(net, name).bias.copy_(tensor(p[name]["bias"]))
        for owner, name in (("attn", "qkv"), ("attn", "proj"), ("mlp", "fc1"), ("mlp", "fc2")):
            layer = getattr(getattr(net, owner), name)
            layer.weight.copy_(tensor(p[owner][name]["kernel"], transpose=True))
            layer.bias.copy_(tensor(p[owner][name]["bias"]))
    return net.eval()


def test_fused_tokens_equal_a_torch_transcription():
    torch = pytest.importorskip("torch")
    pytest.importorskip("torch_vit")
    head = _head()
    _randomise(head, 1)
    rng = np.random.default_rng(2)
    grid = rng.normal(size=(3, 6, 2, WIDTH)).astype(np.float32)  # 6 rows, 4 stripes: shared rows
    cls = rng.normal(size=(3, WIDTH)).astype(np.float32)
    got_cls, got_parts = head.fused_tokens(TokenMap(grid=jnp.asarray(grid), cls=jnp.asarray(cls)))

    # The reference: band means (torch's AdaptiveAvgPool2d((P, 1)) bins), part
    # embeddings, [CLS] first, the blocks, LayerNorm eps 1e-6.
    g = torch.from_numpy(grid).permute(0, 3, 1, 2)  # (B, C, H, W)
    parts = torch.nn.functional.adaptive_avg_pool2d(g, (STRIPES, 1))[..., 0].transpose(1, 2)
    parts = parts + torch.from_numpy(np.array(head.part_embed[...]))
    x = torch.cat([torch.from_numpy(cls)[:, None], parts], dim=1)
    for block in head.blocks:
        x = _torch_block(torch, block)(x)
    norm = torch.nn.LayerNorm(WIDTH, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(np.asarray(head.norm.scale[...])))
        norm.bias.copy_(torch.from_numpy(np.asarray(head.norm.bias[...])))
        x = norm(x).numpy()
    np.testing.assert_allclose(np.asarray(got_cls), x[:, 0], atol=1e-4)
    np.testing.assert_allclose(np.asarray(got_parts), x[:, 1:], atol=1e-4)
    assert stripe_bins(6, STRIPES)[1] == (1, 3)  # the case has overlapping bins


def test_parts_and_global_interact():
    """A change confined to the bottom band moves the fused [CLS] token and
    every fused part (attention mixes them), not only the bottom part."""
    head = _head(depth=1)
    _randomise(head, 3)
    rng = np.random.default_rng(4)
    grid = rng.normal(size=(1, 8, 2, WIDTH)).astype(np.float32)
    cls = rng.normal(size=(1, WIDTH)).astype(np.float32)
    changed = grid.copy()
    # The last band only; not a constant shift, which LayerNorm would remove.
    changed[:, 6:] += rng.normal(size=changed[:, 6:].shape).astype(np.float32)
    a = head.fused_tokens(TokenMap(jnp.asarray(grid), jnp.asarray(cls)))
    b = head.fused_tokens(TokenMap(jnp.asarray(changed), jnp.asarray(cls)))
    assert np.abs(np.asarray(a[0] - b[0])).max() > 1e-3
    assert np.all(np.abs(np.asarray(a[1] - b[1])).max(-1) > 1e-3)


def test_copy_block_starts_every_fusion_block_from_the_backbones_last():
    config = _model_config()
    model = models.build_model(config, nnx.Rngs(0))
    last = nnx.state(model.backbone.blocks[-1], nnx.Param)
    for block in model.head.blocks:
        got = nnx.state(block, nnx.Param)
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(last), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _model_config(**overrides):
    config = models.default_model_config()
    config.backbone = "vit_tiny"
    config.vit_depth = 2
    config.image_size = (64, 32)
    config.head = "fusion"
    config.pooling = "cls"
    config.embed_dim = 64
    config.num_stripes = 4
    config.fusion_depth = 1
    for key, value in overrides.items():
        config[key] = value
    return config


def test_model_with_the_fusion_head_gives_the_stripe_outputs():
    config = _model_config()
    model = models.build_model(config, nnx.Rngs(0))
    graphdef, params, stats = models.split_model(model)
    images = jnp.asarray(np.random.default_rng(0).uniform(0, 255, (4, 64, 32, 3)), jnp.float32)
    for train in (False, True):
        outputs, _ = models.apply_model(
            graphdef, params, stats, images, train=train, rng=jax.random.key(0)
        )
        assert outputs["global"].shape == (4, 64)
        assert outputs["stripes"].shape == (4, 4, 16)
        np.testing.assert_allclose(np.linalg.norm(outputs["stripes"], axis=-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"backbone": "resnet18"}, "model.head = 'fusion'"),
        ({"fusion_depth": 0}, "model.fusion_depth = 0"),
    ],
)
def test_fusion_head_config_problems(overrides, expected):
    from jaxreid.config_base import base_config
    from jaxreid.models.model import model_problems

    config = base_config()
    config.model = _model_config(**overrides)
    problems = model_problems(config)
    assert any(expected in p for p in problems), problems

"""OSNet: equivalence with an independent PyTorch transcription (tests/torch_osnet.py)
on random weights (eval and train mode, running statistics included), the other
heads on the OSNet backbone, torch-free import of torchreid checkpoints, and the
shared MSMT17 checkpoint on CUHK03 (features equal to torch's, mAP as measured)."""

from __future__ import annotations

import copy
import os

import jax
import numpy as np
import pytest
from flax import nnx

from jaxreid import models
from jaxreid.augment import IMAGENET_MEAN, IMAGENET_STD
from jaxreid.models import pretrained
from jaxreid.models.osnet import OSNET_WIDTHS

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
CUHK03 = os.path.abspath(os.path.join(SHARED, "cuhk03"))
MSMT17_WEIGHTS = os.path.abspath(os.path.join(SHARED, "weights", "osnet_x0_25_msmt17.pth"))
MSMT17_CLASSES = 1041

needs_real_data = pytest.mark.skipif(
    not (os.path.isfile(MSMT17_WEIGHTS) and os.path.isdir(CUHK03)),
    reason="../shared/data/weights/osnet_x0_25_msmt17.pth or ../shared/data/cuhk03 is absent",
)

# 128 x 64 inputs keep the last OSNet maps at 8 x 4: XLA's CPU convolution is
# pathologically slow on maps of a few pixels.
HEIGHT, WIDTH = 128, 64
NUM_CLASSES = 7  # the random checkpoints' classifier (never loaded)

# One compiled forward per (graphdef, train, shape); the XLA cache of conftest keeps them.
_apply = jax.jit(models.apply_model, static_argnums=(0, 4))


def _torch():
    torch = pytest.importorskip("torch")
    from torch_osnet import TorchOSNet

    return torch, TorchOSNet


@pytest.fixture(scope="module", autouse=True)
def _torch_single_thread():
    """The torch forwards here are a few small batches: with several intra-op threads
    they wait seconds for cores that XLA (or another process) holds."""
    try:
        import torch
    except ImportError:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(backbone="osnet_x0_25", **overrides):
    config = models.default_model_config()
    config.update(backbone=backbone, head="fc", embed_dim=512, pooling="avg")
    config.update(overrides)
    return config


def _images(batch, seed=0, height=HEIGHT, width=WIDTH):
    """Random pictures that differ from each other after pooling (noise alone looks
    the same to the network): a coarse random colour layout per image (8 x 4
    blocks) plus pixel noise of a random strength."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (batch, 8, 4, 3))
    layout = coarse.repeat(height // 8, axis=1).repeat(width // 4, axis=2)
    noise = rng.uniform(-1, 1, (batch, height, width, 3)) * rng.uniform(10, 80, (batch, 1, 1, 1))
    return np.clip(layout + noise, 0, 255).astype(np.float32)


def _torch_input(torch, images):
    """RGB pixels (B, H, W, 3) -> normalised (B, 3, H, W), as torchreid's transforms."""
    x = torch.from_numpy(np.asarray(images, np.float32))
    x = (x - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    return x.permute(0, 3, 1, 2).contiguous()


def _batch_norms(torch, net):
    return [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def _random_torch_osnet(torch, TorchOSNet, backbone, seed=0):
    """A TorchOSNet with random weights whose BN layers are all non-trivial: random
    affine parameters, and running statistics calibrated on random images in eval
    mode (each layer's statistics are those of its input given the layers before
    it, so activations stay O(1) through the depth), then randomly perturbed."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = TorchOSNet(channels=OSNET_WIDTHS[backbone], feature_dim=512, num_classes=NUM_CLASSES)

    def calibrate(bn, inputs):
        x = inputs[0]
        dims = [d for d in range(x.ndim) if d != 1]
        std = x.var(dims, unbiased=True).sqrt()
        shape = std.shape
        bn.running_mean.copy_(x.mean(dims) + 0.2 * std * torch.randn(shape, generator=g))
        bn.running_var.copy_(std**2 * (0.7 + 0.6 * torch.rand(shape, generator=g)))

    net.eval()
    with torch.no_grad():
        hooks = []
        for bn in _batch_norms(torch, net):
            bn.weight.copy_(0.5 + torch.rand(bn.weight.shape, generator=g))
            bn.bias.copy_(0.2 * torch.randn(bn.bias.shape, generator=g))
            hooks.append(bn.register_forward_pre_hook(calibrate))
        net(_torch_input(torch, _images(16, seed=100 + seed)))
        for hook in hooks:
            hook.remove()
    return net


def _save(torch, state, path, zip_format=True):
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    return str(path)


@pytest.fixture(scope="module")
def random_checkpoints(tmp_path_factory):
    """backbone -> (path of the random torchreid-layout checkpoint, its TorchOSNet)."""
    torch, TorchOSNet = _torch()
    folder = tmp_path_factory.mktemp("osnet")
    made = {}
    for seed, backbone in enumerate(("osnet_x0_25", "osnet_x0_5")):
        net = _random_torch_osnet(torch, TorchOSNet, backbone, seed=seed)
        made[backbone] = (_save(torch, net.state_dict(), folder / f"{backbone}.pth"), net)
    return made


def _flax_batch_stats_as_torch(model) -> dict[str, np.ndarray]:
    """Running statistics of a ReIDModel with head "fc", under torchreid's keys."""
    found = {}
    for part, prefix in ((model.backbone, ""), (model.head.fc, "fc.")):
        for key, variable in pretrained.torch_key_map(part).items():
            if key.endswith(("running_mean", "running_var")):
                found[prefix + key] = np.asarray(variable[...])
    return found


# ------------------------------------------ random weights: equal to torch


def _assert_close_to_scale(ours, reference, what, rel=1e-4):
    """max |ours - reference| <= rel * max |reference| (float32 through ~90 layers:
    torch's own float32 forward differs from its float64 one by ~3e-5 of the scale)."""
    assert ours.shape == reference.shape, what
    scale = float(np.abs(reference).max())
    error = float(np.abs(ours - reference).max())
    assert error <= rel * scale, f"{what}: max abs difference {error:.3g}, scale {scale:.3g}"
    return error, scale


@pytest.mark.parametrize("backbone", ["osnet_x0_25", "osnet_x0_5"])
def test_random_weights_eval_and_train_match_torch_transcription(random_checkpoints, backbone):
    """The fc feature ("pre_bn") in eval mode and in train mode (batch statistics in
    every BN, whole batch: bn_group_size 0), within 1e-4 of the feature scale (O(1),
    asserted), and every running mean / variance after the train step (torch:
    momentum 0.1, unbiased variance) within rtol 1e-5 + atol 1e-6."""
    torch, _ = _torch()
    path, net = random_checkpoints[backbone]
    model = models.build_model(_config(backbone, pretrained=path, bn_group_size=0), nnx.Rngs(0))
    graphdef, params, batch_stats = models.split_model(model)
    # Batch 8: with 4 the BatchNorm1d of `fc` divides by the spread of 4 samples, and
    # torch's float32 train forward itself strays ~2e-4 of the scale from float64.
    images = _images(8, seed=1)
    x = _torch_input(torch, images)

    outputs, _ = _apply(graphdef, params, batch_stats, images, False)
    net.eval()
    with torch.no_grad():
        reference = net(x).numpy()
    ours = np.asarray(outputs["pre_bn"])
    assert ours.shape == (8, 512)
    assert 1.0 < float(np.abs(reference).max()) < 100.0 and 0.2 < (reference > 0).mean() < 0.8
    _assert_close_to_scale(ours, reference, "eval fc feature")
    norms = np.linalg.norm(ours, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(outputs["global"]), ours / norms, atol=1e-6)

    outputs, new_stats = _apply(graphdef, params, batch_stats, images, True)
    train_net = copy.deepcopy(net).train()  # the fixture's net keeps its statistics
    with torch.no_grad():
        train_reference = train_net(x).numpy()
    assert 1.0 < float(np.abs(train_reference).max()) < 100.0
    # Batch statistics really are in use: the train feature differs from the eval one.
    assert float(np.abs(train_reference - reference).max()) > 0.1
    _assert_close_to_scale(np.asarray(outputs["pre_bn"]), train_reference, "train fc feature")

    nnx.update(model, new_stats)
    updated = _flax_batch_stats_as_torch(model)
    after, before = train_net.state_dict(), net.state_dict()
    assert len(updated) == 2 * len(_batch_norms(torch, train_net))
    for key, value in updated.items():
        expected = after[key].numpy()
        # The step moved the statistics (so comparing them is meaningful).
        assert float(np.abs(expected - before[key].numpy()).max()) > 1e-3, key
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6, err_msg=key)


# --------------------------------------- the other heads on the OSNet backbone


@pytest.mark.parametrize("head, pooling", [("bnneck", "gem"), ("scl", "avg")])
def test_other_heads_run_on_the_torchreid_backbone(random_checkpoints, head, pooling):
    """The torchreid checkpoint loads into the backbone, and its fc into SCL's global
    branch (Linear + BN, no ReLU) or, for bnneck, nowhere (counted). "pre_bn" is the
    head's Linear (bnneck: its own random projection) on the pooled torch feature map."""
    torch, _ = _torch()
    path, net = random_checkpoints["osnet_x0_25"]
    config = _config(head=head, pooling=pooling, num_stripes=4)
    model = models.build_model(config, nnx.Rngs(0))
    ignored = pretrained.load_torchreid_osnet(model, head, path)
    expected_ignored = {"classifier": 2}  # classifier.weight, classifier.bias
    if head == "bnneck":  # fc.0.{weight,bias}, fc.1.{weight,bias,running_*,num_batches_tracked}
        expected_ignored["fc (unused by head 'bnneck')"] = 7
    assert ignored == expected_ignored
    graphdef, params, batch_stats = models.split_model(model)
    images = _images(4, seed=2)

    outputs, _ = _apply(graphdef, params, batch_stats, images, False)
    net.eval()
    with torch.no_grad():
        feature_map = net.featuremaps(_torch_input(torch, images))
        if head == "bnneck":
            pooled = feature_map.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3).numpy()
            linear = model.head.projection
            pre_bn = pooled @ np.asarray(linear.kernel[...]) + np.asarray(linear.bias[...])
        else:
            pooled = feature_map.mean((2, 3))
            pre_bn = net.fc[0](pooled).numpy()
            embedding = torch.nn.functional.normalize(net.fc[1](net.fc[0](pooled))).numpy()
    _assert_close_to_scale(np.asarray(outputs["pre_bn"]), pre_bn, f"{head} pre_bn")
    assert outputs["global"].shape == (4, 512)
    np.testing.assert_allclose(np.linalg.norm(outputs["global"], axis=1), 1.0, atol=1e-5)
    if head == "scl":
        _assert_close_to_scale(np.asarray(outputs["global"]), embedding, "scl global")
        assert outputs["stripes"].shape == (4, 4, 128)
        np.testing.assert_allclose(np.linalg.norm(outputs["stripes"], axis=2), 1.0, atol=1e-5)

    outputs, new_stats = _apply(graphdef, params, batch_stats, images, True)
    assert outputs["global"].shape == (4, 512) and np.isfinite(outputs["global"]).all()
    if head == "scl":
        assert outputs["stripes"].shape == (4, 4, 128)
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), new_stats, batch_stats)
    assert min(jax.tree.leaves(moved)) > 0  # every BN (backbone and head) updated


# ------------------------------------------------ torchreid checkpoint import


def _checkpoint_state(torch, net, wrapped):
    state = net.state_dict()
    if not wrapped:
        return state
    return {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}


def _assert_holds(model, torch_state):
    """Every backbone and fc variable of `model` equals the torchreid tensor."""
    parts = ((model.backbone, ""), (model.head.fc, "fc."))
    checked = 0
    for part, prefix in parts:
        for key, variable in pretrained.torch_key_map(part).items():
            expected = torch_state[prefix + key].numpy()
            got = pretrained._torch_layout(np.asarray(variable[...]))
            np.testing.assert_array_equal(got, expected, err_msg=prefix + key)
            checked += 1
    expected_count = sum(
        not k.endswith("num_batches_tracked") and not k.startswith("classifier.")
        for k in torch_state
    )
    assert checked == expected_count


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "state_dict-module"])
def test_imports_torchreid_checkpoints(random_checkpoints, tmp_path, wrapped, zip_format):
    torch, _ = _torch()
    net = random_checkpoints["osnet_x0_25"][1]
    path = _save(torch, _checkpoint_state(torch, net, wrapped), tmp_path / "c.pth", zip_format)
    model = models.build_model(_config(), nnx.Rngs(0))
    random_kernel = np.asarray(model.backbone.conv1.conv.kernel[...]).copy()

    ignored = pretrained.load_torchreid_osnet(model, "fc", path)

    assert ignored == {"classifier": 2}  # classifier.weight, classifier.bias
    _assert_holds(model, net.state_dict())
    assert not np.array_equal(random_kernel, model.backbone.conv1.conv.kernel[...])
    # build_model (config.pretrained) loads the same weights.
    built = models.build_model(_config(pretrained=path), nnx.Rngs(1))
    _assert_holds(built, net.state_dict())


def _error_message(config):
    with pytest.raises(models.CheckpointError) as error:
        models.build_model(config, nnx.Rngs(0))
    message = str(error.value)
    assert "\n" not in message
    return message


def test_checkpoint_that_does_not_fit_gives_one_line_naming_the_keys(random_checkpoints, tmp_path):
    torch, _ = _torch()
    state = random_checkpoints["osnet_x0_25"][1].state_dict()
    del state["conv2.0.conv2b.1.bn.running_var"]
    state["conv9.conv.weight"] = torch.zeros(3)
    state["conv5.conv.weight"] = torch.zeros(128, 96, 1, 1)
    state["fc.0.weight"] = torch.zeros(512, 100)
    del state["fc.1.bias"]
    path = _save(torch, state, tmp_path / "bad.pth")

    message = _error_message(_config(pretrained=path))

    for expected in (
        path,
        "missing keys (2): conv2.0.conv2b.1.bn.running_var, fc.1.bias",
        "unexpected keys (1): conv9.conv.weight",
        "mis-shaped keys (2): conv5.conv.weight: checkpoint (128, 96, 1, 1), "
        "model (128, 128, 1, 1), fc.0.weight: checkpoint (512, 100), model (512, 128)",
    ):
        assert expected in message, message


def test_head_fc_needs_the_fc_keys(random_checkpoints, tmp_path):
    torch, _ = _torch()
    state = random_checkpoints["osnet_x0_25"][1].state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    path = _save(torch, state, tmp_path / "no_fc.pth")

    message = _error_message(_config(pretrained=path))
    assert "missing keys (6): fc.0.bias, fc.0.weight, fc.1.bias" in message, message
    # The same checkpoint suits a head that does not use fc.
    model = models.build_model(_config(head="bnneck", embed_dim=0), nnx.Rngs(0))
    assert pretrained.load_torchreid_osnet(model, "bnneck", path) == {"classifier": 2}


def test_wrong_width_is_an_error(random_checkpoints):
    message = _error_message(_config("osnet_x0_5", pretrained=random_checkpoints["osnet_x0_25"][0]))
    assert "mis-shaped keys" in message and "conv1.conv.weight" in message, message


def test_imagenet_is_an_error_for_osnet():
    message = _error_message(_config(pretrained="imagenet"))
    assert "osnet_x0_25" in message and "torchreid" in message, message


def test_frozen_stages_get_no_gradient_and_no_update():
    """freeze_stages = 2: the stem and conv2 get zero gradients and the optimizer
    (with weight decay) leaves them as they are; conv3 on and the head move; the
    frozen stages' batch-norm statistics still follow the batch."""
    import jax.numpy as jnp
    import ml_collections

    from jaxreid.step import make_optimizer

    model = models.build_model(_config(freeze_stages=2), nnx.Rngs(0))
    graphdef, params, batch_stats = models.split_model(model)
    images = _images(4)

    def loss(p):
        outputs, stats = models.apply_model(graphdef, p, batch_stats, images, train=True)
        return jnp.sum(outputs["global"] ** 2), stats

    grads, new_stats = jax.grad(loss, has_aux=True)(params)
    config = ml_collections.ConfigDict(
        {
            "optimizer": dict(
                name="adam",
                lr=1e-2,
                weight_decay=5e-4,
                schedule="constant",
                momentum=0.9,
                nesterov=False,
                step_epochs=1,
                step_factor=0.1,
            ),
            "train": dict(epochs=1),
        }
    )
    mask = models.trainable_mask(model, params)
    tx = make_optimizer(config, 1, mask)
    updates, _ = tx.update(grads, tx.init(params), params)
    moved = jax.tree_util.tree_map(lambda u: bool(np.any(np.asarray(u) != 0)), updates)
    for (path, trainable), (_, grad), (_, did_move) in zip(
        jax.tree_util.tree_leaves_with_path(mask),
        jax.tree_util.tree_leaves_with_path(grads),
        jax.tree_util.tree_leaves_with_path(moved),
        strict=True,
    ):
        name = jax.tree_util.keystr(path)
        frozen = "'conv1'" in name.split("]")[1] or "'conv2'" in name.split("]")[1]
        frozen = frozen and name.startswith("['backbone']")
        assert trainable == (not frozen), name
        if frozen:
            assert not np.any(np.asarray(grad)), name
            assert not did_move, name
    assert any(jax.tree_util.tree_leaves(moved))  # the rest trains
    old = np.asarray(batch_stats["backbone"]["conv1"]["bn"]["mean"][...])
    assert np.any(np.asarray(new_stats["backbone"]["conv1"]["bn"]["mean"][...]) != old)
    # Nothing frozen: the plain chain, so existing configs keep their bits.
    unfrozen = models.build_model(_config(), nnx.Rngs(0))
    _, unfrozen_params, _ = models.split_model(unfrozen)
    state = make_optimizer(config, 1, models.trainable_mask(unfrozen, unfrozen_params)).init(
        unfrozen_params
    )
    assert isinstance(state, tuple) and len(state) == 2  # add_decayed_weights, adam


# ---------------------------------------- the shared MSMT17 model on CUHK03


def _msmt17_model():
    model = models.build_model(_config(pretrained=MSMT17_WEIGHTS), nnx.Rngs(0))
    return models.split_model(model)


def _cuhk03():
    from jaxreid.data.datasets import load_dataset

    return load_dataset("cuhk03", CUHK03)


@needs_real_data
def test_msmt17_features_of_cuhk03_images_equal_torch():
    """The fc features of 16 CUHK03 query images (the project's decoding, 256 x 128)
    equal a torch forward of the same checkpoint, atol 1e-4."""
    torch, TorchOSNet = _torch()
    from jaxreid.data.images import decode_split

    images = decode_split(_cuhk03().query[:16], 256, 128, desc="query").images
    assert images.shape == (16, 256, 128, 3) and images.std() > 10
    graphdef, params, batch_stats = _msmt17_model()
    outputs, _ = _apply(graphdef, params, batch_stats, images.astype(np.float32), False)

    net = TorchOSNet(num_classes=MSMT17_CLASSES)
    net.load_state_dict(torch.load(MSMT17_WEIGHTS, map_location="cpu"))
    with torch.no_grad():
        reference = net.eval()(_torch_input(torch, images)).numpy()
    assert 0.5 < float(np.abs(reference).max()) < 100.0
    np.testing.assert_allclose(np.asarray(outputs["pre_bn"]), reference, rtol=0, atol=1e-4)


@pytest.mark.slow
@pytest.mark.realdata
@needs_real_data
def test_msmt17_map_on_cuhk03():
    """Whole query (1,400) / gallery (5,340) at 256 x 128, global cosine, Market-1501
    protocol: mAP 10.0 +- 0.2, rank-1 9.5 +- 0.3 (../shared/data/README.md). About a
    minute on 2 CPU cores, hence slow; the fast variant is the 16-image equality
    with torch above."""
    from jaxreid import evaluate
    from jaxreid.data.images import decode_split
    from jaxreid.evaluate.protocol import extract

    dataset = _cuhk03()
    graphdef, params, batch_stats = _msmt17_model()
    splits = [
        decode_split(s, 256, 128, desc=d)
        for s, d in ((dataset.query, "query"), (dataset.gallery, "gallery"))
    ]
    query, gallery = (
        extract(graphdef, params, batch_stats, s.images, 128)["global"] for s in splits
    )
    assert query.shape == (1400, 512) and gallery.shape == (5340, 512)

    q, g = splits
    metrics = evaluate.evaluate_ranking(
        evaluate.cosine_distance(query, gallery), q.pids, g.pids, q.cameras, g.cameras
    )
    # 7 queries have no gallery image of their identity in the other camera.
    assert metrics["num_valid_queries"] >= 1390, metrics["num_valid_queries"]
    print(f"mAP {100 * metrics['mAP']:.2f} rank-1 {100 * metrics['rank1']:.2f}")
    assert abs(100 * metrics["mAP"] - 10.0) <= 0.2, metrics["mAP"]
    assert abs(100 * metrics["rank1"] - 9.5) <= 0.3, metrics["rank1"]

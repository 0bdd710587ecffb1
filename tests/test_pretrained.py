"""Torch-free checkpoint reading, the restricted unpickler, key mapping, and
numerical equivalence of the Flax backbones with independent torch references."""

from __future__ import annotations

import builtins
import math
import os
import pickle
import subprocess
import zipfile

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxreid import models
from jaxreid.augment import IMAGENET_MEAN, IMAGENET_STD
from jaxreid.models import pretrained

# ------------------------------------------------------------------ reading files


def _torch_state_dict_all_dtypes(torch):
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(40, generator=g)
    return {
        # non-contiguous: a permuted view keeps the permuted strides when saved
        "conv.weight": torch.randn(3, 3, 2, 4, generator=g).permute(3, 2, 0, 1),
        "fc.weight": torch.randn(5, 3, generator=g).t(),
        # storage offsets: two views into one shared storage
        "view_a": shared[3:9],
        "view_b": shared[10:30].view(4, 5)[:, 1:4],
        "half": torch.randn(6, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "long": torch.arange(-3, 9, dtype=torch.int64).view(3, 4),
        "byte": torch.arange(250, 256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(7, dtype=torch.int64),
        "empty": torch.zeros(0, 3),
    }


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_reads_torch_checkpoints_all_dtypes_strides_offsets(tmp_path, zip_format):
    torch = pytest.importorskip("torch")
    state = _torch_state_dict_all_dtypes(torch)
    assert not state["conv.weight"].is_contiguous() and state["view_b"].storage_offset() > 0
    path = tmp_path / "state.pth"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    assert zipfile.is_zipfile(path) == zip_format

    loaded = pretrained.read_checkpoint(path)

    assert sorted(loaded) == sorted(state)
    for key, tensor in state.items():
        expected = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        got = loaded[key]
        assert got.shape == tuple(tensor.shape), key
        if key == "bf16":
            assert got.dtype.name == "bfloat16"
            got = got.astype(np.float32)
        else:
            assert got.dtype == expected.dtype, key
        np.testing.assert_array_equal(got, expected, err_msg=key)


def test_reads_packaged_efficientnet_checkpoint_like_torch():
    torch = pytest.importorskip("torch")
    path = pretrained.packaged_efficientnet_lite0_path()
    reference = torch.load(path, map_location="cpu", weights_only=True)
    loaded = pretrained.read_checkpoint(path)
    assert sorted(loaded) == sorted(reference)
    for key, tensor in reference.items():
        np.testing.assert_array_equal(loaded[key], tensor.numpy(), err_msg=key)


def test_unwraps_state_dict_and_module_prefix(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "wrapped.pth"
    torch.save({"epoch": 3, "state_dict": {"module.w": torch.ones(2)}}, path)
    loaded = pretrained.read_checkpoint(path)
    assert list(loaded) == ["w"]
    np.testing.assert_array_equal(loaded["w"], np.ones(2, np.float32))


# ----------------------------------------------------------- malicious pickles


class _Payload:
    """Pickles to a call of `func(*args)` at load time (what an attacker writes)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker):
    return {
        "os.system": (_Payload(os.system, f"touch {marker}"), "system"),
        "builtins.eval": (
            _Payload(builtins.eval, f"open({str(marker)!r}, 'w').write('pwned')"),
            "builtins.eval",
        ),
        "subprocess": (_Payload(subprocess.call, ["touch", str(marker)]), "subprocess.call"),
    }


def _zip_checkpoint(path, pickled: bytes):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")


def _legacy_checkpoint(path, pickled: bytes):
    with open(path, "wb") as f:
        f.write(pickle.dumps(pretrained.LEGACY_MAGIC_NUMBER, protocol=2))
        f.write(pickle.dumps(pretrained.LEGACY_PROTOCOL_VERSION, protocol=2))
        f.write(pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2))
        f.write(pickled)
        f.write(pickle.dumps([], protocol=2))


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "subprocess"])
@pytest.mark.parametrize("writer", [_zip_checkpoint, _legacy_checkpoint], ids=["zip", "legacy"])
def test_refuses_malicious_pickles_without_running_them(tmp_path, kind, writer):
    marker = tmp_path / "marker"
    payload, global_name = _payloads(marker)[kind]
    # Protocol 4 keeps Python 3 module names (protocol 2 would write __builtin__).
    pickled = pickle.dumps({"conv1.weight": payload}, protocol=4)
    # Control: a plain unpickler really runs the payload (the test is meaningful).
    live_marker = tmp_path / "live"
    pickle.loads(pickle.dumps(_payloads(live_marker)[kind][0], protocol=4))
    assert live_marker.exists()

    path = tmp_path / "evil.pth"
    writer(path, pickled)
    with pytest.raises(pretrained.UnsafeCheckpointError) as error:
        pretrained.read_checkpoint(path)

    assert not marker.exists()
    message = str(error.value)
    assert str(path) in message and global_name in message and "refusing" in message


def test_refuses_unknown_persistent_ids(tmp_path):
    class PersistentPickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("module", "evil") if obj == "x" else None

    import io

    buffer = io.BytesIO()
    PersistentPickler(buffer, protocol=2).dump({"w": "x"})
    path = tmp_path / "pid.pth"
    _zip_checkpoint(path, buffer.getvalue())
    with pytest.raises(pretrained.CheckpointError, match="persistent id"):
        pretrained.read_checkpoint(path)


# --------------------------------------------------------------------- mapping


def _tiny_config(**overrides):
    config = models.default_model_config()
    config.backbone = "resnet18"
    config.embed_dim = 64
    config.num_stripes = 4
    config.update(overrides)
    return config


def _torch_layout_state(backbone) -> dict[str, np.ndarray]:
    """The model's own backbone weights as a torchvision-layout state dict."""
    return {
        key: pretrained._torch_layout(np.asarray(variable[...]))
        for key, variable in pretrained.torch_key_map(backbone).items()
    }


def test_mapping_errors_list_all_problems_at_once():
    model = models.build_model(_tiny_config(), nnx.Rngs(0))
    state = _torch_layout_state(model.backbone)
    before = np.asarray(model.backbone.conv1.kernel[...]).copy()
    del state["layer2.0.bn1.running_var"]
    del state["layer4.1.conv2.weight"]
    state["layer9.0.conv1.weight"] = np.zeros((1,), np.float32)
    state["conv1.weight"] = np.zeros((64, 3, 5, 5), np.float32)
    state["fc.weight"] = np.zeros((1000, 512), np.float32)  # classifier: ignored
    state["bn1.num_batches_tracked"] = np.zeros((), np.int64)  # ignored

    with pytest.raises(pretrained.CheckpointError) as error:
        pretrained.load_state_dict(
            model.backbone, state, ignore=lambda k: k.startswith("fc."), source="ckpt.pth"
        )

    message = str(error.value)
    for expected in (
        "ckpt.pth",
        "missing keys (2): layer2.0.bn1.running_var, layer4.1.conv2.weight",
        "unexpected keys (1): layer9.0.conv1.weight",
        "mis-shaped keys (1): conv1.weight: checkpoint (64, 3, 5, 5), model (64, 3, 7, 7)",
    ):
        assert expected in message
    # Nothing was written on failure.
    np.testing.assert_array_equal(model.backbone.conv1.kernel[...], before)


def test_pretrained_path_round_trip_and_imagenet_error(tmp_path):
    torch = pytest.importorskip("torch")
    source = models.build_model(_tiny_config(), nnx.Rngs(1))
    state = {
        k: torch.from_numpy(np.array(v)) for k, v in _torch_layout_state(source.backbone).items()
    }
    state["fc.weight"] = torch.zeros(1000, 512)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)

    loaded = models.build_model(_tiny_config(pretrained=str(path)), nnx.Rngs(2))
    for (p, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(source.backbone)),
        nnx.to_flat_state(nnx.state(loaded.backbone)),
        strict=True,
    ):
        np.testing.assert_array_equal(a[...], b[...], err_msg=str(p))

    with pytest.raises(pretrained.CheckpointError, match=r"resnet50-0676ba61\.pth"):
        models.build_model(_tiny_config(pretrained="imagenet"), nnx.Rngs(0))
    with pytest.raises(pretrained.CheckpointError, match="missing keys"):  # IBN needs IBN keys
        models.build_model(_tiny_config(pretrained=str(path), ibn=True), nnx.Rngs(0))


# ------------------------------------------- numerical equivalence with torch


def _pooled_backbone_features(model, images):
    graphdef, params, stats = models.split_model(model)

    @jax.jit
    def features(params, stats, images):
        backbone = nnx.merge(graphdef, params, stats).backbone
        return backbone(images, train=False).mean((1, 2))

    return np.asarray(features(params, stats, images))


def _random_images(shape, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, shape).astype(np.float32)


def _torch_efficientnet_lite0(torch, state, images_nchw):
    """Independent reference: EfficientNet-Lite0 from the TF block strings, torch ops."""
    F = torch.nn.functional

    def same_pad(x, kernel, stride):  # TensorFlow "SAME"
        pads = []
        for size in (x.shape[3], x.shape[2]):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)

    def conv(x, key, stride=1, groups=1):
        weight = state[key]
        return F.conv2d(same_pad(x, weight.shape[-1], stride), weight, None, stride, 0, 1, groups)

    def bn(x, key):
        return F.batch_norm(
            x,
            state[f"{key}.running_mean"],
            state[f"{key}.running_var"],
            state[f"{key}.weight"],
            state[f"{key}.bias"],
            False,
            0.0,
            1e-3,
        )

    def relu6(x):
        return torch.clamp(x, 0.0, 6.0)

    # 'r1_k3_s11_e1_i32_o16', 'r2_k3_s22_e6_i16_o24', 'r2_k5_s22_e6_i24_o40',
    # 'r3_k3_s22_e6_i40_o80', 'r3_k5_s11_e6_i80_o112', 'r4_k5_s22_e6_i112_o192',
    # 'r1_k3_s11_e6_i192_o320' -> first block of each group takes the stride.
    strides = []
    for repeats, stride in ((1, 1), (2, 2), (2, 2), (3, 2), (3, 1), (4, 2), (1, 1)):
        strides += [stride] + [1] * (repeats - 1)

    x = (images_nchw - 127.0) / 128.0
    x = relu6(bn(conv(x, "_conv_stem.weight", 2), "_bn0"))
    for i, stride in enumerate(strides):
        p = f"_blocks.{i}."
        y = x
        if p + "_expand_conv.weight" in state:
            y = relu6(bn(conv(y, p + "_expand_conv.weight"), p + "_bn0"))
        y = relu6(bn(conv(y, p + "_depthwise_conv.weight", stride, y.shape[1]), p + "_bn1"))
        y = bn(conv(y, p + "_project_conv.weight"), p + "_bn2")
        x = y + x if stride == 1 and y.shape == x.shape else y
    x = relu6(bn(conv(x, "_conv_head.weight"), "_bn1"))
    return x.mean((2, 3))


def test_efficientnet_lite0_imagenet_matches_torch_reference():
    torch = pytest.importorskip("torch")
    config = models.default_model_config()
    config.update(
        backbone="efficientnet_lite0",
        pretrained="imagenet",
        last_stride=2,
        embed_dim=1280,
        num_stripes=8,
    )
    model = models.build_model(config, nnx.Rngs(0))
    images = _random_images((2, 128, 64, 3))

    ours = _pooled_backbone_features(model, images)

    state = torch.load(
        pretrained.packaged_efficientnet_lite0_path(), map_location="cpu", weights_only=True
    )
    with torch.no_grad():
        reference = _torch_efficientnet_lite0(
            torch, state, torch.from_numpy(images).permute(0, 3, 1, 2)
        ).numpy()
    assert ours.shape == (2, 1280)
    assert float(np.abs(reference).max()) > 0.1  # a real signal, not all zeros
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-4)


def _random_torchvision_resnet(torch, depths, bottleneck, ibn):
    """Random weights in torchvision's layout (IBN-Net's bn1.IN / bn1.BN for IBN-a),
    scaled so activations stay O(1); some tensors saved non-contiguous/offset."""
    g = torch.Generator().manual_seed(0)
    state = {}

    def conv(key, out_ch, in_ch, k):
        std = math.sqrt(2.0 / (in_ch * k * k))
        # store as a permuted view -> non-contiguous strides in the file
        w = (torch.randn(k, k, in_ch, out_ch, generator=g) * std).permute(3, 2, 0, 1)
        state[key + ".weight"] = w

    def bn(key, ch, gain=1.0):
        stats = 0.1 * torch.randn(3 * ch + 5, generator=g)  # a storage shared by offsets
        state[key + ".weight"] = gain * (0.5 + 0.5 * torch.rand(ch, generator=g))
        state[key + ".bias"] = 0.1 * torch.randn(ch, generator=g)
        state[key + ".running_mean"] = stats[5 : 5 + ch]
        state[key + ".running_var"] = 0.5 + torch.rand(ch, generator=g)
        state[key + ".num_batches_tracked"] = torch.tensor(10)

    def norm1(key, ch, use_ibn):
        if not use_ibn:
            return bn(key, ch)
        half = ch // 2
        state[key + ".IN.weight"] = 0.5 + 0.5 * torch.rand(half, generator=g)
        state[key + ".IN.bias"] = 0.1 * torch.randn(half, generator=g)
        bn(key + ".BN", ch - half)

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    in_ch, expansion = 64, 4 if bottleneck else 1
    for stage, (planes, depth) in enumerate(zip((64, 128, 256, 512), depths, strict=True)):
        for b in range(depth):
            p = f"layer{stage + 1}.{b}."
            use_ibn = ibn and stage < 3
            if bottleneck:
                conv(p + "conv1", planes, in_ch, 1)
                norm1(p + "bn1", planes, use_ibn)
                conv(p + "conv2", planes, planes, 3)
                bn(p + "bn2", planes)
                conv(p + "conv3", planes * 4, planes, 1)
                bn(p + "bn3", planes * 4, gain=0.3)
            else:
                conv(p + "conv1", planes, in_ch, 3)
                norm1(p + "bn1", planes, use_ibn)
                conv(p + "conv2", planes, planes, 3)
                bn(p + "bn2", planes, gain=0.3)
            if b == 0 and (stage > 0 or in_ch != planes * expansion):
                conv(p + "downsample.0", planes * expansion, in_ch, 1)
                bn(p + "downsample.1", planes * expansion)
            in_ch = planes * expansion
    state["fc.weight"] = torch.randn(1000, in_ch, generator=g)
    state["fc.bias"] = torch.zeros(1000)
    return state


def _torch_resnet(torch, state, images_nchw, depths, bottleneck, last_stride, ibn):
    """Independent reference forward of a torchvision(-IBN-a) ResNet with torch ops."""
    F = torch.nn.functional
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def bn(x, key):
        return F.batch_norm(
            x,
            state[f"{key}.running_mean"],
            state[f"{key}.running_var"],
            state[f"{key}.weight"],
            state[f"{key}.bias"],
            False,
            0.0,
            1e-5,
        )

    def norm1(x, key):
        if f"{key}.IN.weight" not in state:
            return bn(x, key)
        half = state[f"{key}.IN.weight"].shape[0]
        first = F.instance_norm(
            x[:, :half], weight=state[f"{key}.IN.weight"], bias=state[f"{key}.IN.bias"], eps=1e-5
        )
        return torch.cat([first, bn(x[:, half:], f"{key}.BN")], 1)

    def conv(x, key, stride=1, padding=0):
        return F.conv2d(x, state[f"{key}.weight"], None, stride, padding)

    x = (images_nchw - mean) / std
    x = F.max_pool2d(F.relu(bn(conv(x, "conv1", 2, 3), "bn1")), 3, 2, 1)
    for stage, depth in enumerate(depths):
        for b in range(depth):
            p = f"layer{stage + 1}.{b}"
            stride = (1 if stage == 0 else (last_stride if stage == 3 else 2)) if b == 0 else 1
            if bottleneck:
                y = F.relu(norm1(conv(x, p + ".conv1"), p + ".bn1"))
                y = F.relu(bn(conv(y, p + ".conv2", stride, 1), p + ".bn2"))
                y = bn(conv(y, p + ".conv3"), p + ".bn3")
            else:
                y = F.relu(norm1(conv(x, p + ".conv1", stride, 1), p + ".bn1"))
                y = bn(conv(y, p + ".conv2", 1, 1), p + ".bn2")
            if f"{p}.downsample.0.weight" in state:
                x = bn(conv(x, p + ".downsample.0", stride), p + ".downsample.1")
            x = F.relu(y + x)
    return x.mean((2, 3))


@pytest.mark.parametrize(
    "backbone, depths, bottleneck, last_stride, ibn",
    [
        ("resnet50", (3, 4, 6, 3), True, 1, False),
        ("resnet18", (2, 2, 2, 2), False, 2, True),
    ],
    ids=["resnet50-last_stride1", "resnet18-ibn"],
)
def test_resnet_random_torchvision_weights_match_torch_reference(
    tmp_path, backbone, depths, bottleneck, last_stride, ibn
):
    torch = pytest.importorskip("torch")
    state = _random_torchvision_resnet(torch, depths, bottleneck, ibn)
    assert not state["conv1.weight"].is_contiguous()
    assert state["bn1.running_mean"].storage_offset() > 0
    path = tmp_path / f"{backbone}.pth"
    torch.save(state, path)

    config = models.default_model_config()
    config.update(
        backbone=backbone,
        pretrained=str(path),
        last_stride=last_stride,
        ibn=ibn,
        embed_dim=64,
        num_stripes=4,
    )
    model = models.build_model(config, nnx.Rngs(0))
    # 128 x 64 keeps layer4 >= 4 x 2 pixels; XLA's CPU convolution is pathologically
    # slow on 4 x 2 x 512 maps (64 x 32 input with last stride 1).
    images = _random_images((2, 128, 64, 3), seed=1)

    ours = _pooled_backbone_features(model, images)

    with torch.no_grad():
        reference = _torch_resnet(
            torch,
            state,
            torch.from_numpy(images).permute(0, 3, 1, 2),
            depths,
            bottleneck,
            last_stride,
            ibn,
        ).numpy()
    assert ours.shape == (2, models.feature_dim(backbone))
    assert 0.1 < float(np.abs(reference).max()) < 100.0
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-4)


# ------------------------------------------------------------- a jaxreid run


def test_a_run_initialises_another_model(run_dir, tmp_path):
    """model.pretrained = a workdir (or one of its checkpoint folders): the new
    model embeds exactly as the run's model; a model that does not fit, or a
    folder with no checkpoint, is refused with the reason."""
    from jaxreid.inference import Embedder, read_run_config

    def model_config(**changes):
        config = read_run_config(run_dir).model
        config.update({"pretrained": run_dir, **changes})
        return config

    images = np.random.default_rng(4).integers(0, 256, (3, 128, 64, 3), dtype=np.uint8)
    expected = Embedder.from_workdir(run_dir).embed(images)["global"]
    for folder in (run_dir, os.path.join(run_dir, "checkpoints", "latest")):
        model = models.build_model(model_config(pretrained=folder), nnx.Rngs(7))
        embedder = Embedder(read_run_config(run_dir), *models.split_model(model))
        np.testing.assert_allclose(embedder.embed(images)["global"], expected, rtol=0, atol=1e-6)

    with pytest.raises(
        pretrained.CheckpointError,
        match=r"model.pretrained: .*global_fc/kernel/value: checkpoint \(512, 32\) vs model "
        r"\(512, 16\).*config.json",
    ):
        models.build_model(model_config(embed_dim=16), nnx.Rngs(0))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(pretrained.CheckpointError, match="holds no checkpoint"):
        models.build_model(model_config(pretrained=str(empty)), nnx.Rngs(0))


def test_a_run_hands_over_everything_but_its_classifier(tmp_path):
    """A supervised run's classifier (its own training identities) is not
    loaded: the new model keeps its classifier of another size as
    initialised, and takes every other parameter and statistic of the run."""
    from flax import struct

    from jaxreid.checkpoints import Checkpoints

    @struct.dataclass
    class Saved:
        step: int
        params: nnx.State
        batch_stats: nnx.State
        ema: None = None

    config = models.default_model_config()
    config.update(backbone="resnet18", head="bnneck", embed_dim=0, num_classes=3)
    _, params, batch_stats = models.split_model(models.build_model(config, nnx.Rngs(1)))
    checkpoints = Checkpoints(str(tmp_path), keep=1)
    checkpoints.save(checkpoints.latest, Saved(np.int32(5), params, batch_stats), {})
    checkpoints.close()

    config.update(num_classes=7, pretrained=str(tmp_path))
    model = models.build_model(config, nnx.Rngs(2))
    fresh = models.build_model(_no_pretrained(config), nnx.Rngs(2))
    flat = lambda tree: {k: np.asarray(v) for k, v in nnx.to_flat_state(tree)}  # noqa: E731
    loaded, saved, initial = (
        flat(nnx.state(model)),
        {**flat(params), **flat(batch_stats)},
        flat(nnx.state(fresh)),
    )
    classifier = [k for k in loaded if "classifier" in k]
    assert classifier and all(loaded[k].shape[-1] == 7 for k in classifier)
    for key, value in loaded.items():
        np.testing.assert_array_equal(value, initial[key] if key in classifier else saved[key])


def _no_pretrained(config):
    copy = ml_collections.ConfigDict(config.to_dict())
    copy.pretrained = ""
    return copy

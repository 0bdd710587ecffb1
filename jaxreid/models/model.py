"""The re-id model (backbone + head), its config and the pure functional core.

    model = build_model(config, rngs=nnx.Rngs(0))
    graphdef, params, batch_stats = split_model(model)     # once
    outputs, batch_stats = apply_model(graphdef, params, batch_stats, images, train=True)

`params` holds every nnx.Param (conv/linear kernels, norm scales/biases, GeM's
p); `batch_stats` every nnx.BatchStat (running means/variances). The model has no
other state (no dropout or rng), which split_model checks. `apply_model` merges
the pytrees back into a module inside the traced function, so it is a pure
function usable under plain `jax.jit` (train must be static).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from jaxreid.models.camera_style import (
    CameraStyle,
    camera_style_enabled,
    camera_style_problems,
    default_camera_style_config,
    shallow_channels,
)
from jaxreid.models.efficientnet import EfficientNetLite0
from jaxreid.models.fusion import FusionHead
from jaxreid.models.heads import POOLINGS, BNNeckHead, FCHead, SCLHead, TokenMap
from jaxreid.models.osnet import OSNET_WIDTHS, OSNet
from jaxreid.models.patch_branch import (
    PatchBranch,
    default_patch_config,
    patch_problems,
    patches_enabled,
)
from jaxreid.models.patch_grid import (
    PatchGrid,
    default_patch_grid_config,
    patch_grid_enabled,
    patch_grid_problems,
)
from jaxreid.models.pretrained import load_pretrained
from jaxreid.models.resnet import RESNET_DEPTHS, ResNet
from jaxreid.models.vit import PATCH_SIZE, VIT_DEPTH, VIT_SIZES, VisionTransformer
from jaxreid.models.waveblock import (
    WaveBlock,
    default_waveblock_config,
    waveblock_enabled,
    waveblock_problems,
)

# Channels of each backbone's final feature map.
FEATURE_DIMS = {
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "efficientnet_lite0": 1280,
    **{name: widths[-1] for name, widths in OSNET_WIDTHS.items()},
    **{name: width for name, (width, _heads) in VIT_SIZES.items()},
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
HEADS = ("scl", "bnneck", "fc", "fusion")
# The ViT settings and their neutral values (what the CNNs are built with).
VIT_SETTINGS = {
    "patch_stride": PATCH_SIZE,
    "conv_stem": False,
    "camera_embedding": 0,
    "drop_path": 0.0,
    "vit_depth": 0,
}


def model_problems(config: ml_collections.ConfigDict) -> list[str]:
    """Problems of `config`'s `model` section as 'model.setting = value: fix' lines."""
    from jaxreid.validate import choice_problems

    problems = choice_problems(
        config,
        ("model.backbone", sorted(FEATURE_DIMS)),
        ("model.head", HEADS),
        ("model.pooling", POOLINGS),
        ("model.dtype", tuple(_DTYPES)),
    )
    problems += _vit_problems(config)
    problems += waveblock_problems(config)
    problems += camera_style_problems(config)
    problems += patch_problems(config)
    problems += patch_grid_problems(config)
    problems += _fusion_problems(config)
    if config.model.head in ("scl", "fusion"):
        stripes, dim = config.model.num_stripes, config.model.embed_dim
        if stripes < 1 or dim < 1 or dim % stripes:
            problems.append(
                f"model.embed_dim = {dim}: must be a positive multiple of model.num_stripes "
                f"= {stripes} (each stripe gets embed_dim / num_stripes dimensions)"
            )
    return problems


def _fusion_problems(config: ml_collections.ConfigDict) -> list[str]:
    """The fusion head needs a ViT's tokens and at least one block."""
    model = config.model
    if model.head != "fusion":
        return []
    problems = []
    if model.backbone not in VIT_SIZES:
        problems.append(
            f"model.head = 'fusion': SDFT's fusion blocks need a ViT backbone "
            f"({', '.join(VIT_SIZES)}), not {model.backbone}; use head 'scl' for its stripes"
        )
    if model.get("fusion_depth", 1) < 1:
        problems.append(
            f"model.fusion_depth = {model.fusion_depth}: the fusion head needs at least one "
            "block (SDFT: 1-2)"
        )
    return problems


def _setting(config: ml_collections.ConfigDict, key: str):
    section, name = key.split(".")
    return config.get(section, {}).get(name)


def _vit_problems(config: ml_collections.ConfigDict) -> list[str]:
    """The ViT settings: in range for a ViT, neutral for the other backbones."""
    from jaxreid.validate import number_problems

    model = config.model
    if model.backbone not in VIT_SIZES:
        problems = [
            f"model.{key} = {model.get(key)!r}: only for the ViT backbones "
            f"({', '.join(VIT_SIZES)}); leave it at {neutral!r}"
            for key, neutral in VIT_SETTINGS.items()
            if model.get(key, neutral) != neutral
        ]
        if model.pooling == "cls":
            problems.append(
                f"model.pooling = 'cls': {model.backbone} has no [CLS] token; use avg or gem"
            )
        return problems
    problems = number_problems(
        config,
        ("model.patch_stride", 1, PATCH_SIZE, "[]", "16: disjoint patches, TransReID: 12"),
        ("model.vit_depth", 0, VIT_DEPTH, "[]", f"0 = all {VIT_DEPTH} blocks"),
        ("model.camera_embedding", 0, None, "[]", "the number of cameras, 0 = off"),
        ("model.camera_weight", 0, None, "[]", "TransReID: 3"),
        ("model.drop_path", 0, 1, "[)", "TransReID-SSL: 0.3"),
    )
    if not problems and model.conv_stem and model.patch_stride % 2:
        problems.append(
            f"model.patch_stride = {model.patch_stride}: the conv stem halves it on its "
            "half-resolution map; use an even stride (16, 12, ...)"
        )
    size = tuple(model.get("image_size", ()))
    if len(size) != 2 or min(size, default=0) < PATCH_SIZE:
        problems.append(
            f"model.image_size = {size}: (height, width) of at least {PATCH_SIZE} pixels, "
            "normally data.height and data.width"
        )
    if model.ibn:
        problems.append("model.ibn = True: IBN-a is for the ResNets (the ViT's is model.conv_stem)")
    camera_bn = [k for k in ("cluster.camera_bn", "eval.camera_bn") if _setting(config, k)]
    for key, value in (
        ("camera_embedding", model.camera_embedding),
        ("drop_path", model.drop_path),
    ):
        if camera_bn and value:
            # evaluate.camera_bn estimates the statistics with a training-mode
            # forward that passes neither cameras nor a key.
            problems.append(
                f"model.{key} = {value} with {' and '.join(camera_bn)}: the per-camera "
                f"statistics pass cannot run it; set model.{key} = 0 or turn camera_bn off"
            )
    return problems


def feature_dim(backbone: str) -> int:
    """Channels C of the backbone's (B, h, w, C) feature map."""
    if backbone not in FEATURE_DIMS:
        raise ValueError(f"unknown backbone {backbone!r}; expected one of {sorted(FEATURE_DIMS)}")
    return FEATURE_DIMS[backbone]


def embedding_dim(config: ml_collections.ConfigDict) -> int:
    """D of outputs["global"] for this config."""
    channels = feature_dim(config.backbone)
    if config.head in ("scl", "fc") or config.embed_dim not in (0, channels):
        return int(config.embed_dim)
    return channels


def default_model_config() -> ml_collections.ConfigDict:
    """The paper's model: ResNet-50, last stride 1, SCL head with D = 2048, P = 8."""
    config = ml_collections.ConfigDict()
    # resnet18 | resnet34 | resnet50 | efficientnet_lite0 | osnet_x1_0 | osnet_x0_75 |
    # osnet_x0_5 | osnet_x0_25 | vit_tiny | vit_small | vit_base (patch 16)
    config.backbone = "resnet50"
    # "" random init | "imagenet" (efficientnet_lite0) | path to a .pth (torchvision
    # ImageNet ResNet, or a torchreid OSNet re-id checkpoint: backbone + `fc`) |
    # a ViT's .npz / .safetensors / .pth in timm's keys (TransReID-SSL's too)
    config.pretrained = ""
    config.last_stride = 1  # stride of the last strided stage (1 or 2; not OSNet)
    config.ibn = False  # IBN-a in layer1-3 (ResNets only)
    config.pooling = "avg"  # avg | gem | cls (global branch; cls: a ViT's [CLS] token)
    # scl | bnneck | fc (torchreid's Linear + BN1d + ReLU embedding) | fusion (ViT:
    # SDFT's part tokens fused with the [CLS] token, then the scl head's outputs)
    config.head = "scl"
    config.embed_dim = 2048  # D; bnneck: 0 (or C) = no projection
    config.num_stripes = 8  # P (scl head)
    config.dtype = "float32"  # float32 | bfloat16 compute; params always float32
    config.bn_group_size = 0  # ghost-BN group size in samples; 0 = whole batch
    # CPU only, ResNets: 3x3 stride-1 convolutions by Winograd F(4x4, 3x3).
    # Faster steps, slower compile (ResNet-50 b8 on 2 cores: 2.1 -> 2.3 img/s,
    # first step 45 -> 125 s; benchmarks/train_step.py r50_scl8_direct / r50_scl8).
    config.winograd = False
    config.num_classes = 0  # bnneck: identity classifier (supervised training); 0 = none
    # OSNet: the first n stages (stem, conv2, ...) get no gradient and no weight
    # decay (their batch-norm statistics still adapt). 0 = train everything.
    config.freeze_stages = 0
    # ViTs only (the others refuse values other than these):
    # (height, width) the position embeddings are learned at: checkpoints are
    # resized to its token grid on import; other input sizes resize them in
    # the forward. Normally data.height, data.width.
    config.image_size = (256, 128)
    config.patch_stride = 16  # 16 = disjoint patches; TransReID's overlapping: 12
    config.conv_stem = False  # TransReID-SSL's IBN conv stem ("ICS"); even strides
    config.camera_embedding = 0  # learned per-camera token offset (TransReID's SIE): cameras
    config.camera_weight = 3.0  # its factor (TransReID's SIE_COE)
    config.drop_path = 0.0  # stochastic depth, linear over the blocks up to this rate
    config.vit_depth = 0  # blocks kept (0 = all 12)
    config.fusion_depth = 1  # head "fusion": extra blocks over [CLS] + the P part tokens
    # Training-only wave of the backbone's map before the head (jaxreid/models/waveblock.py).
    config.waveblock = default_waveblock_config()  # rate 1 = off
    # Training-only re-styling of shallow maps to other cameras (jaxreid/models/camera_style.py).
    config.camera_style = default_camera_style_config()  # styles 0 = off
    # PISL's patch branch on the backbone's map (jaxreid/models/patch_branch.py).
    config.patches = default_patch_config()  # num 0 = off
    # A fixed grid of projected patch features (jaxreid/models/patch_grid.py).
    config.patch_grid = default_patch_grid_config()  # rows 0 = off
    return config


def trainable_mask(model: ReIDModel, params: nnx.State) -> nnx.State:
    """A pytree of bools over `params`: False for the frozen backbone stages."""
    frozen = getattr(model.backbone, "frozen_prefixes", lambda: ())()

    def trainable(path, _leaf) -> bool:
        names = [str(getattr(p, "key", p)) for p in path]
        return not (len(names) > 1 and names[0] == "backbone" and names[1] in frozen)

    return jax.tree_util.tree_map_with_path(trainable, params)


class ReIDModel(nnx.Module):
    """images float32 (B, H, W, 3) RGB pixels [0, 255] -> dict of float32 outputs."""

    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        if config.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {config.dtype!r}")
        dtype = _DTYPES[config.dtype]
        group = int(config.bn_group_size)
        winograd = bool(config.get("winograd", False))  # absent from older saved configs
        if config.backbone in RESNET_DEPTHS:
            self.backbone = ResNet(
                config.backbone,
                rngs=rngs,
                last_stride=int(config.last_stride),
                ibn=bool(config.ibn),
                dtype=dtype,
                bn_group_size=group,
                winograd=winograd,
            )
        elif config.backbone == "efficientnet_lite0":
            if config.ibn:
                raise ValueError("ibn is only available for the ResNet backbones")
            self.backbone = EfficientNetLite0(
                rngs=rngs, last_stride=int(config.last_stride), dtype=dtype, bn_group_size=group
            )
        elif config.backbone in VIT_SIZES:
            if config.ibn:
                raise ValueError("ibn is only available for the ResNet backbones")
            self.backbone = VisionTransformer(
                config.backbone,
                rngs=rngs,
                image_size=tuple(config.get("image_size", (256, 128))),
                patch_stride=int(config.get("patch_stride", PATCH_SIZE)),
                conv_stem=bool(config.get("conv_stem", False)),
                depth=int(config.get("vit_depth", 0)) or VIT_DEPTH,
                camera_embedding=int(config.get("camera_embedding", 0)),
                camera_weight=float(config.get("camera_weight", 3.0)),
                drop_path=float(config.get("drop_path", 0.0)),
                dtype=dtype,
                bn_group_size=group,
            )
        elif config.backbone in OSNET_WIDTHS:
            if config.ibn:
                raise ValueError("ibn is only available for the ResNet backbones")
            # OSNet's last stage never strides: last_stride does not apply.
            self.backbone = OSNet(
                config.backbone,
                rngs=rngs,
                dtype=dtype,
                bn_group_size=group,
                freeze_stages=int(config.freeze_stages),
            )
        else:
            feature_dim(config.backbone)  # raises with the list of names
        if winograd and config.backbone not in RESNET_DEPTHS:
            # The other backbones' 3x3 convolutions are depthwise.
            raise ValueError(
                f"model.winograd is only available for the ResNets, not {config.backbone}"
            )
        if config.freeze_stages and not hasattr(self.backbone, "frozen_prefixes"):
            raise ValueError(
                f"model.freeze_stages is only available for OSNet, not {config.backbone}"
            )
        channels = self.backbone.num_features
        if config.head == "scl":
            self.head = SCLHead(
                channels,
                embed_dim=int(config.embed_dim),
                num_stripes=int(config.num_stripes),
                pooling=config.pooling,
                rngs=rngs,
                dtype=dtype,
                bn_group_size=group,
            )
        elif config.head == "fusion":
            if not isinstance(self.backbone, VisionTransformer):
                raise ValueError("head 'fusion' needs a ViT backbone")
            first = self.backbone.blocks[0]
            self.head = FusionHead(
                channels,
                first.attn.heads,
                depth=int(config.get("fusion_depth", 1)),
                embed_dim=int(config.embed_dim),
                num_stripes=int(config.num_stripes),
                rngs=rngs,
                dtype=dtype,
                bn_group_size=group,
            )
        elif config.head in ("bnneck", "fc"):  # the same arguments
            head = BNNeckHead if config.head == "bnneck" else FCHead
            self.head = head(
                channels,
                embed_dim=int(config.embed_dim),
                pooling=config.pooling,
                rngs=rngs,
                dtype=dtype,
                bn_group_size=group,
                num_classes=int(config.num_classes),
            )
        else:
            raise ValueError(f"unknown head {config.head!r}; expected one of {HEADS}")
        self.waveblock = (
            WaveBlock(config.waveblock.height_ratio, config.waveblock.rate)
            if waveblock_enabled(config)
            else None
        )
        style = config.get("camera_style")
        self.camera_style = (
            CameraStyle(
                shallow_channels(config.backbone, style.stage),
                style.num_cameras,
                style.styles,
                style.stage,
                style.momentum,
            )
            if camera_style_enabled(config)
            else None
        )
        self.patches = (
            PatchBranch(channels, config.patches, rngs=rngs, bn_group_size=group)
            if patches_enabled(config)
            else None
        )
        self.patch_grid = (
            PatchGrid(channels, config.patch_grid, rngs=rngs, bn_group_size=group)
            if patch_grid_enabled(config)
            else None
        )

    def __call__(
        self,
        images: jax.Array,
        train: bool = False,
        *,
        rng: jax.Array | None = None,
        cameras: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        # rng and cameras are for the modules that use them (stochastic
        # training-only layers, camera embeddings, camera styles).
        # No key (camera_bn's statistics-only pass): no re-styling, no wave.
        restyling = train and rng is not None and self.camera_style is not None
        if isinstance(self.backbone, VisionTransformer):
            features = self.backbone(images, train, rng=rng, cameras=cameras)
        elif restyling:
            style = self.camera_style  # the outputs of the re-styled copies: "styled/<key>"
            restyle = lambda stage, x: style(x, cameras, rng) if stage == style.stage else x  # noqa: E731
            features = self.backbone(images, train, hook=restyle)
        else:
            features = self.backbone(images, train)
        if self.waveblock is not None:  # on a ViT's patch grid, or a CNN's map
            if isinstance(features, TokenMap):
                features = features._replace(grid=self.waveblock(features.grid, train, rng))
            else:
                features = self.waveblock(features, train, rng)
        outputs = self.head(features, train)
        if self.patches is not None:
            grid = features.grid if isinstance(features, TokenMap) else features
            outputs = {**outputs, **self.patches(grid, train, rng)}
        if self.patch_grid is not None:
            grid = features.grid if isinstance(features, TokenMap) else features
            outputs = {**outputs, **self.patch_grid(grid, train)}
        outputs = {k: v.astype(jnp.float32) for k, v in outputs.items()}
        if restyling:
            outputs = self.camera_style.split(outputs, images.shape[0])
        return outputs


def build_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> ReIDModel:
    """Builds the model; loads `config.pretrained` into the backbone (and, for a
    torchreid checkpoint with head "fc", into the head; other heads stay randomly
    initialised)."""
    model = ReIDModel(config, rngs=rngs)
    if config.pretrained:
        load_pretrained(model, config.backbone, config.head, config.pretrained)
    if isinstance(model.head, FusionHead):
        # The fusion blocks start as the (imported) last block, as TransReID's
        # jigsaw branch does.
        model.head.copy_block(model.backbone.blocks[-1])
    return model


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, params, batch_stats); raises if the model holds any other state."""
    return nnx.split(model, nnx.Param, nnx.BatchStat)


def apply_model(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    batch_stats: nnx.State,
    images: jax.Array,
    train: bool,
    *,
    rng: jax.Array | None = None,
    cameras: jax.Array | None = None,
) -> tuple[dict[str, jax.Array], nnx.State]:
    """Pure forward: (outputs, new_batch_stats). In eval the given batch_stats are
    returned as they are; in train the running statistics are updated.

    `rng` (a typed key) drives the model's training-time randomness (drop-path,
    WaveBlock); a model that has some refuses train=True without it. `cameras`
    (B,) int32 camera indices, for models with a camera embedding."""
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    outputs = model(images, train=train, rng=rng, cameras=cameras)
    if not train:
        return outputs, batch_stats
    return outputs, nnx.state(model, nnx.BatchStat)

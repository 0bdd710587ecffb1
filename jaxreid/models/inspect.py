"""What a ViT weights file holds and how it imports, before training with it.

    python -m jaxreid.models.inspect WEIGHTS [--image=photo.jpg] [--top=5]

WEIGHTS: .npz, .safetensors or .pth in timm's keys (TransReID-SSL's conv-stem
keys, `module.` / `base.` prefixes too). Prints the model it describes
(size, blocks, conv stem, the input size of its position embeddings), the
entries loaded into jaxreid's ViT and those left out. For a checkpoint with a
1000-class head (timm's ImageNet weights), --image classifies a photo: the
top classes with their ImageNet index, label and probability, so an import
can be checked by eye. Pixels are normalised with mean 0.5 and std 0.5, as the
ViTs are (jaxreid.models.vit), after timm's evaluation crop: the shorter side
resized (bicubic) to the input size / 0.9, then the centre square.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import flags

from jaxreid.command_line import parse, run

PROG = "python -m jaxreid.models.inspect"
LABELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_classes.txt")
IMAGENET_CLASSES = 1000
CROP_FRACTION = 0.9  # timm's crop_pct for the augreg ViTs


def define_flags(fv: flags.FlagValues) -> None:
    """What a ViT weights file holds and how it imports into jaxreid's ViT."""
    flags.DEFINE_string("image", None, "Photo to classify (1000-class heads).", flag_values=fv)
    flags.DEFINE_integer("top", 5, "How many classes.", lower_bound=1, flag_values=fv)


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names, by class index."""
    with open(LABELS) as f:
        labels = [line.strip() for line in f]
    if len(labels) != IMAGENET_CLASSES:
        raise RuntimeError(f"{LABELS} holds {len(labels)} labels, not {IMAGENET_CLASSES}")
    return labels


def center_crop(path: str, height: int, width: int) -> np.ndarray:
    """float32 (1, height, width, 3) RGB pixels [0, 255]: the image scaled
    (bicubic) so that it covers (height, width) / CROP_FRACTION, then its centre."""
    from PIL import Image

    from jaxreid.utils import UserError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except OSError as e:
        raise UserError(f"--image {path!r} cannot be read as an image ({e})") from None
    scale = max(height, width) / CROP_FRACTION / min(image.size)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.BICUBIC)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    crop = image.crop((left, top, left + width, top + height))
    return np.asarray(crop, np.float32)[None]


def classify(
    backbone, head_weight: np.ndarray, head_bias: np.ndarray, images: np.ndarray
) -> np.ndarray:
    """Softmax probabilities (B, classes) of the [CLS] token through a linear head."""
    import jax.numpy as jnp

    cls = np.asarray(backbone(jnp.asarray(images), False).cls, np.float64)
    logits = cls @ head_weight.T.astype(np.float64) + head_bias.astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    probabilities = np.exp(logits)
    return probabilities / probabilities.sum(axis=1, keepdims=True)


def inspect(path: str, image: str | None = None, top: int = 5) -> list[str]:
    """The report's lines (see the module docstring)."""
    from flax import nnx

    from jaxreid.models import pretrained
    from jaxreid.models.vit import VisionTransformer

    state = pretrained.vit_state(pretrained.read_weights(path))
    shape = pretrained.vit_shape(state)
    height, width = shape["image_size"]
    lines = [
        f"{path}: {shape['backbone']}, {shape['vit_depth']} blocks, "
        f"conv stem {'yes' if shape['conv_stem'] else 'no'}, position embeddings for "
        f"{height}x{width} inputs; {len(state)} entries"
    ]
    backbone = VisionTransformer(
        shape["backbone"],
        rngs=nnx.Rngs(0),
        image_size=(height, width),
        conv_stem=shape["conv_stem"],
        depth=shape["vit_depth"],
        camera_embedding=len(state["sie_embed"]) if "sie_embed" in state else 0,
    )
    report = pretrained.load_vit(backbone, path)
    lines.append(f"loaded ({len(report['loaded'])}):")
    lines += [f"  {key} {tuple(state[key].shape)}" for key in report["loaded"]]
    lines.append(f"not loaded ({len(report['ignored'])}):")
    lines += [f"  {key} {tuple(state[key].shape)}" for key in report["ignored"]]
    weight, bias = state.get("head.weight"), state.get("head.bias")
    has_head = weight is not None and bias is not None and weight.shape[0] == IMAGENET_CLASSES
    if not has_head:
        if image:
            lines.append(f"no {IMAGENET_CLASSES}-class head: --image is not classified")
        return lines
    if not image:
        lines.append(f"a {IMAGENET_CLASSES}-class head: give --image=PHOTO to classify a photo")
        return lines
    probabilities = classify(backbone, weight, bias, center_crop(image, height, width))[0]
    labels = imagenet_labels()
    lines.append(f"{image}: top {top} ImageNet classes")
    for rank, index in enumerate(np.argsort(-probabilities, kind="stable")[:top], start=1):
        lines.append(f"  {rank}. {index:3d} {labels[index]:<30} {100 * probabilities[index]:5.1f}%")
    return lines


def main(argv: list[str] | None = None) -> int:
    args, rest = parse(define_flags, argv, PROG, positional=1)
    if not rest:
        print(f"{PROG}: error: give the weights file (see --help)", file=sys.stderr)
        return 2
    from jaxreid.host import configure_host

    configure_host()  # before jax starts a backend
    from absl import logging as absl_logging

    from jaxreid.utils import UserError

    absl_logging.set_verbosity(absl_logging.WARNING)  # jax's backend notes

    try:
        lines = inspect(rest[0], args.image, args.top)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    run(main)

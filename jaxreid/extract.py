"""Features of every image under a folder, from a trained run.

    python -m jaxreid.extract --workdir=/tmp/run --images=/data/crops --out=/tmp/crops.npz

Every .jpg / .jpeg / .png under --images (any depth, sorted) is embedded by the
run's model (its latest checkpoint, or --checkpoint=best). The .npz holds
`paths` (relative to --images), `global` (N, D) unit rows and, for SCL models,
`stripes`; `root` is the folder. Unreadable images are skipped, counted and
named. Search the result with `python -m jaxreid.search`.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags
from absl import logging as absl_logging

from jaxreid.host import configure_host

_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of a `python -m jaxreid.main` run.")
_IMAGES = flags.DEFINE_string("images", None, "Folder of images (searched recursively).")
_OUT = flags.DEFINE_string("out", None, "Output .npz file.")
_CHECKPOINT = flags.DEFINE_enum("checkpoint", "latest", ["latest", "best"], "Which checkpoint.")
_CHUNK = flags.DEFINE_integer("chunk", 1024, "Images decoded and embedded at a time.")
flags.mark_flags_as_required(["workdir", "images", "out"])


def list_images(folder: str) -> list[str]:
    """Paths of every image under `folder`, relative to it, sorted."""
    from jaxreid.data.datasets import list_images_recursive
    from jaxreid.utils import UserError

    if not os.path.isdir(folder):
        raise UserError(f"--images {folder!r} is not a folder")
    return list_images_recursive(folder)


def extract_folder(embedder, folder: str, chunk: int = 1024, log=print) -> dict[str, np.ndarray]:
    """{"paths", "global"[, "stripes"]} of the readable images under `folder`."""
    from tqdm.auto import tqdm

    from jaxreid.data.datasets import DataError
    from jaxreid.data.images import decode_image

    paths = list_images(folder)
    kept, skipped, parts = [], [], []
    bar = tqdm(total=len(paths), unit="img", desc="extract", file=sys.stderr)
    for start in range(0, len(paths), chunk):
        images = []
        for path in paths[start : start + chunk]:
            try:
                pixels, _ = decode_image(
                    os.path.join(folder, path), embedder.height, embedder.width
                )
            except DataError as e:
                skipped.append((path, str(e)))
                continue
            images.append(pixels)
            kept.append(path)
        if images:
            parts.append(embedder.embed(np.stack(images)))
        bar.update(len(paths[start : start + chunk]))
    bar.close()
    if skipped:
        log(
            f"skipped {len(skipped)} unreadable image(s) of {len(paths)}: "
            + "; ".join(message for _, message in skipped[:5])
            + (" ..." if len(skipped) > 5 else "")
        )
    if not kept:
        from jaxreid.utils import UserError

        raise UserError(f"none of the {len(paths)} images under {folder!r} could be read")
    out = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    out["paths"] = np.asarray(kept)
    return out


def main(argv) -> None:
    del argv
    configure_host()  # before jax starts a backend
    # orbax and jax log through absl at INFO; keep the console for results.
    absl_logging.set_verbosity(absl_logging.WARNING)
    from jaxreid.inference import Embedder
    from jaxreid.utils import UserError

    try:
        embedder = Embedder.from_workdir(_WORKDIR.value, _CHECKPOINT.value)
        features = extract_folder(embedder, _IMAGES.value, _CHUNK.value)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    np.savez(_OUT.value, root=os.path.abspath(_IMAGES.value), **features)
    print(f"wrote {_OUT.value}: {len(features['paths'])} images, {features['global'].shape[1]}-d")


if __name__ == "__main__":
    app.run(main)

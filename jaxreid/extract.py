"""Features of every image under a folder, from a trained run.

    python -m jaxreid.extract --workdir=/tmp/run --images=/data/crops --out=/tmp/crops.npz

Every .jpg / .jpeg / .png under --images (any depth, sorted) is embedded by the
run's model (its latest checkpoint, or --checkpoint=best); linked sub-folders
are followed (a link back to a folder already listed is skipped and named).
The .npz holds `paths` (relative to --images), `global` (N, D) unit rows and,
for SCL models, `stripes`; `root` is the folder; `model` records which model
made them (config digest, checkpoint step, weights digest: see
jaxreid.inference). Unreadable images are skipped, counted and named. --out
is checked before any work (".npz" is appended where missing, as numpy does).
Search the result with `python -m jaxreid.search`.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import flags
from absl import logging as absl_logging

from jaxreid.command_line import parse, run
from jaxreid.host import configure_host

PROG = "python -m jaxreid.extract"


def define_flags(fv: flags.FlagValues) -> None:
    """Features of every image under a folder, from a trained run."""
    flags.DEFINE_string(
        "workdir", None, "Folder of a `python -m jaxreid.main` run.", flag_values=fv, required=True
    )
    flags.DEFINE_string(
        "images", None, "Folder of images (searched recursively).", flag_values=fv, required=True
    )
    flags.DEFINE_string("out", None, "Output .npz file.", flag_values=fv, required=True)
    flags.DEFINE_enum(
        "checkpoint", "latest", ["latest", "best"], "Which checkpoint.", flag_values=fv
    )
    flags.DEFINE_integer(
        "chunk", 1024, "Images decoded and embedded at a time.", lower_bound=1, flag_values=fv
    )


def list_images(folder: str, log=print) -> list[str]:
    """Paths of every image under `folder`, relative to it, sorted (linked
    sub-folders followed; what is skipped goes to `log`)."""
    from jaxreid.data.datasets import list_images_recursive
    from jaxreid.utils import UserError

    if not os.path.isdir(folder):
        raise UserError(f"--images {folder!r} is not a folder")
    return list_images_recursive(folder, log)


def extract_folder(embedder, folder: str, chunk: int = 1024, log=print) -> dict[str, np.ndarray]:
    """{"paths", "global"[, "stripes"], "model"} of the readable images under
    `folder`; "model" is the embedder's record (jaxreid.inference.record_array)."""
    from tqdm.auto import tqdm

    from jaxreid.data.datasets import DataError
    from jaxreid.data.images import decode_image
    from jaxreid.inference import RECORD_KEY, record_array

    if chunk < 1:
        from jaxreid.utils import UserError

        raise UserError(f"chunk {chunk}: must be >= 1 (images embedded at a time)")
    paths = list_images(folder, log)
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
    out[RECORD_KEY] = record_array(embedder.record)
    return out


def main(argv: list[str] | None = None) -> int:
    args, _ = parse(define_flags, argv, PROG)
    configure_host()  # before jax starts a backend
    # orbax and jax log through absl at INFO; keep the console for results.
    absl_logging.set_verbosity(absl_logging.WARNING)
    from jaxreid.inference import Embedder, check_output
    from jaxreid.utils import UserError

    try:
        out = check_output(args.out, "--out", ".npz")  # before the work
        list_images(args.images, log=lambda line: None)  # its notes come with the extraction
        embedder = Embedder.from_workdir(args.workdir, args.checkpoint)
        features = extract_folder(embedder, args.images, args.chunk)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    np.savez(out, root=os.path.abspath(args.images), **features)
    print(f"wrote {out}: {len(features['paths'])} images, {features['global'].shape[1]}-d")
    return 0


if __name__ == "__main__":
    run(main)

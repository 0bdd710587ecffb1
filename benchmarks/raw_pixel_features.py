"""Raw-pixel baseline features of a dataset, in the evaluate CLI's npz format.

Each query / gallery crop is decoded at 128x64 (H x W) by the project's
reader and decoder, flattened to a float vector and L2-normalised. The mAP of
these features is the floor any learned model must beat by a wide margin:

    python benchmarks/raw_pixel_features.py --root ../shared/data/cuhk03 \
        --out /tmp/cuhk03_raw.npz
    python -m jaxreid.evaluate --features /tmp/cuhk03_raw.npz --json
"""

from __future__ import annotations

import sys
import time

import numpy as np
from absl import flags

from jaxreid.command_line import parse, run
from jaxreid.data import DataError, load_dataset
from jaxreid.data.images import decode_split


def pixel_features(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> (N, H * W * 3) float32, each row L2-normalised."""
    features = images.reshape(len(images), -1).astype(np.float32)
    features /= np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    return features


PROG = "benchmarks/raw_pixel_features.py"


def define_flags(fv: flags.FlagValues) -> None:
    """Raw-pixel features of a dataset's query and gallery (see the module docstring)."""
    flags.DEFINE_string("root", "../shared/data/cuhk03", "dataset folder", flag_values=fv)
    flags.DEFINE_string("format", "auto", "dataset layout (default: detect)", flag_values=fv)
    flags.DEFINE_integer("height", 128, "image height", flag_values=fv)
    flags.DEFINE_integer("width", 64, "image width", flag_values=fv)
    flags.DEFINE_string("out", None, "npz to write", flag_values=fv, required=True)


def main(argv: list[str] | None = None) -> int:
    args, _ = parse(define_flags, argv, PROG)
    start = time.perf_counter()
    try:
        dataset = load_dataset(args.format, args.root)
        arrays = {}
        for side in ("query", "gallery"):
            split = decode_split(dataset.split(side), args.height, args.width, desc=side)
            arrays[f"{side}_features"] = pixel_features(split.images)
            arrays[f"{side}_pids"] = split.pids
            arrays[f"{side}_cams"] = split.cameras
            arrays[f"{side}_paths"] = np.array(split.paths)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    np.savez(args.out, **arrays)
    print(
        f"wrote {args.out}: {len(arrays['query_pids'])} queries, "
        f"{len(arrays['gallery_pids'])} gallery, dim {arrays['query_features'].shape[1]} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    run(main)

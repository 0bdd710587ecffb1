"""Raw-pixel baseline features of a dataset, in the evaluate CLI's npz format.

Each query / gallery crop is decoded at 128x64 (H x W) by the project's
reader and decoder, flattened to a float vector and L2-normalised. The mAP of
these features is the floor any learned model must beat by a wide margin:

    python benchmarks/raw_pixel_features.py --root ../shared/data/cuhk03 \
        --out /tmp/cuhk03_raw.npz
    python -m jaxreid.evaluate --features /tmp/cuhk03_raw.npz --json
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from jaxreid.data import DataError, load_dataset
from jaxreid.data.images import decode_split


def pixel_features(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> (N, H * W * 3) float32, each row L2-normalised."""
    features = images.reshape(len(images), -1).astype(np.float32)
    features /= np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    return features


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="../shared/data/cuhk03", help="dataset folder")
    parser.add_argument("--format", default="auto", help="dataset layout (default: detect)")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--out", required=True, help="npz to write")
    args = parser.parse_args(argv)
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
    sys.exit(main())

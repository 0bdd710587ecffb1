"""Raw-pixel baseline features of a Market-layout folder, in the evaluate CLI's npz format.

Each query / gallery crop is resized to 64x128 (W x H), flattened to a float
vector and L2-normalised. The mAP of these features is the floor any learned
model must beat by a wide margin:

    python benchmarks/raw_pixel_features.py --root ../shared/data/cuhk03 \
        --out /tmp/cuhk03_raw.npz
    python -m jaxreid.evaluate --features /tmp/cuhk03_raw.npz --json

`read_split` is a stand-in for the dataset reader of jaxreid.data; swap it for
that reader's query / gallery records (path, pid, camera) when convenient.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import time

import numpy as np

SIZE = (64, 128)  # (width, height), as PIL.Image.resize wants it
# Market-1501 names: PPPP_cC..., pid -1 for junk, 0000 for distractors.
_NAME = re.compile(r"^(-?\d+)_c(\d+)")


def read_split(folder: str) -> list[tuple[str, int, int]]:
    """(path, pid, 0-based camera) of every image in `folder`, junk (pid -1) dropped."""
    records = []
    paths = sorted(glob.glob(os.path.join(folder, "*.jpg")))
    paths += sorted(glob.glob(os.path.join(folder, "*.png")))
    for path in paths:
        match = _NAME.match(os.path.basename(path))
        if match is None:
            raise ValueError(f"{path}: name does not follow PPPP_cC_...; not a Market layout")
        pid, camera = int(match.group(1)), int(match.group(2)) - 1
        if pid != -1:
            records.append((path, pid, camera))
    if not records:
        raise ValueError(f"{folder}: no *.jpg or *.png images")
    return records


def pixel_features(paths: list[str]) -> np.ndarray:
    """(N, 64 * 128 * 3) float32, each row L2-normalised."""
    from PIL import Image

    features = np.empty((len(paths), SIZE[0] * SIZE[1] * 3), np.float32)
    for i, path in enumerate(paths):
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB").resize(SIZE, Image.BILINEAR))
        features[i] = pixels.reshape(-1)
    features /= np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    return features


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="../shared/data/cuhk03", help="Market-layout folder")
    parser.add_argument("--out", required=True, help="npz to write")
    args = parser.parse_args(argv)
    if not os.path.isdir(os.path.join(args.root, "query")):
        print(f"error: {args.root}: no query/ folder; pass a Market-layout root", file=sys.stderr)
        return 2
    start = time.perf_counter()
    arrays = {}
    for side, folder in (("query", "query"), ("gallery", "bounding_box_test")):
        records = read_split(os.path.join(args.root, folder))
        arrays[f"{side}_features"] = pixel_features([r[0] for r in records])
        arrays[f"{side}_pids"] = np.array([r[1] for r in records], np.int64)
        arrays[f"{side}_cams"] = np.array([r[2] for r in records], np.int64)
        arrays[f"{side}_paths"] = np.array([r[0] for r in records])
    np.savez(args.out, **arrays)
    print(
        f"wrote {args.out}: {len(arrays['query_pids'])} queries, "
        f"{len(arrays['gallery_pids'])} gallery, dim {arrays['query_features'].shape[1]} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

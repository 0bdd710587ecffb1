"""Reading and decoding a config's dataset (the three splits) for a run."""

from __future__ import annotations

import os
from collections.abc import Callable

import ml_collections
import numpy as np


def load_data(config: ml_collections.ConfigDict, log: Callable[[str], None]):
    """Reads the dataset and decodes the three splits once (cached). With
    `data.eval_root` the query and gallery come from that labelled dataset
    (`data.eval_dataset`, any supported layout) instead: how a model trained on
    unlabelled crops (dataset "folder") is measured. With `data.source_root`
    the labelled training split of that dataset (`data.source_dataset`) is
    decoded too: the source of a two-domain run."""
    from jaxreid.data import load_dataset
    from jaxreid.data.datasets import Record
    from jaxreid.data.images import DecodedSplit, decode_split
    from jaxreid.train import Data

    d = config.data
    dataset = load_dataset(d.dataset, d.root, d.folder_cameras, log)
    sources = {"train": dataset, "query": dataset, "gallery": dataset}
    if d.eval_root:
        labelled = load_dataset(d.eval_dataset, d.eval_root)
        sources.update(query=labelled, gallery=labelled)
    cache = os.path.expanduser(d.cache_dir) if d.cache_dir else None
    splits = {}
    for split, source in sources.items():
        records: list[Record] = source.split(split)
        if not records and split != "train":  # a folder without eval_root
            splits[split] = DecodedSplit(np.zeros((0, d.height, d.width, 3), np.uint8), [])
            continue
        splits[split] = decode_split(
            records,
            d.height,
            d.width,
            cache_dir=cache,
            max_bad_fraction=d.max_bad_fraction,
            desc=f"{source.name}-{split}",
        )
    counts = ", ".join(f"{s} {len(x.records):,}" for s, x in splits.items())
    log(f"dataset {dataset.name} at {dataset.root}: {counts} images")
    if d.get("source_root"):
        source = load_dataset(d.source_dataset, d.source_root)
        splits["source"] = decode_split(
            source.split("train"),
            d.height,
            d.width,
            cache_dir=cache,
            max_bad_fraction=d.max_bad_fraction,
            desc=f"{source.name}-train",
        )
        split = splits["source"]
        log(
            f"labelled source {source.name} at {source.root}: {len(split.records):,} training "
            f"images of {len(np.unique(split.pids)):,} identities"
        )
    if d.eval_root:
        log(f"query and gallery from {labelled.name} at {labelled.root}")
    elif not splits["query"].records:
        log(
            "no query / gallery (set data.eval_root to a labelled dataset): training "
            "without evaluation"
        )
    if len(np.unique(splits["train"].cameras)) == 1:
        log(
            "one camera in the training set: camera-aware parts act camera-agnostic (cap: one "
            "proxy per cluster; camera_negatives and camera_centering: every image shares the "
            "camera; SCL's lam_c: a constant)"
        )
    return Data(**splits)

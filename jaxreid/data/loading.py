"""Reading and decoding a config's dataset (the three splits) for a run."""

from __future__ import annotations

import os
from collections.abc import Callable

import ml_collections


def load_data(config: ml_collections.ConfigDict, log: Callable[[str], None]):
    """Reads the dataset and decodes the three splits once (cached)."""
    from jaxreid.data import load_dataset
    from jaxreid.data.images import decode_split
    from jaxreid.train import Data

    dataset = load_dataset(config.data.dataset, config.data.root)
    cache = os.path.expanduser(config.data.cache_dir) if config.data.cache_dir else None
    splits = {}
    for split in ("train", "query", "gallery"):
        splits[split] = decode_split(
            dataset.split(split),
            config.data.height,
            config.data.width,
            cache_dir=cache,
            max_bad_fraction=config.data.max_bad_fraction,
            desc=f"{dataset.name}-{split}",
        )
    counts = ", ".join(f"{s} {len(d.records):,}" for s, d in splits.items())
    log(f"dataset {dataset.name} at {dataset.root}: {counts} images")
    return Data(**splits)

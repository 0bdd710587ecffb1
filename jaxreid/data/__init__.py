"""Datasets, decode-once image arrays and samplers.

Only the readers are imported here; the synthetic generator and the TFDS
builders are imported where they are used.
"""

from jaxreid.data.datasets import (
    DataError,
    Record,
    ReidDataset,
    dataset_stats,
    load_dataset,
)

__all__ = ["DataError", "Record", "ReidDataset", "dataset_stats", "load_dataset"]

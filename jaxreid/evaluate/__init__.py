"""Evaluation: feature extraction, distances, Market-1501 mAP / CMC, pictures.

`extract_features` is loaded on first use, so that the metrics and the CLI
(`python -m jaxreid.evaluate`) start without importing jax. `plots` (PIL /
matplotlib) is a submodule imported on demand: `from jaxreid.evaluate import plots`.
"""

from typing import TYPE_CHECKING

from jaxreid.evaluate.distances import (
    DEFAULT_MAX_BLOCK_BYTES,
    cosine_distance,
    euclidean_distance,
    scl_distance,
)
from jaxreid.evaluate.metrics import evaluate_ranking, ranked_gallery
from jaxreid.utils import l2_normalize

if TYPE_CHECKING:
    from jaxreid.evaluate.features import extract_features

__all__ = [
    "DEFAULT_MAX_BLOCK_BYTES",
    "cosine_distance",
    "euclidean_distance",
    "evaluate_ranking",
    "extract_features",
    "l2_normalize",
    "ranked_gallery",
    "scl_distance",
]


def __getattr__(name: str):
    if name == "extract_features":
        from jaxreid.evaluate.features import extract_features

        return extract_features
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

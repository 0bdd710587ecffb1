"""Backbones (ResNet-18/34/50 with last stride / IBN-a, EfficientNet-Lite0), heads
(SCL global + stripes, BN neck), ghost batch norm and torch-free pretrained import.

Public interface (see model.py):
    build_model(config, rngs) -> ReIDModel
    split_model(model) -> (graphdef, params, batch_stats)
    apply_model(graphdef, params, batch_stats, images, train) -> (outputs, batch_stats)
    default_model_config() -> ml_collections.ConfigDict
    feature_dim(backbone) / FEATURE_DIMS, embedding_dim(config)
"""

from jaxreid.models.layers import GeM, GhostBatchNorm, InstanceNorm, stripe_bins, stripe_pool
from jaxreid.models.model import (
    FEATURE_DIMS,
    ReIDModel,
    apply_model,
    build_model,
    default_model_config,
    embedding_dim,
    feature_dim,
    split_model,
    trainable_mask,
)
from jaxreid.models.pretrained import CheckpointError, UnsafeCheckpointError, read_checkpoint

__all__ = [
    "FEATURE_DIMS",
    "CheckpointError",
    "GeM",
    "GhostBatchNorm",
    "InstanceNorm",
    "ReIDModel",
    "UnsafeCheckpointError",
    "apply_model",
    "build_model",
    "default_model_config",
    "embedding_dim",
    "feature_dim",
    "read_checkpoint",
    "split_model",
    "stripe_bins",
    "stripe_pool",
    "trainable_mask",
]

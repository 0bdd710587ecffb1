"""Restoring a trained model's parameters from a workdir's orbax checkpoints
(for evaluation and later use), with one error listing every mismatch."""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from flax import nnx

from jaxreid import models
from jaxreid.utils import UserError


def load_model_for_eval(config: ml_collections.ConfigDict, path: str):
    """(graphdef, params, batch_stats, source): the model of `config` with the
    latest checkpoint under `path` (a workdir's checkpoints/latest) restored,
    or the initial model when `path` holds none."""

    model = models.build_model(config.model, rngs=nnx.Rngs(config.seed))
    graphdef, params, batch_stats = models.split_model(model)
    source = "initial model"
    if os.path.isdir(path):
        import orbax.checkpoint as ocp

        with ocp.CheckpointManager(os.path.abspath(path)) as manager:
            step = manager.latest_step()
            if step is not None:
                restored = manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore())
                )["state"]
                params = _match(params, restored["params"], "params", path)
                batch_stats = _match(batch_stats, restored["batch_stats"], "batch_stats", path)
                source = f"checkpoint {path} step {step}"
    return graphdef, params, batch_stats, source


def _path_names(path) -> tuple[str, ...]:
    """A tree path as plain names: nnx.State ends its leaves in `.value`
    attributes, the restored checkpoint in 'value' dict keys."""
    names = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)))
                break
    return tuple(names)


def _match(template, restored, name: str, path: str):
    """Restored arrays must have the model's tree and shapes; one error lists all."""
    flat_t = {_path_names(k): v for k, v in jax.tree_util.tree_flatten_with_path(template)[0]}
    flat_r = {_path_names(k): v for k, v in jax.tree_util.tree_flatten_with_path(restored)[0]}
    problems = [f"missing {'/'.join(k)}" for k in flat_t if k not in flat_r]
    problems += [f"unexpected {'/'.join(k)}" for k in flat_r if k not in flat_t]
    problems += [
        f"{'/'.join(k)}: checkpoint {np.shape(flat_r[k])} vs model {np.shape(v)}"
        for k, v in flat_t.items()
        if k in flat_r and np.shape(flat_r[k]) != np.shape(v)
    ]
    if problems:
        raise UserError(
            f"checkpoint {path} does not fit the configured model ({name}, "
            f"{len(problems)} problems): "
            + "; ".join(problems[:20])
            + " -- evaluate with the config the checkpoint was trained with"
        )
    return jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(template), [flat_r[k] for k in flat_t]
    )

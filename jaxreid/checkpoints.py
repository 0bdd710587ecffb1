"""Orbax checkpoints of a run: the latest state (resume) and the best one (by
plain mAP) with the loop's history, and the model parameters restored for
evaluation and inference, with one error listing every mismatch."""

from __future__ import annotations

import os
import warnings

import jax
import ml_collections
import numpy as np
from flax import nnx

from jaxreid import models
from jaxreid.utils import UserError


class Checkpoints:
    """orbax managers for the latest state (for resume) and the best one (by
    plain mAP), each with a JSON sidecar holding the loop's history."""

    def __init__(self, workdir: str, keep: int = 1):
        import orbax.checkpoint as ocp

        self._ocp = ocp

        # Synchronous saves: the loop waits for each save anyway, and async
        # managers warn at every save that they waited for the previous one.
        def options(keep: int):
            return ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=False
            )

        root = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.latest = ocp.CheckpointManager(os.path.join(root, "latest"), options=options(keep))
        self.best = ocp.CheckpointManager(os.path.join(root, "best"), options=options(1))

    def save(self, manager, state, meta: dict) -> None:
        ocp = self._ocp
        step = int(state.step)
        if manager.latest_step() == step:
            return
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
        )
        manager.wait_until_finished()

    def restore(self, manager, abstract_state, step: int | None = None):
        ocp = self._ocp
        step = manager.latest_step() if step is None else step
        if step is None:
            return None, None
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["meta"]

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def restore_model(path: str, params, batch_stats):
    """(params, batch_stats, step) of the latest checkpoint under `path` (a
    workdir's checkpoints/latest or best; its mean model where it has one),
    checked against the model's trees;
    step None (and the arguments unchanged) when `path` holds none. The
    training-only classifier of a checkpoint is ignored (the model to restore
    into has none), so a supervised model evaluates on any dataset."""
    import orbax.checkpoint as ocp

    if not os.path.isdir(path):
        return params, batch_stats, None
    with ocp.CheckpointManager(os.path.abspath(path)) as manager:
        step = manager.latest_step()
        if step is None:
            return params, batch_stats, None
        with warnings.catch_warnings():
            # The arrays come back on the default device, which is what we want;
            # orbax warns at every restore that no sharding was given.
            warnings.filterwarnings("ignore", message="Sharding info not provided")
            restored = manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore())
            )
    state = restored["state"]
    # A run with a mean model (train.ema_decay) evaluated and exports that one.
    if state.get("ema"):
        state = state["ema"]
    params = _match(params, state["params"], "params", path)
    batch_stats = _match(batch_stats, state["batch_stats"], "batch_stats", path)
    return params, batch_stats, step


def load_model_for_eval(config: ml_collections.ConfigDict, path: str):
    """(graphdef, params, batch_stats, source): the model of `config`, without
    the training-only classifier, with the latest checkpoint under `path` (a
    workdir's checkpoints/latest) restored, or the initial model when `path`
    holds none."""
    model_config = ml_collections.ConfigDict(config.model.to_dict())
    model_config.num_classes = 0
    model = models.build_model(model_config, rngs=nnx.Rngs(config.seed))
    graphdef, params, batch_stats = models.split_model(model)
    params, batch_stats, step = restore_model(path, params, batch_stats)
    source = "initial model" if step is None else f"checkpoint {path} step {step}"
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
    # A checkpoint's classifier is for training only; evaluation never needs it.
    problems += [
        f"unexpected {'/'.join(k)}" for k in flat_r if k not in flat_t and "classifier" not in k
    ]
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

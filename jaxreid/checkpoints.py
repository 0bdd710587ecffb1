"""Orbax checkpoints of a run: the latest state (resume) and the best one (by
plain mAP) with the loop's history, and the model parameters restored for
evaluation and inference, with one error listing every mismatch."""

from __future__ import annotations

import json
import os
import shutil
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

        # Handlers named up front: a fresh manager reads a checkpoint's shapes
        # (item_metadata) only when it knows how each item was written.
        def manager(folder: str, keep: int):
            handlers = {
                "state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            }
            return ocp.CheckpointManager(
                os.path.join(root, folder), options=options(keep), item_handlers=handlers
            )

        root = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.latest = manager("latest", keep)
        self.best = manager("best", 1)

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
        """(state, meta) of `step` (default: the latest), or (None, None). The
        state's `memory` comes back in the shapes it was saved with (a
        method's memory may change shape between epochs, e.g. a prototype
        table grown with the clusters); everything else must fit
        `abstract_state`."""
        ocp = self._ocp
        step = manager.latest_step() if step is None else step
        if step is None:
            return None, None
        abstract_state = _with_saved_shapes(
            abstract_state, manager.item_metadata(step)["state"], "memory"
        )
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["meta"]

    def resume(self, abstract_state, resume_from: int = 0, log=print):
        """(state, meta) to resume from: the latest checkpoint, or (None, None)
        when there is none. A latest checkpoint that cannot be restored is a
        UserError naming its step, unless `resume_from` (train.resume_from)
        names an earlier step (in latest/ or best/) to restore instead: the
        steps after it are then moved to checkpoints/unreadable/, never
        deleted. Never falls back on its own."""
        latest = self.latest.latest_step()
        if latest is None:
            return None, None
        try:
            return self.restore(self.latest, abstract_state, latest)
        except Exception as e:  # noqa: BLE001 -- orbax raises many kinds; all mean "cannot"
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
        where = os.path.join(self.latest.directory, str(latest))
        steps = sorted({*self.latest.all_steps(), *self.best.all_steps()} - {latest})
        if not resume_from:
            earlier = ", ".join(map(str, steps)) or "none"
            raise UserError(
                f"checkpoint {where} (step {latest}) cannot be restored ({error[:200]}): it is "
                "damaged or does not fit this config; resume from an earlier checkpoint with "
                f"--config.train.resume_from=STEP (steps on disk: {earlier}), or start a new "
                "run in another --workdir"
            )
        manager = next((m for m in (self.latest, self.best) if resume_from in m.all_steps()), None)
        if manager is None or resume_from >= latest:
            earlier = ", ".join(str(s) for s in steps if s < latest) or "none"
            raise UserError(
                f"train.resume_from = {resume_from}: no such earlier checkpoint (step {latest} "
                f"cannot be restored; earlier steps on disk: {earlier})"
            )
        try:
            restored = self.restore(manager, abstract_state, resume_from)
        except Exception as e:  # noqa: BLE001
            raise UserError(
                f"train.resume_from = {resume_from}: that checkpoint cannot be restored either "
                f"({type(e).__name__}); choose another step, or start a new run"
            ) from None
        # The later steps would block new saves (orbax saves only after its
        # latest step): moved aside, not deleted.
        aside = os.path.join(os.path.dirname(self.latest.directory), "unreadable")
        for name, m in (("latest", self.latest), ("best", self.best)):
            for step in [s for s in m.all_steps() if s > resume_from]:
                os.makedirs(aside, exist_ok=True)
                target = os.path.join(aside, f"{name}_{step}")
                shutil.move(os.path.join(m.directory, str(step)), target)
                log(f"moved checkpoint {name} step {step} to {target}")
            m.reload()
        log(f"train.resume_from = {resume_from}: resuming from step {resume_from}")
        return restored

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def _with_saved_shapes(abstract_state, saved, field: str):
    """`abstract_state` whose leaves under its top-level `field` take the
    shapes and dtypes of the checkpoint's tree metadata `saved` (their
    shardings kept); leaves the checkpoint lacks stay as they are, for
    orbax's own error."""
    tree = getattr(saved, "tree", saved)
    flat = {
        _path_names(k): v
        for k, v in jax.tree_util.tree_flatten_with_path(
            tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
        )[0]
    }

    def leaf(path, x):
        names = _path_names(path)
        if names[:1] != (field,) or names not in flat:
            return x
        m = flat[names]
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(leaf, abstract_state)


def saved_steps(workdir: str) -> list[int]:
    """The steps of WORKDIR/checkpoints/latest (orbax's step folders), without orbax."""
    folder = os.path.join(workdir, "checkpoints", "latest")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(int(n) for n in names if n.isdigit())


# Settings a checkpoint does not depend on, in the sections that otherwise
# shape it (model); every other model setting breaks a resume.
SAFE_MODEL_KEYS = ("pretrained", "winograd", "bn_group_size")
# Settings outside the model section whose change breaks a resume: the method
# (its memory), the input size and datasets (the memory's rows), the
# optimizer's state.
BREAKING_KEYS = (
    "method.name",
    "method.module",
    "data.height",
    "data.width",
    "data.dataset",
    "data.source_root",
    "data.source_dataset",
    "optimizer.name",
)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _breaks_resume(key: str, old, new) -> bool:
    if old is None or new is None:  # a setting one version lacks: its default
        return False
    section, _, name = key.partition(".")
    if key == "train.ema_decay":  # on / off changes the state's tree
        return (old == 0) != (new == 0)
    return key in BREAKING_KEYS or (section == "model" and name not in SAFE_MODEL_KEYS)


def resume_changes(workdir: str, config: dict) -> list[str]:
    """Compares a resumed run's settings (`config`, as JSON) with the run's
    WORKDIR/config.json: the changed settings as 'key old -> new' (allowed:
    epochs, evaluation, logging, learning rate ...); a UserError listing every
    change the checkpoint cannot take (the model, method, input size ...)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        return []
    try:
        with open(path) as f:
            stored = _flat(json.load(f))
    except (OSError, ValueError) as e:
        raise UserError(
            f"{path}: cannot be read ({e}); it records the run to resume: restore it, or "
            "start a new run in another --workdir"
        ) from None
    new = _flat(config)
    changed = [
        (key, stored.get(key), new.get(key))
        for key in sorted({*stored, *new})
        if stored.get(key) != new.get(key)
    ]
    breaking = [f"{k} {a!r} -> {b!r}" for k, a, b in changed if _breaks_resume(k, a, b)]
    if breaking:
        raise UserError(
            f"--workdir {workdir} holds a run whose checkpoint does not fit "
            f"{len(breaking)} changed setting{'s' * (len(breaking) > 1)}: "
            + ", ".join(breaking)
            + f"; resume without changing them (the run's settings: {path}), or start a "
            "new run in another --workdir"
        )
    return [f"{k} {a!r} -> {b!r}" for k, a, b in changed]


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

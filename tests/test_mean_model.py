"""The mean model (train.ema_decay): its update by hand, and in a run: training
unchanged, the average of the run's own parameters, the model that is evaluated
and restored for inference."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers import cluster_config, tiny_data

from jaxreid.checkpoints import load_model_for_eval, restore_model
from jaxreid.evaluate.protocol import evaluate_model
from jaxreid.step import update_ema
from jaxreid.train import train_and_evaluate


def test_update_ema_by_hand_and_frozen_leaves_keep_their_bits():
    ema = {"a": np.float32([1.0, 2.0]), "frozen": np.float32([0.1, 1 / 3])}
    new = {"a": np.float32([3.0, 2.0]), "frozen": np.float32([0.1, 1 / 3])}
    out = update_ema(ema, new, 0.9)
    np.testing.assert_allclose(out["a"], [1.2, 2.0], rtol=1e-6)
    # 0.9 x + 0.1 x is not always x in float32; the update form keeps it.
    np.testing.assert_array_equal(out["frozen"], ema["frozen"])


def _supervised(root, **overrides):
    return cluster_config(
        root,
        "supervised",
        **{
            "train.epochs": 1,
            "train.steps_per_epoch": 3,
            "train.eval_every": 1,
            "train.checkpoint_every_steps": 1,
            "train.keep_checkpoints": 5,
            **overrides,
        },
    )


def _saved_states(workdir: str):
    """(steps, raw states) of every checkpoint under workdir's checkpoints/latest."""
    import warnings

    import orbax.checkpoint as ocp

    warnings.filterwarnings("ignore", message="Sharding info not provided")
    with ocp.CheckpointManager(f"{workdir}/checkpoints/latest") as manager:
        steps = sorted(manager.all_steps())
        states = [
            manager.restore(s, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))["state"]
            for s in steps
        ]
    return steps, states


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_mean_model_averages_the_run_and_is_what_is_evaluated(tiny_root, tmp_path):
    decay = 0.5
    plain_config = _supervised(tiny_root)
    data = tiny_data(plain_config)
    plain = train_and_evaluate(plain_config, str(tmp_path / "plain"), data, log=lambda s: None)
    mean_config = _supervised(tiny_root, **{"train.ema_decay": decay})
    averaged = train_and_evaluate(mean_config, str(tmp_path / "mean"), data, log=lambda s: None)
    assert averaged["initial"] == plain["initial"]  # the mean model starts as the model

    # The supervised method extracts nothing: the same training, bit for bit.
    steps, mean_states = _saved_states(str(tmp_path / "mean"))
    _, plain_states = _saved_states(str(tmp_path / "plain"))
    assert steps == [1, 2, 3]
    for m, p in zip(mean_states, plain_states, strict=True):
        for a, b in zip(_leaves(m["params"]), _leaves(p["params"]), strict=True):
            np.testing.assert_array_equal(a, b)

    # ema_t = ema_{t-1} + (1 - decay) (params_t - ema_{t-1}), on params and statistics.
    for previous, current in zip(mean_states, mean_states[1:], strict=False):
        for key in ("params", "batch_stats"):
            for e0, x, e1 in zip(
                _leaves(previous["ema"][key]),
                _leaves(current[key]),
                _leaves(current["ema"][key]),
                strict=True,
            ):
                np.testing.assert_allclose(e1, e0 + (1 - decay) * (x - e0), rtol=1e-5, atol=1e-7)
    moved = [
        not np.array_equal(e, x)
        for e, x in zip(
            _leaves(mean_states[-1]["ema"]["params"]),
            _leaves(mean_states[-1]["params"]),
            strict=True,
        )
    ]
    assert any(moved)

    # Evaluated, and restored for inference and export: the mean model.
    graphdef, params, batch_stats, _ = load_model_for_eval(mean_config, "")
    restored_params, restored_stats, step = restore_model(
        str(tmp_path / "mean" / "checkpoints" / "latest"), params, batch_stats
    )
    assert step == 3
    final = evaluate_model(mean_config, graphdef, restored_params, restored_stats, data)
    assert final["plain"] == pytest.approx(averaged["final"]["plain"])
    ema = {
        k: v
        for k, v in jax.tree_util.tree_flatten_with_path(mean_states[-1]["ema"]["params"])[0]
        if "classifier" not in jax.tree_util.keystr(k)
    }
    assert len(_leaves(restored_params)) == len(ema)
    for a, b in zip(_leaves(restored_params), _leaves(list(ema.values())), strict=True):
        np.testing.assert_array_equal(a, b)
